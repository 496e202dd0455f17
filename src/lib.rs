//! hotpipe: a folder in, a GPU image model, a folder out.
//!
//! The crate is the library behind the `hotpipe` binary. Its module tree is the pipeline:
//!
//! - [`config`]: `pipeline.toml`, raw and validated;
//! - [`pipeline`]: wiring, items, buffer pools, telemetry;
//! - [`stages`]: read, decode, fit, encode (each a function of one item plus its state);
//! - [`runtime`]: the model, batching, the inference worker (tch, with [`facecrop`]);
//! - [`facecrop`]: the built-in F2P face crop, MTCNN on tch, as a stage between decode
//!   and fit;
//! - [`hotfolder`]: publishing files (and the daemon's folder protocol);
//! - [`process`]: the one-shot `hotpipe process` run with progress and a summary.

pub mod check;
pub mod config;
pub mod error;
pub mod facecrop;
pub mod hotfolder;
pub mod pipeline;
pub mod process;
pub mod runtime;
pub mod stages;
