//! The one stage runner: every stage's workers are spawned, named, measured and guarded
//! here, the same way, so no stage writes its own thread loop.
//!
//! A [`Topology`] spawns N workers of a [`StageWorker`] between a bounded input queue and
//! an [`Emit`] (the next queue, the batch slots, or publication). Per item it records the
//! stage's busy time, turns a [`StageError`] into the item's outcome (with the one
//! transient rule, [`StageError::is_transient`]), and catches panics: a panic while
//! processing fails that item (or that batch) with `internal error in <stage>: <message>`,
//! logged with its backtrace by the panic hook installed here, and the worker goes on with
//! the next item. While a worker processes, its items are *held* ([`crash::hold`]): a
//! crash of the whole process then names them, and only them. A thread that dies anyway (a panic outside `process`) is reported on the
//! pipeline's failure channel: a pipeline error, never silence.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::vocab::crash;
use crate::vocab::error::{PipelineError, Stage, StageError};
use crate::vocab::fault::{self, Fault};
use crate::vocab::item::Item;
use crate::vocab::stage::{Reporter, StageWorker};
use crate::vocab::telemetry::Timer;

/// Downstream is gone: the pipeline is shutting down, the worker stops.
#[derive(Debug)]
pub struct Closed;

/// Where a stage's results go.
pub trait Emit<T>: Send + 'static {
    fn emit(&mut self, item: Item, out: T) -> Result<(), Closed>;
}

impl<T: Send + 'static> Emit<T> for Sender<(Item, T)> {
    fn emit(&mut self, item: Item, out: T) -> Result<(), Closed> {
        self.send((item, out)).map_err(|_| Closed)
    }
}

/// What a stage's input queue carries: an item and the previous stage's output for it
/// (or the bare item, for the first stage).
pub trait Envelope<In>: Send + 'static {
    fn open(self) -> (Item, In);
}

impl Envelope<()> for Item {
    fn open(self) -> (Item, ()) {
        (self, ())
    }
}

impl<T: Send + 'static> Envelope<T> for (Item, T) {
    fn open(self) -> (Item, T) {
        self
    }
}

/// The pipeline's threads, built stage by stage.
pub struct Topology {
    reporter: Reporter,
    threads: Vec<JoinHandle<()>>,
    died: Sender<PipelineError>,
}

/// How many thread deaths the failure channel keeps; the first is what stops a run, and
/// every one is logged.
const DEATHS_KEPT: usize = 16;

impl Topology {
    /// A topology whose failed items go to `reporter`; the receiver reports threads that
    /// died.
    pub fn new(reporter: Reporter) -> (Topology, Receiver<PipelineError>) {
        install_panic_hook();
        let (died, deaths) = bounded(DEATHS_KEPT);
        let t = Topology {
            reporter,
            threads: Vec::new(),
            died,
        };
        (t, deaths)
    }

    /// Start one thread per worker of a stage, all taking from `input`, all emitting
    /// through a clone of `emit`. Threads are named `hp-<name>-<i>`.
    pub fn stage<W, M, E>(
        &mut self,
        name: &str,
        workers: Vec<W>,
        input: &Receiver<M>,
        emit: E,
    ) -> Result<(), PipelineError>
    where
        W: StageWorker,
        M: Envelope<W::In>,
        E: Emit<W::Out> + Clone,
    {
        if let Some(w) = workers.first() {
            self.reporter
                .telemetry
                .set_threads(w.stage(), workers.len());
        }
        for (i, w) in workers.into_iter().enumerate() {
            let (rx, emit, rep) = (input.clone(), emit.clone(), self.reporter.clone());
            self.spawn(format!("hp-{name}-{i}"), move || run(w, rx, emit, rep))?;
        }
        Ok(())
    }

    /// Start a thread that is not a [`StageWorker`] (inference, the queue sampler) with
    /// the same naming and death reporting.
    pub fn spawn(
        &mut self,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), PipelineError> {
        let died = self.died.clone();
        let thread_name = name.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
                    let e = PipelineError::ThreadDied {
                        thread: thread_name,
                        message: panic_message(&*p),
                    };
                    tracing::error!(error = %e, "a pipeline thread died");
                    let _ = died.try_send(e);
                }
            })
            .map_err(|source| PipelineError::Io {
                context: "cannot start a pipeline thread".to_string(),
                source,
            })?;
        self.threads.push(handle);
        Ok(())
    }

    /// The threads, for the pipeline to join.
    pub fn into_threads(self) -> Vec<JoinHandle<()>> {
        self.threads
    }
}

/// A worker's loop: take a batch, process it under a panic guard, emit or fail each
/// item. Returns when the input closes or downstream is gone.
fn run<W, M, E>(mut w: W, rx: Receiver<M>, mut emit: E, rep: Reporter)
where
    W: StageWorker,
    M: Envelope<W::In>,
    E: Emit<W::Out>,
{
    let stage = w.stage();
    let (max, wait) = w.batching();
    let max = max.max(1);
    // Reused from batch to batch: no allocation per item.
    let (mut items, mut inputs, mut results) = (
        Vec::with_capacity(max),
        Vec::with_capacity(max),
        Vec::with_capacity(max),
    );
    while next_batch(&rx, max, wait, &mut items, &mut inputs) {
        let act = inject_faults(stage, &mut items, &mut inputs, &rep);
        if items.is_empty() {
            continue;
        }
        let t = Timer::start();
        let r = catch_unwind(AssertUnwindSafe(|| {
            // A crash of the process from here on is laid at these items (vocab::crash).
            let _held = crash::hold(items.iter().map(|i| i.path.as_path()));
            if let Some(f) = act {
                f.act(stage.as_str());
            }
            w.process_batch(&mut items, &mut inputs, &mut results)
        }));
        rep.telemetry.record(stage, t.elapsed(), items.len() as u64);
        if let Err(p) = r {
            let message = panic_message(&*p);
            inputs.clear();
            results.clear();
            for item in items.drain(..) {
                let e = StageError::Internal {
                    stage,
                    message: message.clone(),
                };
                rep.fail(item, stage, &e);
            }
            continue;
        }
        if results.len() != items.len() {
            // A batch form that lost count: fail what has no result, never drop it.
            let message = format!("{} results for {} items", results.len(), items.len());
            while results.len() < items.len() {
                results.push(Err(StageError::Internal {
                    stage,
                    message: message.clone(),
                }));
            }
        }
        for (item, r) in items.drain(..).zip(results.drain(..)) {
            match r {
                Ok(out) => {
                    if emit.emit(item, out).is_err() {
                        return;
                    }
                }
                Err(e) => rep.fail(item, stage, &e),
            }
        }
        results.clear();
    }
}

/// Block for one item, then take whatever else arrives within `wait`, up to `max`.
/// False when the input is closed and empty.
fn next_batch<M: Envelope<In>, In>(
    rx: &Receiver<M>,
    max: usize,
    wait: Duration,
    items: &mut Vec<Item>,
    inputs: &mut Vec<In>,
) -> bool {
    let Ok(first) = rx.recv() else {
        return false;
    };
    let mut push = |m: M| {
        let (item, input) = m.open();
        items.push(item);
        inputs.push(input);
    };
    push(first);
    let deadline = Instant::now() + wait;
    for _ in 1..max {
        match rx.recv_deadline(deadline) {
            Ok(m) => push(m),
            Err(_) => break,
        }
    }
    true
}

/// Apply the fault points armed for this stage (fault-injection builds only: elsewhere
/// `fault::check` is always `None` and this is a loop that does nothing). I/O and
/// out-of-memory faults fail their item here, as the stage would have; a panic or abort
/// is returned, to be performed inside the panic guard.
fn inject_faults<In>(
    stage: Stage,
    items: &mut Vec<Item>,
    inputs: &mut Vec<In>,
    rep: &Reporter,
) -> Option<Fault> {
    let mut act = None;
    let mut i = 0;
    while i < items.len() {
        let err = match fault::check(stage.as_str(), &items[i].path) {
            None => None,
            Some(f @ (Fault::Panic | Fault::Abort | Fault::Stall)) => {
                act = Some(f);
                None
            }
            Some(Fault::Oom) => Some(StageError::DeviceOom("out of memory (injected)".into())),
            Some(f @ Fault::Errno(_)) => Some(StageError::io(
                "cannot read (injected)",
                f.as_io_error().expect("an errno fault"),
            )),
        };
        match err {
            Some(e) => {
                let item = items.remove(i);
                inputs.remove(i);
                rep.fail(item, stage, &e);
            }
            None => i += 1,
        }
    }
    act
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Log panics of the pipeline's threads (`hp-*`) through tracing, with where and a
/// backtrace, so they reach the journal with the item's failure; other threads (tests,
/// the CLI) keep the default hook's message on stderr.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if !name.starts_with("hp-") {
                return default(info);
            }
            let message = panic_message(info.payload());
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            let backtrace = std::backtrace::Backtrace::force_capture();
            tracing::error!(thread = name, %location, %message, %backtrace, "panic");
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::telemetry::Telemetry;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// Doubles numbers; panics on 13; fails 7 as bad input.
    struct Doubler;

    impl StageWorker for Doubler {
        type In = u32;
        type Out = u32;
        fn stage(&self) -> Stage {
            Stage::Fit
        }
        fn process(&mut self, _item: &mut Item, x: u32) -> Result<u32, StageError> {
            match x {
                13 => panic!("unlucky {x}"),
                7 => Err(StageError::BadInput("seven".into())),
                x => Ok(x * 2),
            }
        }
    }

    #[test]
    fn panics_and_errors_fail_their_item_and_the_worker_goes_on() {
        let tel = Arc::new(Telemetry::default());
        let (out_tx, out_rx) = bounded(64);
        let (mut topo, deaths) = Topology::new(Reporter {
            telemetry: Arc::clone(&tel),
            outcomes: out_tx,
        });
        let (in_tx, in_rx) = bounded::<(Item, u32)>(4);
        let (next_tx, next_rx) = bounded::<(Item, u32)>(64);
        topo.stage("double", vec![Doubler], &in_rx, next_tx)
            .unwrap();
        drop(in_rx);
        for x in 0..20u32 {
            let item = Item::new(u64::from(x), PathBuf::from(format!("/in/{x}.jpg")));
            in_tx.send((item, x)).unwrap();
        }
        drop(in_tx);
        for t in topo.into_threads() {
            t.join().unwrap();
        }
        let doubled: Vec<u32> = next_rx.try_iter().map(|(_, y)| y).collect();
        assert_eq!(doubled.len(), 18);
        assert!(doubled.iter().all(|y| y % 2 == 0));
        let mut failed: Vec<(u64, String)> = out_rx
            .try_iter()
            .map(|o| (o.item.id, o.result.unwrap_err().reason))
            .collect();
        failed.sort();
        assert_eq!(
            failed,
            vec![
                (7, "seven".to_string()),
                (13, "internal error in fit: unlucky 13".to_string())
            ]
        );
        assert_eq!(
            tel.stage(Stage::Fit)
                .failed
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert!(deaths.try_recv().is_err(), "no thread died");
    }

    #[test]
    fn a_thread_that_dies_is_reported() {
        let (out_tx, _out_rx) = bounded(1);
        let (mut topo, deaths) = Topology::new(Reporter {
            telemetry: Arc::new(Telemetry::default()),
            outcomes: out_tx,
        });
        topo.spawn("hp-test-dies".into(), || panic!("gone"))
            .unwrap();
        for t in topo.into_threads() {
            t.join().unwrap();
        }
        let e = deaths.try_recv().expect("a death report");
        assert_eq!(e.to_string(), "thread hp-test-dies died: gone");
    }
}
