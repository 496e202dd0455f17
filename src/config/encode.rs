//! `[encode]`: the output format, its quality, and whether the input's EXIF goes with it.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::{Ctx, config_names};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncode {
    format: Option<Spanned<String>>,
    quality: Option<Spanned<i64>>,
    keep_metadata: Option<Spanned<bool>>,
}

config_names!(
    Format,
    "encode.format",
    [("jpeg", Jpeg), ("png", Png), ("webp", Webp)]
);

/// Output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Jpeg => "jpg",
            Format::Png => "png",
            Format::Webp => "webp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncodeConfig {
    pub format: Format,
    pub quality: u8,
    /// Write the input's EXIF into the output, filtered: no GPS, serial numbers, owner,
    /// MakerNote, thumbnail or comment, orientation upright (`stages::metadata` says
    /// what is kept and why). Off by default: outputs carry none of the input's metadata.
    pub keep_metadata: bool,
}

pub(super) fn validate(cx: &Ctx, e: &RawEncode) -> Result<EncodeConfig, ConfigError> {
    Ok(EncodeConfig {
        format: cx.choice(&e.format, "encode.format", Format::NAMES, Format::Jpeg)?,
        quality: cx.int_in(&e.quality, "encode.quality", 1, 100, 90u8)?,
        // A boolean by type (serde refuses anything else, naming the line); any value
        // of it is valid.
        keep_metadata: e.keep_metadata.as_ref().is_some_and(|k| *k.get_ref()),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, parse_with};

    #[test]
    fn quality_out_of_range() {
        let e = parse("[encode]\nquality = 0\n").unwrap_err().to_string();
        assert!(
            e.contains("encode.quality") && e.contains("1 to 100"),
            "{e}"
        );
    }

    #[test]
    fn keep_metadata_is_off_by_default_and_a_boolean() {
        assert!(!parse("").unwrap().encode.keep_metadata);
        let on = parse("[encode]\nkeep_metadata = true\n").unwrap();
        assert!(on.encode.keep_metadata);
        let set: crate::config::Override = "encode.keep_metadata=true".parse().unwrap();
        assert!(parse_with("", &[set]).unwrap().encode.keep_metadata);
        let e = parse("[encode]\nkeep_metadata = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep_metadata") && e.contains("line 2"), "{e}");
    }
}
