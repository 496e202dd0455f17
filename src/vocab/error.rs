//! Error types shared by the pipeline: per-item errors (report, continue) and the
//! critical errors that stop a run.
//!
//! The split follows watchexec: a stage returns a [`StageError`], classed by who is to
//! blame (the file, a limit, the format, the operating system, the device, a bug); the
//! stage runner turns it into an [`ItemError`] for one input file and one stage, which
//! the pipeline reports (summary, `failed/` sidecar) before going on with the next file.
//! [`StageError::is_transient`] is the one rule for what a retry may fix. A
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

    /// The stage named `s` (as [`Stage::as_str`] writes it), e.g. from a cluster worker's
    /// recorded outcome.
    pub fn parse(s: &str) -> Option<Stage> {
        std::iter::once(Stage::Claim)
            .chain(crate::vocab::telemetry::STAGES)
            .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a stage could not process one item, classed by who is to blame. The message is
/// what users read (in the summary, the log and the `failed/` sidecar), so it says what
/// is wrong with the file in its own words; the file and stage are added by [`ItemError`].
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The file is not a valid image of its kind (corrupt, truncated, not an image), or
    /// holds nothing to work on (no face).
    #[error("{0}")]
    BadInput(String),
    /// The file is over a configured limit (bytes, pixels, memory to decode it).
    #[error("{0}")]
    OverLimit(String),
    /// A valid file of a format or kind hotpipe does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// The operating system failed a read or write; `source` keeps the errno.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The device ran out of memory even for a batch of one.
    #[error("{0}")]
    DeviceOom(String),
    /// The stage's own machinery (the model, the detector, an encoder, the resizer)
    /// failed on this item for another reason.
    #[error("{0}")]
    Failed(String),
    /// What the stage needs is down (no model worker process can be started): the item
    /// is not to blame, and waits for a retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug: a panic or a broken invariant inside a stage.
    #[error("internal error in {stage}: {message}")]
    Internal { stage: Stage, message: String },
}

/// Input errors that say nothing about the file: the process or the machine is short of
/// descriptors, memory or disk, or the device hiccupped. The same read may well work later.
const TRANSIENT_ERRNOS: [i32; 6] = [
    libc::EMFILE,
    libc::ENFILE,
    libc::EIO,
    libc::ENOSPC,
    libc::EAGAIN,
    libc::ENOMEM,
];

impl StageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StageError {
        StageError::Io {
            context: context.into(),
            source,
        }
    }

    /// The one rule for transient versus permanent: whether a later attempt at the same
    /// file, unchanged, may succeed. The hot folder leaves transient failures in `work/`
    /// for `retry_s` without using up `max_attempts`; permanent ones go to `failed/`.
    ///
    /// - A device out of memory is transient (the next attempt may find memory free), and
    ///   so is a model worker that cannot be started (the item is not to blame).
    /// - Writing outputs (`publish`): every I/O error is, because each is a property of
    ///   the outbox (full, read-only, gone), which the operator fixes, never of the file.
    /// - Reading inputs: only the errnos in [`TRANSIENT_ERRNOS`]; a file that vanished,
    ///   is a symlink, or cannot be opened for permission is the file's own state.
    /// - Everything else is a property of the file or a bug, and retrying would fail again.
    pub fn is_transient(&self, stage: Stage) -> bool {
        match self {
            StageError::DeviceOom(_) | StageError::Unavailable(_) => true,
            StageError::Io { source, .. } => {
                stage == Stage::Publish
                    || source.kind() == std::io::ErrorKind::OutOfMemory
                    || source
                        .raw_os_error()
                        .is_some_and(|n| TRANSIENT_ERRNOS.contains(&n))
            }
            _ => false,
        }
    }

    /// A short name of the class, for sidecars and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StageError::BadInput(_) => "bad_input",
            StageError::OverLimit(_) => "over_limit",
            StageError::Unsupported(_) => "unsupported",
            StageError::Io { .. } => "io",
            StageError::DeviceOom(_) => "device_oom",
            StageError::Failed(_) => "failed",
            StageError::Unavailable(_) => "unavailable",
            StageError::Internal { .. } => "internal",
        }
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
    /// The outcome of a stage's error for one file; [`StageError::is_transient`] decides
    /// whether it is retried.
    pub fn from_stage(path: impl Into<PathBuf>, stage: Stage, e: &StageError) -> Self {
        ItemError {
            path: path.into(),
            stage,
            reason: e.to_string(),
            transient: e.is_transient(stage),
        }
    }

    pub fn new(path: impl Into<PathBuf>, stage: Stage, reason: impl Into<String>) -> Self {
        ItemError {
            path: path.into(),
            stage,
            reason: reason.into(),
            transient: false,
        }
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
    #[error("thread {thread} died: {message}")]
    ThreadDied { thread: String, message: String },
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
    fn one_rule_for_transient() {
        let io = |n| StageError::io("cannot open", std::io::Error::from_raw_os_error(n));
        for n in TRANSIENT_ERRNOS {
            assert!(io(n).is_transient(Stage::Read), "errno {n}");
        }
        for n in [libc::ENOENT, libc::EACCES, libc::ELOOP, libc::EISDIR] {
            assert!(!io(n).is_transient(Stage::Read), "errno {n} on input");
            assert!(io(n).is_transient(Stage::Publish), "errno {n} on output");
        }
        assert!(StageError::DeviceOom("out of memory".into()).is_transient(Stage::Infer));
        for e in [
            StageError::BadInput("not an image".into()),
            StageError::OverLimit("too large".into()),
            StageError::Unsupported("gif".into()),
            StageError::Failed("model failed: shape".into()),
            StageError::Internal {
                stage: Stage::Decode,
                message: "boom".into(),
            },
        ] {
            assert!(!e.is_transient(Stage::Decode), "{e}");
        }
        let e = ItemError::from_stage("/w/x.jpg", Stage::Read, &io(libc::EIO));
        assert!(e.transient);
        assert_eq!(e.reason, "cannot open: Input/output error (os error 5)");
    }

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
