//! What a TorchScript model's `forward` takes, read from its schema (`schema.cpp`), and
//! how each item's parameters are handed to it.
//!
//! The contract for models with parameters: after the batch, `forward` takes one typed
//! list per parameter, named as in `[params.schema]`, with one value per image in batch
//! order:
//!
//! ```python
//! def forward(self, x: Tensor, prompt: List[str], seed: List[int]) -> Tensor:
//! ```
//!
//! `string`, `int`, `float` and `bool` parameters are `List[str]`, `List[int]`,
//! `List[float]` and `List[bool]`. Typed lists, not a `List[Dict[str, str]]`, because
//! TorchScript checks argument types and only typed lists cross tch's boundary with
//! their element type (a list of dicts arrives as `List[Any]` and is refused), and
//! because the model then gets numbers as numbers. A model may take any subset of the
//! declared parameters, in any order; `forward(x)` models are called as before, with no
//! cost per batch. Everything is checked at start-up: an argument that is not declared,
//! or of the wrong type, stops the start with both named.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::Path;

use tch::IValue;

use crate::config::{ParamKind, ParamsConfig};
use crate::vocab::params::{ParamValue, Params};

unsafe extern "C" {
    fn hp_forward_schema(path: *const c_char, out: *mut *const c_char) -> c_int;
}

/// One argument of `forward` (after `self`).
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub name: String,
    /// As TorchScript writes it: `Tensor`, `List[str]`, ...
    pub ty: String,
    pub has_default: bool,
}

/// The arguments of `forward` in the TorchScript file `path`. Loads the file once more,
/// on the CPU (tch has no way to ask a loaded module), so it costs a second load at
/// start-up and nothing after.
pub fn forward_args(path: &Path) -> Result<Vec<Arg>, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "path contains a NUL byte".to_string())?;
    let mut out: *const c_char = std::ptr::null();
    // SAFETY: `c` is NUL-terminated and outlives the call; the shim sets `out` to a
    // NUL-terminated thread-local string valid until its next call on this thread, which
    // is copied before anything else runs here.
    let rc = unsafe { hp_forward_schema(c.as_ptr(), &mut out) };
    let text = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    if rc != 0 {
        return Err(crate::vocab::error::first_line(&text));
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Arg {
                name: f.next()?.to_string(),
                ty: f.next()?.to_string(),
                has_default: f.next()? == "1",
            })
        })
        .collect())
}

fn list_type(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Str => "List[str]",
        ParamKind::Int => "List[int]",
        ParamKind::Float => "List[float]",
        ParamKind::Bool => "List[bool]",
    }
}

/// Which declared parameters `forward` takes, in its argument order: the index into the
/// schema's specs, the kind, and the value rows without an item get
/// ([`crate::config::ParamSpec::placeholder`]). Empty for `forward(x)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Binding {
    args: Vec<(usize, ParamKind, ParamValue)>,
}

impl Binding {
    /// Read the schema of the TorchScript file `path` and match it: once per plan, not
    /// per device (each read loads the file again).
    pub fn of_model(path: &Path, params: Option<&ParamsConfig>) -> Result<Binding, String> {
        let args =
            forward_args(path).map_err(|e| format!("cannot read forward's arguments: {e}"))?;
        Binding::new(&args, params)
    }

    /// Match `forward`'s arguments (the first is the batch) against the declared
    /// parameters. The error says what to change.
    pub fn new(args: &[Arg], params: Option<&ParamsConfig>) -> Result<Binding, String> {
        let Some((x, rest)) = args.split_first() else {
            return Err("forward takes no input (it must take the batch first)".into());
        };
        if x.ty != "Tensor" {
            return Err(format!(
                "forward's first argument `{}` is {}; it must be the batch, a Tensor",
                x.name, x.ty
            ));
        }
        let mut b = Binding::default();
        let declared = |a: &Arg| params.is_some_and(|p| p.specs.iter().any(|s| s.name == a.name));
        for (n, a) in rest.iter().enumerate() {
            let found =
                params.and_then(|p| p.specs.iter().enumerate().find(|(_, s)| s.name == a.name));
            // Arguments are passed by position, so only a run of undeclared arguments
            // with defaults at the end can be left to their defaults.
            if rest[n..].iter().all(|a| a.has_default && !declared(a)) {
                let rest: Vec<&str> = rest[n..].iter().map(|a| a.name.as_str()).collect();
                tracing::info!(args = ?rest, "forward's last arguments are not in [params.schema]; they keep the model's defaults");
                break;
            }
            let Some((i, spec)) = found else {
                return Err(format!(
                    "forward takes `{}: {}`, which [params.schema] does not declare (declare it, e.g. {} = {{ type = \"{}\" }})",
                    a.name,
                    a.ty,
                    a.name,
                    match a.ty.as_str() {
                        "List[int]" => "int",
                        "List[float]" => "float",
                        "List[bool]" => "bool",
                        _ => "string",
                    }
                ));
            };
            let want = list_type(spec.kind);
            if a.ty != want {
                return Err(format!(
                    "forward takes `{}: {}`, but [params.schema] declares it {}: the argument must be {want}",
                    a.name,
                    a.ty,
                    spec.kind.name()
                ));
            }
            b.args.push((i, spec.kind, spec.placeholder()));
        }
        Ok(b)
    }

    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }

    /// Names of the parameters passed, in argument order (for the start-up log).
    pub fn names<'a>(&self, params: &'a ParamsConfig) -> Vec<&'a str> {
        self.args
            .iter()
            .map(|&(i, ..)| params.specs[i].name.as_str())
            .collect()
    }

    /// The lists for `rows` (one entry per batch row; `None` for a row without an item:
    /// a dummy batch, or a hole a failed fit left, whose output nobody reads), which get
    /// each parameter's placeholder.
    pub fn lists(&self, rows: &[Option<&Params>]) -> Vec<IValue> {
        self.args
            .iter()
            .map(|(i, kind, placeholder)| {
                let values = rows
                    .iter()
                    .map(|p| p.and_then(|p| p.value(*i)).unwrap_or(placeholder));
                // Resolved parameters always have their declared kind; the `_` arms are
                // never taken.
                match kind {
                    ParamKind::Str => IValue::StringList(
                        values
                            .map(|v| match v {
                                ParamValue::Str(s) => s.clone(),
                                _ => String::new(),
                            })
                            .collect(),
                    ),
                    ParamKind::Int => IValue::IntList(
                        values
                            .map(|v| match v {
                                ParamValue::Int(v) => *v,
                                _ => 0,
                            })
                            .collect(),
                    ),
                    ParamKind::Float => IValue::DoubleList(
                        values
                            .map(|v| match v {
                                ParamValue::Float(v) => *v,
                                _ => 0.0,
                            })
                            .collect(),
                    ),
                    ParamKind::Bool => IValue::BoolList(
                        values
                            .map(|v| matches!(v, ParamValue::Bool(true)))
                            .collect(),
                    ),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn arg(name: &str, ty: &str, has_default: bool) -> Arg {
        Arg {
            name: name.into(),
            ty: ty.into(),
            has_default,
        }
    }

    fn schema() -> ParamsConfig {
        let text = "[params.schema]\nprompt = { type = \"string\" }\nsteps = { type = \"int\", min = 4 }\n";
        Config::from_toml(text, "t.toml", Path::new("/"), 0)
            .unwrap()
            .params
            .unwrap()
    }

    #[test]
    fn only_trailing_undeclared_arguments_with_defaults_are_left_out() {
        let p = schema();
        let x = arg("x", "Tensor", false);
        let b = Binding::new(
            &[
                x.clone(),
                arg("prompt", "List[str]", false),
                arg("guidance", "List[float]", true),
            ],
            Some(&p),
        )
        .unwrap();
        assert_eq!(b.names(&p), ["prompt"]);
        // Not at the end: `prompt` would get the values meant for `guidance`.
        let e = Binding::new(
            &[
                x.clone(),
                arg("guidance", "List[float]", true),
                arg("prompt", "List[str]", false),
            ],
            Some(&p),
        )
        .unwrap_err();
        assert!(e.contains("`guidance: List[float]`"), "{e}");
        // Undeclared and defaulted, but a declared one follows: never silently dropped.
        let e = Binding::new(
            &[
                x.clone(),
                arg("prompt", "List[str]", false),
                arg("guidance", "List[float]", true),
                arg("steps", "List[int]", true),
            ],
            Some(&p),
        )
        .unwrap_err();
        assert!(e.contains("`guidance: List[float]`"), "{e}");
        let e = Binding::new(&[x, arg("seed", "List[int]", false)], Some(&p)).unwrap_err();
        assert!(
            e.contains("declare it, e.g. seed = { type = \"int\" }"),
            "{e}"
        );
    }

    #[test]
    fn rows_without_an_item_get_placeholders() {
        let p = schema();
        let args = [
            arg("x", "Tensor", false),
            arg("steps", "List[int]", false),
            arg("prompt", "List[str]", false),
        ];
        let b = Binding::new(&args, Some(&p)).unwrap();
        let given = p
            .resolve(&ParamsConfig::parse_json(br#"{"prompt": "a coat", "steps": 9}"#).unwrap())
            .unwrap();
        let lists = b.lists(&[Some(&given), None]);
        assert!(
            matches!(&lists[0], IValue::IntList(v) if v == &[9, 4]),
            "{lists:?}"
        );
        assert!(
            matches!(&lists[1], IValue::StringList(v) if v == &["a coat".to_string(), String::new()]),
            "{lists:?}"
        );
    }
}
