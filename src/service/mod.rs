//! `hotpipe run`: the long-running service around the pipeline.
//!
//! Threads and who owns what:
//! - the *claimer* (one thread) owns the inbox: it scans (nudged by the watcher, every
//!   `rescan_s`, and when a pending file may have settled), claims ready files into
//!   `work/`, decides about each item ([`crate::hotfolder::recover::begin`]: process,
//!   finish, or quarantine) and hands it to the pipeline, blocking while the pipeline is
//!   full (so `work/` holds only about what is in flight). Suspects of the last run's
//!   crash go first, one at a time, each alone in the pipeline (see
//!   [`crate::hotfolder::recover`] for who is blamed for a crash);
//! - the pipeline's stages process and publish (the hot folder's sink moves the input to
//!   `done/` itself, right after its output is durable);
//! - the *main* thread takes outcomes (quarantine failures, schedule retries of transient
//!   ones), signals (stop, reload) and watchdog ticks.
//!
//! A session is one config: lock, layout, recovery, pipeline, watcher, claimer. SIGHUP
//! with a valid config drains the session and starts the next; with an invalid one it
//! only logs. Stopping never needs more than "the process may die now": every on-disk
//! step is crash-safe, so an item still in flight when the grace period ends simply stays
//! in `work/` and is resumed by the next start.

pub mod http;
mod page;
pub mod recent;
pub mod signals;
pub mod systemd;
mod worker;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, SendTimeoutError, Sender, bounded, select, unbounded,
};

use crate::cluster::{Cluster, ClusterError};
use crate::config::{Config, ConfigError, ConfigSource, HotfolderConfig, ParamsConfig, Role};
use crate::hotfolder::claim::{Claim, Scanner, changed_since_read, claim, unclaim};
use crate::hotfolder::recover::{self, Begin, Recovered};
use crate::hotfolder::sink::{HotSink, fail_item};
use crate::hotfolder::{HotfolderError, Layout, RootLock, params, state, watch};
use crate::pipeline::Pipeline;
use crate::vocab::crash;
use crate::vocab::error::{PipelineError, Stage};
use crate::vocab::item::{Item, Outcome};
use crate::vocab::params::Params;
use crate::vocab::telemetry::Telemetry;
use signals::Signal;

/// Why the service could not start (or had to stop).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}: `hotpipe run` needs a [hotfolder] table with `root`")]
    NoHotfolder(String),
    #[error(transparent)]
    Hotfolder(#[from] HotfolderError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the pipeline stopped unexpectedly")]
    PipelineDied,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}: --role needs a [cluster] table (the NATS server to use)")]
    NoCluster(String),
}

/// The longest a start (model load, recovery, first scan) may keep extending systemd's
/// start timeout; a load that takes longer is taken as hung.
const START_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Added to `shutdown_grace_s` for systemd's stop timeout: time to join the threads and
/// exit after the last item in flight.
pub const STOP_MARGIN: Duration = Duration::from_secs(15);

/// Counters and health shared by the daemon's threads and the metrics endpoint.
pub struct Shared {
    pub claimed: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub in_flight: AtomicI64,
    started: Instant,
    /// Last hand-over to, or outcome from, the pipeline (ms since `started`).
    last_activity_ms: AtomicU64,
    stuck_s: AtomicU64,
    telemetry: Mutex<Arc<Telemetry>>,
    /// The counters of the pipelines that reloads retired, summed: /metrics adds the live
    /// pipeline's to them, so exported counters never go back at a SIGHUP. Folded in
    /// under the `telemetry` lock (see [`Session::start`]), which a scrape also takes.
    retired: Telemetry,
    /// The CUDA devices the running pipeline uses: /metrics reports their memory only,
    /// never touching (and creating a context on) a GPU the config does not use.
    cuda_devices: Mutex<Vec<usize>>,
    /// Items in `work/` waiting for a retry (the claimer's list), and why the last one
    /// waits: what /healthz and /metrics report (a full disk must not read as idle).
    retry_waiting: AtomicU64,
    retry_reason: Mutex<String>,
    /// Pinged whenever an outcome has been handled: what the claimer waits on while a
    /// crash suspect runs alone.
    settled: (Sender<()>, Receiver<()>),
    /// The status page's phase, model and recent outcomes.
    pub recent: recent::Recent,
}

impl Shared {
    fn new(stuck_s: u64) -> Shared {
        Shared {
            claimed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            stuck_s: AtomicU64::new(stuck_s),
            telemetry: Mutex::new(Arc::new(Telemetry::default())),
            retired: Telemetry::default(),
            cuda_devices: Mutex::new(Vec::new()),
            settled: bounded(1),
            retry_waiting: AtomicU64::new(0),
            retry_reason: Mutex::new(String::new()),
            recent: recent::Recent::default(),
        }
    }

    /// Record why an item is waiting for a retry.
    fn note_retry(&self, reason: String) {
        *self.retry_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Items waiting for a retry, and why the last one does.
    pub fn retries(&self) -> (u64, String) {
        let n = self.retry_waiting.load(Ordering::Relaxed);
        let why = self
            .retry_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (n, why)
    }

    /// What /healthz answers: not healthy while a Python pipeline has no worker process
    /// running; the watchdog's rule ([`Shared::health`]); and also not healthy while
    /// items wait for a retry (a full disk, an unwritable outbox: the
    /// service cannot do its work, though restarting it would not help, so the watchdog
    /// is still fed).
    pub fn status(&self) -> Result<String, String> {
        if let Some(why) = self.telemetry().model_down() {
            return Err(format!("down: {why}"));
        }
        let ok = self.health().map_err(|why| format!("stuck: {why}"))?;
        match self.retries() {
            (0, _) => Ok(ok),
            (n, why) => Err(format!(
                "waiting: {n} item(s) in work/ wait for a retry; last reason: {why}"
            )),
        }
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn telemetry(&self) -> Arc<Telemetry> {
        Arc::clone(&self.telemetry.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn cuda_devices(&self) -> Vec<usize> {
        self.cuda_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ok when idle, progressing, or running a batch within what it is allowed
    /// ([`Telemetry::busy_within_allowance`]); Err (with why) when items are in flight,
    /// no stage has finished anything for `stuck_s`, and no batch explains it.
    pub fn health(&self) -> Result<String, String> {
        let tel = self.telemetry();
        let since_stage = tel.started.elapsed().saturating_sub(Duration::from_millis(
            tel.last_progress_ms.load(Ordering::Relaxed),
        ));
        let since_activity = self.started.elapsed().saturating_sub(Duration::from_millis(
            self.last_activity_ms.load(Ordering::Relaxed),
        ));
        let stuck = Duration::from_secs(self.stuck_s.load(Ordering::Relaxed));
        health_of(
            self.in_flight.load(Ordering::Relaxed),
            since_stage.min(since_activity),
            stuck,
            || tel.busy_within_allowance(stuck),
        )
    }
}

/// The health rule, separate so it can be tested without a stuck pipeline; `busy` says
/// whether a batch within its allowance explains the quiet.
pub fn health_of(
    in_flight: i64,
    quiet: Duration,
    stuck: Duration,
    busy: impl FnOnce() -> Option<String>,
) -> Result<String, String> {
    if in_flight <= 0 {
        Ok("idle".into())
    } else if quiet < stuck {
        Ok(format!("{in_flight} in flight, progressing"))
    } else if let Some(busy) = busy() {
        Ok(format!("{in_flight} in flight, {busy}"))
    } else {
        Err(format!(
            "{in_flight} item(s) in flight and no stage progress for {:.0} s",
            quiet.as_secs_f64()
        ))
    }
}

/// Cluster mode: remove, every `every_s`, what the server holds for items that are no
/// longer in `work/` (see [`Cluster::sweep`]); the first sweep runs at once, for what
/// the last run of this node left.
fn start_sweep(
    cluster: Arc<Cluster>,
    layout: &Layout,
    every_s: u64,
) -> Result<Sender<()>, ServiceError> {
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let work = layout.work.clone();
    let every = Duration::from_secs(every_s);
    std::thread::Builder::new()
        .name("hp-sweep".into())
        .spawn(move || {
            let mut orphans = std::collections::HashSet::new();
            loop {
            match cluster.sweep(|| state::cluster_ids(&work), &mut orphans) {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "swept what finished items left on the server"),
                Err(e) => tracing::warn!(error = %e, "the sweep of the server failed; trying again later"),
            }
            if !matches!(stop_rx.recv_timeout(every), Err(RecvTimeoutError::Timeout)) {
                return;
            }
            }
        })
        .map_err(|source| ServiceError::Io {
            context: "cannot start the sweep thread".into(),
            source,
        })?;
    Ok(stop_tx)
}

/// A retry of an item in `work/`, due at a time.
type Retry = (OsString, Instant);

/// One config's worth of running daemon.
struct Session {
    cfg: Config,
    hf: HotfolderConfig,
    layout: Layout,
    pipeline: Pipeline,
    outcomes: Receiver<Outcome>,
    /// Fires once the claimer's first inbox listing is done (the main loop keeps taking
    /// outcomes meanwhile: items resumed from work/ may already be flowing).
    ready: Receiver<()>,
    retry_tx: Sender<Retry>,
    stop_tx: Option<Sender<()>>,
    claimer: Option<JoinHandle<()>>,
    watch: Option<watch::Watch>,
    /// Cluster mode: the server this collect node queues its items on.
    cluster: Option<Arc<Cluster>>,
    /// Stops the cluster's sweep thread (dropped with the session).
    _sweep: Option<Sender<()>>,
    _lock: RootLock,
}

impl Session {
    /// Lock, prepare and recover the folders, start the pipeline (model loaded), arm the
    /// watcher, start the claimer and wait for its first scan.
    fn start(cfg: &Config, shared: &Arc<Shared>) -> Result<Session, ServiceError> {
        let hf = cfg
            .hotfolder
            .clone()
            .ok_or_else(|| ServiceError::NoHotfolder(cfg.source.clone()))?;
        let layout = Layout::new(&hf.root);
        layout.prepare()?;
        let lock = layout.lock()?;
        let recovered = recover::startup(&layout).map_err(|source| ServiceError::Io {
            context: format!("cannot recover {}", layout.work.display()),
            source,
        })?;
        if !recovered.is_empty() {
            tracing::info!(
                items = recovered.len(),
                alone = recovered.isolate.len(),
                "resuming items left in work/"
            );
        }
        match recover::arm_crash_record(&layout) {
            Ok(record) => crash::record_to(record),
            Err(e) => {
                tracing::error!(work = %layout.work.display(), error = %e, "cannot prepare the crash record: a crash in this run cannot be blamed on its file")
            }
        }
        let (finish_tx, finish_rx) = unbounded::<OsString>();
        let sink = Arc::new(HotSink::new(layout.clone(), hf.on_success, finish_tx));
        if let Some(f) = crate::vocab::fault::check("load", Path::new(&cfg.source)) {
            f.act("load");
        }
        let cluster = match &cfg.cluster {
            Some(c) => {
                let cluster = Arc::new(Cluster::connect(c)?);
                // Fails, saying to run `hotpipe cluster init`, when it is not set up.
                cluster.status()?;
                Some(cluster)
            }
            None => None,
        };
        let mut pipeline = match &cluster {
            Some(c) => Pipeline::remote(cfg, sink, Arc::clone(c))?,
            None => Pipeline::start(cfg, sink)?,
        };
        let sweep = match (&cluster, &cfg.cluster) {
            (Some(c), Some(cc)) => Some(start_sweep(Arc::clone(c), &layout, cc.sweep_s)?),
            _ => None,
        };
        {
            // The previous pipeline was drained and joined (or, one whose session failed
            // to start, never got an item): its counts are final.
            let mut live = shared.telemetry.lock().unwrap_or_else(|p| p.into_inner());
            shared.retired.absorb(&live);
            *live = Arc::clone(pipeline.telemetry());
        }
        *shared
            .cuda_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = pipeline
            .info()
            .devices
            .iter()
            .filter_map(|d| match d {
                tch::Device::Cuda(i) => Some(*i),
                _ => None,
            })
            .collect();
        // A collect node's items wait on the workers, which may be slow, busy with other
        // queues or not started yet: that is no reason for systemd to restart it.
        let stuck_s = if cluster.is_some() {
            u64::MAX / 2
        } else {
            hf.stuck_s
        };
        shared.stuck_s.store(stuck_s, Ordering::Relaxed);
        let tx = pipeline.sender();
        pipeline.close_input();
        let outcomes = pipeline.outcomes().clone();

        // Watcher before the first scan: a file arriving in between is then both seen
        // by the scan or nudges another one.
        let (nudge_tx, nudge_rx) = bounded::<()>(1);
        let watch = watch::arm(
            hf.watcher,
            &layout.inbox,
            Duration::from_millis(hf.poll_ms),
            nudge_tx,
        )?;
        let writers = watch.writers();
        let (retry_tx, retry_rx) = unbounded::<Retry>();
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (ready_tx, ready_rx) = bounded::<()>(1);
        let claimer = Claimer {
            layout: layout.clone(),
            hf: hf.clone(),
            params: cfg.params.clone(),
            waiting: HashMap::new(),
            tx,
            shared: Arc::clone(shared),
            stop_rx,
            next_id: 0,
            cluster: cluster.is_some(),
        };
        let handle = std::thread::Builder::new()
            .name("hp-claim".into())
            .spawn(move || claimer.run(recovered, writers, nudge_rx, retry_rx, finish_rx, ready_tx))
            .map_err(|source| ServiceError::Io {
                context: "cannot start the claimer thread".into(),
                source,
            })?;
        Ok(Session {
            ready: ready_rx,
            cfg: cfg.clone(),
            hf,
            layout,
            pipeline,
            outcomes,
            retry_tx,
            stop_tx: Some(stop_tx),
            claimer: Some(handle),
            watch: Some(watch),
            cluster,
            _sweep: sweep,
            _lock: lock,
        })
    }

    /// Cluster mode: the item has left `work/` for good (or goes back to the inbox as
    /// a new item): what the server holds for it can go.
    fn forget(&self, item: &Item) {
        if let (Some(c), Some(id)) = (&self.cluster, &item.cluster_id)
            && let Err(e) = c.forget(id, &[])
        {
            tracing::warn!(file = ?item.path, error = %e, "cannot remove the item's entries on the server; the sweep will");
        }
    }

    fn handle(&self, o: Outcome, shared: &Shared) {
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        shared.touch();
        let name = o.item.path.file_name().unwrap_or_default().to_os_string();
        let ms = o.item.started.elapsed().as_millis() as u64;
        let _ = shared.settled.0.try_send(());
        match o.result {
            Ok(paths) => {
                shared.done.fetch_add(1, Ordering::Relaxed);
                let out = paths.first().and_then(|p| p.file_name());
                let out = out.unwrap_or_default().to_string_lossy();
                shared
                    .recent
                    .record(&name.to_string_lossy(), true, ms, &out);
                let output = paths
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                tracing::info!(file = ?o.item.path, %output, ms, "done");
            }
            Err(e) if changed_since_read(&o.item) => match unclaim(&self.layout, &name) {
                Ok(()) => {
                    self.forget(&o.item);
                    tracing::info!(file = ?e.path, stage = %e.stage, reason = %e.reason, "the file changed after it was claimed (its writer was not finished); back in the inbox to settle");
                }
                Err(err) => {
                    tracing::warn!(file = ?e.path, error = %err, "the file changed after it was claimed and cannot go back to the inbox; will retry");
                    let due = retry_due(&self.hf);
                    let _ = self.retry_tx.send((name, due));
                }
            },
            Err(e) if e.transient => {
                shared.retried.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = ?e.path, stage = %e.stage, reason = %e.reason, retry_s = self.hf.retry_s, "transient failure; the file stays in work/ and is retried");
                shared.note_retry(format!("{}: {}", e.stage, e.reason));
                let due = retry_due(&self.hf);
                let _ = self.retry_tx.send((name, due));
            }
            Err(e) => match fail_item(&self.layout, &name, &e.reason, e.stage) {
                Ok(to) => {
                    self.forget(&o.item);
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    let why = format!("{}: {}", e.stage, e.reason);
                    shared
                        .recent
                        .record(&name.to_string_lossy(), false, ms, &why);
                    tracing::warn!(file = ?e.path, stage = %e.stage, reason = %e.reason, moved_to = ?to, "failed");
                }
                Err(err) => {
                    tracing::error!(file = ?e.path, error = %err, "cannot move to failed/; will retry");
                    shared.note_retry(format!("cannot move to failed/: {err}"));
                    let due = retry_due(&self.hf);
                    let _ = self.retry_tx.send((name, due));
                }
            },
        }
    }

    /// Stop claiming and let in-flight items finish until `deadline` (None: no limit).
    /// True when everything drained (the pipeline's threads are joined); Err when a
    /// pipeline thread had died.
    fn drain(mut self, shared: &Shared, deadline: Option<Instant>) -> Result<bool, ServiceError> {
        self.stop_tx.take();
        if let Some(h) = self.claimer.take() {
            let _ = h.join();
        }
        self.watch.take();
        loop {
            let r = match deadline {
                Some(d) => self.outcomes.recv_deadline(d),
                None => self
                    .outcomes
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match r {
                Ok(o) => self.handle(o, shared),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        in_flight = shared.in_flight.load(Ordering::Relaxed),
                        "grace period over; unfinished items stay in work/ for the next start"
                    );
                    return Ok(false);
                }
            }
        }
        self.pipeline.join()?;
        Ok(true)
    }
}

/// Why an item's attempt cannot start with its parameters.
enum Refusal {
    /// Quarantine it with this reason.
    Fail(String),
    /// Try again later (the file could not be read).
    Retry(std::io::Error),
}

/// When an item that failed transiently is tried again.
fn retry_due(hf: &HotfolderConfig) -> Instant {
    Instant::now() + Duration::from_secs(hf.retry_s)
}

/// How long an image waits for its parameters file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wait {
    Until(Instant),
    /// The wait ran out while the image was not ready to claim: it is claimed (to fail)
    /// as soon as it is, and wakes nobody meanwhile.
    Over,
}

impl Wait {
    fn deadline(&self) -> Option<Instant> {
        match *self {
            Wait::Until(t) => Some(t),
            Wait::Over => None,
        }
    }
}

/// The claimer thread's state.
struct Claimer {
    layout: Layout,
    hf: HotfolderConfig,
    /// `[params]`: images take their parameters files with them (see
    /// [`crate::hotfolder::params`]).
    params: Option<ParamsConfig>,
    /// Images waiting for their parameters file (`required = true`).
    waiting: HashMap<OsString, Wait>,
    tx: Sender<Item>,
    shared: Arc<Shared>,
    stop_rx: Receiver<()>,
    next_id: u64,
    /// Cluster mode (collect node): each item gets its durable cluster id first.
    cluster: bool,
}

impl Claimer {
    fn stopped(&self) -> bool {
        matches!(
            self.stop_rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Decide about one item of `work/` and hand it to the pipeline. False: stop.
    fn submit(&mut self, name: OsString, retries: &mut Vec<Retry>) -> bool {
        let begin = recover::begin(
            &self.layout,
            &name,
            self.hf.max_attempts,
            self.hf.on_success,
        );
        match begin {
            Ok(Begin::Process) => {
                let mut item = Item::new(self.next_id, self.layout.work.join(&name));
                if self.cluster {
                    match state::cluster_id(&self.layout.work, &name) {
                        Ok(id) => item.cluster_id = Some(id),
                        Err(e) => {
                            tracing::error!(file = ?name, error = %e, retry_s = self.hf.retry_s, "cannot record its cluster id; will retry");
                            retries.push((name, retry_due(&self.hf)));
                            return true;
                        }
                    }
                }
                match self.item_params(&name) {
                    Ok(p) => item.params = p,
                    Err(Refusal::Fail(reason)) => {
                        return self.fail_at_claim(&name, &reason, retries);
                    }
                    Err(Refusal::Retry(e)) => {
                        tracing::error!(file = ?name, error = %e, retry_s = self.hf.retry_s, "cannot read its parameters; will retry");
                        retries.push((name, retry_due(&self.hf)));
                        return true;
                    }
                }
                self.next_id += 1;
                self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                self.shared.touch();
                let mut item = Some(item);
                while let Some(it) = item.take() {
                    match self.tx.send_timeout(it, Duration::from_millis(100)) {
                        Ok(()) => return true,
                        Err(SendTimeoutError::Timeout(it)) if !self.stopped() => item = Some(it),
                        Err(_) => {
                            // Never handed over; the item stays in work/.
                            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                            return false;
                        }
                    }
                }
                true
            }
            Ok(Begin::Finished) => {
                self.shared.done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(file = ?name, "output was already published; moved on");
                true
            }
            Ok(Begin::Failed(reason)) => {
                self.count_claim_failure(&name, &reason);
                true
            }
            Ok(Begin::Gone) => true,
            Err(e) => {
                tracing::error!(file = ?name, error = %e, retry_s = self.hf.retry_s, "cannot start an attempt; will retry");
                self.shared
                    .note_retry(format!("cannot start an attempt: {e}"));
                retries.push((name, retry_due(&self.hf)));
                true
            }
        }
    }

    fn count_claim_failure(&self, name: &OsStr, reason: &str) {
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        let detail = format!("claim: {reason}");
        let shown = name.to_string_lossy();
        self.shared.recent.record(&shown, false, 0, &detail);
        tracing::warn!(file = ?name, stage = "claim", %reason, "failed");
    }

    /// Quarantine an item whose attempt cannot start (its parameters are refused).
    fn fail_at_claim(&mut self, name: &OsStr, reason: &str, retries: &mut Vec<Retry>) -> bool {
        match fail_item(&self.layout, name, reason, Stage::Claim) {
            Ok(_) => self.count_claim_failure(name, reason),
            Err(e) => {
                tracing::error!(file = ?name, error = %e, "cannot quarantine; will retry");
                retries.push((name.to_os_string(), retry_due(&self.hf)));
            }
        }
        true
    }

    /// The parameters of the item `name` (now in `work/`), with `[params]`: from its
    /// parameters file (claimed here if it is still in the inbox), else the defaults.
    fn item_params(&self, name: &OsStr) -> Result<Option<Params>, Refusal> {
        let Some(schema) = &self.params else {
            if params::is_params_file(name) {
                // Not an image, whatever it holds: say what it was taken for.
                return Err(Refusal::Fail(
                    "a parameters file, but the config declares no [params]: add a [params.schema] naming its keys for them to reach the model (its image is processed without it)".into(),
                ));
            }
            return Ok(None);
        };
        let shown = params::companion_shown(name);
        match params::claim(&self.layout, name).map_err(Refusal::Retry)? {
            params::Claimed::File => {}
            params::Claimed::Vanished => {
                return Err(Refusal::Fail(format!(
                    "its parameters file {shown} was claimed with it but is no longer in work/ (removed by hand?)"
                )));
            }
            params::Claimed::None if schema.required => {
                return Err(Refusal::Fail(format!(
                    "no parameters file {shown} arrived within {} s ([params] required = true)",
                    schema.wait.as_secs()
                )));
            }
            params::Claimed::None => {
                return schema
                    .resolve(&Default::default())
                    .map(Some)
                    .map_err(|e| Refusal::Fail(format!("no parameters file, and {e}")));
            }
        }
        match params::load(&self.layout, name, schema) {
            Ok(Some(p)) => Ok(Some(p)),
            Ok(None) => Err(Refusal::Fail(format!(
                "its parameters file {shown} was claimed with it but is no longer in work/ (removed by hand?)"
            ))),
            Err(params::LoadError::Io(e)) => Err(Refusal::Retry(e)),
            Err(e) => Err(Refusal::Fail(e.to_string())),
        }
    }

    /// Of the inbox entries ready to claim, those that may be claimed now. With
    /// `[params]`: never a parameters file; an image only once its parameters file, if
    /// there is one, is ready too (else it waits for the next scan); with `required`, an
    /// image without one waits until `wait_s` after it was first seen, then is claimed to
    /// fail with that reason.
    fn gate(&mut self, ready: Vec<OsString>) -> Vec<OsString> {
        let Some(schema) = &self.params else {
            return ready;
        };
        let ready_json: HashSet<OsString> = ready
            .iter()
            .filter(|n| params::is_params_file(n))
            .cloned()
            .collect();
        let now = Instant::now();
        let mut out = Vec::new();
        // `a.jpg` and `a.png` share `a.json`: one of them takes it per scan, and the other
        // is decided on the next one (the JSON gone by then).
        let mut taken = HashSet::new();
        for name in ready.into_iter().filter(|n| !params::is_params_file(n)) {
            let jsons = params::companions(&name);
            if jsons.iter().any(|j| ready_json.contains(j)) {
                if !taken.insert(jsons[0].clone()) {
                    continue;
                }
                self.waiting.remove(&name);
                out.push(name);
            } else if jsons
                .iter()
                .any(|j| std::fs::symlink_metadata(self.layout.inbox.join(j)).is_ok())
            {
                // Being written: the image waits for it.
            } else if !schema.required {
                out.push(name);
            } else {
                let wait = self
                    .waiting
                    .entry(name.clone())
                    .or_insert(Wait::Until(now + schema.wait));
                if wait.deadline().is_none_or(|t| t <= now) {
                    self.waiting.remove(&name);
                    out.push(name);
                }
            }
        }
        // Images that left the inbox while waiting (taken back) wait no more; those whose
        // wait ran out while they were not ready stop waking the loop.
        let inbox = &self.layout.inbox;
        self.waiting
            .retain(|n, _| std::fs::symlink_metadata(inbox.join(n)).is_ok());
        for w in self.waiting.values_mut() {
            if w.deadline().is_some_and(|t| t <= now) {
                *w = Wait::Over;
            }
        }
        out
    }

    /// The earliest end of a wait for a parameters file.
    fn next_wait_end(&self) -> Option<Instant> {
        self.waiting.values().filter_map(Wait::deadline).min()
    }

    /// Wait until nothing is in flight (the item just submitted has its outcome). False:
    /// stop.
    fn wait_settled(&self) -> bool {
        while self.shared.in_flight.load(Ordering::Relaxed) > 0 {
            select! {
                recv(self.stop_rx) -> _ => return false,
                recv(self.shared.settled.1) -> _ => {}
            }
        }
        true
    }

    fn run(
        mut self,
        recovered: Recovered,
        writers: Option<watch::Writers>,
        nudge: Receiver<()>,
        retry_rx: Receiver<Retry>,
        finish_rx: Receiver<OsString>,
        ready: Sender<()>,
    ) {
        let mut retries: Vec<Retry> = Vec::new();
        // Each suspect of a crash alone, so that a crash now names it; then the rest.
        for name in recovered.isolate {
            if !self.submit(name, &mut retries) || !self.wait_settled() {
                return;
            }
        }
        for name in recovered.resume {
            if !self.submit(name, &mut retries) {
                return;
            }
        }
        let mut scanner = Scanner::new(Duration::from_millis(self.hf.settle_ms), writers);
        let rescan = Duration::from_secs(self.hf.rescan_s);
        let mut scan_now = true;
        let mut next_rescan = Instant::now() + rescan;
        let mut ready = Some(ready);
        loop {
            let now = Instant::now();
            let wait_over = self.next_wait_end().is_some_and(|t| t <= now);
            if scan_now
                || wait_over
                || now >= next_rescan
                || scanner.next_check().is_some_and(|t| t <= now)
            {
                scan_now = false;
                if now >= next_rescan {
                    next_rescan = now + rescan;
                }
                let listed = scanner.scan(&self.layout);
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                match listed.map(|names| self.gate(names)) {
                    Ok(names) => {
                        for name in names {
                            match claim(&self.layout, &name) {
                                Ok(Claim::Claimed) => {
                                    self.shared.claimed.fetch_add(1, Ordering::Relaxed);
                                    if !self.submit(name, &mut retries) {
                                        return;
                                    }
                                }
                                Ok(Claim::Lost) => {}
                                Ok(Claim::Busy) => {
                                    // Same name still in work/: look again soon.
                                    next_rescan =
                                        next_rescan.min(Instant::now() + Duration::from_secs(1));
                                }
                                Err(e) => {
                                    tracing::error!(file = ?name, error = %e, "cannot claim")
                                }
                            }
                            if self.stopped() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(inbox = %self.layout.inbox.display(), error = %e, "cannot list the inbox")
                    }
                }
            }
            let now = Instant::now();
            let mut due = Vec::new();
            retries.retain(|(n, t)| {
                if *t <= now {
                    due.push(n.clone());
                    false
                } else {
                    true
                }
            });
            for name in due {
                if !self.submit(name, &mut retries) {
                    return;
                }
            }
            let mut wake = next_rescan;
            if let Some(t) = scanner.next_check() {
                wake = wake.min(t);
            }
            if let Some(t) = retries.iter().map(|r| r.1).min() {
                wake = wake.min(t);
            }
            if let Some(t) = self.next_wait_end() {
                wake = wake.min(t);
            }
            self.shared
                .retry_waiting
                .store(retries.len() as u64, Ordering::Relaxed);
            let timeout = wake.saturating_duration_since(Instant::now());
            select! {
                recv(self.stop_rx) -> _ => return,
                recv(nudge) -> _ => scan_now = true,
                recv(retry_rx) -> r => if let Ok(r) = r { retries.push(r) },
                recv(finish_rx) -> n => if let Ok(n) = n { retries.push((n, Instant::now())) },
                default(timeout) => {}
            }
        }
    }
}

/// A second daemon on a folder one already serves is told so first, not that the
/// metrics port is taken (what it said before, the lock coming later). Only a look: the
/// session takes the lock for good.
fn refuse_a_second_daemon(cfg: &Config) -> Result<(), ServiceError> {
    let Some(hf) = &cfg.hotfolder else {
        return Ok(());
    };
    let layout = Layout::new(&hf.root);
    if layout.root.is_dir() {
        drop(layout.lock()?);
    }
    Ok(())
}

/// The config (the file with its `--set` overrides, read again on every SIGHUP).
fn load(source: &ConfigSource) -> Result<Config, ServiceError> {
    let cfg = source.load()?;
    if cfg.hotfolder.is_none() {
        return Err(ServiceError::NoHotfolder(source.path.display().to_string()));
    }
    Ok(cfg)
}

/// Run the daemon until SIGTERM/SIGINT. Call [`signals::install`] first thing in
/// `main` (before any thread exists) and pass its receiver. A hot folder's stop ends the
/// process (status 0) rather than return; an error returns.
///
/// `role` (`--role`) overrides `[cluster] role`: a worker runs [`worker::run`] and needs
/// no hot folder.
pub fn run(
    config: &ConfigSource,
    signals: Receiver<Signal>,
    role: Option<Role>,
) -> Result<(), ServiceError> {
    let cfg = config.load()?;
    let cluster_role = cfg.cluster.as_ref().map(|c| c.role);
    match (role, cluster_role) {
        (Some(_), None) => return Err(ServiceError::NoCluster(cfg.source.clone())),
        (Some(Role::Worker), _) | (None, Some(Role::Worker)) => {
            return worker::run(&cfg, signals);
        }
        _ => {}
    }
    let notifier = systemd::Notifier::from_env();
    let cfg = load(config)?;
    refuse_a_second_daemon(&cfg)?;
    let shared = Arc::new(Shared::new(60));
    if let Some(addr) = cfg.metrics.listen {
        let local = http::serve(addr, Arc::clone(&shared)).map_err(|source| ServiceError::Io {
            context: format!("cannot listen on {addr} ([metrics] listen)"),
            source,
        })?;
        tracing::info!(%local, "status page on http://{local}/, metrics on /metrics, health on /healthz");
    }
    let mut session = start(&cfg, &shared, &notifier)?;
    let tick = crossbeam_channel::tick(notifier.tick());
    // Between a (re)start and the first scan's end: systemd is waiting for READY=1.
    let mut starting = true;
    loop {
        let outcomes = session.outcomes.clone();
        let ready = session.ready.clone();
        let deaths = session.pipeline.deaths().clone();
        select! {
            recv(ready) -> r => {
                session.ready = crossbeam_channel::never();
                starting = false;
                if r.is_ok() {
                    let info = session.pipeline.info();
                    tracing::info!(
                        root = %session.layout.root.display(),
                        watcher = ?session.hf.watcher,
                        model = %info.model_text(),
                        devices = %info.devices_text(),
                        "hot folder ready"
                    );
                    notifier.send("READY=1\nSTATUS=watching the inbox");
                    shared.recent.set_running(info.model_text(), &info.devices_text());
                }
            },
            recv(outcomes) -> o => match o {
                Ok(o) => session.handle(o, &shared),
                Err(_) => return Err(ServiceError::PipelineDied),
            },
            // A thread that died holds items that will never have an outcome: stop with
            // the error (systemd restarts the service; the items are resumed from work/).
            recv(deaths) -> e => if let Ok(e) = e {
                return Err(ServiceError::Pipeline(e));
            },
            recv(signals) -> s => match s {
                Ok(Signal::Terminate) | Err(_) => {
                    return stop(session, &shared, &notifier).map(|never| match never {});
                }
                Ok(Signal::Reload) => {
                    let restarted;
                    (session, restarted) = reload(session, config, &shared, &notifier)?;
                    starting |= restarted;
                }
            },
            recv(tick) -> _ => {
                let health = shared.health();
                if let (Err(why), Some(_)) = (&health, notifier.watchdog) {
                    tracing::error!(%why, "pipeline stuck; withholding the watchdog ping");
                }
                notifier.alive(health.is_ok(), starting);
            },
        }
    }
}

/// SIGTERM: stop claiming, finish what is in flight within the grace period, and say
/// what stays in `work/` for the next start (items cut off by the grace, and any waiting
/// on a retry). Then the process ends at once (see [`exit_now`]), status 0: everything is
/// on disk, and what exit handlers would still run (libtorch's destructors) kept an idle
/// daemon alive 0.15 s after it logged "stopped", and up to 2.5 s on a loaded machine.
fn stop(
    session: Session,
    shared: &Shared,
    notifier: &systemd::Notifier,
) -> Result<std::convert::Infallible, ServiceError> {
    notifier.send("STOPPING=1\nSTATUS=finishing items in flight");
    shared.recent.set_phase(recent::Phase::Stopping);
    let grace = Duration::from_secs(session.hf.shutdown_grace_s);
    // The grace is the config's promise; the unit's TimeoutStopSec (derived from it at
    // install time) may be older than the config.
    notifier.extend(grace + STOP_MARGIN);
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopping: no new claims, finishing items in flight"
    );
    let layout = session.layout.clone();
    let drained = session.drain(shared, Some(Instant::now() + grace))?;
    let (done, failed) = (
        shared.done.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
    );
    let left = layout.items_in_work().unwrap_or(0);
    if !drained {
        tracing::info!(
            drained,
            left_in_work = left,
            done,
            failed,
            "stopped past the grace period: {left} item(s) stay in work/ and are resumed by the next start"
        );
        exit_now(0);
    }
    if left > 0 {
        tracing::info!(
            drained,
            left_in_work = left,
            done,
            failed,
            "stopped: {left} item(s) stay in work/ (waiting for a retry) and are resumed by the next start"
        );
    } else {
        tracing::info!(drained, left_in_work = left, done, failed, "stopped");
    }
    exit_now(0)
}

/// End the process at once, without exit handlers. Past the grace period pipeline threads
/// may still be inside libtorch, and the C++ static destructors that `exit` runs would
/// tear libtorch down under them (the process died by SIGSEGV at `systemctl stop`).
/// Nothing needs flushing: every on-disk step is crash-safe, and log lines are written
/// unbuffered (stderr) or sent at once (journald).
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions and never returns; it skips only user-space
    // clean-up, which is the point.
    // Why libc and not a crate: std has no exit without exit handlers (`process::exit`
    // runs them; `abort` loses the status); rustix's safe `exit_group` is in its
    // experimental, hidden `runtime` API; `nix::unistd::_exit` is this same call behind a
    // safe signature, not worth a dependency for one line (libc stays a dependency for
    // the crash handlers either way).
    unsafe { libc::_exit(code) }
}

/// Start a session (the model loads: possibly minutes) while systemd's start timeout is
/// extended and its watchdog fed, for [`START_LIMIT`] at most.
fn start(
    cfg: &Config,
    shared: &Arc<Shared>,
    notifier: &systemd::Notifier,
) -> Result<Session, ServiceError> {
    let t0 = Instant::now();
    notifier.busy(
        || t0.elapsed() < START_LIMIT,
        || Session::start(cfg, shared),
    )
}

/// SIGHUP: a valid config replaces the running one (drain, then start with it); an
/// invalid one, or one whose pipeline will not start, leaves the old one running. The
/// second value says whether a session was started (its first scan then ends the reload
/// with `READY=1` from the main loop); a config that does not load ends it here.
fn reload(
    session: Session,
    source: &ConfigSource,
    shared: &Arc<Shared>,
    notifier: &systemd::Notifier,
) -> Result<(Session, bool), ServiceError> {
    notifier.reloading("reloading the config");
    shared.recent.set_phase(recent::Phase::Reloading);
    let new = match load(source) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
            notifier.send(&format!(
                "READY=1\nSTATUS=reload failed, running the previous config: {}",
                crate::vocab::error::first_line(&e.to_string())
            ));
            shared.recent.set_phase(recent::Phase::Ready);
            return Ok((session, false));
        }
    };
    if new.metrics != session.cfg.metrics {
        tracing::warn!("[metrics] listen changes take effect at the next start");
    }
    let old = session.cfg.clone();
    // A drain that makes progress may take as long as it needs (systemd's reload timeout
    // is extended); one that is stuck stops feeding the watchdog, as in normal running.
    notifier.busy(|| shared.health().is_ok(), || session.drain(shared, None))?;
    let next = match start(&new, shared, notifier) {
        Ok(s) => {
            tracing::info!(config = %source.path.display(), "config reloaded");
            s
        }
        Err(e) => {
            tracing::error!(error = %e, "the new config does not start; going on with the old one");
            start(&old, shared, notifier)?
        }
    };
    Ok((next, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_rule() {
        let s = Duration::from_secs(10);
        assert!(health_of(0, Duration::from_secs(100), s, || None).is_ok());
        assert!(health_of(3, Duration::from_secs(2), s, || None).is_ok());
        assert!(
            health_of(3, Duration::from_secs(11), s, || None)
                .unwrap_err()
                .contains("3 item(s)")
        );
        let busy = || Some("a batch running for 70 s (allowed 930 s)".to_string());
        assert!(health_of(3, Duration::from_secs(70), s, busy).is_ok());
    }
}
