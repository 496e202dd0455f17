//! The leaf vocabulary every layer speaks: items and frames ([`item`]), pooled buffers
//! ([`pool`]), stage telemetry ([`telemetry`]), stage names and errors ([`error`]), what a
//! stage is ([`stage`]), device identifiers ([`device`]), where outputs go ([`sink`]),
//! which items each thread is working on when the process crashes ([`crash`]), and
//! test-only fault points ([`fault`]).
//!
//! Nothing here imports anything else from the crate, so every layer above (stages,
//! runtimes, the pipeline, the hot folder, the service) can use it without a circle.

pub mod crash;
pub mod device;
pub mod error;
pub mod fault;
pub mod item;
pub mod params;
pub mod pool;
pub mod sink;
pub mod stage;
pub mod telemetry;
