//! One worker process: its start and handshake, its control pipes, one batch at a time,
//! and how it died. The [`super::Supervisor`] keeps one alive.

use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use rustix::event::{PollFd, PollFlags};
use serde_json::{Value, json};

use super::shm::Layout;
use super::{PyError, WorkerSpec};

/// The shared memory's file descriptor in the worker (see `hotpipe_worker.SHM_FD`).
const SHM_FD: i32 = 3;
/// The largest control frame either side accepts.
const MAX_FRAME: usize = 16 << 20;

/// Which rows of which slots one batch frame names.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub input: usize,
    pub output: usize,
    pub start: usize,
    pub rows: usize,
}

/// One row's result, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum RowError {
    /// The pipeline raised for this image: the exception's last line.
    Raised(String),
    /// The device ran out of memory even for this image alone.
    OutOfMemory(String),
}

/// How long a hung worker has to write its stack before it is killed.
const STACK_DUMP_WAIT: Duration = Duration::from_millis(500);

/// A running worker. Dropping it stops the process (asked, then killed): a worker never
/// outlives its handle, and dies with hotpipe (`PR_SET_PDEATHSIG`) if hotpipe is killed.
pub struct PyWorker {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    /// Outputs per input, height, width, channels, as the worker reported them.
    pub output: [usize; 4],
    /// What the pipeline says it is (`describe()`: library, version, weights), with its
    /// class; an object.
    pub about: Value,
    next_id: u64,
}

impl PyWorker {
    /// Start a worker on `shm` (inherited as fd 3) and complete its handshake; `input` is
    /// `[slots, rows, H, W, C]` of the input slots at the file's start.
    pub fn start(
        spec: &WorkerSpec,
        shm: BorrowedFd<'_>,
        input: [usize; 5],
    ) -> Result<PyWorker, PyError> {
        let raw = shm.as_raw_fd();
        let parent = std::process::id() as i32;
        let mut cmd = Command::new(&spec.python);
        cmd.args(["-m", "hotpipe_worker"])
            .env("PYTHONPATH", python_path(&spec.module_dir))
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = spec.cpu_threads
            && std::env::var_os("OMP_NUM_THREADS").is_none()
        {
            cmd.env("OMP_NUM_THREADS", n.to_string());
        }
        // SAFETY: between fork and exec only prctl, getppid, dup2, fcntl and _exit run,
        // all async-signal-safe. The worker is killed when hotpipe dies (a SIGKILLed
        // daemon leaves no worker behind), and exits at once if hotpipe already died
        // before the prctl. It gets the memfd as fd 3 without CLOEXEC: dup2 clears the
        // flag on the copy, but does nothing when the memfd already is fd 3, so then the
        // flag is cleared by hand.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                let ok = if raw == SHM_FD {
                    libc::fcntl(raw, libc::F_SETFD, 0) >= 0
                } else {
                    libc::dup2(raw, SHM_FD) >= 0
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = spawn_kept(cmd).map_err(|source| PyError::Spawn {
            python: spec.python.display().to_string(),
            source,
        })?;
        if let Some(err) = child.stderr.take() {
            relay_stderr(err, child.id(), &spec.device);
        }
        let to = child.stdin.take().expect("piped stdin");
        let from = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut w = PyWorker {
            child,
            to,
            from,
            output: [0; 4],
            about: Value::Null,
            next_id: 0,
        };
        w.handshake(spec, input)?;
        Ok(w)
    }

    fn handshake(&mut self, spec: &WorkerSpec, input: [usize; 5]) -> Result<(), PyError> {
        self.send(&json!({
            "op": "hello",
            "entry": spec.entry,
            "device": spec.device,
            "options": spec.options,
            "input": input,
        }))?;
        let ready = self.recv()?;
        match ready["op"].as_str() {
            Some("ready") => {}
            Some("fatal") => {
                let e = ready["error"].as_str().unwrap_or("(no traceback)");
                return Err(PyError::Fatal(e.to_string()));
            }
            _ => return Err(PyError::Protocol(format!("expected ready, got {ready}"))),
        }
        let shape: Vec<usize> = ready["output"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as usize))
                    .collect()
            })
            .unwrap_or_default();
        let [k, oh, ow, oc] = shape[..] else {
            return Err(PyError::Protocol(format!("bad output shape in {ready}")));
        };
        if k == 0 || oh == 0 || ow == 0 || ![1, 3, 4].contains(&oc) {
            return Err(PyError::Fatal(format!(
                "output_shape must be (K >= 1, H >= 1, W >= 1, C in 1, 3, 4), not {shape:?}"
            )));
        }
        self.output = [k, oh, ow, oc];
        self.about = match ready.get("about") {
            Some(v @ Value::Object(_)) => v.clone(),
            _ => json!({}),
        };
        Ok(())
    }

    /// Tell the worker where its output slots are, once the file is sized and mapped.
    pub fn map(&mut self, layout: &Layout, worker: usize) -> Result<(), PyError> {
        self.send(&json!({
            "op": "map",
            "bytes": layout.total(),
            "outputs": layout.outputs_at(worker),
            "slots": layout.out_slots(),
        }))
    }

    /// Whether the worker process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Run `job` with one parameters object per row; one error or `None` per row. A
    /// worker that has not answered within `timeout` is killed (it may be stuck in
    /// native code, where nothing else reaches it) and [`PyError::Timeout`] returned.
    pub fn run(
        &mut self,
        job: Job,
        params: &[Value],
        timeout: Option<Duration>,
    ) -> Result<Vec<Option<RowError>>, PyError> {
        assert_eq!(params.len(), job.rows);
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({
            "op": "batch", "id": id, "in": job.input, "out": job.output,
            "start": job.start, "rows": job.rows, "params": params,
        }))?;
        if let Some(t) = timeout
            && !self.answers_within(t)?
        {
            self.dump_stack_and_kill(t, job.rows);
            return Err(PyError::Timeout(t.as_secs()));
        }
        let done = self.recv()?;
        if done["op"] != "done" || done["id"] != id {
            return Err(PyError::Protocol(format!("expected done {id}, got {done}")));
        }
        let errors: Vec<Option<RowError>> = (done["errors"].as_array())
            .map(|a| a.iter().map(row_error).collect())
            .unwrap_or_default();
        if errors.len() != job.rows {
            return Err(PyError::Protocol(format!(
                "{} errors for {} rows",
                errors.len(),
                job.rows
            )));
        }
        Ok(errors)
    }

    /// A hung worker: say so, have it write every thread's Python stack to stderr (the
    /// log; `faulthandler` on SIGUSR1, registered by `hotpipe_worker`), give it a moment
    /// to, then kill it.
    fn dump_stack_and_kill(&mut self, waited: Duration, rows: usize) {
        tracing::warn!(
            pid = self.child.id(),
            rows,
            waited_s = waited.as_secs(),
            "model worker hung: no answer within batch_timeout_s; its Python stack follows, then it is killed"
        );
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: `kill` has no memory effects; the pid is our own child, not yet
            // waited for, so it cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            // faulthandler writes from the signal handler at once; this covers the
            // scheduling of a loaded machine.
            std::thread::sleep(STACK_DUMP_WAIT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn send(&mut self, msg: &Value) -> Result<(), PyError> {
        let body = serde_json::to_vec(msg).map_err(|e| PyError::Protocol(e.to_string()))?;
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend(body);
        if self
            .to
            .write_all(&frame)
            .and_then(|()| self.to.flush())
            .is_err()
        {
            return Err(self.died());
        }
        Ok(())
    }

    /// Whether the worker's reply starts within `t` (a frame is written whole, so its
    /// first byte means the rest follows at once).
    fn answers_within(&mut self, t: Duration) -> Result<bool, PyError> {
        if !self.from.buffer().is_empty() {
            return Ok(true);
        }
        let deadline = Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(self.from.get_ref(), PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(0) => return Ok(false),
                // Readable, or closed (HUP): `recv` reads it, or reports the death.
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(PyError::Protocol(format!("poll: {e}"))),
            }
        }
    }

    fn recv(&mut self) -> Result<Value, PyError> {
        let mut len = [0u8; 4];
        if self.from.read_exact(&mut len).is_err() {
            return Err(self.died());
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(PyError::Protocol(format!("a frame of {n} bytes")));
        }
        let mut body = vec![0u8; n];
        if self.from.read_exact(&mut body).is_err() {
            return Err(self.died());
        }
        serde_json::from_slice(&body).map_err(|e| PyError::Protocol(e.to_string()))
    }

    /// The worker closed its pipe: wait for it and say how it ended.
    fn died(&mut self) -> PyError {
        match self.child.wait() {
            Ok(st) => match st.signal() {
                Some(sig) => PyError::Died(format!("signal {sig}")),
                None => PyError::Died(format!("exit status {}", st.code().unwrap_or(-1))),
            },
            Err(e) => PyError::Died(e.to_string()),
        }
    }
}

/// `hotpipe_worker`'s folder first, then the `PYTHONPATH` hotpipe was given (where a
/// pipeline's own modules may be).
fn python_path(module_dir: &std::path::Path) -> std::ffi::OsString {
    let mut p = module_dir.as_os_str().to_owned();
    if let Some(rest) = std::env::var_os("PYTHONPATH").filter(|v| !v.is_empty()) {
        p.push(":");
        p.push(rest);
    }
    p
}

/// Spawn `cmd` from one thread that lives as long as the process: `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked a child ends, so a worker started by a thread that
/// ends earlier (a config reload's, a test's) would be killed with it.
/// The worker's stderr (its prints, Python's warnings and tracebacks, a hung worker's
/// stack) into hotpipe's log, a line an event, so they are found beside what hotpipe says
/// of the worker and carry its device. The thread ends when the worker does.
fn relay_stderr(err: std::process::ChildStderr, pid: u32, device: &str) {
    let device = device.to_string();
    let relay = move || {
        for line in std::io::BufRead::lines(BufReader::new(err)) {
            let Ok(line) = line else { break };
            tracing::info!(target: "hotpipe::worker", pid, device, "{}", printable(&line));
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("hp-py-stderr".into())
        .spawn(relay)
    {
        // The pipe's read end went with the closure: the worker's prints now fail
        // (EPIPE) rather than block it once the pipe is full.
        tracing::error!(error = %e, "cannot start the thread relaying a worker's stderr; its prints are lost");
    }
}

/// A worker's line with its control characters escaped (`\u{1b}`), so that what a
/// pipeline prints cannot colour, rewrite or forge the log's lines.
fn printable(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return line.into();
    }
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn spawn_kept(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Option<Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded::<Request>(0);
        std::thread::Builder::new()
            .name("hp-py-spawn".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(keeper) = keeper else {
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    if keeper.send((cmd, reply_tx)).is_err() {
        return Err(std::io::Error::other("the worker spawner thread is gone"));
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the worker spawner thread is gone")))
}

/// `null`, or `{"error": "...", "oom": bool}`.
fn row_error(v: &Value) -> Option<RowError> {
    let msg = v["error"].as_str()?.to_string();
    Some(if v["oom"].as_bool() == Some(true) {
        RowError::OutOfMemory(msg)
    } else {
        RowError::Raised(msg)
    })
}

impl Drop for PyWorker {
    /// Ask the worker to stop, and make sure it has.
    fn drop(&mut self) {
        let _ = self.send(&json!({"op": "stop"}));
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
