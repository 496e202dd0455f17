//! What every section's validation shares: [`Ctx`], which turns a key's span into the
//! line an error names and holds the range and choice checks most keys go through;
//! device names ([`parse_device`]), read by both `[model]` and `[face_crop]`; the core
//! count the thread defaults come from; and the wording of serde's own errors
//! ([`describe_toml_error`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{ConfigError, DeviceChoice};

/// The file being validated: its name and text (for line numbers in errors) and the
/// folder its relative paths are resolved against.
pub(super) struct Ctx<'a> {
    pub(super) path: &'a str,
    pub(super) text: &'a str,
    pub(super) base: &'a Path,
}

impl Ctx<'_> {
    pub(super) fn err<T>(
        &self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_string(),
            line: line_at(self.text, span.start),
            key: key.to_string(),
            message: message.into(),
        })
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
    let msg = e.message().replace("expected one of", "allowed keys are");
    match line {
        Some(l) => {
            let src = text.lines().nth(l - 1).unwrap_or("").trim();
            format!("line {l}: `{src}`: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
}
