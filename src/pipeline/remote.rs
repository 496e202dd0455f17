//! Cluster mode's collect node: a [`Pipeline`] whose stages run on other hosts. Items
//! from the hot folder go onto the server's work queue; the outcomes the workers record
//! come back and are published through the same [`Sink`] a local pipeline uses, so the
//! hot folder's journal, recovery, retries and quarantine work unchanged.
//!
//! Two kinds of thread, [`THREADS`] of each, started and guarded by the one runner:
//! - `hp-enqueue-N` reads each item's file (the read stage's checks), stores it with the
//!   item's durable id and queues it; it holds at most `[cluster] max_queue` items not
//!   yet finished, so the bounded work stream never refuses this node, and the claimer
//!   blocks behind it;
//! - `hp-collect-N` takes recorded outcomes from the collect consumer, fetches the outputs,
//!   publishes them, and only then forgets what the server holds for the item.
//!
//! Exactly once, whatever dies: the collect node's journal decides what is published.
//! A resumed item (after this node was killed) is first looked up in the outcome bucket
//! and finished from there, else queued again under the same id (a duplicate the server
//! drops when the first message is still there). An outcome for an item this node does
//! not hold is acknowledged and left alone: either its item is about to be resumed (and
//! the lookup finds it) or it is garbage for the sweep. Whichever thread takes an item out
//! of the in-flight map finishes it, so the lookup and the consumer never both do.
//! Nothing here forgets a failed item's entries: the service does, once the item is in
//! `failed/` (until then a retry must find the outcome again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, bounded};

use super::Pipeline;
use super::runner::Topology;
use crate::cluster::queue::{Recorded, Verdict};
use crate::cluster::{Cluster, ClusterError};
use crate::config::Config;
use crate::runtime::plan::RuntimeInfo;
use crate::stages::read::read_input;
use crate::vocab::error::{ItemError, PipelineError, Stage, StageError};
use crate::vocab::item::{Item, Outcome};
use crate::vocab::pool::BufPool;
use crate::vocab::sink::{Encoded, Sink};
use crate::vocab::stage::Reporter;
use crate::vocab::telemetry::Telemetry;

/// How long a fetch of outcomes waits for the first one.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Pause before trying the server again after an error (it is restarting, or away).
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Threads on each side: an item is a dozen round trips to the server (store, queue,
/// fetch, publish, forget), so one thread a side would bound the node at what one
/// sequence of round trips allows (about 120 items/s on loopback, measured).
const THREADS: usize = 4;

/// Items queued and not yet finished, by cluster id, with its bound.
struct InFlight {
    items: Mutex<HashMap<String, Item>>,
    /// Signalled whenever an item leaves.
    left: Condvar,
    limit: usize,
    /// Enqueue threads still running: once none is and the map is empty, the collectors
    /// stop too.
    enqueuers: AtomicUsize,
}

impl InFlight {
    fn take(&self, id: &str) -> Option<Item> {
        let item = self.lock().remove(id);
        self.left.notify_all();
        item
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Item>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until there is room for one more.
    fn admit(&self, id: String, item: Item) {
        let mut items = self.lock();
        while items.len() >= self.limit {
            items = (self.left.wait(items)).unwrap_or_else(|p| p.into_inner());
        }
        items.insert(id, item);
    }
}

/// What the two threads share.
struct Remote {
    cluster: Arc<Cluster>,
    in_flight: InFlight,
    sink: Arc<dyn Sink>,
    reporter: Reporter,
    max_file_bytes: u64,
    /// Buffers for fetched outputs on their way to the sink.
    pool: Arc<BufPool>,
}

impl Pipeline {
    /// The collect node's pipeline: the same interface as [`Pipeline::start`]'s, the work
    /// done by the cluster's workers. No model is loaded here.
    pub fn remote(
        cfg: &Config,
        sink: Arc<dyn Sink>,
        cluster: Arc<Cluster>,
    ) -> Result<Pipeline, PipelineError> {
        let cap = cfg.pipeline.channel_capacity;
        let telemetry = Arc::new(Telemetry::default());
        let (out_tx, out_rx) = bounded::<Outcome>(cap.max(64));
        let reporter = Reporter {
            telemetry: Arc::clone(&telemetry),
            outcomes: out_tx,
        };
        let (mut topo, deaths) = Topology::new(reporter.clone());
        let (input_tx, input_rx) = bounded::<Item>(cap);
        let limit = usize::try_from(cluster.config().max_queue).unwrap_or(usize::MAX);
        let remote = Arc::new(Remote {
            cluster,
            in_flight: InFlight {
                items: Mutex::new(HashMap::new()),
                left: Condvar::new(),
                limit,
                enqueuers: AtomicUsize::new(THREADS),
            },
            sink,
            reporter,
            max_file_bytes: cfg.decode.max_file_bytes,
            pool: BufPool::new(64),
        });
        for i in 0..THREADS {
            let (r, rx) = (Arc::clone(&remote), input_rx.clone());
            topo.spawn(format!("hp-enqueue-{i}"), move || r.enqueue_all(&rx))?;
            let r = Arc::clone(&remote);
            topo.spawn(format!("hp-collect-{i}"), move || r.collect_all())?;
        }
        let info = RuntimeInfo {
            devices: Vec::new(),
            max_batch: 0,
            input_hw: (0, 0),
            output_hw: (0, 0),
            input_channels: 0,
            output_channels: 0,
            outputs_per_input: 1,
            model: "the cluster's workers".to_string(),
            precision: tch::Kind::Uint8,
            about: None,
        };
        Ok(Pipeline {
            input: Some(input_tx),
            outcomes: out_rx,
            deaths,
            threads: topo.into_threads(),
            telemetry,
            info,
            decode_pool: BufPool::new(1),
            stop_sampler: None,
        })
    }
}

impl Remote {
    fn enqueue_all(&self, input: &Receiver<Item>) {
        for item in input {
            self.enqueue(item);
        }
        self.in_flight.enqueuers.fetch_sub(1, Ordering::AcqRel);
        self.in_flight.left.notify_all();
    }

    fn enqueue(&self, mut item: Item) {
        let Some(id) = item.cluster_id.clone() else {
            let e = StageError::Failed("no cluster id (a bug: the claimer assigns one)".into());
            return self.reporter.fail(item, Stage::Claim, &e);
        };
        let bytes = match read_input(&item.path, self.max_file_bytes) {
            Ok(input) => {
                item.source = Some(input.stat);
                input.bytes().to_vec()
            }
            Err(e) => return self.reporter.fail(item, Stage::Read, &e),
        };
        let name = item
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let params = item.params.as_ref().map(|p| p.to_json());
        self.in_flight.admit(id.clone(), item);
        // A resumed item may be finished already: its outcome is then taken from here.
        if let Some(rec) = self.until_reachable(|| self.cluster.outcome(&id)) {
            if let Some(item) = self.in_flight.take(&id) {
                self.finish(item, &id, rec);
            }
            return;
        }
        let mut full_logged = false;
        loop {
            match self.cluster.enqueue(&id, &name, &bytes, params.clone()) {
                Ok(_) => return,
                Err(ClusterError::Full { .. }) => {
                    if !full_logged {
                        tracing::warn!(file = ?name, "the work queue is full; waiting ([cluster] max_queue)");
                        full_logged = true;
                    }
                }
                Err(e) => tracing::warn!(file = ?name, error = %e, "cannot queue; trying again"),
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Call `f` until the server answers (it may be restarting).
    fn until_reachable<T>(&self, mut f: impl FnMut() -> Result<T, ClusterError>) -> T {
        loop {
            match f() {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!(error = %e, "the cluster's server does not answer; trying again");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn collect_all(&self) {
        loop {
            let stop = self.in_flight.enqueuers.load(Ordering::Acquire) == 0
                && self.in_flight.lock().is_empty();
            if stop {
                return;
            }
            let taken = match self.cluster.recorded(64, FETCH_WAIT) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch outcomes; trying again");
                    std::thread::sleep(RETRY_PAUSE);
                    continue;
                }
            };
            for t in taken {
                let item = self.in_flight.take(&t.id);
                if let (Some(item), Some(rec)) = (item, t.recorded.clone()) {
                    self.finish(item, &t.id, rec);
                }
                if let Err(e) = self.cluster.taken(t) {
                    // Delivered again later; finishing twice is harmless (the item left).
                    tracing::debug!(error = %e, "cannot acknowledge an outcome");
                }
            }
        }
    }

    /// Publish (or fail) an item from its recorded outcome.
    fn finish(&self, mut item: Item, id: &str, rec: Recorded) {
        match rec.verdict {
            Verdict::Done {
                ext,
                outputs,
                sidecar,
            } => {
                let encoded = match self.fetch_outputs(&outputs) {
                    Ok(e) => e,
                    Err(e) => return self.reporter.fail(item, Stage::Publish, &e),
                };
                item.sidecar = sidecar;
                match self.sink.publish(&item, &encoded, &ext) {
                    Ok(paths) => {
                        // Published and out of work/: nothing on the server is needed now.
                        if let Err(e) = self.cluster.forget(id, &outputs) {
                            tracing::warn!(error = %e, "cannot remove a finished item's entries; the sweep will");
                        }
                        let _ = self.reporter.outcomes.send(Outcome {
                            item,
                            result: Ok(paths),
                        });
                    }
                    Err(e) => self.reporter.fail(item, Stage::Publish, &e),
                }
            }
            Verdict::Failed { stage, reason } => {
                let stage = Stage::parse(&stage).unwrap_or(Stage::Claim);
                tracing::debug!(worker = %rec.worker, "failed on a worker");
                let err = ItemError {
                    path: item.path.clone(),
                    stage,
                    reason,
                    transient: false,
                };
                let _ = self.reporter.outcomes.send(Outcome {
                    item,
                    result: Err(err),
                });
            }
        }
    }

    /// The outputs' bytes, in order. The server not answering is transient (the item is
    /// retried, its outcome looked up again); an output gone is not: only the age limit
    /// removes the outputs of an item still in `work/`.
    fn fetch_outputs(&self, names: &[String]) -> Result<Encoded, StageError> {
        let mut encoded: Option<Encoded> = None;
        for name in names {
            let bytes = match self.cluster.object(name, 0) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    return Err(StageError::Failed(format!(
                        "its output {name} is no longer on the server (older than [cluster] max_age_s?)"
                    )));
                }
                Err(e) => return Err(StageError::Unavailable(e.to_string())),
            };
            let mut buf = self.pool.get(bytes.len());
            buf.copy_from_slice(&bytes);
            match encoded.as_mut() {
                None => encoded = Some(Encoded::new(buf)),
                Some(e) => e.push(buf),
            }
        }
        encoded.ok_or_else(|| StageError::Failed("a worker recorded no output".into()))
    }
}
