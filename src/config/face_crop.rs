//! `[face_crop]`: the built-in MTCNN face crop between decode and fit: where its weights
//! are, which face to keep, the crop margin, detection sizes and thresholds, what to do
//! without a face, and its device (by default the model's).

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::parse::{Ctx, config_names, parse_device};
use super::{ConfigError, DeviceChoice, ModelConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFaceCrop {
    weights: Option<Spanned<String>>,
    select: Option<Spanned<String>>,
    margin: Option<Spanned<f64>>,
    min_face: Option<Spanned<i64>>,
    detect_size: Option<Spanned<i64>>,
    refine_size: Option<Spanned<i64>>,
    thresholds: Option<Spanned<[f64; 3]>>,
    on_no_face: Option<Spanned<String>>,
    max_upscale: Option<Spanned<f64>>,
    device: Option<Spanned<String>>,
}

/// Which face to keep when a photo has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaceSelect {
    Largest,
    MostConfident,
}

/// What to do with a photo in which no face is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoFacePolicy {
    Fail,
    Pass,
}

config_names!(
    FaceSelect,
    "face_crop.select",
    [("largest", Largest), ("most_confident", MostConfident),]
);

config_names!(
    NoFacePolicy,
    "face_crop.on_no_face",
    [("fail", Fail), ("pass", Pass),]
);

/// `[face_crop] detect_size` when not set.
pub const DEFAULT_DETECT_SIZE: u32 = 512;
/// `[face_crop] refine_size` when not set.
pub const DEFAULT_REFINE_SIZE: u32 = 2048;

#[derive(Debug, Clone)]
pub struct FaceCropConfig {
    /// Folder holding `pnet.pt`, `rnet.pt`, `onet.pt` (written by the set-up script).
    pub weights: PathBuf,
    pub select: FaceSelect,
    /// Margin added on each side of the face box, as a fraction of the box's longer
    /// side (the crop is a square of `1 + 2 * margin` times the box).
    pub margin: f32,
    pub min_face: u32,
    /// Longer side of the working image the coarse pass searches whole.
    pub detect_size: u32,
    /// Longer side of the image the fine pass re-detects each face on (the decoded
    /// photo when it is no larger); at most `detect_size` turns the fine pass off.
    pub refine_size: u32,
    pub thresholds: [f32; 3],
    pub on_no_face: NoFacePolicy,
    /// The most a face's crop may be enlarged to `[preprocess] size`; a photo whose face
    /// needs more fails (`None`: any, with a warning past [`WARN_UPSCALE`]).
    pub max_upscale: Option<f32>,
    pub device: DeviceChoice,
}

/// Past this enlargement of the crop a result is visibly soft: the sidecar and the log
/// say so (a 48 px face made 1024 px is 21x).
pub const WARN_UPSCALE: f32 = 4.0;

/// `model` is the validated `[model]`, if any: its device is the default for the crop.
pub(super) fn validate(
    cx: &Ctx,
    f: &RawFaceCrop,
    model: Option<&ModelConfig>,
    cuda_count: usize,
) -> Result<FaceCropConfig, ConfigError> {
    let margin = margin(cx, &f.margin)?;
    let thresholds = thresholds(cx, &f.thresholds)?;
    let device = device(cx, &f.device, model, cuda_count)?;
    Ok(FaceCropConfig {
        weights: cx.resolve(
            f.weights
                .as_ref()
                .map(|s| s.get_ref().as_str())
                .unwrap_or("models/mtcnn"),
        ),
        select: cx.choice(
            &f.select,
            "face_crop.select",
            FaceSelect::NAMES,
            FaceSelect::MostConfident,
        )?,
        margin,
        min_face: cx.int_in(&f.min_face, "face_crop.min_face", 12, 4096, 20u32)?,
        detect_size: cx.int_in(
            &f.detect_size,
            "face_crop.detect_size",
            64,
            2048,
            DEFAULT_DETECT_SIZE,
        )?,
        refine_size: cx.int_in(
            &f.refine_size,
            "face_crop.refine_size",
            64,
            4096,
            DEFAULT_REFINE_SIZE,
        )?,
        thresholds,
        on_no_face: cx.choice(
            &f.on_no_face,
            "face_crop.on_no_face",
            NoFacePolicy::NAMES,
            NoFacePolicy::Fail,
        )?,
        max_upscale: max_upscale(cx, &f.max_upscale)?,
        device,
    })
}

fn margin(cx: &Ctx, v: &Option<Spanned<f64>>) -> Result<f32, ConfigError> {
    let Some(s) = v else {
        return Ok(0.4);
    };
    let m = *s.get_ref();
    if !(0.0..=4.0).contains(&m) {
        return cx.err(
            s.span(),
            "face_crop.margin",
            format!("is {m}; allowed: 0.0 to 4.0 (fraction of the face box)"),
        );
    }
    Ok(m as f32)
}

fn max_upscale(cx: &Ctx, v: &Option<Spanned<f64>>) -> Result<Option<f32>, ConfigError> {
    let Some(s) = v else {
        return Ok(None);
    };
    let m = *s.get_ref();
    if !(1.0..=64.0).contains(&m) {
        return cx.err(
            s.span(),
            "face_crop.max_upscale",
            format!("is {m}; allowed: 1.0 to 64.0 (how many times a face's crop may be enlarged)"),
        );
    }
    Ok(Some(m as f32))
}

fn thresholds(cx: &Ctx, v: &Option<Spanned<[f64; 3]>>) -> Result<[f32; 3], ConfigError> {
    let Some(s) = v else {
        return Ok([0.6, 0.7, 0.7]);
    };
    let t = s.get_ref();
    if t.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return cx.err(
            s.span(),
            "face_crop.thresholds",
            format!("is {t:?}; allowed: three numbers 0.0 to 1.0"),
        );
    }
    Ok([t[0] as f32, t[1] as f32, t[2] as f32])
}

/// "auto" (or no key) follows the model, so crop and model share a device.
fn device(
    cx: &Ctx,
    v: &Option<Spanned<String>>,
    model: Option<&ModelConfig>,
    cuda_count: usize,
) -> Result<DeviceChoice, ConfigError> {
    match v.as_ref().filter(|s| s.get_ref() != "auto") {
        None => Ok(match model {
            Some(m) => m.devices[0],
            None => parse_device("auto", cuda_count).expect("auto always parses"),
        }),
        Some(s) => match parse_device(s.get_ref(), cuda_count) {
            Ok(d) => Ok(d),
            Err(msg) => cx.err(s.span(), "face_crop.device", msg),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::available_cores;
    use crate::config::tests::parse;

    #[test]
    fn face_crop_defaults_and_errors() {
        let c = parse("[face_crop]\n").unwrap();
        let f = c.face_crop.unwrap();
        assert_eq!(f.weights, Path::new("/base/models/mtcnn"));
        assert_eq!(f.select, FaceSelect::MostConfident);
        assert_eq!(f.on_no_face, NoFacePolicy::Fail);
        assert_eq!(
            (f.min_face, f.detect_size, f.refine_size),
            (20, DEFAULT_DETECT_SIZE, DEFAULT_REFINE_SIZE)
        );
        assert_eq!(f.thresholds, [0.6, 0.7, 0.7]);
        // "auto" follows the model's device.
        let c = parse(
            "[model]\npath = \"m.pt\"\ndevice = \"cuda:0\"\n[face_crop]\ndevice = \"auto\"\n",
        )
        .unwrap();
        assert_eq!(c.face_crop.unwrap().device, DeviceChoice::Cuda(0));
        // A detector on a GPU gets 2 detect workers unless set; on the CPU, one per core.
        assert_eq!(c.pipeline.detect_threads, 2);
        let cpu = parse("[face_crop]\ndevice = \"cpu\"\n").unwrap();
        assert_eq!(cpu.pipeline.detect_threads, available_cores().clamp(1, 8));
        let c = parse("[face_crop]\nselect = \"largest\"\non_no_face = \"pass\"\n").unwrap();
        let f = c.face_crop.unwrap();
        assert_eq!(
            (f.select, f.on_no_face),
            (FaceSelect::Largest, NoFacePolicy::Pass)
        );
        for (text, key) in [
            ("[face_crop]\n\nselect = \"biggest\"\n", "face_crop.select"),
            ("[face_crop]\n\nmargin = 5.0\n", "face_crop.margin"),
            (
                "[face_crop]\n\nmax_upscale = 0.5\n",
                "face_crop.max_upscale",
            ),
            ("[face_crop]\n\nmin_face = 4\n", "face_crop.min_face"),
            ("[face_crop]\n\ndetect_size = 10\n", "face_crop.detect_size"),
            (
                "[face_crop]\n\nrefine_size = 20000\n",
                "face_crop.refine_size",
            ),
            (
                "[face_crop]\n\nthresholds = [0.6, 0.7, 1.5]\n",
                "face_crop.thresholds",
            ),
            (
                "[face_crop]\n\non_no_face = \"skip\"\n",
                "face_crop.on_no_face",
            ),
            ("[face_crop]\n\ndevice = \"cuda:3\"\n", "face_crop.device"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("line 3") && e.contains(key), "{e}");
        }
    }
}
