//! `pipeline.toml`: the raw serde structs and the validated [`Config`] built from them.
//!
//! Parsing happens in two steps, as in ripgrep: serde reads the file into `Raw*` structs
//! (`deny_unknown_fields`, so a typo is an error, not a silently ignored key), then
//! [`Config::from_toml`] checks every value and resolves defaults (thread counts from the
//! core count, the device from what is present). Every error names the key and the line
//! it is on and says what is allowed, because an operator editing a service's config
//! should not have to read the source to fix it.
//!
//! Each section of the file has its own module holding its raw struct, its validated
//! struct, the function from one to the other and its tests; `parse` holds what they
//! share (error lines, range and choice checks, device names). This module keeps the top
//! level: reading the file, calling each section in file order, and the rules that need
//! more than one section.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod decode;
mod encode;
mod face_crop;
mod hotfolder;
mod metrics;
mod model;
mod parse;
mod pipeline;
mod preprocess;

pub use crate::vocab::device::DeviceChoice;
pub use decode::DecodeConfig;
pub use encode::{EncodeConfig, Format};
pub use face_crop::{
    DEFAULT_DETECT_SIZE, DEFAULT_REFINE_SIZE, FaceCropConfig, FaceSelect, NoFacePolicy,
};
pub use hotfolder::{HotfolderConfig, OnSuccess, WatcherKind};
pub use metrics::MetricsConfig;
pub use model::{BatchSize, ModelConfig, Precision};
pub use parse::available_cores;
pub use pipeline::PipelineConfig;
pub use preprocess::{Filter, FitMode, PreprocessConfig};

use parse::{Ctx, describe_toml_error};

/// A config that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: line {line}: `{key}` {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole file (step one). Tables that change what runs are `Option`; the others
/// default to an empty table, so every key in them takes its default.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: Option<model::RawModel>,
    #[serde(default)]
    preprocess: preprocess::RawPreprocess,
    #[serde(default)]
    decode: decode::RawDecode,
    #[serde(default)]
    encode: encode::RawEncode,
    #[serde(default)]
    pipeline: pipeline::RawPipeline,
    face_crop: Option<face_crop::RawFaceCrop>,
    hotfolder: Option<hotfolder::RawHotfolder>,
    metrics: Option<metrics::RawMetrics>,
}

/// The validated configuration every component is built from.
#[derive(Debug, Clone)]
pub struct Config {
    /// File the config came from (for messages and relative paths).
    pub source: String,
    pub model: Option<ModelConfig>,
    pub preprocess: PreprocessConfig,
    pub decode: DecodeConfig,
    pub encode: EncodeConfig,
    pub pipeline: PipelineConfig,
    pub face_crop: Option<FaceCropConfig>,
    /// `[hotfolder]`: the daemon's folders and timing (`hotpipe run` needs it).
    pub hotfolder: Option<HotfolderConfig>,
    /// `[metrics]`: where the daemon serves `/metrics` and `/healthz`.
    pub metrics: MetricsConfig,
}

impl Config {
    /// Read and validate a config file. Relative paths in it are resolved against the
    /// file's directory, so a service's config does not depend on its working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(
            &text,
            &path.display().to_string(),
            &base,
            crate::vocab::device::cuda_device_count(),
        )
    }

    /// Validate config text. `base` resolves relative paths; `cuda_count` is how many CUDA
    /// devices exist (so "cuda:3" on a one-GPU machine is a config error, not a crash).
    pub fn from_toml(
        text: &str,
        source: &str,
        base: &Path,
        cuda_count: usize,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_string(),
            message: describe_toml_error(&e, text),
        })?;
        let cx = Ctx {
            path: source,
            text,
            base,
        };
        // Sections are checked in this order and the first error wins, so a file with
        // several mistakes always reports the same one.
        let model = (raw.model.as_ref())
            .map(|m| model::validate(&cx, m, cuda_count))
            .transpose()?;
        let preprocess = preprocess::validate(&cx, &raw.preprocess)?;
        let decode = decode::validate(&cx, &raw.decode)?;
        let encode = encode::validate(&cx, &raw.encode)?;
        let mut pipeline = pipeline::validate(&cx, &raw.pipeline, available_cores())?;
        let face_crop = (raw.face_crop.as_ref())
            .map(|f| face_crop::validate(&cx, f, model.as_ref(), cuda_count))
            .transpose()?;
        let hotfolder = (raw.hotfolder.as_ref())
            .map(|h| hotfolder::validate(&cx, h))
            .transpose()?;
        let metrics = metrics::validate(&cx, raw.metrics.as_ref())?;

        // A detector on a GPU needs CPU workers only for its crops and NMS, and each holds
        // a GPU batch of frames: two keep the GPU fed without holding dozens of frames.
        if raw.pipeline.detect_threads.is_none()
            && face_crop
                .as_ref()
                .is_some_and(|f| matches!(f.device, DeviceChoice::Cuda(_)))
        {
            pipeline.detect_threads = 2;
        }

        Ok(Config {
            source: source.to_string(),
            model,
            preprocess,
            decode,
            encode,
            pipeline,
            face_crop,
            hotfolder,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every section's tests parse with: a config at `/base/t.toml` on a machine
    /// with one CUDA device (so "cuda:0" is valid and "cuda:3" is not).
    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "t.toml", Path::new("/base"), 1)
    }

    #[test]
    fn defaults_without_model() {
        let c = parse("").unwrap();
        assert!(c.model.is_none());
        assert_eq!((c.preprocess.width, c.preprocess.height), (512, 512));
        assert_eq!(c.encode.format, Format::Jpeg);
        assert_eq!(c.encode.quality, 90);
    }
}
