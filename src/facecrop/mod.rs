//! The built-in F2P face crop: the `detect` stage between decode and fit.
//!
//! For each decoded photo it finds faces with MTCNN ([`detect`], [`nets`], [`nms`]) on
//! a working copy scaled down to `detect_size` (so detection costs the same for a 2 and
//! a 40 megapixel photo), picks one (`select`), and sets the item's `region` to a square
//! around it with `margin`, in original-image pixels. The fit stage then crops that
//! square from the full-resolution frame and resizes it to `[preprocess] size`; a square
//! reaching past the image border is padded with `pad_color` (never shifted or shrunk,
//! so the face stays centred at the same scale). A JSON sidecar (box, landmarks, score,
//! crop, source size) rides on the item and is written beside the output.
//!
//! Photos without a face fail with reason `no face found`, or pass through uncropped
//! with `on_no_face = "pass"`. Frames are taken in small batches (whatever arrives
//! within a few milliseconds) so R-Net and O-Net, and P-Net for same-sized photos, run
//! once for several images.

pub mod detect;
pub mod nets;
pub mod nms;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fast_image_resize as fir;
use serde_json::json;

use crate::config::{Config, FaceCropConfig, FaceSelect, NoFacePolicy};
use crate::error::{ItemError, PipelineError, Stage, torch_message};
use crate::pipeline::item::{Frame, Outcome, Region};
use crate::pipeline::telemetry::{Telemetry, Timer};
use crate::pipeline::{Decoded, MiddleStage};
use crate::runtime::to_device;
use detect::{Face, WorkImage};
use nets::Nets;

/// Most photos detected together.
const MAX_BATCH: usize = 8;
/// How long the stage waits for more photos once it holds one: short, because a batch
/// saves little on a CPU and must never add visible latency.
const BATCH_WAIT: Duration = Duration::from_millis(3);

/// The reason given for a photo in which no face is found.
pub const NO_FACE: &str = "no face found";

/// A face in original-image pixels, with the square to crop around it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundFace {
    pub bbox: [f32; 4],
    pub score: f32,
    pub landmarks: [[f32; 2]; 5],
    pub crop: Region,
}

/// The detector and its settings: loaded once, used by the detect thread.
pub struct FaceCropper {
    nets: Nets,
    cfg: FaceCropConfig,
    resizer: fir::Resizer,
}

impl FaceCropper {
    /// Load the MTCNN weights on the configured device.
    pub fn new(cfg: &FaceCropConfig) -> Result<FaceCropper, PipelineError> {
        let device = to_device(cfg.device);
        let nets = Nets::load(&cfg.weights, device)?;
        Ok(FaceCropper {
            nets,
            cfg: cfg.clone(),
            resizer: fir::Resizer::new(),
        })
    }

    /// The working copy of `frame` the detector sees, and the factors from its pixels to
    /// original-image pixels.
    fn working(&mut self, frame: &Frame) -> Result<(WorkImage, f64, f64), String> {
        let (fw, fh) = (frame.width, frame.height);
        let limit = self.cfg.detect_size as f64;
        let s = (limit / fw.max(fh) as f64).min(1.0);
        let ww = ((fw as f64 * s).round() as u32).max(1);
        let wh = ((fh as f64 * s).round() as u32).max(1);
        let pixels = if (ww, wh) == (fw, fh) {
            frame.pixels[..fw as usize * fh as usize * 3].to_vec()
        } else {
            let src = fir::images::ImageRef::new(fw, fh, &frame.pixels, fir::PixelType::U8x3)
                .map_err(|e| format!("working image: {e}"))?;
            let mut dst = fir::images::Image::new(ww, wh, fir::PixelType::U8x3);
            // A box filter averages every source pixel under the target one: the
            // "area" resampling MTCNN's own pyramid uses.
            let opts = fir::ResizeOptions::new()
                .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Box));
            self.resizer
                .resize(&src, &mut dst, &opts)
                .map_err(|e| format!("working image: {e}"))?;
            dst.into_vec()
        };
        let kx = frame.orig_width as f64 / ww as f64;
        let ky = frame.orig_height as f64 / wh as f64;
        // min_face is in original pixels; P-Net cannot see a face under 12 working pixels.
        let min_face = (self.cfg.min_face as f64 / kx.max(ky)).max(12.0);
        let im = WorkImage {
            width: ww as usize,
            height: wh as usize,
            pixels,
            min_face,
        };
        Ok((im, kx, ky))
    }

    /// Detect faces in a batch of frames. Per frame: every face found (original-image
    /// pixels, best score first), or why detection failed.
    pub fn detect(&mut self, frames: &[&Frame]) -> Vec<Result<Vec<FoundFace>, String>> {
        let mut out: Vec<Result<Vec<FoundFace>, String>> = Vec::with_capacity(frames.len());
        let mut work = Vec::new();
        let mut scale = Vec::new();
        let mut slot = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            match self.working(f) {
                Ok((im, kx, ky)) => {
                    work.push(im);
                    scale.push((kx as f32, ky as f32));
                    slot.push(i);
                    out.push(Ok(Vec::new()));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if work.is_empty() {
            return out;
        }
        match detect::detect(&self.nets, &work, self.cfg.thresholds) {
            Ok(found) => {
                for ((faces, (kx, ky)), i) in found.into_iter().zip(scale).zip(slot) {
                    out[i] = Ok(faces
                        .into_iter()
                        .map(|f| to_original(&f, kx, ky, self.cfg.margin))
                        .collect());
                }
            }
            Err(e) => {
                let reason = format!("face detector failed: {}", torch_message(&e));
                for i in slot {
                    out[i] = Err(reason.clone());
                }
            }
        }
        out
    }
}

/// Scale a working-image face to original pixels and add its crop square.
fn to_original(f: &Face, kx: f32, ky: f32, margin: f32) -> FoundFace {
    let b = [
        f.bbox[0] * kx,
        f.bbox[1] * ky,
        f.bbox[2] * kx,
        f.bbox[3] * ky,
    ];
    let landmarks = f.landmarks.map(|[x, y]| [x * kx, y * ky]);
    FoundFace {
        bbox: b,
        score: f.score,
        landmarks,
        crop: crop_square(b, margin),
    }
}

/// The square crop around a face box: side = the box's longer side times
/// `1 + 2 * margin` (each side gains `margin` times the box), centred on the box. It may
/// reach past the image; the fit stage pads that part.
pub fn crop_square(b: [f32; 4], margin: f32) -> Region {
    let side = (b[2] - b[0]).max(b[3] - b[1]) * (1.0 + 2.0 * margin);
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    Region {
        x0: cx - side / 2.0,
        y0: cy - side / 2.0,
        x1: cx + side / 2.0,
        y1: cy + side / 2.0,
    }
}

/// The face `select` keeps: the largest box, or the highest score.
pub fn choose(faces: &[FoundFace], select: FaceSelect) -> Option<&FoundFace> {
    let area = |f: &FoundFace| (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]);
    match select {
        FaceSelect::Largest => faces.iter().max_by(|a, b| area(a).total_cmp(&area(b))),
        FaceSelect::MostConfident => faces.iter().max_by(|a, b| a.score.total_cmp(&b.score)),
    }
}

/// The sidecar written beside the output: what was found and what was cropped, in
/// original-image pixels.
pub fn sidecar(frame: &Frame, faces: usize, face: Option<&FoundFace>) -> serde_json::Value {
    let r1 = |v: f32| (v as f64 * 10.0).round() / 10.0;
    let face_json = face.map(|f| {
        let [l, r, n, ml, mr] = f.landmarks.map(|[x, y]| json!([r1(x), r1(y)]));
        json!({
            "box": f.bbox.map(r1),
            "score": (f.score as f64 * 1e6).round() / 1e6,
            "landmarks": {
                "left_eye": l, "right_eye": r, "nose": n,
                "mouth_left": ml, "mouth_right": mr,
            },
            "crop": [r1(f.crop.x0), r1(f.crop.y0), r1(f.crop.x1), r1(f.crop.y1)],
        })
    });
    json!({
        "source": { "width": frame.orig_width, "height": frame.orig_height },
        "faces_found": faces,
        "face": face_json,
    })
}

/// The detect stage for the pipeline, when `[face_crop]` is configured. Loads the
/// weights now, so a missing or broken weights file fails the start, not the first photo.
pub fn middle_stage(cfg: &Config) -> Result<Option<MiddleStage>, PipelineError> {
    let Some(fc) = &cfg.face_crop else {
        return Ok(None);
    };
    let cropper = FaceCropper::new(fc)?;
    Ok(Some(MiddleStage {
        frames_held: MAX_BATCH,
        run: Box::new(move |rx, tx, out, tel| run_stage(cropper, rx, tx, out, tel)),
    }))
}

/// The stage loop: batch what is waiting, detect, annotate or reject, forward.
fn run_stage(
    mut cropper: FaceCropper,
    rx: Receiver<Decoded>,
    tx: Sender<Decoded>,
    out: Sender<Outcome>,
    tel: Arc<Telemetry>,
) {
    tel.set_threads(Stage::Detect, 1);
    let (select, policy) = (cropper.cfg.select, cropper.cfg.on_no_face);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + BATCH_WAIT;
        while batch.len() < MAX_BATCH {
            match rx.recv_deadline(deadline) {
                Ok(d) => batch.push(d),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let t = Timer::start();
        let frames: Vec<&Frame> = batch.iter().map(|(_, f)| f).collect();
        let results = cropper.detect(&frames);
        tel.record(Stage::Detect, t.elapsed(), batch.len() as u64);
        for ((mut item, frame), r) in batch.into_iter().zip(results) {
            let reason = match r {
                Ok(faces) => match choose(&faces, select) {
                    Some(face) => {
                        item.region = Some(face.crop);
                        item.sidecar = Some(sidecar(&frame, faces.len(), Some(face)));
                        None
                    }
                    None if policy == NoFacePolicy::Pass => {
                        item.region = None;
                        item.sidecar = Some(sidecar(&frame, 0, None));
                        None
                    }
                    None => Some(NO_FACE.to_string()),
                },
                Err(reason) => Some(reason),
            };
            match reason {
                None => {
                    if tx.send((item, frame)).is_err() {
                        return;
                    }
                }
                Some(reason) => {
                    drop(frame);
                    tel.failed(Stage::Detect);
                    let err = ItemError::new(&item.path, Stage::Detect, reason);
                    let _ = out.send(Outcome {
                        item,
                        result: Err(err),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(b: [f32; 4], score: f32) -> FoundFace {
        FoundFace {
            bbox: b,
            score,
            landmarks: [[0.0; 2]; 5],
            crop: crop_square(b, 0.0),
        }
    }

    #[test]
    fn crop_is_a_centred_square_with_margin() {
        let r = crop_square([10.0, 20.0, 30.0, 60.0], 0.5);
        // Longer side 40, times 2: an 80 x 80 square around (20, 40).
        assert_eq!(
            r,
            Region {
                x0: -20.0,
                y0: 0.0,
                x1: 60.0,
                y1: 80.0
            }
        );
    }

    #[test]
    fn select_largest_or_most_confident() {
        let f = vec![
            face([0.0, 0.0, 10.0, 10.0], 0.99),
            face([0.0, 0.0, 50.0, 50.0], 0.90),
        ];
        assert_eq!(choose(&f, FaceSelect::Largest).unwrap().score, 0.90);
        assert_eq!(choose(&f, FaceSelect::MostConfident).unwrap().score, 0.99);
        assert!(choose(&[], FaceSelect::Largest).is_none());
    }
}
