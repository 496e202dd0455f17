//! The three MTCNN networks (P-Net, R-Net, O-Net) as plain tch operations on weights
//! loaded from `pnet.pt`, `rnet.pt`, `onet.pt`.
//!
//! The layer sequences mirror facenet-pytorch 2.6.0's `PNet`, `RNet` and `ONet` modules
//! exactly (including the NCHW -> NWHC permute before R-Net's and O-Net's dense layers,
//! which the weights were trained against), so the same weights give the same scores.
//! Writing them as functions instead of loading TorchScript avoids a traced module per
//! network and keeps the weights files plain tensor dicts (see `scripts/convert_mtcnn.py`).

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, TchError, Tensor};

use crate::vocab::error::{PipelineError, torch_message};

/// Named weights of one network, on its device.
struct Weights {
    net: &'static str,
    map: HashMap<String, Tensor>,
}

/// Why a weights folder that is not there is most likely a path, not a missing set-up:
/// a config copied elsewhere keeps `weights = "models/mtcnn"`, resolved against its new
/// folder. Names the folder the set-up wrote when this build's checkout has it.
fn no_weights_folder(dir: &Path) -> String {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mtcnn");
    let hint = if built.join("pnet.pt").is_file() {
        format!("; scripts/setup.sh wrote them to {}", built.display())
    } else {
        "; scripts/setup.sh writes them to models/mtcnn in the checkout".to_string()
    };
    format!(
        "no MTCNN weights folder {}: [face_crop] weights is resolved against the config file's folder, so a copied config needs it set to the folder holding pnet.pt, rnet.pt, onet.pt{hint}",
        dir.display()
    )
}

impl Weights {
    fn load(dir: &Path, net: &'static str, device: Device) -> Result<Weights, PipelineError> {
        let path = dir.join(format!("{net}.pt"));
        if !dir.is_dir() {
            return Err(PipelineError::FaceCrop(no_weights_folder(dir)));
        }
        if !path.is_file() {
            return Err(PipelineError::FaceCrop(format!(
                "MTCNN weights {} are missing; run scripts/setup.sh to convert them \
                 (or set [face_crop] weights to the folder holding pnet.pt, rnet.pt, onet.pt)",
                path.display()
            )));
        }
        let tensors = Tensor::loadz_multi_with_device(&path, device).map_err(|e| {
            PipelineError::FaceCrop(format!(
                "cannot read MTCNN weights {}: {}",
                path.display(),
                torch_message(&e)
            ))
        })?;
        let map = tensors
            .into_iter()
            .map(|(k, v)| (k, v.to_kind(Kind::Float)))
            .collect();
        Ok(Weights { net, map })
    }

    fn get(&self, name: &str) -> Result<&Tensor, PipelineError> {
        self.map.get(name).ok_or_else(|| {
            PipelineError::FaceCrop(format!(
                "MTCNN weights {}.pt have no tensor `{name}`; re-run scripts/convert_mtcnn.py",
                self.net
            ))
        })
    }
}

/// Convolution (stride 1, no padding) followed by PReLU.
struct ConvPrelu {
    w: Tensor,
    b: Tensor,
    a: Tensor,
}

impl ConvPrelu {
    fn new(w: &Weights, conv: &str, prelu: &str) -> Result<ConvPrelu, PipelineError> {
        Ok(ConvPrelu {
            w: w.get(&format!("{conv}.weight"))?.shallow_clone(),
            b: w.get(&format!("{conv}.bias"))?.shallow_clone(),
            a: w.get(&format!("{prelu}.weight"))?.shallow_clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.w, Some(&self.b), [1, 1], [0, 0], [1, 1], 1)?
            .f_prelu(&self.a)
    }
}

struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    fn new(w: &Weights, name: &str) -> Result<Dense, PipelineError> {
        Ok(Dense {
            w: w.get(&format!("{name}.weight"))?.shallow_clone(),
            b: w.get(&format!("{name}.bias"))?.shallow_clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.w, Some(&self.b))
    }
}

/// Max pooling with `ceil_mode = True`, as in the original Caffe MTCNN.
fn pool(x: &Tensor, k: i64, s: i64) -> Result<Tensor, TchError> {
    x.f_max_pool2d([k, k], [s, s], [0, 0], [1, 1], true)
}

/// P-Net's two 1x1 convolution heads (face probability, 2 channels; box regression, 4)
/// joined at load into one 6-channel convolution: one pass over the 32-channel map per
/// pyramid level instead of two, and no per-call concatenation of the weights.
struct Heads {
    w: Tensor,
    b: Tensor,
}

/// Proposal network: fully convolutional, run on every pyramid level.
pub struct PNet {
    c1: ConvPrelu,
    c2: ConvPrelu,
    c3: ConvPrelu,
    heads: Heads,
}

/// Refinement network on 24 x 24 candidate crops.
pub struct RNet {
    c1: ConvPrelu,
    c2: ConvPrelu,
    c3: ConvPrelu,
    d4: Dense,
    a4: Tensor,
    prob: Dense,
    reg: Dense,
}

/// Output network on 48 x 48 crops: score, box regression and five landmarks.
pub struct ONet {
    c1: ConvPrelu,
    c2: ConvPrelu,
    c3: ConvPrelu,
    c4: ConvPrelu,
    d5: Dense,
    a5: Tensor,
    prob: Dense,
    reg: Dense,
    marks: Dense,
}

/// All three networks on one device.
pub struct Nets {
    pub pnet: PNet,
    pub rnet: RNet,
    pub onet: ONet,
    pub device: Device,
}

impl Nets {
    /// Load `pnet.pt`, `rnet.pt` and `onet.pt` from `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Nets, PipelineError> {
        let p = Weights::load(dir, "pnet", device)?;
        let r = Weights::load(dir, "rnet", device)?;
        let o = Weights::load(dir, "onet", device)?;
        let join = |name: &str| -> Result<Tensor, PipelineError> {
            let (prob, reg) = (
                p.get(&format!("conv4_1.{name}"))?,
                p.get(&format!("conv4_2.{name}"))?,
            );
            Tensor::f_cat(&[prob, reg], 0).map_err(|e| {
                PipelineError::FaceCrop(format!(
                    "cannot join the P-Net heads of {}: {}",
                    dir.display(),
                    crate::vocab::error::torch_message(&e)
                ))
            })
        };
        Ok(Nets {
            pnet: PNet {
                c1: ConvPrelu::new(&p, "conv1", "prelu1")?,
                c2: ConvPrelu::new(&p, "conv2", "prelu2")?,
                c3: ConvPrelu::new(&p, "conv3", "prelu3")?,
                heads: Heads {
                    w: join("weight")?,
                    b: join("bias")?,
                },
            },
            rnet: RNet {
                c1: ConvPrelu::new(&r, "conv1", "prelu1")?,
                c2: ConvPrelu::new(&r, "conv2", "prelu2")?,
                c3: ConvPrelu::new(&r, "conv3", "prelu3")?,
                d4: Dense::new(&r, "dense4")?,
                a4: r.get("prelu4.weight")?.shallow_clone(),
                prob: Dense::new(&r, "dense5_1")?,
                reg: Dense::new(&r, "dense5_2")?,
            },
            onet: ONet {
                c1: ConvPrelu::new(&o, "conv1", "prelu1")?,
                c2: ConvPrelu::new(&o, "conv2", "prelu2")?,
                c3: ConvPrelu::new(&o, "conv3", "prelu3")?,
                c4: ConvPrelu::new(&o, "conv4", "prelu4")?,
                d5: Dense::new(&o, "dense5")?,
                a5: o.get("prelu5.weight")?.shallow_clone(),
                prob: Dense::new(&o, "dense6_1")?,
                reg: Dense::new(&o, "dense6_2")?,
                marks: Dense::new(&o, "dense6_3")?,
            },
            device,
        })
    }
}

impl PNet {
    /// `x`: N x 3 x H x W, normalised. Returns (face probability N x H' x W', box
    /// regression N x 4 x H' x W').
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let x = self.c1.forward(x)?;
        let x = pool(&x, 2, 2)?;
        let x = self.c2.forward(&x)?;
        let x = self.c3.forward(&x)?;
        let h = &self.heads;
        let y = x.f_conv2d(&h.w, Some(&h.b), [1, 1], [0, 0], [1, 1], 1)?;
        let prob = y
            .f_narrow(1, 0, 2)?
            .f_softmax(1, Kind::Float)?
            .f_select(1, 1)?;
        let reg = y.f_narrow(1, 2, 4)?;
        Ok((prob, reg))
    }
}

impl RNet {
    /// `x`: N x 3 x 24 x 24, normalised. Returns (probability N, regression N x 4).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let x = self.c1.forward(x)?;
        let x = pool(&x, 3, 2)?;
        let x = self.c2.forward(&x)?;
        let x = pool(&x, 3, 2)?;
        let x = self.c3.forward(&x)?;
        let n = x.size()[0];
        let x = x.f_permute([0, 3, 2, 1])?.f_contiguous()?.f_view([n, -1])?;
        let x = self.d4.forward(&x)?.f_prelu(&self.a4)?;
        let prob = self
            .prob
            .forward(&x)?
            .f_softmax(1, Kind::Float)?
            .f_select(1, 1)?;
        Ok((prob, self.reg.forward(&x)?))
    }
}

impl ONet {
    /// `x`: N x 3 x 48 x 48, normalised. Returns (probability N, regression N x 4,
    /// landmarks N x 10 as x1..x5, y1..y5 relative to the box).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor), TchError> {
        let x = self.c1.forward(x)?;
        let x = pool(&x, 3, 2)?;
        let x = self.c2.forward(&x)?;
        let x = pool(&x, 3, 2)?;
        let x = self.c3.forward(&x)?;
        let x = pool(&x, 2, 2)?;
        let x = self.c4.forward(&x)?;
        let n = x.size()[0];
        let x = x.f_permute([0, 3, 2, 1])?.f_contiguous()?.f_view([n, -1])?;
        let x = self.d5.forward(&x)?.f_prelu(&self.a5)?;
        let prob = self
            .prob
            .forward(&x)?
            .f_softmax(1, Kind::Float)?
            .f_select(1, 1)?;
        Ok((prob, self.reg.forward(&x)?, self.marks.forward(&x)?))
    }
}
