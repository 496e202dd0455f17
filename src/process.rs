//! `hotpipe process`: run the pipeline once over files and folders, with progress and a
//! summary.
//!
//! Progress is a bar when stderr is a terminal and a plain log line every few seconds
//! otherwise (a bar's carriage returns make a mess of a log file). Every failure is kept
//! with its reason for the summary; the caller decides the exit status.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::hotfolder::publish::DirSink;
use crate::pipeline::{Pipeline, RuntimeInfo};
use crate::vocab::error::{ItemError, PipelineError};
use crate::vocab::item::Item;

/// The result of a run.
#[derive(Debug)]
pub struct Summary {
    pub done: usize,
    pub failed: Vec<ItemError>,
    pub outputs: Vec<PathBuf>,
    pub elapsed: Duration,
    pub report: String,
    pub info: RuntimeInfo,
    /// Decoded-frame buffers allocated during the run (bounded by the pool, not by the
    /// number of images).
    pub frame_buffers_created: usize,
}

impl Summary {
    pub fn images_per_s(&self) -> f64 {
        (self.done + self.failed.len()) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
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

/// Process `inputs` into `out_dir`.
pub fn run(
    cfg: &Config,
    inputs: Vec<PathBuf>,
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
    let total = inputs.len();
    let started = Instant::now();
    let tx = pipeline.sender();
    pipeline.close_input();
    let feeder = std::thread::Builder::new()
        .name("hp-feed".into())
        .spawn(move || {
            for (i, p) in inputs.into_iter().enumerate() {
                if tx.send(Item::new(i as u64, p)).is_err() {
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
        b
    });
    let mut last_log = Instant::now();
    let (mut done, mut failed, mut outputs) = (0usize, Vec::new(), Vec::new());
    for outcome in pipeline.outcomes().iter() {
        match outcome.result {
            Ok(paths) => {
                done += 1;
                outputs.extend(paths);
            }
            Err(e) => {
                tracing::warn!(file = ?e.path, stage = %e.stage, reason = %e.reason, "failed");
                failed.push(e);
            }
        }
        let n = done + failed.len();
        if let Some(b) = &bar {
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
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let _ = feeder.join();
    let elapsed = started.elapsed();
    let report = pipeline.telemetry().report();
    let info = pipeline.info().clone();
    let frame_buffers_created = pipeline.frame_buffers_created();
    // A thread that died took its items with it: the run failed, whatever was counted.
    pipeline.join()?;
    failed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Summary {
        done,
        failed,
        outputs,
        elapsed,
        report,
        info,
        frame_buffers_created,
    })
}
