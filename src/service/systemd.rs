//! What the daemon says to systemd, and what it reads from it: the notify protocol
//! (`sd_notify(3)`: one datagram per message to `$NOTIFY_SOCKET`, a path or an abstract
//! name starting with `@`), the watchdog's period, and whether stderr really is the
//! journal stream systemd set up. No library needed for a handful of messages.
//!
//! The life cycle, as `Type=notify-reload` expects it (and `Type=notify` accepts):
//! - start: `EXTEND_TIMEOUT_USEC` while the model loads and the first scan runs (a large
//!   model must not hit `TimeoutStartSec`), then `READY=1`;
//! - reload (SIGHUP): `RELOADING=1` with `MONOTONIC_USEC` (systemd matches the message to
//!   the signal it sent by that timestamp), the drain and the new start with the
//!   watchdog fed and the timeout extended while they make progress, then `READY=1`;
//! - stop: `STOPPING=1` and a timeout extended to the grace period, whatever the unit's
//!   `TimeoutStopSec` says;
//! - `WATCHDOG=1` only while the pipeline makes progress or is idle, so a stuck stage
//!   gets the service restarted.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, bounded};

/// How often a busy phase (a load, a drain) tells systemd it is still alive when the
/// watchdog does not ask for more often.
const BUSY_TICK: Duration = Duration::from_secs(5);

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `$WATCHDOG_USEC` when the watchdog is on for this process.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets for `Type=notify` services; inert without it.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let s = p.to_string_lossy().into_owned();
            let addr = if let Some(name) = s.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                SocketAddr::from_pathname(&s).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let pid_ok = std::env::var("WATCHDOG_PID")
            .map(|p| p == std::process::id().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && pid_ok)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { socket, watchdog }
    }

    /// Whether systemd listens (a `NOTIFY_SOCKET` was given).
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to ping the watchdog and extend timeouts: half the watchdog's period when
    /// it is on, else [`BUSY_TICK`], whichever is shorter.
    pub fn tick(&self) -> Duration {
        self.watchdog.map_or(BUSY_TICK, |w| w.min(BUSY_TICK))
    }

    /// Send one message (`READY=1`, ...). Failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    /// A reload begins: `RELOADING=1` stamped with `CLOCK_MONOTONIC`, which
    /// `Type=notify-reload` requires to tell this reload from an earlier one.
    pub fn reloading(&self, status: &str) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}"
        ));
    }

    /// Ask for `d` more time for the current start, reload or stop, counted from now.
    pub fn extend(&self, d: Duration) {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()));
    }

    /// One tick of a phase before `READY=1` or while busy: the watchdog is fed and the
    /// timeout extended only while `healthy`, so a hung load or drain still times out.
    pub fn alive(&self, healthy: bool, extend: bool) {
        if !healthy {
            return;
        }
        if extend {
            self.extend(self.tick() * 3);
        }
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// Run `work`, which blocks (a model load, a drain), while telling systemd every
    /// [`Notifier::tick`] that the service is alive, as long as `healthy()` says it
    /// makes progress.
    pub fn busy<R>(&self, healthy: impl Fn() -> bool + Sync, work: impl FnOnce() -> R) -> R {
        if !self.enabled() {
            return work();
        }
        std::thread::scope(|s| {
            // Dropped when `work` returns or unwinds: the ticker ends either way.
            let (done_tx, done_rx) = bounded::<()>(0);
            let healthy = &healthy;
            std::thread::Builder::new()
                .name("hp-notify".into())
                .spawn_scoped(s, move || {
                    while let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(self.tick()) {
                        self.alive(healthy(), true);
                    }
                })
                .ok();
            let r = work();
            drop(done_tx);
            r
        })
    }
}

/// Whether stderr is the stream systemd connected to the journal: `$JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream, and it is inherited by children whose stderr is
/// something else (a pipe, a file), which must then get plain text, not journal fields.
pub fn journal_is_stderr() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages a [`Notifier`] sends, received on a socket the test owns.
    fn pair() -> (Notifier, UnixDatagram, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            watchdog: Some(Duration::from_millis(20)),
        };
        (n, rx, d)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn reloading_is_stamped_with_the_monotonic_clock() {
        let (n, rx, _d) = pair();
        let before = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        n.reloading("x");
        let msg = recv(&rx);
        let usec: u64 = msg
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(msg.starts_with("RELOADING=1\n"), "{msg}");
        let b = before.tv_sec as u64 * 1_000_000 + before.tv_nsec as u64 / 1_000;
        assert!(usec >= b && usec < b + 5_000_000, "{usec} vs {b}");
    }

    #[test]
    fn busy_feeds_the_watchdog_only_while_healthy() {
        let (n, rx, _d) = pair();
        n.busy(|| true, || std::thread::sleep(Duration::from_millis(100)));
        let first = recv(&rx);
        assert!(first.starts_with("EXTEND_TIMEOUT_USEC="), "{first}");
        assert_eq!(recv(&rx), "WATCHDOG=1");
        rx.set_nonblocking(true).unwrap();
        while rx.recv(&mut [0u8; 64]).is_ok() {}
        n.busy(|| false, || std::thread::sleep(Duration::from_millis(100)));
        assert!(
            rx.recv(&mut [0u8; 64]).is_err(),
            "a message while unhealthy"
        );
    }
}
