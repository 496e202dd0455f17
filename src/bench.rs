//! `hotpipe bench`: what this machine can do with this config, stage by stage.
//!
//! Each stage runs alone on the folder's images, with the thread count the config gives
//! it, for at least `--seconds` (and at least one pass over the folder):
//!
//! - **read+decode+fit**: each file mapped by the read stage (from the page cache after
//!   the first pass, so the disk itself is hardly measured), decoded and resized into a
//!   row as the pipeline does; once with DCT-scaled JPEG decoding disabled and, where
//!   the config lets the pipeline use it (not with the face crop, which needs every
//!   pixel), once enabled, on one thread (what the scaling buys on this data), then
//!   with `pipeline.decode_threads` threads;
//! - **face detect** (with `[face_crop]`): both MTCNN passes on decoded frames, with
//!   `pipeline.detect_threads` workers set up as the pipeline sets them up;
//! - **inference**: batches of `max_batch` fitted images, on the first configured device;
//! - **encode**: the model's outputs, with `pipeline.encode_threads` threads;
//!
//! then the whole pipeline (`process` into a temporary folder, files read from disk),
//! counting the images it made (a failure, such as a photo without a face, is cheap and
//! would inflate the rate). Files that cannot be read or decoded are left out of every
//! measurement and listed with their reasons.
//! The stage with the lowest rate alone bounds the pipeline; on a CPU-only machine the
//! stages also share the cores, so the report gives that ceiling as well (the per-image
//! CPU time of all stages together, over the core count).
//!
//! The report is a table for a person ([`BenchReport`]'s `Display`) or one JSON object
//! for a script ([`BenchReport::to_json`]), each stage under its own key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use crate::config::Config;
use crate::runtime::model::Model;
use crate::runtime::plan::RuntimePlan;
use crate::stages::decode::{Decoder, ScaleTarget};
use crate::stages::encode::Encoder;
use crate::stages::fit::Fitter;
use crate::stages::read::read_input;
use crate::vocab::error::{PipelineError, torch_message};
use crate::vocab::item::Frame;
use crate::vocab::pool::BufPool;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot list the inputs: {0}")]
    Inputs(String),
    #[error("no decodable images in {0} (the first failure: {1})")]
    NoImages(PathBuf, String),
    #[error("face detection failed while benchmarking: {0}")]
    Detect(String),
    #[error("inference failed while benchmarking: {0}")]
    Infer(String),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// How long to run each stage, and whether to run the whole pipeline too.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub min_time: Duration,
    pub pipeline: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            min_time: Duration::from_secs(2),
            pipeline: true,
        }
    }
}

/// One measured line.
#[derive(Debug, Clone)]
pub struct Rate {
    pub name: String,
    pub threads: usize,
    pub images: usize,
    pub elapsed: Duration,
}

impl Rate {
    pub fn images_per_s(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Thread-time per image: what one image costs one worker, in milliseconds.
    pub fn ms_per_image(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e3 * self.threads as f64 / self.images.max(1) as f64
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "threads": self.threads,
            "images": self.images,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "images_per_s": self.images_per_s(),
            "ms_per_image_per_thread": self.ms_per_image(),
        })
    }
}

/// Everything `hotpipe bench` measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub images: usize,
    /// Files of the folder left out (they do not read or decode), with why.
    pub skipped: Vec<(PathBuf, String)>,
    pub cores: usize,
    /// The model file (`None` without `[model]`) and the devices it is configured on.
    pub model: Option<PathBuf>,
    pub devices: Vec<String>,
    /// Images per DCT scale (index M - 1: decoded at M/8; index 7: full decode).
    pub scales: [usize; 8],
    pub decode_fit_full: Rate,
    /// `None` when the pipeline would not scale (the face crop, `dct_scaling = "off"`).
    pub decode_fit_scaled: Option<Rate>,
    pub decode_fit: Rate,
    /// The face crop's detect stage, with whether it ran on the CPU.
    pub detect: Option<(Rate, bool)>,
    pub infer: Option<Rate>,
    pub encode: Rate,
    /// The whole pipeline's rate over the images it made, and how many failed.
    pub pipeline: Option<(Rate, usize)>,
}

impl BenchReport {
    /// The stage with the lowest rate when each runs alone with its own threads.
    pub fn bound(&self) -> &Rate {
        let mut stages = vec![&self.decode_fit, &self.encode];
        stages.extend(self.detect.as_ref().map(|(r, _)| r));
        stages.extend(self.infer.as_ref());
        stages
            .into_iter()
            .min_by(|a, b| a.images_per_s().total_cmp(&b.images_per_s()))
            .expect("at least two stages")
    }

    /// Images/s the cores allow when every CPU stage shares them (the inference too when
    /// it runs on the CPU): cores / (sum of per-image CPU time).
    pub fn cpu_ceiling(&self, infer_on_cpu: bool) -> f64 {
        let decode = self
            .decode_fit_scaled
            .as_ref()
            .unwrap_or(&self.decode_fit_full);
        let mut ms = decode.ms_per_image() + self.encode.ms_per_image();
        if let Some((d, true)) = &self.detect {
            ms += d.ms_per_image();
        }
        if infer_on_cpu && let Some(i) = &self.infer {
            ms += i.ms_per_image();
        }
        self.cores as f64 * 1e3 / ms.max(1e-9)
    }
}

impl BenchReport {
    fn infer_on_cpu(&self) -> bool {
        self.infer.as_ref().is_some_and(|r| r.name.contains("cpu"))
    }

    /// How many times faster one thread decodes and fits with DCT scaling (`None` when
    /// the pipeline would not scale).
    fn dct_speedup(&self) -> Option<f64> {
        let s = self.decode_fit_scaled.as_ref()?;
        Some(s.images_per_s() / self.decode_fit_full.images_per_s().max(1e-9))
    }

    /// What `bench --json` prints: each measured stage under its own key (`null` when it
    /// did not run), the bound and the figures the text derives from them.
    pub fn to_json(&self) -> serde_json::Value {
        let bound = self.bound();
        let detect = self.detect.as_ref().map(|(r, on_cpu)| {
            let mut j = r.to_json();
            j["on_cpu"] = (*on_cpu).into();
            j
        });
        serde_json::json!({
            "images": self.images,
            "skipped": self.skipped.iter().map(|(p, why)| serde_json::json!({
                "file": p.to_string_lossy(), "reason": why,
            })).collect::<Vec<_>>(),
            "cores": self.cores,
            "model": self.model.as_ref().map(|p| p.to_string_lossy()),
            "devices": self.devices,
            "jpeg_scales": (1..=8)
                .map(|m| (format!("{m}/8"), self.scales[m - 1].into()))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "decode_fit_full": self.decode_fit_full.to_json(),
            "decode_fit_scaled": self.decode_fit_scaled.as_ref().map(Rate::to_json),
            "decode_fit": self.decode_fit.to_json(),
            "detect": detect,
            "infer": self.infer.as_ref().map(Rate::to_json),
            "encode": self.encode.to_json(),
            "pipeline": self.pipeline.as_ref().map(|(r, failed)| {
                let mut j = r.to_json();
                j["failed"] = (*failed).into();
                j
            }),
            "dct_speedup": self.dct_speedup(),
            "bound": { "name": bound.name, "images_per_s": bound.images_per_s() },
            "cpu_ceiling_images_per_s": self.cpu_ceiling(self.infer_on_cpu()),
            "pipeline_fraction_of_bound": self.pipeline.as_ref()
                .map(|(p, _)| p.images_per_s() / bound.images_per_s().max(1e-9)),
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} images, {} cores; each stage alone, then the whole pipeline",
            self.images, self.cores
        )?;
        if !self.skipped.is_empty() {
            writeln!(
                f,
                "skipped {} files (they are not measured):",
                self.skipped.len()
            )?;
            for (p, why) in &self.skipped {
                writeln!(f, "  {}: {why}", p.display())?;
            }
        }
        self.table(f)?;
        self.notes(f)
    }
}

impl BenchReport {
    /// One line per stage alone, then the whole pipeline.
    fn table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<44} {:>7} {:>10} {:>13}",
            "stage", "threads", "images/s", "ms/image/thr"
        )?;
        let mut rows = vec![&self.decode_fit_full];
        rows.extend(self.decode_fit_scaled.as_ref());
        rows.push(&self.decode_fit);
        rows.extend(self.detect.as_ref().map(|(r, _)| r));
        rows.extend(self.infer.as_ref());
        rows.push(&self.encode);
        for r in rows {
            writeln!(
                f,
                "{:<44} {:>7} {:>10.1} {:>13.2}",
                r.name,
                r.threads,
                r.images_per_s(),
                r.ms_per_image()
            )?;
        }
        if let Some((p, _)) = &self.pipeline {
            // Its threads wait on each other, so a per-thread cost means nothing here.
            writeln!(
                f,
                "{:<44} {:>7} {:>10.1} {:>13}",
                p.name,
                p.threads,
                p.images_per_s(),
                "-"
            )?;
        }
        Ok(())
    }

    /// What the table means: DCT scaling, the bound, the ceiling, the pipeline.
    fn notes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scales: Vec<String> = (1..=8)
            .filter(|&m| self.scales[m - 1] > 0)
            .map(|m| format!("{m}/8: {}", self.scales[m - 1]))
            .collect();
        match self.dct_speedup() {
            Some(x) => writeln!(
                f,
                "JPEG DCT scaling (images per scale): {}; it made decode+fit {x:.2}x faster on one thread",
                scales.join(", "),
            )?,
            None => writeln!(
                f,
                "JPEG DCT scaling: not used by this config (the face crop needs every pixel, or decode.dct_scaling = \"off\")"
            )?,
        }
        let b = self.bound();
        writeln!(
            f,
            "bound: {} ({:.1} images/s alone); all CPU stages sharing {} cores allow about {:.1} images/s",
            b.name,
            b.images_per_s(),
            self.cores,
            self.cpu_ceiling(self.infer_on_cpu())
        )?;
        if let Some((p, failed)) = &self.pipeline {
            writeln!(
                f,
                "whole pipeline: {:.1} images/s made = {:.0}% of the slowest stage alone{}",
                p.images_per_s(),
                100.0 * p.images_per_s() / b.images_per_s().max(1e-9),
                if *failed > 0 {
                    format!(" ({failed} failed and are not counted)")
                } else {
                    String::new()
                }
            )?;
        }
        Ok(())
    }
}

/// Run `f(i)` for i = 0, 1, 2, ... on `threads` threads until at least `min` has passed
/// and at least `at_least` calls were made; returns the calls made and the time taken.
fn run_for<S>(threads: usize, at_least: usize, min: Duration, init: S) -> (usize, Duration)
where
    S: Fn() -> Box<dyn FnMut(usize) + Send>,
{
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            let mut work = init();
            let next = &next;
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= at_least && start.elapsed() >= min {
                        break;
                    }
                    work(i);
                }
            });
        }
    });
    let elapsed = start.elapsed();
    // Each thread took one index it did not run.
    (next.load(Ordering::Relaxed) - threads.max(1), elapsed)
}

/// Decoded frames the face-detect measurement cycles through (full-resolution frames are
/// large: 12 MiB at 2048 px).
const DETECT_FRAMES: usize = 16;

fn scale_target(cfg: &Config) -> Option<ScaleTarget> {
    ScaleTarget::for_fit(
        &cfg.preprocess,
        cfg.decode.dct_scaling,
        cfg.face_crop.is_some(),
    )
}

/// Measure `cfg` on the images in `folder`.
pub fn run(cfg: &Config, folder: &Path, opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let paths =
        crate::process::collect_inputs(&[folder.to_path_buf()]).map_err(BenchError::Inputs)?;
    let sample = Sample::load(cfg, folder, &paths)?;
    let files = Arc::new(sample.files);
    let pl = &cfg.pipeline;
    let min = opts.min_time;

    let decode_fit_on = |name: &str, threads: usize, scaled: bool| {
        decode_fit(cfg, &files, min, name, threads, scaled)
    };
    let decode_fit_full = decode_fit_on("read+decode+fit (full decode)", 1, false);
    // Measured only where the pipeline would scale: with the face crop (which turns it
    // off) the "gain" was two runs of one thing, noise.
    let scaling = scale_target(cfg).is_some();
    let decode_fit_scaled =
        scaling.then(|| decode_fit_on("read+decode+fit (DCT-scaled JPEG)", 1, true));
    let name = if scaling {
        "read+decode+fit (DCT-scaled JPEG)"
    } else {
        "read+decode+fit (full decode)"
    };
    let decode_fit_n = decode_fit_on(name, pl.decode_threads, true);
    let detect = detect(cfg, &files, folder, min)?;
    let inferred = infer(cfg, sample.fitted, min)?;
    let encode = encode(
        cfg,
        inferred.outputs,
        inferred.out_chw,
        inferred.per_input,
        min,
    );
    let pipeline = if opts.pipeline {
        Some(whole_pipeline(cfg, files.to_vec())?)
    } else {
        None
    };

    Ok(BenchReport {
        images: files.len(),
        skipped: sample.skipped,
        cores: crate::config::available_cores(),
        model: cfg.model.as_ref().map(|m| m.path.clone()),
        devices: (cfg.model.iter())
            .flat_map(|m| m.devices.iter().map(ToString::to_string))
            .collect(),
        scales: sample.scales,
        decode_fit_full,
        decode_fit_scaled,
        decode_fit: decode_fit_n,
        detect,
        infer: inferred.rate,
        encode,
        pipeline,
    })
}

/// The folder's images that decode (the others would measure error paths), with what
/// the later stages start from.
struct Sample {
    files: Vec<PathBuf>,
    /// The files left out, with why.
    skipped: Vec<(PathBuf, String)>,
    /// Images per DCT scale, as in [`BenchReport::scales`].
    scales: [usize; 8],
    /// Up to 64 rows fitted from the first images: the inference input.
    fitted: Vec<Vec<u8>>,
}

impl Sample {
    fn load(cfg: &Config, folder: &Path, paths: &[PathBuf]) -> Result<Sample, BenchError> {
        let mut skipped = Vec::new();
        let mut scales = [0usize; 8];
        let mut good = Vec::new();
        let mut fitted: Vec<Vec<u8>> = Vec::new();
        let mut dec =
            Decoder::new(cfg.decode.clone(), BufPool::new(2)).with_scaling(scale_target(cfg));
        let mut fit = Fitter::new(cfg.preprocess.clone());
        for p in paths {
            // One file mapped at a time, as the read stage maps it (with its size limit).
            let input = match read_input(p, cfg.decode.max_file_bytes) {
                Ok(input) => input,
                Err(e) => {
                    skipped.push((p.clone(), e.to_string()));
                    continue;
                }
            };
            match dec.decode(input.bytes()) {
                Ok(frame) => {
                    scales[dec.last_scale() as usize - 1] += 1;
                    if fitted.len() < 64 {
                        let mut row = vec![0u8; fit.row_bytes()];
                        if fit.fit(&frame, None, &mut row).is_ok() {
                            fitted.push(row);
                        }
                    }
                    good.push(p.clone());
                }
                Err(e) => skipped.push((p.clone(), e.to_string())),
            }
        }
        if good.is_empty() || fitted.is_empty() {
            let first = skipped
                .first()
                .map_or("the folder is empty".into(), |(p, e)| {
                    format!("{}: {e}", p.display())
                });
            return Err(BenchError::NoImages(folder.to_path_buf(), first));
        }
        Ok(Sample {
            files: good,
            skipped,
            scales,
            fitted,
        })
    }
}

/// Read, decode and fit `files` on `threads` threads, with DCT-scaled JPEG decoding
/// when `scaled` (and the config allows it).
fn decode_fit(
    cfg: &Config,
    files: &Arc<Vec<PathBuf>>,
    min_time: Duration,
    name: &str,
    threads: usize,
    scaled: bool,
) -> Rate {
    let max_file = cfg.decode.max_file_bytes;
    let target = scale_target(cfg).filter(|_| scaled);
    let (done, elapsed) = run_for(threads, files.len(), min_time, || {
        let files = Arc::clone(files);
        let mut dec = Decoder::new(cfg.decode.clone(), BufPool::new(2)).with_scaling(target);
        let mut fit = Fitter::new(cfg.preprocess.clone());
        let mut row = vec![0u8; fit.row_bytes()];
        Box::new(move |i| {
            let Ok(input) = read_input(&files[i % files.len()], max_file) else {
                return;
            };
            if let Ok(frame) = dec.decode(input.bytes()) {
                let _ = fit.fit(&frame, None, &mut row);
            }
        })
    });
    Rate {
        name: name.to_string(),
        threads: threads.max(1),
        images: done,
        elapsed,
    }
}

/// The face crop's detect stage (with `[face_crop]`) on frames decoded as the pipeline
/// decodes them, with whether it ran on the CPU.
fn detect(
    cfg: &Config,
    files: &[PathBuf],
    folder: &Path,
    min_time: Duration,
) -> Result<Option<(Rate, bool)>, BenchError> {
    let Some(fc) = &cfg.face_crop else {
        return Ok(None);
    };
    let pl = &cfg.pipeline;
    let frames = Arc::new(detect_frames(cfg, files, folder)?);
    // The pipeline's own detect workers, built the same way.
    let mut croppers = crate::facecrop::workers(cfg)?;
    // A detector that fails on every photo would time its error path.
    if let Some(Err(reason)) = croppers[0].detect(&[&frames[0]]).pop() {
        return Err(BenchError::Detect(reason));
    }
    let on_cpu = croppers[0].on_cpu();
    let per_batch = crate::facecrop::worker_batch(fc);
    let croppers = std::sync::Mutex::new(croppers);
    let at_least = frames.len().div_ceil(per_batch);
    let (done, elapsed) = run_for(pl.detect_threads, at_least, min_time, || {
        let frames = Arc::clone(&frames);
        let mut cropper = croppers.lock().unwrap().pop().expect("one per thread");
        // Batches of the size a pipeline worker takes: `i` counts batches.
        Box::new(move |i| {
            let batch: Vec<&Frame> = (0..per_batch)
                .map(|k| &frames[(i * per_batch + k) % frames.len()])
                .collect();
            let _ = cropper.detect(&batch);
        })
    });
    let rate = Rate {
        name: format!(
            "face detect ({:?}, both passes, batch {per_batch})",
            fc.device
        ),
        threads: pl.detect_threads,
        images: done * per_batch,
        elapsed,
    };
    Ok(Some((rate, on_cpu)))
}

/// Up to [`DETECT_FRAMES`] of the first files, decoded in full: the pipeline turns DCT
/// scaling off when a middle stage needs every pixel (see `ScaleTarget::for_fit`), and
/// only a bounded number is held in memory.
fn detect_frames(cfg: &Config, files: &[PathBuf], folder: &Path) -> Result<Vec<Frame>, BenchError> {
    let mut dec = Decoder::new(cfg.decode.clone(), BufPool::new(DETECT_FRAMES + 1));
    let mut frames = Vec::new();
    for p in files.iter().take(DETECT_FRAMES) {
        if let Ok(input) = read_input(p, cfg.decode.max_file_bytes)
            && let Ok(frame) = dec.decode(input.bytes())
        {
            frames.push(frame);
        }
    }
    if frames.is_empty() {
        return Err(BenchError::NoImages(
            folder.to_path_buf(),
            "none of the first files decodes in full for the face crop".into(),
        ));
    }
    Ok(frames)
}

/// What the inference measurement leaves for the encode measurement.
struct Inferred {
    /// `None` without a `[model]`.
    rate: Option<Rate>,
    /// The model's output rows (without a model: the fitted rows themselves).
    outputs: Vec<Vec<u8>>,
    /// Channels and size of each output, `(C', H', W')`.
    out_chw: (usize, u32, u32),
    /// Outputs per input (K): the encode rate is per input, K encodes each.
    per_input: usize,
}

/// Inference on the first configured device, batches of `max_batch` fitted images.
fn infer(cfg: &Config, fitted: Vec<Vec<u8>>, min_time: Duration) -> Result<Inferred, BenchError> {
    let Some(m) = &cfg.model else {
        return Ok(Inferred {
            rate: None,
            outputs: fitted,
            out_chw: (
                cfg.preprocess.channels,
                cfg.preprocess.height,
                cfg.preprocess.width,
            ),
            per_input: 1,
        });
    };
    let pl = &cfg.pipeline;
    // The pipeline's runtime plan: the same model and batch size (`max_batch = "auto"`
    // included) that `process`, `run` and `check` use; its first worker is timed.
    let plan = RuntimePlan::load(cfg)?;
    let batch = plan.max_batch;
    let model = plan.models.into_iter().next().expect("a plan has a model");
    let dev = model.device();
    // One copy measured with every inference thread, as before the plan existed: the
    // rate is per copy, the report's thread column says how many threads it had.
    tch::set_num_threads(pl.infer_threads as i32);
    let (h, w) = (cfg.preprocess.height as i64, cfg.preprocess.width as i64);
    let rows: Vec<u8> = (0..batch)
        .flat_map(|i| fitted[i % fitted.len()].iter().copied())
        .collect();
    let x = Tensor::from_slice(&rows)
        .view([batch as i64, h, w, cfg.preprocess.channels as i64])
        .to_device(dev);
    let (oh, ow) = model.output_hw();
    let oc = model.output_channels();
    let per_input = model.outputs_per_input();
    let kind = model.kind();
    // On its own thread, as in the pipeline: measured here (light model, batch 1, CPU),
    // the same loop ran about 5x slower on the main thread, which had set up the
    // intra-op thread count (24.7 vs 5.2 images/s); the cause is in libtorch's
    // per-thread parallel setup and was not chased further.
    let timed = std::thread::spawn(move || time_forward(&model, &x, dev, batch, min_time))
        .join()
        .map_err(|_| BenchError::Infer("the inference thread panicked".into()))?;
    let (y, images, elapsed) = timed.map_err(BenchError::Infer)?;
    let y = y.to_device(Device::Cpu);
    let row = (oh * ow * oc) as usize;
    let len = batch * per_input * row;
    let mut flat = vec![0u8; len];
    y.copy_data_u8(&mut flat, len);
    let threads = if dev == Device::Cpu {
        pl.infer_threads
    } else {
        1
    };
    Ok(Inferred {
        rate: Some(Rate {
            name: format!("inference ({}, batch {batch}, {:?})", m.devices[0], kind),
            threads,
            images,
            elapsed,
        }),
        outputs: flat.chunks_exact(row).map(<[u8]>::to_vec).collect(),
        out_chw: (oc as usize, oh as u32, ow as u32),
        per_input,
    })
}

/// The timed forward loop over batch `x` of `batch` rows: after a warm-up, for at least
/// `min_time` and three batches. Returns the last warm-up output, the images run and the
/// time taken.
fn time_forward(
    model: &Model,
    x: &Tensor,
    dev: Device,
    batch: usize,
    min_time: Duration,
) -> Result<(Tensor, usize, Duration), String> {
    let _no_grad = tch::no_grad_guard();
    let sync = || {
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let rows = vec![None; batch];
    let run = || model.forward_u8(x, &rows).map_err(|e| torch_message(&e));
    // Warm-up: TorchScript's profiling executor optimises the graph over the first
    // calls, and cuDNN picks its algorithms; timing those would understate the steady
    // state several times over.
    let mut y = run()?;
    for _ in 0..3 {
        y = run()?;
    }
    sync();
    let start = Instant::now();
    let mut images = 0;
    while images < 3 * batch || start.elapsed() < min_time {
        let _ = run()?;
        images += batch;
    }
    sync();
    Ok((y, images, start.elapsed()))
}

/// Encode the inferred outputs with `pipeline.encode_threads` threads; the rate is in
/// inputs per second (K encodes each, for a model with K outputs per input).
fn encode(
    cfg: &Config,
    outputs: Vec<Vec<u8>>,
    out_chw: (usize, u32, u32),
    per_input: usize,
    min_time: Duration,
) -> Rate {
    let pl = &cfg.pipeline;
    let outputs = Arc::new(outputs);
    let (done, elapsed) = run_for(pl.encode_threads, outputs.len(), min_time, || {
        let outputs = Arc::clone(&outputs);
        let mut enc = Encoder::new(cfg.encode.clone());
        let (oc, oh, ow) = out_chw;
        Box::new(move |i| {
            let _ = enc.encode_with(&outputs[i % outputs.len()], (ow, oh, oc), None);
        })
    });
    Rate {
        name: match per_input {
            1 => format!(
                "encode ({:?}, quality {})",
                cfg.encode.format, cfg.encode.quality
            ),
            k => format!(
                "encode ({:?}, quality {}, {k} outputs per input)",
                cfg.encode.format, cfg.encode.quality
            ),
        },
        threads: pl.encode_threads.max(1),
        images: done / per_input,
        elapsed,
    }
}

/// `process` over `paths` into a temporary folder (removed before and after), files read
/// from disk.
fn whole_pipeline(cfg: &Config, paths: Vec<PathBuf>) -> Result<(Rate, usize), BenchError> {
    let pl = &cfg.pipeline;
    let out = std::env::temp_dir().join(format!("hotpipe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let s = crate::process::run(cfg, paths, &out, Default::default());
    let _ = std::fs::remove_dir_all(&out);
    let s = s?;
    let rate = Rate {
        name: "whole pipeline (process, files on disk)".to_string(),
        threads: pl.decode_threads
            + pl.fit_threads
            + pl.encode_threads
            + 1
            + cfg.face_crop.as_ref().map_or(0, |_| pl.detect_threads),
        images: s.done,
        elapsed: s.elapsed,
    };
    Ok((rate, s.failed.len()))
}
