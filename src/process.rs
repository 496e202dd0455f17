//! `hotpipe process`: run the pipeline once over files and folders, with progress and a
//! summary.
//!
//! Progress is a bar when stderr is a terminal and a plain log line every few seconds
//! otherwise (a bar's carriage returns make a mess of a log file). Log lines written to
//! the terminal while the bar is shown go through [`LogWriter`], which takes the bar off
//! the screen for the line and draws it again below. Every failure is kept
//! with its reason for the summary; the caller decides the exit status. The summary is
//! text for a person ([`Summary`]'s `Display`) or one JSON object for a script
//! ([`Summary::to_json`]).

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::hotfolder::publish::DirSink;
use crate::jobs::Job;
use crate::pipeline::{Pipeline, RuntimeInfo};
use crate::runtime::plan::{device_name, precision_name};
use crate::vocab::error::{ItemError, PipelineError};
use crate::vocab::item::Item;
use crate::vocab::telemetry::{STAGES, Telemetry};

/// The result of a run.
#[derive(Debug)]
pub struct Summary {
    pub done: usize,
    pub failed: Vec<ItemError>,
    /// Every output written, in the order they were.
    pub outputs: Vec<PathBuf>,
    /// Each input that was done, with its outputs (an output named `-1` belongs to the
    /// input this says, not to the one that came first).
    pub results: Vec<(PathBuf, Vec<PathBuf>)>,
    pub elapsed: Duration,
    pub report: String,
    pub info: RuntimeInfo,
    /// Decoded-frame buffers allocated during the run (bounded by the pool, not by the
    /// number of images).
    pub frame_buffers_created: usize,
    /// The stages that did any work, in pipeline order.
    pub stages: Vec<StageTime>,
}

/// One stage's share of a run, from the pipeline's telemetry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub threads: u64,
    pub items: u64,
    pub failed: u64,
    /// Time its threads spent working, summed over them.
    pub busy_s: f64,
}

impl Summary {
    pub fn images_per_s(&self) -> f64 {
        (self.done + self.failed.len()) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// What `process --json` prints: the counts and timing of the text summary, the
    /// runtime, each failure with its file, stage and reason, the outputs and the stages.
    pub fn to_json(&self) -> serde_json::Value {
        let failures: Vec<_> = (self.failed.iter())
            .map(|f| {
                serde_json::json!({
                    "file": f.path.to_string_lossy(),
                    "stage": f.stage.as_str(),
                    "reason": f.reason,
                    "transient": f.transient,
                })
            })
            .collect();
        let info = &self.info;
        serde_json::json!({
            "total": self.done + self.failed.len(),
            "done": self.done,
            "failed": self.failed.len(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "images_per_s": self.images_per_s(),
            "model": (!info.model.is_empty()).then_some(&info.model),
            "devices": info.devices.iter().map(|&d| device_name(d)).collect::<Vec<_>>(),
            "max_batch": info.max_batch,
            "precision": precision_name(info.precision),
            "failures": failures,
            "outputs": self.outputs.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
            "results": self.results.iter().map(|(input, outputs)| serde_json::json!({
                "input": input.to_string_lossy(),
                "outputs": outputs.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "stages": self.stages,
            "frame_buffers_created": self.frame_buffers_created,
        })
    }
}

/// The text summary `process` prints without `--json`: counts, the runtime, the
/// per-stage table, then each failure.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "done {}, failed {}, {:.2} s, {:.1} images/s",
            self.done,
            self.failed.len(),
            self.elapsed.as_secs_f64(),
            self.images_per_s()
        )?;
        writeln!(
            f,
            "runtime: {} on {}, batch {}",
            self.info.model_text(),
            self.info.devices_text(),
            self.info.max_batch
        )?;
        write!(f, "{}", self.report)?;
        for e in &self.failed {
            writeln!(f, "failed: {}: {}: {}", e.path.display(), e.stage, e.reason)?;
        }
        Ok(())
    }
}

fn stage_times(t: &Telemetry) -> Vec<StageTime> {
    (STAGES.iter())
        .map(|&st| (st, t.stage(st)))
        .filter(|(_, s)| s.items.load(Ordering::Relaxed) > 0)
        .map(|(st, s)| StageTime {
            stage: st.as_str(),
            threads: s.threads.load(Ordering::Relaxed).max(1),
            items: s.items.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            busy_s: s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
        })
        .collect()
}

/// Expand the command line's inputs: files as given, folders as their non-hidden entries
/// (recursively), sorted so runs are reproducible.
pub fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out).map_err(|e| format!("{}: {e}", p.display()))?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Options for [`run`] beyond the config.
#[derive(Default)]
pub struct RunOptions {
    /// Show progress (a bar on a terminal, log lines otherwise).
    pub progress: bool,
}

/// Process `inputs` into `out_dir`, with no parameters of their own (benches, tests).
pub fn run(
    cfg: &Config,
    inputs: Vec<PathBuf>,
    out_dir: &Path,
    opts: RunOptions,
) -> Result<Summary, PipelineError> {
    let jobs = inputs
        .into_iter()
        .map(|path| Job { path, params: None })
        .collect();
    run_jobs(cfg, jobs, out_dir, opts)
}

/// Process `jobs` (see [`crate::jobs`]) into `out_dir`.
pub fn run_jobs(
    cfg: &Config,
    jobs: Vec<Job>,
    out_dir: &Path,
    opts: RunOptions,
) -> Result<Summary, PipelineError> {
    std::fs::create_dir_all(out_dir).map_err(|source| PipelineError::Io {
        context: format!("cannot create output folder {}", out_dir.display()),
        source,
    })?;
    let sink = Arc::new(DirSink {
        dir: out_dir.to_path_buf(),
        durable: false,
    });
    let mut pipeline = Pipeline::start(cfg, sink)?;
    let total = jobs.len();
    let started = Instant::now();
    let tx = pipeline.sender();
    pipeline.close_input();
    let feeder = std::thread::Builder::new()
        .name("hp-feed".into())
        .spawn(move || {
            for (i, job) in jobs.into_iter().enumerate() {
                let mut item = Item::new(i as u64, job.path);
                item.params = job.params;
                if tx.send(item).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| PipelineError::Io {
            context: "cannot start the feeder thread".into(),
            source,
        })?;

    let bar = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        ShownBar::new(b)
    });
    let mut last_log = Instant::now();
    let (mut done, mut failed, mut outputs, mut results) =
        (0usize, Vec::new(), Vec::new(), Vec::new());
    for outcome in pipeline.outcomes().iter() {
        match outcome.result {
            Ok(paths) => {
                done += 1;
                outputs.extend(paths.iter().cloned());
                results.push((outcome.item.path, paths));
            }
            Err(e) => {
                tracing::warn!(file = ?e.path, stage = %e.stage, reason = %e.reason, "failed");
                failed.push(e);
            }
        }
        let n = done + failed.len();
        if let Some(ShownBar { bar: b, .. }) = &bar {
            b.set_position(n as u64);
            b.set_message(format!("{} failed", failed.len()));
        } else if opts.progress && last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                done,
                failed = failed.len(),
                total,
                images_per_s = format!("{rate:.1}"),
                "progress"
            );
        }
    }
    drop(bar);
    let _ = feeder.join();
    let elapsed = started.elapsed();
    let report = pipeline.telemetry().report();
    let stages = stage_times(pipeline.telemetry());
    let info = pipeline.info().clone();
    let frame_buffers_created = pipeline.frame_buffers_created();
    // A thread that died took its items with it: the run failed, whatever was counted.
    pipeline.join()?;
    failed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Summary {
        done,
        failed,
        outputs,
        results,
        elapsed,
        report,
        info,
        frame_buffers_created,
        stages,
    })
}

/// The bar [`run`] shows, while it shows one, with the number of its [`ShownBar`]:
/// [`LogWriter`] writes around it.
static SHOWN: Mutex<Option<(u64, indicatif::ProgressBar)>> = Mutex::new(None);
static SHOWN_IDS: AtomicU64 = AtomicU64::new(0);

/// A progress bar on the terminal, known to [`LogWriter`] until dropped; dropping it
/// takes the bar off the screen.
struct ShownBar {
    id: u64,
    bar: indicatif::ProgressBar,
}

impl ShownBar {
    fn new(bar: indicatif::ProgressBar) -> ShownBar {
        let id = SHOWN_IDS.fetch_add(1, Ordering::Relaxed);
        *SHOWN.lock().unwrap_or_else(PoisonError::into_inner) = Some((id, bar.clone()));
        ShownBar { id, bar }
    }
}

impl Drop for ShownBar {
    fn drop(&mut self) {
        let mut shown = SHOWN.lock().unwrap_or_else(PoisonError::into_inner);
        if shown.as_ref().is_some_and(|(id, _)| *id == self.id) {
            *shown = None;
        }
        drop(shown);
        self.bar.finish_and_clear();
    }
}

/// Run `f`, a write to the terminal, with the bar [`run`] shows (if it shows one) taken
/// off the screen, and draw the bar again after it.
fn around_bar<R>(f: impl FnOnce() -> R) -> R {
    let bar = SHOWN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|(_, b)| b.clone());
    match bar {
        Some(b) => b.suspend(f),
        None => f(),
    }
}

/// stderr for log lines (a `tracing_subscriber` writer) that keeps clear of the progress
/// bar: while [`run`] shows one, each line is written with the bar taken off the screen,
/// and the bar is drawn again below it. Written straight to stderr, a line would start
/// in the middle of the bar's line and be partly overwritten by its next redraw. With no
/// bar shown it is plain stderr.
///
/// indicatif's own `suspend` does it; `tracing-indicatif` would too, but it is built to
/// draw bars for tracing spans, and all it would give here is this writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        around_bar(|| std::io::stderr().write(buf))
    }

    // tracing's fmt layer writes each event with one `write_all`: one suspension a line.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        around_bar(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tracing_subscriber::fmt::MakeWriter;

    /// A terminal that records what is done to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl Screen {
        fn log(&self, op: String) -> std::io::Result<()> {
            self.0.lock().unwrap().push(op);
            Ok(())
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.log(format!("up {n}"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.log(format!("down {n}"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.log(format!("right {n}"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.log(format!("left {n}"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.log(format!("line {s}"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.log(format!("str {s}"))
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.log("clear".into())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One test, not several: the shown bar is process-wide.
    #[test]
    fn log_lines_are_written_with_the_bar_off_the_screen() {
        let screen = Screen::default();
        let target = indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone()));
        let bar = indicatif::ProgressBar::with_draw_target(Some(10), target);
        bar.set_style(indicatif::ProgressStyle::with_template("{pos}/{len}").unwrap());
        let shown = ShownBar::new(bar);
        shown.bar.set_position(3);
        let drawn = screen.take();
        assert!(drawn.iter().any(|op| op.contains("3/10")), "{drawn:?}");

        // What the log writer does around a line, with the line written to the screen.
        around_bar(|| screen.log("LOG".into())).unwrap();
        let ops = screen.take();
        let at = ops.iter().position(|op| op == "LOG").unwrap();
        assert!(
            ops[..at].iter().any(|op| op == "clear"),
            "bar not cleared: {ops:?}"
        );
        assert!(
            ops[at + 1..].iter().any(|op| op.contains("3/10")),
            "bar not redrawn: {ops:?}"
        );

        // The writer tracing is given goes through it (its line itself goes to stderr).
        LogWriter.make_writer().write_all(b"").unwrap();
        let ops = screen.take();
        assert!(ops.iter().any(|op| op == "clear"), "{ops:?}");
        assert!(ops.iter().any(|op| op.contains("3/10")), "{ops:?}");

        // Once the bar is gone, lines are written as they are.
        drop(shown);
        screen.take();
        around_bar(|| screen.log("LOG".into())).unwrap();
        assert_eq!(screen.take(), ["LOG"]);
    }
}
