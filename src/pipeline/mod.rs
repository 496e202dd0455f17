//! Wiring: the plan of stages, their queues and how shutdown flows through them. Every
//! stage is a [`StageWorker`] spawned by the one runner ([`runner`]); the adapters between
//! stages and the runtime are in [`workers`].
//!
//! ```text
//! input ─► read ─► decode ×N ─► [detect] ─► fit ×M ─► (batch slots) ─► infer ×device ─► encode+publish ×K ─► outcomes
//! ```
//! Every arrow is a bounded crossbeam channel of `pipeline.channel_capacity` (the batch
//! slots and output ring are bounded by their slot counts). The full-channel policy is
//! to block the producer: nothing is dropped and memory stays bounded by the capacities,
//! at the price that a stalled stage stalls everything upstream (which the health check
//! reports). An item is owned by one stage at a time; a per-item error (or a panic while
//! processing it) is reported on the outcome channel and the item leaves the pipeline
//! there. A thread that dies is reported on [`Pipeline::deaths`].
//!
//! Shutdown flows downstream: dropping the input sender ends the read stage, which drops
//! its sender, and so on; each stage drains what it holds before exiting.

mod remote;
pub mod runner;
pub mod workers;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::runtime::batcher::{Assembler, SlotMemory};
use crate::runtime::infer::{Inferred, OutRing, WorkerParts, run_worker};
use crate::runtime::plan::RuntimePlan;
use crate::stages::decode::{Decoder, ScaleTarget};
use crate::stages::encode::Encoder;
use crate::stages::fit::Fitter;
use crate::stages::read::{Input, Reader};
use crate::vocab::error::{PipelineError, Stage};
use crate::vocab::item::{Frame, Item, Outcome};
use crate::vocab::pool::BufPool;
use crate::vocab::sink::Sink;
use crate::vocab::stage::{Reporter, StageWorker};
use crate::vocab::telemetry::Telemetry;
use runner::Topology;
use workers::{Commit, EncodeWorker, FitWorker, Publish};

pub use crate::runtime::plan::RuntimeInfo;

/// Reads one queue's current length (for the telemetry sampler).
type QueueProbe = Box<dyn Fn() -> usize + Send>;

pub struct Pipeline {
    input: Option<Sender<Item>>,
    outcomes: Receiver<Outcome>,
    deaths: Receiver<PipelineError>,
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

/// The batch slot ring between fit and inference, and each inference worker's tensor
/// views of the same memory.
struct SlotRing {
    assembler: Arc<Assembler<Item>>,
    views: Vec<Vec<Tensor>>,
}

impl Pipeline {
    /// Load the model(s) and the detector, allocate every buffer, start every stage.
    /// Fails before any input is touched when the model or the device is unusable.
    pub fn start(cfg: &Config, sink: Arc<dyn Sink>) -> Result<Pipeline, PipelineError> {
        // Models first: a bad model fails the start, not the first image.
        let plan = RuntimePlan::load(cfg)?;
        let detectors = crate::facecrop::workers(cfg)?;
        let info = plan.info();
        let ring = slot_ring(cfg, &plan);
        let pl = &cfg.pipeline;
        let cap = pl.channel_capacity;
        let telemetry = Arc::new(Telemetry::default());
        let (out_tx, out_rx) = bounded::<Outcome>(cap.max(64));
        let reporter = Reporter {
            telemetry: Arc::clone(&telemetry),
            outcomes: out_tx,
        };
        let (mut topo, deaths) = Topology::new(reporter.clone());

        let (input_tx, input_rx) = bounded::<Item>(cap);
        let (read_tx, read_rx) = bounded::<(Item, Input)>(cap);
        let (dec_tx, dec_rx) = bounded::<(Item, Frame)>(cap);
        let (enc_tx, enc_rx) = bounded::<(Item, Inferred)>(cap);

        let reader = Reader {
            max_bytes: cfg.decode.max_file_bytes,
        };
        topo.stage("read", vec![reader], &input_rx, read_tx)?;
        let decode_pool = frame_pool(cfg, &detectors);
        let decoders = decoders(cfg, &decode_pool, !detectors.is_empty());
        topo.stage("decode", decoders, &read_rx, dec_tx)?;
        let fit_rx = if detectors.is_empty() {
            dec_rx.clone()
        } else {
            let (fit_tx, fit_rx) = bounded::<(Item, Frame)>(cap);
            topo.stage("detect", detectors, &dec_rx, fit_tx)?;
            fit_rx
        };
        let fitters = (0..pl.fit_threads)
            .map(|_| FitWorker {
                fitter: Fitter::new(cfg.preprocess.clone()),
                assembler: Arc::clone(&ring.assembler),
            })
            .collect();
        let commit = Commit::new(Arc::clone(&ring.assembler));
        topo.stage("fit", fitters, &fit_rx, commit)?;
        let assembler = Arc::clone(&ring.assembler);
        start_inference(&mut topo, cfg, plan, ring, enc_tx, &reporter)?;
        start_encoders(&mut topo, cfg, &info, &enc_rx, sink, reporter)?;

        // The sampler reads channel lengths through receiver clones, which do not keep
        // any stage alive (a stage ends when its senders are gone).
        let probes: Vec<(Stage, usize, QueueProbe)> = vec![
            (Stage::Read, cap, Box::new(move || input_rx.len())),
            (Stage::Decode, cap, Box::new(move || read_rx.len())),
            (Stage::Fit, cap, Box::new(move || fit_rx.len())),
            (
                Stage::Infer,
                pl.batch_slots,
                Box::new(move || assembler.sealed_len()),
            ),
            (Stage::Encode, cap, Box::new(move || enc_rx.len())),
        ];
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let tel = Arc::clone(&telemetry);
        topo.spawn("hp-sampler".into(), move || sample(&tel, &probes, &stop_rx))?;

        Ok(Pipeline {
            input: Some(input_tx),
            outcomes: out_rx,
            deaths,
            threads: topo.into_threads(),
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

    /// Threads that died (a panic outside any item's processing). The first one is the
    /// pipeline's failure: items it held have no outcome.
    pub fn deaths(&self) -> &Receiver<PipelineError> {
        &self.deaths
    }

    /// Wait for every stage to finish. Call after the input is closed and the outcome
    /// channel has been drained (it disconnects when the last stage exits). Err: a
    /// thread died on the way.
    pub fn join(mut self) -> Result<(), PipelineError> {
        self.input.take();
        self.stop_sampler.take();
        for t in self.threads.drain(..) {
            // Every thread runs under the runner's panic guard, so a join never fails;
            // deaths are reported on the channel instead.
            let _ = t.join();
        }
        match self.deaths.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

/// Decoded frames are the pipeline's largest buffers (a 2048 px photo is 12 MiB), so the
/// pool, not the channel, bounds how many exist: one per decoder and fit worker, one for
/// an EXIF rotation in progress, a few queued for fit, and what the detect stage batches.
/// And it bounds their bytes (`decode.frame_budget_mib`), since the input decides a
/// frame's size. A full pool blocks decoders, which is the intended back-pressure.
///
/// Progress with one item needs only that item's own request: a decoder takes all its
/// buffers at once and waits holding none, detect and fit only return frames, and the
/// encode pool below is a separate one. So any budget works, however small; a decode
/// larger than it fails at once (`OverLimit`) instead of waiting.
fn frame_pool<W: StageWorker>(cfg: &Config, detectors: &[W]) -> Arc<BufPool> {
    let pl = &cfg.pipeline;
    let held: usize = detectors.iter().map(|d| d.batching().0).sum();
    let budget = cfg.decode.frame_budget_bytes;
    // Debug, not info: the default log stays what it was (events and files); it shows
    // with HOTPIPE_LOG=info,hotpipe::pipeline=debug.
    match cfg.decode.frame_budget_from_memory {
        Some(m) => tracing::debug!(
            "frame budget {} MiB, derived from the {} MiB this process may use: a quarter, within 256 to 4096 MiB (decode.frame_budget_mib sets it)",
            budget >> 20,
            m >> 20
        ),
        None => tracing::debug!(
            "frame budget {} MiB (decode.frame_budget_mib)",
            budget >> 20
        ),
    }
    BufPool::with_budget(
        pl.decode_threads + pl.fit_threads + 3 + held,
        usize::try_from(budget).unwrap_or(usize::MAX),
    )
}

/// JPEGs may be decoded at a DCT-reduced scale that still covers the fit; not with a
/// detect stage, which picks the region after decoding (see `ScaleTarget::for_fit`).
/// The decoders keep each input's filtered EXIF only when the encoder is to write it.
fn decoders(cfg: &Config, pool: &Arc<BufPool>, region_chosen_later: bool) -> Vec<Decoder> {
    let target = ScaleTarget::for_fit(&cfg.preprocess, cfg.decode.dct_scaling, region_chosen_later);
    (0..cfg.pipeline.decode_threads)
        .map(|_| {
            Decoder::new(cfg.decode.clone(), Arc::clone(pool))
                .with_scaling(target)
                .with_exif(cfg.encode.keep_metadata)
                .with_digest(sidecars(cfg))
        })
        .collect()
}

/// Batch slots: pinned when any device is a GPU, so host-to-device copies are DMA; in
/// the memory a Python pipeline's workers share, so they read the rows in place.
fn slot_ring(cfg: &Config, plan: &RuntimePlan) -> SlotRing {
    let devices: Vec<Device> = plan.models.iter().map(|m| m.device()).collect();
    let timeout = Duration::from_millis(cfg.model.as_ref().map_or(10, |m| m.batch_timeout_ms));
    if let Some(py) = &plan.python {
        let shared = &py.shared;
        let l = shared.layout();
        let mems = (0..l.pipeline_slots)
            .map(|s| shared.input_slot(s))
            .collect();
        let assembler = Arc::new(Assembler::new(
            mems,
            l.rows,
            l.in_row,
            timeout,
            Box::new(Arc::clone(shared)),
        ));
        let views = devices.iter().map(|_| Vec::new()).collect();
        return SlotRing { assembler, views };
    }
    let pin = devices.iter().copied().find(|d| *d != Device::Cpu);
    let (h, w) = plan.models[0].input_hw();
    let c = plan.models[0].input_channels();
    let max_batch = plan.max_batch;
    let row_bytes = (h * w * c) as usize;
    let tensors: Vec<Tensor> = (0..cfg.pipeline.batch_slots)
        .map(|_| {
            let t = Tensor::zeros([max_batch as i64, h, w, c], (Kind::Uint8, Device::Cpu));
            match pin {
                Some(d) => t.pin_memory(d),
                None => t,
            }
        })
        .collect();
    let mems = tensors
        .iter()
        .map(|t| SlotMemory {
            ptr: t.data_ptr() as *mut u8,
            len: max_batch * row_bytes,
        })
        .collect();
    let views = devices
        .iter()
        .map(|_| tensors.iter().map(Tensor::shallow_clone).collect())
        .collect();
    let assembler = Arc::new(Assembler::new(
        mems,
        max_batch,
        row_bytes,
        timeout,
        Box::new(SlotKeepalive(tensors)),
    ));
    SlotRing { assembler, views }
}

/// One inference worker per model copy, each with its own output ring.
fn start_inference(
    topo: &mut Topology,
    cfg: &Config,
    plan: RuntimePlan,
    ring: SlotRing,
    enc_tx: Sender<(Item, Inferred)>,
    reporter: &Reporter,
) -> Result<(), PipelineError> {
    reporter
        .telemetry
        .set_threads(Stage::Infer, plan.models.len());
    if let Some(py) = &plan.python {
        reporter.telemetry.register_model_workers(&py.stats);
    }
    for (i, (model, slots)) in plan.models.into_iter().zip(ring.views).enumerate() {
        let (oh, ow) = model.output_hw();
        let out_shape = ((model.output_channels(), oh, ow), model.outputs_per_input());
        let out_ring = Arc::new(match &plan.python {
            // A Python worker writes its results into its own slots of the shared memory.
            Some(py) => {
                let mems: Vec<_> = (0..cfg.pipeline.batch_slots)
                    .map(|s| py.shared.output_slot(i, s))
                    .collect();
                OutRing::over(&mems, plan.max_batch, out_shape, py.shared.clone())
            }
            None => {
                let pinned_for = (model.device() != Device::Cpu).then_some(model.device());
                OutRing::new(
                    cfg.pipeline.batch_slots,
                    plan.max_batch,
                    out_shape,
                    pinned_for,
                )
            }
        });
        let parts = WorkerParts {
            assembler: Arc::clone(&ring.assembler),
            slots,
            out_ring,
            encode_tx: enc_tx.clone(),
            reporter: reporter.clone(),
        };
        topo.spawn(format!("hp-infer-{i}"), move || run_worker(model, parts))?;
    }
    Ok(())
}

/// Encode and publish, `encode_threads` workers, each input's `per_input` outputs
/// together.
fn start_encoders(
    topo: &mut Topology,
    cfg: &Config,
    info: &RuntimeInfo,
    enc_rx: &Receiver<(Item, Inferred)>,
    sink: Arc<dyn Sink>,
    reporter: Reporter,
) -> Result<(), PipelineError> {
    let n = cfg.pipeline.encode_threads;
    let per_input = info.outputs_per_input;
    reporter.telemetry.set_threads(Stage::Publish, n);
    // Each worker holds one input's encoded outputs at a time (it publishes them before
    // the next), so the pool never makes a worker wait for another's buffers.
    let pool = BufPool::new(n * per_input);
    let encoders: Vec<EncodeWorker> = (0..n)
        .map(|_| EncodeWorker {
            encoder: Encoder::new(cfg.encode.clone()),
            pool: Arc::clone(&pool),
        })
        .collect();
    let publish = Publish {
        sink,
        ext: cfg.encode.format.extension(),
        reporter,
        provenance: provenance(cfg, info)?.map(Arc::new),
    };
    topo.stage("encode", encoders, enc_rx, publish)
}

/// Whether outputs get sidecars: with `[params]` (what each was made with) or
/// `[face_crop]` (where the face was).
fn sidecars(cfg: &Config) -> bool {
    cfg.params.is_some() || cfg.face_crop.is_some()
}

/// What every sidecar records besides its input and parameters (`None` without
/// sidecars): `model` and `recipe` ([`Config::recipe`]).
fn provenance(
    cfg: &Config,
    info: &RuntimeInfo,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, PipelineError> {
    if !sidecars(cfg) {
        return Ok(None);
    }
    let mut p = serde_json::Map::new();
    p.insert("model".into(), model_provenance(cfg, info)?);
    p.insert("recipe".into(), cfg.recipe());
    Ok(Some(p))
}

/// The model's path and the SHA-256 of its file (hashed once, at start-up); a
/// TorchScript model's precision; for a Python pipeline its entry, its options and what
/// it said it is (library, version, weights). `null` without a model.
fn model_provenance(cfg: &Config, info: &RuntimeInfo) -> Result<serde_json::Value, PipelineError> {
    let Some(m) = &cfg.model else {
        return Ok(serde_json::Value::Null);
    };
    let hash = file_sha256(&m.path).map_err(|source| PipelineError::Io {
        context: format!("cannot hash the model {}", m.path.display()),
        source,
    })?;
    let mut p = serde_json::json!({
        "path": m.path.to_string_lossy(),
        "sha256": hash,
    });
    if let Some(py) = &m.python {
        p["entry"] = py.entry.clone().into();
        p["options"] = py.options.clone();
        p["pipeline"] = info.about.clone().unwrap_or_default();
    } else {
        p["precision"] = m.precision.name().into();
    }
    Ok(p)
}

fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Sample queue depths every 50 ms until told to stop.
fn sample(tel: &Telemetry, probes: &[(Stage, usize, QueueProbe)], stop: &Receiver<()>) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(50))
    {
        for (stage, cap, len) in probes {
            tel.sample_queue(*stage, len(), *cap);
        }
    }
}
