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
//!
//! Where the file is ([`locate`]: `--config`, `HOTPIPE_CONFIG`, `./pipeline.toml`,
//! `/etc/hotpipe/pipeline.toml`) and the command line's `--set` overrides ([`Override`],
//! spliced into the parsed file before validation, see `parse`) are decided here too, so
//! every verb finds and reads its config the same way.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod cluster;
mod decode;
mod encode;
mod face_crop;
mod hotfolder;
mod metrics;
mod model;
mod params;
mod parse;
mod pipeline;
mod preprocess;

pub use crate::vocab::device::DeviceChoice;
pub use cluster::{ClusterConfig, Role};
pub use decode::{DctScaling, DecodeConfig};
pub use encode::{EncodeConfig, Format};
pub use face_crop::{
    DEFAULT_DETECT_SIZE, DEFAULT_REFINE_SIZE, FaceCropConfig, FaceSelect, NoFacePolicy,
    WARN_UPSCALE,
};
pub use hotfolder::{HotfolderConfig, OnSuccess, WatcherKind};
pub use metrics::MetricsConfig;
pub use model::{BatchSize, ModelConfig, Precision, PythonModel};
pub use params::{MAX_PARAMS_BYTES, ParamError, ParamKind, ParamSpec, ParamsConfig};
pub use parse::{Override, OverrideSyntax, available_cores};
pub use pipeline::PipelineConfig;
pub use preprocess::{Filter, FitMode, PreprocessConfig};

use parse::{Ctx, apply_overrides, describe_toml_error};

/// The environment variable naming the config file when `--config` does not.
pub const CONFIG_ENV: &str = "HOTPIPE_CONFIG";

/// Where the config is looked for when neither `--config` nor [`CONFIG_ENV`] names one,
/// in order: the working directory (a checkout, a test), then the installed service's.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["pipeline.toml", "/etc/hotpipe/pipeline.toml"];

/// What named the config file, for the message when it is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedBy {
    Flag,
    Env,
}

impl std::fmt::Display for NamedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NamedBy::Flag => f.write_str("--config"),
            NamedBy::Env => write!(f, "${CONFIG_ENV}"),
        }
    }
}

/// A config that could not be found, read, or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no config file found; looked at: {}", .looked.join(", "))]
    NotFound { looked: Vec<String> },
    #[error("config {path} (named by {named_by}) does not exist")]
    Missing { path: PathBuf, named_by: NamedBy },
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
    /// A `--set` that does not apply: `message` names the key.
    #[error("--set {arg}: {message}")]
    Set { arg: String, message: String },
}

/// The config file to read: the one named (by `--config` or [`CONFIG_ENV`]) when there is
/// one, which must then exist (falling back from a path an operator named would run some
/// other config); else the first of [`DEFAULT_CONFIG_PATHS`] that exists.
pub fn locate(named: Option<(PathBuf, NamedBy)>) -> Result<PathBuf, ConfigError> {
    let defaults = DEFAULT_CONFIG_PATHS.map(PathBuf::from);
    locate_in(named, &defaults)
}

fn locate_in(
    named: Option<(PathBuf, NamedBy)>,
    defaults: &[PathBuf],
) -> Result<PathBuf, ConfigError> {
    if let Some((path, named_by)) = named {
        return match path.try_exists() {
            Ok(false) => Err(ConfigError::Missing { path, named_by }),
            // Unreadable or there: the read reports what is wrong with it.
            _ => Ok(path),
        };
    }
    // One that exists but cannot be read is taken (and its read error reported), not
    // skipped for the next: that would silently run another config.
    if let Some(p) = defaults
        .iter()
        .find(|p| !matches!(p.try_exists(), Ok(false)))
    {
        return Ok(p.clone());
    }
    let mut looked = vec![
        "--config (not given)".to_string(),
        format!("${CONFIG_ENV} (not set)"),
    ];
    let cwd = std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string());
    looked.extend(defaults.iter().map(|p| {
        if p.is_relative() {
            format!("./{} (in {cwd})", p.display())
        } else {
            p.display().to_string()
        }
    }));
    Err(ConfigError::NotFound { looked })
}

/// Where a config comes from: its file and the command line's `--set` overrides. What a
/// caller that reads the config more than once keeps, so each read applies the same
/// overrides.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Vec<Override>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load_with(&self.path, &self.overrides)
    }
}

/// The whole file (step one). Tables that change what runs are `Option`; the others
/// default to an empty table, so every key in them takes its default.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: Option<Spanned<model::RawModel>>,
    #[serde(default)]
    preprocess: preprocess::RawPreprocess,
    #[serde(default)]
    decode: decode::RawDecode,
    #[serde(default)]
    encode: encode::RawEncode,
    #[serde(default)]
    pipeline: pipeline::RawPipeline,
    face_crop: Option<face_crop::RawFaceCrop>,
    params: Option<params::RawParams>,
    hotfolder: Option<hotfolder::RawHotfolder>,
    cluster: Option<cluster::RawCluster>,
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
    /// `[params]`: what each item may carry to the model; `None` when not declared (then
    /// items carry nothing and parameters files are not looked for).
    pub params: Option<ParamsConfig>,
    /// `[hotfolder]`: the daemon's folders and timing (`hotpipe run` needs it).
    pub hotfolder: Option<HotfolderConfig>,
    /// `[cluster]`: the NATS JetStream server a hot folder is spread over.
    pub cluster: Option<ClusterConfig>,
    /// `[metrics]`: where the daemon serves `/metrics` and `/healthz`.
    pub metrics: MetricsConfig,
}

impl Config {
    /// Read and validate a config file. Relative paths in it are resolved against the
    /// file's directory, so a service's config does not depend on its working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, &[])
    }

    /// [`Config::load`] with `overrides` spliced into the file before it is validated.
    pub fn load_with(path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // Absolute, so every path resolved against it (the model, the weights) still
        // names the same file in a sidecar read from another directory.
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let base = std::path::absolute(dir.unwrap_or(Path::new(".")))
            .unwrap_or_else(|_| dir.map(Path::to_path_buf).unwrap_or_default());
        Config::from_toml_with(
            &text,
            overrides,
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
        Config::from_toml_with(text, &[], source, base, cuda_count)
    }

    /// [`Config::from_toml`] with `overrides` applied to the parsed text first: serde and
    /// every section's checks then see them as keys of the file, and an error about one
    /// names its `--set` rather than a line.
    pub fn from_toml_with(
        text: &str,
        overrides: &[Override],
        source: &str,
        base: &Path,
        cuda_count: usize,
    ) -> Result<Config, ConfigError> {
        let mut doc = toml::de::DeTable::parse(text).map_err(|e| ConfigError::Parse {
            path: source.to_string(),
            message: describe_toml_error(&e, text),
        })?;
        let placed = apply_overrides(doc.get_mut(), overrides, text.len())?;
        let cx = Ctx {
            path: source,
            text,
            base,
            overrides: &placed,
        };
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(doc))
            .map_err(|e| cx.toml_err(&e))?;
        Config::validate(&cx, &raw, cuda_count)
    }

    /// What decides an output's pixels besides the model and its parameters, as resolved
    /// (defaults included) and spelt as the config spells it: recorded in every sidecar
    /// with the hotpipe version, so a result can be made again from its sidecar alone.
    pub fn recipe(&self) -> serde_json::Value {
        let p = &self.preprocess;
        let d = &self.decode;
        let face_crop = self.face_crop.as_ref().map(|f| {
            serde_json::json!({
                "weights": f.weights.to_string_lossy(),
                "select": f.select.name(),
                "margin": short(f.margin),
                "min_face": f.min_face,
                "detect_size": f.detect_size,
                "refine_size": f.refine_size,
                "thresholds": f.thresholds.map(short),
                "on_no_face": f.on_no_face.name(),
                "max_upscale": f.max_upscale.map(short),
            })
        });
        serde_json::json!({
            "hotpipe": env!("CARGO_PKG_VERSION"),
            "config": std::path::absolute(&self.source)
                .map_or_else(|_| self.source.clone(), |p| p.to_string_lossy().into_owned()),
            "decode": {
                "dct_scaling": d.dct_scaling.name(),
                "alpha": d.background.map_or(serde_json::json!("keep"), |b| serde_json::json!(b)),
            },
            "face_crop": face_crop,
            "preprocess": {
                "size": [p.width, p.height],
                "fit": p.fit.name(),
                "filter": p.filter.name(),
                "pad_color": p.pad_color,
                "mean": p.mean.map(|m| m.map(short)),
                "std": p.std.map(|s| s.map(short)),
            },
            "encode": {
                "format": self.encode.format.name(),
                "quality": self.encode.quality,
            },
        })
    }

    /// Step two: every section checked, defaults resolved.
    fn validate(cx: &Ctx, raw: &RawConfig, cuda_count: usize) -> Result<Config, ConfigError> {
        // Sections are checked in this order and the first error wins, so a file with
        // several mistakes always reports the same one.
        let model = (raw.model.as_ref())
            .map(|m| model::validate(cx, m.get_ref(), m.span(), cuda_count))
            .transpose()?;
        let mut preprocess = preprocess::validate(cx, &raw.preprocess)?;
        let encode = encode::validate(cx, &raw.encode)?;
        let neighbours = decode::Neighbours {
            pad_color: preprocess.pad_color,
            face_crop: raw.face_crop.is_some(),
            rgba_to_jpeg: model.is_none() && encode.format == Format::Jpeg,
        };
        let decode = decode::validate(cx, &raw.decode, &neighbours)?;
        preprocess.channels = decode.channels();
        let mut pipeline = pipeline::validate(cx, &raw.pipeline, available_cores())?;
        let face_crop = (raw.face_crop.as_ref())
            .map(|f| face_crop::validate(cx, f, model.as_ref(), cuda_count))
            .transpose()?;
        let params = (raw.params.as_ref())
            .map(|p| params::validate(cx, p))
            .transpose()?;
        let hotfolder = (raw.hotfolder.as_ref())
            .map(|h| hotfolder::validate(cx, h))
            .transpose()?;
        let cluster = (raw.cluster.as_ref())
            .map(|c| cluster::validate(cx, c))
            .transpose()?;
        let metrics = metrics::validate(cx, raw.metrics.as_ref())?;

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
            source: cx.path.to_string(),
            model,
            preprocess,
            decode,
            encode,
            pipeline,
            face_crop,
            params,
            hotfolder,
            cluster,
            metrics,
        })
    }
}

/// An `f32` setting as the config wrote it (0.05, not 0.05000000074505806): its
/// shortest decimal, which reads back as the same `f32`.
fn short(x: f32) -> serde_json::Value {
    x.to_string()
        .parse::<f64>()
        .map_or(serde_json::Value::Null, serde_json::Value::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every section's tests parse with: a config at `/base/t.toml` on a machine
    /// with one CUDA device (so "cuda:0" is valid and "cuda:3" is not).
    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "t.toml", Path::new("/base"), 1)
    }

    /// [`parse`] with `--set` overrides.
    pub(super) fn parse_with(text: &str, sets: &[Override]) -> Result<Config, ConfigError> {
        Config::from_toml_with(text, sets, "t.toml", Path::new("/base"), 1)
    }

    #[test]
    fn defaults_without_model() {
        let c = parse("").unwrap();
        assert!(c.model.is_none());
        assert_eq!((c.preprocess.width, c.preprocess.height), (512, 512));
        assert_eq!(c.encode.format, Format::Jpeg);
        assert_eq!(c.encode.quality, 90);
    }

    #[test]
    fn locate_prefers_the_named_file_then_the_first_default_that_exists() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.toml"), d.path().join("b.toml"));
        std::fs::write(&b, "").unwrap();
        let defaults = [a.clone(), b.clone()];
        // The fourth place, /etc/hotpipe, stands in as `b`: taken when `a` is missing.
        assert_eq!(locate_in(None, &defaults).unwrap(), b);
        std::fs::write(&a, "").unwrap();
        assert_eq!(locate_in(None, &defaults).unwrap(), a);
        let named = d.path().join("named.toml");
        std::fs::write(&named, "").unwrap();
        let got = locate_in(Some((named.clone(), NamedBy::Env)), &defaults).unwrap();
        assert_eq!(got, named);
    }

    #[test]
    fn locate_does_not_fall_back_from_a_named_file() {
        let d = tempfile::tempdir().unwrap();
        let there = d.path().join("there.toml");
        std::fs::write(&there, "").unwrap();
        let gone = d.path().join("gone.toml");
        let e = locate_in(Some((gone, NamedBy::Env)), &[there])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gone.toml") && e.contains("$HOTPIPE_CONFIG"),
            "{e}"
        );
    }

    #[test]
    fn locate_names_every_place_when_none_exists() {
        let d = tempfile::tempdir().unwrap();
        let defaults = [PathBuf::from("no-such.toml"), d.path().join("etc.toml")];
        let e = locate_in(None, &defaults).unwrap_err().to_string();
        for want in ["--config", "$HOTPIPE_CONFIG", "./no-such.toml", "etc.toml"] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
