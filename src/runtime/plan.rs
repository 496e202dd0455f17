//! The runtime plan: which model copies run on which devices, with how many libtorch
//! threads, at which batch size. Resolved once from the config, with the models loaded,
//! by the one function every command uses (`process`, `run`, `check`, `bench`), so they
//! always agree, notably on what `max_batch = "auto"` means.

use tch::{Device, Kind};

use crate::config::{BatchSize, Config};
use crate::runtime::model::Model;
use crate::vocab::error::PipelineError;

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
    pub model: String,
    pub precision: Kind,
}

/// The loaded models and the numbers derived from them.
pub struct RuntimePlan {
    /// One per inference worker, in worker order.
    pub models: Vec<Model>,
    pub max_batch: usize,
}

impl RuntimePlan {
    /// Load the model(s) (or the identity) for `cfg` and size the batch. Sets libtorch's
    /// intra-op thread count for the calling process. Fails, before any input is
    /// touched, when the model or the device is unusable.
    pub fn load(cfg: &Config) -> Result<RuntimePlan, PipelineError> {
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
        let models = devices
            .iter()
            .map(|&dev| match &cfg.model {
                Some(m) => Model::load(m, dev, &cfg.preprocess),
                None => Ok(Model::identity(dev, &cfg.preprocess)),
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        Ok(RuntimePlan { models, max_batch })
    }

    pub fn info(&self) -> RuntimeInfo {
        let m = &self.models[0];
        RuntimeInfo {
            devices: self.models.iter().map(Model::device).collect(),
            max_batch: self.max_batch,
            input_hw: m.input_hw(),
            output_hw: m.output_hw(),
            model: m.path().display().to_string(),
            precision: m.kind(),
        }
    }
}
