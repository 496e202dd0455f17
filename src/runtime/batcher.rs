//! The batch assembler: a ring of batch slots that fit workers write rows into and the
//! inference worker takes whole.
//!
//! Why not a channel of images plus a batcher thread: that costs a copy of every image
//! into the batch buffer. Here a fit worker *leases a row* of the open slot and resizes
//! straight into it (pinned memory on a GPU), so the pixels are written once and then
//! cross the bus. The ring is the bounded queue between fit and inference: with all slots
//! sealed or in use, `lease` blocks, which is the pipeline's back-pressure.
//!
//! Dynamic batching: a slot is sealed when `max_batch` rows are committed, or when the
//! first committed row is older than the timeout and the inference worker asks for work.
//! Partial batches run at their own size rather than padded: padding would waste device
//! time on blank rows; the cost is one more shape for the model, which libtorch handles
//! without recompiling anything.
//!
//! Invariant (tested below): a slot is in exactly one state: free, open (rows being
//! written), sealed (waiting for inference) or taken (inference reading it). A slot returns
//! to free only through [`Assembler::release`], which the inference worker calls once its
//! copy from the slot has completed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Raw memory of one slot. The assembler never reads or writes it; it only hands out
/// disjoint row ranges. Whoever builds the assembler keeps the memory alive (see
/// [`Assembler::new`]).
#[derive(Debug, Clone, Copy)]
pub struct SlotMemory {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the pointer is only dereferenced through `RowLease`, whose row ranges are
// disjoint and exclusive while leased (state machine above), so sharing the base pointer
// between threads is sound.
unsafe impl Send for SlotMemory {}
unsafe impl Sync for SlotMemory {}

#[derive(Debug)]
struct Open<M> {
    slot: usize,
    leased: usize,
    committed: usize,
    accepting: bool,
    rows: Vec<Option<M>>,
    first_commit: Option<Instant>,
}

#[derive(Debug)]
struct State<M> {
    free: VecDeque<usize>,
    open: Option<Open<M>>,
    sealed: VecDeque<Batch<M>>,
    closed: bool,
}

/// A sealed batch handed to inference: rows `0..rows.len()` of `slot`. A row whose fit
/// was abandoned is `None`; its pixels are unspecified and its output is dropped.
#[derive(Debug)]
pub struct Batch<M> {
    pub slot: usize,
    pub rows: Vec<Option<M>>,
}

pub struct Assembler<M> {
    slots: Vec<SlotMemory>,
    max_batch: usize,
    row_bytes: usize,
    timeout: Duration,
    state: Mutex<State<M>>,
    cv: Condvar,
    _keepalive: Box<dyn Send + Sync>,
}

/// One row of the open slot, exclusively this holder's until committed or dropped. It
/// holds the assembler, so it can travel (the fit stage hands it on with its item).
pub struct RowLease<M> {
    asm: Arc<Assembler<M>>,
    slot: usize,
    row: usize,
    done: bool,
}

impl<M> Assembler<M> {
    /// `slots` must each hold `max_batch * row_bytes` bytes and stay valid as long as
    /// `keepalive` lives, which the assembler owns.
    pub fn new(
        slots: Vec<SlotMemory>,
        max_batch: usize,
        row_bytes: usize,
        timeout: Duration,
        keepalive: Box<dyn Send + Sync>,
    ) -> Assembler<M> {
        assert!(!slots.is_empty() && max_batch > 0);
        for s in &slots {
            assert!(s.len >= max_batch * row_bytes, "slot smaller than a batch");
        }
        Assembler {
            state: Mutex::new(State {
                free: (0..slots.len()).collect(),
                open: None,
                sealed: VecDeque::new(),
                closed: false,
            }),
            slots,
            max_batch,
            row_bytes,
            timeout,
            cv: Condvar::new(),
            _keepalive: keepalive,
        }
    }

    /// An assembler over plain heap memory (CPU inference, tests).
    pub fn with_heap(
        slots: usize,
        max_batch: usize,
        row_bytes: usize,
        timeout: Duration,
    ) -> Assembler<M> {
        let mut mem: Vec<Vec<u8>> = (0..slots)
            .map(|_| vec![0u8; max_batch * row_bytes])
            .collect();
        let ptrs = mem
            .iter_mut()
            .map(|v| SlotMemory {
                ptr: v.as_mut_ptr(),
                len: v.len(),
            })
            .collect();
        Assembler::new(ptrs, max_batch, row_bytes, timeout, Box::new(mem))
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Base of a slot's memory, for the inference worker to wrap as a tensor.
    pub fn slot_memory(&self, slot: usize) -> SlotMemory {
        self.slots[slot]
    }

    /// Lease a row of the open slot, opening a free slot when needed. Blocks while every
    /// slot is sealed or in inference. Returns `None` after [`close`](Self::close).
    pub fn lease(self: &Arc<Self>) -> Option<RowLease<M>> {
        let mut st = self.state.lock().expect("assembler lock");
        loop {
            if st.closed {
                return None;
            }
            if let Some(open) = st.open.as_mut() {
                if open.accepting {
                    let row = open.leased;
                    open.leased += 1;
                    open.rows.push(None);
                    if open.leased == self.max_batch {
                        open.accepting = false;
                    }
                    return Some(RowLease {
                        asm: Arc::clone(self),
                        slot: open.slot,
                        row,
                        done: false,
                    });
                }
            } else if let Some(slot) = st.free.pop_front() {
                st.open = Some(Open {
                    slot,
                    leased: 0,
                    committed: 0,
                    accepting: true,
                    rows: Vec::with_capacity(self.max_batch),
                    first_commit: None,
                });
                continue;
            }
            st = self.cv.wait(st).expect("assembler lock");
        }
    }

    fn commit(&self, slot: usize, row: usize, meta: Option<M>) {
        let mut st = self.state.lock().expect("assembler lock");
        let open = st
            .open
            .as_mut()
            .expect("a leased row belongs to the open slot");
        debug_assert_eq!(open.slot, slot);
        open.rows[row] = meta;
        open.committed += 1;
        open.first_commit.get_or_insert_with(Instant::now);
        if !open.accepting && open.committed == open.leased {
            Self::seal(&mut st);
        }
        drop(st);
        self.cv.notify_all();
    }

    fn seal(st: &mut State<M>) {
        let open = st.open.take().expect("seal needs an open slot");
        st.sealed.push_back(Batch {
            slot: open.slot,
            rows: open.rows,
        });
    }

    /// The next batch for inference: a full one, or a partial one once its oldest row has
    /// waited `timeout`. Returns `None` when closed and everything has been handed out.
    pub fn next_batch(&self) -> Option<Batch<M>> {
        let mut st = self.state.lock().expect("assembler lock");
        loop {
            if let Some(b) = st.sealed.pop_front() {
                return Some(b);
            }
            let closed = st.closed;
            let mut wait_until = None;
            if let Some(open) = st.open.as_mut() {
                if let Some(first) = open.first_commit {
                    let due = first + self.timeout;
                    if closed || Instant::now() >= due {
                        open.accepting = false;
                    }
                    if !open.accepting {
                        if open.committed == open.leased {
                            Self::seal(&mut st);
                            continue;
                        }
                    } else {
                        wait_until = Some(due);
                    }
                } else if closed && open.leased == 0 {
                    let slot = open.slot;
                    st.open = None;
                    st.free.push_back(slot);
                    continue;
                }
            } else if closed {
                return None;
            }
            st = match wait_until {
                Some(due) => {
                    let now = Instant::now();
                    self.cv
                        .wait_timeout(st, due.saturating_duration_since(now))
                        .expect("assembler lock")
                        .0
                }
                None => self.cv.wait(st).expect("assembler lock"),
            };
        }
    }

    /// Give a slot back after inference has finished reading it.
    pub fn release(&self, slot: usize) {
        let mut st = self.state.lock().expect("assembler lock");
        debug_assert!(!st.free.contains(&slot), "slot {slot} released twice");
        st.free.push_back(slot);
        drop(st);
        self.cv.notify_all();
    }

    /// No more leases: the fit stage has finished. Rows already leased still commit and
    /// are batched; `next_batch` returns `None` once all are handed out.
    pub fn close(&self) {
        self.state.lock().expect("assembler lock").closed = true;
        self.cv.notify_all();
    }

    /// Slots that are sealed and waiting for inference (queue depth for telemetry).
    pub fn sealed_len(&self) -> usize {
        self.state.lock().expect("assembler lock").sealed.len()
    }
}

impl<M> RowLease<M> {
    /// The row's pixels (`row_bytes` long), exclusively this lease's.
    pub fn pixels(&mut self) -> &mut [u8] {
        let mem = self.asm.slots[self.slot];
        let off = self.row * self.asm.row_bytes;
        // SAFETY: `off + row_bytes <= mem.len` (checked in `new`), the memory is alive
        // while the assembler is, and no other lease or the inference worker can touch
        // this row until `commit` seals it (the slot is open, the row is ours).
        unsafe { std::slice::from_raw_parts_mut(mem.ptr.add(off), self.asm.row_bytes) }
    }

    /// The row is written: hand it to the batch with its metadata.
    pub fn commit(mut self, meta: M) {
        self.done = true;
        self.asm.commit(self.slot, self.row, Some(meta));
    }
}

impl<M> Drop for RowLease<M> {
    /// A lease dropped without commit (the fit failed) leaves a hole, so the slot can
    /// still be sealed.
    fn drop(&mut self) {
        if !self.done {
            self.asm.commit(self.slot, self.row, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Tiny deterministic PRNG so the test needs no extra crate and replays by seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Property: over random timings of writers and the consumer, every committed row
    /// arrives exactly once with the pixels its writer wrote, and no row's pixels are
    /// changed while the consumer holds the batch. Overwriting a slot that is still in
    /// use would break the second check.
    #[test]
    fn ring_never_hands_out_a_slot_in_use() {
        for seed in 1..=12u64 {
            let slots = 2 + (seed % 3) as usize;
            let max_batch = 1 + (seed % 5) as usize;
            let row_bytes = 64;
            let n_items = 300usize;
            let asm: Arc<Assembler<u32>> = Arc::new(Assembler::with_heap(
                slots,
                max_batch,
                row_bytes,
                Duration::from_micros(300),
            ));
            let next = Arc::new(AtomicUsize::new(0));
            let writers: Vec<_> = (0..3)
                .map(|w| {
                    let asm = Arc::clone(&asm);
                    let next = Arc::clone(&next);
                    std::thread::spawn(move || {
                        let mut rng = Rng(seed * 31 + w);
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= n_items {
                                break;
                            }
                            let mut lease = asm.lease().expect("open");
                            let px = lease.pixels();
                            for (k, b) in px.iter_mut().enumerate() {
                                *b = (i as u8).wrapping_add(k as u8);
                            }
                            if rng.below(4) == 0 {
                                std::thread::sleep(Duration::from_micros(rng.below(400)));
                            }
                            if i % 97 == 13 {
                                drop(lease); // abandoned fit: a hole
                            } else {
                                lease.commit(i as u32);
                            }
                        }
                    })
                })
                .collect();
            let asm2 = Arc::clone(&asm);
            let consumer = std::thread::spawn(move || {
                let mut rng = Rng(seed * 7919);
                let mut seen = Vec::new();
                while let Some(b) = asm2.next_batch() {
                    assert!(!b.rows.is_empty() && b.rows.len() <= max_batch);
                    let mem = asm2.slot_memory(b.slot);
                    let check = |seen: &mut Option<&mut Vec<u32>>| {
                        for (r, m) in b.rows.iter().enumerate() {
                            if let Some(i) = m {
                                // SAFETY: test reads the sealed slot it holds.
                                let px = unsafe {
                                    std::slice::from_raw_parts(
                                        mem.ptr.add(r * row_bytes),
                                        row_bytes,
                                    )
                                };
                                for (k, &v) in px.iter().enumerate() {
                                    assert_eq!(
                                        v,
                                        (*i as u8).wrapping_add(k as u8),
                                        "row {r} of slot {} corrupted",
                                        b.slot
                                    );
                                }
                                if let Some(s) = seen.as_mut() {
                                    s.push(*i);
                                }
                            }
                        }
                    };
                    check(&mut Some(&mut seen));
                    std::thread::sleep(Duration::from_micros(rng.below(600)));
                    check(&mut None); // still intact after the "inference" time
                    asm2.release(b.slot);
                }
                seen
            });
            for w in writers {
                w.join().unwrap();
            }
            asm.close();
            let mut seen = consumer.join().unwrap();
            seen.sort_unstable();
            let expected: Vec<u32> = (0..n_items as u32).filter(|i| i % 97 != 13).collect();
            assert_eq!(seen, expected, "seed {seed}");
        }
    }

    #[test]
    fn partial_batch_after_timeout_and_full_batch_at_max() {
        let asm: Arc<Assembler<u32>> =
            Arc::new(Assembler::with_heap(2, 4, 8, Duration::from_millis(30)));
        for i in 0..4 {
            asm.lease().unwrap().commit(i);
        }
        let t = Instant::now();
        let b = asm.next_batch().unwrap();
        assert_eq!(b.rows.len(), 4, "full batch sealed at max_batch");
        assert!(
            t.elapsed() < Duration::from_millis(25),
            "a full batch must not wait for the timeout"
        );
        asm.release(b.slot);
        asm.lease().unwrap().commit(9);
        let t = Instant::now();
        let b = asm.next_batch().unwrap();
        assert_eq!(b.rows, vec![Some(9)]);
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "partial batch waits for the timeout"
        );
        asm.release(b.slot);
        asm.close();
        assert!(asm.next_batch().is_none());
        assert!(asm.lease().is_none());
    }
}
