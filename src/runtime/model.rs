//! The model contract and its runtime: load a TorchScript module on a device, check at
//! start-up that it maps `N x C x H x W` float in [0, 1] (C = 3, RGB, or 4, RGBA with
//! `decode.alpha = "keep"`) to `N x C' x H' x W'` with C' = 1 (grey: a mask, a depth map),
//! 3 (RGB) or 4 (RGBA), and run uint8 NHWC batches through it with the normalisation
//! done on the device. The channels found are what the encoder writes.
//!
//! uint8 crosses the bus (a quarter of float32's bytes); conversion to float, scaling to
//! [0, 1], the optional mean/std and the cast to the configured precision all happen on
//! the model's device, and so does the way back to uint8 NHWC for the encoder.
//!
//! Without a `[model]` the runtime is the identity: the fitted (or face-cropped) pixels
//! go to the encoder unchanged, through the same batch path.

use std::path::{Path, PathBuf};

use std::sync::Mutex;

use tch::{CModule, Device, IValue, Kind, TchError, Tensor};

use crate::config::{ModelConfig, ParamsConfig, Precision, PreprocessConfig};
use crate::runtime::python::Supervisor;
use crate::runtime::schema::Binding;
use crate::vocab::error::{PipelineError, torch_message};
use crate::vocab::params::Params;

/// What runs the batch.
enum Engine {
    /// No `[model]`: the fitted pixels pass through.
    Identity,
    Torch(CModule),
    /// `backend = "python"`: a supervised worker process. The pipeline's inference
    /// worker takes it out ([`Model::into_python`]) and runs it over shared slots; the
    /// lock is for `check` and `bench`, which run batches through [`Model::forward_u8`].
    Python(Box<Mutex<Supervisor>>),
}

pub struct Model {
    engine: Engine,
    path: PathBuf,
    device: Device,
    kind: Kind,
    mean: Option<Tensor>,
    std: Option<Tensor>,
    in_hw: (i64, i64),
    out_hw: (i64, i64),
    in_ch: i64,
    out_ch: i64,
    /// Outputs per input, K: the model returns `N*K` images for `N`, rows
    /// `i*K .. i*K+K` belonging to input `i` (variations of one face, say).
    per_input: i64,
    /// The parameters `forward` takes after the batch (empty: `forward(x)`).
    binding: Binding,
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
        let ch = pre.channels as i64;
        Model {
            engine: Engine::Identity,
            path: PathBuf::from("(none)"),
            device,
            kind: Kind::Uint8,
            mean: None,
            std: None,
            in_hw: hw,
            out_hw: hw,
            in_ch: ch,
            out_ch: ch,
            per_input: 1,
            binding: Binding::default(),
        }
    }

    /// Match the arguments of `cfg.path`'s `forward` to the declared parameters: once
    /// per plan, before [`Model::load`] on each device.
    pub fn binding(
        cfg: &ModelConfig,
        params: Option<&ParamsConfig>,
    ) -> Result<Binding, PipelineError> {
        let err = |message: String| PipelineError::Model {
            path: cfg.path.clone(),
            message,
        };
        if !cfg.path.is_file() {
            return Err(err(
                "no such file (set [model] path in the config)".to_string()
            ));
        }
        let binding = Binding::of_model(&cfg.path, params).map_err(err)?;
        if let (Some(p), false) = (params, binding.is_empty()) {
            tracing::info!(params = ?binding.names(p), "the model takes parameters");
        }
        Ok(binding)
    }

    /// Load `cfg.path` on `device` with its [`Model::binding`], and check its contract
    /// with a dummy batch of two.
    pub fn load(
        cfg: &ModelConfig,
        device: Device,
        pre: &PreprocessConfig,
        binding: Binding,
    ) -> Result<Model, PipelineError> {
        let err = |message: String| PipelineError::Model {
            path: cfg.path.clone(),
            message,
        };
        let _guard = tch::no_grad_guard();
        let mut module = CModule::load_on_device(&cfg.path, device)
            .map_err(|e| err(format!("cannot load as TorchScript: {}", torch_message(&e))))?;
        module.set_eval();
        let kind = kind_of(cfg.precision);
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        let in_ch = pre.channels as i64;
        // mean and std are for the colour; a kept alpha channel passes as it is (0, 1).
        let to_dev = |v: [f32; 3], alpha: f32| {
            let v = [v[0], v[1], v[2], alpha];
            Tensor::from_slice(&v[..in_ch as usize])
                .view([1, in_ch, 1, 1])
                .to_device(device)
                .to_kind(kind)
        };
        let mut m = Model {
            engine: Engine::Torch(module),
            path: cfg.path.clone(),
            device,
            kind,
            mean: pre.mean.map(|v| to_dev(v, 0.0)),
            std: pre.std.map(|v| to_dev(v, 1.0)),
            in_hw: (pre.height as i64, pre.width as i64),
            out_hw: (0, 0),
            in_ch,
            out_ch: 0,
            per_input: 1,
            binding,
        };
        (m.out_ch, m.out_hw, m.per_input) = m.check_contract().map_err(err)?;
        tracing::info!(
            channels = m.out_ch,
            size = ?m.out_hw,
            outputs_per_input = m.per_input,
            "model contract checked"
        );
        if let Device::Cuda(i) = device {
            // Loading, the precision cast and the contract check ran on the legacy default
            // stream, which the worker's pool streams do not wait for: finish them here so
            // the first batch never reads half-converted weights.
            crate::runtime::cuda::device_synchronize(i).map_err(|e| err(e.to_string()))?;
        }
        Ok(m)
    }

    /// Run a dummy batch and check the output's shape. Returns `(C', (H', W'), K)`.
    fn check_contract(&self) -> Result<(i64, (i64, i64), i64), String> {
        let (h, w) = self.in_hw;
        let c = self.in_ch;
        let x = Tensor::zeros([2, c, h, w], (self.kind, self.device));
        let Engine::Torch(module) = &self.engine else {
            unreachable!("the contract is checked on TorchScript models");
        };
        let mut args = vec![IValue::Tensor(x)];
        args.extend(self.binding.lists(&[None, None]));
        let out = module.forward_is(&args).map_err(|e| {
            let why = if c == 4 {
                " (decode.alpha = \"keep\" gives the model 4 channels, RGBA)"
            } else {
                ""
            };
            format!(
                "fails on a dummy batch of 2 x {c} x {h} x {w}{why}: {}",
                torch_message(&e)
            )
        })?;
        let t = match out {
            IValue::Tensor(t) => t,
            other => {
                return Err(format!(
                    "must return one tensor N x C' x H' x W', but returns {}",
                    ivalue_kind(&other)
                ));
            }
        };
        let size = t.size();
        if size.len() != 4 || size[0] < 2 || size[0] % 2 != 0 || ![1, 3, 4].contains(&size[1]) {
            return Err(format!(
                "must return N*K x C' x H' x W' (K outputs per input, rows i*K..i*K+K for input i; C' = 1, 3 or 4 channels: grey, RGB, RGBA) for input N x {c} x H x W; for 2 x {c} x {h} x {w} it returned {size:?}"
            ));
        }
        if !t.is_floating_point() {
            return Err(format!(
                "must return floating-point values in [0, 1], returned {:?}",
                t.kind()
            ));
        }
        Ok((size[1], (size[2], size[3]), size[0] / 2))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_identity(&self) -> bool {
        matches!(self.engine, Engine::Identity)
    }

    /// A Python pipeline's worker: the supervisor for the inference worker to run it,
    /// or the model back when it runs in this process.
    pub fn into_python(self) -> Result<Supervisor, Box<Model>> {
        match self.engine {
            Engine::Python(sup) => Ok(sup.into_inner().unwrap_or_else(|p| p.into_inner())),
            _ => Err(Box::new(self)),
        }
    }

    /// A Python pipeline's worker as a model: its sizes are those of the handshake;
    /// every declared parameter reaches it (as a dict per image).
    pub fn python(sup: Supervisor, path: &Path, device: Device, pre: &PreprocessConfig) -> Model {
        let [k, oh, ow, oc] = sup.output();
        Model {
            engine: Engine::Python(Box::new(Mutex::new(sup))),
            path: path.to_path_buf(),
            device,
            kind: Kind::Uint8,
            mean: None,
            std: None,
            in_hw: (pre.height as i64, pre.width as i64),
            out_hw: (oh as i64, ow as i64),
            in_ch: pre.channels as i64,
            out_ch: oc as i64,
            per_input: k as i64,
            binding: Binding::default(),
        }
    }

    pub fn is_python(&self) -> bool {
        matches!(self.engine, Engine::Python(_))
    }

    /// What a Python pipeline said it is (`describe()`, with its class); `None` for
    /// TorchScript.
    pub fn about(&self) -> Option<serde_json::Value> {
        match &self.engine {
            Engine::Python(sup) => Some(
                sup.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .about()
                    .clone(),
            ),
            _ => None,
        }
    }

    /// Input `(H, W)`.
    pub fn input_hw(&self) -> (i64, i64) {
        self.in_hw
    }

    /// Output `(H', W')`.
    pub fn output_hw(&self) -> (i64, i64) {
        self.out_hw
    }

    /// Channels of each input image: 3 (RGB) or 4 (RGBA).
    pub fn input_channels(&self) -> i64 {
        self.in_ch
    }

    /// Channels of each output image: 1 (grey), 3 (RGB) or 4 (RGBA).
    pub fn output_channels(&self) -> i64 {
        self.out_ch
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Outputs per input (K): the model returns `N*K` images for a batch of `N`.
    pub fn outputs_per_input(&self) -> usize {
        self.per_input as usize
    }

    /// Whether `forward` takes parameters after the batch.
    pub fn takes_params(&self) -> bool {
        self.is_python() || !self.binding.is_empty()
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
            let x = Tensor::f_zeros([n, h, w, self.in_ch], (Kind::Uint8, self.device)).ok()?;
            let _y = self.forward_u8(&x, &vec![None; n as usize]).ok()?;
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

    /// Run a uint8 `N x H x W x C` batch that is already on the model's device, with each
    /// row's parameters (`rows`, N long; read only when `forward` takes parameters);
    /// returns uint8 `N*K x H' x W' x C'`, contiguous, on the device.
    pub fn forward_u8(&self, x: &Tensor, rows: &[Option<&Params>]) -> Result<Tensor, TchError> {
        let module = match &self.engine {
            Engine::Identity => return Ok(x.shallow_clone()),
            Engine::Python(sup) => return self.forward_python(sup, x, rows),
            Engine::Torch(m) => m,
        };
        let n = x.size()[0];
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
        let y = if self.binding.is_empty() {
            module.forward_ts(&[x])?
        } else {
            let mut args = vec![IValue::Tensor(x)];
            args.extend(self.binding.lists(rows));
            match module.forward_is(&args)? {
                IValue::Tensor(t) => t,
                other => {
                    return Err(TchError::Torch(format!(
                        "forward returned {} instead of a tensor",
                        ivalue_kind(&other)
                    )));
                }
            }
        };
        if y.size().first() != Some(&(n * self.per_input)) {
            return Err(TchError::Torch(format!(
                "forward returned {:?} for a batch of {n}; at start-up it returned {} outputs per input",
                y.size(),
                self.per_input
            )));
        }
        y.f_to_kind(Kind::Float)?
            .f_clamp(0.0, 1.0)?
            .f_mul_scalar(255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_permute([0, 2, 3, 1])?
            .f_contiguous()
    }
}

impl Model {
    /// [`Model::forward_u8`] through a Python worker's scratch slots (a copy in and out:
    /// for `check` and `bench`; the pipeline's batches take no copy).
    fn forward_python(
        &self,
        sup: &Mutex<Supervisor>,
        x: &Tensor,
        rows: &[Option<&Params>],
    ) -> Result<Tensor, TchError> {
        let mut sup = sup.lock().unwrap_or_else(|p| p.into_inner());
        let x = x.f_to_device(Device::Cpu)?.f_contiguous()?;
        let n = x.size()[0] as usize;
        let mut input = vec![0u8; x.numel()];
        x.f_copy_data_u8(&mut input, x.numel())?;
        let params: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                rows.get(i)
                    .copied()
                    .flatten()
                    .map_or_else(|| sup.placeholders().clone(), Params::to_json)
            })
            .collect();
        let [k, oh, ow, oc] = sup.output();
        let mut out = vec![0u8; n * k * oh * ow * oc];
        let outcomes = sup
            .run(&input, &params, &mut out)
            .map_err(|e| TchError::Torch(e.to_string()))?;
        if let Some((i, why)) =
            (outcomes.iter().enumerate()).find_map(|(i, o)| Some((i, o.message()?)))
        {
            return Err(TchError::Torch(format!("image {i} of the batch: {why}")));
        }
        Tensor::f_from_slice(&out)?
            .f_view([(n * k) as i64, oh as i64, ow as i64, oc as i64])?
            .f_to_device(self.device)
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
