//! A fixed-size pool of reusable byte buffers.
//!
//! Decoded frames are megabytes each; allocating and freeing one per image costs page
//! faults and fragments the heap over a months-long run. The pool hands out at most
//! `capacity` buffers; a stage that asks for one when all are out blocks, which is the
//! same back-pressure a full channel gives. A buffer keeps its capacity when it comes
//! back, so after warm-up (the largest image seen) nothing is allocated. The counters
//! make that checkable in tests and visible in metrics.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    cv: Condvar,
    out: AtomicUsize,
    capacity: usize,
    created: AtomicUsize,
    grown: AtomicUsize,
}

/// A buffer on loan from a [`BufPool`]; it goes back when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl BufPool {
    pub fn new(capacity: usize) -> Arc<BufPool> {
        assert!(capacity > 0, "a pool needs at least one buffer");
        Arc::new(BufPool {
            free: Mutex::new(Vec::with_capacity(capacity)),
            cv: Condvar::new(),
            out: AtomicUsize::new(0),
            capacity,
            created: AtomicUsize::new(0),
            grown: AtomicUsize::new(0),
        })
    }

    /// A buffer of exactly `len` bytes (contents unspecified). Blocks while all
    /// `capacity` buffers are on loan.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut free = self.free.lock().expect("pool lock");
        loop {
            if let Some(mut buf) = free.pop() {
                drop(free);
                if buf.capacity() < len {
                    self.grown.fetch_add(1, Ordering::Relaxed);
                }
                // The pixels are overwritten by the decoder, so only the length matters.
                buf.resize(len, 0);
                self.out.fetch_add(1, Ordering::Relaxed);
                return PooledBuf {
                    buf,
                    pool: Arc::clone(self),
                };
            }
            if self.created.load(Ordering::Relaxed) < self.capacity {
                self.created.fetch_add(1, Ordering::Relaxed);
                drop(free);
                self.out.fetch_add(1, Ordering::Relaxed);
                return PooledBuf {
                    buf: vec![0; len],
                    pool: Arc::clone(self),
                };
            }
            free = self.cv.wait(free).expect("pool lock");
        }
    }

    /// Buffers ever allocated (at most `capacity`).
    pub fn created(&self) -> usize {
        self.created.load(Ordering::Relaxed)
    }

    /// Times a reused buffer had to grow for a larger image.
    pub fn grown(&self) -> usize {
        self.grown.load(Ordering::Relaxed)
    }

    /// Buffers on loan right now.
    pub fn in_use(&self) -> usize {
        self.out.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
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
        let buf = std::mem::take(&mut self.buf);
        self.pool.out.fetch_sub(1, Ordering::Relaxed);
        self.pool.free.lock().expect("pool lock").push(buf);
        self.pool.cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "second get must wait for the first buffer"
        );
        drop(a);
        assert_eq!(t.join().unwrap(), 10);
    }
}
