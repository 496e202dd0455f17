//! The inference worker (one thread per device) and the output ring.
//!
//! The worker owns its [`Model`]. For each sealed batch from the [`Assembler`] it moves the
//! uint8 slot to the device, runs the model, and copies the uint8 result into a free slot
//! of its [`OutRing`]; encoders read rows from there and the slot returns to the ring when
//! the last row's [`OutBatch`] handle is dropped. The ring is bounded, so slow encoders
//! stall inference instead of piling up results (back-pressure, not unbounded memory).
//!
//! A batch that fails with a CUDA out-of-memory error is split in halves and retried, down
//! to single images, so no image fails because the batch was too large. Any other model
//! error fails the batch's items (stage `infer`) and the worker carries on.

use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::Sender;
use tch::{Device, Kind, TchError, Tensor};

use crate::error::{ItemError, Stage, torch_message};
use crate::pipeline::item::{Item, Outcome};
use crate::pipeline::telemetry::{Telemetry, Timer};
use crate::runtime::batcher::{Assembler, Batch};
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

    fn acquire(self: &Arc<Self>) -> usize {
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
    let s = e.to_string();
    s.contains("out of memory") || s.contains("CUDA error: out of memory")
}

/// The worker loop; returns when the assembler is closed and drained.
pub fn run_worker(model: Model, mut parts: WorkerParts) {
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    while let Some(batch) = parts.assembler.next_batch() {
        let timer = Timer::start();
        let n = batch.rows.len();
        parts.telemetry.batch(n);
        let host = parts.slots[batch.slot].narrow(0, 0, n as i64);
        let result = if device == Device::Cpu {
            // The model reads the slot in place; copy the result out before the slot is
            // given back.
            let r = run_split(&model, &host, &mut parts.inject_oom, &parts.out_ring);
            parts.assembler.release(batch.slot);
            r
        } else {
            match host.f_to_device(device) {
                Ok(x) => {
                    parts.assembler.release(batch.slot);
                    run_split(&model, &x, &mut parts.inject_oom, &parts.out_ring)
                }
                Err(e) => {
                    parts.assembler.release(batch.slot);
                    Err(e)
                }
            }
        };
        parts
            .telemetry
            .record(Stage::Infer, timer.elapsed(), n as u64);
        dispatch(batch, result, &parts);
    }
}

/// Run the model on `x`; on out-of-memory, split the batch in halves and retry, writing
/// each part's rows into the output slot at their offsets.
fn run_split(
    model: &Model,
    x: &Tensor,
    inject_oom: &mut usize,
    ring: &Arc<OutRing>,
) -> Result<usize, TchError> {
    let slot = ring.acquire();
    match run_range(model, x, 0, x.size()[0], inject_oom, ring, slot) {
        Ok(()) => Ok(slot),
        Err(e) => {
            ring.release(slot);
            Err(e)
        }
    }
}

fn run_range(
    model: &Model,
    x: &Tensor,
    start: i64,
    len: i64,
    inject_oom: &mut usize,
    ring: &Arc<OutRing>,
    slot: usize,
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
            let dst = ring.tensors[slot].f_narrow(0, start, len)?;
            let mut dst = dst;
            dst.f_copy_(&y)?;
            Ok(())
        }
        Err(e) if is_oom(&e) && len > 1 => {
            tracing::warn!(
                rows = len,
                "device out of memory; splitting the batch and retrying"
            );
            if model.device() != Device::Cpu {
                // Return cached blocks before the smaller retry.
                tch::Cuda::synchronize(match model.device() {
                    Device::Cuda(i) => i as i64,
                    _ => 0,
                });
            }
            let half = len / 2;
            run_range(model, x, start, half, inject_oom, ring, slot)?;
            run_range(model, x, start + half, len - half, inject_oom, ring, slot)
        }
        Err(e) => Err(e),
    }
}

fn dispatch(batch: Batch<Item>, result: Result<usize, TchError>, parts: &WorkerParts) {
    match result {
        Ok(slot) => {
            let out = Arc::new(OutBatch {
                ring: Arc::clone(&parts.out_ring),
                slot,
            });
            for (row, meta) in batch.rows.into_iter().enumerate() {
                if let Some(item) = meta {
                    let job = EncodeJob {
                        item,
                        out: Arc::clone(&out),
                        row,
                    };
                    if parts.encode_tx.send(job).is_err() {
                        return; // encoders gone: the pipeline is shutting down
                    }
                }
            }
        }
        Err(e) => {
            let reason = torch_message(&e);
            tracing::error!(rows = batch.rows.len(), error = %reason, "inference failed for a batch");
            for item in batch.rows.into_iter().flatten() {
                parts.telemetry.failed(Stage::Infer);
                let err =
                    ItemError::new(&item.path, Stage::Infer, format!("model failed: {reason}"));
                let _ = parts.outcome_tx.send(Outcome {
                    item,
                    result: Err(err),
                });
            }
        }
    }
}
