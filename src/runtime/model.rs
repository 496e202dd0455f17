//! The model contract and its runtime: load a TorchScript module on a device, check at
//! start-up that it maps `N x 3 x H x W` float in [0, 1] to `N x 3 x H' x W'`, and run
//! uint8 NHWC batches through it with the normalisation done on the device.
//!
//! uint8 crosses the bus (a quarter of float32's bytes); conversion to float, scaling to
//! [0, 1], the optional mean/std and the cast to the configured precision all happen on
//! the model's device, and so does the way back to uint8 NHWC for the encoder.
//!
//! Without a `[model]` the runtime is the identity: the fitted (or face-cropped) pixels
//! go to the encoder unchanged, through the same batch path.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, TchError, Tensor};

use crate::config::{ModelConfig, Precision, PreprocessConfig};
use crate::vocab::error::{PipelineError, torch_message};

pub struct Model {
    module: Option<CModule>,
    path: PathBuf,
    device: Device,
    kind: Kind,
    mean: Option<Tensor>,
    std: Option<Tensor>,
    in_hw: (i64, i64),
    out_hw: (i64, i64),
}

pub fn kind_of(p: Precision) -> Kind {
    match p {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
        Precision::Bf16 => Kind::BFloat16,
    }
}

impl Model {
    /// The identity model used when no `[model]` is configured.
    pub fn identity(device: Device, pre: &PreprocessConfig) -> Model {
        let hw = (pre.height as i64, pre.width as i64);
        Model {
            module: None,
            path: PathBuf::from("(none)"),
            device,
            kind: Kind::Uint8,
            mean: None,
            std: None,
            in_hw: hw,
            out_hw: hw,
        }
    }

    /// Load `cfg.path` on `device` and check its contract with a dummy batch of two.
    pub fn load(
        cfg: &ModelConfig,
        device: Device,
        pre: &PreprocessConfig,
    ) -> Result<Model, PipelineError> {
        let err = |message: String| PipelineError::Model {
            path: cfg.path.clone(),
            message,
        };
        if !cfg.path.is_file() {
            return Err(err(
                "no such file (set [model] path in the config)".to_string()
            ));
        }
        let _guard = tch::no_grad_guard();
        let mut module = CModule::load_on_device(&cfg.path, device)
            .map_err(|e| err(format!("cannot load as TorchScript: {}", torch_message(&e))))?;
        module.set_eval();
        let kind = kind_of(cfg.precision);
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        let to_dev = |v: [f32; 3]| {
            Tensor::from_slice(&v)
                .view([1, 3, 1, 1])
                .to_device(device)
                .to_kind(kind)
        };
        let mut m = Model {
            module: Some(module),
            path: cfg.path.clone(),
            device,
            kind,
            mean: pre.mean.map(to_dev),
            std: pre.std.map(to_dev),
            in_hw: (pre.height as i64, pre.width as i64),
            out_hw: (0, 0),
        };
        m.out_hw = m.check_contract().map_err(err)?;
        if let Device::Cuda(i) = device {
            // Loading, the precision cast and the contract check ran on the legacy default
            // stream, which the worker's pool streams do not wait for: finish them here so
            // the first batch never reads half-converted weights.
            crate::runtime::cuda::device_synchronize(i).map_err(|e| err(e.to_string()))?;
        }
        Ok(m)
    }

    /// Run a dummy batch and check the output's shape. Returns `(H', W')`.
    fn check_contract(&self) -> Result<(i64, i64), String> {
        let (h, w) = self.in_hw;
        let x = Tensor::zeros([2, 3, h, w], (self.kind, self.device));
        let module = self
            .module
            .as_ref()
            .expect("contract is checked on real models");
        let out = module.forward_is(&[IValue::Tensor(x)]).map_err(|e| {
            format!(
                "fails on a dummy batch of 2 x 3 x {h} x {w}: {}",
                torch_message(&e)
            )
        })?;
        let t = match out {
            IValue::Tensor(t) => t,
            other => {
                return Err(format!(
                    "must return one tensor N x 3 x H' x W', but returns {}",
                    ivalue_kind(&other)
                ));
            }
        };
        let size = t.size();
        if size.len() != 4 || size[0] != 2 || size[1] != 3 {
            return Err(format!(
                "must return N x 3 x H' x W' for input N x 3 x H x W; for 2 x 3 x {h} x {w} it returned {size:?}"
            ));
        }
        if !t.is_floating_point() {
            return Err(format!(
                "must return floating-point values in [0, 1], returned {:?}",
                t.kind()
            ));
        }
        Ok((size[2], size[3]))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_identity(&self) -> bool {
        self.module.is_none()
    }

    /// Input `(H, W)`.
    pub fn input_hw(&self) -> (i64, i64) {
        self.in_hw
    }

    /// Output `(H', W')`.
    pub fn output_hw(&self) -> (i64, i64) {
        self.out_hw
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `max_batch = "auto"`: on a GPU, measure the model's memory for batches of one and
    /// two (the difference is the per-image footprint, the rest weights and workspace)
    /// and fit as many images as 70% of the free memory holds, leaving room for the
    /// allocator's fragmentation and the next batch's copy. Capped at 256. On the CPU
    /// memory is not what bounds a batch, and larger batches only add latency: 8.
    pub fn auto_batch(&self) -> usize {
        let Device::Cuda(i) = self.device else {
            return 8;
        };
        let _guard = tch::no_grad_guard();
        let (h, w) = self.in_hw;
        let peak_for = |n: i64| -> Option<usize> {
            crate::runtime::cuda::peak_allocated(i, true).ok()?;
            let x = Tensor::f_zeros([n, h, w, 3], (Kind::Uint8, self.device)).ok()?;
            let _y = self.forward_u8(&x).ok()?;
            tch::Cuda::synchronize(i as i64);
            crate::runtime::cuda::peak_allocated(i, false).ok()
        };
        let (Some(p1), Some(p2)) = (peak_for(1), peak_for(2)) else {
            tracing::warn!(
                device = i,
                "cannot measure the model's memory; max_batch = 8"
            );
            return 8;
        };
        let per_image = p2.saturating_sub(p1).max(1);
        let free = crate::runtime::cuda::mem_info(i)
            .map(|(f, _)| f)
            .unwrap_or(0);
        let n = ((free as f64 * 0.7) / per_image as f64) as usize;
        let n = n.clamp(1, 256);
        tracing::info!(
            device = i,
            per_image_mib = per_image >> 20,
            free_mib = free >> 20,
            max_batch = n,
            "sized the batch from free device memory"
        );
        n
    }

    /// Run a uint8 `N x H x W x 3` batch that is already on the model's device; returns
    /// uint8 `N x H' x W' x 3`, contiguous, on the device.
    pub fn forward_u8(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let Some(module) = &self.module else {
            return Ok(x.shallow_clone());
        };
        let mut x = x
            .f_permute([0, 3, 1, 2])?
            .f_to_kind(self.kind)?
            .f_div_scalar(255.0)?;
        if let Some(mean) = &self.mean {
            x = x.f_sub(mean)?;
        }
        if let Some(std) = &self.std {
            x = x.f_div(std)?;
        }
        let y = module.forward_ts(&[x])?;
        y.f_to_kind(Kind::Float)?
            .f_clamp(0.0, 1.0)?
            .f_mul_scalar(255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_permute([0, 2, 3, 1])?
            .f_contiguous()
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::Tuple(_) => "a tuple",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::None => "None",
        _ => "a non-tensor value",
    }
}
