//! `pipeline.toml`: the raw serde structs and the validated [`Config`] built from them.
//!
//! Parsing happens in two steps, as in ripgrep: serde reads the file into `Raw*` structs
//! (`deny_unknown_fields`, so a typo is an error, not a silently ignored key), then
//! [`Config::from_toml`] checks every value and resolves defaults (thread counts from the
//! core count, the device from what is present). Every error names the key and the line
//! it is on and says what is allowed, because an operator editing a service's config
//! should not have to read the source to fix it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use crate::vocab::device::DeviceChoice;

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

// ---------------------------------------------------------------------------------------
// Raw file structure (step one).

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: Option<RawModel>,
    #[serde(default)]
    preprocess: RawPreprocess,
    #[serde(default)]
    decode: RawDecode,
    #[serde(default)]
    encode: RawEncode,
    #[serde(default)]
    pipeline: RawPipeline,
    face_crop: Option<RawFaceCrop>,
    hotfolder: Option<RawHotfolder>,
    metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHotfolder {
    root: Option<Spanned<String>>,
    rescan_s: Option<Spanned<i64>>,
    settle_ms: Option<Spanned<i64>>,
    max_attempts: Option<Spanned<i64>>,
    watcher: Option<Spanned<String>>,
    poll_ms: Option<Spanned<i64>>,
    on_success: Option<Spanned<String>>,
    shutdown_grace_s: Option<Spanned<i64>>,
    retry_s: Option<Spanned<i64>>,
    stuck_s: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Spanned<String>,
    #[serde(default)]
    device: Option<Spanned<DeviceSpec>>,
    #[serde(default)]
    max_batch: Option<Spanned<BatchSpec>>,
    #[serde(default)]
    batch_timeout_ms: Option<Spanned<i64>>,
    #[serde(default)]
    precision: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum DeviceSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum BatchSpec {
    Fixed(i64),
    Auto(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(i64),
    Rect([i64; 2]),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPreprocess {
    size: Option<Spanned<SizeSpec>>,
    fit: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
    mean: Option<Spanned<Vec<f64>>>,
    std: Option<Spanned<Vec<f64>>>,
    pad_color: Option<Spanned<[i64; 3]>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDecode {
    max_width: Option<Spanned<i64>>,
    max_height: Option<Spanned<i64>>,
    max_alloc_mib: Option<Spanned<i64>>,
    max_file_mib: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEncode {
    format: Option<Spanned<String>>,
    quality: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    decode_threads: Option<Spanned<i64>>,
    fit_threads: Option<Spanned<i64>>,
    encode_threads: Option<Spanned<i64>>,
    infer_threads: Option<Spanned<i64>>,
    cpu_infer_workers: Option<Spanned<i64>>,
    detect_threads: Option<Spanned<i64>>,
    channel_capacity: Option<Spanned<i64>>,
    batch_slots: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFaceCrop {
    weights: Option<Spanned<String>>,
    select: Option<Spanned<String>>,
    margin: Option<Spanned<f64>>,
    min_face: Option<Spanned<i64>>,
    detect_size: Option<Spanned<i64>>,
    refine_size: Option<Spanned<i64>>,
    thresholds: Option<Spanned<[f64; 3]>>,
    on_no_face: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------
// Validated configuration (step two).

/// Numeric precision of the model on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Fixed(usize),
    /// Size from free device memory and the model's measured footprint at start-up.
    Auto,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub devices: Vec<DeviceChoice>,
    pub max_batch: BatchSize,
    pub batch_timeout_ms: u64,
    pub precision: Precision,
}

#[derive(Debug, Clone)]
pub struct PreprocessConfig {
    pub width: u32,
    pub height: u32,
    pub fit: FitMode,
    pub filter: Filter,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub pad_color: [u8; 3],
}

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub max_width: u32,
    pub max_height: u32,
    pub max_alloc_bytes: u64,
    pub max_file_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct EncodeConfig {
    pub format: Format,
    pub quality: u8,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub decode_threads: usize,
    pub fit_threads: usize,
    pub encode_threads: usize,
    /// Intra-op threads libtorch uses for inference on the CPU.
    pub infer_threads: usize,
    /// Inference workers when the model runs on the CPU, each with its own copy of the
    /// model and `infer_threads / cpu_infer_workers` intra-op threads: small models scale
    /// better across workers than across intra-op threads.
    pub cpu_infer_workers: usize,
    /// Face-crop detect workers (with `[face_crop]`), each with its own copy of the
    /// MTCNN weights; on the CPU each runs libtorch on one thread.
    pub detect_threads: usize,
    pub channel_capacity: usize,
    pub batch_slots: usize,
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
    pub device: DeviceChoice,
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

/// How the daemon learns about new files in `inbox/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatcherKind {
    /// inotify (local filesystems): events nudge a scan at once.
    Inotify,
    /// Periodic polling every `poll_ms` (NFS/SMB, where inotify sees nothing).
    Poll,
    /// No watcher: only the periodic full rescan finds files (and a test of lost events).
    None,
}

/// What happens to an input after its output is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    Move,
    Delete,
}

/// The validated `[hotfolder]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct HotfolderConfig {
    /// Holds inbox/, work/, outbox/, done/, failed/ (one filesystem).
    pub root: PathBuf,
    pub rescan_s: u64,
    pub settle_ms: u64,
    pub max_attempts: u32,
    pub watcher: WatcherKind,
    pub poll_ms: u64,
    pub on_success: OnSuccess,
    pub shutdown_grace_s: u64,
    /// Delay before an item that failed transiently (outbox full, unwritable) is retried.
    pub retry_s: u64,
    /// Items in flight but no stage progress for this long: unhealthy (503, no watchdog).
    pub stuck_s: u64,
}

/// The validated `[metrics]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// None: no HTTP endpoint (`listen = "off"`).
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

struct Ctx<'a> {
    path: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_string(),
            line: self.line(span.start),
            key: key.to_string(),
            message: message.into(),
        })
    }

    fn int_in<T: TryFrom<i64>>(
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

    fn choice<T: Copy>(
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
}

/// Number of cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn parse_device(s: &str, cuda_count: usize) -> Result<DeviceChoice, String> {
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
        let cx = Ctx { path: source, text };
        let cores = available_cores();
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };

        let model = match &raw.model {
            None => None,
            Some(m) => {
                let devices = match &m.device {
                    None => vec![parse_device("auto", cuda_count).expect("auto always parses")],
                    Some(d) => {
                        let names: Vec<String> = match d.get_ref() {
                            DeviceSpec::One(s) => vec![s.clone()],
                            DeviceSpec::Many(v) => v.clone(),
                        };
                        if names.is_empty() {
                            return cx.err(d.span(), "model.device", "is an empty list; allowed: \"auto\" | \"cpu\" | \"cuda:N\" or a list of \"cuda:N\"");
                        }
                        let mut out = Vec::new();
                        for n in &names {
                            match parse_device(n, cuda_count) {
                                Ok(dev) if !out.contains(&dev) => out.push(dev),
                                Ok(_) => {
                                    return cx.err(
                                        d.span(),
                                        "model.device",
                                        format!("lists \"{n}\" twice"),
                                    );
                                }
                                Err(msg) => return cx.err(d.span(), "model.device", msg),
                            }
                        }
                        if out.len() > 1 && out.contains(&DeviceChoice::Cpu) {
                            return cx.err(
                                d.span(),
                                "model.device",
                                "a list may only name CUDA devices",
                            );
                        }
                        out
                    }
                };
                let max_batch = match &m.max_batch {
                    None => BatchSize::Fixed(8),
                    Some(s) => match s.get_ref() {
                        BatchSpec::Fixed(n) if (1..=1024).contains(n) => {
                            BatchSize::Fixed(*n as usize)
                        }
                        BatchSpec::Auto(a) if a == "auto" => BatchSize::Auto,
                        BatchSpec::Fixed(n) => {
                            return cx.err(
                                s.span(),
                                "model.max_batch",
                                format!("is {n}; allowed: 1 to 1024 or \"auto\""),
                            );
                        }
                        BatchSpec::Auto(a) => {
                            return cx.err(
                                s.span(),
                                "model.max_batch",
                                format!("is \"{a}\"; allowed: 1 to 1024 or \"auto\""),
                            );
                        }
                    },
                };
                Some(ModelConfig {
                    path: resolve(m.path.get_ref()),
                    devices,
                    max_batch,
                    batch_timeout_ms: cx.int_in(
                        &m.batch_timeout_ms,
                        "model.batch_timeout_ms",
                        0,
                        60_000,
                        10u64,
                    )?,
                    precision: cx.choice(
                        &m.precision,
                        "model.precision",
                        &[
                            ("fp32", Precision::Fp32),
                            ("fp16", Precision::Fp16),
                            ("bf16", Precision::Bf16),
                        ],
                        Precision::Fp32,
                    )?,
                })
            }
        };

        let p = &raw.preprocess;
        let (width, height) = match &p.size {
            None => (512, 512),
            Some(s) => {
                let (w, h) = match s.get_ref() {
                    SizeSpec::Square(n) => (*n, *n),
                    SizeSpec::Rect([w, h]) => (*w, *h),
                };
                if !(8..=8192).contains(&w) || !(8..=8192).contains(&h) {
                    return cx.err(s.span(), "preprocess.size", format!("is {w} x {h}; allowed: sides from 8 to 8192 (a number or [width, height])"));
                }
                (w as u32, h as u32)
            }
        };
        let triple = |v: &Option<Spanned<Vec<f64>>>,
                      key: &str,
                      positive: bool|
         -> Result<Option<[f32; 3]>, ConfigError> {
            match v {
                None => Ok(None),
                Some(s) => {
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
            }
        };
        let pad_color = match &p.pad_color {
            None => [0, 0, 0],
            Some(s) => {
                let c = s.get_ref();
                if c.iter().any(|v| !(0..=255).contains(v)) {
                    return cx.err(
                        s.span(),
                        "preprocess.pad_color",
                        format!("is {c:?}; allowed: three integers 0 to 255"),
                    );
                }
                [c[0] as u8, c[1] as u8, c[2] as u8]
            }
        };
        let preprocess = PreprocessConfig {
            width,
            height,
            fit: cx.choice(
                &p.fit,
                "preprocess.fit",
                &[
                    ("crop", FitMode::Crop),
                    ("pad", FitMode::Pad),
                    ("stretch", FitMode::Stretch),
                ],
                FitMode::Crop,
            )?,
            filter: cx.choice(
                &p.filter,
                "preprocess.filter",
                &[
                    ("nearest", Filter::Nearest),
                    ("box", Filter::Box),
                    ("bilinear", Filter::Bilinear),
                    ("hamming", Filter::Hamming),
                    ("catmull-rom", Filter::CatmullRom),
                    ("mitchell", Filter::Mitchell),
                    ("lanczos3", Filter::Lanczos3),
                ],
                Filter::Bilinear,
            )?,
            mean: triple(&p.mean, "preprocess.mean", false)?,
            std: triple(&p.std, "preprocess.std", true)?,
            pad_color,
        };

        let d = &raw.decode;
        let decode = DecodeConfig {
            max_width: cx.int_in(&d.max_width, "decode.max_width", 1, 1 << 20, 16384u32)?,
            max_height: cx.int_in(&d.max_height, "decode.max_height", 1, 1 << 20, 16384u32)?,
            max_alloc_bytes: cx.int_in(
                &d.max_alloc_mib,
                "decode.max_alloc_mib",
                1,
                1 << 20,
                1024u64,
            )? << 20,
            max_file_bytes: cx.int_in(
                &d.max_file_mib,
                "decode.max_file_mib",
                1,
                1 << 20,
                256u64,
            )? << 20,
        };

        let e = &raw.encode;
        let encode = EncodeConfig {
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
        };

        let pl = &raw.pipeline;
        let mut pipeline = PipelineConfig {
            decode_threads: cx.int_in(
                &pl.decode_threads,
                "pipeline.decode_threads",
                1,
                256,
                cores.max(1),
            )?,
            fit_threads: cx.int_in(
                &pl.fit_threads,
                "pipeline.fit_threads",
                1,
                256,
                (cores / 4).max(1),
            )?,
            encode_threads: cx.int_in(
                &pl.encode_threads,
                "pipeline.encode_threads",
                1,
                256,
                (cores / 2).max(1),
            )?,
            infer_threads: cx.int_in(
                &pl.infer_threads,
                "pipeline.infer_threads",
                1,
                256,
                cores.max(1),
            )?,
            cpu_infer_workers: cx.int_in(
                &pl.cpu_infer_workers,
                "pipeline.cpu_infer_workers",
                1,
                256,
                1usize,
            )?,
            detect_threads: cx.int_in(
                &pl.detect_threads,
                "pipeline.detect_threads",
                1,
                64,
                cores.clamp(1, 8),
            )?,
            channel_capacity: cx.int_in(
                &pl.channel_capacity,
                "pipeline.channel_capacity",
                1,
                4096,
                2 * cores.max(4),
            )?,
            batch_slots: cx.int_in(&pl.batch_slots, "pipeline.batch_slots", 1, 16, 3usize)?,
        };

        let face_crop = match &raw.face_crop {
            None => None,
            Some(f) => {
                let margin = match &f.margin {
                    None => 0.4,
                    Some(s) => {
                        let m = *s.get_ref();
                        if !(0.0..=4.0).contains(&m) {
                            return cx.err(
                                s.span(),
                                "face_crop.margin",
                                format!("is {m}; allowed: 0.0 to 4.0 (fraction of the face box)"),
                            );
                        }
                        m as f32
                    }
                };
                let thresholds = match &f.thresholds {
                    None => [0.6, 0.7, 0.7],
                    Some(s) => {
                        let t = s.get_ref();
                        if t.iter().any(|v| !(0.0..=1.0).contains(v)) {
                            return cx.err(
                                s.span(),
                                "face_crop.thresholds",
                                format!("is {t:?}; allowed: three numbers 0.0 to 1.0"),
                            );
                        }
                        [t[0] as f32, t[1] as f32, t[2] as f32]
                    }
                };
                // "auto" (or no key) follows the model, so crop and model share a device.
                let device = match f.device.as_ref().filter(|s| s.get_ref() != "auto") {
                    None => match &model {
                        Some(m) => m.devices[0],
                        None => parse_device("auto", cuda_count).expect("auto always parses"),
                    },
                    Some(s) => match parse_device(s.get_ref(), cuda_count) {
                        Ok(d) => d,
                        Err(msg) => return cx.err(s.span(), "face_crop.device", msg),
                    },
                };
                Some(FaceCropConfig {
                    weights: resolve(
                        f.weights
                            .as_ref()
                            .map(|s| s.get_ref().as_str())
                            .unwrap_or("models/mtcnn"),
                    ),
                    select: cx.choice(
                        &f.select,
                        "face_crop.select",
                        &[
                            ("largest", FaceSelect::Largest),
                            ("most_confident", FaceSelect::MostConfident),
                        ],
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
                        &[("fail", NoFacePolicy::Fail), ("pass", NoFacePolicy::Pass)],
                        NoFacePolicy::Fail,
                    )?,
                    device,
                })
            }
        };

        let hotfolder = match &raw.hotfolder {
            None => None,
            Some(h) => {
                let Some(root) = &h.root else {
                    return Err(ConfigError::Invalid {
                        path: source.to_string(),
                        line: 1,
                        key: "hotfolder.root".into(),
                        message: "is required in [hotfolder] (the folder holding inbox/, work/, outbox/, done/, failed/)".into(),
                    });
                };
                if root.get_ref().trim().is_empty() {
                    return cx.err(root.span(), "hotfolder.root", "is empty; give a folder");
                }
                Some(HotfolderConfig {
                    root: resolve(root.get_ref()),
                    rescan_s: cx.int_in(&h.rescan_s, "hotfolder.rescan_s", 1, 86_400, 30u64)?,
                    settle_ms: cx.int_in(
                        &h.settle_ms,
                        "hotfolder.settle_ms",
                        0,
                        600_000,
                        1000u64,
                    )?,
                    max_attempts: cx.int_in(
                        &h.max_attempts,
                        "hotfolder.max_attempts",
                        1,
                        100,
                        3u32,
                    )?,
                    watcher: cx.choice(
                        &h.watcher,
                        "hotfolder.watcher",
                        &[
                            ("inotify", WatcherKind::Inotify),
                            ("poll", WatcherKind::Poll),
                            ("none", WatcherKind::None),
                        ],
                        WatcherKind::Inotify,
                    )?,
                    poll_ms: cx.int_in(&h.poll_ms, "hotfolder.poll_ms", 10, 600_000, 2000u64)?,
                    on_success: cx.choice(
                        &h.on_success,
                        "hotfolder.on_success",
                        &[("move", OnSuccess::Move), ("delete", OnSuccess::Delete)],
                        OnSuccess::Move,
                    )?,
                    shutdown_grace_s: cx.int_in(
                        &h.shutdown_grace_s,
                        "hotfolder.shutdown_grace_s",
                        0,
                        3600,
                        10u64,
                    )?,
                    retry_s: cx.int_in(&h.retry_s, "hotfolder.retry_s", 0, 86_400, 10u64)?,
                    stuck_s: cx.int_in(&h.stuck_s, "hotfolder.stuck_s", 1, 86_400, 60u64)?,
                })
            }
        };
        let metrics = match raw.metrics.as_ref().and_then(|m| m.listen.as_ref()) {
            None => MetricsConfig::default(),
            Some(l) if l.get_ref() == "off" => MetricsConfig { listen: None },
            Some(l) => match l.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => MetricsConfig { listen: Some(a) },
                Err(_) => {
                    return cx.err(
                        l.span(),
                        "metrics.listen",
                        format!(
                            "is \"{}\"; allowed: \"IP:PORT\" (e.g. \"127.0.0.1:9464\") or \"off\"",
                            l.get_ref()
                        ),
                    );
                }
            },
        };

        // A detector on a GPU needs CPU workers only for its crops and NMS, and each holds
        // a GPU batch of frames: two keep the GPU fed without holding dozens of frames.
        if pl.detect_threads.is_none()
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

/// toml's message already names the line and the key; keep it, minus the source excerpt
/// when it spans many lines, and make "expected" lists read as "allowed".
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let line = e.span().map(|s| {
        text[..s.start.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    });
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
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
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

    #[test]
    fn bad_device_says_what_is_allowed() {
        let e = parse("[model]\npath = \"m.pt\"\ndevice = \"gpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("model.device") && e.contains("cuda:N"),
            "{e}"
        );
        let e = parse("[model]\npath = \"m.pt\"\ndevice = \"cuda:4\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 CUDA device"), "{e}");
    }

    #[test]
    fn values_out_of_range() {
        let e = parse("[encode]\nquality = 0\n").unwrap_err().to_string();
        assert!(
            e.contains("encode.quality") && e.contains("1 to 100"),
            "{e}"
        );
        let e = parse("\n[preprocess]\nfit = \"zoom\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("\"crop\" | \"pad\" | \"stretch\""),
            "{e}"
        );
    }

    #[test]
    fn relative_model_path_resolves_against_config_dir() {
        let c = parse("[model]\npath = \"m.pt\"\ndevice = [\"cuda:0\"]\nmax_batch = \"auto\"\n")
            .unwrap();
        let m = c.model.unwrap();
        assert_eq!(m.path, Path::new("/base/m.pt"));
        assert_eq!(m.devices, vec![DeviceChoice::Cuda(0)]);
        assert_eq!(m.max_batch, BatchSize::Auto);
    }

    #[test]
    fn hotfolder_and_metrics() {
        let c = parse(
            "[hotfolder]\nroot = \"hf\"\nwatcher = \"poll\"\n\n[metrics]\nlisten = \"off\"\n",
        )
        .unwrap();
        let h = c.hotfolder.unwrap();
        assert_eq!(h.root, Path::new("/base/hf"));
        assert_eq!(h.watcher, WatcherKind::Poll);
        assert_eq!((h.settle_ms, h.max_attempts, h.rescan_s), (1000, 3, 30));
        assert!(c.metrics.listen.is_none());
        assert_eq!(
            parse("").unwrap().metrics.listen.unwrap().to_string(),
            "127.0.0.1:9464"
        );
        let e = parse("[hotfolder]\nroot = \"x\"\nsettle = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("settle_ms"), "{e}");
        let e = parse("[hotfolder]\nroot = \"x\"\non_success = \"keep\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("hotfolder.on_success"),
            "{e}"
        );
        let e = parse("\n[metrics]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("metrics.listen"), "{e}");
        assert!(
            parse("[hotfolder]\nrescan_s = 3\n")
                .unwrap_err()
                .to_string()
                .contains("hotfolder.root")
        );
    }

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

    #[test]
    fn rect_size() {
        let c = parse("[preprocess]\nsize = [640, 480]\n").unwrap();
        assert_eq!((c.preprocess.width, c.preprocess.height), (640, 480));
    }
}
