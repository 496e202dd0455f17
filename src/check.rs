//! `hotpipe check`: validate the config, load the model on its device(s), run one dummy
//! batch of the configured size, and describe what was found. It is what an operator runs
//! after editing `pipeline.toml`, before restarting the service.

use std::fmt::Write as _;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::runtime::plan::RuntimePlan;
use crate::vocab::device::cuda_device_count;
use crate::vocab::error::{PipelineError, torch_message};

pub fn check(cfg: &Config) -> Result<String, PipelineError> {
    let mut out = String::new();
    let _ = writeln!(out, "config: {} (valid)", cfg.source);
    let _ = writeln!(out, "cuda devices: {}", cuda_device_count());
    let p = &cfg.preprocess;
    let _ = writeln!(
        out,
        "input: {} x {} ({:?} fit, {:?} filter)",
        p.width, p.height, p.fit, p.filter
    );
    let _ = writeln!(
        out,
        "encode: {:?}, quality {}",
        cfg.encode.format, cfg.encode.quality
    );
    if let Some(fc) = &cfg.face_crop {
        let fine = if fc.refine_size > fc.detect_size {
            format!(
                "then around each face on the photo (at most {} px)",
                fc.refine_size
            )
        } else {
            "fine pass off".to_string()
        };
        let _ = writeln!(
            out,
            "face crop: weights {} on {}, {} detect workers; faces searched on a {} px copy, {fine}; smallest face found: {} px or {:.1}% of the photo's longer side, whichever is larger",
            fc.weights.display(),
            fc.device,
            cfg.pipeline.detect_threads,
            fc.detect_size,
            fc.min_face,
            1200.0 / fc.detect_size as f64,
        );
        crate::facecrop::workers(cfg)?;
    }
    let Some(m) = &cfg.model else {
        let _ = writeln!(out, "model: none (fitted images are encoded as they are)");
        return Ok(out);
    };
    // The plan the pipeline would run: the same model copies and the same batch size
    // (`max_batch = "auto"` included) as `process`, `run` and `bench`.
    let plan = RuntimePlan::load(cfg)?;
    let batch = plan.max_batch;
    let mut shown = Vec::new();
    for model in &plan.models {
        // CPU workers are copies of one model on one device: describe it once.
        let dev = model.device();
        if shown.contains(&dev) {
            continue;
        }
        shown.push(dev);
        let _no_grad = tch::no_grad_guard();
        let x = Tensor::zeros(
            [batch as i64, p.height as i64, p.width as i64, 3],
            (Kind::Uint8, dev),
        );
        let t = Instant::now();
        let y = model.forward_u8(&x).map_err(|e| PipelineError::Model {
            path: m.path.clone(),
            message: format!("dummy batch of {batch} failed: {}", torch_message(&e)),
        })?;
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (oh, ow) = model.output_hw();
        let d = match dev {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".to_string(),
        };
        let _ = writeln!(out, "model: {}", m.path.display());
        let _ = writeln!(out, "  device: {d}, precision {:?}", model.kind());
        let _ = writeln!(
            out,
            "  input:  N x 3 x {} x {} float in [0, 1]",
            p.height, p.width
        );
        let _ = writeln!(out, "  output: N x 3 x {oh} x {ow}");
        let _ = writeln!(
            out,
            "  batch: {batch} (dummy batch ran in {ms:.1} ms, output {:?})",
            y.size()
        );
    }
    Ok(out)
}
