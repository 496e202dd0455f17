//! The runtime plan: which model copies run on which devices, with how many libtorch
//! threads, at which batch size. Resolved once from the config, with the models loaded,
//! by the one function every command uses (`process`, `run`, `check`, `bench`), so they
//! always agree, notably on what `max_batch = "auto"` means.

use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind};

use crate::config::{BatchSize, Config, Format, ModelConfig, PythonModel};
use crate::runtime::model::Model;
use crate::runtime::python::shm::SharedSlots;
use crate::runtime::python::{Limits, Shape, WorkerSpec, start_workers};
use crate::vocab::error::PipelineError;
use crate::vocab::telemetry::ModelWorkerStats;

/// The batch size without `[model]`, or with `max_batch = "auto"` where memory is not
/// what bounds a batch (the CPU, see [`Model::auto_batch`]).
const DEFAULT_BATCH: usize = 8;

/// What the pipeline resolved at start-up (for `check`, logs and metrics).
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub devices: Vec<Device>,
    pub max_batch: usize,
    pub input_hw: (i64, i64),
    pub output_hw: (i64, i64),
    /// Channels in (3 or 4) and out (1, 3 or 4).
    pub input_channels: i64,
    pub output_channels: i64,
    /// Outputs per input (K): `<name>_1 .. <name>_K` when more than one.
    pub outputs_per_input: usize,
    /// The model's path; empty without a `[model]`.
    pub model: String,
    pub precision: Kind,
    /// A Python pipeline's own account of itself (`describe()`: library, version,
    /// weights), with its class.
    pub about: Option<serde_json::Value>,
}

/// The loaded models and the numbers derived from them.
pub struct RuntimePlan {
    /// One per inference worker, in worker order.
    pub models: Vec<Model>,
    pub max_batch: usize,
    /// A Python pipeline's workers: the memory they share with the pipeline (its batch
    /// and output slots live there) and each one's counters.
    pub python: Option<PythonPlan>,
}

pub struct PythonPlan {
    pub shared: Arc<SharedSlots>,
    pub stats: Vec<Arc<ModelWorkerStats>>,
}

impl RuntimeInfo {
    /// The model for people: its path, or that there is none.
    pub fn model_text(&self) -> &str {
        if self.model.is_empty() {
            "no model"
        } else {
            &self.model
        }
    }

    /// The devices as the config names them (`cpu`, `cuda:1`), comma-separated.
    pub fn devices_text(&self) -> String {
        let names: Vec<String> = self.devices.iter().map(|&d| device_name(d)).collect();
        names.join(", ")
    }
}

/// A device as the config names it (`cpu`, `cuda:1`).
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// A tensor kind as `[model] precision` names it (`uint8`: pixels as they are, without
/// a model or through a Python pipeline).
pub fn precision_name(k: Kind) -> String {
    match k {
        Kind::Float => "fp32".into(),
        Kind::Half => "fp16".into(),
        Kind::BFloat16 => "bf16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

impl RuntimePlan {
    /// Load the model(s) (or the identity) for `cfg` and size the batch. Sets libtorch's
    /// intra-op thread count for the calling process. Fails, before any input is
    /// touched, when the model or the device is unusable.
    pub fn load(cfg: &Config) -> Result<RuntimePlan, PipelineError> {
        if let Some(m) = &cfg.model
            && let Some(py) = &m.python
        {
            return RuntimePlan::load_python(cfg, m, py);
        }
        let pl = &cfg.pipeline;
        let mut devices: Vec<Device> = match &cfg.model {
            Some(m) => m.devices.iter().map(|&d| d.tch()).collect(),
            None => vec![Device::Cpu],
        };
        let mut intra_op_threads = pl.infer_threads;
        // CPU inference as several workers, each a model copy with its share of the
        // intra-op threads (they all take batches from the same assembler).
        if devices == [Device::Cpu] && cfg.model.is_some() && pl.cpu_infer_workers > 1 {
            devices = vec![Device::Cpu; pl.cpu_infer_workers];
            intra_op_threads = (pl.infer_threads / pl.cpu_infer_workers).max(1);
        }
        tch::set_num_threads(intra_op_threads as i32);
        let binding = match &cfg.model {
            Some(m) => Model::binding(m, cfg.params.as_ref())?,
            None => Default::default(),
        };
        let models = devices
            .iter()
            .map(|&dev| match &cfg.model {
                Some(m) => Model::load(m, dev, &cfg.preprocess, binding.clone()),
                None => Ok(Model::identity(dev, &cfg.preprocess)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(m) = &cfg.model {
            refuse_rgba_jpeg(cfg, m, &models[0])?;
        }
        let max_batch = match cfg.model.as_ref().map(|m| m.max_batch) {
            Some(BatchSize::Fixed(n)) => n,
            // Several devices share the slot ring, so the smallest device sets the size.
            Some(BatchSize::Auto) => models
                .iter()
                .map(Model::auto_batch)
                .min()
                .unwrap_or(DEFAULT_BATCH),
            None => DEFAULT_BATCH,
        };
        Ok(RuntimePlan {
            models,
            max_batch,
            python: None,
        })
    }

    /// `backend = "python"`: one worker process per device, constructed in parallel,
    /// sharing the batch slots. `max_batch = "auto"` means the CPU default here (8): a
    /// Python pipeline's memory is its own, hotpipe cannot measure it.
    fn load_python(
        cfg: &Config,
        m: &ModelConfig,
        py: &PythonModel,
    ) -> Result<RuntimePlan, PipelineError> {
        let pre = &cfg.preprocess;
        let max_batch = match m.max_batch {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => DEFAULT_BATCH,
        };
        let module_dir = WorkerSpec::default_module_dir();
        let placeholders = serde_json::Value::Object(
            (cfg.params.iter().flat_map(|p| &p.specs))
                .map(|s| (s.name.clone(), s.placeholder().to_json()))
                .collect(),
        );
        // On the CPU, `cpu_infer_workers` processes share the batches as TorchScript
        // copies do (a pipeline that holds the GIL scales only across processes).
        let mut devices = m.devices.clone();
        if devices.len() == 1 && devices[0].tch() == Device::Cpu {
            devices = vec![devices[0]; cfg.pipeline.cpu_infer_workers];
        }
        let specs: Vec<WorkerSpec> = (devices.iter())
            .map(|d| WorkerSpec {
                python: py.interpreter.clone(),
                module_dir: module_dir.clone(),
                entry: py.entry.clone(),
                device: d.to_string(),
                options: py.options.clone(),
                placeholders: placeholders.clone(),
                cpu_threads: (d.tch() == Device::Cpu)
                    .then(|| (cfg.pipeline.infer_threads / devices.len()).max(1)),
            })
            .collect();
        let shape = Shape {
            slots: cfg.pipeline.batch_slots,
            rows: max_batch,
            hwc: [pre.height as usize, pre.width as usize, pre.channels],
        };
        let limits = Limits {
            batch_timeout: (py.batch_timeout_s > 0)
                .then(|| Duration::from_secs(py.batch_timeout_s)),
            max_attempts: py.max_attempts,
        };
        let stats: Vec<Arc<ModelWorkerStats>> = specs.iter().map(|_| Arc::default()).collect();
        tracing::info!(entry = py.entry, python = %py.interpreter.display(), workers = specs.len(), "starting the Python pipeline's workers");
        let (sups, shared) = start_workers(specs, shape, limits, stats.clone()).map_err(|e| {
            PipelineError::Model {
                path: m.path.clone(),
                message: e.to_string(),
            }
        })?;
        let models: Vec<Model> = sups
            .into_iter()
            .zip(&devices)
            .map(|(sup, d)| Model::python(sup, &m.path, d.tch(), pre))
            .collect();
        refuse_rgba_jpeg(cfg, m, &models[0])?;
        Ok(RuntimePlan {
            models,
            max_batch,
            python: Some(PythonPlan { shared, stats }),
        })
    }

    pub fn info(&self) -> RuntimeInfo {
        let m = &self.models[0];
        RuntimeInfo {
            devices: self.models.iter().map(Model::device).collect(),
            max_batch: self.max_batch,
            input_hw: m.input_hw(),
            output_hw: m.output_hw(),
            input_channels: m.input_channels(),
            output_channels: m.output_channels(),
            outputs_per_input: m.outputs_per_input(),
            model: if m.is_identity() {
                String::new()
            } else {
                m.path().display().to_string()
            },
            precision: m.kind(),
            about: m.about(),
        }
    }
}

/// A model that returns RGBA with JPEG configured fails at start-up, not per image.
fn refuse_rgba_jpeg(cfg: &Config, m: &ModelConfig, first: &Model) -> Result<(), PipelineError> {
    if cfg.encode.format == Format::Jpeg && first.output_channels() == 4 {
        return Err(PipelineError::Model {
            path: m.path.clone(),
            message: "returns 4 channels (RGBA), which JPEG cannot carry: set [encode] format to \"png\" or \"webp\"".into(),
        });
    }
    Ok(())
}
