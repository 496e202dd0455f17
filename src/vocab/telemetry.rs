//! Per-stage counters: busy time, items, failures, and queue depths sampled from the
//! channels, so a run can say which stage bounds it.
//!
//! Busy time is the wall time a stage's threads spent working on items (not waiting on
//! their input or output). Divided by the run's wall time and the stage's thread count it
//! gives utilisation: the stage near 100% is the bottleneck, and a stage whose input queue
//! is usually empty is starved. Counters are atomics so the hot path never locks for them;
//! the metrics endpoint and the end-of-run report read the same numbers.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::vocab::error::Stage;

pub const STAGES: [Stage; 7] = [
    Stage::Read,
    Stage::Decode,
    Stage::Detect,
    Stage::Fit,
    Stage::Infer,
    Stage::Encode,
    Stage::Publish,
];

/// Histogram bucket upper bounds in seconds (Prometheus `le`).
pub const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

#[derive(Debug, Default)]
pub struct StageStats {
    pub busy_ns: AtomicU64,
    pub items: AtomicU64,
    pub failed: AtomicU64,
    pub threads: AtomicU64,
    /// Sum of sampled input-queue depths and the number of samples (mean occupancy).
    pub queue_sum: AtomicU64,
    pub queue_samples: AtomicU64,
    pub queue_capacity: AtomicU64,
    pub queue_now: AtomicU64,
    pub hist: [AtomicU64; BUCKETS.len() + 1],
}

#[derive(Debug)]
pub struct Telemetry {
    pub stages: [StageStats; STAGES.len()],
    pub started: Instant,
    pub batches: AtomicU64,
    pub batch_rows: AtomicU64,
    pub batch_hist: [AtomicU64; 8],
    /// Last time any stage finished an item (ms since `started`), for the watchdog and
    /// the health check.
    pub last_progress_ms: AtomicU64,
    /// When the last batch began ([`clock_ms`]), and its progress mark: a batch that began
    /// after the last progress is still running.
    pub batch_started_ms: AtomicU64,
    pub batch_started_progress_ms: AtomicU64,
    /// The longest batch so far (ms): where no timeout bounds a batch, four times this
    /// is how long one may take before the stage is stuck.
    pub longest_batch_ms: AtomicU64,
    /// One per model worker process (the Python backend; empty for TorchScript models,
    /// which run inside hotpipe).
    pub model_workers: Mutex<Vec<Arc<ModelWorkerStats>>>,
}

/// One model worker process's counters, shared with its supervisor.
#[derive(Debug, Default)]
pub struct ModelWorkerStats {
    /// Time the worker spent on batches (from the batch frame to its reply).
    pub busy_ns: AtomicU64,
    pub batches: AtomicU64,
    /// Started again after dying or overrunning `batch_timeout_s`.
    pub restarts: AtomicU64,
    /// Images the worker failed (the pipeline raised, or the image killed it).
    pub failed_items: AtomicU64,
    /// Whether a worker process is running now.
    pub alive: AtomicBool,
    /// When the batch it is on began ([`clock_ms`]; 0: none), its restarts included.
    pub running_since_ms: AtomicU64,
    /// How long one batch may take before the worker is stuck: its `batch_timeout_s`
    /// plus twice its measured start-up (a worker killed for overrunning is started
    /// again within the same batch), plus 30 s; 0 with no timeout (then the learned bound
    /// of [`Telemetry::busy_within_allowance`] applies).
    pub allowed_ms: AtomicU64,
}

/// Milliseconds on one monotonic clock for the whole process (from its first use), so
/// the supervisor and the health rule agree on when a batch began.
pub fn clock_ms() -> u64 {
    static ZERO: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ZERO.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            stages: Default::default(),
            started: Instant::now(),
            batches: AtomicU64::new(0),
            batch_rows: AtomicU64::new(0),
            batch_hist: Default::default(),
            last_progress_ms: AtomicU64::new(0),
            batch_started_ms: AtomicU64::new(0),
            batch_started_progress_ms: AtomicU64::new(0),
            longest_batch_ms: AtomicU64::new(0),
            model_workers: Mutex::new(Vec::new()),
        }
    }
}

fn index(stage: Stage) -> usize {
    STAGES.iter().position(|&s| s == stage).unwrap_or(0)
}

impl Telemetry {
    pub fn stage(&self, stage: Stage) -> &StageStats {
        &self.stages[index(stage)]
    }

    /// Record one item's work in a stage (`items` items, e.g. a batch of rows).
    pub fn record(&self, stage: Stage, busy: Duration, items: u64) {
        if stage == Stage::Infer {
            self.longest_batch_ms
                .fetch_max(busy.as_millis() as u64, Ordering::Relaxed);
        }
        let s = self.stage(stage);
        s.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        s.items.fetch_add(items, Ordering::Relaxed);
        let secs = busy.as_secs_f64();
        let b = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        s.hist[b].fetch_add(1, Ordering::Relaxed);
        self.last_progress_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Why a quiet pipeline is not stuck, if it is not: a batch is running and has not
    /// yet taken what it is allowed, for a model worker its `allowed_ms`, else (no
    /// timeout, or a TorchScript model) `stuck` or four times the longest batch so far,
    /// whichever is longer. A generation that takes minutes is then not a stuck service;
    /// one that overruns its own bound is.
    pub fn busy_within_allowance(&self, stuck: Duration) -> Option<String> {
        let now = clock_ms();
        let learned =
            (4 * self.longest_batch_ms.load(Ordering::Relaxed)).max(stuck.as_millis() as u64);
        let within = |since: u64, allowed: u64| {
            let ran = now.saturating_sub(since);
            (since > 0 && ran < allowed).then(|| {
                format!(
                    "a batch running for {:.0} s (allowed {:.0} s)",
                    ran as f64 / 1e3,
                    allowed as f64 / 1e3
                )
            })
        };
        let workers = self.model_workers();
        if !workers.is_empty() {
            return workers.iter().find_map(|w| {
                let allowed = match w.allowed_ms.load(Ordering::Relaxed) {
                    0 => learned,
                    a => a,
                };
                within(w.running_since_ms.load(Ordering::Relaxed), allowed)
            });
        }
        // In-process models: the last batch is still running if no progress was made
        // since it began (every batch's end is progress).
        let running = self.last_progress_ms.load(Ordering::Relaxed)
            == self.batch_started_progress_ms.load(Ordering::Relaxed);
        running
            .then(|| within(self.batch_started_ms.load(Ordering::Relaxed), learned))
            .flatten()
    }

    pub fn failed(&self, stage: Stage) {
        self.stage(stage).failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_threads(&self, stage: Stage, n: usize) {
        self.stage(stage).threads.store(n as u64, Ordering::Relaxed);
    }

    pub fn sample_queue(&self, stage: Stage, depth: usize, capacity: usize) {
        let s = self.stage(stage);
        s.queue_sum.fetch_add(depth as u64, Ordering::Relaxed);
        s.queue_samples.fetch_add(1, Ordering::Relaxed);
        s.queue_capacity.store(capacity as u64, Ordering::Relaxed);
        s.queue_now.store(depth as u64, Ordering::Relaxed);
    }

    pub fn batch(&self, rows: usize) {
        self.batch_started_progress_ms.store(
            self.last_progress_ms.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.batch_started_ms.store(clock_ms(), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let b = (usize::BITS - rows.max(1).leading_zeros() - 1).min(7) as usize;
        self.batch_hist[b].fetch_add(1, Ordering::Relaxed);
    }

    /// Add `other`'s counters (busy time, items, failures, histograms, batches) to this
    /// one's; gauges (threads, queue depths) and progress times are left alone. What keeps
    /// the service's exported counters monotonic: a reload retires a pipeline, and its
    /// final counts are folded into a long-lived total instead of being lost.
    pub fn absorb(&self, other: &Telemetry) {
        let add = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        for (to, from) in self.stages.iter().zip(&other.stages) {
            add(&to.busy_ns, &from.busy_ns);
            add(&to.items, &from.items);
            add(&to.failed, &from.failed);
            for (t, f) in to.hist.iter().zip(&from.hist) {
                add(t, f);
            }
        }
        add(&self.batches, &other.batches);
        add(&self.batch_rows, &other.batch_rows);
        for (t, f) in self.batch_hist.iter().zip(&other.batch_hist) {
            add(t, f);
        }
        let theirs = other.model_workers();
        let mut ours = self.model_workers.lock().unwrap_or_else(|p| p.into_inner());
        while ours.len() < theirs.len() {
            ours.push(Arc::default());
        }
        for (to, from) in ours.iter().zip(&theirs) {
            add(&to.busy_ns, &from.busy_ns);
            add(&to.batches, &from.batches);
            add(&to.restarts, &from.restarts);
            add(&to.failed_items, &from.failed_items);
        }
    }

    /// Count these model worker processes' stats in this telemetry.
    pub fn register_model_workers(&self, stats: &[Arc<ModelWorkerStats>]) {
        (self.model_workers.lock().unwrap_or_else(|p| p.into_inner()))
            .extend(stats.iter().cloned());
    }

    pub fn model_workers(&self) -> Vec<Arc<ModelWorkerStats>> {
        self.model_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the pipeline cannot run its model now: it has model worker processes and
    /// none of them is running.
    pub fn model_down(&self) -> Option<String> {
        let w = self.model_workers();
        (!w.is_empty() && !w.iter().any(|s| s.alive.load(Ordering::Relaxed))).then(|| {
            format!(
                "no model worker is running ({} configured; each is being started again)",
                w.len()
            )
        })
    }

    /// The stage with the highest utilisation per thread, if any work was recorded.
    pub fn bottleneck(&self) -> Option<(Stage, f64)> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        STAGES
            .iter()
            .filter_map(|&st| {
                let s = self.stage(st);
                let threads = s.threads.load(Ordering::Relaxed).max(1) as f64;
                let busy = s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
                (s.items.load(Ordering::Relaxed) > 0).then_some((st, busy / wall / threads))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// A human-readable table: stage, threads, items, busy %, mean ms per item, queue.
    pub fn report(&self) -> String {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut out =
            String::from("stage     threads  items  busy%/thread  ms/item  queue(mean/cap)\n");
        for &st in &STAGES {
            let s = self.stage(st);
            let items = s.items.load(Ordering::Relaxed);
            if items == 0 {
                continue;
            }
            let threads = s.threads.load(Ordering::Relaxed).max(1);
            let busy = s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let samples = s.queue_samples.load(Ordering::Relaxed).max(1);
            let qmean = s.queue_sum.load(Ordering::Relaxed) as f64 / samples as f64;
            let _ = writeln!(
                out,
                "{:<9} {:>7} {:>6} {:>13.1} {:>8.2} {:>8.1}/{}",
                st.as_str(),
                threads,
                items,
                100.0 * busy / wall / threads as f64,
                1000.0 * busy / items as f64,
                qmean,
                s.queue_capacity.load(Ordering::Relaxed)
            );
        }
        let batches = self.batches.load(Ordering::Relaxed);
        if batches > 0 {
            let _ = writeln!(
                out,
                "batches: {batches}, mean size {:.2}",
                self.batch_rows.load(Ordering::Relaxed) as f64 / batches as f64
            );
        }
        if let Some((st, u)) = self.bottleneck() {
            let _ = writeln!(out, "bottleneck: {st} ({:.0}% busy per thread)", 100.0 * u);
        }
        out
    }
}

/// Times a stage's work on one item and records it on drop-free `finish`.
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Timer {
        Timer(Instant::now())
    }
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorb_adds_counters_and_leaves_gauges() {
        let (total, a) = (Telemetry::default(), Telemetry::default());
        a.record(Stage::Decode, Duration::from_millis(3), 2);
        a.failed(Stage::Decode);
        a.batch(5);
        a.sample_queue(Stage::Decode, 3, 8);
        total.absorb(&a);
        total.absorb(&a);
        let s = total.stage(Stage::Decode);
        assert_eq!(s.items.load(Ordering::Relaxed), 4);
        assert_eq!(s.failed.load(Ordering::Relaxed), 2);
        assert_eq!(s.busy_ns.load(Ordering::Relaxed), 6_000_000);
        assert_eq!(s.hist[1].load(Ordering::Relaxed), 0);
        assert_eq!(
            s.hist[2].load(Ordering::Relaxed),
            2,
            "3 ms is in the 5 ms bucket"
        );
        assert_eq!(total.batches.load(Ordering::Relaxed), 2);
        assert_eq!(total.batch_rows.load(Ordering::Relaxed), 10);
        assert_eq!(total.batch_hist[2].load(Ordering::Relaxed), 2);
        assert_eq!(
            s.queue_now.load(Ordering::Relaxed),
            0,
            "gauges are not summed"
        );
    }
}
