//! `[decode]`: the limits a file must pass before it is decoded (dimensions, decoder
//! allocation, file size), so one hostile or broken input cannot exhaust memory.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDecode {
    max_width: Option<Spanned<i64>>,
    max_height: Option<Spanned<i64>>,
    max_alloc_mib: Option<Spanned<i64>>,
    max_file_mib: Option<Spanned<i64>>,
}

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub max_width: u32,
    pub max_height: u32,
    pub max_alloc_bytes: u64,
    pub max_file_bytes: u64,
}

pub(super) fn validate(cx: &Ctx, d: &RawDecode) -> Result<DecodeConfig, ConfigError> {
    Ok(DecodeConfig {
        max_width: cx.int_in(&d.max_width, "decode.max_width", 1, 1 << 20, 16384u32)?,
        max_height: cx.int_in(&d.max_height, "decode.max_height", 1, 1 << 20, 16384u32)?,
        max_alloc_bytes: cx.int_in(
            &d.max_alloc_mib,
            "decode.max_alloc_mib",
            1,
            1 << 20,
            1024u64,
        )? << 20,
        max_file_bytes: cx.int_in(&d.max_file_mib, "decode.max_file_mib", 1, 1 << 20, 256u64)?
            << 20,
    })
}
