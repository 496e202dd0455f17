//! What every section's validation shares: [`Ctx`], which turns a key's span into the
//! line an error names (or into the `--set` it came from) and holds the range and choice
//! checks most keys go through; device names ([`parse_device`]), read by both `[model]`
//! and `[face_crop]`; the core count the thread defaults come from; the wording of serde's
//! own errors ([`describe_toml_error`]); and the command line's `--set` overrides
//! ([`Override`], [`apply_overrides`]).
//!
//! An override is spliced into the parsed document before serde sees it, so it goes
//! through exactly the checks a key in the file goes through. Its values carry spans past
//! the end of the file's text, one region per override: an error whose span falls in one
//! names that `--set` instead of a line of the file.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{ConfigError, DeviceChoice};

/// The file being validated: its name and text (for line numbers in errors), the folder
/// its relative paths are resolved against, and where the overrides were spliced in.
pub(super) struct Ctx<'a> {
    pub(super) path: &'a str,
    pub(super) text: &'a str,
    pub(super) base: &'a Path,
    pub(super) overrides: &'a [Placed<'a>],
}

impl Ctx<'_> {
    pub(super) fn err<T>(
        &self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        let message = message.into();
        if let Some(set) = placed_at(self.overrides, span.start) {
            return Err(ConfigError::Set {
                arg: set.to_string(),
                message: format!("`{key}` {message}"),
            });
        }
        Err(ConfigError::Invalid {
            path: self.path.to_string(),
            line: line_at(self.text, span.start),
            key: key.to_string(),
            message,
        })
    }

    /// serde's error while reading the (overridden) document into the raw structs.
    pub(super) fn toml_err(&self, e: &toml::de::Error) -> ConfigError {
        match e.span().and_then(|s| placed_at(self.overrides, s.start)) {
            Some(set) => ConfigError::Set {
                arg: set.to_string(),
                message: allowed_wording(e.message()),
            },
            None => ConfigError::Parse {
                path: self.path.to_string(),
                message: describe_toml_error(e, self.text),
            },
        }
    }

    pub(super) fn int_in<T: TryFrom<i64>>(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        lo: i64,
        hi: i64,
        default: T,
    ) -> Result<T, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                let x = *s.get_ref();
                if x < lo || x > hi {
                    return self.err(
                        s.span(),
                        key,
                        format!("is {x}; allowed: an integer from {lo} to {hi}"),
                    );
                }
                match T::try_from(x) {
                    Ok(v) => Ok(v),
                    Err(_) => self.err(s.span(), key, format!("is {x}; out of range")),
                }
            }
        }
    }

    pub(super) fn choice<T: Copy>(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        allowed: &[(&str, T)],
        default: T,
    ) -> Result<T, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                for (name, val) in allowed {
                    if s.get_ref() == name {
                        return Ok(*val);
                    }
                }
                let names: Vec<String> = allowed.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.err(
                    s.span(),
                    key,
                    format!("is \"{}\"; allowed: {}", s.get_ref(), names.join(" | ")),
                )
            }
        }
    }

    /// Relative to the config's folder, so a service's config does not depend on the
    /// directory it was started in.
    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }
}

/// 1-based line of byte `offset` in `text` (clamped to its end).
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Number of cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One device name; the error is the message after the key (the caller knows the key
/// and its span).
pub(super) fn parse_device(s: &str, cuda_count: usize) -> Result<DeviceChoice, String> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "auto" => Ok(if cuda_count > 0 {
            DeviceChoice::Cuda(0)
        } else {
            DeviceChoice::Cpu
        }),
        "cuda" => parse_device("cuda:0", cuda_count),
        _ => {
            let Some(idx) = s.strip_prefix("cuda:") else {
                return Err(format!(
                    "is \"{s}\"; allowed: \"auto\" | \"cpu\" | \"cuda:N\" (or a list of \"cuda:N\")"
                ));
            };
            let Ok(i) = idx.parse::<usize>() else {
                return Err(format!(
                    "is \"{s}\"; N in \"cuda:N\" must be a device number"
                ));
            };
            if i >= cuda_count {
                return Err(format!(
                    "is \"{s}\" but this machine has {cuda_count} CUDA device(s); use \"auto\" or \"cpu\""
                ));
            }
            Ok(DeviceChoice::Cuda(i))
        }
    }
}

/// toml's message already names the line and the key; keep it, minus the source excerpt
/// when it spans many lines, and make "expected" lists read as "allowed".
pub(super) fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let line = e.span().map(|s| line_at(text, s.start));
    let msg = allowed_wording(e.message());
    match line {
        Some(l) => {
            let src = text.lines().nth(l - 1).unwrap_or("").trim();
            format!("line {l}: `{src}`: {msg}")
        }
        None => msg,
    }
}

fn allowed_wording(message: &str) -> String {
    message.replace("expected one of", "allowed keys are")
}

/// One `--set SECTION.KEY=VALUE` from the command line: a dotted key path and the text of
/// its value, read as a TOML value (a number, boolean, quoted string, array, inline
/// table) or, when it is not one, as the string it spells (`cuda:0`, `/srv/photos`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    key: Vec<String>,
    value: String,
}

/// A `--set` argument that is not `SECTION.KEY=VALUE` (a usage error, not a config one).
#[derive(Debug, thiserror::Error)]
#[error("expected SECTION.KEY=VALUE (e.g. encode.quality=85){0}")]
pub struct OverrideSyntax(&'static str);

impl Override {
    /// The dotted key, as written (`decode.max_width`).
    pub fn key(&self) -> String {
        self.key.join(".")
    }

    /// The value's text, as written.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key(), self.value)
    }
}

impl FromStr for Override {
    type Err = OverrideSyntax;

    fn from_str(s: &str) -> Result<Override, OverrideSyntax> {
        let Some((key, value)) = s.split_once('=') else {
            return Err(OverrideSyntax(": no `=`"));
        };
        let key: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        let bare = |k: &String| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !key.iter().all(bare) {
            return Err(OverrideSyntax(
                ": the key is names of letters, digits, `_` and `-` joined by `.`",
            ));
        }
        Ok(Override {
            key,
            value: value.trim().to_string(),
        })
    }
}

/// Where an override went in the document: the span region its key and value carry.
pub(super) struct Placed<'a> {
    set: &'a Override,
    region: Range<usize>,
}

/// The override whose region holds byte `offset`, if any (offsets inside the file's text
/// are in no region).
fn placed_at<'a>(placed: &[Placed<'a>], offset: usize) -> Option<&'a Override> {
    placed
        .iter()
        .find(|p| p.region.contains(&offset))
        .map(|p| p.set)
}

/// Splice `overrides` into `root` (the parsed file, `text_len` bytes long), in order: a
/// later `--set` of the same key wins, as a later flag does. Missing tables are created;
/// a key path through a value that is not a table is an error naming it.
pub(super) fn apply_overrides<'i>(
    root: &mut DeTable<'i>,
    overrides: &'i [Override],
    text_len: usize,
) -> Result<Vec<Placed<'i>>, ConfigError> {
    let mut placed = Vec::with_capacity(overrides.len());
    // Past the end of the text (and one apart), so no region meets the file's spans.
    let mut at = text_len + 1;
    for set in overrides {
        let region = at..at + set.value.len().max(1);
        at = region.end + 1;
        let (last, parents) = set.key.split_last().expect("a key has one part at least");
        let mut table = &mut *root;
        for (i, k) in parents.iter().enumerate() {
            let entry = table
                .entry(Spanned::new(region.clone(), Cow::Borrowed(k.as_str())))
                .or_insert_with(|| Spanned::new(region.clone(), DeValue::Table(DeTable::new())));
            match entry.get_mut() {
                DeValue::Table(t) => table = t,
                other => {
                    return Err(ConfigError::Set {
                        arg: set.to_string(),
                        message: format!(
                            "`{}` is {} in the config, not a table",
                            set.key[..=i].join("."),
                            other.type_str()
                        ),
                    });
                }
            }
        }
        // Removed first so that the key, too, carries the override's span: an unknown
        // key's error then names the `--set`.
        table.remove(last.as_str());
        table.insert(
            Spanned::new(region.clone(), Cow::Borrowed(last.as_str())),
            override_value(&set.value, region.start),
        );
        placed.push(Placed { set, region });
    }
    Ok(placed)
}

/// `src` as a TOML value with its spans moved to start at `at`; a bare word that is not
/// TOML is the string it spells (so `--set model.device=cuda:1` needs no quotes).
fn override_value(src: &str, at: usize) -> Spanned<DeValue<'_>> {
    match DeValue::parse(src) {
        Ok(v) => shifted(v, at),
        Err(_) => Spanned::new(at..at + src.len(), DeValue::String(Cow::Borrowed(src))),
    }
}

fn shifted(v: Spanned<DeValue<'_>>, by: usize) -> Spanned<DeValue<'_>> {
    let span = v.span();
    let span = span.start + by..span.end + by;
    let inner = match v.into_inner() {
        DeValue::Array(mut items) => {
            for item in items.iter_mut() {
                let old = std::mem::replace(item, Spanned::new(0..0, DeValue::Boolean(false)));
                *item = shifted(old, by);
            }
            DeValue::Array(items)
        }
        DeValue::Table(t) => DeValue::Table(
            t.into_iter()
                .map(|(k, v)| {
                    let ks = k.span();
                    (
                        Spanned::new(ks.start + by..ks.end + by, k.into_inner()),
                        shifted(v, by),
                    )
                })
                .collect(),
        ),
        other => other,
    };
    Spanned::new(span, inner)
}

/// For a config enum: `NAMES`, the table `Ctx::choice` reads a key by, and `name()`,
/// which writes a value back (sidecars, `check`) as that same table spells it, so the
/// two can never disagree.
macro_rules! config_names {
    ($t:ident, $key:literal, [$(($n:literal, $v:ident)),+ $(,)?]) => {
        impl $t {
            const NAMES: &[(&'static str, $t)] = &[$(($n, $t::$v)),+];

            #[doc = concat!("As `", $key, "` spells it.")]
            pub fn name(self) -> &'static str {
                Self::NAMES
                    .iter()
                    .find(|(_, v)| *v == self)
                    .map_or("?", |(n, _)| n)
            }
        }
    };
}
pub(super) use config_names;

#[cfg(test)]
mod tests {
    use super::Override;
    use crate::config::tests::{parse, parse_with};

    #[test]
    fn unknown_key_names_key_line_and_allowed() {
        let e = parse("[model]\npath = \"m.pt\"\nmax_bach = 4\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("max_bach"), "{e}");
        assert!(e.contains("max_batch"), "{e}");
    }

    #[test]
    fn wrong_type_names_line() {
        let e = parse("[encode]\nformat = \"png\"\nquality = \"high\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("quality"), "{e}");
    }

    fn set(args: &[&str]) -> Vec<Override> {
        args.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn override_values_are_toml_or_bare_strings() {
        let c = parse_with(
            "[encode]\nquality = 90\n",
            &set(&[
                "encode.quality=55",
                "encode.format=png",
                "preprocess.size=[64, 32]",
                "decode.max_width=4096",
            ]),
        )
        .unwrap();
        assert_eq!(c.encode.quality, 55);
        assert_eq!(c.encode.format, crate::config::Format::Png);
        assert_eq!((c.preprocess.width, c.preprocess.height), (64, 32));
        assert_eq!(c.decode.max_width, 4096);
    }

    #[test]
    fn later_override_wins_and_quoted_strings_stay_strings() {
        let c = parse_with(
            "",
            &set(&[
                "encode.quality=10",
                "encode.quality=20",
                "encode.format=\"webp\"",
            ]),
        )
        .unwrap();
        assert_eq!(c.encode.quality, 20);
        assert_eq!(c.encode.format, crate::config::Format::Webp);
    }

    #[test]
    fn override_errors_name_the_set_not_a_line() {
        let cases = [
            ("decode.max_width=abc", "invalid type"),
            ("decode.max_width=0", "`decode.max_width` is 0; allowed"),
            ("decode.max_widht=5", "max_width"),
            ("nosuch.key=1", "nosuch"),
            ("encode.format=gif", "\"jpeg\" | \"png\" | \"webp\""),
            ("encode.quality.x=1", "`encode.quality` is integer"),
        ];
        for (arg, want) in cases {
            let e = parse_with("[encode]\nquality = 90\n", &set(&[arg]))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("--set {arg}: ")), "{e}");
            assert!(e.contains(want), "{arg}: {e}");
            assert!(!e.contains("line "), "{arg}: {e}");
        }
    }

    #[test]
    fn file_errors_keep_their_line_beside_overrides() {
        let e = parse_with("[encode]\nquality = 0\n", &set(&["encode.format=png"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("encode.quality"), "{e}");
    }

    #[test]
    fn malformed_set_is_a_syntax_error() {
        for bad in ["quality", "=5", "encode..quality=5", "encode.qu ality=5"] {
            assert!(bad.parse::<Override>().is_err(), "{bad}");
        }
        let o: Override = " encode.quality = 5 ".parse().unwrap();
        assert_eq!((o.key().as_str(), o.value()), ("encode.quality", "5"));
    }
}
