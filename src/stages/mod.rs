//! The CPU stages. Each owns its per-thread state (decoder limits, resizer scratch,
//! encoder buffer) and turns one item into the next stage's input (read and decode are
//! [`crate::vocab::stage::StageWorker`]s themselves); the threads and channels around
//! them are the one stage runner's, in [`crate::pipeline`].

pub mod decode;
pub mod encode;
pub mod fit;
pub mod metadata;
pub mod read;
