//! hotpipe's integration tests, as one test binary.
//!
//! Each file under `tests/` used to be its own binary, and each of those linked libtorch
//! and the whole crate again: seven long links after every library change. Here they are
//! modules of one crate (`Cargo.toml` sets `autotests = false` and names this file), so
//! the link happens once. Select a group by its module path:
//! `cargo test --release --features fault-injection --test it hotfolder::` (the suite
//! drives fault points, so the target requires the feature).
//!
//! They now share one process and run on parallel threads, so a test must not change
//! process-wide state another reads (environment variables, the working directory,
//! libtorch's global RNG or thread count): give a child process its environment with
//! `Command::env`, and build seeded models through `common`, which serialises them.

mod common;

mod budget;
mod channels;
mod cli;
mod cluster;
mod cluster_run;
mod colour;
mod cuda;
mod f2p;
mod facecrop;
mod hotfolder;
mod journald;
mod metadata;
mod metrics;
mod params;
mod peers;
mod process;
mod progress;
mod python_backend;
mod python_worker;
mod quality;
mod status;
mod systemd;
