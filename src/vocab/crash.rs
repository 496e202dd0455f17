//! Crash attribution: which items each thread is working on, kept where a fatal-signal
//! handler can read it, and written to a record file when the process dies by a crash it
//! can catch (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT).
//!
//! Why: after a crash, the hot folder must blame the file that caused it (so a file that
//! kills hotpipe is quarantined instead of crash-looping the service) and nothing else (a
//! file that merely sat in a queue, or was being decoded on another thread, is a
//! bystander). Counting an attempt for every item in flight quarantined dozens of good
//! files in a SIGKILL storm. The process itself knows exactly which thread crashed and
//! what that thread held; this module keeps that knowledge readable from the signal
//! handler, and the handler writes it down before the process dies. What the record
//! means for an item is decided by `hotfolder::recover`; here is only the mechanism.
//!
//! What cannot be caught (SIGKILL from an operator or the OOM killer, a power cut) leaves
//! no record, and no item is blamed for it. Nor does a catchable signal sent from another
//! process (`kill -ABRT`, `systemctl kill`, systemd's watchdog): it lands on whatever
//! thread the kernel picks, which says nothing about that thread's item. Only what the
//! process raised itself is recorded: a fault (`si_code > 0`) or a signal whose sender
//! is this process (`abort`, `raise`: `si_pid` is our own).
//!
//! Layout: every thread that holds items owns one [`Node`] of a global list. Nodes are
//! leaked, never freed, and reused by later threads, so the handler can walk the list with
//! atomic loads only: no lock, no allocation, nothing a signal handler may not do. The
//! list's length is the largest number of holding threads that ever ran at once.
//!
//! Order matters for SIGBUS: the read stage's truncation guard (`stages::read::guard`)
//! must be installed *after* this handler, so that it sees a mapped file's benign SIGBUS
//! first and passes only foreign faults on (the hot folder arms this before it starts the
//! pipeline).
//!
//! Record format (text, one line each, read by `hotfolder::recover`):
//! `signal <n>`, then `c <key> <thread>` for each item the crashing thread held and
//! `o <key> <thread>` for each item another thread held; `<key>` is [`key`] of the item's
//! file name, 16 hex digits. The file is preallocated, so the rest of it reads as NULs.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// The key an item is known by in a crash record: FNV-1a of its file name. Also names the
/// item's journal file in the hot folder, so both agree on it.
pub fn key(name: &OsStr) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Bytes of a thread's name kept for the record (`hp-decode-12` fits).
const NAME_LEN: usize = 24;

/// One thread's holdings. Invariant: only the thread whose id is in `owner` writes `len`,
/// `keys` and `name`; anyone may read them at any time (the handler does, from whatever
/// thread crashed), so every field is atomic and a torn read costs at most one wrong line
/// in a record, never undefined behaviour.
struct Node {
    /// Kernel thread id of the owner; 0 when free.
    owner: AtomicI32,
    /// How many of `keys` are held now.
    len: AtomicUsize,
    keys: Box<[AtomicU64]>,
    name: [AtomicU8; NAME_LEN],
    /// Set once, before the node is published; never changes after.
    next: AtomicPtr<Node>,
}

/// Head of the node list. Invariant: every pointer reachable from here (through
/// `Node::next`) came from `Box::leak` and is never freed, so it is valid for the rest of
/// the process.
static HEAD: AtomicPtr<Node> = AtomicPtr::new(std::ptr::null_mut());

/// Where the handler writes; -1: nowhere (no hot folder armed a record).
static FD: AtomicI32 = AtomicI32::new(-1);

/// The dispositions replaced by [`install`], restored by the handler before the process
/// dies so that the usual ending (core dump, Rust's stack-overflow message) still happens.
static PREVIOUS: OnceLock<[(libc::c_int, libc::sigaction); 5]> = OnceLock::new();

const SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

fn nodes() -> impl Iterator<Item = &'static Node> {
    let mut p = HEAD.load(Ordering::Acquire);
    std::iter::from_fn(move || {
        // SAFETY: see HEAD's invariant: `p` is null or a leaked, never-freed node.
        let node = unsafe { p.as_ref() }?;
        p = node.next.load(Ordering::Acquire);
        Some(node)
    })
}

fn tid() -> i32 {
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    unsafe { libc::gettid() }
}

/// The calling thread's node, released when the thread ends.
struct Mine(Cell<Option<&'static Node>>);

impl Drop for Mine {
    fn drop(&mut self) {
        if let Some(n) = self.0.get() {
            n.len.store(0, Ordering::Release);
            n.owner.store(0, Ordering::Release);
        }
    }
}

thread_local! {
    static MINE: Mine = const { Mine(Cell::new(None)) };
}

/// A node with room for `n` keys owned by the calling thread: its own if big enough, else a
/// free one from the list, else a new one.
fn node_for(n: usize) -> &'static Node {
    MINE.with(|mine| {
        if let Some(node) = mine.0.get() {
            if node.keys.len() >= n {
                return node;
            }
            node.len.store(0, Ordering::Release);
            node.owner.store(0, Ordering::Release);
        }
        let me = tid();
        let node = nodes()
            .find(|node| {
                node.keys.len() >= n
                    && node
                        .owner
                        .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
            })
            .unwrap_or_else(|| push_node(me, n.max(16).next_power_of_two()));
        let name = std::thread::current();
        let name = name.name().unwrap_or("").as_bytes();
        for (i, b) in node.name.iter().enumerate() {
            b.store(name.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        mine.0.set(Some(node));
        node
    })
}

fn push_node(owner: i32, cap: usize) -> &'static Node {
    let node: &'static Node = Box::leak(Box::new(Node {
        owner: AtomicI32::new(owner),
        len: AtomicUsize::new(0),
        keys: (0..cap).map(|_| AtomicU64::new(0)).collect(),
        name: [const { AtomicU8::new(0) }; NAME_LEN],
        next: AtomicPtr::new(std::ptr::null_mut()),
    }));
    let ptr = node as *const Node as *mut Node;
    let mut head = HEAD.load(Ordering::Acquire);
    loop {
        node.next.store(head, Ordering::Release);
        match HEAD.compare_exchange(head, ptr, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return node,
            Err(h) => head = h,
        }
    }
}

/// Items the calling thread is working on, until dropped. Not `Send`: it describes the
/// thread that made it.
#[must_use = "the items count as held only while the guard lives"]
pub struct Held {
    node: &'static Node,
    _thread: PhantomData<*const ()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.node.len.store(0, Ordering::Release);
    }
}

/// Mark the items at `paths` as worked on by this thread (a crash now names them) until
/// the guard drops. A few atomic stores per item; no allocation after a thread's first
/// batch of a given size.
pub fn hold<'a, I>(paths: I) -> Held
where
    I: IntoIterator<Item = &'a Path>,
    I::IntoIter: Clone,
{
    let paths = paths.into_iter();
    let node = node_for(paths.clone().count());
    node.len.store(0, Ordering::Release);
    let mut n = 0;
    for (slot, p) in node.keys.iter().zip(paths) {
        slot.store(key(p.file_name().unwrap_or_default()), Ordering::Relaxed);
        n += 1;
    }
    node.len.store(n, Ordering::Release);
    Held {
        node,
        _thread: PhantomData,
    }
}

/// Write crash records to `record` from now on (the previous record file, if any, is
/// closed), and install the fatal-signal handlers the first time. Meant for the hot
/// folder, which reads the record at its next start.
pub fn record_to(record: File) {
    let old = FD.swap(record.into_raw_fd(), Ordering::AcqRel);
    if old >= 0 {
        // SAFETY: `old` came from `into_raw_fd` above and nothing else owns it.
        unsafe { libc::close(old) };
    }
    install();
}

fn install() {
    PREVIOUS.get_or_init(|| {
        SIGNALS.map(|sig| {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the handler has the
            // SA_SIGINFO signature; `old` receives the disposition being replaced.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_fatal as *const () as libc::sighandler_t;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, &act, &mut old);
                (sig, old)
            }
        })
    });
}

/// The fatal-signal handler: write the record, restore the previous disposition, and let
/// the signal do what it would have done. Only async-signal-safe calls (write, sigaction,
/// raise, gettid) and atomic loads.
extern "C" fn on_fatal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let fd = FD.swap(-1, Ordering::AcqRel);
    // SAFETY: `info` is the kernel's siginfo for this signal (SA_SIGINFO), or null.
    if fd >= 0 && unsafe { raised_here(info) } {
        write_record(fd, sig);
    }
    if let Some(prev) = PREVIOUS.get()
        && let Some((_, old)) = prev.iter().find(|(s, _)| *s == sig)
    {
        // SAFETY: restoring a disposition sigaction gave us.
        unsafe { libc::sigaction(sig, old, std::ptr::null_mut()) };
    }
    // A fault (si_code > 0) happens again when the handler returns, now under the old
    // disposition; a signal that was sent (abort's, or kill's) must be raised again.
    // SAFETY: `info` is the kernel's siginfo for this signal.
    if info.is_null() || unsafe { (*info).si_code } <= 0 {
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(sig) };
    }
}

/// Whether this process caused the signal: a fault the kernel raised (`si_code > 0`), or
/// one sent by this process itself (`abort`, `raise`). A signal from another process is
/// no item's doing.
///
/// # Safety
/// `info` is null or the siginfo the kernel passed to a SA_SIGINFO handler.
unsafe fn raised_here(info: *const libc::siginfo_t) -> bool {
    if info.is_null() {
        return true;
    }
    // SAFETY: per the contract; `si_pid` is valid to read for the sent codes (<= 0),
    // and getpid is async-signal-safe.
    unsafe { (*info).si_code > 0 || (*info).si_pid() == libc::getpid() }
}

/// A fixed buffer for the handler's output: no allocation.
struct Out {
    fd: i32,
    buf: [u8; 1024],
    len: usize,
}

impl Out {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn hex(&mut self, v: u64) {
        let mut d = [0u8; 16];
        for (i, c) in d.iter_mut().enumerate() {
            *c = b"0123456789abcdef"[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
        self.push(&d);
    }

    fn flush(&mut self) {
        // SAFETY: writing initialised bytes of our buffer to a descriptor we own; a short
        // or failed write only shortens the record.
        unsafe { libc::write(self.fd, self.buf.as_ptr().cast(), self.len) };
        self.len = 0;
    }
}

fn write_record(fd: i32, sig: libc::c_int) {
    let me = tid();
    let mut out = Out {
        fd,
        buf: [0; 1024],
        len: 0,
    };
    out.push(b"signal ");
    let mut digits = [0u8; 10];
    let mut n = sig.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push(&digits[i..]);
    out.push(b"\n");
    for node in nodes() {
        let owner = node.owner.load(Ordering::Acquire);
        if owner == 0 {
            continue;
        }
        let tag: &[u8] = if owner == me { b"c " } else { b"o " };
        let len = node.len.load(Ordering::Acquire).min(node.keys.len());
        for k in &node.keys[..len] {
            out.push(tag);
            out.hex(k.load(Ordering::Relaxed));
            out.push(b" ");
            for b in &node.name {
                match b.load(Ordering::Relaxed) {
                    0 => break,
                    c if c.is_ascii_graphic() => out.push(&[c]),
                    _ => out.push(b"?"),
                }
            }
            out.push(b"\n");
        }
    }
    out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_what_each_thread_holds() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("rec");
        let f = File::create(&path).unwrap();
        let a = Path::new("/w/a-crash-unit.jpg");
        let (b, c) = (
            Path::new("/w/b-crash-unit.jpg"),
            Path::new("/w/c-crash-unit.jpg"),
        );
        let held = hold([a]);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::Builder::new()
            .name("hp-unit-other".into())
            .spawn(move || {
                let _h = hold([b, c]);
                tx.send(()).unwrap();
                done_rx.recv().unwrap();
            })
            .unwrap();
        rx.recv().unwrap();
        use std::os::unix::io::AsRawFd;
        write_record(f.as_raw_fd(), libc::SIGABRT);
        done_tx.send(()).unwrap();
        other.join().unwrap();
        drop(held);
        let text = std::fs::read_to_string(&path).unwrap();
        let me = std::thread::current().name().unwrap_or("").to_string();
        let line = |tag: &str, p: &Path, t: &str| {
            let mut t = t.to_string();
            t.truncate(NAME_LEN);
            format!("{tag} {:016x} {t}", key(p.file_name().unwrap()))
        };
        assert!(text.starts_with("signal 6\n"), "{text}");
        assert!(text.contains(&line("c", a, &me)), "{text}");
        assert!(text.contains(&line("o", b, "hp-unit-other")), "{text}");
        assert!(text.contains(&line("o", c, "hp-unit-other")), "{text}");
        // Released: a later record from this thread names nothing of these.
        let f2 = File::create(d.path().join("rec2")).unwrap();
        write_record(f2.as_raw_fd(), libc::SIGABRT);
        let text = std::fs::read_to_string(d.path().join("rec2")).unwrap();
        for p in [a, b, c] {
            let k = format!("{:016x}", key(p.file_name().unwrap()));
            assert!(!text.contains(&k), "{text}");
        }
    }

    #[test]
    fn nodes_are_reused_not_leaked_per_thread() {
        let p = Path::new("/w/reuse-crash-unit.jpg");
        for _ in 0..50 {
            std::thread::spawn(move || drop(hold([p]))).join().unwrap();
        }
        // Other tests' threads may hold nodes at the same time, but 50 threads run one
        // after another must not have made 50 nodes.
        assert!(nodes().count() < 20, "{} nodes", nodes().count());
    }
}
