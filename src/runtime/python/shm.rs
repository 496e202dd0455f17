//! The memory hotpipe shares with its Python workers: one memfd holding every batch slot
//! the fit workers write into and every output slot the workers write their results
//! into, mapped once by hotpipe and once by each worker (numpy views over it there).
//!
//! Pixels are written once by a fit worker, read in place by the Python pipeline, and its
//! results read in place by the encoders: nothing is copied across the process boundary.
//! A memfd has no name, so neither a crash of hotpipe nor of a worker leaves a file
//! behind, and only the processes it is handed to can map it. A restarted worker maps the
//! same file again, so nothing is lost or re-laid-out when one dies.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::PyError;
use crate::runtime::batcher::SlotMemory;

/// Where everything lies in the shared file. Input slots `0..pipeline_slots` are the
/// assembler's ring, shared by every worker; input slot `pipeline_slots + w` and output
/// slot `pipeline_slots` of worker `w` are that worker's scratch pair, which only its
/// supervisor uses (for `check`, `bench` and tests: batches that are not the pipeline's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Slots of the assembler's ring.
    pub pipeline_slots: usize,
    /// Rows in every slot (the batch size).
    pub rows: usize,
    /// Bytes of one input row, `H * W * C`.
    pub in_row: usize,
    /// Bytes of one input's outputs, `K * H' * W' * C'`.
    pub out_row: usize,
    /// Model workers (one per device).
    pub workers: usize,
}

impl Layout {
    /// Input slots: the ring and one scratch slot per worker.
    pub fn in_slots(&self) -> usize {
        self.pipeline_slots + self.workers
    }

    /// Output slots of each worker: its ring and its scratch slot.
    pub fn out_slots(&self) -> usize {
        self.pipeline_slots + 1
    }

    pub fn in_slot_bytes(&self) -> usize {
        self.rows * self.in_row
    }

    pub fn out_slot_bytes(&self) -> usize {
        self.rows * self.out_row
    }

    /// Where worker `w`'s output slots start.
    pub fn outputs_at(&self, w: usize) -> usize {
        self.in_slots() * self.in_slot_bytes() + w * self.out_slots() * self.out_slot_bytes()
    }

    pub fn total(&self) -> usize {
        self.outputs_at(self.workers)
    }
}

/// A memfd not mapped yet: handed to the first worker before the output size is known
/// (the worker reports it in its handshake), then grown and mapped by [`SharedSlots::map`].
pub struct ShmFile(File);

impl ShmFile {
    pub fn create() -> Result<ShmFile, PyError> {
        let fd: OwnedFd =
            rustix::fs::memfd_create("hotpipe-slots", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| PyError::Shm(e.into()))?;
        Ok(ShmFile(File::from(fd)))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The mapped shared file and its [`Layout`].
///
/// Invariants (what makes handing out raw slot memory sound): the file is sized once,
/// before it is mapped, and never resized, so the mapping stays valid for this value's
/// life; input slot memory is written only through the assembler's row leases (disjoint
/// rows) and read by a worker only between a batch frame naming it and the reply; output
/// slot memory is written by a worker only in that same span, and read by hotpipe only
/// after the reply, through the output ring's handles, which keep this value alive.
/// A worker is trusted to keep to its slots as hotpipe trusts a TorchScript model to keep
/// to its tensors; it is the user's own code either way.
pub struct SharedSlots {
    file: File,
    map: memmap2::MmapMut,
    layout: Layout,
}

// SAFETY: the mapping is only reached through raw slot pointers whose use the invariants
// above serialise; the value itself is never mutated after creation.
unsafe impl Send for SharedSlots {}
unsafe impl Sync for SharedSlots {}

impl SharedSlots {
    /// Size `file` for `layout` and map it.
    pub fn map(file: ShmFile, layout: Layout) -> Result<SharedSlots, PyError> {
        let file = file.0;
        file.set_len(layout.total() as u64).map_err(PyError::Shm)?;
        // SAFETY: a memfd only this process and its workers hold, sized once above and
        // never shrunk while mapped (see the type's invariants).
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(PyError::Shm)?;
        Ok(SharedSlots { file, map, layout })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn base(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    /// Input slot `s` of the assembler's ring.
    pub fn input_slot(&self, s: usize) -> SlotMemory {
        assert!(s < self.layout.in_slots(), "input slot {s}");
        let len = self.layout.in_slot_bytes();
        // SAFETY: inside the mapping (Layout::total covers every input slot).
        SlotMemory {
            ptr: unsafe { self.base().add(s * len) },
            len,
        }
    }

    /// Output slot `s` of worker `w`.
    pub fn output_slot(&self, w: usize, s: usize) -> SlotMemory {
        assert!(
            w < self.layout.workers && s < self.layout.out_slots(),
            "output slot {w}/{s}"
        );
        let len = self.layout.out_slot_bytes();
        // SAFETY: inside the mapping (Layout::total covers every worker's outputs).
        SlotMemory {
            ptr: unsafe { self.base().add(self.layout.outputs_at(w) + s * len) },
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap_and_fit_the_file() {
        let l = Layout {
            pipeline_slots: 3,
            rows: 4,
            in_row: 12,
            out_row: 30,
            workers: 2,
        };
        let s = SharedSlots::map(ShmFile::create().unwrap(), l).unwrap();
        let mut spans: Vec<(usize, usize)> = (0..l.in_slots())
            .map(|i| s.input_slot(i))
            .chain(
                (0..2)
                    .flat_map(|w| (0..l.out_slots()).map(move |i| (w, i)))
                    .map(|(w, i)| s.output_slot(w, i)),
            )
            .map(|m| (m.ptr as usize - s.base() as usize, m.len))
            .collect();
        spans.sort();
        let mut end = 0;
        for (at, len) in spans {
            assert_eq!(at, end, "contiguous, no overlap");
            end = at + len;
        }
        assert_eq!(end, l.total());
        assert_eq!(s.file.metadata().unwrap().len() as usize, l.total());
    }
}
