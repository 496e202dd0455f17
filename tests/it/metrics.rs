//! `/metrics` of `hotpipe run`, read as a monitoring system reads it: the exposition is
//! parsed by the reference parsers of the official Python client (`prometheus_client`'s
//! strict OpenMetrics parser, and its Prometheus text 0.0.4 parser), not by a format check
//! of our own; the values are checked against the work the daemon really did, across a
//! SIGHUP reload too; and the endpoint stays well-behaved when the process is out of file
//! descriptors.
//!
//! Needs the venv's Python (`HOTPIPE_PYTHON`, scripts/env.sh) with `prometheus_client`;
//! under scripts/test.sh a missing one fails the test (see [`crate::common::skip`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;

use std::time::{Duration, Instant};

use crate::common::*;

/// One sample as the parser reports it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family as the parser reports it.
#[derive(Debug, serde::Deserialize)]
pub struct Family {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub unit: String,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug)]
pub struct Exposition(pub Vec<Family>);

impl Exposition {
    /// The value of the sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.sample(name, labels).map(|s| s.value)
    }

    /// The sample `name` whose labels include `labels`.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Sample> {
        self.0.iter().flat_map(|f| &f.samples).find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.0.iter().find(|f| f.name == name)
    }

    /// Every sample that must never go down: counters, and histograms' buckets, counts
    /// and sums (all durations and sizes here are non-negative).
    pub fn monotonic(&self) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|f| f.kind == "counter" || f.kind == "histogram")
            .flat_map(|f| &f.samples)
            .collect()
    }
}

/// Reads the exposition on stdin with `prometheus_client`'s parser and prints its
/// families as JSON. The parsers are lazy: iterating them all is what validates.
const PARSER: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = [
    {"name": f.name, "type": f.type, "unit": f.unit,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
json.dump(out, sys.stdout)
"#;

/// Parse an exposition (OpenMetrics, or Prometheus text 0.0.4) with the reference parser;
/// panics with the parser's complaint when it does not parse. `None` (after [`skip`])
/// when the parser is not installed here.
pub fn parse(body: &str, openmetrics: bool) -> Option<Exposition> {
    let Some(py) = python() else {
        skip("needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return None;
    };
    let probe = std::process::Command::new(&py)
        .args(["-c", "import prometheus_client"])
        .output()
        .unwrap();
    if !probe.status.success() {
        skip("needs prometheus_client in the venv (scripts/setup.sh installs it)");
        return None;
    }
    let format = if openmetrics { "openmetrics" } else { "text" };
    let mut child = std::process::Command::new(&py)
        .args(["-c", PARSER, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser rejects the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(Exposition(serde_json::from_slice(&out.stdout).unwrap()))
}

/// A response: status code, head, body.
pub struct Response {
    pub code: u16,
    pub head: String,
    pub body: String,
}

/// GET `path`, asking for OpenMetrics (with the `Accept` Prometheus sends) or not (as
/// curl does).
pub fn get(addr: &str, path: &str, openmetrics: bool) -> Response {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = if openmetrics {
        "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n"
    } else {
        ""
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut std::net::TcpStream) -> Response {
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Response {
        code,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Scrape and parse `/metrics` in one format; `None` when the parser is not here.
pub fn scrape(addr: &str, openmetrics: bool) -> Option<Exposition> {
    let r = get(addr, "/metrics", openmetrics);
    assert_eq!(r.code, 200, "{}", r.head);
    parse(&r.body, openmetrics)
}

/// `hotpipe run` on a hot folder at `dir/hf` (no model, 64x64 JPEG outputs, metrics on
/// a free port), started and ready.
pub fn start(dir: &Path) -> Daemon {
    let cfg = write(
        &dir.join("p.toml"),
        "[preprocess]\nsize = 64\n\n[encode]\nformat = \"jpeg\"\n\n[pipeline]\ndecode_threads = 1\nfit_threads = 1\nencode_threads = 2\nchannel_capacity = 4\n\n[hotfolder]\nroot = \"hf\"\nsettle_ms = 0\nretry_s = 1\nshutdown_grace_s = 5\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let d = Daemon::start(&cfg, &[]);
    d.expect_log("hot folder ready", Duration::from_secs(30));
    d
}

/// Wait until the sample line `line` (e.g. `hotpipe_files_done_total 3`) is exposed: an
/// input reaches done/ inside the sink a moment before its outcome is counted.
pub fn wait_line(addr: &str, line: &str) {
    let needle = format!("\n{line}\n");
    assert!(
        wait_until(Duration::from_secs(30), || get(addr, "/metrics", false)
            .body
            .contains(&needle)),
        "never `{line}`"
    );
}

/// Both formats parse; each counter says what the daemon did (N good files, one broken);
/// the build is identified; query strings are ignored; each format has its content type.
#[test]
fn exposition_parses_and_counts_the_work_done() {
    let d = tempfile::tempdir().unwrap();
    let daemon = start(d.path());
    let addr = daemon.metrics_addr();
    const N: usize = 5;
    for i in 0..N {
        deliver(
            &d.path().join("hf"),
            &format!("ok{i}.jpg"),
            &jpeg_bytes(i as u32),
        );
    }
    deliver(
        &d.path().join("hf"),
        "broken.jpg",
        b"\xff\xd8 not a jpeg at all",
    );
    wait_line(&addr, &format!("hotpipe_files_done_total {N}"));
    wait_line(&addr, "hotpipe_files_failed_total 1");

    let om = get(&addr, "/metrics", true);
    assert!(
        om.head
            .contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{}",
        om.head
    );
    assert!(om.body.ends_with("# EOF\n"));
    let plain = get(&addr, "/metrics?x=1", false);
    assert_eq!(plain.code, 200, "a query string is ignored");
    assert!(
        plain
            .head
            .contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        plain.head
    );
    let Some(m) = parse(&om.body, true) else {
        return;
    };
    let t = parse(&plain.body, false).unwrap();
    let n = N as f64;
    for e in [&m, &t] {
        assert_eq!(e.value("hotpipe_files_claimed_total", &[]), Some(n + 1.0));
        assert_eq!(e.value("hotpipe_files_done_total", &[]), Some(n));
        assert_eq!(e.value("hotpipe_files_failed_total", &[]), Some(1.0));
        assert_eq!(e.value("hotpipe_files_retried_total", &[]), Some(0.0));
        assert_eq!(e.value("hotpipe_items_in_flight", &[]), Some(0.0));
        assert_eq!(e.value("hotpipe_items_waiting_retry", &[]), Some(0.0));
        assert_eq!(e.value("hotpipe_healthy", &[]), Some(1.0));
        // Decode worked on every file, the broken one included, and failed that one.
        let decode = [("stage", "decode")];
        assert_eq!(e.value("hotpipe_stage_items_total", &decode), Some(n + 1.0));
        assert_eq!(e.value("hotpipe_stage_failed_total", &decode), Some(1.0));
        assert_eq!(
            e.value("hotpipe_stage_seconds_count", &decode),
            Some(n + 1.0)
        );
        let inf = [("stage", "decode"), ("le", "+Inf")];
        assert_eq!(e.value("hotpipe_stage_seconds_bucket", &inf), Some(n + 1.0));
        assert!(e.value("hotpipe_stage_seconds_sum", &decode).unwrap() > 0.0);
        let publish = [("stage", "publish")];
        assert_eq!(e.value("hotpipe_stage_items_total", &publish), Some(n));
        // The identity model still batches: every good file went through inference.
        assert_eq!(e.value("hotpipe_batch_size_sum", &[]), Some(n));
        assert!(e.value("hotpipe_batch_size_count", &[]).unwrap() >= 1.0);
        let build = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(e.value("hotpipe_build_info", &build), Some(1.0));
        let torch = &e.sample("hotpipe_build_info", &[]).unwrap().labels["torch"];
        assert!(torch.starts_with("2.") || torch == "unknown", "{torch}");
        // A CPU pipeline reports no device memory.
        assert!(e.sample("hotpipe_device_memory_free_bytes", &[]).is_none());
        assert!(e.sample("hotpipe_device_memory_size_bytes", &[]).is_none());
    }
    // What OpenMetrics adds: units, and build_info as an info family.
    assert_eq!(m.family("hotpipe_stage_seconds").unwrap().unit, "seconds");
    assert_eq!(m.family("hotpipe_build").unwrap().kind, "info");
    assert_eq!(m.family("hotpipe_files_done").unwrap().kind, "counter");

    let h = get(&addr, "/healthz?y", false);
    assert_eq!(h.code, 200, "{}", h.body);
    assert_eq!(get(&addr, "/nope?x", false).code, 404);
    assert_eq!(daemon.stop().0, Some(0));
}

/// Every monotonic sample of `a` is in `b` and not lower.
fn not_down(a: &Exposition, b: &Exposition) {
    let samples = a.monotonic();
    assert!(samples.len() > 50, "{samples:?}");
    for s in samples {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let now = b.value(&s.name, &labels);
        assert!(
            now.is_some_and(|v| v >= s.value),
            "{} {:?} went from {} to {now:?}",
            s.name,
            s.labels,
            s.value
        );
    }
}

/// A SIGHUP starts a new pipeline with new telemetry: the exported counters go on from
/// where they were (Prometheus would read a drop as a counter reset and `increase()`
/// would count the whole history again).
#[test]
fn counters_survive_a_reload() {
    let d = tempfile::tempdir().unwrap();
    let daemon = start(d.path());
    let addr = daemon.metrics_addr();
    for i in 0..3 {
        deliver(&d.path().join("hf"), &format!("a{i}.jpg"), &jpeg_bytes(i));
    }
    wait_line(&addr, "hotpipe_files_done_total 3");
    let Some(before) = scrape(&addr, true) else {
        return;
    };
    unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    daemon.expect_log("config reloaded", Duration::from_secs(30));
    daemon.expect_count("hot folder ready", 2);
    let after_reload = scrape(&addr, true).unwrap();
    not_down(&before, &after_reload);
    let decode = [("stage", "decode")];
    assert_eq!(
        after_reload.value("hotpipe_stage_items_total", &decode),
        Some(3.0)
    );
    for i in 3..5 {
        deliver(&d.path().join("hf"), &format!("a{i}.jpg"), &jpeg_bytes(i));
    }
    wait_line(&addr, "hotpipe_files_done_total 5");
    let after = scrape(&addr, true).unwrap();
    not_down(&after_reload, &after);
    // The old pipeline's 3 and the new one's 2.
    assert_eq!(after.value("hotpipe_stage_items_total", &decode), Some(5.0));
    assert_eq!(
        after.value("hotpipe_stage_seconds_count", &decode),
        Some(5.0)
    );
    assert_eq!(after.value("hotpipe_batch_size_sum", &[]), Some(5.0));
    assert_eq!(daemon.stop().0, Some(0));
}

/// CPU time (user + system, in clock ticks) of the daemon's thread named `name`.
fn thread_ticks(pid: i32, name: &str) -> u64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        if std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(t.join("stat")).unwrap();
            // After `(comm)` come fields 3 (state) on: utime and stime are fields 14, 15.
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            return rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread {name} in {pid}");
}

/// The lowest file descriptor number the process has not installed: with the soft limit
/// set to it, a new descriptor fails with EMFILE.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// Set `pid`'s soft RLIMIT_NOFILE (the hard one kept); the limits it had.
fn set_nofile(pid: i32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) },
        0
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    old
}

/// Out of file descriptors, `accept` fails at once, a connection waiting or not (Linux
/// takes the descriptor before it waits): the endpoint backs off instead of spinning, says
/// so once, and answers again when descriptors are back.
#[test]
fn accept_errors_back_off_and_recover() {
    let d = tempfile::tempdir().unwrap();
    let daemon = start(d.path());
    let addr = daemon.metrics_addr();
    let pid = daemon.pid();
    assert_eq!(get(&addr, "/healthz", false).code, 200);
    let old = set_nofile(pid, lowest_free_fd(pid));
    // The `accept` already waiting holds the lowest free descriptor (not yet in
    // /proc/PID/fd), so this first connection may still be answered; the next `accept`
    // then has no descriptor. Either way the response is read once the limit is back.
    let mut kick = std::net::TcpStream::connect(&addr).unwrap();
    write!(kick, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    daemon.expect_log(
        "metrics endpoint cannot accept connections",
        Duration::from_secs(30),
    );
    let t0 = thread_ticks(pid, "hp-metrics");
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let spent = thread_ticks(pid, "hp-metrics") - t0;
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy = spent as f64 / ticks_per_s / start.elapsed().as_secs_f64();
    assert!(
        busy < 0.1,
        "the accept loop spins: {:.0}% of a core",
        busy * 100.0
    );
    assert_eq!(
        daemon
            .log()
            .matches("metrics endpoint cannot accept connections")
            .count(),
        1,
        "logged once per burst:\n{}",
        daemon.log()
    );
    set_nofile(pid, old.rlim_cur);
    kick.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(read_response(&mut kick).code, 200);
    let r = get(&addr, "/metrics", false);
    assert_eq!(r.code, 200, "{}", r.head);
    daemon.expect_log(
        "metrics endpoint accepts connections again",
        Duration::from_secs(30),
    );
    assert_eq!(daemon.stop().0, Some(0));
}
