//! A running `hotpipe run` for the end-to-end tests: the real binary, its stderr
//! collected for assertions, signals sent to it, killed when dropped; and what those tests
//! read of it from outside (resident memory, CPU time) and how they feed it (a producer's
//! rename into the inbox).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{hotpipe, wait_until};

/// A running daemon with its stderr collected.
pub struct Daemon {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(cfg: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = hotpipe();
        cmd.args(["run", "--config"])
            .arg(cfg)
            .env("HOTPIPE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // An empty value removes the variable (e.g. NO_COLOR, set above for every test).
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let mut err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn expect_log(&self, needle: &str, timeout: Duration) {
        assert!(
            self.wait_log(needle, timeout),
            "no `{needle}` in the log:\n{}",
            self.log()
        );
    }

    /// Wait (30 s at most) until `needle` appears `n` times in the log.
    pub fn expect_count(&self, needle: &str, n: usize) {
        assert!(
            wait_until(Duration::from_secs(30), || self
                .log()
                .matches(needle)
                .count()
                >= n),
            "not {n} times `{needle}` in the log:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM and wait; returns the exit code and how long the exit took. The signal is
    /// sent once the daemon has logged its first line (its signal handling is set up
    /// before that), or has ended: a SIGTERM earlier would kill it outright, and a test
    /// that stops a daemon whose work was already done would see a death by signal.
    pub fn stop(mut self) -> (Option<i32>, Duration) {
        use std::os::unix::process::ExitStatusExt;
        wait_until(Duration::from_secs(30), || {
            !self.log().is_empty() || self.child.try_wait().is_ok_and(|s| s.is_some())
        });
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let st = self.child.wait().unwrap();
        if let Some(sig) = st.signal() {
            eprintln!("daemon killed by signal {sig}");
        }
        (st.code(), t.elapsed())
    }

    /// SIGKILL (unless it died already) and wait; how it ended.
    pub fn kill(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        let needle = "status page on http://";
        let i = log.find(needle).expect("the status page line") + needle.len();
        log[i..].split('/').next().unwrap().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deliver like a well-behaved producer: write under a hidden name, rename in.
pub fn deliver(hf: &Path, name: &str, bytes: &[u8]) {
    let tmp = hf.join("inbox").join(format!(".{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, hf.join("inbox").join(name)).unwrap();
}

/// VmRSS of a process, in KiB.
pub fn vm_rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// CPU time a process used so far (user + system), in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// One HTTP/1.0 GET: the status code and the whole response.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let code = r.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, r)
}

/// The live `python -m hotpipe_worker` processes on this machine, as `(pid, parent)`.
fn model_workers() -> Vec<(i32, i32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains("hotpipe_worker") {
            continue;
        }
        // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse().ok()));
        if let (Some(s), Some(ppid)) = (state, ppid)
            && s != "Z"
        {
            v.push((pid, ppid));
        }
    }
    v
}

/// The model workers whose parent is `pid`.
pub fn workers_of(pid: i32) -> Vec<i32> {
    (model_workers().into_iter())
        .filter(|&(_, parent)| parent == pid)
        .map(|(p, _)| p)
        .collect()
}

/// The model workers whose environment holds `HOTPIPE_TEST_TAG=<tag>` (a test passes the
/// tag to its daemon, whose workers inherit it): found whoever their parent now is.
pub fn tagged_workers(tag: &str) -> Vec<i32> {
    let want = format!("HOTPIPE_TEST_TAG={tag}");
    (model_workers().into_iter())
        .map(|(p, _)| p)
        .filter(|p| {
            let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            env.split(|&b| b == 0).any(|kv| kv == want.as_bytes())
        })
        .collect()
}
