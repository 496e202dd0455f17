//! The inference worker (one thread per device) and the output ring.
//!
//! The worker owns its [`Model`]. For each sealed batch from the [`Assembler`] it moves the
//! uint8 slot to the device, runs the model, and copies the uint8 result into a free slot
//! of its [`OutRing`]; encoders read rows from there and the slot returns to the ring when
//! the last row's [`OutBatch`] handle is dropped. The ring is bounded, so slow encoders
//! stall inference instead of piling up results (back-pressure, not unbounded memory).
//!
//! On a GPU the worker never waits for the device. Per batch it queues, without blocking:
//! the host-to-device copy of the pinned slot on a dedicated *copy stream*, an event; on
//! the *compute stream* a wait for that event, the model, and the device-to-host copy
//! into a pinned output slot, then a second event. Two helper threads wait for the events
//! in order, polling rather than spinning a core: one returns each input slot to the ring
//! once its copy has read it (it may be refilled then, whatever the encoders are doing),
//! the other hands the rows to the encoders once the result is in its pinned slot. So
//! while batch n computes, batch n+1 is already crossing the bus, and the fit workers fill
//! batch n+2. On the CPU the same loop runs synchronously, without pinning or streams.
//!
//! A batch that fails with a CUDA out-of-memory error is split in halves and retried, down
//! to single images, so no image fails because the batch was too large; the worker
//! remembers the size that fitted and runs later batches in chunks of it (growing back
//! after a run of clean batches). Any other model error fails the batch's items (stage
//! `infer`) and the worker carries on.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, SendError, Sender, bounded};
use tch::{Device, Kind, TchError, Tensor};

use crate::runtime::batcher::{Assembler, Batch, SlotMemory};
use crate::runtime::cuda::{self, Event, Stream};
use crate::runtime::model::Model;
use crate::vocab::crash;
use crate::vocab::error::{Stage, StageError, torch_message};
use crate::vocab::fault::{self, Fault};
use crate::vocab::item::Item;
use crate::vocab::params::Params;
use crate::vocab::stage::Reporter;
use crate::vocab::telemetry::Timer;

/// A fixed set of uint8 `max_batch*K x H' x W' x C'` host buffers (pinned for CUDA), K
/// being the model's outputs per input.
pub struct OutRing {
    tensors: Vec<Tensor>,
    /// What owns the tensors' memory when the ring does not (shared with a Python worker).
    _memory: Option<Arc<dyn Send + Sync>>,
    free: Mutex<Vec<usize>>,
    cv: Condvar,
    row_bytes: usize,
    width: u32,
    height: u32,
    channels: usize,
    per_input: usize,
    /// Bytes in one slot: `rows * row_bytes`.
    slot_bytes: usize,
}

// SAFETY: the tensors are host buffers allocated once; a slot is written only by the
// worker holding it from `acquire` and read only through `OutBatch` handles after that
// write, so sharing the ring between the worker and the encoders is sound.
unsafe impl Sync for OutRing {}
unsafe impl Send for OutRing {}

impl OutRing {
    /// `out_chw`: the model's output channels and size, `(C', H', W')`; `per_input`: its
    /// outputs per input (K).
    pub fn new(
        slots: usize,
        max_batch: usize,
        (out_chw, per_input): ((i64, i64, i64), usize),
        pinned_for: Option<Device>,
    ) -> OutRing {
        let (c, h, w) = out_chw;
        let rows = (max_batch * per_input) as i64;
        let tensors = (0..slots)
            .map(|_| {
                let t = Tensor::zeros([rows, h, w, c], (Kind::Uint8, Device::Cpu));
                match pinned_for {
                    Some(d) => t.pin_memory(d),
                    None => t,
                }
            })
            .collect();
        OutRing::of(tensors, None, (c, h, w), per_input, rows as usize)
    }

    /// A ring over memory it does not own: `slots` of `max_batch*K` rows each, kept
    /// alive by `memory` (a Python worker's output slots in shared memory).
    pub fn over(
        slots: &[SlotMemory],
        max_batch: usize,
        (out_chw, per_input): ((i64, i64, i64), usize),
        memory: Arc<dyn Send + Sync>,
    ) -> OutRing {
        let (c, h, w) = out_chw;
        let rows = max_batch * per_input;
        let tensors = slots
            .iter()
            .map(|m| {
                assert!(
                    m.len >= rows * (h * w * c) as usize,
                    "output slot too small"
                );
                // SAFETY: `m` spans at least the tensor's bytes and lives as long as
                // `memory`, which the ring holds for as long as the tensors exist.
                unsafe {
                    Tensor::from_blob(
                        m.ptr,
                        &[rows as i64, h, w, c],
                        &[h * w * c, w * c, c, 1],
                        Kind::Uint8,
                        Device::Cpu,
                    )
                }
            })
            .collect();
        OutRing::of(tensors, Some(memory), (c, h, w), per_input, rows)
    }

    fn of(
        tensors: Vec<Tensor>,
        memory: Option<Arc<dyn Send + Sync>>,
        (c, h, w): (i64, i64, i64),
        per_input: usize,
        rows: usize,
    ) -> OutRing {
        let slots = tensors.len();
        OutRing {
            tensors,
            _memory: memory,
            free: Mutex::new((0..slots).collect()),
            cv: Condvar::new(),
            row_bytes: (h * w * c) as usize,
            width: w as u32,
            height: h as u32,
            channels: c as usize,
            per_input,
            slot_bytes: rows * (h * w * c) as usize,
        }
    }

    pub(crate) fn acquire(&self) -> usize {
        let mut free = self.free.lock().expect("out ring lock");
        loop {
            if let Some(s) = free.pop() {
                return s;
            }
            free = self.cv.wait(free).expect("out ring lock");
        }
    }

    pub(crate) fn release(&self, slot: usize) {
        self.free.lock().expect("out ring lock").push(slot);
        self.cv.notify_one();
    }
}

/// One batch's results in an output slot; the slot returns to the ring when the last
/// handle (one per row being encoded) is dropped.
pub struct OutBatch {
    ring: Arc<OutRing>,
    slot: usize,
}

impl OutBatch {
    /// Packed pixels of output `k` of input `row` (`channels` bytes each).
    pub fn output(&self, row: usize, k: usize) -> &[u8] {
        assert!(
            k < self.ring.per_input,
            "output {k} of {}",
            self.ring.per_input
        );
        let t = &self.ring.tensors[self.slot];
        let base = t.data_ptr() as *const u8;
        let at = (row * self.ring.per_input + k) * self.ring.row_bytes;
        assert!(
            at + self.ring.row_bytes <= self.ring.slot_bytes,
            "row {row} outside the slot"
        );
        // SAFETY: `at..at + row_bytes` lies inside the slot (checked above), the worker
        // finished writing before creating this handle, and nobody writes the slot again
        // until every handle is dropped.
        unsafe { std::slice::from_raw_parts(base.add(at), self.ring.row_bytes) }
    }

    /// Outputs per input (K).
    pub fn per_input(&self) -> usize {
        self.ring.per_input
    }

    pub fn width(&self) -> u32 {
        self.ring.width
    }

    pub fn height(&self) -> u32 {
        self.ring.height
    }

    /// Bytes per pixel: 1 (grey), 3 (RGB) or 4 (RGBA).
    pub fn channels(&self) -> usize {
        self.ring.channels
    }
}

impl Drop for OutBatch {
    fn drop(&mut self) {
        self.ring.release(self.slot);
    }
}

/// One fitted-and-inferred input for an encoder: its outputs are those of input row `row`
/// of an output slot. The encode queue carries it with its item.
pub struct Inferred {
    pub out: Arc<OutBatch>,
    pub row: usize,
}

/// What an inference worker needs besides its model.
pub struct WorkerParts {
    pub assembler: Arc<Assembler<Item>>,
    /// Slot tensors matching the assembler's slot memory (shallow clones).
    pub slots: Vec<Tensor>,
    pub out_ring: Arc<OutRing>,
    pub encode_tx: Sender<(Item, Inferred)>,
    /// Failed items and the stage's telemetry.
    pub reporter: Reporter,
}

/// The one place that recognises a device out of memory: libtorch reports it only in
/// the message ("CUDA out of memory. Tried to allocate ...").
fn is_oom(e: &TchError) -> bool {
    e.to_string().contains("out of memory")
}

fn torch_err(e: cuda::CudaError) -> TchError {
    TchError::Torch(e.to_string())
}

/// How many rows the device has shown it can run at once.
///
/// An out-of-memory error halves it and later batches are cut into chunks of that size,
/// so a persistent shortage is paid once (one failed forward, one cache flush), not on
/// every batch. After `REGROW_AFTER` clean batches it doubles again (up to the configured
/// batch), so a transient shortage (another process briefly on the GPU) does not cap the
/// batch for the rest of a months-long run.
#[derive(Debug)]
struct RowLimit {
    max: i64,
    cap: i64,
    clean: u32,
}

const REGROW_AFTER: u32 = 64;

impl RowLimit {
    fn new(cap: usize) -> RowLimit {
        let cap = cap.max(1) as i64;
        RowLimit {
            max: cap,
            cap,
            clean: 0,
        }
    }

    fn shrink_below(&mut self, failed_rows: i64) {
        self.max = self.max.min((failed_rows / 2).max(1));
        self.clean = 0;
    }

    fn batch_ok(&mut self) {
        if self.max >= self.cap {
            return;
        }
        self.clean += 1;
        if self.clean >= REGROW_AFTER {
            self.max = (self.max * 2).min(self.cap);
            self.clean = 0;
            tracing::info!(
                rows = self.max,
                "no out-of-memory for {REGROW_AFTER} batches; trying larger chunks again"
            );
        }
    }
}

/// What [`run_range`] needs besides the rows: the model, where results go, and the
/// worker's out-of-memory state.
struct RunCtx<'a> {
    model: &'a Model,
    ring: &'a OutRing,
    slot: usize,
    /// The compute stream (current on this thread) on CUDA; `None` runs synchronously.
    compute: Option<&'a Stream>,
    /// The batch's first item, which names the batch to fault injection (tests only).
    fault_key: &'a Path,
    /// Each row's parameters, when the model takes them (else empty).
    params: &'a [Option<&'a Params>],
    limit: &'a mut RowLimit,
}

/// The worker loop; returns when the assembler is closed and drained.
pub fn run_worker(model: Model, parts: WorkerParts) {
    let model = match model.into_python() {
        Ok(sup) => return crate::runtime::python::infer::run_worker(sup, parts),
        Err(model) => *model,
    };
    let _no_grad = tch::no_grad_guard();
    match model.device() {
        Device::Cuda(i) => match (Stream::from_pool(i, false), Stream::from_pool(i, false)) {
            (Ok(copy), Ok(compute)) => run_cuda_worker(&model, parts, i, copy, compute),
            (Err(e), _) | (_, Err(e)) => {
                // Still correct, only slower: every batch then copies and computes in turn.
                tracing::error!(device = i, error = %e, "no CUDA streams for this worker; running without copy/compute overlap");
                run_sync_worker(&model, parts)
            }
        },
        _ => run_sync_worker(&model, parts),
    }
}

/// One batch at a time, waiting for each step: the CPU path, and the fallback on a GPU
/// when streams cannot be had.
fn run_sync_worker(model: &Model, parts: WorkerParts) {
    let mut limit = RowLimit::new(parts.assembler.max_batch());
    while let Some(batch) = parts.assembler.next_batch() {
        let timer = Timer::start();
        let n = batch.rows.len();
        parts.reporter.telemetry.batch(n);
        let host = parts.slots[batch.slot].narrow(0, 0, n as i64);
        // On the CPU the model reads the slot in place; the result is copied out before
        // the slot is given back.
        let slot = parts.out_ring.acquire();
        let held = crash::hold(batch_paths(&batch));
        let params = row_params(model, &batch);
        let r = (|| {
            let x = match model.device() {
                Device::Cpu => host.shallow_clone(),
                d => host.f_to_device(d)?,
            };
            let mut ctx = RunCtx {
                model,
                ring: &parts.out_ring,
                slot,
                compute: None,
                fault_key: fault_key(&batch),
                params: &params,
                limit: &mut limit,
            };
            run_range(&mut ctx, &x, 0, n as i64)
        })();
        drop((held, params));
        parts.assembler.release(batch.slot);
        parts
            .reporter
            .telemetry
            .record(Stage::Infer, timer.elapsed(), n as u64);
        let r = match r {
            Ok(()) => {
                limit.batch_ok();
                Ok(slot)
            }
            Err(e) => {
                parts.out_ring.release(slot);
                Err(e)
            }
        };
        dispatch(batch, r, &parts);
    }
}

/// A batch queued on the device, for the completion thread.
struct InFlight {
    batch: Batch<Item>,
    done: Event,
    out_slot: usize,
    result: Result<(), TchError>,
    queued: Instant,
}

fn spawn_named(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, TchError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| TchError::Torch(format!("cannot start a thread: {e}")))
}

/// The overlapped GPU loop: queues each batch on the streams and leaves the waiting to
/// the helper threads (see the module docs); falls back to [`run_sync_worker`] when they
/// cannot be started.
fn run_cuda_worker(
    model: &Model,
    parts: WorkerParts,
    device: usize,
    copy_stream: Stream,
    compute: Stream,
) {
    let limit = RowLimit::new(parts.assembler.max_batch());
    let Some(helpers) = Helpers::start(&parts, device) else {
        return run_sync_worker(model, parts);
    };
    let mut worker = CudaWorker {
        model,
        parts,
        limit,
        copy_stream,
        compute,
    };
    while let Some(batch) = worker.parts.assembler.next_batch() {
        let Some(inflight) = worker.enqueue(batch, &helpers.rel_tx) else {
            continue;
        };
        if let Err(SendError(f)) = helpers.tx.send(inflight) {
            worker.fail_the_rest(f);
            break;
        }
    }
    helpers.finish();
}

/// The two CUDA helper threads and the channels that feed them.
///
/// Input slots go back to the fit workers as soon as their copy has read them, in a
/// thread of their own, so a slow encoder holding up the completion of batch n never
/// delays the refill of batch n+1's slot. Both channels are bounded by the slots they
/// track, so the worker never queues more than there are buffers for.
struct Helpers {
    /// To the releaser: an input slot and the event its host-to-device copy records.
    rel_tx: Sender<(Event, usize)>,
    /// To the completion thread, in queue order.
    tx: Sender<InFlight>,
    releaser: std::thread::JoinHandle<()>,
    completion: std::thread::JoinHandle<()>,
}

impl Helpers {
    /// Start the releaser, then the completion thread; `None` (with both stopped again)
    /// when either cannot be started, for the caller to run without overlap.
    fn start(parts: &WorkerParts, device: usize) -> Option<Helpers> {
        let (rel_tx, rel_rx) = bounded::<(Event, usize)>(parts.slots.len().max(1));
        let (tx, rx) = bounded::<InFlight>(parts.out_ring.tensors.len().max(1));
        let releaser = {
            let asm = Arc::clone(&parts.assembler);
            spawn_named(format!("hp-release-{device}"), move || {
                for (copied, slot) in rel_rx {
                    if let Err(e) = copied.wait() {
                        tracing::error!(error = %e, "waiting for a host-to-device copy failed");
                    }
                    asm.release(slot);
                }
            })
        };
        let completion = {
            let ring = Arc::clone(&parts.out_ring);
            let encode_tx = parts.encode_tx.clone();
            let reporter = parts.reporter.clone();
            spawn_named(format!("hp-complete-{device}"), move || {
                complete_in_order(rx, &ring, &encode_tx, &reporter)
            })
        };
        match (releaser, completion) {
            (Ok(releaser), Ok(completion)) => Some(Helpers {
                rel_tx,
                tx,
                releaser,
                completion,
            }),
            (r, c) => {
                tracing::error!("cannot start the CUDA helper threads; running without overlap");
                // The one that started runs until its channel closes.
                drop((rel_tx, tx));
                for t in [r, c].into_iter().flatten() {
                    let _ = t.join();
                }
                None
            }
        }
    }

    /// Close both channels and wait for the threads: the completion thread dispatches
    /// every batch still queued, the releaser returns every input slot.
    fn finish(self) {
        let Helpers {
            rel_tx,
            tx,
            releaser,
            completion,
        } = self;
        drop(tx);
        drop(rel_tx);
        let _ = completion.join();
        let _ = releaser.join();
    }
}

/// The completion thread: waits for each batch's done event in queue order, records its
/// device time and hands its rows on (or fails its items).
fn complete_in_order(
    rx: Receiver<InFlight>,
    ring: &Arc<OutRing>,
    encode_tx: &Sender<(Item, Inferred)>,
    reporter: &Reporter,
) {
    let mut last_done = Instant::now();
    for f in rx {
        let result = match (f.result, f.done.wait()) {
            (Ok(()), Ok(())) => Ok(f.out_slot),
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(torch_err(e)),
        };
        if result.is_err() {
            ring.release(f.out_slot);
        }
        // Device time of this batch: from when the device could start on it (queued, or
        // the previous batch done) to its completion.
        let now = Instant::now();
        let start = f.queued.max(last_done);
        last_done = now;
        let rows = f.batch.rows.len() as u64;
        reporter.telemetry.record(Stage::Infer, now - start, rows);
        dispatch_to(f.batch, result, ring, encode_tx, reporter);
    }
}

/// The CUDA worker's own state: what [`run_cuda_worker`] queues batches with.
struct CudaWorker<'a> {
    model: &'a Model,
    parts: WorkerParts,
    limit: RowLimit,
    copy_stream: Stream,
    compute: Stream,
}

impl CudaWorker<'_> {
    /// Queue `batch` on the streams without waiting for the device, and hand its input
    /// slot to the releaser (`release`). Returns the batch for the completion thread, or
    /// `None` when it failed before anything was queued (its items are failed here).
    fn enqueue(
        &mut self,
        batch: Batch<Item>,
        release: &Sender<(Event, usize)>,
    ) -> Option<InFlight> {
        let queued = Instant::now();
        let n = batch.rows.len() as i64;
        self.parts.reporter.telemetry.batch(batch.rows.len());
        let host = self.parts.slots[batch.slot].narrow(0, 0, n);
        let (mut copied, mut done) = match (Event::new(), Event::new()) {
            (Ok(c), Ok(d)) => (c, d),
            (Err(e), _) | (_, Err(e)) => {
                self.parts.assembler.release(batch.slot);
                dispatch(batch, Err(torch_err(e)), &self.parts);
                return None;
            }
        };
        let out_slot = self.parts.out_ring.acquire();
        let _held = crash::hold(batch_paths(&batch));
        let params = row_params(self.model, &batch);
        let result = self.copy_and_run(&host, &mut copied, out_slot, &batch, &params);
        // Recorded after an error too, so the completion thread's wait always returns.
        let recorded = done.record(&self.compute);
        if result.is_err() || recorded.is_err() {
            // An event that was never recorded reads as complete: let both streams drain
            // so neither slot is handed out while a copy may still touch it.
            let _ = self.copy_stream.synchronize();
            let _ = self.compute.synchronize();
        }
        if let Err(e) = &recorded {
            tracing::error!(error = %e, "cannot record a completion event");
        }
        if result.is_ok() {
            self.limit.batch_ok();
        }
        if let Err(SendError((_, slot))) = release.send((copied, batch.slot)) {
            self.parts.assembler.release(slot);
        }
        Some(InFlight {
            batch,
            done,
            out_slot,
            result,
            queued,
        })
    }

    /// Queue the copy of the `n` rows of `host` to the device (recording `copied` on the
    /// copy stream), and on the compute stream, once that event is reached, the model and
    /// the copy of its result into output slot `out_slot`.
    fn copy_and_run(
        &mut self,
        host: &Tensor,
        copied: &mut Event,
        out_slot: usize,
        batch: &Batch<Item>,
        params: &[Option<&Params>],
    ) -> Result<(), TchError> {
        let n = batch.rows.len() as i64;
        let (h, w) = self.model.input_hw();
        let c = self.model.input_channels();
        // Host to device on the copy stream. The device buffer comes from libtorch's
        // caching allocator; recording it on the compute stream keeps it from being
        // reused while the model still reads it.
        let dev_in = {
            let _g = self.copy_stream.enter().map_err(torch_err)?;
            let mut d = Tensor::f_empty([n, h, w, c], (Kind::Uint8, self.model.device()))?;
            cuda::copy_(&mut d, host, true).map_err(torch_err)?;
            d
        };
        copied.record(&self.copy_stream).map_err(torch_err)?;
        copied.block(&self.compute).map_err(torch_err)?;
        let _g = self.compute.enter().map_err(torch_err)?;
        cuda::record_stream(&dev_in, &self.compute).map_err(torch_err)?;
        let mut ctx = RunCtx {
            model: self.model,
            ring: &self.parts.out_ring,
            slot: out_slot,
            compute: Some(&self.compute),
            fault_key: fault_key(batch),
            params,
            limit: &mut self.limit,
        };
        run_range(&mut ctx, &dev_in, 0, n)
    }

    /// The completion thread is gone (it panicked): finish batch `f` here and fail what
    /// is left rather than leave the fit workers waiting for slots.
    fn fail_the_rest(&mut self, f: InFlight) {
        let _ = self.compute.synchronize();
        self.parts.out_ring.release(f.out_slot);
        let gone = || TchError::Torch("the CUDA completion thread stopped".into());
        dispatch(f.batch, Err(gone()), &self.parts);
        while let Some(b) = self.parts.assembler.next_batch() {
            self.parts.assembler.release(b.slot);
            dispatch(b, Err(gone()), &self.parts);
        }
    }
}

/// Run the model on rows `start..start+len` of `x` and write the result into the same
/// rows of the output slot. Rows beyond the learned [`RowLimit`] run in chunks; an
/// out-of-memory error shrinks the limit and retries in halves, down to single images.
/// On CUDA the copy back is queued non-blocking on the compute stream.
fn run_range(ctx: &mut RunCtx<'_>, x: &Tensor, start: i64, len: i64) -> Result<(), TchError> {
    if len > ctx.limit.max {
        let end = start + len;
        let mut s = start;
        while s < end {
            let l = ctx.limit.max.min(end - s);
            run_range(ctx, x, s, l)?;
            s += l;
        }
        return Ok(());
    }
    let part = x.f_narrow(0, start, len)?;
    let k = ctx.ring.per_input as i64;
    let injected = len > 1 && fault::check("infer", ctx.fault_key) == Some(Fault::Oom);
    let result = if injected {
        Err(TchError::Torch(
            "CUDA out of memory (injected for a test)".to_string(),
        ))
    } else {
        let rows = ctx
            .params
            .get(start as usize..(start + len) as usize)
            .unwrap_or_default();
        ctx.model.forward_u8(&part, rows)
    };
    match result {
        Ok(y) => {
            let mut dst = ctx.ring.tensors[ctx.slot].f_narrow(0, start * k, len * k)?;
            match ctx.compute {
                Some(_) => cuda::copy_(&mut dst, &y, true).map_err(torch_err),
                None => dst.f_copy_(&y),
            }
        }
        Err(e) if is_oom(&e) && len > 1 => {
            ctx.limit.shrink_below(len);
            tracing::warn!(
                rows = len,
                limit = ctx.limit.max,
                "device out of memory; running this and later batches in smaller chunks"
            );
            if let Some(stream) = ctx.compute {
                // Let queued work finish and return cached blocks before the smaller retry.
                stream.synchronize().map_err(torch_err)?;
                let _ = cuda::empty_cache();
            }
            let half = len / 2;
            run_range(ctx, x, start, half)?;
            run_range(ctx, x, start + half, len - half)
        }
        Err(e) => Err(e),
    }
}

fn dispatch(batch: Batch<Item>, result: Result<usize, TchError>, parts: &WorkerParts) {
    dispatch_to(
        batch,
        result,
        &parts.out_ring,
        &parts.encode_tx,
        &parts.reporter,
    )
}

/// Each row's parameters, when the model takes them (one small vector per batch; none,
/// and nothing allocated, for `forward(x)` models).
fn row_params<'a>(model: &Model, batch: &'a Batch<Item>) -> Vec<Option<&'a Params>> {
    if !model.takes_params() {
        return Vec::new();
    }
    batch
        .rows
        .iter()
        .map(|r| r.as_ref().and_then(|i| i.params.as_ref()))
        .collect()
}

/// The inputs of a batch's items, for [`crash::hold`].
pub(crate) fn batch_paths(batch: &Batch<Item>) -> impl Iterator<Item = &Path> + Clone {
    batch.rows.iter().flatten().map(|i| i.path.as_path())
}

/// The path fault injection knows a batch by: its first item's.
fn fault_key(batch: &Batch<Item>) -> &Path {
    batch
        .rows
        .iter()
        .flatten()
        .next()
        .map_or(Path::new(""), |i| i.path.as_path())
}

/// Hand a finished batch's rows to the encoders, or report its items as failed.
fn dispatch_to(
    batch: Batch<Item>,
    result: Result<usize, TchError>,
    ring: &Arc<OutRing>,
    encode_tx: &Sender<(Item, Inferred)>,
    reporter: &Reporter,
) {
    match result {
        Ok(slot) => dispatch_rows(batch, slot, |_| None, ring, encode_tx, reporter),
        Err(e) => {
            let reason = torch_message(&e);
            tracing::error!(rows = batch.rows.len(), error = %reason, "inference failed for a batch");
            // Out of memory even for one image is transient (the device may have memory
            // later); any other model error is a property of the input or the model.
            let message = format!("model failed: {reason}");
            let err = if is_oom(&e) {
                StageError::DeviceOom(message)
            } else {
                StageError::Failed(message)
            };
            for item in batch.rows.into_iter().flatten() {
                reporter.fail(item, Stage::Infer, &err);
            }
        }
    }
}

/// Hand the rows of a batch whose results are in output slot `slot` to the encoders,
/// except those `failed` gives an error for (by row), which are reported failed. The
/// slot returns to the ring when the last row handed on has been encoded.
pub(crate) fn dispatch_rows(
    batch: Batch<Item>,
    slot: usize,
    mut failed: impl FnMut(usize) -> Option<StageError>,
    ring: &Arc<OutRing>,
    encode_tx: &Sender<(Item, Inferred)>,
    reporter: &Reporter,
) {
    let out = Arc::new(OutBatch {
        ring: Arc::clone(ring),
        slot,
    });
    for (row, meta) in batch.rows.into_iter().enumerate() {
        let Some(item) = meta else { continue };
        if let Some(err) = failed(row) {
            reporter.fail(item, Stage::Infer, &err);
            continue;
        }
        let job = Inferred {
            out: Arc::clone(&out),
            row,
        };
        if encode_tx.send((item, job)).is_err() {
            return; // encoders gone: the pipeline is shutting down
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_limit_shrinks_on_oom_and_regrows_after_clean_batches() {
        let mut l = RowLimit::new(16);
        l.batch_ok();
        assert_eq!(l.max, 16);
        l.shrink_below(16);
        assert_eq!(l.max, 8);
        // A failure of a smaller range than the limit never raises it.
        l.shrink_below(32);
        assert_eq!(l.max, 8);
        l.shrink_below(8);
        l.shrink_below(4);
        assert_eq!(l.max, 2);
        l.shrink_below(1);
        assert_eq!(l.max, 1, "never below one row");
        for _ in 0..REGROW_AFTER - 1 {
            l.batch_ok();
        }
        assert_eq!(l.max, 1);
        l.batch_ok();
        assert_eq!(l.max, 2);
        for _ in 0..10 * REGROW_AFTER {
            l.batch_ok();
        }
        assert_eq!(l.max, 16, "grows back to the configured batch, not past it");
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn oom_chunks_later_batches_at_the_learned_size() {
        let _g = tch::no_grad_guard();
        let cfg = crate::config::Config::from_toml(
            "[preprocess]\nsize = 8\n",
            "test",
            std::path::Path::new("."),
            0,
        )
        .unwrap();
        let model = Model::identity(Device::Cpu, &cfg.preprocess);
        let ring = OutRing::new(1, 8, ((3, 8, 8), 1), None);
        let x = Tensor::arange(8 * 8 * 8 * 3, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([8, 8, 8, 3]);
        // Rules keyed on this test's own path, so no other test's batch is hit.
        let key = std::path::Path::new("/unit-test/oom-chunks/0.jpg");
        fault::arm("infer:oom:1:/unit-test/oom-chunks/");
        let mut limit = RowLimit::new(8);
        let mut ctx = RunCtx {
            model: &model,
            ring: &ring,
            slot: 0,
            compute: None,
            fault_key: key,
            params: &[],
            limit: &mut limit,
        };
        run_range(&mut ctx, &x, 0, 8).unwrap();
        assert_eq!(ctx.limit.max, 4, "8 rows failed: the limit halves");
        assert!(
            ring.tensors[0].equal(&x),
            "the split halves wrote every row"
        );
        // The next batch of 8 must run as chunks of 4: an error on its first forward
        // call then halves 4 (to 2); had the batch run whole, halving 8 would leave 4.
        fault::arm("infer:oom:1:/unit-test/oom-chunks/");
        let _ = ring.tensors[0].shallow_clone().fill_(0);
        run_range(&mut ctx, &x, 0, 8).unwrap();
        assert_eq!(ctx.limit.max, 2);
        assert!(ring.tensors[0].equal(&x), "every row written, in place");
    }
}
