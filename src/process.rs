//! `hotpipe process`: run the pipeline once over files and folders, with progress and a
//! summary.
//!
//! Progress is a bar when stderr is a terminal and a plain log line every few seconds
//! otherwise (a bar's carriage returns make a mess of a log file). Every failure is kept
//! with its reason for the summary; the caller decides the exit status. The summary is
//! text for a person ([`Summary`]'s `Display`) or one JSON object for a script
//! ([`Summary::to_json`]).

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::hotfolder::publish::DirSink;
use crate::pipeline::{Pipeline, RuntimeInfo};
use crate::vocab::error::{ItemError, PipelineError};
use crate::vocab::item::Item;
use crate::vocab::telemetry::{STAGES, Telemetry};

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
            "model": info.model,
            "devices": info.devices.iter().map(|&d| device_name(d)).collect::<Vec<_>>(),
            "max_batch": info.max_batch,
            "precision": precision_name(info.precision),
            "failures": failures,
            "outputs": self.outputs.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
            "stages": self.stages,
            "frame_buffers_created": self.frame_buffers_created,
        })
    }
}

/// The text summary `process` prints without `--json` (the telemetry table is logged).
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
            "runtime: {} on {:?}, batch {}",
            self.info.model, self.info.devices, self.info.max_batch
        )?;
        for e in &self.failed {
            writeln!(f, "failed: {}: {}: {}", e.path.display(), e.stage, e.reason)?;
        }
        Ok(())
    }
}

/// A device as the config names it (`cpu`, `cuda:1`).
pub(crate) fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// A tensor kind as `[model] precision` names it.
pub(crate) fn precision_name(k: tch::Kind) -> String {
    match k {
        tch::Kind::Float => "fp32".into(),
        tch::Kind::Half => "fp16".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        other => format!("{other:?}"),
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
        elapsed,
        report,
        info,
        frame_buffers_created,
        stages,
    })
}
