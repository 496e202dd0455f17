//! A real `nats-server` with JetStream for the cluster tests: the pinned one that
//! scripts/setup.sh installs into the venv (on PATH through scripts/env.sh), on a free
//! loopback port with its store in a temporary folder, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{skip, wait_until, which};

pub struct NatsServer {
    child: Child,
    pub port: u16,
    bin: std::path::PathBuf,
    store: tempfile::TempDir,
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
        let child = spawn(&bin, port, store.path());
        let mut s = NatsServer {
            child,
            port,
            bin,
            store,
        };
        s.wait_up();
        Some(s)
    }

    fn wait_up(&mut self) {
        let port = self.port;
        let up = wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up && self.child.try_wait().unwrap().is_none(),
            "nats-server did not start on {port}"
        );
    }

    /// SIGKILL the server and start it again on the same port and store, after `down`.
    pub fn kill_and_restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = spawn(&self.bin, self.port, self.store.path());
        self.wait_up();
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn spawn(bin: &std::path::Path, port: u16, store: &std::path::Path) -> Child {
    Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
