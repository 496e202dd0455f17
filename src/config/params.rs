//! `[params]`: the parameters each item may carry to the model (a prompt, a seed, a step
//! count), declared with their types, defaults and bounds, so that a typo or a wrong type
//! in a drop is caught when the item is claimed, with the key named, not inside the
//! model; and whether an image waits for its parameters file (`required`, `wait_s`).
//!
//! ```toml
//! [params]
//! required = true   # an image without <name>.json waits for it ...
//! wait_s = 60       # ... this long, then fails with the reason
//! [params.schema]
//! prompt = { type = "string" }                       # no default: every item gives it
//! seed = { type = "int", default = 0, min = 0 }
//! steps = { type = "int", default = 20, min = 1, max = 200 }
//! style = { type = "string", default = "photo", choices = ["photo", "studio"] }
//! ```
//!
//! [`ParamsConfig`] is also what turns a drop's JSON, a `--param key=value` or a
//! manifest row into checked [`Params`]: one set of rules for every way in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;
use crate::vocab::params::{ParamValue, Params};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParams {
    required: Option<Spanned<bool>>,
    wait_s: Option<Spanned<i64>>,
    #[serde(default)]
    schema: BTreeMap<String, Spanned<RawParam>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    default: Option<Spanned<toml::Value>>,
    min: Option<Spanned<toml::Value>>,
    max: Option<Spanned<toml::Value>>,
    choices: Option<Spanned<Vec<toml::Value>>>,
}

/// The four types a parameter can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Str,
    Int,
    Float,
    Bool,
}

impl ParamKind {
    /// As users write it (and as errors say it).
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Str => "a string",
            ParamKind::Int => "an integer",
            ParamKind::Float => "a number",
            ParamKind::Bool => "true or false",
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    /// `None`: every item must give it.
    pub default: Option<ParamValue>,
    /// Inclusive bounds, for `int` and `float`.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// When not empty, the only values allowed.
    pub choices: Vec<ParamValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamsConfig {
    /// In name order (the order models receive them in, too).
    pub specs: Vec<ParamSpec>,
    names: Arc<[String]>,
    /// An image without its parameters file waits for it (up to `wait`), instead of
    /// running on the defaults.
    pub required: bool,
    pub wait: Duration,
}

/// Why an item's parameters were refused: what the user gets in `failed/`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("parameters are not valid JSON: {0}")]
    Malformed(String),
    #[error("parameters must be a JSON object {{\"name\": value, ...}}, not {0}")]
    NotAnObject(&'static str),
    #[error("unknown parameter `{key}` (declared in [params.schema]: {known})")]
    Unknown { key: String, known: String },
    #[error("parameter `{key}` must be {expected}, not {got}")]
    Type {
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("parameter `{key}` is {value}, outside its range {range}")]
    Range {
        key: String,
        value: String,
        range: String,
    },
    #[error("parameter `{key}` is {value}; allowed: {choices}")]
    Choice {
        key: String,
        value: String,
        choices: String,
    },
    #[error("parameter `{key}` is required (it has no default in [params.schema])")]
    Missing { key: String },
    #[error("--param {0}: expected key=value")]
    NotKeyValue(String),
}

/// The longest parameters file read: a prompt is a few hundred bytes, and a file this
/// large is a mistake (or an attack), not parameters.
pub const MAX_PARAMS_BYTES: usize = 1 << 20;

impl ParamsConfig {
    /// The declared names, in order (shared by every item's [`Params`]).
    pub fn names(&self) -> &Arc<[String]> {
        &self.names
    }

    fn spec(&self, key: &str) -> Result<&ParamSpec, ParamError> {
        self.specs
            .iter()
            .find(|s| s.name == key)
            .ok_or_else(|| ParamError::Unknown {
                key: key.to_string(),
                known: self.known(),
            })
    }

    fn known(&self) -> String {
        if self.specs.is_empty() {
            return "none".into();
        }
        self.names.join(", ")
    }

    /// Every parameter at its default, with `given` (checked) over them.
    pub fn resolve(&self, given: &Map<String, Value>) -> Result<Params, ParamError> {
        for key in given.keys() {
            self.spec(key)?;
        }
        let values = self
            .specs
            .iter()
            .map(|s| match given.get(&s.name) {
                // `null` is "no value", as an empty CSV cell is: the default.
                Some(v) if !v.is_null() => s.check(v),
                _ => s.default.clone().ok_or_else(|| ParamError::Missing {
                    key: s.name.clone(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Params::new(Arc::clone(&self.names), values))
    }

    /// A parameters file's bytes to the object [`ParamsConfig::resolve`] takes.
    /// A byte-order mark (what Windows editors write first) is skipped.
    pub fn parse_json(bytes: &[u8]) -> Result<Map<String, Value>, ParamError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(other) => Err(ParamError::NotAnObject(json_kind(&other))),
            Err(e) => Err(ParamError::Malformed(e.to_string())),
        }
    }

    /// `key=value` texts (from `--param` or a CSV manifest) to JSON values of each
    /// key's declared type, so they go through the same checks as a file's.
    pub fn parse_texts<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Map<String, Value>, ParamError> {
        let mut out = Map::new();
        for (key, text) in pairs {
            let spec = self.spec(key)?;
            out.insert(key.to_string(), spec.value_of_text(text)?);
        }
        Ok(out)
    }

    /// `--param key=value` arguments, split (a value may itself contain `=`).
    pub fn parse_args(&self, args: &[String]) -> Result<Map<String, Value>, ParamError> {
        let pairs = args
            .iter()
            .map(|a| {
                a.split_once('=')
                    .ok_or_else(|| ParamError::NotKeyValue(a.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.parse_texts(pairs.iter().map(|(k, v)| (k.trim(), *v)))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value as the error quotes it (long strings cut).
fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 60;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

impl ParamSpec {
    /// A valid value for rows that carry no item (the start-up contract check, `check`,
    /// `bench`, the holes a failed fit leaves in a batch): the default, else the first
    /// choice, else the lower bound, else zero (or `""`, `false`). A model should not be
    /// handed a value its own schema refuses, even for a row nobody reads.
    pub fn placeholder(&self) -> ParamValue {
        if let Some(d) = &self.default {
            return d.clone();
        }
        if let Some(c) = self.choices.first() {
            return c.clone();
        }
        // Zero, moved into the range (an integer inside it, for `int`).
        let (lo, hi) = (self.min.unwrap_or(f64::MIN), self.max.unwrap_or(f64::MAX));
        let x = 0.0f64.min(hi).max(lo);
        match self.kind {
            ParamKind::Str => ParamValue::Str(String::new()),
            ParamKind::Int if x.ceil() > hi => ParamValue::Int(x.floor() as i64),
            ParamKind::Int => ParamValue::Int(x.ceil() as i64),
            ParamKind::Float => ParamValue::Float(x),
            ParamKind::Bool => ParamValue::Bool(false),
        }
    }

    /// A JSON value against this parameter's type, bounds and choices.
    fn check(&self, v: &Value) -> Result<ParamValue, ParamError> {
        let wrong = || ParamError::Type {
            key: self.name.clone(),
            expected: self.kind.name(),
            got: format!("{} ({})", json_kind(v), quote(v)),
        };
        let value = match (self.kind, v) {
            (ParamKind::Str, Value::String(s)) => ParamValue::Str(s.clone()),
            (ParamKind::Int, Value::Number(n)) => ParamValue::Int(
                n.as_i64()
                    .or_else(|| whole(n.as_f64()?))
                    .ok_or_else(wrong)?,
            ),
            (ParamKind::Float, Value::Number(n)) => {
                ParamValue::Float(n.as_f64().ok_or_else(wrong)?)
            }
            (ParamKind::Bool, Value::Bool(b)) => ParamValue::Bool(*b),
            _ => return Err(wrong()),
        };
        self.bounded(value, v)
    }

    fn bounded(&self, value: ParamValue, v: &Value) -> Result<ParamValue, ParamError> {
        let x = match value {
            ParamValue::Int(i) => Some(i as f64),
            ParamValue::Float(f) => Some(f),
            _ => None,
        };
        if let Some(x) = x
            && (self.min.is_some_and(|m| x < m) || self.max.is_some_and(|m| x > m))
        {
            let b = |b: Option<f64>| b.map_or(String::new(), |b| b.to_string());
            return Err(ParamError::Range {
                key: self.name.clone(),
                value: quote(v),
                range: format!("[{}, {}]", b(self.min), b(self.max)),
            });
        }
        if !self.choices.is_empty() && !self.choices.contains(&value) {
            let choices: Vec<String> = self.choices.iter().map(ToString::to_string).collect();
            return Err(ParamError::Choice {
                key: self.name.clone(),
                value: quote(v),
                choices: choices.join(" | "),
            });
        }
        Ok(value)
    }

    /// A command-line or CSV text as a JSON value of this parameter's type.
    fn value_of_text(&self, text: &str) -> Result<Value, ParamError> {
        let wrong = || ParamError::Type {
            key: self.name.clone(),
            expected: self.kind.name(),
            got: format!("{text:?}"),
        };
        let t = text.trim();
        Ok(match self.kind {
            ParamKind::Str => Value::String(text.to_string()),
            ParamKind::Int => Value::from(
                t.parse::<i64>()
                    .ok()
                    .or_else(|| whole(t.parse().ok()?))
                    .ok_or_else(wrong)?,
            ),
            ParamKind::Float => {
                let f = t.parse::<f64>().map_err(|_| wrong())?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(wrong)?
            }
            ParamKind::Bool => Value::Bool(match t {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err(wrong()),
            }),
        })
    }
}

/// A float that is a whole number (`7.0`, what spreadsheets and some JSON writers make
/// of 7) as that integer; `None` for `7.5` or one out of `i64`'s range.
fn whole(f: f64) -> Option<i64> {
    // 2^63 is exact in f64 (i64::MAX rounds up to it); `as` saturates, so the range is
    // checked first.
    (f.fract() == 0.0 && f.abs() < i64::MAX as f64).then_some(f as i64)
}

/// A TOML value from the schema as JSON, for the same checks a drop's value gets.
fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        other => Value::String(other.to_string()),
    }
}

/// The longest an image waits for its parameters file with `required = true`.
const MAX_WAIT_S: i64 = 24 * 3600;

pub(super) fn validate(cx: &Ctx, p: &RawParams) -> Result<ParamsConfig, ConfigError> {
    let mut specs = Vec::with_capacity(p.schema.len());
    for (name, raw) in &p.schema {
        specs.push(spec(cx, name, raw)?);
    }
    let names: Arc<[String]> = specs.iter().map(|s| s.name.clone()).collect();
    Ok(ParamsConfig {
        specs,
        names,
        required: p.required.as_ref().is_some_and(|r| *r.get_ref()),
        wait: Duration::from_secs(cx.int_in(&p.wait_s, "params.wait_s", 0, MAX_WAIT_S, 60u64)?),
    })
}

fn spec(cx: &Ctx, name: &str, raw: &Spanned<RawParam>) -> Result<ParamSpec, ConfigError> {
    let key = format!("params.schema.{name}");
    let r = raw.get_ref();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return cx.err(
            raw.span(),
            &key,
            "is not a usable name: letters, digits and _ only (it becomes a model argument)",
        );
    }
    let kind = cx.choice(
        &Some(r.kind.clone()),
        &format!("{key}.type"),
        &[
            ("string", ParamKind::Str),
            ("int", ParamKind::Int),
            ("float", ParamKind::Float),
            ("bool", ParamKind::Bool),
        ],
        ParamKind::Str,
    )?;
    let number =
        |v: &Option<Spanned<toml::Value>>, what: &str| -> Result<Option<f64>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            if !matches!(kind, ParamKind::Int | ParamKind::Float) {
                return cx.err(
                    v.span(),
                    &format!("{key}.{what}"),
                    "applies to int and float parameters only",
                );
            }
            match v.get_ref() {
                toml::Value::Integer(i) => Ok(Some(*i as f64)),
                toml::Value::Float(f) => Ok(Some(*f)),
                _ => cx.err(v.span(), &format!("{key}.{what}"), "must be a number"),
            }
        };
    let mut s = ParamSpec {
        name: name.to_string(),
        kind,
        default: None,
        min: number(&r.min, "min")?,
        max: number(&r.max, "max")?,
        choices: Vec::new(),
    };
    if let Some(c) = &r.choices {
        // Each choice is checked against the type and bounds alone (not yet any choices).
        let mut choices = Vec::with_capacity(c.get_ref().len());
        for v in c.get_ref() {
            match s.check(&toml_to_json(v)) {
                Ok(v) => choices.push(v),
                Err(e) => {
                    return cx.err(
                        c.span(),
                        &format!("{key}.choices"),
                        format!("has a value that does not fit: {e}"),
                    );
                }
            }
        }
        s.choices = choices;
    }
    if let Some(d) = &r.default {
        match s.check(&toml_to_json(d.get_ref())) {
            Ok(v) => s.default = Some(v),
            Err(e) => {
                return cx.err(
                    d.span(),
                    &format!("{key}.default"),
                    format!("does not fit: {e}"),
                );
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    const SCHEMA: &str = "[params]\n[params.schema]\nprompt = { type = \"string\" }\nseed = { type = \"int\", default = 0, min = 0 }\nscale = { type = \"float\", default = 1.5, max = 10 }\nhd = { type = \"bool\", default = false }\nstyle = { type = \"string\", default = \"photo\", choices = [\"photo\", \"studio\"] }\n";

    fn schema() -> ParamsConfig {
        parse(SCHEMA).unwrap().params.unwrap()
    }

    fn json(text: &str) -> Map<String, Value> {
        ParamsConfig::parse_json(text.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_fill_in_and_values_are_typed() {
        let s = schema();
        assert_eq!(&s.names()[..], ["hd", "prompt", "scale", "seed", "style"]);
        assert!(!s.required);
        assert_eq!(s.wait, Duration::from_secs(60));
        let p = s
            .resolve(&json(r#"{"prompt": "a red coat", "seed": 7}"#))
            .unwrap();
        assert_eq!(p.get("prompt"), Some(&ParamValue::Str("a red coat".into())));
        assert_eq!(p.get("seed"), Some(&ParamValue::Int(7)));
        assert_eq!(p.get("scale"), Some(&ParamValue::Float(1.5)));
        assert_eq!(p.get("style"), Some(&ParamValue::Str("photo".into())));
        assert_eq!(
            p.to_json(),
            serde_json::json!({"hd": false, "prompt": "a red coat", "scale": 1.5, "seed": 7, "style": "photo"})
        );
        // `null` is the default, 7.0 is 7, and a byte-order mark is not the object.
        let p = s
            .resolve(&json(
                "\u{feff}{\"prompt\": \"\", \"seed\": 7.0, \"style\": null}",
            ))
            .unwrap();
        assert_eq!(p.get("seed"), Some(&ParamValue::Int(7)));
        assert_eq!(p.get("style"), Some(&ParamValue::Str("photo".into())));
        assert_eq!(
            s.parse_texts([("seed", "7.0")]).unwrap()["seed"],
            Value::from(7)
        );
        // An integer is a number too.
        let p = s.resolve(&json(r#"{"prompt": "", "scale": 2}"#)).unwrap();
        assert_eq!(p.get("scale"), Some(&ParamValue::Float(2.0)));
    }

    #[test]
    fn placeholders_are_values_the_schema_accepts() {
        let s = parse(
            "[params]\n[params.schema]\nprompt = { type = \"string\" }\nsteps = { type = \"int\", min = 4, max = 50 }\nneg = { type = \"int\", max = -3 }\nmix = { type = \"float\", min = -1, max = 1 }\nstyle = { type = \"string\", choices = [\"photo\", \"studio\"] }\nseed = { type = \"int\", default = 7 }\n",
        )
        .unwrap()
        .params
        .unwrap();
        let got: Vec<(String, ParamValue)> = s
            .specs
            .iter()
            .map(|p| (p.name.clone(), p.placeholder()))
            .collect();
        let want = [
            ("mix", ParamValue::Float(0.0)),
            ("neg", ParamValue::Int(-3)),
            ("prompt", ParamValue::Str(String::new())),
            ("seed", ParamValue::Int(7)),
            ("steps", ParamValue::Int(4)),
            ("style", ParamValue::Str("photo".into())),
        ];
        let want: Vec<(String, ParamValue)> =
            want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(got, want);
        for spec in &s.specs {
            let v = spec.placeholder().to_json();
            assert!(spec.check(&v).is_ok(), "{}: {v} refused", spec.name);
        }
    }

    #[test]
    fn each_mistake_names_its_key() {
        let s = schema();
        let err = |text: &str| s.resolve(&json(text)).unwrap_err().to_string();
        let e = err(r#"{"prompt": "x", "sed": 1}"#);
        assert!(
            e.contains("unknown parameter `sed`") && e.contains("seed"),
            "{e}"
        );
        let e = err(r#"{"prompt": 3}"#);
        assert!(
            e.contains("`prompt` must be a string, not a number (3)"),
            "{e}"
        );
        let e = err(r#"{"prompt": "x", "seed": 1.5}"#);
        assert!(e.contains("`seed` must be an integer"), "{e}");
        let e = err(r#"{"prompt": "x", "seed": -1}"#);
        assert!(e.contains("`seed` is -1, outside its range [0, ]"), "{e}");
        let e = err(r#"{"prompt": "x", "style": "anime"}"#);
        assert!(
            e.contains("`style` is \"anime\"; allowed: \"photo\" | \"studio\""),
            "{e}"
        );
        let e = err(r#"{"seed": 1}"#);
        assert!(e.contains("`prompt` is required"), "{e}");
        let e = ParamsConfig::parse_json(b"{\"prompt\": ")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = ParamsConfig::parse_json(b"[1]").unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
    }

    #[test]
    fn command_line_values_take_the_declared_type() {
        let s = schema();
        let args = ["prompt=a=b".to_string(), "seed=42".into(), "hd=true".into()];
        let p = s.resolve(&s.parse_args(&args).unwrap()).unwrap();
        assert_eq!(p.get("prompt"), Some(&ParamValue::Str("a=b".into())));
        assert_eq!(p.get("seed"), Some(&ParamValue::Int(42)));
        assert_eq!(p.get("hd"), Some(&ParamValue::Bool(true)));
        let e = s.parse_args(&["seed=x".into()]).unwrap_err().to_string();
        assert!(e.contains("`seed` must be an integer, not \"x\""), "{e}");
        let e = s.parse_args(&["seed".into()]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn schema_mistakes_are_config_errors_with_the_line() {
        let e = parse("[params.schema]\nseed = { type = \"integer\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("params.schema.seed.type"),
            "{e}"
        );
        let e = parse("[params.schema]\nseed = { type = \"int\", default = \"0\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("params.schema.seed.default") && e.contains("must be an integer"),
            "{e}"
        );
        let e = parse("[params.schema]\nseed = { type = \"int\", default = 5, max = 3 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside its range"), "{e}");
        let e = parse("[params.schema]\nprompt = { type = \"string\", min = 1 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("int and float parameters only"), "{e}");
        let e = parse("[params.schema]\n\"a b\" = { type = \"string\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a usable name"), "{e}");
        let e = parse("[params]\nrequired = true\nwait_s = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("params.wait_s"), "{e}");
        assert!(parse("").unwrap().params.is_none(), "no [params]: none");
    }
}
