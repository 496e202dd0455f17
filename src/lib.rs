//! hotpipe: a folder in, a GPU image model, a folder out.
//!
//! The crate is the library behind the `hotpipe` binary. Its layers, lowest first; each
//! imports only from the layers below it, so data and dependencies flow one way:
//!
//! - [`vocab`]: the leaf vocabulary (items, frames, pools, telemetry, stage names and
//!   errors, the stage trait, devices, the sink trait, test-only fault points); imports
//!   nothing else from the crate;
//! - [`config`]: `pipeline.toml`, raw and validated, one module per section;
//! - [`stages`], [`facecrop`], [`runtime`]: the stage types (read, decode, detect, fit,
//!   encode) and the model runtime (runtime plan, batch slots, inference workers);
//! - [`pipeline`]: the plan of stages and queues, run by one stage runner;
//! - [`hotfolder`], [`service`], [`process`], [`jobs`], [`check`], [`bench`]: the folder
//!   protocol, `hotpipe run`, and the one-shot commands (with `process`'s jobs);
//! - [`cluster`]: cluster mode's NATS JetStream side (`hotpipe cluster init|status`).

pub mod bench;
pub mod check;
pub mod cluster;
pub mod config;
pub mod facecrop;
pub mod hotfolder;
pub mod jobs;
pub mod pipeline;
pub mod process;
pub mod runtime;
pub mod service;
pub mod stages;
pub mod vocab;
