//! `/metrics`, `/healthz` and the status page `/` ([`super::page`]) over a tiny HTTP/1.0
//! server on one thread: a scrape every
//! few seconds needs no async runtime, and a server that answers one request at a time
//! with short timeouts and a fixed request buffer cannot be made to hold memory or
//! threads per connection. Loopback by default (`[metrics] listen`).
//!
//! The exposition is written by the official client, `prometheus-client`. The values
//! already live in atomics ([`Shared`]'s file counters, the pipelines' [`Telemetry`]), so
//! a custom [`Collector`] reads them at scrape time rather than mirroring each into a
//! client-side `Counter`: no second copy to keep in step, and the hot path is unchanged.
//! The stage counters are the retired pipelines' totals (`Shared::retired`, folded in at
//! each reload) plus the live pipeline's, so they never go back at a SIGHUP.
//!
//! Format: OpenMetrics 1.0 when the scraper's `Accept` asks for it (Prometheus does), else
//! the Prometheus text format 0.0.4 (curl, a browser, older scrapers), as the Go and
//! Python clients negotiate. Both encoders are prometheus-client's and their sample lines
//! are the same; OpenMetrics adds the units (`# UNIT`), the `info` type of
//! `hotpipe_build_info` and the `# EOF` that tells a truncated scrape from a whole one.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::Shared;
use crate::vocab::error::Stage;
use crate::vocab::telemetry::{BUCKETS, ModelWorkerStats, STAGES, StageStats, Telemetry};

/// `Content-Type` of an OpenMetrics 1.0 text exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long to wait before accepting again after `accept` failed (out of file descriptors,
/// typically): long enough not to spin, short enough that a scrape barely notices.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bind and serve on a background thread; returns the bound address (port 0 resolved).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let server = Server {
        registry: registry(Arc::clone(&shared)),
        shared,
    };
    std::thread::Builder::new()
        .name("hp-metrics".into())
        .spawn(move || server.run(&listener))?;
    Ok(local)
}

/// The registry: the build's info, and the collector that reads the daemon's atomics.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::with_prefix("hotpipe");
    r.register(
        "build",
        "The running build: hotpipe's version and the libtorch it loaded",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("torch", torch_version()),
        ]),
    );
    r.register_collector(Box::new(Scrape(shared)));
    r
}

/// The exposition of `registry`, in OpenMetrics or in Prometheus text 0.0.4.
pub fn render(registry: &Registry, openmetrics: bool) -> Result<String, fmt::Error> {
    let mut body = String::new();
    if openmetrics {
        text::encode(&mut body, registry)?;
    } else {
        prometheus_text::encode(&mut body, registry)?;
    }
    Ok(body)
}

/// What the server needs to answer: the registry for /metrics, the health for /healthz.
struct Server {
    registry: Registry,
    shared: Arc<Shared>,
}

impl Server {
    /// Accept and answer connections one at a time, forever.
    fn run(&self, listener: &TcpListener) {
        let mut failing = false;
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("metrics endpoint accepts connections again");
                    }
                    self.answer(conn);
                }
                Err(e) => {
                    // EMFILE and the like persist until something closes a descriptor:
                    // retrying at once would spin a core and flood the log.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "metrics endpoint cannot accept connections; retrying every 100 ms");
                    }
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn answer(&self, mut s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 2048];
        let req = Request::parse(read_head(&mut s, &mut buf));
        let mut extra = String::new();
        let (status, ctype, body) = match req.path {
            "/" => {
                // Its policy (nothing loads or runs from anywhere), and no caching of
                // figures that change every second.
                extra = format!(
                    "Content-Security-Policy: {}\r\nCache-Control: no-store\r\n",
                    super::page::CSP
                );
                (
                    "200 OK",
                    "text/html; charset=utf-8",
                    super::page::render(&self.shared),
                )
            }
            "/metrics" => {
                let ctype = if req.openmetrics {
                    OPENMETRICS
                } else {
                    prometheus_text::CONTENT_TYPE
                };
                match render(&self.registry, req.openmetrics) {
                    Ok(body) => ("200 OK", ctype, body),
                    Err(_) => error("cannot encode the metrics"),
                }
            }
            "/healthz" => match self.shared.status() {
                Ok(msg) => ("200 OK", "text/plain", format!("ok: {msg}\n")),
                Err(msg) => ("503 Service Unavailable", "text/plain", format!("{msg}\n")),
            },
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        };
        let head = format!(
            "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        );
        let _ = s
            .write_all(head.as_bytes())
            .and_then(|()| s.write_all(body.as_bytes()));
    }
}

fn error(msg: &str) -> (&'static str, &'static str, String) {
    (
        "500 Internal Server Error",
        "text/plain",
        format!("{msg}\n"),
    )
}

/// Read the request head into `buf` (what fits; the request line and `Accept` are all we
/// need), stopping at the blank line that ends the headers.
fn read_head<'b>(s: &mut TcpStream, buf: &'b mut [u8]) -> &'b str {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            // A signal landed on this thread (signal-hook's handlers may run on any);
            // a socket read with a timeout is not restarted by SA_RESTART.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].ends_with(b"\n\n") {
            break;
        }
    }
    match std::str::from_utf8(&buf[..n]) {
        Ok(s) => s,
        // A head cut inside a multi-byte character: keep the part before it.
        Err(e) => std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// The parts of a request the server looks at.
#[derive(Debug, PartialEq)]
struct Request<'a> {
    /// The target without its query string or fragment.
    path: &'a str,
    /// The client accepts OpenMetrics text.
    openmetrics: bool,
}

impl<'a> Request<'a> {
    fn parse(head: &'a str) -> Request<'a> {
        let mut lines = head.lines();
        let target = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/");
        let path = target.split(['?', '#']).next().unwrap_or(target);
        let openmetrics = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("accept")
                    && v.to_ascii_lowercase()
                        .contains("application/openmetrics-text")
            })
        });
        Request { path, openmetrics }
    }
}

/// The version of the libtorch this process loaded, as the PyTorch wheel beside it
/// (`torch/version.py`) or the libtorch archive (`build-version`) names it, with its
/// build variant (e.g. `2.11.0+cu130`); "unknown" when neither is found. Read once.
fn torch_version() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.find('/').map(|i| &l[i..]))
        .find(|p| p.ends_with("/libtorch_cpu.so"));
    let Some(root) = lib.and_then(|p| Path::new(p).parent()?.parent()) else {
        return "unknown".into();
    };
    let from_wheel = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("__version__"))?;
            Some(line.split(['\'', '"']).nth(1)?.to_string())
        });
    from_wheel
        .or_else(|| {
            std::fs::read_to_string(root.join("build-version"))
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Reads the daemon's atomics at each scrape.
struct Scrape(Arc<Shared>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let shared = &*self.0;
        // Before taking the telemetry lock: `health` takes it too.
        daemon_series(&mut enc, shared)?;
        {
            // The hand-over at a reload folds the old pipeline into `retired` under this
            // lock, so a scrape counts each item once, never twice or not at all.
            let live = shared.telemetry.lock().unwrap_or_else(|p| p.into_inner());
            let tel = Totals {
                retired: &shared.retired,
                live: &live,
            };
            stage_seconds(&mut enc, &tel)?;
            stage_series(&mut enc, &tel)?;
            batch_size(&mut enc, &tel)?;
            model_workers(&mut enc, &tel)?;
        }
        device_memory(&mut enc, &shared.cuda_devices())
    }
}

/// Retired pipelines' counters plus the live one's.
struct Totals<'a> {
    retired: &'a Telemetry,
    live: &'a Telemetry,
}

impl Totals<'_> {
    fn sum(&self, field: impl Fn(&Telemetry) -> &AtomicU64) -> u64 {
        field(self.retired).load(Ordering::Relaxed) + field(self.live).load(Ordering::Relaxed)
    }

    fn stage(&self, st: Stage, field: impl Fn(&StageStats) -> &AtomicU64) -> u64 {
        self.sum(|t| field(t.stage(st)))
    }
}

/// One family of a single unlabelled counter (`name` without `_total`: the encoder adds it).
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One family of a single unlabelled gauge.
fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// The daemon's own file counters, items in flight and health.
fn daemon_series(enc: &mut DescriptorEncoder, shared: &Shared) -> fmt::Result {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        enc,
        "files_claimed",
        "Files claimed from inbox/.",
        load(&shared.claimed),
    )?;
    counter(
        enc,
        "files_done",
        "Files whose output was published.",
        load(&shared.done),
    )?;
    counter(
        enc,
        "files_failed",
        "Files moved to failed/.",
        load(&shared.failed),
    )?;
    counter(
        enc,
        "files_retried",
        "Transient failures left in work/ for a retry.",
        load(&shared.retried),
    )?;
    gauge(
        enc,
        "items_in_flight",
        "Items handed to the pipeline and not finished.",
        shared.in_flight.load(Ordering::Relaxed).max(0) as u64,
    )?;
    gauge(
        enc,
        "items_waiting_retry",
        "Items in work/ waiting for a retry after a transient failure (outbox full or unwritable, device out of memory); /healthz says why.",
        shared.retries().0,
    )?;
    gauge(
        enc,
        "healthy",
        "1 when progressing or idle, 0 when a stage is stuck.",
        u64::from(shared.health().is_ok()),
    )
}

/// One family with a sample per stage, labelled `stage`; `sample` encodes a stage's value
/// (or nothing, to leave the stage out).
fn per_stage(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    mut sample: impl FnMut(Stage, MetricEncoder<'_>) -> fmt::Result,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, ty)?;
    for &st in &STAGES {
        let labels = [("stage", st.as_str())];
        sample(st, family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The per-stage busy-time histogram.
fn stage_seconds(enc: &mut DescriptorEncoder, tel: &Totals) -> fmt::Result {
    per_stage(
        enc,
        "stage",
        "Busy time per item (or batch) in each stage.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
        |st, mut m| {
            // Per-bucket counts (the encoder makes them cumulative); the last is +Inf.
            let mut buckets = [(f64::INFINITY, 0u64); BUCKETS.len() + 1];
            for (i, b) in buckets.iter_mut().enumerate() {
                b.0 = BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
                b.1 = tel.stage(st, |s| &s.hist[i]);
            }
            let count = buckets.iter().map(|b| b.1).sum();
            let sum = tel.stage(st, |s| &s.busy_ns) as f64 / 1e9;
            m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
        },
    )
}

/// Items finished and failed per stage, and the stages' input queues.
fn stage_series(enc: &mut DescriptorEncoder, tel: &Totals) -> fmt::Result {
    per_stage(
        enc,
        "stage_items",
        "Items each stage worked on, those it failed included.",
        None,
        MetricType::Counter,
        |st, m| ConstCounter::new(tel.stage(st, |s| &s.items)).encode(m),
    )?;
    per_stage(
        enc,
        "stage_failed",
        "Items each stage failed.",
        None,
        MetricType::Counter,
        |st, m| ConstCounter::new(tel.stage(st, |s| &s.failed)).encode(m),
    )?;
    // Queues are the live pipeline's (gauges), and only stages with an input queue
    // (sampled at least once) have them.
    let queue = |st: Stage, m: MetricEncoder<'_>, v: fn(&StageStats) -> &AtomicU64| {
        let s = tel.live.stage(st);
        if s.queue_samples.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        ConstGauge::new(v(s).load(Ordering::Relaxed)).encode(m)
    };
    per_stage(
        enc,
        "queue_depth",
        "Items waiting in each stage's input queue.",
        None,
        MetricType::Gauge,
        |st, m| queue(st, m, |s| &s.queue_now),
    )?;
    per_stage(
        enc,
        "queue_capacity",
        "Capacity of each stage's input queue.",
        None,
        MetricType::Gauge,
        |st, m| queue(st, m, |s| &s.queue_capacity),
    )
}

/// The histogram of rows per inference batch.
fn batch_size(enc: &mut DescriptorEncoder, tel: &Totals) -> fmt::Result {
    // batch_hist[b] counts batches of 2^b to 2^(b+1)-1 rows (the last bucket: 128 and up).
    let mut buckets = [(f64::INFINITY, 0u64); 8];
    for (b, slot) in buckets.iter_mut().enumerate() {
        if b < 7 {
            slot.0 = ((1u64 << (b + 1)) - 1) as f64;
        }
        slot.1 = tel.sum(|t| &t.batch_hist[b]);
    }
    enc.encode_descriptor(
        "batch_size",
        "Rows per inference batch.",
        None,
        MetricType::Histogram,
    )?
    .encode_histogram::<NoLabelSet>(
        tel.sum(|t| &t.batch_rows) as f64,
        tel.sum(|t| &t.batches),
        &buckets,
        None,
    )
}

type WorkerField = fn(&ModelWorkerStats) -> &AtomicU64;

/// A Python pipeline's worker processes, labelled `worker` (their order in
/// `model.device`): restarts, busy time and failed images (counters over reloads), and
/// whether each is running now. Nothing for a TorchScript model, which has no workers.
fn model_workers(enc: &mut DescriptorEncoder, tel: &Totals) -> fmt::Result {
    let (live, retired) = (tel.live.model_workers(), tel.retired.model_workers());
    if live.is_empty() {
        return Ok(());
    }
    let labels: Vec<String> = (0..live.len()).map(|i| i.to_string()).collect();
    let sum = |i: usize, f: WorkerField| {
        let old = retired.get(i).map_or(0, |r| f(r).load(Ordering::Relaxed));
        old + f(&live[i]).load(Ordering::Relaxed)
    };
    let counters: [(&str, &str, WorkerField); 3] = [
        (
            "model_worker_restarts",
            "Model worker processes started again after dying or overrunning batch_timeout_s.",
            |s| &s.restarts,
        ),
        (
            "model_worker_batches",
            "Batches (or parts of batches run again) sent to each model worker.",
            |s| &s.batches,
        ),
        (
            "model_worker_failed_items",
            "Images a model worker failed (the pipeline raised, or the image took the worker down).",
            |s| &s.failed_items,
        ),
    ];
    for (name, help, f) in counters {
        let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, l) in labels.iter().enumerate() {
            ConstCounter::new(sum(i, f))
                .encode(family.encode_family(&[("worker", l.as_str())])?)?;
        }
    }
    let mut busy = enc.encode_descriptor(
        "model_worker_busy",
        "Time each model worker spent on batches.",
        Some(&Unit::Seconds),
        MetricType::Counter,
    )?;
    for (i, l) in labels.iter().enumerate() {
        let secs = sum(i, |s| &s.busy_ns) as f64 / 1e9;
        ConstCounter::new(secs).encode(busy.encode_family(&[("worker", l.as_str())])?)?;
    }
    let mut up = enc.encode_descriptor(
        "model_worker_up",
        "1 while the model worker process is running.",
        None,
        MetricType::Gauge,
    )?;
    for (i, l) in labels.iter().enumerate() {
        let alive = live[i].alive.load(Ordering::Relaxed);
        ConstGauge::new(u64::from(alive)).encode(up.encode_family(&[("worker", l.as_str())])?)?;
    }
    Ok(())
}

/// Free and total memory of the CUDA devices the pipeline runs on, from libtorch's
/// allocator (as the driver reports them): two gauges, since a sum or mean over one
/// mixing both would mean nothing. A CPU pipeline has neither.
fn device_memory(enc: &mut DescriptorEncoder, devices: &[usize]) -> fmt::Result {
    let mem: Vec<(String, usize, usize)> = devices
        .iter()
        .filter_map(|&i| {
            let (free, total) = crate::runtime::cuda::mem_info(i).ok()?;
            Some((format!("cuda:{i}"), free, total))
        })
        .collect();
    if mem.is_empty() {
        return Ok(());
    }
    for (name, help, pick) in [
        (
            "device_memory_free",
            "Free memory of each CUDA device the pipeline uses.",
            (|m| m.1) as fn(&(String, usize, usize)) -> usize,
        ),
        (
            "device_memory_size",
            "Total memory of each CUDA device the pipeline uses.",
            |m| m.2,
        ),
    ] {
        let mut family =
            enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
        for m in &mem {
            let labels = [("device", m.0.as_str())];
            ConstGauge::new(pick(m)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ignores_query_and_reads_accept() {
        let r = Request::parse("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            r,
            Request {
                path: "/metrics",
                openmetrics: false
            }
        );
        let r = Request::parse(
            "GET /healthz?y HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        );
        assert_eq!(
            r,
            Request {
                path: "/healthz",
                openmetrics: true
            }
        );
        assert_eq!(Request::parse("").path, "/");
    }

    #[test]
    fn counters_add_retired_and_live_telemetry() {
        let shared = Arc::new(Shared::new(60));
        shared
            .retired
            .record(Stage::Decode, Duration::from_millis(3), 2);
        shared
            .telemetry()
            .record(Stage::Decode, Duration::from_millis(30), 1);
        shared.telemetry().batch(3);
        let reg = registry(Arc::clone(&shared));
        let om = render(&reg, true).unwrap();
        for line in [
            "# TYPE hotpipe_files_claimed counter\n",
            "hotpipe_files_claimed_total 0\n",
            "hotpipe_stage_items_total{stage=\"decode\"} 3\n",
            // OpenMetrics writes `le` first; label order carries no meaning.
            "hotpipe_stage_seconds_bucket{le=\"+Inf\",stage=\"decode\"} 2\n",
            "hotpipe_stage_seconds_bucket{le=\"0.005\",stage=\"decode\"} 1\n",
            "hotpipe_stage_seconds_count{stage=\"decode\"} 2\n",
            "# UNIT hotpipe_stage_seconds seconds\n",
            "hotpipe_batch_size_bucket{le=\"3.0\"} 1\n",
            "hotpipe_batch_size_count 1\n",
            "# TYPE hotpipe_build info\n",
            "hotpipe_healthy 1\n",
        ] {
            assert!(om.contains(line), "{line} in\n{om}");
        }
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("hotpipe_build_info{version=\""), "{om}");
        let plain = render(&reg, false).unwrap();
        assert!(plain.contains("# TYPE hotpipe_files_claimed_total counter\n"));
        assert!(plain.contains("hotpipe_stage_items_total{stage=\"decode\"} 3\n"));
        assert!(plain.contains("hotpipe_stage_seconds_bucket{stage=\"decode\",le=\"+Inf\"} 2\n"));
        assert!(plain.contains("# TYPE hotpipe_build_info gauge\n"));
        assert!(!plain.contains("# EOF"));
    }
}
