//! `hotpipe check`: validate the config, load the model on its device(s), run one dummy
//! batch of the configured size, and describe what was found. It is what an operator runs
//! after editing `pipeline.toml`, before restarting the service.
//!
//! The findings are a [`CheckReport`]: text for a person (`Display`) or one JSON object
//! for a script ([`CheckReport::to_json`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::config::{Config, DeviceChoice, Filter, FitMode, Format};
use crate::runtime::plan::RuntimePlan;
use crate::runtime::plan::{device_name, precision_name};
use crate::vocab::device::cuda_device_count;
use crate::vocab::error::{PipelineError, torch_message};

/// What `check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The config file.
    pub config: String,
    pub cuda_devices: usize,
    /// The model's input, `(width, height)`, with the fit mode and filter.
    pub input: (u32, u32),
    /// Channels of each input: 3 (RGB), or 4 (RGBA) with `decode.alpha = "keep"`.
    pub input_channels: usize,
    pub fit: FitMode,
    pub filter: Filter,
    pub format: Format,
    pub quality: u8,
    pub face_crop: Option<FaceCropFound>,
    /// `None` without `[model]`.
    pub model: Option<ModelFound>,
    /// `[hotfolder]`'s root (resolved) and shutdown grace: what an installer needs to
    /// know to give the service its folder and its stop timeout. `None` without it.
    pub hotfolder: Option<(std::path::PathBuf, u64)>,
}

/// `[face_crop]` as it will run.
#[derive(Debug, Clone)]
pub struct FaceCropFound {
    pub weights: PathBuf,
    pub device: DeviceChoice,
    pub detect_workers: usize,
    pub detect_size: u32,
    pub refine_size: u32,
    pub min_face: u32,
}

/// The model and its dummy batch on each distinct device.
#[derive(Debug, Clone)]
pub struct ModelFound {
    pub path: PathBuf,
    /// A Python pipeline (`entry`), run in worker processes.
    pub python: Option<String>,
    /// What the Python pipeline said it is (`describe()`, with its class).
    pub about: Option<serde_json::Value>,
    /// The interpreter its workers run (`[model] python`, or the default it fell to).
    pub interpreter: Option<PathBuf>,
    pub batch: usize,
    pub devices: Vec<DeviceRun>,
}

/// One device's dummy batch.
#[derive(Debug, Clone)]
pub struct DeviceRun {
    pub device: Device,
    pub precision: Kind,
    /// `(height, width)` of the model's output.
    pub output_hw: (i64, i64),
    /// Channels of each output: 1, 3 or 4 (what the encoder writes: grey, RGB, RGBA).
    pub output_channels: i64,
    /// Outputs per input (K): the model returns `N*K` images for `N`.
    pub outputs_per_input: usize,
    pub output_shape: Vec<i64>,
    pub dummy_ms: f64,
}

/// What `c` channels of pixels are, for people.
pub fn channel_name(c: i64) -> &'static str {
    match c {
        1 => "grey",
        3 => "RGB",
        4 => "RGBA",
        _ => "unknown",
    }
}

/// A Python pipeline's `describe()` for people: its pipeline class, library and version
/// on one line, then whatever else it said, one key a line.
fn about_text(about: &serde_json::Value) -> String {
    let text = |k: &str| about.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let mut lines = vec![format!(
        "  pipeline: {} ({} {})",
        [text("pipeline"), text("class")]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("?"),
        text("library"),
        text("version")
    )];
    for (k, v) in about.as_object().into_iter().flatten() {
        if !["pipeline", "class", "library", "version"].contains(&k.as_str()) && !v.is_null() {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            lines.push(format!("  {k}: {v}"));
        }
    }
    lines.join("\n")
}

pub fn check(cfg: &Config) -> Result<CheckReport, PipelineError> {
    let p = &cfg.preprocess;
    let face_crop = match &cfg.face_crop {
        Some(fc) => {
            crate::facecrop::workers(cfg)?;
            Some(FaceCropFound {
                weights: fc.weights.clone(),
                device: fc.device,
                detect_workers: cfg.pipeline.detect_threads,
                detect_size: fc.detect_size,
                refine_size: fc.refine_size,
                min_face: fc.min_face,
            })
        }
        None => None,
    };
    Ok(CheckReport {
        config: cfg.source.clone(),
        cuda_devices: cuda_device_count(),
        input: (p.width, p.height),
        input_channels: p.channels,
        fit: p.fit,
        filter: p.filter,
        format: cfg.encode.format,
        quality: cfg.encode.quality,
        face_crop,
        model: check_model(cfg)?,
        hotfolder: (cfg.hotfolder.as_ref()).map(|h| (h.root.clone(), h.shutdown_grace_s)),
    })
}

/// The plan the pipeline would run: the same model copies and the same batch size
/// (`max_batch = "auto"` included) as `process`, `run` and `bench`, one dummy batch on
/// each distinct device.
fn check_model(cfg: &Config) -> Result<Option<ModelFound>, PipelineError> {
    let Some(m) = &cfg.model else {
        return Ok(None);
    };
    let p = &cfg.preprocess;
    let plan = RuntimePlan::load(cfg)?;
    let batch = plan.max_batch;
    let mut devices: Vec<DeviceRun> = Vec::new();
    for model in &plan.models {
        // CPU workers are copies of one model on one device: describe it once.
        let dev = model.device();
        if devices.iter().any(|d| d.device == dev) {
            continue;
        }
        let _no_grad = tch::no_grad_guard();
        let x = Tensor::zeros(
            [
                batch as i64,
                p.height as i64,
                p.width as i64,
                p.channels as i64,
            ],
            // A Python pipeline's batch goes through its worker's shared memory from
            // the host: no CUDA context in hotpipe for it.
            (
                Kind::Uint8,
                if model.is_python() { Device::Cpu } else { dev },
            ),
        );
        let t = Instant::now();
        let y = model
            .forward_u8(&x, &vec![None; batch])
            .map_err(|e| PipelineError::Model {
                path: m.path.clone(),
                message: format!("dummy batch of {batch} failed: {}", torch_message(&e)),
            })?;
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
        devices.push(DeviceRun {
            device: dev,
            precision: model.kind(),
            output_hw: model.output_hw(),
            output_channels: model.output_channels(),
            outputs_per_input: model.outputs_per_input(),
            output_shape: y.size(),
            dummy_ms: t.elapsed().as_secs_f64() * 1e3,
        });
    }
    Ok(Some(ModelFound {
        path: m.path.clone(),
        python: m.python.as_ref().map(|p| p.entry.clone()),
        about: plan.models[0].about(),
        interpreter: m.python.as_ref().map(|p| p.interpreter.clone()),
        batch,
        devices,
    }))
}

impl CheckReport {
    /// What `check --json` prints: every figure of the text, names as the config spells
    /// them.
    pub fn to_json(&self) -> serde_json::Value {
        let face_crop = self.face_crop.as_ref().map(|fc| {
            serde_json::json!({
                "weights": fc.weights.to_string_lossy(),
                "device": fc.device.to_string(),
                "detect_workers": fc.detect_workers,
                "detect_size": fc.detect_size,
                "refine_size": fc.refine_size,
                "min_face": fc.min_face,
            })
        });
        let model = self.model.as_ref().map(|m| {
            let devices: Vec<_> = (m.devices.iter())
                .map(|d| {
                    serde_json::json!({
                        "device": device_name(d.device),
                        "precision": precision_name(d.precision),
                        "output_hw": [d.output_hw.0, d.output_hw.1],
                        "output_channels": d.output_channels,
                        "outputs_per_input": d.outputs_per_input,
                        "output_shape": d.output_shape,
                        "dummy_batch_ms": d.dummy_ms,
                    })
                })
                .collect();
            serde_json::json!({
                "path": m.path.to_string_lossy(),
                "python_entry": m.python,
                "pipeline": m.about,
                "python": m.interpreter.as_ref().map(|p| p.to_string_lossy()),
                "batch": m.batch,
                "devices": devices,
            })
        });
        serde_json::json!({
            "config": self.config,
            "valid": true,
            "cuda_devices": self.cuda_devices,
            "input": {
                "width": self.input.0,
                "height": self.input.1,
                "channels": self.input_channels,
                "fit": self.fit.name(),
                "filter": self.filter.name(),
            },
            "encode": { "format": self.format.name(), "quality": self.quality },
            "face_crop": face_crop,
            "model": model,
            "hotfolder": self.hotfolder.as_ref().map(|(root, grace)| serde_json::json!({
                "root": root.to_string_lossy(),
                "shutdown_grace_s": grace,
            })),
        })
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "config: {} (valid)", self.config)?;
        writeln!(f, "cuda devices: {}", self.cuda_devices)?;
        writeln!(
            f,
            "input: {} x {} ({} fit, {} filter)",
            self.input.0,
            self.input.1,
            self.fit.name(),
            self.filter.name()
        )?;
        writeln!(
            f,
            "encode: {}, quality {}",
            self.format.name(),
            self.quality
        )?;
        if let Some(fc) = &self.face_crop {
            write_face_crop(f, fc)?;
        }
        let Some(m) = &self.model else {
            return writeln!(f, "model: none (fitted images are encoded as they are)");
        };
        for d in &m.devices {
            self.write_device(f, m, d)?;
        }
        Ok(())
    }
}

fn write_face_crop(f: &mut fmt::Formatter<'_>, fc: &FaceCropFound) -> fmt::Result {
    let fine = if fc.refine_size > fc.detect_size {
        format!(
            "then around each face on the photo (at most {} px)",
            fc.refine_size
        )
    } else {
        "fine pass off".to_string()
    };
    writeln!(
        f,
        "face crop: weights {} on {}, {} detect workers; faces searched on a {} px copy, {fine}; smallest face found: {} px or {:.1}% of the photo's longer side, whichever is larger",
        fc.weights.display(),
        fc.device,
        fc.detect_workers,
        fc.detect_size,
        fc.min_face,
        1200.0 / fc.detect_size as f64,
    )
}

impl CheckReport {
    /// The model on one device: what it is, its input and output (in one layout: channels
    /// last for a Python pipeline, which gets uint8 in shared memory; first for a
    /// TorchScript model) and its dummy batch.
    fn write_device(
        &self,
        f: &mut fmt::Formatter<'_>,
        m: &ModelFound,
        d: &DeviceRun,
    ) -> fmt::Result {
        let (oh, ow) = d.output_hw;
        let ch = channel_name(self.input_channels as i64);
        let (w, h, c) = (self.input.0, self.input.1, self.input_channels);
        let oc = d.output_channels;
        let k = d.outputs_per_input;
        let n = if k == 1 {
            "N".to_string()
        } else {
            format!("N*{k}")
        };
        let output = match &m.python {
            Some(entry) => {
                writeln!(
                    f,
                    "model: {entry} (Python pipeline, a worker process per device)"
                )?;
                if let Some(python) = &m.interpreter {
                    writeln!(f, "  python: {}", python.display())?;
                }
                if let Some(about) = &m.about {
                    writeln!(f, "{}", about_text(about))?;
                }
                writeln!(f, "  device: {}", device_name(d.device))?;
                writeln!(
                    f,
                    "  input:  N x {h} x {w} x {c} uint8 ({ch}), in shared memory"
                )?;
                format!("{n} x {oh} x {ow} x {oc} uint8")
            }
            None => {
                writeln!(f, "model: {}", m.path.display())?;
                writeln!(
                    f,
                    "  device: {}, precision {}",
                    device_name(d.device),
                    precision_name(d.precision)
                )?;
                writeln!(f, "  input:  N x {c} x {h} x {w} float in [0, 1] ({ch})")?;
                format!("{n} x {oc} x {oh} x {ow}")
            }
        };
        let several = if k > 1 {
            format!(": {k} outputs per input, written <name>_1 .. <name>_{k}")
        } else {
            String::new()
        };
        writeln!(
            f,
            "  output: {output} ({}, encoded as such){several}",
            channel_name(oc)
        )?;
        writeln!(
            f,
            "  batch: {} (a dummy batch ran in {:.1} ms)",
            m.batch, d.dummy_ms
        )
    }
}
