//! Where finished images go: the one interface between the pipeline's last stage and
//! whoever owns the output folder (the hot folder, or `process`'s plain directory).

use std::path::PathBuf;

use crate::vocab::error::StageError;
use crate::vocab::item::Item;

/// Where finished images go. `publish` is called by an encode worker with the encoded
/// bytes; it returns the paths written. The hot folder's sink also moves the input to
/// `done/`; `process` writes into a plain directory.
pub trait Sink: Send + Sync {
    fn publish(&self, item: &Item, encoded: &[u8], ext: &str) -> Result<Vec<PathBuf>, StageError>;
}
