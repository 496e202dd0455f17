//! `[encode]`: the output format and its quality.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncode {
    format: Option<Spanned<String>>,
    quality: Option<Spanned<i64>>,
}

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
}

pub(super) fn validate(cx: &Ctx, e: &RawEncode) -> Result<EncodeConfig, ConfigError> {
    Ok(EncodeConfig {
        format: cx.choice(
            &e.format,
            "encode.format",
            &[
                ("jpeg", Format::Jpeg),
                ("png", Format::Png),
                ("webp", Format::Webp),
            ],
            Format::Jpeg,
        )?,
        quality: cx.int_in(&e.quality, "encode.quality", 1, 100, 90u8)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn quality_out_of_range() {
        let e = parse("[encode]\nquality = 0\n").unwrap_err().to_string();
        assert!(
            e.contains("encode.quality") && e.contains("1 to 100"),
            "{e}"
        );
    }
}
