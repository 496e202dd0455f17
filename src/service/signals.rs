//! Signals without async-signal-safety worries: SIGTERM, SIGINT and SIGHUP are blocked in
//! every thread (the mask is inherited, so this must run before any thread starts) and
//! one thread takes them with `sigwait`, turning each into a message on a channel.
//! SIGXFSZ is ignored, so writing past a file-size limit is an `EFBIG` error on that one
//! output (transient, retried) instead of the death of the daemon.

use crossbeam_channel::{Receiver, unbounded};

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT: stop claiming, finish in flight within the grace period, exit 0.
    Terminate,
    /// SIGHUP: reload the config if it is valid.
    Reload,
}

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGHUP);
        s
    }
}

/// Block the signals in the calling thread (and every thread it starts later) and start
/// the thread that receives them. Call first thing in the process.
pub fn install() -> std::io::Result<Receiver<Signal>> {
    let s = set();
    // SAFETY: plain libc calls on a valid sigset; SIG_IGN for SIGXFSZ.
    unsafe {
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let (tx, rx) = unbounded();
    std::thread::Builder::new()
        .name("hp-signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `s` is a valid set of blocked signals; sig is written on return.
                if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                    continue;
                }
                let msg = if sig == libc::SIGHUP {
                    Signal::Reload
                } else {
                    Signal::Terminate
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
