//! The Python model backend (`[model] backend = "python"`): a user's pipeline class, run
//! in worker processes hotpipe supervises, one per configured device, the way Triton's
//! Python backend runs a stub process per model instance. For pipelines that cannot be a
//! TorchScript module (diffusion pipelines such as Qwen-Image-Edit-F2P); the TorchScript
//! backend stays the fast path for those that can.
//!
//! - [`shm`]: the memory both sides map (the pipeline's batch slots and output slots:
//!   pixels are never copied across the process boundary);
//! - [`worker`]: one process, its handshake and its control frames;
//! - [`supervisor`]: restarts with back-off, and a lost batch run again one image at a
//!   time so the input that kills a worker fails alone;
//! - [`infer`]: the inference worker loop over the assembler and the output ring.
//!
//! The worker side, and the contract the user's class keeps, is
//! `python/hotpipe_worker/__init__.py`.

pub mod infer;
pub mod shm;
pub mod supervisor;
pub mod worker;

use std::path::PathBuf;

use serde_json::Value;

pub use supervisor::{Limits, RowOutcome, Shape, Supervisor, start_workers};
pub use worker::RowError;

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The interpreter (a venv's `bin/python` with the pipeline's dependencies).
    pub python: PathBuf,
    /// The folder holding the `hotpipe_worker` package.
    pub module_dir: PathBuf,
    /// `path/to/pipeline.py:ClassName`.
    pub entry: String,
    /// As the class receives it: `cpu`, `cuda:0`.
    pub device: String,
    /// Passed to the class's constructor.
    pub options: Value,
    /// The parameters handed for a row that carries no item's (a batch's empty rows,
    /// `check`'s dummy batch): each declared parameter's placeholder, a value its schema
    /// accepts, so a pipeline never sees a missing key.
    pub placeholders: Value,
    /// On the CPU, the worker's share of `infer_threads`: its `OMP_NUM_THREADS` (torch's
    /// intra-op threads), unless hotpipe's own environment sets one.
    pub cpu_threads: Option<usize>,
}

impl WorkerSpec {
    /// Where the `hotpipe_worker` package is: beside an installed binary
    /// (`<prefix>/share/hotpipe/python`, as `scripts/install-service.sh` lays it out),
    /// else this source tree's `python/`.
    pub fn default_module_dir() -> PathBuf {
        let installed = std::env::current_exe().ok().and_then(|exe| {
            let dir = exe.parent()?.parent()?.join("share/hotpipe/python");
            dir.join("hotpipe_worker").is_dir().then_some(dir)
        });
        installed.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PyError {
    #[error("cannot start the model worker {python}: {source}")]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("the model worker could not start the pipeline: {0}")]
    Fatal(String),
    #[error("model worker died ({0})")]
    Died(String),
    #[error("model worker took longer than {0} s for a batch (batch_timeout_s); it was killed")]
    Timeout(u64),
    #[error("model worker protocol: {0}")]
    Protocol(String),
    #[error("model worker shared memory: {0}")]
    Shm(std::io::Error),
}
