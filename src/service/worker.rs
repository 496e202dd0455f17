//! `hotpipe run` as a cluster worker (`[cluster] role = "worker"`): the pipeline on a
//! model host, fed from the server's work queue instead of a folder, its outcomes
//! recorded on the server for the collect node.
//!
//! Threads:
//! - *lease* takes items, never more than the pipeline has room for (so no delivered item
//!   waits unseen until its lease times out), and hands them to the pipeline;
//! - *progress* extends the lease of every item held, every third of `ack_wait_s`, so a
//!   slow model never loses its items while a dead or stopped worker does;
//! - the pipeline's stages; the cluster sink stores each item's outputs under this
//!   worker's own names;
//! - *main* takes outcomes, records each one (create-if-absent: the first worker's
//!   outcome wins, a loser deletes its outputs), and only then acknowledges the item;
//!   it also sends the heartbeat and handles SIGTERM (finish in flight within the grace,
//!   hand the rest back).
//!
//! Poison inputs, blamed on nobody else: an item delivered again (a worker died on it, or
//! went silent) is a suspect and runs alone, after the items in flight, with the count of
//! workers that took it alone raised first. One that already killed `max_attempts`
//! workers is recorded as failed ("workers died on it N times") without running again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use super::ServiceError;
use super::signals::Signal;
use super::systemd;
use crate::cluster::queue::{Lease, Recorded, Verdict, WorkItem};
use crate::cluster::{Cluster, ClusterError};
use crate::config::{Config, ParamsConfig};
use crate::pipeline::Pipeline;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::item::{Item, Outcome};
use crate::vocab::params::Params;
use crate::vocab::sink::{Encoded, Sink};

/// How often a worker says it is alive (its entry expires after 30 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long one fetch of work waits for the first item.
const LEASE_WAIT: Duration = Duration::from_secs(1);
/// Pause before trying the server again after an error (it is restarting, or away).
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long a worker without a hot folder lets its items in flight finish at SIGTERM.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What the worker's threads share.
struct Worker {
    cluster: Arc<Cluster>,
    id: String,
    /// Items in the pipeline, by the pipeline's item id, each with its lease.
    leases: Mutex<HashMap<u64, Lease>>,
    /// Items handed to the pipeline and not yet recorded.
    in_flight: AtomicUsize,
    /// A suspect runs alone: 1 + its pipeline item id while it does (0: none), and no
    /// more is leased until it is recorded.
    alone: AtomicU64,
    stopping: AtomicBool,
    next_id: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    params: Option<ParamsConfig>,
}

/// The name a worker goes by on the server: host and pid, in the characters a key
/// may hold.
fn worker_id() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{host}-{}", std::process::id())
}

/// Run as a worker until SIGTERM/SIGINT.
pub fn run(cfg: &Config, signals: Receiver<Signal>) -> Result<(), ServiceError> {
    let cc = cfg
        .cluster
        .as_ref()
        .ok_or_else(|| ServiceError::NoCluster(cfg.source.clone()))?;
    let notifier = systemd::Notifier::from_env();
    let cluster = Arc::new(Cluster::connect(cc)?);
    cluster.status()?;
    let worker = Arc::new(Worker {
        cluster: Arc::clone(&cluster),
        id: worker_id(),
        leases: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
        alone: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        params: cfg.params.clone(),
    });
    let sink = Arc::new(ClusterSink {
        cluster,
        worker: worker.id.clone(),
    });
    let mut pipeline = Pipeline::start(cfg, sink)?;
    let info = pipeline.info();
    let slots = info.max_batch * (cfg.pipeline.batch_slots + 1);
    tracing::info!(worker = %worker.id, server = %cc.url, model = %info.model_text(), devices = %info.devices_text(), slots, "cluster worker ready");
    let tx = pipeline.sender();
    pipeline.close_input();
    let w = Arc::clone(&worker);
    let lease = spawn("hp-lease", move || w.lease_loop(&tx, slots))?;
    let w = Arc::clone(&worker);
    let every = Duration::from_millis(cc.ack_wait_s * 1000 / 3).max(Duration::from_millis(200));
    spawn("hp-progress", move || w.progress_loop(every))?;
    notifier.send("READY=1\nSTATUS=taking work from the cluster");
    let grace = cfg
        .hotfolder
        .as_ref()
        .map_or(DEFAULT_GRACE, |h| Duration::from_secs(h.shutdown_grace_s));
    let r = worker.main_loop(&pipeline, &signals, &notifier, grace);
    worker.stopping.store(true, Ordering::Release);
    let _ = lease.join();
    worker.hand_back();
    r
}

fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, ServiceError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| ServiceError::Io {
            context: format!("cannot start the {name} thread"),
            source,
        })
}

impl Worker {
    /// Outcomes, heartbeats and signals, until SIGTERM (then in-flight items finish
    /// within `grace`) or the pipeline fails.
    fn main_loop(
        &self,
        pipeline: &Pipeline,
        signals: &Receiver<Signal>,
        notifier: &systemd::Notifier,
        grace: Duration,
    ) -> Result<(), ServiceError> {
        let heartbeat = crossbeam_channel::tick(HEARTBEAT_EVERY);
        let watchdog = crossbeam_channel::tick(notifier.tick());
        let mut deadline: Option<Instant> = None;
        let mut signals = signals.clone();
        self.heartbeat();
        loop {
            if deadline.is_some() && self.in_flight.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            let until = deadline.map_or(crossbeam_channel::never(), crossbeam_channel::at);
            select! {
                recv(pipeline.outcomes()) -> o => match o {
                    Ok(o) => self.record(o),
                    Err(_) => return Err(ServiceError::PipelineDied),
                },
                recv(pipeline.deaths()) -> e => if let Ok(e) = e {
                    return Err(ServiceError::Pipeline(e));
                },
                recv(signals) -> s => match s {
                    Ok(Signal::Reload) => tracing::info!("SIGHUP: a worker reloads nothing; restart it to apply a new config"),
                    _ if deadline.is_some() => {}
                    Ok(Signal::Terminate) | Err(_) => {
                        if s.is_err() {
                            signals = crossbeam_channel::never();
                        }
                        tracing::info!(in_flight = self.in_flight.load(Ordering::Relaxed), "stopping: no more work is taken; finishing what is in flight");
                        notifier.send("STOPPING=1");
                        self.stopping.store(true, Ordering::Release);
                        deadline = Some(Instant::now() + grace);
                    }
                },
                recv(heartbeat) -> _ => self.heartbeat(),
                recv(watchdog) -> _ => notifier.alive(true, false),
                recv(until) -> _ => {
                    tracing::warn!(in_flight = self.in_flight.load(Ordering::Relaxed), "grace period over; the items in flight go back to the queue");
                    return Ok(());
                }
            }
        }
    }

    fn heartbeat(&self) {
        let report = serde_json::json!({
            "pid": std::process::id(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "done": self.done.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
        });
        if let Err(e) = self.cluster.heartbeat(&self.id, &report) {
            tracing::warn!(error = %e, "cannot send the heartbeat");
        }
    }

    /// Take work while there is room, until stopping. A fetched batch is held (its
    /// leases kept alive) at once; its items go to the pipeline one by one, none while a
    /// suspect runs alone.
    fn lease_loop(&self, tx: &Sender<Item>, slots: usize) {
        while !self.stopping.load(Ordering::Acquire) {
            let held = self.in_flight.load(Ordering::Acquire);
            if held >= slots || self.alone.load(Ordering::Acquire) != 0 {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let leases = match self.cluster.lease(slots - held, LEASE_WAIT) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take work; trying again");
                    std::thread::sleep(RETRY_PAUSE);
                    continue;
                }
            };
            let locals: Vec<u64> = leases.into_iter().map(|l| self.hold(l)).collect();
            for local in locals {
                while self.alone.load(Ordering::Acquire) != 0
                    && !self.stopping.load(Ordering::Acquire)
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if self.stopping.load(Ordering::Acquire) {
                    // The rest are still held: handed back at exit.
                    return;
                }
                self.take(local, tx);
            }
        }
    }

    /// Keep a lease (extended by the progress thread) under a new pipeline item id.
    fn hold(&self, lease: Lease) -> u64 {
        let local = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.insert(local, lease);
        local
    }

    /// One held item: skipped when it is finished already, failed when it killed too
    /// many workers, run alone when it is a suspect, else handed to the pipeline.
    fn take(&self, local: u64, tx: &Sender<Item>) {
        let held = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let Some((work, delivered)) = held.get(&local).map(|l| (l.item.clone(), l.delivered))
        else {
            return;
        };
        drop(held);
        match self.cluster.outcome(&work.id) {
            Ok(Some(_)) => return self.settle(local, true),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot look the item up; it will come again");
                return self.settle(local, false);
            }
        }
        let bytes = match self.cluster.input(&work) {
            // Its input is gone: the collect node finished it, this is a late copy.
            Ok(None) => return self.settle(local, true),
            Ok(Some(b)) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the input; it will come again");
                return self.settle(local, false);
            }
        };
        let mut item = Item::new(local, PathBuf::from(&work.name));
        item.cluster_id = Some(work.id.clone());
        item.data = Some(bytes);
        match self.item_params(&work) {
            Ok(p) => item.params = p,
            Err(reason) => {
                if let Some(l) = self.take_lease(local) {
                    self.fail(l, Stage::Claim, reason);
                }
                return;
            }
        }
        if delivered > 1 && !self.run_alone(local, &work.id) {
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if tx.send(item).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Done with a held item without running it: acknowledged (`true`), or handed back.
    fn settle(&self, local: u64, ack: bool) {
        if let Some(l) = self.take_lease(local) {
            if ack { self.ack(l) } else { self.nak(l) }
        }
    }

    /// A suspect: wait for the pipeline to empty (its lease kept meanwhile), count one
    /// more worker on it, and let it run alone; or record it failed when it has killed
    /// `max_attempts` workers. False: it is not to run.
    fn run_alone(&self, local: u64, id: &str) -> bool {
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if self.stopping.load(Ordering::Acquire) {
                // Still in the lease map: handed back at exit.
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let max = self.cluster.config().max_attempts;
        let before = match self.cluster.blame(id) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the attempt; the item will come again");
                self.settle(local, false);
                return false;
            }
        };
        // The delivery that made it a suspect ended without an outcome too.
        let died = before + 1;
        if died >= max {
            if let Some(l) = self.take_lease(local) {
                let reason =
                    format!("workers died on it {died} times ([cluster] max_attempts = {max})");
                self.fail(l, Stage::Claim, reason);
            }
            return false;
        }
        tracing::info!(item = %id, died, "delivered again: running it alone");
        self.alone.store(local + 1, Ordering::Release);
        true
    }

    fn item_params(&self, work: &WorkItem) -> Result<Option<Params>, String> {
        let Some(schema) = &self.params else {
            return Ok(None);
        };
        let given = match &work.params {
            Some(serde_json::Value::Object(m)) => m.clone(),
            _ => Default::default(),
        };
        schema.resolve(&given).map(Some).map_err(|e| e.to_string())
    }

    fn take_lease(&self, local: u64) -> Option<Lease> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&local)
    }

    /// Record an outcome of the pipeline, then acknowledge its item.
    fn record(&self, o: Outcome) {
        let lease = self.take_lease(o.item.id);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ =
            (self.alone).compare_exchange(o.item.id + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
        let Some(lease) = lease else { return };
        match o.result {
            Ok(paths) => {
                let outputs: Vec<String> = paths
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                let ext = paths
                    .first()
                    .and_then(|p| p.extension())
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let verdict = Verdict::Done {
                    ext,
                    outputs: outputs.clone(),
                    sidecar: o.item.sidecar,
                };
                if self.commit(&lease, verdict) {
                    self.done.fetch_add(1, Ordering::Relaxed);
                    let ms = o.item.started.elapsed().as_millis() as u64;
                    tracing::info!(item = %lease.item.name, ms, "done");
                } else if let Err(e) = self.cluster.purge_objects(&outputs) {
                    tracing::warn!(error = %e, "cannot remove a losing attempt's outputs; the sweep will");
                }
                self.ack(lease);
            }
            Err(e) if e.transient => {
                tracing::warn!(item = %lease.item.name, stage = %e.stage, reason = %e.reason, "transient failure; the item goes back to the queue");
                self.nak(lease);
            }
            Err(e) => self.fail(lease, e.stage, e.reason),
        }
    }

    fn fail(&self, lease: Lease, stage: Stage, reason: String) {
        tracing::warn!(item = %lease.item.name, %stage, %reason, "failed");
        let verdict = Verdict::Failed {
            stage: stage.as_str().to_string(),
            reason,
        };
        if self.commit(&lease, verdict) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.ack(lease);
    }

    /// Record the outcome, trying again while the server does not answer; true when this
    /// one is the item's outcome (false: another worker's came first).
    fn commit(&self, lease: &Lease, verdict: Verdict) -> bool {
        let rec = Recorded {
            worker: self.id.clone(),
            verdict,
        };
        let id = &lease.item.id;
        loop {
            // The collect node forgets an item's outcome once it is published: a late
            // attempt must lose to that too, not record an outcome nobody will take.
            // A create whose confirmation was lost (the server died meanwhile) and is
            // tried again finds this worker's own outcome: that one is a win.
            let r = match self.cluster.collected(id) {
                Ok(true) => Ok(false),
                Ok(false) => match self.cluster.commit(id, &rec) {
                    Ok(false) => (self.cluster.outcome(id)).map(|o| o.as_ref() == Some(&rec)),
                    r => r,
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(won) => {
                    if !won {
                        tracing::info!(item = %lease.item.name, "another worker recorded it first; this attempt's outputs go");
                    }
                    return won;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record an outcome; trying again");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn ack(&self, lease: Lease) {
        if let Err(e) = self.cluster.ack(lease) {
            // The outcome is recorded: a redelivery is acknowledged and skipped.
            tracing::debug!(error = %e, "cannot acknowledge");
        }
    }

    fn nak(&self, lease: Lease) {
        if let Err(e) = self.cluster.nak(&lease) {
            tracing::debug!(error = %e, "cannot hand an item back; it returns after ack_wait_s");
        }
    }

    fn progress_loop(&self, every: Duration) {
        while !self.stopping.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) > 0 {
            std::thread::sleep(every);
            let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            for l in leases.values() {
                if let Err(e) = self.cluster.progress(l) {
                    tracing::debug!(error = %e, "cannot extend a lease");
                }
            }
        }
    }

    /// At exit: the items still held go back to the queue now, not after `ack_wait_s`.
    fn hand_back(&self) {
        let leases: Vec<Lease> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in leases {
            self.nak(l);
        }
    }
}

/// A worker's [`Sink`]: each output stored in the object bucket under this worker's own
/// name (`output/<id>/<worker>/<k>.<ext>`); the names are what `publish` returns.
struct ClusterSink {
    cluster: Arc<Cluster>,
    worker: String,
}

impl Sink for ClusterSink {
    fn publish(
        &self,
        item: &Item,
        outputs: &Encoded,
        ext: &str,
    ) -> Result<Vec<PathBuf>, StageError> {
        let id = item.cluster_id.as_deref().unwrap_or_default();
        (0..outputs.len())
            .map(|k| {
                let name = format!("{k}.{ext}");
                // `id` and `worker` are key-safe; `ext` is the encoder's own.
                self.cluster
                    .put_output(id, &self.worker, &name, outputs.get(k))
                    .map(PathBuf::from)
                    .map_err(|e: ClusterError| StageError::Unavailable(e.to_string()))
            })
            .collect()
    }

    /// The input was dropped on the ingest host, not here.
    fn input_origin(&self, _: &Item) -> Option<PathBuf> {
        None
    }
}
