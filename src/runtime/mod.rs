//! The model runtime: everything that touches tch and the device lives here.
//!
//! - [`model`]: the TorchScript contract, loading, normalisation on the device;
//! - [`batcher`]: the ring of batch slots fit workers write into (dynamic batching);
//! - [`infer`]: the inference worker, one thread per device, and the output ring the
//!   encoders read from;
//! - [`plan`]: the runtime plan (model copies, devices, threads, batch size) every
//!   command resolves the same way;
//! - [`cuda`]: the C++ shim for streams, events and per-thread thread counts;
//! - [`schema`]: what a model's `forward` takes, and each item's parameters to it.

pub mod batcher;
pub mod cuda;
pub mod infer;
pub mod model;
pub mod plan;
pub mod python;
pub mod schema;
