//! The daemon's signals, as messages: SIGTERM and SIGINT (stop), SIGHUP (reload), and
//! SIGXFSZ (not to die of it).
//!
//! `signal-hook` owns the handlers, which do only what is async-signal-safe (a write to
//! its self-pipe); the thread `hp-signals` reads the pipe and turns each signal into a
//! [`Signal`] on a channel, so everything the daemon does about a signal runs as ordinary
//! code in its main loop. Unlike a blocked-mask-and-`sigwait` scheme, this may be set up
//! at any time, whatever threads exist already. A handler runs on whichever thread the
//! kernel picks; it is installed with `SA_RESTART`, and std and crossbeam retry what is
//! still interrupted (`EINTR`).
//!
//! SIGXFSZ gets a handler that does nothing (the signal's default would kill the
//! process), so writing past a file-size limit is an `EFBIG` error on that one output
//! (transient, retried) instead of the death of the daemon.
//!
//! The fatal signals (SIGSEGV, SIGBUS, ...) are not here: `vocab::crash` records crashes,
//! and the read stage chains SIGBUS for its mappings.

use std::sync::atomic::AtomicBool;

use crossbeam_channel::{Receiver, bounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::iterator::Signals;

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT: stop claiming, finish in flight within the grace period, exit 0.
    Terminate,
    /// SIGHUP: reload the config if it is valid.
    Reload,
}

/// Set by the SIGXFSZ handler, read by nobody: the handler exists so that the signal does
/// not end the process (the failed write reports `EFBIG` itself).
static FILE_SIZE_LIMIT_HIT: AtomicBool = AtomicBool::new(false);

/// Install the handlers and start the thread that receives the signals; each arrives on
/// the returned channel. Call it once, before the daemon starts its work (a signal that
/// comes earlier has its default effect).
pub fn install() -> std::io::Result<Receiver<Signal>> {
    signal_hook::flag::register(SIGXFSZ, &FILE_SIZE_LIMIT_HIT)?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    // Bounded like every queue here: a burst of signals beyond it waits in the kernel
    // (signals of one kind coalesce there) until the main loop takes the ones before.
    let (tx, rx) = bounded(8);
    std::thread::Builder::new()
        .name("hp-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let msg = if sig == SIGHUP {
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
