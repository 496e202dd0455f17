//! A pool of reusable byte buffers, bounded in count and in bytes.
//!
//! Decoded frames are megabytes each; allocating and freeing one per image costs page
//! faults and fragments the heap over a months-long run. So a buffer keeps its capacity
//! when it comes back, and after warm-up (the largest ordinary image seen) nothing is
//! allocated per image. The counters ([`BufPool::created`], [`BufPool::grown`],
//! [`BufPool::released`]) make that checkable in tests and visible in metrics.
//!
//! Two bounds, and a request that would cross either one waits (blocks, the same
//! back-pressure a full channel gives):
//! - **count**: at most `capacity` buffers are on loan, so the number of frames in flight
//!   is bounded whatever their size;
//! - **bytes** ([`BufPool::with_budget`]): the capacity of every buffer on loan plus every
//!   free buffer kept must stay within the budget. A count alone let six 16000 x 16000
//!   PNGs (732 MiB each decoded) take 3.3 GiB and keep it forever. Free buffers count
//!   too, so when a request needs room they are released to the operating system first;
//!   a request larger than the whole budget can never be served and fails at once
//!   ([`OverBudget`]) instead of waiting forever.
//!
//! Burst memory goes back: a returning buffer larger than [`KEEP_MAX`], or one that would
//! leave more than half the budget idle in free buffers, is released rather than kept.
//! Ordinary frames (a 24 MP photo is 69 MiB) stay well under both, so steady state reuses.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The largest buffer a budgeted pool keeps for reuse: 256 MiB is an 89 MP RGB frame,
/// larger than any ordinary camera image decodes to, so only outliers (a 16k x 16k
/// scan) are reallocated, and their memory goes back to the OS once they are done.
pub const KEEP_MAX: usize = 256 << 20;

/// A request that can never be served: it needs more bytes at once than the whole budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{need} bytes requested at once, over the pool's budget of {budget} bytes")]
pub struct OverBudget {
    /// Bytes the request needs (the sum of its buffers' lengths).
    pub need: usize,
    /// The pool's whole byte budget.
    pub budget: usize,
}

/// A pool of byte buffers. Invariants, all held under `state`'s lock:
/// - `out_bytes + free_bytes <= budget`: bytes are charged *before* they are allocated
///   (the allocation itself happens outside the lock), so the bound holds at every moment;
/// - `out <= capacity`, except that a request for more buffers than `capacity` is let in
///   when nothing else is on loan (it could never be served otherwise);
/// - `out + free.len() <= capacity` whenever a buffer is kept: an excess one is released.
///
/// Why waiting cannot deadlock: a request takes everything it needs in one call
/// ([`BufPool::try_get_n`]) or waits holding nothing it got from that call, and every
/// request is for at most the whole budget (else it fails at once). So a request waits
/// only for buffers other holders will return. Callers keep their side of this: a thread
/// must not ask a budgeted pool again while it holds a buffer from it (the decode stage
/// takes a frame, its rotation copy and the decoder's native pixels together), and
/// holders downstream (detect, fit) return frames without asking the pool for anything.
/// Then, with the rest of the pool empty, any single request that fits the budget is
/// served.
pub struct BufPool {
    state: Mutex<State>,
    cv: Condvar,
    capacity: usize,
    budget: usize,
    /// A returning buffer above this capacity is released, not kept.
    keep_max: usize,
    /// Free buffers kept may total at most this many bytes.
    keep_total: usize,
    created: AtomicUsize,
    grown: AtomicUsize,
    released: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Vec<u8>>,
    /// Buffers on loan.
    out: usize,
    /// What the buffers on loan were charged (their capacity when handed out).
    out_bytes: usize,
    /// Capacity of the free buffers kept.
    free_bytes: usize,
}

/// A buffer on loan from a [`BufPool`]; it goes back when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
    /// Bytes charged for it; `None` for an empty request, which takes no buffer at all.
    charge: Option<usize>,
}

/// A request's buffers, and the free buffers released to make room for them.
type Plan<const N: usize> = ([Pick; N], Vec<Vec<u8>>);

/// One buffer of a planned request: a free one (grown when short) or a new one.
struct Pick {
    buf: Option<Vec<u8>>,
    len: usize,
    charge: usize,
}

impl BufPool {
    /// A pool of at most `capacity` buffers on loan, with no byte budget: every buffer
    /// that comes back is kept (for outputs, whose size the configuration bounds).
    pub fn new(capacity: usize) -> Arc<BufPool> {
        Self::build(capacity, usize::MAX, usize::MAX, usize::MAX)
    }

    /// A pool of at most `capacity` buffers on loan and `budget` bytes in all (on loan
    /// and kept free), for buffers whose size the input decides.
    pub fn with_budget(capacity: usize, budget: usize) -> Arc<BufPool> {
        assert!(budget > 0, "a pool needs a budget of at least one byte");
        Self::build(capacity, budget, KEEP_MAX, budget / 2)
    }

    fn build(capacity: usize, budget: usize, keep_max: usize, keep_total: usize) -> Arc<Self> {
        assert!(capacity > 0, "a pool needs at least one buffer");
        Arc::new(BufPool {
            state: Mutex::new(State {
                free: Vec::with_capacity(capacity),
                ..State::default()
            }),
            cv: Condvar::new(),
            capacity,
            budget,
            keep_max,
            keep_total,
            created: AtomicUsize::new(0),
            grown: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
        })
    }

    /// A buffer of exactly `len` bytes (contents unspecified). Blocks while the pool is
    /// at its count or byte bound. Panics when `len` is over the whole budget: sizes an
    /// input decides go through [`BufPool::try_get`].
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        self.try_get(len).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A buffer of exactly `len` bytes, waiting while the pool is at a bound; `Err` at
    /// once when `len` is over the whole budget.
    pub fn try_get(self: &Arc<Self>, len: usize) -> Result<PooledBuf, OverBudget> {
        self.try_get_n([len]).map(|[b]| b)
    }

    /// Buffers of the given lengths, all at once or none: the call waits, holding
    /// nothing, until every one fits (so one item's several buffers cannot deadlock
    /// against another's). A length of 0 takes no buffer (an empty one comes back).
    /// `Err` at once when the lengths add up to more than the whole budget.
    pub fn try_get_n<const N: usize>(
        self: &Arc<Self>,
        lens: [usize; N],
    ) -> Result<[PooledBuf; N], OverBudget> {
        let need = lens.iter().fold(0usize, |a, &l| a.saturating_add(l));
        if need > self.budget {
            return Err(OverBudget {
                need,
                budget: self.budget,
            });
        }
        let mut st = self.lock();
        let (picks, dropped) = loop {
            if let Some(p) = self.plan(&mut st, &lens) {
                break p;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        drop(st);
        // Released outside the lock: unmapping a large buffer takes a while.
        self.released.fetch_add(dropped.len(), Ordering::Relaxed);
        drop(dropped);
        Ok(picks.map(|p| self.materialize(p)))
    }

    /// Choose the buffers for `lens` and charge them, or `None` to wait. Reusing free
    /// buffers is tried first; when their spare capacity is what does not fit, fresh
    /// buffers of the exact sizes (which can only cost less) are tried next.
    fn plan<const N: usize>(&self, st: &mut State, lens: &[usize; N]) -> Option<Plan<N>> {
        let slots = lens.iter().filter(|&&l| l > 0).count();
        if st.out + slots > self.capacity && st.out > 0 {
            return None;
        }
        let reuse = self.choose(st, lens);
        self.commit(st, lens, slots, reuse)
            .or_else(|| self.commit(st, lens, slots, [None; N]))
    }

    /// Charge the request with these free buffers (indices into `free`; `None`: a new
    /// buffer) if it fits the budget once other free buffers are released; then take
    /// them out and release what has to go.
    fn commit<const N: usize>(
        &self,
        st: &mut State,
        lens: &[usize; N],
        slots: usize,
        chosen: [Option<usize>; N],
    ) -> Option<Plan<N>> {
        let charges: [usize; N] = std::array::from_fn(|i| match (lens[i], chosen[i]) {
            (0, _) => 0,
            (len, Some(j)) => st.free[j].capacity().max(len),
            (len, None) => len,
        });
        // Everything but the free buffers that stay free.
        let committed = st.out_bytes + charges.iter().sum::<usize>();
        if committed > self.budget {
            return None;
        }
        // Highest index first: `swap_remove` then leaves the lower ones in place.
        let mut order: [usize; N] = std::array::from_fn(|i| i);
        order.sort_by_key(|&i| std::cmp::Reverse(chosen[i]));
        let mut bufs: [Option<Vec<u8>>; N] = std::array::from_fn(|_| None);
        for i in order {
            if let Some(j) = chosen[i] {
                let b = st.free.swap_remove(j);
                st.free_bytes -= b.capacity();
                bufs[i] = Some(b);
            }
        }
        st.out += slots;
        st.out_bytes = committed;
        // Room is made by releasing free buffers, largest first (the fewest to lose).
        let mut dropped = Vec::new();
        while committed + st.free_bytes > self.budget || st.out + st.free.len() > self.capacity {
            let Some(j) = (0..st.free.len()).max_by_key(|&j| st.free[j].capacity()) else {
                break;
            };
            let b = st.free.swap_remove(j);
            st.free_bytes -= b.capacity();
            dropped.push(b);
        }
        let picks = std::array::from_fn(|i| Pick {
            buf: bufs[i].take(),
            len: lens[i],
            charge: charges[i],
        });
        Some((picks, dropped))
    }

    /// Which free buffer (index into `free`) serves each length: the smallest that is
    /// large enough; else, when no new buffer may be made, the largest left (grown).
    fn choose<const N: usize>(&self, st: &State, lens: &[usize; N]) -> [Option<usize>; N] {
        let mut chosen = [None; N];
        let mut order: [usize; N] = std::array::from_fn(|i| i);
        order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        let free = |j: &usize, c: &[Option<usize>; N]| !c.contains(&Some(*j));
        for &i in order.iter().filter(|&&i| lens[i] > 0) {
            chosen[i] = (0..st.free.len())
                .filter(|j| free(j, &chosen) && st.free[*j].capacity() >= lens[i])
                .min_by_key(|&j| st.free[j].capacity());
        }
        let mut existing = st.out + st.free.len();
        for &i in order.iter().filter(|&&i| lens[i] > 0) {
            if chosen[i].is_some() {
                continue;
            }
            if existing < self.capacity {
                existing += 1;
                continue;
            }
            chosen[i] = (0..st.free.len())
                .filter(|j| free(j, &chosen))
                .max_by_key(|&j| st.free[j].capacity());
        }
        chosen
    }

    /// Turn a charged pick into the buffer handed out (allocating outside the lock).
    fn materialize(self: &Arc<Self>, p: Pick) -> PooledBuf {
        if p.len == 0 {
            return PooledBuf {
                buf: Vec::new(),
                pool: Arc::clone(self),
                charge: None,
            };
        }
        let buf = match p.buf {
            Some(mut buf) => {
                if buf.capacity() < p.len {
                    self.grown.fetch_add(1, Ordering::Relaxed);
                    // Exact, so the capacity is what was charged (`reserve` may double).
                    buf.reserve_exact(p.len - buf.len());
                }
                // The pixels are overwritten by the decoder, so only the length matters.
                buf.resize(p.len, 0);
                buf
            }
            None => {
                self.created.fetch_add(1, Ordering::Relaxed);
                vec![0; p.len]
            }
        };
        PooledBuf {
            buf,
            pool: Arc::clone(self),
            charge: Some(p.charge),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters and a list, each update complete before any code
        // that could panic runs: a poisoned lock holds nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A returning buffer: kept for reuse, or released when it is an outlier or the
    /// pool already keeps enough.
    fn give_back(&self, buf: Vec<u8>, charge: usize) {
        let cap = buf.capacity();
        let mut st = self.lock();
        st.out -= 1;
        st.out_bytes -= charge;
        let keep = cap > 0
            && cap <= self.keep_max
            && st.free_bytes + cap <= self.keep_total.min(self.budget - st.out_bytes)
            && st.out + st.free.len() < self.capacity;
        if keep {
            st.free_bytes += cap;
            st.free.push(buf);
            drop(st);
        } else {
            drop(st);
            self.released.fetch_add(1, Ordering::Relaxed);
            drop(buf);
        }
        // Every waiter re-checks: bytes freed for one may be what another needs.
        self.cv.notify_all();
    }

    /// Buffers ever allocated: at most `capacity` unless outliers were released.
    pub fn created(&self) -> usize {
        self.created.load(Ordering::Relaxed)
    }

    /// Times a reused buffer had to grow for a larger image.
    pub fn grown(&self) -> usize {
        self.grown.load(Ordering::Relaxed)
    }

    /// Buffers released to the allocator instead of kept (outliers, or to make room).
    pub fn released(&self) -> usize {
        self.released.load(Ordering::Relaxed)
    }

    /// Buffers on loan right now.
    pub fn in_use(&self) -> usize {
        self.lock().out
    }

    /// Bytes charged now: buffers on loan plus free buffers kept (at most the budget).
    pub fn bytes_held(&self) -> usize {
        let st = self.lock();
        st.out_bytes + st.free_bytes
    }

    /// Bytes in free buffers kept for reuse.
    pub fn bytes_kept(&self) -> usize {
        self.lock().free_bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The byte budget (`usize::MAX` for a pool without one).
    pub fn budget(&self) -> usize {
        self.budget
    }
}

/// Counts only: the free buffers' bytes would be megabytes of noise in a log or panic.
impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("BufPool")
            .field("out", &st.out)
            .field("free", &st.free.len())
            .field("bytes_held", &(st.out_bytes + st.free_bytes))
            .field("capacity", &self.capacity)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(charge) = self.charge {
            self.pool.give_back(std::mem::take(&mut self.buf), charge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    #[test]
    fn reuses_and_bounds() {
        let pool = BufPool::new(2);
        for _ in 0..100 {
            let a = pool.get(1000);
            let b = pool.get(500);
            assert_eq!((a.len(), b.len()), (1000, 500));
        }
        assert_eq!(pool.created(), 2);
        assert!(pool.grown() <= 1);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn blocks_when_exhausted() {
        let pool = BufPool::new(1);
        let a = pool.get(10);
        let p2 = Arc::clone(&pool);
        let t = std::thread::spawn(move || p2.get(10).len());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "second get must wait for the first buffer"
        );
        drop(a);
        assert_eq!(t.join().unwrap(), 10);
    }

    /// Ordinary frames of varying size under a budget: after warm-up every request is
    /// served from the free list, nothing allocated, grown or released.
    #[test]
    fn steady_state_reuses_under_a_budget() {
        let pool = BufPool::with_budget(4, 64 * MIB);
        let sizes = [3 * MIB, 5 * MIB, 4 * MIB];
        let warm = |pool: &Arc<BufPool>| {
            let held: Vec<PooledBuf> = sizes.iter().map(|&s| pool.get(s)).collect();
            drop(held);
        };
        warm(&pool);
        let (created, grown) = (pool.created(), pool.grown());
        for _ in 0..50 {
            warm(&pool);
        }
        assert_eq!((pool.created(), pool.grown()), (created, grown));
        assert_eq!((created, pool.released()), (3, 0));
        assert_eq!(pool.bytes_kept(), 12 * MIB);
    }

    #[test]
    fn blocks_past_the_budget_and_resumes_when_bytes_come_back() {
        let pool = BufPool::with_budget(8, 10 * MIB);
        let a = pool.get(6 * MIB);
        let p2 = Arc::clone(&pool);
        let t = std::thread::spawn(move || p2.try_get(6 * MIB).map(|b| b.len()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "6 + 6 MiB is over a 10 MiB budget: wait");
        assert_eq!(pool.bytes_held(), 6 * MIB);
        drop(a);
        assert_eq!(t.join().unwrap(), Ok(6 * MIB));
        assert!(pool.bytes_held() <= 10 * MIB);
    }

    #[test]
    fn a_request_over_the_whole_budget_fails_at_once() {
        let pool = BufPool::with_budget(8, 10 * MIB);
        let _held = pool.get(9 * MIB);
        // Would block forever if it waited: the error must come back now.
        assert_eq!(
            pool.try_get(11 * MIB).unwrap_err(),
            OverBudget {
                need: 11 * MIB,
                budget: 10 * MIB
            }
        );
        assert_eq!(
            pool.try_get_n([6 * MIB, 6 * MIB]).unwrap_err().need,
            12 * MIB
        );
        assert_eq!((pool.created(), pool.in_use()), (1, 1));
    }

    #[test]
    fn large_buffers_are_released_on_return() {
        let pool = BufPool::with_budget(4, 1024 * MIB);
        drop(pool.get(KEEP_MAX + MIB));
        assert_eq!((pool.released(), pool.bytes_kept()), (1, 0));
        assert_eq!(pool.bytes_held(), 0);
        // Under the size threshold but more than half the budget idle: released too.
        let pool = BufPool::with_budget(4, 100 * MIB);
        let a = pool.get(30 * MIB);
        let b = pool.get(30 * MIB);
        drop(a);
        drop(b);
        assert_eq!((pool.released(), pool.bytes_kept()), (1, 30 * MIB));
    }

    #[test]
    fn free_buffers_make_room_for_a_large_request() {
        let pool = BufPool::with_budget(4, 40 * MIB);
        drop(pool.get(8 * MIB));
        drop(pool.try_get_n([8 * MIB, 8 * MIB]).unwrap());
        assert_eq!((pool.bytes_kept(), pool.created()), (16 * MIB, 2));
        // 36 MiB fits only once both kept buffers are released: it must not wait for
        // them (nobody would return them) nor go over the budget.
        let big = pool.try_get(36 * MIB).unwrap();
        assert_eq!(big.len(), 36 * MIB);
        assert_eq!((pool.bytes_held(), pool.bytes_kept()), (36 * MIB, 0));
        assert_eq!(pool.released(), 2);
    }

    #[test]
    fn several_buffers_come_all_at_once() {
        let pool = BufPool::with_budget(8, 10 * MIB);
        let [a, b, c] = pool.try_get_n([MIB, 0, 4 * MIB]).unwrap();
        assert_eq!((a.len(), b.len(), c.len()), (MIB, 0, 4 * MIB));
        assert_eq!(pool.in_use(), 2, "an empty request takes no buffer");
        // 5 of 10 MiB are out; a pair of 3 + 3 MiB must wait for room for both, not take
        // one and hold it while it waits for the other.
        let p2 = Arc::clone(&pool);
        let t = std::thread::spawn(move || p2.try_get_n([3 * MIB, 3 * MIB]).is_ok());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished());
        assert_eq!(pool.bytes_held(), 5 * MIB, "the waiter holds nothing");
        drop((a, b, c));
        assert!(t.join().unwrap());
        // More buffers than the pool's count are served when the request is alone.
        let pool = BufPool::with_budget(2, 10 * MIB);
        let three = pool.try_get_n([MIB, MIB, MIB]).unwrap();
        assert_eq!(pool.in_use(), 3);
        drop(three);
        assert_eq!((pool.in_use(), pool.released()), (0, 1), "back to 2 kept");
    }
}
