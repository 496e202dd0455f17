//! SIGBUS guard for mapped inputs.
//!
//! When a mapped file is truncated, reading a page past its new end raises SIGBUS, whose
//! default action kills the process: one misbehaving producer would take the service
//! down. Each live mapping is registered in a fixed, lock-free table. The handler looks
//! up the faulting address; if it lies in a registered mapping it maps anonymous zero
//! pages over the rest of that mapping (`MAP_FIXED`), flags the mapping and returns, so
//! the faulting load is retried and reads zeros. A fault anywhere else is not ours: the
//! disposition the guard replaced is restored and the fault repeats under it (the crash
//! recorder of [`crate::vocab::crash`], installed earlier by the hot folder, then names
//! the items in flight; without it the default action ends the process).
//!
//! Invariants: a registration is removed before its mapping is unmapped (see
//! `read::Input`'s `Drop`); the handler uses only atomics and `mmap`, both
//! async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

const SLOTS: usize = 1024;

struct Entry {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Entry; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS disposition before the guard's, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A mapping's entry in the table; removed on drop.
pub struct Registration {
    slot: Option<usize>,
}

impl Registration {
    pub fn faulted(&self) -> bool {
        self.slot
            .is_some_and(|s| TABLE[s].faulted.load(Ordering::SeqCst))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            TABLE[s].len.store(0, Ordering::SeqCst);
            TABLE[s].faulted.store(false, Ordering::SeqCst);
            TABLE[s].start.store(0, Ordering::SeqCst);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Register `[ptr, ptr+len)`. With the table full (over 1024 inputs mapped at once, far
/// beyond any channel capacity) the mapping is unguarded, and a warning says so.
pub fn register(ptr: *const u8, len: usize) -> Registration {
    INSTALL.call_once(install);
    if len == 0 {
        return Registration { slot: None };
    }
    let start = ptr as usize;
    for (i, e) in TABLE.iter().enumerate() {
        if e.start
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            e.faulted.store(false, Ordering::SeqCst);
            e.len.store(len, Ordering::SeqCst);
            return Registration { slot: Some(i) };
        }
    }
    tracing::warn!(
        slots = SLOTS,
        "SIGBUS guard table full; this mapping is unguarded"
    );
    Registration { slot: None }
}

fn install() {
    // SAFETY: a plain sigaction call with a handler of the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, &sa, &mut old);
        let _ = PREVIOUS.set(old);
    }
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = page_size();
    for e in TABLE.iter() {
        let start = e.start.load(Ordering::SeqCst);
        let len = e.len.load(Ordering::SeqCst);
        if start != 0 && addr >= start && addr < start + len {
            let from = addr & !(page - 1);
            let end = (start + len).div_ceil(page) * page;
            // SAFETY: `[from, end)` lies inside a live mapping of ours (registered, not yet
            // unmapped); replacing it with anonymous zero pages is what we intend.
            let r = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                e.faulted.store(true, Ordering::SeqCst);
                return;
            }
            break;
        }
    }
    // Not one of our mappings: restore what was there before us; the fault repeats under
    // it and ends the process as it would have without us.
    // SAFETY: sigaction is async-signal-safe; the action is one sigaction gave us, or the
    // default.
    unsafe {
        match PREVIOUS.get() {
            Some(old) => libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()),
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                0
            }
        };
    }
}
