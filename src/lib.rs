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
//! - [`service`]: `hotpipe run`: signals, systemd notify, metrics and health;
//! - [`process`]: the one-shot `hotpipe process` run with progress and a summary;
//! - [`bench`]: `hotpipe bench`, each stage's speed alone and the whole pipeline's.

pub mod bench;
pub mod check;
pub mod config;

pub mod facecrop;
pub mod hotfolder;
pub mod pipeline;
pub mod process;
pub mod runtime;
pub mod service;
pub mod stages;
pub mod vocab;
