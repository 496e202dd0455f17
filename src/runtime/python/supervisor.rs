//! Workers kept alive across their deaths, and the lost batch found out.
//!
//! A batch on which a worker dies or overruns its time limit is run again one image at a
//! time on a restarted worker, so the input that kills it fails alone (after
//! `max_attempts` tries, each retry after the rest of the batch) and every other image is
//! made after one lost batch, not after one per halving (a hung image held the others for
//! three timeouts). Singles cost no more restarts than halves: only the images that kill
//! the worker take it down again. Restarts back
//! off (0.1 s doubling to 10 s, reset by a batch that succeeds), so a worker that dies at
//! once does not spin. A worker found dead before a batch is sent (killed while idle) is
//! started again first, without counting an attempt against anyone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::shm::{Layout, SharedSlots, ShmFile};
use super::worker::{Job, PyWorker, RowError};
use super::{PyError, WorkerSpec};
use crate::vocab::telemetry::{ModelWorkerStats, clock_ms};

/// The first restart's wait; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The slots the workers share: `slots` batch slots of `rows` images of `H x W x C`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub slots: usize,
    pub rows: usize,
    pub hwc: [usize; 3],
}

/// How long a batch may take and how often an image may take a worker down.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub batch_timeout: Option<Duration>,
    pub max_attempts: u32,
}

/// How one image of a batch ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    Made,
    Failed(RowError),
    /// It took the worker down `max_attempts` times: how the worker died.
    KilledWorker(String),
}

impl RowOutcome {
    /// Why the image was not made.
    pub fn message(&self) -> Option<&str> {
        match self {
            RowOutcome::Made => None,
            RowOutcome::Failed(RowError::Raised(m) | RowError::OutOfMemory(m))
            | RowOutcome::KilledWorker(m) => Some(m),
        }
    }
}

/// Start one worker per spec (in parallel: a large pipeline takes minutes to construct),
/// all on one shared file laid out for their reported output. Fails with the first
/// worker's reason when any cannot start, or when they disagree on the output.
pub fn start_workers(
    specs: Vec<WorkerSpec>,
    shape: Shape,
    limits: Limits,
    stats: Vec<Arc<ModelWorkerStats>>,
) -> Result<(Vec<Supervisor>, Arc<SharedSlots>), PyError> {
    assert_eq!(specs.len(), stats.len());
    let file = ShmFile::create()?;
    let [h, w, c] = shape.hwc;
    let input = [shape.slots + specs.len(), shape.rows, h, w, c];
    let t = Instant::now();
    let started: Vec<Result<PyWorker, PyError>> = std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(|| PyWorker::start(spec, file.fd(), input)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(PyError::Protocol("worker start panicked".into())))
            })
            .collect()
    });
    let mut workers = started.into_iter().collect::<Result<Vec<_>, _>>()?;
    // What a batch may take before the worker counts as stuck: its timeout, and twice
    // the start-up just measured for the restart an overrun brings, and a margin.
    let allowed_ms = limits.batch_timeout.map_or(0, |b| {
        (b + 2 * t.elapsed() + Duration::from_secs(30)).as_millis() as u64
    });
    let output = workers[0].output;
    if let Some((i, other)) = workers.iter().enumerate().find(|(_, w)| w.output != output) {
        return Err(PyError::Fatal(format!(
            "the workers disagree on output_shape: {output:?} on {}, {:?} on {}",
            specs[0].device, other.output, specs[i].device
        )));
    }
    let [k, oh, ow, oc] = output;
    let layout = Layout {
        pipeline_slots: shape.slots,
        rows: shape.rows,
        in_row: h * w * c,
        out_row: k * oh * ow * oc,
        workers: specs.len(),
    };
    let shm = Arc::new(SharedSlots::map(file, layout)?);
    for (i, w) in workers.iter_mut().enumerate() {
        w.map(&layout, i)?;
    }
    let sups = specs
        .into_iter()
        .zip(workers)
        .zip(stats)
        .enumerate()
        .map(|(index, ((spec, worker), stats))| {
            stats.alive.store(true, Ordering::Relaxed);
            stats.allowed_ms.store(allowed_ms, Ordering::Relaxed);
            let about = worker.about.clone();
            Supervisor {
                spec,
                index,
                input,
                shm: Arc::clone(&shm),
                worker: Some(worker),
                limits: Limits {
                    max_attempts: limits.max_attempts.max(1),
                    ..limits
                },
                backoff: FIRST_BACKOFF,
                output,
                about,
                stats,
            }
        })
        .collect();
    Ok((sups, shm))
}

/// One worker slot kept filled: see the module docs.
pub struct Supervisor {
    spec: WorkerSpec,
    index: usize,
    input: [usize; 5],
    shm: Arc<SharedSlots>,
    worker: Option<PyWorker>,
    limits: Limits,
    backoff: Duration,
    output: [usize; 4],
    about: serde_json::Value,
    stats: Arc<ModelWorkerStats>,
}

impl Supervisor {
    /// What the pipeline said it is at its first start (`describe()`, with its class).
    pub fn about(&self) -> &serde_json::Value {
        &self.about
    }

    /// The parameters for a row without an item's ([`super::WorkerSpec::placeholders`]).
    pub fn placeholders(&self) -> &serde_json::Value {
        &self.spec.placeholders
    }

    /// Outputs per input, height, width, channels.
    pub fn output(&self) -> [usize; 4] {
        self.output
    }

    pub fn device(&self) -> &str {
        &self.spec.device
    }

    /// Which worker of the shared file this is.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn shared(&self) -> &Arc<SharedSlots> {
        &self.shm
    }

    pub fn stats(&self) -> &Arc<ModelWorkerStats> {
        &self.stats
    }

    /// Run the `params.len()` images in rows `0..` of input slot `input` into the same
    /// rows of this worker's output slot `output`; how each ended. `Err` only when no
    /// worker can be started again (the images are not to blame; the caller keeps them).
    pub fn run_slots(
        &mut self,
        input: usize,
        output: usize,
        params: &[Value],
    ) -> Result<Vec<RowOutcome>, PyError> {
        let n = params.len();
        let mut outcomes = vec![RowOutcome::Made; n];
        let mut attempts = vec![0u32; n];
        let mut todo = std::collections::VecDeque::from([(0, n)]);
        while let Some((start, rows)) = todo.pop_front() {
            if rows == 0 {
                continue;
            }
            let job = Job {
                input,
                output,
                start,
                rows,
            };
            match self.run_once(job, &params[start..start + rows])? {
                Ok(errs) => {
                    for (o, e) in outcomes[start..].iter_mut().zip(errs) {
                        *o = e.map_or(RowOutcome::Made, RowOutcome::Failed);
                    }
                }
                Err(why) if rows > 1 => {
                    for row in (start..start + rows).rev() {
                        todo.push_front((row, 1));
                    }
                    tracing::warn!(rows, %why, device = self.spec.device, "model worker lost a batch; running its images again one at a time");
                }
                Err(why) => {
                    attempts[start] += 1;
                    if attempts[start] < self.limits.max_attempts {
                        // After the others: they should not wait for it again.
                        todo.push_back((start, 1));
                    } else {
                        outcomes[start] = RowOutcome::KilledWorker(why);
                    }
                }
            }
        }
        // Have a worker ready for the next batch (and /healthz right meanwhile); one that
        // cannot start is reported by the next batch.
        if let Err(e) = self.ensure_worker() {
            tracing::error!(device = self.spec.device, error = %e, "cannot start the model worker again");
        }
        Ok(outcomes)
    }

    /// Run `params.len()` images packed in `input` through this worker's scratch slots
    /// into `out` (their `K x H' x W' x C'` outputs, packed), a slot's rows at a time:
    /// for batches that are not the pipeline's (`check`, `bench`, tests).
    pub fn run(
        &mut self,
        input: &[u8],
        params: &[Value],
        out: &mut [u8],
    ) -> Result<Vec<RowOutcome>, PyError> {
        let l = self.shm.layout();
        let (ins, outs) = (l.pipeline_slots + self.index, l.pipeline_slots);
        assert_eq!(input.len(), params.len() * l.in_row, "input rows");
        assert_eq!(out.len(), params.len() * l.out_row, "output rows");
        let mut outcomes = Vec::with_capacity(params.len());
        for (i, chunk) in params.chunks(l.rows).enumerate() {
            let first = i * l.rows;
            let n = chunk.len();
            // SAFETY: the scratch slots are this supervisor's alone (see `Layout`), and
            // `&mut self` excludes a concurrent run on them; the worker touches them
            // only inside `run_slots` below.
            unsafe {
                let to = self.shm.input_slot(ins);
                std::ptr::copy_nonoverlapping(
                    input[first * l.in_row..].as_ptr(),
                    to.ptr,
                    n * l.in_row,
                );
            }
            outcomes.extend(self.run_slots(ins, outs, chunk)?);
            // SAFETY: as above; the worker has replied, so the output rows are written.
            unsafe {
                let from = self.shm.output_slot(self.index, outs);
                std::ptr::copy_nonoverlapping(
                    from.ptr,
                    out[first * l.out_row..].as_mut_ptr(),
                    n * l.out_row,
                );
            }
        }
        Ok(outcomes)
    }

    /// One try of `job`. `Ok(Err(why))`: the worker died or overran, and is gone; `why`
    /// is the reason an input that does this every time fails with.
    fn run_once(
        &mut self,
        job: Job,
        params: &[Value],
    ) -> Result<Result<Vec<Option<RowError>>, String>, PyError> {
        // A restart (the pipeline loading again) counts as part of the batch's time.
        self.stats
            .running_since_ms
            .store(clock_ms(), Ordering::Relaxed);
        let r = self.run_once_started(job, params);
        self.stats.running_since_ms.store(0, Ordering::Relaxed);
        r
    }

    fn run_once_started(
        &mut self,
        job: Job,
        params: &[Value],
    ) -> Result<Result<Vec<Option<RowError>>, String>, PyError> {
        self.ensure_worker()?;
        let w = self.worker.as_mut().expect("a worker was just ensured");
        let t = Instant::now();
        let r = w.run(job, params, self.limits.batch_timeout);
        self.stats
            .busy_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(errs) => {
                self.backoff = FIRST_BACKOFF;
                let failed = errs.iter().filter(|e| e.is_some()).count();
                self.stats
                    .failed_items
                    .fetch_add(failed as u64, Ordering::Relaxed);
                Ok(Ok(errs))
            }
            Err(e) => {
                self.lost();
                match e {
                    PyError::Died(how) => {
                        tracing::warn!(rows = job.rows, device = self.spec.device, %how, "model worker died during a batch");
                        Ok(Err(format!("model worker died on this input ({how})")))
                    }
                    PyError::Timeout(s) => Ok(Err(format!(
                        "model worker hung on this input (no answer within {s} s, batch_timeout_s; it was killed)"
                    ))),
                    PyError::Protocol(p) => Ok(Err(format!(
                        "model worker broke the protocol on this input ({p}); it was stopped"
                    ))),
                    e => Err(e),
                }
            }
        }
    }

    fn lost(&mut self) {
        self.worker = None;
        self.stats.alive.store(false, Ordering::Relaxed);
    }

    /// A running worker: the current one, or a new one after the back-off.
    fn ensure_worker(&mut self) -> Result<(), PyError> {
        if let Some(w) = &mut self.worker {
            if w.running() {
                return Ok(());
            }
            tracing::warn!(
                device = self.spec.device,
                "model worker died while idle; starting it again"
            );
            self.lost();
        }
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        let mut w = PyWorker::start(&self.spec, self.shm.fd(), self.input)?;
        if w.output != self.output {
            return Err(PyError::Fatal(format!(
                "the restarted worker's output_shape is {:?}, not {:?} as at start-up",
                w.output, self.output
            )));
        }
        w.map(&self.shm.layout(), self.index)?;
        tracing::info!(device = self.spec.device, "model worker started again");
        self.stats.alive.store(true, Ordering::Relaxed);
        self.worker = Some(w);
        Ok(())
    }
}
