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
//! into a pinned output slot, then a second event. A completion thread waits for the
//! events in order: the first returns the input slot to the ring (it may be refilled only
//! once the copy has read it), the second hands the rows to the encoders. So while batch n
//! computes, batch n+1 is already crossing the bus, and the fit workers fill batch n+2.
//! On the CPU the same loop runs synchronously, without pinning or streams.
//!
//! A batch that fails with a CUDA out-of-memory error is split in halves and retried, down
//! to single images, so no image fails because the batch was too large. Any other model
//! error fails the batch's items (stage `infer`) and the worker carries on.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{Sender, bounded};
use tch::{Device, Kind, TchError, Tensor};

use crate::error::{ItemError, Stage, torch_message};
use crate::pipeline::item::{Item, Outcome};
use crate::pipeline::telemetry::{Telemetry, Timer};
use crate::runtime::batcher::{Assembler, Batch};
use crate::runtime::cuda::{self, Event, Stream};
use crate::runtime::model::Model;

/// A fixed set of uint8 `max_batch x H' x W' x 3` host buffers (pinned for CUDA).
pub struct OutRing {
    tensors: Vec<Tensor>,
    free: Mutex<Vec<usize>>,
    cv: Condvar,
    row_bytes: usize,
    width: u32,
    height: u32,
}

// SAFETY: the tensors are host buffers allocated once; a slot is written only by the
// worker holding it from `acquire` and read only through `OutBatch` handles after that
// write, so sharing the ring between the worker and the encoders is sound.
unsafe impl Sync for OutRing {}
unsafe impl Send for OutRing {}

impl OutRing {
    pub fn new(
        slots: usize,
        max_batch: usize,
        out_hw: (i64, i64),
        pinned_for: Option<Device>,
    ) -> OutRing {
        let (h, w) = out_hw;
        let tensors = (0..slots)
            .map(|_| {
                let t = Tensor::zeros([max_batch as i64, h, w, 3], (Kind::Uint8, Device::Cpu));
                match pinned_for {
                    Some(d) => t.pin_memory(d),
                    None => t,
                }
            })
            .collect();
        OutRing {
            tensors,
            free: Mutex::new((0..slots).collect()),
            cv: Condvar::new(),
            row_bytes: (h * w * 3) as usize,
            width: w as u32,
            height: h as u32,
        }
    }

    fn acquire(&self) -> usize {
        let mut free = self.free.lock().expect("out ring lock");
        loop {
            if let Some(s) = free.pop() {
                return s;
            }
            free = self.cv.wait(free).expect("out ring lock");
        }
    }

    fn release(&self, slot: usize) {
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
    /// Packed RGB8 pixels of `row`.
    pub fn row(&self, row: usize) -> &[u8] {
        let t = &self.ring.tensors[self.slot];
        let base = t.data_ptr() as *const u8;
        // SAFETY: the slot holds `max_batch * row_bytes` bytes, `row < max_batch`, the
        // worker finished writing before creating this handle, and nobody writes the slot
        // again until every handle is dropped.
        unsafe {
            std::slice::from_raw_parts(base.add(row * self.ring.row_bytes), self.ring.row_bytes)
        }
    }

    pub fn width(&self) -> u32 {
        self.ring.width
    }

    pub fn height(&self) -> u32 {
        self.ring.height
    }
}

impl Drop for OutBatch {
    fn drop(&mut self) {
        self.ring.release(self.slot);
    }
}

/// One fitted-and-inferred image for an encoder.
pub struct EncodeJob {
    pub item: Item,
    pub out: Arc<OutBatch>,
    pub row: usize,
}

/// What an inference worker needs besides its model.
pub struct WorkerParts {
    pub assembler: Arc<Assembler<Item>>,
    /// Slot tensors matching the assembler's slot memory (shallow clones).
    pub slots: Vec<Tensor>,
    pub out_ring: Arc<OutRing>,
    pub encode_tx: Sender<EncodeJob>,
    pub outcome_tx: Sender<Outcome>,
    pub telemetry: Arc<Telemetry>,
    /// Test hook: fail the first `n` forward calls with a fake out-of-memory error.
    pub inject_oom: usize,
}

fn is_oom(e: &TchError) -> bool {
    e.to_string().contains("out of memory")
}

fn torch_err(e: cuda::CudaError) -> TchError {
    TchError::Torch(e.to_string())
}

/// The worker loop; returns when the assembler is closed and drained.
pub fn run_worker(model: Model, parts: WorkerParts) {
    let _no_grad = tch::no_grad_guard();
    match model.device() {
        Device::Cuda(i) => {
            if let Err(e) = run_cuda_worker(&model, parts, i) {
                tracing::error!(device = i, error = %e, "inference worker cannot use its CUDA streams; it stops");
            }
        }
        _ => run_cpu_worker(&model, parts),
    }
}

fn run_cpu_worker(model: &Model, mut parts: WorkerParts) {
    while let Some(batch) = parts.assembler.next_batch() {
        let timer = Timer::start();
        let n = batch.rows.len();
        parts.telemetry.batch(n);
        let host = parts.slots[batch.slot].narrow(0, 0, n as i64);
        // The model reads the slot in place; the result is copied out before the slot is
        // given back.
        let slot = parts.out_ring.acquire();
        let r = run_range(
            model,
            &host,
            0,
            n as i64,
            &mut parts.inject_oom,
            &parts.out_ring,
            slot,
            None,
        );
        parts.assembler.release(batch.slot);
        parts
            .telemetry
            .record(Stage::Infer, timer.elapsed(), n as u64);
        let r = match r {
            Ok(()) => Ok(slot),
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
    copied: Event,
    done: Event,
    out_slot: usize,
    result: Result<(), TchError>,
    queued: Instant,
}

fn run_cuda_worker(
    model: &Model,
    mut parts: WorkerParts,
    device: usize,
) -> Result<(), cuda::CudaError> {
    let copy_stream = Stream::from_pool(device, false)?;
    let compute = Stream::from_pool(device, false)?;
    let (h, w) = model.input_hw();
    // One batch per output slot can be in flight; the bounded channel keeps the worker
    // from queueing more work than there are buffers to receive it.
    let (tx, rx) = bounded::<InFlight>(parts.out_ring.tensors.len().max(1));
    let completion = {
        let asm = Arc::clone(&parts.assembler);
        let ring = Arc::clone(&parts.out_ring);
        let tel = Arc::clone(&parts.telemetry);
        let encode_tx = parts.encode_tx.clone();
        let outcome_tx = parts.outcome_tx.clone();
        std::thread::Builder::new()
            .name(format!("hp-complete-{device}"))
            .spawn(move || {
                let mut last_done = Instant::now();
                for f in rx {
                    // The input slot may be refilled once the copy has read it.
                    if let Err(e) = f.copied.synchronize() {
                        tracing::error!(error = %e, "waiting for a host-to-device copy failed");
                    }
                    asm.release(f.batch.slot);
                    let result = match (f.result, f.done.synchronize()) {
                        (Ok(()), Ok(())) => Ok(f.out_slot),
                        (Err(e), _) => Err(e),
                        (Ok(()), Err(e)) => Err(torch_err(e)),
                    };
                    if result.is_err() {
                        ring.release(f.out_slot);
                    }
                    // Device time of this batch: from when the device could start on it
                    // (queued, or the previous batch done) to its completion.
                    let now = Instant::now();
                    let start = f.queued.max(last_done);
                    last_done = now;
                    tel.record(Stage::Infer, now - start, f.batch.rows.len() as u64);
                    dispatch_to(f.batch, result, &ring, &encode_tx, &outcome_tx, &tel);
                }
            })
            .map_err(|e| cuda::CudaError {
                call: "spawn completion thread",
                message: e.to_string(),
            })?
    };

    while let Some(batch) = parts.assembler.next_batch() {
        let queued = Instant::now();
        let n = batch.rows.len() as i64;
        parts.telemetry.batch(batch.rows.len());
        let host = parts.slots[batch.slot].narrow(0, 0, n);
        let mut copied = Event::new()?;
        let mut done = Event::new()?;
        let out_slot = parts.out_ring.acquire();
        let result = (|| -> Result<(), TchError> {
            // Host to device on the copy stream. The device buffer comes from libtorch's
            // caching allocator; recording it on the compute stream keeps it from being
            // reused while the model still reads it.
            let dev_in = {
                let _g = copy_stream.enter().map_err(torch_err)?;
                let mut d = Tensor::f_empty([n, h, w, 3], (Kind::Uint8, model.device()))?;
                cuda::copy_(&mut d, &host, true).map_err(torch_err)?;
                d
            };
            copied.record(&copy_stream).map_err(torch_err)?;
            copied.block(&compute).map_err(torch_err)?;
            let _g = compute.enter().map_err(torch_err)?;
            cuda::record_stream(&dev_in, &compute).map_err(torch_err)?;
            run_range(
                model,
                &dev_in,
                0,
                n,
                &mut parts.inject_oom,
                &parts.out_ring,
                out_slot,
                Some(device),
            )
        })();
        // Recorded after an error too, so the completion thread's wait always returns.
        if let Err(e) = done.record(&compute) {
            tracing::error!(error = %e, "cannot record a completion event");
        }
        let inflight = InFlight {
            batch,
            copied,
            done,
            out_slot,
            result,
            queued,
        };
        if tx.send(inflight).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = completion.join();
    Ok(())
}

/// Run the model on rows `start..start+len` of `x` and write the result into the same
/// rows of output slot `slot`; on out-of-memory, split in halves and retry. With
/// `cuda_device`, the copy back is queued non-blocking on the current (compute) stream.
#[allow(clippy::too_many_arguments)]
fn run_range(
    model: &Model,
    x: &Tensor,
    start: i64,
    len: i64,
    inject_oom: &mut usize,
    ring: &Arc<OutRing>,
    slot: usize,
    cuda_device: Option<usize>,
) -> Result<(), TchError> {
    let part = x.f_narrow(0, start, len)?;
    let result = if *inject_oom > 0 && len > 1 {
        *inject_oom -= 1;
        Err(TchError::Torch(
            "CUDA out of memory (injected for a test)".to_string(),
        ))
    } else {
        model.forward_u8(&part)
    };
    match result {
        Ok(y) => {
            let mut dst = ring.tensors[slot].f_narrow(0, start, len)?;
            match cuda_device {
                Some(_) => cuda::copy_(&mut dst, &y, true).map_err(torch_err),
                None => dst.f_copy_(&y),
            }
        }
        Err(e) if is_oom(&e) && len > 1 => {
            tracing::warn!(
                rows = len,
                "device out of memory; splitting the batch and retrying"
            );
            if let Some(i) = cuda_device {
                // Let queued work finish and return cached blocks before the smaller retry.
                tch::Cuda::synchronize(i as i64);
                let _ = cuda::empty_cache();
            }
            let half = len / 2;
            run_range(model, x, start, half, inject_oom, ring, slot, cuda_device)?;
            run_range(
                model,
                x,
                start + half,
                len - half,
                inject_oom,
                ring,
                slot,
                cuda_device,
            )
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
        &parts.outcome_tx,
        &parts.telemetry,
    )
}

/// Hand a finished batch's rows to the encoders, or report its items as failed.
fn dispatch_to(
    batch: Batch<Item>,
    result: Result<usize, TchError>,
    ring: &Arc<OutRing>,
    encode_tx: &Sender<EncodeJob>,
    outcome_tx: &Sender<Outcome>,
    telemetry: &Telemetry,
) {
    match result {
        Ok(slot) => {
            let out = Arc::new(OutBatch {
                ring: Arc::clone(ring),
                slot,
            });
            for (row, meta) in batch.rows.into_iter().enumerate() {
                if let Some(item) = meta {
                    let job = EncodeJob {
                        item,
                        out: Arc::clone(&out),
                        row,
                    };
                    if encode_tx.send(job).is_err() {
                        return; // encoders gone: the pipeline is shutting down
                    }
                }
            }
        }
        Err(e) => {
            let reason = torch_message(&e);
            tracing::error!(rows = batch.rows.len(), error = %reason, "inference failed for a batch");
            for item in batch.rows.into_iter().flatten() {
                telemetry.failed(Stage::Infer);
                let err =
                    ItemError::new(&item.path, Stage::Infer, format!("model failed: {reason}"));
                let _ = outcome_tx.send(Outcome {
                    item,
                    result: Err(err),
                });
            }
        }
    }
}
