//! The CPU stages. Each owns its per-thread state (decoder limits, resizer scratch,
//! encoder buffer) and turns one item into the next stage's input; the threads and
//! channels around them are wired in [`crate::pipeline`].

pub mod decode;
pub mod encode;
pub mod fit;
pub mod read;
