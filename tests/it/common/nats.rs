//! A real `nats-server` with JetStream for the cluster tests: the pinned one that
//! scripts/setup.sh installs into the venv (on PATH through scripts/env.sh), on a free
//! loopback port with its store in a temporary folder, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{skip, wait_until, which};

pub struct NatsServer {
    child: Child,
    pub port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// `None` (after saying why) when no nats-server is installed.
    pub fn start() -> Option<NatsServer> {
        let Some(bin) = which("nats-server") else {
            skip("cluster: no nats-server (scripts/setup.sh installs it into the venv)");
            return None;
        };
        let store = tempfile::tempdir().unwrap();
        // A port the kernel just handed out and took back: free unless another process
        // takes it in the next moment, which the start's check below would show.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = NatsServer {
            child,
            port,
            _store: store,
        };
        let up = wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up && s.child.try_wait().unwrap().is_none(),
            "nats-server did not start on {port}"
        );
        Some(s)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
