//! The built-in F2P face crop: the `detect` stage between decode and fit.
//!
//! For each decoded photo it finds faces with MTCNN ([`detect`], [`nets`], [`nms`]) in
//! two passes. The coarse pass runs the whole cascade on a copy scaled down to
//! `detect_size` (so finding faces costs about the same for a 2 and a 40 megapixel
//! photo). The fine pass re-runs it on the photo itself (or a copy at `refine_size`)
//! only around each face found and only at the pyramid scales for that face's size, which
//! reproduces the boxes of MTCNN on the whole full-resolution photo (what users compare
//! against) without paying for the large pyramid levels, which only find small faces.
//! It then picks one face (`select`) and sets the item's `region` to a square around it
//! with `margin`, in original-image pixels. The fit stage crops that square from the
//! full-resolution frame and resizes it to `[preprocess] size`; a square reaching past the
//! image border is padded with `pad_color` (never shifted or shrunk, so the face stays
//! centred at the same scale). A JSON sidecar (box, landmarks, score, crop, source size)
//! rides on the item and is written beside the output.
//!
//! Photos without a face fail with reason `no face found`, or pass through uncropped
//! with `on_no_face = "pass"`. The stage runs `[pipeline] detect_threads` workers; each
//! takes small batches (whatever arrives within a few milliseconds) so R-Net and O-Net of
//! the coarse pass, and P-Net for same-sized photos, run once for several images.

pub mod detect;
pub mod nets;
pub mod nms;

use std::time::Duration;

use fast_image_resize as fir;
use serde_json::json;

use crate::config::{Config, DeviceChoice, FaceCropConfig, FaceSelect, NoFacePolicy, WARN_UPSCALE};
use crate::vocab::error::{PipelineError, Stage, StageError, torch_message};
use crate::vocab::item::{Frame, Item, Region};
use crate::vocab::stage::StageWorker;
use detect::{Face, WorkImage};
use nets::Nets;

/// Most photos a worker detects together on a GPU, where one call for several photos
/// saves launches and transfers.
const MAX_BATCH: usize = 8;
/// The same on the CPU, where a batch saves little (P-Net batches only photos of the same
/// size) and every photo held is a full-resolution frame (12 MiB at 2048 px).
const MAX_BATCH_CPU: usize = 2;
/// How long the stage waits for more photos once it holds one: short, because a batch
/// saves little on a CPU and must never add visible latency.
const BATCH_WAIT: Duration = Duration::from_millis(3);

/// How much lower than the configured R-Net and O-Net thresholds the coarse pass's are,
/// when a fine pass follows. The coarse pass only proposes: the fine pass applies the
/// configured thresholds on the full-resolution photo, so a lower bar here cannot add a
/// face that full-resolution MTCNN would reject, while it keeps faces that score just
/// above the bar at full resolution and just below it on the small copy (on a second
/// reference set, seed 11: one such face of 81 was missed with no slack, none with this).
/// P-Net's threshold stays: lowering it multiplies R-Net's work.
const COARSE_SLACK: [f32; 2] = [0.2, 0.4];

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
    /// The longer side of `[preprocess] size`: what each crop is resized to.
    output_side: u32,
    resizer: fir::Resizer,
    /// The coarse pass's integral images, one per photo of a batch, reused.
    ints: Vec<detect::Integral>,
    /// The fine pass's integral image, reused.
    fine: detect::Integral,
    /// Pixel buffers of working copies, reused from photo to photo.
    spare: Vec<Vec<u8>>,
    /// The thread last set up by [`FaceCropper::enter_thread`].
    thread: Option<std::thread::ThreadId>,
}

impl FaceCropper {
    /// Load the MTCNN weights on the configured device.
    /// Load the MTCNN weights on the configured device; crops will be resized to
    /// `output_side` (the longer side of `[preprocess] size`).
    pub fn new(cfg: &FaceCropConfig, output_side: u32) -> Result<FaceCropper, PipelineError> {
        let device = cfg.device.tch();
        let nets = Nets::load(&cfg.weights, device)?;
        Ok(FaceCropper {
            nets,
            cfg: cfg.clone(),
            output_side,
            resizer: fir::Resizer::new(),
            ints: Vec::new(),
            fine: detect::Integral::default(),
            spare: Vec::new(),
            thread: None,
        })
    }

    /// Whether the detector runs on the CPU.
    pub fn on_cpu(&self) -> bool {
        self.nets.device == tch::Device::Cpu
    }

    /// On the CPU, make the calling thread run libtorch on one thread, once per thread.
    /// MTCNN is many small operations (P-Net on a window, R-Net on a few dozen crops),
    /// whose parallel regions are short and wait at each barrier for the slowest thread,
    /// which on a busy machine is often descheduled behind a decoder; detectors on
    /// threads of their own, one thread each, do not wait for each other (on 2 cores:
    /// 2 workers x 1 thread 23.6 images/s, 1 x 2 about 15; BENCHMARKS.md, face crop).
    fn enter_thread(&mut self) {
        let me = std::thread::current().id();
        if self.on_cpu() && self.thread != Some(me) {
            crate::runtime::cuda::set_local_threads(1);
            self.thread = Some(me);
        }
    }

    /// Whether photos larger than the coarse copy get the fine pass.
    fn fine_pass(&self) -> bool {
        self.cfg.refine_size > self.cfg.detect_size
    }

    /// A copy of `frame` whose longer side is at most `limit` (None: the frame is no
    /// larger, use it as it is), with its size. A box filter averages every source pixel
    /// under the target one: the "area" resampling MTCNN's own pyramid uses.
    fn scaled(&mut self, frame: &Frame, limit: u32) -> Result<Option<(Vec<u8>, u32, u32)>, String> {
        let (fw, fh) = (frame.width, frame.height);
        let s = (limit as f64 / fw.max(fh) as f64).min(1.0);
        let ww = ((fw as f64 * s).round() as u32).max(1);
        let wh = ((fh as f64 * s).round() as u32).max(1);
        if (ww, wh) == (fw, fh) {
            return Ok(None);
        }
        let src = fir::images::ImageRef::new(fw, fh, &frame.pixels, fir::PixelType::U8x3)
            .map_err(|e| format!("working image: {e}"))?;
        let buf = self.buffer(ww as usize * wh as usize * 3);
        let mut dst = fir::images::Image::from_vec_u8(ww, wh, buf, fir::PixelType::U8x3)
            .map_err(|e| format!("working image: {e}"))?;
        let opts =
            fir::ResizeOptions::new().resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Box));
        self.resizer
            .resize(&src, &mut dst, &opts)
            .map_err(|e| format!("working image: {e}"))?;
        Ok(Some((dst.into_vec(), ww, wh)))
    }

    /// A pixel buffer of `n` bytes, reused from an earlier photo when there is one.
    fn buffer(&mut self, n: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.resize(n, 0);
        b
    }

    /// Keep a buffer for a later photo (a few: as many as a batch uses).
    fn recycle(&mut self, b: Vec<u8>) {
        if self.spare.len() < 2 * MAX_BATCH {
            self.spare.push(b);
        }
    }

    /// The coarse pass's working copy of `frame` (the frame itself when it is no larger
    /// than `detect_size`: then `None` for the pixels), and its size.
    fn working(&mut self, frame: &Frame) -> Result<(WorkImage, bool), String> {
        let (pixels, ww, wh, copied) = match self.scaled(frame, self.cfg.detect_size)? {
            Some((p, w, h)) => (p, w, h, true),
            None => {
                let n = frame.width as usize * frame.height as usize * 3;
                let mut b = self.buffer(0);
                b.extend_from_slice(&frame.pixels[..n]);
                (b, frame.width, frame.height, false)
            }
        };
        let k = frame.orig_width.max(frame.orig_height) as f64 / ww.max(wh) as f64;
        let t = self.cfg.thresholds;
        // Only where a fine pass follows (on a copy) is the coarse pass a proposal.
        let thresholds = if copied && self.fine_pass() {
            [t[0], t[1] - COARSE_SLACK[0], t[2] - COARSE_SLACK[1]].map(|v| v.max(0.0))
        } else {
            t
        };
        let im = WorkImage {
            width: ww as usize,
            height: wh as usize,
            pixels,
            min_face: min_face_in(self.cfg.min_face, k),
            thresholds,
        };
        Ok((im, copied))
    }

    /// Detect faces in a batch of frames. Per frame: every face found (original-image
    /// pixels, best score first), or why detection failed.
    ///
    /// Two passes. The coarse one runs the whole cascade on copies at `detect_size`: it
    /// decides where faces are, at a quarter of the cost of twice the resolution. The fine
    /// one re-detects each face found on the photo itself (or a copy at `refine_size`),
    /// around the face and on the pyramid levels for its size only ([`detect::refine`]),
    /// so the box, score and landmarks are those of a full-resolution MTCNN, which is
    /// what users compare against and what the crop is cut from.
    pub fn detect(&mut self, frames: &[&Frame]) -> Vec<Result<Vec<FoundFace>, String>> {
        self.enter_thread();
        let mut out: Vec<Result<Vec<FoundFace>, String>> = Vec::with_capacity(frames.len());
        let mut work = Vec::new();
        let mut copied = Vec::new();
        let mut slot = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            match self.working(f) {
                Ok((im, c)) => {
                    work.push(im);
                    copied.push(c);
                    slot.push(i);
                    out.push(Ok(Vec::new()));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if work.is_empty() {
            return out;
        }
        let coarse = match detect::detect(&self.nets, &work, &mut self.ints) {
            Ok(found) => found,
            Err(e) => {
                let reason = detector_failed(&e);
                for i in slot {
                    out[i] = Err(reason.clone());
                }
                return out;
            }
        };
        let fine = self.fine_pass();
        for (k, (faces, im)) in coarse.into_iter().zip(&work).enumerate() {
            let (i, frame) = (slot[k], frames[slot[k]]);
            // No face, or the coarse copy was the photo itself: the coarse pass was the
            // whole-resolution cascade already.
            let r = if faces.is_empty() || !copied[k] || !fine {
                Ok((faces, im.width as f32, im.height as f32))
            } else {
                self.refine(frame, im, &faces)
            };
            out[i] = r.map(|(faces, vw, vh)| {
                let kx = frame.orig_width as f32 / vw;
                let ky = frame.orig_height as f32 / vh;
                faces
                    .iter()
                    .map(|f| to_original(f, kx, ky, self.cfg.margin))
                    .collect()
            });
        }
        for im in work {
            self.recycle(im.pixels);
        }
        out
    }

    /// The fine pass on one frame, seeded with the coarse pass's `faces` (in `im`'s
    /// pixels). Returns the faces in the pixels of the image it ran on, and its size.
    fn refine(
        &mut self,
        frame: &Frame,
        im: &WorkImage,
        faces: &[detect::Face],
    ) -> Result<(Vec<detect::Face>, f32, f32), String> {
        let copy = self.scaled(frame, self.cfg.refine_size)?;
        let view = match &copy {
            Some((p, w, h)) => detect::View {
                width: *w as usize,
                height: *h as usize,
                pixels: p,
            },
            None => detect::View {
                width: frame.width as usize,
                height: frame.height as usize,
                pixels: &frame.pixels[..frame.width as usize * frame.height as usize * 3],
            },
        };
        let r = view.width as f32 / im.width as f32;
        let seeds: Vec<[f32; 4]> = faces.iter().map(|f| f.bbox.map(|v| v * r)).collect();
        let kv =
            frame.orig_width.max(frame.orig_height) as f64 / view.width.max(view.height) as f64;
        let found = detect::refine(
            &self.nets,
            view,
            &seeds,
            min_face_in(self.cfg.min_face, kv),
            self.cfg.thresholds,
            &mut self.fine,
        );
        let (vw, vh) = (view.width as f32, view.height as f32);
        if let Some((p, _, _)) = copy {
            self.recycle(p);
        }
        Ok((found.map_err(|e| detector_failed(&e))?, vw, vh))
    }
}

/// The reason a photo fails when libtorch fails in the detector (its first line).
fn detector_failed(e: &tch::TchError) -> String {
    format!("face detector failed: {}", torch_message(e))
}

/// `min_face` (original pixels) in the pixels of a copy `k` times smaller: P-Net cannot
/// see a face under 12 of them.
fn min_face_in(min_face: u32, k: f64) -> f64 {
    (min_face as f64 / k).max(12.0)
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

/// The detect workers for the pipeline, when `[face_crop]` is configured: `[pipeline]
/// detect_threads` of them, each with its own detector. Loads the weights now, so a
/// missing or broken weights file fails the start, not the first photo.
///
/// On the CPU each worker runs libtorch on one thread (see [`FaceCropper::detect`]).
pub fn workers(cfg: &Config) -> Result<Vec<FaceCropper>, PipelineError> {
    let Some(fc) = &cfg.face_crop else {
        return Ok(Vec::new());
    };
    (0..cfg.pipeline.detect_threads)
        .map(|_| FaceCropper::new(fc, cfg.preprocess.width.max(cfg.preprocess.height)))
        .collect()
}

/// Most photos one detect worker takes at a time on `fc`'s device.
pub fn worker_batch(fc: &FaceCropConfig) -> usize {
    if fc.device == DeviceChoice::Cpu {
        MAX_BATCH_CPU
    } else {
        MAX_BATCH
    }
}

impl FaceCropper {
    /// How many times the face's crop is enlarged to the output, in its sidecar (`face
    /// .upscale`); past `max_upscale` the photo fails, past [`WARN_UPSCALE`] the sidecar
    /// (`warnings`) and the log say the result will be soft.
    fn check_upscale(
        &self,
        item: &Item,
        face: &FoundFace,
        side: &mut serde_json::Value,
    ) -> Result<(), StageError> {
        let crop = (face.crop.x1 - face.crop.x0).max(1.0);
        let up = self.output_side as f32 / crop;
        side["face"]["upscale"] = json!((up as f64 * 100.0).round() / 100.0);
        let what = format!(
            "the face's crop is {crop:.0} px, enlarged {up:.1}x to {} px",
            self.output_side
        );
        if let Some(max) = self.cfg.max_upscale
            && up > max
        {
            return Err(StageError::BadInput(format!(
                "the face is too small for the output: {what}, over face_crop.max_upscale ({max})"
            )));
        }
        if up > WARN_UPSCALE {
            tracing::warn!(file = ?item.path, upscale = format!("{up:.1}"), "{what}: the result will be soft");
            side["warnings"] = json!([format!(
                "{what}: the result will be soft (face_crop.max_upscale refuses such photos)"
            )]);
        }
        Ok(())
    }
}

/// The detect stage: batch what is waiting, detect, then annotate each item (`region`,
/// `sidecar`) or reject it.
impl StageWorker for FaceCropper {
    type In = Frame;
    type Out = Frame;

    fn stage(&self) -> Stage {
        Stage::Detect
    }

    fn batching(&self) -> (usize, Duration) {
        (worker_batch(&self.cfg), BATCH_WAIT)
    }

    fn process(&mut self, item: &mut Item, frame: Frame) -> Result<Frame, StageError> {
        let mut out = Vec::with_capacity(1);
        self.process_batch(std::slice::from_mut(item), &mut vec![frame], &mut out);
        out.pop().expect("one result per item")
    }

    fn process_batch(
        &mut self,
        items: &mut [Item],
        frames: &mut Vec<Frame>,
        out: &mut Vec<Result<Frame, StageError>>,
    ) {
        let (select, policy) = (self.cfg.select, self.cfg.on_no_face);
        let found = {
            let refs: Vec<&Frame> = frames.iter().collect();
            self.detect(&refs)
        };
        for ((item, frame), r) in items.iter_mut().zip(frames.drain(..)).zip(found) {
            let faces = match r {
                Ok(faces) => faces,
                Err(reason) => {
                    out.push(Err(StageError::Failed(reason)));
                    continue;
                }
            };
            match choose(&faces, select) {
                Some(face) => {
                    let mut side = sidecar(&frame, faces.len(), Some(face));
                    if let Err(e) = self.check_upscale(item, face, &mut side) {
                        out.push(Err(e));
                        continue;
                    }
                    item.region = Some(face.crop);
                    item.sidecar = Some(side);
                }
                None if policy == NoFacePolicy::Pass => {
                    item.region = None;
                    item.sidecar = Some(sidecar(&frame, 0, None));
                }
                None => {
                    out.push(Err(StageError::BadInput(NO_FACE.to_string())));
                    continue;
                }
            }
            out.push(Ok(frame));
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
