//! Where finished images go: the one interface between the pipeline's last stage and
//! whoever owns the output folder (the hot folder, or `process`'s plain directory).

use std::path::PathBuf;

use crate::vocab::error::StageError;
use crate::vocab::item::Item;
use crate::vocab::pool::PooledBuf;

/// One item's encoded outputs, in order: K of them for a model that returns K outputs per
/// input (variations of one face), one for most. The first is held inline, so a single
/// output costs no allocation beyond its pooled buffer.
pub struct Encoded {
    first: PooledBuf,
    more: Vec<PooledBuf>,
}

impl Encoded {
    pub fn new(first: PooledBuf) -> Encoded {
        Encoded {
            first,
            more: Vec::new(),
        }
    }

    pub fn push(&mut self, next: PooledBuf) {
        self.more.push(next);
    }

    /// How many outputs (K, at least 1).
    pub fn len(&self) -> usize {
        1 + self.more.len()
    }

    /// Never: there is always a first output.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Output `k`'s bytes.
    pub fn get(&self, k: usize) -> &[u8] {
        match k {
            0 => &self.first,
            k => &self.more[k - 1],
        }
    }
}

/// Where finished images go. `publish` is called by an encode worker with an item's
/// encoded outputs, all of them at once (they share one name suffix, and the hot folder
/// journals them together, so none is published twice); it returns the paths written. The hot folder's sink
/// also moves the input to `done/`; `process` writes into a plain directory.
pub trait Sink: Send + Sync {
    fn publish(
        &self,
        item: &Item,
        outputs: &Encoded,
        ext: &str,
    ) -> Result<Vec<PathBuf>, StageError>;

    /// Where the item's input was given, for its outputs' sidecars (`None`: not on this
    /// host). By default the file it was read from, made absolute.
    fn input_origin(&self, item: &Item) -> Option<PathBuf> {
        std::path::absolute(&item.path).ok()
    }
}
