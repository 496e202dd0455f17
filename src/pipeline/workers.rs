//! The stage workers that join a stage to the runtime, so neither has to know the other:
//! the fit stage writes into a leased row of the batch slots, the encode stage reads a
//! row of the inference output ring and hands the bytes to the sink.

use std::path::PathBuf;
use std::sync::Arc;

use crate::runtime::batcher::{Assembler, RowLease};
use crate::runtime::infer::Inferred;
use crate::stages::encode::Encoder;
use crate::stages::fit::Fitter;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::item::{Frame, Item, Outcome};
use crate::vocab::pool::{BufPool, PooledBuf};
use crate::vocab::sink::{Encoded, Sink};
use crate::vocab::stage::{Reporter, StageWorker};
use crate::vocab::telemetry::Timer;

use super::runner::{Closed, Emit};

/// Fit: resize each frame straight into a row of the open batch slot.
pub struct FitWorker {
    pub fitter: Fitter,
    pub assembler: Arc<Assembler<Item>>,
}

impl StageWorker for FitWorker {
    type In = Frame;
    type Out = RowLease<Item>;

    fn stage(&self) -> Stage {
        Stage::Fit
    }

    fn process(&mut self, item: &mut Item, frame: Frame) -> Result<RowLease<Item>, StageError> {
        let mut lease = self.assembler.lease().ok_or_else(|| StageError::Internal {
            stage: Stage::Fit,
            message: "the batch slots were closed while fitting".into(),
        })?;
        // A failed fit drops the lease, which leaves a hole the batch is sealed with.
        self.fitter
            .fit(&frame, item.region, lease.pixels())
            .map_err(StageError::Failed)?;
        Ok(lease)
    }
}

/// Commits fitted rows with their items. The last fit worker to finish closes the
/// assembler (every clone shares one [`CloseOnDrop`]), which lets inference drain.
#[derive(Clone)]
pub struct Commit {
    _close: Arc<CloseOnDrop>,
}

pub struct CloseOnDrop(Arc<Assembler<Item>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Commit {
    pub fn new(assembler: Arc<Assembler<Item>>) -> Commit {
        Commit {
            _close: Arc::new(CloseOnDrop(assembler)),
        }
    }
}

impl Emit<RowLease<Item>> for Commit {
    fn emit(&mut self, item: Item, lease: RowLease<Item>) -> Result<(), Closed> {
        lease.commit(item);
        Ok(())
    }
}

/// Encode: an inferred input's outputs (one, or the model's K) to the configured format,
/// each with its item's filtered EXIF when there is one. The bytes go out in pooled
/// buffers, so steady state allocates nothing for them.
pub struct EncodeWorker {
    pub encoder: Encoder,
    pub pool: Arc<BufPool>,
}

impl StageWorker for EncodeWorker {
    type In = Inferred;
    type Out = Encoded;

    fn stage(&self) -> Stage {
        Stage::Encode
    }

    fn process(&mut self, item: &mut Item, job: Inferred) -> Result<Encoded, StageError> {
        // The input's EXIF (only there with `encode.keep_metadata`) is not needed after
        // this: taken, so it is freed before the publish.
        let exif = item.exif.take();
        let (w, h, c) = (job.out.width(), job.out.height(), job.out.channels());
        let mut encode = |k: usize| -> Result<PooledBuf, StageError> {
            let bytes = self
                .encoder
                .encode_with(job.out.output(job.row, k), (w, h, c), exif.as_deref())
                .map_err(StageError::Failed)?;
            let mut buf = self.pool.get(bytes.len());
            buf.copy_from_slice(bytes);
            Ok(buf)
        };
        let mut out = Encoded::new(encode(0)?);
        for k in 1..job.out.per_input() {
            out.push(encode(k)?);
        }
        // `job` drops here, returning its output slot before the (slower) publish.
        Ok(out)
    }
}

/// Publish: hand encoded bytes to the sink on the encode worker's own thread (publishing
/// blocks on file I/O, which the encode threads absorb) and report the outcome.
#[derive(Clone)]
pub struct Publish {
    pub sink: Arc<dyn Sink>,
    pub ext: &'static str,
    pub reporter: Reporter,
    /// What made the outputs besides the input and its parameters (`model`: its path,
    /// hash and options; `recipe`: the settings), for every sidecar; `None` when outputs
    /// get no sidecars (no `[params]`, no `[face_crop]`).
    pub provenance: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

impl Publish {
    /// The item's sidecar, beside what a stage before put there (the face crop's box):
    /// the input it came from (path, name, hash, size), its parameters and what made it,
    /// so any output can be traced to its input and made again.
    fn record(&self, item: &mut Item) {
        let Some(provenance) = &self.provenance else {
            return;
        };
        let mut sidecar = match item.sidecar.take() {
            Some(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let input = serde_json::json!({
            "name": item.path.file_name().map(|n| n.to_string_lossy()),
            "path": self.sink.input_origin(item).map(|p| p.to_string_lossy().into_owned()),
            "sha256": item.input_sha256,
            "bytes": item.source.map(|s| s.len),
        });
        sidecar.insert("input".into(), input);
        if let Some(params) = &item.params {
            sidecar.insert("params".into(), params.to_json());
        }
        sidecar.extend(provenance.iter().map(|(k, v)| (k.clone(), v.clone())));
        item.sidecar = Some(serde_json::Value::Object(sidecar));
    }
}

impl Emit<Encoded> for Publish {
    fn emit(&mut self, mut item: Item, bytes: Encoded) -> Result<(), Closed> {
        self.record(&mut item);
        let t = Timer::start();
        let published: Result<Vec<PathBuf>, StageError> =
            self.sink.publish(&item, &bytes, self.ext);
        drop(bytes);
        let tel = &self.reporter.telemetry;
        tel.record(Stage::Publish, t.elapsed(), 1);
        match published {
            Ok(paths) => {
                let _ = self.reporter.outcomes.send(Outcome {
                    item,
                    result: Ok(paths),
                });
            }
            Err(e) => self.reporter.fail(item, Stage::Publish, &e),
        }
        Ok(())
    }
}
