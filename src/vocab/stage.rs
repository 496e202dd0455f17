//! What a stage is to the pipeline: a type that turns one item's input into its output
//! (or a [`StageError`]), knowing nothing about threads, channels, telemetry or how its
//! errors reach the user. The pipeline's one stage runner does all of that for every
//! stage alike (`crate::pipeline::runner`).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::vocab::error::{ItemError, Stage, StageError};
use crate::vocab::item::{Item, Outcome};
use crate::vocab::telemetry::Telemetry;

/// One worker of a stage. The runner gives each worker thread its own value, so a worker
/// may keep reusable state (decoders, scratch buffers, a detector) without locking.
pub trait StageWorker: Send + 'static {
    type In: Send + 'static;
    type Out: Send + 'static;

    /// The stage this worker belongs to: telemetry, error attribution, fault points.
    fn stage(&self) -> Stage;

    /// Process one item. The item itself may be annotated (a region, a sidecar); the
    /// input is consumed.
    fn process(&mut self, item: &mut Item, input: Self::In) -> Result<Self::Out, StageError>;

    /// How many items one call of [`process_batch`](Self::process_batch) may take, and
    /// how long to wait for more once one is in hand. `(1, 0)`: item by item.
    fn batching(&self) -> (usize, Duration) {
        (1, Duration::ZERO)
    }

    /// The batch form (the detector runs several photos through one network call).
    /// Pushes one result per item onto `out`, in order, draining `inputs`. The default
    /// processes the items one by one.
    fn process_batch(
        &mut self,
        items: &mut [Item],
        inputs: &mut Vec<Self::In>,
        out: &mut Vec<Result<Self::Out, StageError>>,
    ) {
        for (item, input) in items.iter_mut().zip(inputs.drain(..)) {
            out.push(self.process(item, input));
        }
    }
}

/// Reports items that leave the pipeline early (failed), with the stage's telemetry.
#[derive(Clone)]
pub struct Reporter {
    pub telemetry: Arc<Telemetry>,
    pub outcomes: Sender<Outcome>,
}

impl Reporter {
    pub fn fail(&self, item: Item, stage: Stage, e: &StageError) {
        self.telemetry.failed(stage);
        let err = ItemError::from_stage(&item.path, stage, e);
        let _ = self.outcomes.send(Outcome {
            item,
            result: Err(err),
        });
    }
}
