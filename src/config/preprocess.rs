//! `[preprocess]`: how each decoded image is brought to the model's input: size, fit,
//! resampling filter, normalisation and pad colour.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::{Ctx, config_names};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPreprocess {
    size: Option<Spanned<SizeSpec>>,
    fit: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
    mean: Option<Spanned<Vec<f64>>>,
    std: Option<Spanned<Vec<f64>>>,
    pad_color: Option<Spanned<[i64; 3]>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(i64),
    Rect([i64; 2]),
}

/// How an image is brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitMode {
    /// Scale the shorter side to the target and centre-crop the longer one.
    Crop,
    /// Scale the longer side to the target and pad the rest with `pad_color`.
    Pad,
    /// Scale each axis independently (distorts the aspect ratio).
    Stretch,
}

/// Resampling filter for the fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    CatmullRom,
    Mitchell,
    Lanczos3,
}

config_names!(
    FitMode,
    "preprocess.fit",
    [("crop", Crop), ("pad", Pad), ("stretch", Stretch),]
);

config_names!(
    Filter,
    "preprocess.filter",
    [
        ("nearest", Nearest),
        ("box", Box),
        ("bilinear", Bilinear),
        ("hamming", Hamming),
        ("catmull-rom", CatmullRom),
        ("mitchell", Mitchell),
        ("lanczos3", Lanczos3),
    ]
);

#[derive(Debug, Clone)]
pub struct PreprocessConfig {
    pub width: u32,
    pub height: u32,
    pub fit: FitMode,
    pub filter: Filter,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub pad_color: [u8; 3],
    /// Channels of each fitted image, so of the model's input: 3 (RGB), or 4 (RGBA) with
    /// `decode.alpha = "keep"`. Derived, not a key of its own.
    pub channels: usize,
}

pub(super) fn validate(cx: &Ctx, p: &RawPreprocess) -> Result<PreprocessConfig, ConfigError> {
    let (width, height) = size(cx, &p.size)?;
    let pad_color = pad_color(cx, &p.pad_color)?;
    Ok(PreprocessConfig {
        width,
        height,
        fit: cx.choice(&p.fit, "preprocess.fit", FitMode::NAMES, FitMode::Crop)?,
        filter: cx.choice(
            &p.filter,
            "preprocess.filter",
            Filter::NAMES,
            Filter::Bilinear,
        )?,
        mean: triple(cx, &p.mean, "preprocess.mean", false)?,
        std: triple(cx, &p.std, "preprocess.std", true)?,
        pad_color,
        channels: 3,
    })
}

fn size(cx: &Ctx, v: &Option<Spanned<SizeSpec>>) -> Result<(u32, u32), ConfigError> {
    let Some(s) = v else {
        return Ok((512, 512));
    };
    let (w, h) = match s.get_ref() {
        SizeSpec::Square(n) => (*n, *n),
        SizeSpec::Rect([w, h]) => (*w, *h),
    };
    if !(8..=8192).contains(&w) || !(8..=8192).contains(&h) {
        return cx.err(
            s.span(),
            "preprocess.size",
            format!("is {w} x {h}; allowed: sides from 8 to 8192 (a number or [width, height])"),
        );
    }
    Ok((w as u32, h as u32))
}

/// `mean` and `std`: one number per channel; `positive` for `std`, which is divided by.
fn triple(
    cx: &Ctx,
    v: &Option<Spanned<Vec<f64>>>,
    key: &str,
    positive: bool,
) -> Result<Option<[f32; 3]>, ConfigError> {
    let Some(s) = v else {
        return Ok(None);
    };
    let x = s.get_ref();
    if x.len() != 3 || (positive && x.iter().any(|&v| v <= 0.0)) {
        let what = if positive {
            "three positive numbers (R, G, B)"
        } else {
            "three numbers (R, G, B)"
        };
        return cx.err(s.span(), key, format!("is {x:?}; allowed: {what}"));
    }
    Ok(Some([x[0] as f32, x[1] as f32, x[2] as f32]))
}

fn pad_color(cx: &Ctx, v: &Option<Spanned<[i64; 3]>>) -> Result<[u8; 3], ConfigError> {
    let Some(s) = v else {
        return Ok([0, 0, 0]);
    };
    let c = s.get_ref();
    if c.iter().any(|v| !(0..=255).contains(v)) {
        return cx.err(
            s.span(),
            "preprocess.pad_color",
            format!("is {c:?}; allowed: three integers 0 to 255"),
        );
    }
    Ok([c[0] as u8, c[1] as u8, c[2] as u8])
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    #[test]
    fn fit_out_of_range() {
        let e = parse("\n[preprocess]\nfit = \"zoom\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("\"crop\" | \"pad\" | \"stretch\""),
            "{e}"
        );
    }

    #[test]
    fn rect_size() {
        let c = parse("[preprocess]\nsize = [640, 480]\n").unwrap();
        assert_eq!((c.preprocess.width, c.preprocess.height), (640, 480));
    }
}
