//! `/metrics` (Prometheus text format) and `/healthz` over a tiny HTTP/1.0 server on one
//! thread: a scrape every few seconds needs no async runtime, and a server that answers
//! one request at a time with short timeouts cannot be made to hold memory or threads.
//! Loopback by default (`[metrics] listen`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;
use crate::vocab::telemetry::{BUCKETS, STAGES, StageStats, Telemetry};

/// Bind and serve on a background thread; returns the bound address (port 0 resolved).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("hp-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let mut n = 0;
                // The request line is all we need; stop at the end of the headers.
                while n < buf.len() {
                    match s.read(&mut buf[n..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].ends_with(b"\n\n") {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(&shared)),
                    "/healthz" => match shared.status() {
                        Ok(msg) => ("200 OK", "text/plain", format!("ok: {msg}\n")),
                        Err(msg) => ("503 Service Unavailable", "text/plain", format!("{msg}\n")),
                    },
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(local)
}

/// The Prometheus exposition of the daemon's counters and the current pipeline's
/// telemetry.
pub fn render(shared: &Shared) -> String {
    let mut o = String::new();
    daemon_series(&mut o, shared);
    let tel = shared.telemetry();
    stage_seconds(&mut o, &tel);
    stage_series(&mut o, &tel);
    batch_size(&mut o, &tel);
    device_memory(&mut o, &shared.cuda_devices());
    o
}

/// One metric family of a single unlabelled sample.
fn single(o: &mut String, name: &str, help: &str, kind: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
}

/// The daemon's own file counters, items in flight and health.
fn daemon_series(o: &mut String, shared: &Shared) {
    single(
        o,
        "hotpipe_files_claimed_total",
        "Files claimed from inbox/.",
        "counter",
        shared.claimed.load(Ordering::Relaxed),
    );
    single(
        o,
        "hotpipe_files_done_total",
        "Files whose output was published.",
        "counter",
        shared.done.load(Ordering::Relaxed),
    );
    single(
        o,
        "hotpipe_files_failed_total",
        "Files moved to failed/.",
        "counter",
        shared.failed.load(Ordering::Relaxed),
    );
    single(
        o,
        "hotpipe_files_retried_total",
        "Transient failures left in work/ for a retry.",
        "counter",
        shared.retried.load(Ordering::Relaxed),
    );
    single(
        o,
        "hotpipe_items_in_flight",
        "Items handed to the pipeline and not finished.",
        "gauge",
        shared.in_flight.load(Ordering::Relaxed).max(0) as u64,
    );
    single(
        o,
        "hotpipe_items_waiting_retry",
        "Items in work/ waiting for a retry after a transient failure (outbox full or unwritable, device out of memory); /healthz says why.",
        "gauge",
        shared.retries().0,
    );
    single(
        o,
        "hotpipe_healthy",
        "1 when progressing or idle, 0 when a stage is stuck.",
        "gauge",
        u64::from(shared.health().is_ok()),
    );
}

/// The per-stage busy-time histogram (cumulative buckets, as Prometheus wants them).
fn stage_seconds(o: &mut String, tel: &Telemetry) {
    let _ = writeln!(
        o,
        "# HELP hotpipe_stage_seconds Busy time per item (or batch) in each stage.\n# TYPE hotpipe_stage_seconds histogram"
    );
    for &st in &STAGES {
        let s = tel.stage(st);
        let mut cum = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cum += s.hist[i].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "hotpipe_stage_seconds_bucket{{stage=\"{st}\",le=\"{le}\"}} {cum}"
            );
        }
        cum += s.hist[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "hotpipe_stage_seconds_bucket{{stage=\"{st}\",le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            o,
            "hotpipe_stage_seconds_sum{{stage=\"{st}\"}} {}",
            s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(o, "hotpipe_stage_seconds_count{{stage=\"{st}\"}} {cum}");
    }
}

/// One family with a sample per stage; stages for which `value` is `None` are left out.
fn stage_family(
    o: &mut String,
    tel: &Telemetry,
    name: &str,
    help: &str,
    kind: &str,
    value: impl Fn(&StageStats) -> Option<u64>,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for &st in &STAGES {
        if let Some(v) = value(tel.stage(st)) {
            let _ = writeln!(o, "{name}{{stage=\"{st}\"}} {v}");
        }
    }
}

/// Items finished and failed per stage, and the stages' input queues.
fn stage_series(o: &mut String, tel: &Telemetry) {
    stage_family(
        o,
        tel,
        "hotpipe_stage_items_total",
        "Items each stage finished.",
        "counter",
        |s| Some(s.items.load(Ordering::Relaxed)),
    );
    stage_family(
        o,
        tel,
        "hotpipe_stage_failed_total",
        "Items each stage failed.",
        "counter",
        |s| Some(s.failed.load(Ordering::Relaxed)),
    );
    // Only stages with an input queue (sampled at least once) have these two.
    let sampled = |s: &StageStats| s.queue_samples.load(Ordering::Relaxed) > 0;
    stage_family(
        o,
        tel,
        "hotpipe_queue_depth",
        "Items waiting in each stage's input queue.",
        "gauge",
        |s| sampled(s).then(|| s.queue_now.load(Ordering::Relaxed)),
    );
    stage_family(
        o,
        tel,
        "hotpipe_queue_capacity",
        "Capacity of each stage's input queue.",
        "gauge",
        |s| sampled(s).then(|| s.queue_capacity.load(Ordering::Relaxed)),
    );
}

/// The histogram of rows per inference batch.
fn batch_size(o: &mut String, tel: &Telemetry) {
    // batch_hist[b] counts batches of 2^b to 2^(b+1)-1 rows (the last bucket: 128 and up).
    let _ = writeln!(
        o,
        "# HELP hotpipe_batch_size Rows per inference batch.\n# TYPE hotpipe_batch_size histogram"
    );
    let mut cum = 0;
    for (b, n) in tel.batch_hist.iter().enumerate().take(7) {
        cum += n.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "hotpipe_batch_size_bucket{{le=\"{}\"}} {cum}",
            (1u64 << (b + 1)) - 1
        );
    }
    cum += tel.batch_hist[7].load(Ordering::Relaxed);
    let _ = writeln!(o, "hotpipe_batch_size_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(
        o,
        "hotpipe_batch_size_sum {}",
        tel.batch_rows.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "hotpipe_batch_size_count {}",
        tel.batches.load(Ordering::Relaxed)
    );
}

/// Device memory of the CUDA devices the pipeline runs on, from libtorch's allocator
/// (free and total as the driver reports them). A CPU pipeline has no series here.
fn device_memory(o: &mut String, devices: &[usize]) {
    if devices.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "# HELP hotpipe_device_memory_bytes Device memory, free and total."
    );
    let _ = writeln!(o, "# TYPE hotpipe_device_memory_bytes gauge");
    for &i in devices {
        if let Ok((free, total)) = crate::runtime::cuda::mem_info(i) {
            let _ = writeln!(
                o,
                "hotpipe_device_memory_bytes{{device=\"cuda:{i}\",kind=\"free\"}} {free}"
            );
            let _ = writeln!(
                o,
                "hotpipe_device_memory_bytes{{device=\"cuda:{i}\",kind=\"total\"}} {total}"
            );
        }
    }
}
