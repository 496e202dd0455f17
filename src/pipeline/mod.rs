//! Wiring: the stages on their threads, joined by bounded channels, and how shutdown
//! flows through them.
//!
//! ```text
//! input ─► read ─► decode ×N ─► [detect] ─► fit ×M ─► (batch slots) ─► infer ×device ─► encode+publish ×K ─► outcomes
//! ```
//! Every arrow is a bounded crossbeam channel of `pipeline.channel_capacity` (the batch
//! slots and output ring are bounded by their slot counts). The full-channel policy is
//! to block the producer: nothing is dropped and memory stays bounded by the capacities,
//! at the price that a stalled stage stalls everything upstream (which the health check
//! reports). An item is owned by one stage at a time; a per-item error is reported on the
//! outcome channel and the item leaves the pipeline there.
//!
//! Shutdown flows downstream: dropping the input sender ends the read stage, which drops
//! its sender, and so on; each stage drains what it holds before exiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use tch::{Device, Kind, Tensor};

use crate::config::{BatchSize, Config};
use crate::runtime::batcher::{Assembler, SlotMemory};
use crate::runtime::infer::{EncodeJob, OutRing, WorkerParts, run_worker};
use crate::runtime::model::Model;
use crate::stages::decode::{Decoder, ScaleTarget};
use crate::stages::encode::Encoder;
use crate::stages::fit::Fitter;
use crate::stages::read::{Input, read_input};
use crate::vocab::error::{ItemError, PipelineError, Stage};
use crate::vocab::item::{Frame, Item, Outcome};
use crate::vocab::pool::BufPool;
use crate::vocab::sink::Sink;
use crate::vocab::telemetry::{Telemetry, Timer};

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

/// Reads one queue's current length (for the telemetry sampler).
type QueueProbe = Box<dyn Fn() -> usize + Send>;

/// A decoded image on its way to the fit stage.
pub type Decoded = (Item, Frame);

/// The body of a [`MiddleStage`]: it receives decoded frames, annotates items (`region`,
/// `sidecar`) and forwards them, or reports an outcome for items it rejects. It must exit
/// when its input closes.
pub type MiddleRun =
    Box<dyn FnOnce(Receiver<Decoded>, Sender<Decoded>, Sender<Outcome>, Arc<Telemetry>) + Send>;

/// An optional stage between decode and fit (the face crop).
pub struct MiddleStage {
    /// Decoded frames the stage holds at once (its batches, all workers together): the
    /// frame pool grows by this many, or the stage would wait for frames the decoders
    /// cannot get buffers for.
    pub frames_held: usize,
    /// One body per worker thread; they share the stage's input and output queues.
    pub runs: Vec<MiddleRun>,
}

/// Options that are not part of the config file.
#[derive(Default)]
pub struct StartOptions {
    /// Stage inserted between decode and fit (built by `facecrop`).
    pub middle: Option<MiddleStage>,
    /// Test hook: fail this many forward calls with a fake out-of-memory error.
    pub inject_oom: usize,
}

pub struct Pipeline {
    input: Option<Sender<Item>>,
    outcomes: Receiver<Outcome>,
    threads: Vec<JoinHandle<()>>,
    telemetry: Arc<Telemetry>,
    info: RuntimeInfo,
    decode_pool: Arc<BufPool>,
    stop_sampler: Option<Sender<()>>,
}

/// Keeps the batch slot tensors alive for the assembler. Never accessed after creation.
struct SlotKeepalive(#[allow(dead_code)] Vec<Tensor>);
// SAFETY: the tensors are never used through this value; it only owns them.
unsafe impl Sync for SlotKeepalive {}

fn spawn<F: FnOnce() + Send + 'static>(
    name: String,
    f: F,
) -> Result<JoinHandle<()>, PipelineError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|source| PipelineError::Io {
            context: "cannot start a pipeline thread".to_string(),
            source,
        })
}

impl Pipeline {
    /// Load the model(s), allocate every buffer, start every stage. Fails before any
    /// input is touched when the model or the device is unusable.
    pub fn start(
        cfg: &Config,
        sink: Arc<dyn Sink>,
        opts: StartOptions,
    ) -> Result<Pipeline, PipelineError> {
        let pl = &cfg.pipeline;
        let telemetry = Arc::new(Telemetry::default());
        tch::set_num_threads(pl.infer_threads as i32);

        // Models first: a bad model fails the start, not the first image.
        let mut devices: Vec<Device> = match &cfg.model {
            Some(m) => m.devices.iter().map(|&d| d.tch()).collect(),
            None => vec![Device::Cpu],
        };
        // CPU inference as several workers, each a model copy with its share of the
        // intra-op threads (they all take batches from the same assembler).
        if devices == [Device::Cpu] && cfg.model.is_some() && pl.cpu_infer_workers > 1 {
            devices = vec![Device::Cpu; pl.cpu_infer_workers];
            tch::set_num_threads((pl.infer_threads / pl.cpu_infer_workers).max(1) as i32);
        }
        let mut models = Vec::new();
        for &dev in &devices {
            models.push(match &cfg.model {
                Some(m) => Model::load(m, dev, &cfg.preprocess)?,
                None => Model::identity(dev, &cfg.preprocess),
            });
        }
        let max_batch = match cfg.model.as_ref().map(|m| m.max_batch) {
            Some(BatchSize::Fixed(n)) => n,
            // Several devices share the slot ring, so the smallest device sets the size.
            Some(BatchSize::Auto) => models.iter().map(Model::auto_batch).min().unwrap_or(8),
            None => 8,
        };
        let timeout = Duration::from_millis(cfg.model.as_ref().map_or(10, |m| m.batch_timeout_ms));
        let info = RuntimeInfo {
            devices: devices.clone(),
            max_batch,
            input_hw: models[0].input_hw(),
            output_hw: models[0].output_hw(),
            model: models[0].path().display().to_string(),
            precision: models[0].kind(),
        };

        // Batch slots: pinned when any device is a GPU, so host-to-device copies are DMA.
        let pin = devices.iter().copied().find(|d| *d != Device::Cpu);
        let (h, w) = info.input_hw;
        let row_bytes = (h * w * 3) as usize;
        let slot_tensors: Vec<Tensor> = (0..pl.batch_slots)
            .map(|_| {
                let t = Tensor::zeros([max_batch as i64, h, w, 3], (Kind::Uint8, Device::Cpu));
                match pin {
                    Some(d) => t.pin_memory(d),
                    None => t,
                }
            })
            .collect();
        let mems = slot_tensors
            .iter()
            .map(|t| SlotMemory {
                ptr: t.data_ptr() as *mut u8,
                len: max_batch * row_bytes,
            })
            .collect();
        let worker_views: Vec<Vec<Tensor>> = devices
            .iter()
            .map(|_| slot_tensors.iter().map(Tensor::shallow_clone).collect())
            .collect();
        let assembler: Arc<Assembler<Item>> = Arc::new(Assembler::new(
            mems,
            max_batch,
            row_bytes,
            timeout,
            Box::new(SlotKeepalive(slot_tensors)),
        ));

        let cap = pl.channel_capacity;
        let (input_tx, input_rx) = bounded::<Item>(cap);
        let probe_input = input_rx.clone();
        let (read_tx, read_rx) = bounded::<(Item, Input)>(cap);
        let probe_read = read_rx.clone();
        let (dec_tx, dec_rx) = bounded::<Decoded>(cap);
        let (enc_tx, enc_rx) = bounded::<EncodeJob>(cap);
        let (out_tx, out_rx) = bounded::<Outcome>(cap.max(64));
        let mut threads = Vec::new();

        let fail =
            |tel: &Telemetry, tx: &Sender<Outcome>, item: Item, stage: Stage, reason: String| {
                tel.failed(stage);
                let err = ItemError::new(&item.path, stage, reason);
                let _ = tx.send(Outcome {
                    item,
                    result: Err(err),
                });
            };

        // read
        {
            let (tel, out_tx) = (Arc::clone(&telemetry), out_tx.clone());
            let max_file = cfg.decode.max_file_bytes;
            telemetry.set_threads(Stage::Read, 1);
            threads.push(spawn("hp-read".into(), move || {
                for item in input_rx {
                    let t = Timer::start();
                    let r = read_input(&item.path, max_file);
                    tel.record(Stage::Read, t.elapsed(), 1);
                    match r {
                        Ok(input) => {
                            if read_tx.send((item, input)).is_err() {
                                break;
                            }
                        }
                        Err(reason) => fail(&tel, &out_tx, item, Stage::Read, reason),
                    }
                }
            })?);
        }

        // decode
        // Decoded frames are the pipeline's largest buffers (a 2048 px photo is 12 MiB), so
        // the pool, not the channel, bounds how many exist: one per decoder and fit worker,
        // one for an EXIF rotation in progress, a few queued for fit, and what the detect
        // stage batches. A full pool blocks decoders, which is the intended back-pressure.
        let middle_frames = opts.middle.as_ref().map_or(0, |m| m.frames_held);
        let decode_pool = BufPool::new(pl.decode_threads + pl.fit_threads + 3 + middle_frames);
        telemetry.set_threads(Stage::Decode, pl.decode_threads);
        // JPEGs may be decoded at a DCT-reduced scale that still covers the fit; not with a
        // middle stage, which picks the region after decoding (see `ScaleTarget::for_fit`).
        let scale_target = ScaleTarget::for_fit(&cfg.preprocess, opts.middle.is_some());
        let (fit_tx, fit_rx) = if opts.middle.is_some() {
            bounded::<Decoded>(cap)
        } else {
            (dec_tx.clone(), dec_rx.clone())
        };
        for i in 0..pl.decode_threads {
            let (tel, out_tx, rx, tx) = (
                Arc::clone(&telemetry),
                out_tx.clone(),
                read_rx.clone(),
                dec_tx.clone(),
            );
            let mut decoder = Decoder::new(cfg.decode.clone(), Arc::clone(&decode_pool))
                .with_scaling(scale_target);
            threads.push(spawn(format!("hp-decode-{i}"), move || {
                for (mut item, input) in rx {
                    if let Some(hook) = item.on_start.take() {
                        (hook.0)();
                    }
                    let t = Timer::start();
                    let r = decoder.decode(input.bytes());
                    let truncated = input.truncated();
                    drop(input);
                    tel.record(Stage::Decode, t.elapsed(), 1);
                    match r {
                        Ok(_) if truncated => fail(
                            &tel,
                            &out_tx,
                            item,
                            Stage::Decode,
                            "file was truncated while being read".into(),
                        ),
                        Ok(frame) => {
                            if tx.send((item, frame)).is_err() {
                                break;
                            }
                        }
                        Err(reason) => {
                            let reason = if truncated {
                                "file was truncated while being read".into()
                            } else {
                                reason
                            };
                            fail(&tel, &out_tx, item, Stage::Decode, reason)
                        }
                    }
                }
            })?);
        }
        drop(read_rx);
        drop(dec_tx);

        // detect (optional)
        if let Some(middle) = opts.middle {
            telemetry.set_threads(Stage::Detect, middle.runs.len());
            for (i, run) in middle.runs.into_iter().enumerate() {
                let (tel, out_tx, rx, tx) = (
                    Arc::clone(&telemetry),
                    out_tx.clone(),
                    dec_rx.clone(),
                    fit_tx.clone(),
                );
                threads.push(spawn(format!("hp-detect-{i}"), move || {
                    run(rx, tx, out_tx, tel)
                })?);
            }
        }
        drop(dec_rx);
        drop(fit_tx);

        // fit
        telemetry.set_threads(Stage::Fit, pl.fit_threads);
        let fitters_left = Arc::new(AtomicUsize::new(pl.fit_threads));
        for i in 0..pl.fit_threads {
            let (tel, out_tx, rx) = (Arc::clone(&telemetry), out_tx.clone(), fit_rx.clone());
            let (asm, left) = (Arc::clone(&assembler), Arc::clone(&fitters_left));
            let mut fitter = Fitter::new(cfg.preprocess.clone());
            threads.push(spawn(format!("hp-fit-{i}"), move || {
                for (item, frame) in rx {
                    let Some(mut lease) = asm.lease() else { break };
                    let t = Timer::start();
                    let r = fitter.fit(&frame, item.region, lease.pixels());
                    drop(frame);
                    tel.record(Stage::Fit, t.elapsed(), 1);
                    match r {
                        Ok(()) => lease.commit(item),
                        Err(reason) => {
                            drop(lease);
                            fail(&tel, &out_tx, item, Stage::Fit, reason)
                        }
                    }
                }
                if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                    asm.close();
                }
            })?);
        }
        let probe_fit = fit_rx.clone();
        drop(fit_rx);

        // infer: one worker per device
        telemetry.set_threads(Stage::Infer, devices.len());
        let mut inject_oom = opts.inject_oom;
        for (i, (model, slots)) in models.into_iter().zip(worker_views).enumerate() {
            let pinned_for = (model.device() != Device::Cpu).then_some(model.device());
            let out_ring = Arc::new(OutRing::new(
                pl.batch_slots,
                max_batch,
                model.output_hw(),
                pinned_for,
            ));
            let parts = WorkerParts {
                assembler: Arc::clone(&assembler),
                slots,
                out_ring,
                encode_tx: enc_tx.clone(),
                outcome_tx: out_tx.clone(),
                telemetry: Arc::clone(&telemetry),
                inject_oom: std::mem::take(&mut inject_oom),
            };
            threads.push(spawn(format!("hp-infer-{i}"), move || {
                run_worker(model, parts)
            })?);
        }
        drop(enc_tx);

        // encode + publish
        telemetry.set_threads(Stage::Encode, pl.encode_threads);
        telemetry.set_threads(Stage::Publish, pl.encode_threads);
        for i in 0..pl.encode_threads {
            let (tel, out_tx, rx, sink) = (
                Arc::clone(&telemetry),
                out_tx.clone(),
                enc_rx.clone(),
                Arc::clone(&sink),
            );
            let mut encoder = Encoder::new(cfg.encode.clone());
            threads.push(spawn(format!("hp-encode-{i}"), move || {
                let ext = encoder.extension();
                for job in rx {
                    let t = Timer::start();
                    let r = encoder.encode(job.out.row(job.row), job.out.width(), job.out.height());
                    tel.record(Stage::Encode, t.elapsed(), 1);
                    let EncodeJob { item, out, .. } = job;
                    let bytes = match r {
                        Ok(b) => b,
                        Err(reason) => {
                            drop(out);
                            fail(&tel, &out_tx, item, Stage::Encode, reason);
                            continue;
                        }
                    };
                    let t = Timer::start();
                    let published = sink.publish(&item, bytes, ext);
                    drop(out);
                    tel.record(Stage::Publish, t.elapsed(), 1);
                    if published.is_err() {
                        tel.failed(Stage::Publish);
                    }
                    let _ = out_tx.send(Outcome {
                        item,
                        result: published,
                    });
                }
            })?);
        }
        let probe_enc = enc_rx.clone();
        drop(enc_rx);
        drop(out_tx);

        // queue sampler: reads channel lengths through receiver clones, which do not keep
        // any stage alive (a stage ends when its senders are gone).
        let (stop_tx, stop_rx) = bounded::<()>(0);
        {
            let tel = Arc::clone(&telemetry);
            let probes: Vec<(Stage, usize, QueueProbe)> = vec![
                (Stage::Read, cap, Box::new(move || probe_input.len())),
                (Stage::Decode, cap, Box::new(move || probe_read.len())),
                (Stage::Fit, cap, Box::new(move || probe_fit.len())),
                (Stage::Infer, pl.batch_slots, {
                    let asm = Arc::clone(&assembler);
                    Box::new(move || asm.sealed_len())
                }),
                (Stage::Encode, cap, Box::new(move || probe_enc.len())),
            ];
            threads.push(spawn("hp-sampler".into(), move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(Duration::from_millis(50))
                {
                    for (stage, cap, len) in &probes {
                        tel.sample_queue(*stage, len(), *cap);
                    }
                }
            })?);
        }

        Ok(Pipeline {
            input: Some(input_tx),
            outcomes: out_rx,
            threads,
            telemetry,
            info,
            decode_pool,
            stop_sampler: Some(stop_tx),
        })
    }

    /// Where to send items. Dropping every clone (and calling [`close_input`]) starts the
    /// drain.
    pub fn sender(&self) -> Sender<Item> {
        self.input.as_ref().expect("input open").clone()
    }

    /// Stop accepting input; in-flight items drain to the outcome channel.
    pub fn close_input(&mut self) {
        self.input.take();
    }

    pub fn outcomes(&self) -> &Receiver<Outcome> {
        &self.outcomes
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn info(&self) -> &RuntimeInfo {
        &self.info
    }

    /// Decoded-frame buffers ever allocated (bounded by the pool's capacity).
    pub fn frame_buffers_created(&self) -> usize {
        self.decode_pool.created()
    }

    /// Wait for every stage to finish. Call after the input is closed and the outcome
    /// channel has been drained (it disconnects when the last stage exits).
    pub fn join(mut self) {
        self.input.take();
        self.stop_sampler.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
