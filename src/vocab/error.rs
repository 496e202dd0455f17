//! Error types shared by the pipeline: per-item errors (report, continue) and the
//! critical errors that stop a run.
//!
//! The split follows watchexec: an [`ItemError`] belongs to one input file and one stage;
//! the pipeline reports it (summary, `failed/` sidecar) and goes on with the next file. A
//! [`PipelineError`] means the pipeline itself cannot work (model will not load, a thread
//! died); it stops the run.

use std::fmt;
use std::path::PathBuf;

/// The stage an item was in when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Claim,
    Read,
    Decode,
    Detect,
    Fit,
    Infer,
    Encode,
    Publish,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Claim => "claim",
            Stage::Read => "read",
            Stage::Decode => "decode",
            Stage::Detect => "detect",
            Stage::Fit => "fit",
            Stage::Infer => "infer",
            Stage::Encode => "encode",
            Stage::Publish => "publish",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one input could not be processed. Carries the file and the stage, so a message
/// stands on its own in a log line or a `failed/` sidecar.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {stage}: {reason}")]
pub struct ItemError {
    pub path: PathBuf,
    pub stage: Stage,
    pub reason: String,
    /// Retrying later may succeed (out of disk, device out of memory), as opposed to a
    /// property of the file itself (not an image). The hot folder retries only these.
    pub transient: bool,
}

impl ItemError {
    pub fn new(path: impl Into<PathBuf>, stage: Stage, reason: impl Into<String>) -> Self {
        ItemError {
            path: path.into(),
            stage,
            reason: reason.into(),
            transient: false,
        }
    }

    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }
}

/// An error that stops the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error("face crop: {0}")]
    FaceCrop(String),
    #[error("{stage} stage: {message}")]
    Stage { stage: Stage, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// libtorch errors carry a long C++ backtrace. Users get the first meaningful line; the
/// whole text goes to the debug log.
pub fn torch_message(e: &tch::TchError) -> String {
    let full = e.to_string();
    tracing::debug!(error = %full, "libtorch error (full text)");
    first_line(&full)
}

/// The first non-empty line of a message, without libtorch's "Exception raised from"
/// trailer. A TorchScript interpreter error's first line only says that an operation
/// failed; the reason is the later `RuntimeError:` line, which is appended.
pub fn first_line(full: &str) -> String {
    let first = first_line_only(full);
    let reason = full
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("RuntimeError:"));
    match reason {
        Some(r) if first.contains("failed in the TorchScript interpreter") => {
            format!("{first} {r}")
        }
        _ => first,
    }
}

fn first_line_only(full: &str) -> String {
    let line = full
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    match line.find("Exception raised from") {
        Some(i) => line[..i].trim().to_string(),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_drops_backtrace() {
        let t = "Internal torch error - The size of tensor a (3) must match\nException raised from infer_size at ...\nframe #0: c10::Error";
        assert_eq!(
            first_line(t),
            "Internal torch error - The size of tensor a (3) must match"
        );
        assert_eq!(first_line("\n\n  x  \ny"), "x");
        let ts = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript:\n  ...\nRuntimeError: Input type (c10::BFloat16) and bias type (float) should be the same\n";
        assert_eq!(
            first_line(ts),
            "The following operation failed in the TorchScript interpreter. RuntimeError: Input type (c10::BFloat16) and bias type (float) should be the same"
        );
    }
}
