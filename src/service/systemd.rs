//! systemd's notify protocol, spoken directly: one datagram per message to the socket in
//! `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`). No library needed
//! for four messages. `READY=1` is sent once the model is loaded, the watch armed and the
//! first scan done; `STOPPING=1` on shutdown; `WATCHDOG=1` only while the pipeline makes
//! progress or is idle, so a stuck stage gets the service restarted.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
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
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&s).ok()?
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

    /// Send one message (`READY=1`, ...). Failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}
