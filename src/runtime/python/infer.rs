//! The inference worker of a Python pipeline: one thread per worker process, taking
//! sealed batches from the assembler like the TorchScript worker does.
//!
//! The batch slot and the output slot are both in the memory the worker maps, so a batch
//! costs one control frame each way and no copy: the worker reads the rows the fit
//! workers wrote and writes its results where the encoders read them. Each image ends on
//! its own: made, failed with the exception's last line, out of memory (transient: the
//! hot folder retries it), or failed for killing the worker `max_attempts` times. When no
//! worker can be started at all the images are not to blame: they fail as transient,
//! stay in `work/` and are retried.

use serde_json::Value;

use super::{RowError, RowOutcome, Supervisor};
use crate::runtime::infer::{WorkerParts, batch_paths, dispatch_rows};
use crate::vocab::crash;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::telemetry::Timer;

/// The loop; returns when the assembler is closed and drained (the supervisor, dropped
/// then, stops its worker).
pub fn run_worker(mut sup: Supervisor, parts: WorkerParts) {
    let no_params = sup.placeholders().clone();
    while let Some(batch) = parts.assembler.next_batch() {
        let timer = Timer::start();
        let n = batch.rows.len();
        parts.reporter.telemetry.batch(n);
        let params: Vec<Value> = (batch.rows.iter())
            .map(|r| {
                r.as_ref()
                    .and_then(|i| i.params.as_ref())
                    .map_or_else(|| no_params.clone(), |p| p.to_json())
            })
            .collect();
        let out_slot = parts.out_ring.acquire();
        let held = crash::hold(batch_paths(&batch));
        let result = sup.run_slots(batch.slot, out_slot, &params);
        drop(held);
        parts.assembler.release(batch.slot);
        parts
            .reporter
            .telemetry
            .record(Stage::Infer, timer.elapsed(), n as u64);
        let outcomes = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(rows = n, error = %e, device = sup.device(), "no model worker for a batch; its images wait for a retry");
                let why = e.to_string();
                let unavailable = |_| Some(StageError::Unavailable(why.clone()));
                dispatch_rows(
                    batch,
                    out_slot,
                    unavailable,
                    &parts.out_ring,
                    &parts.encode_tx,
                    &parts.reporter,
                );
                continue;
            }
        };
        dispatch_rows(
            batch,
            out_slot,
            |row| row_error(&outcomes[row]),
            &parts.out_ring,
            &parts.encode_tx,
            &parts.reporter,
        );
    }
}

/// How an image's outcome reads as a stage error (`None`: made).
fn row_error(o: &RowOutcome) -> Option<StageError> {
    match o {
        RowOutcome::Made => None,
        RowOutcome::Failed(RowError::Raised(m)) => {
            Some(StageError::Failed(format!("model failed: {m}")))
        }
        RowOutcome::Failed(RowError::OutOfMemory(m)) => Some(StageError::DeviceOom(format!(
            "model out of memory for one image: {m}"
        ))),
        RowOutcome::KilledWorker(why) => Some(StageError::Failed(why.clone())),
    }
}
