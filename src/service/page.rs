//! The status page at `/`: one self-contained HTML document for an operator who would
//! rather look than read metrics. State, model and devices, the counters, queue depths
//! per stage, outcomes per minute over the last hour, the last outcomes with latency and
//! the last failures with their reasons.
//!
//! No JavaScript at all: the chart is an inline SVG drawn here, and the page refreshes
//! itself every 5 s (`<meta http-equiv="refresh">`). With the response's
//! `Content-Security-Policy: default-src 'none'` nothing from elsewhere could load even if
//! a name tried. Every string from outside (file names, reasons) is HTML-escaped. Each
//! figure has an element id (`done`, `failed`, `queue-decode`, ...) so that a test, or a
//! script, can read it.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Shared;
use super::recent::{Outcome, Snapshot};
use crate::vocab::telemetry::STAGES;

/// The response's policy: inline styles only, nothing fetched, nothing run.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

/// `s` with `&`, `<`, `>`, `"` and `'` escaped, safe in text and in quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
.ok{color:#176f2c}.bad{color:#b00020}.figs span{font-weight:bold}h2{font-size:16px;margin-top:1.5em}";

/// The whole page.
pub fn render(shared: &Shared) -> String {
    let snap = shared.recent.snapshot();
    let mut h = String::with_capacity(16 << 10);
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
<title>hotpipe</title><style>{STYLE}</style></head><body><h1>hotpipe {}</h1>",
        env!("CARGO_PKG_VERSION")
    );
    summary(&mut h, shared, &snap);
    queues(&mut h, shared);
    h.push_str("<h2>Outcomes per minute, last hour</h2>");
    chart(&mut h, &snap.per_minute);
    h.push_str("<h2>Last outcomes</h2>");
    outcomes(&mut h, "outcomes", &snap.outcomes, "latency ms");
    h.push_str("<h2>Failed items</h2>");
    outcomes(&mut h, "failures", &snap.failures, "latency ms");
    h.push_str("</body></html>\n");
    h
}

fn summary(h: &mut String, shared: &Shared, snap: &Snapshot) {
    // A keyword, and why when it is not the phase itself ("stuck" and what is).
    let (state, why) = match shared.status() {
        Ok(_) => (snap.phase.as_str().to_string(), String::new()),
        Err(status) => state_and_reason(&status),
    };
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let _ = write!(
        h,
        "<p>State: <b id=\"state\">{}</b> <span id=\"state_reason\">{}</span></p><p>Model: <span id=\"model\">{}</span> on \
<span id=\"devices\">{}</span></p><p class=\"figs\">claimed <span id=\"claimed\">{}</span> · \
done <span id=\"done\">{}</span> · failed <span id=\"failed\">{}</span> · retried \
<span id=\"retried\">{}</span> · in flight <span id=\"in_flight\">{}</span></p>",
        escape(&state),
        escape(&why),
        escape(&snap.model),
        escape(&snap.devices),
        n(&shared.claimed),
        n(&shared.done),
        n(&shared.failed),
        n(&shared.retried),
        shared.in_flight.load(Ordering::Relaxed).max(0),
    );
}

/// An unhealthy status ("stuck: the infer stage ...") as its keyword and the rest, so the
/// page does not say the keyword twice.
fn state_and_reason(status: &str) -> (String, String) {
    match status.split_once(':') {
        Some((state, why)) => (state.trim().to_string(), why.trim().to_string()),
        None => (status.to_string(), String::new()),
    }
}

fn queues(h: &mut String, shared: &Shared) {
    let tel = shared.telemetry();
    h.push_str("<h2>Queues</h2><table><tr><th>stage</th><th>waiting</th><th>capacity</th><th>items</th></tr>");
    for stage in STAGES {
        let s = tel.stage(stage);
        let cap = s.queue_capacity.load(Ordering::Relaxed);
        if cap == 0 && s.items.load(Ordering::Relaxed) == 0 {
            continue; // a stage this job does not run (detect without a face crop)
        }
        let name = stage.as_str();
        let _ = write!(
            h,
            "<tr><td>{name}</td><td id=\"queue-{name}\">{}</td><td>{cap}</td><td>{}</td></tr>",
            s.queue_now.load(Ordering::Relaxed),
            s.items.load(Ordering::Relaxed),
        );
    }
    h.push_str("</table>");
}

/// Bars of outcomes per minute, oldest on the left, the current minute on the right.
fn chart(h: &mut String, per_minute: &[u64]) {
    const W: usize = 600;
    const H: usize = 120;
    let peak = per_minute.iter().copied().max().unwrap_or(0);
    let max = peak.max(1);
    let bar = W / per_minute.len().max(1);
    let _ = write!(
        h,
        "<svg id=\"chart\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\" role=\"img\" \
aria-label=\"outcomes per minute\"><rect width=\"{W}\" height=\"{H}\" fill=\"#f4f4f4\"/>",
        H + 16,
        H + 16
    );
    for (i, &n) in per_minute.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let bh = ((n as f64 / max as f64) * H as f64).ceil() as usize;
        let _ = write!(
            h,
            "<rect class=\"bar\" data-n=\"{n}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{bh}\" fill=\"#3b73b9\"><title>{n}</title></rect>",
            i * bar,
            H - bh,
            bar.saturating_sub(1).max(1),
        );
    }
    let right = if peak == 0 {
        "now · none yet".to_string()
    } else {
        format!("now · peak {peak}/min")
    };
    let _ = write!(
        h,
        "<text x=\"0\" y=\"{}\" font-size=\"11\">-60 min</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{right}</text></svg>",
        H + 13,
        W - 110,
        H + 13
    );
}

fn outcomes(h: &mut String, id: &str, list: &[Outcome], ms: &str) {
    if list.is_empty() {
        let _ = write!(h, "<p id=\"{id}\">none yet</p>");
        return;
    }
    let _ = write!(
        h,
        "<table id=\"{id}\"><tr><th>file</th><th>result</th><th>{ms}</th><th>output or reason</th></tr>"
    );
    for o in list {
        let (class, word) = if o.ok {
            ("ok", "done")
        } else {
            ("bad", "failed")
        };
        let _ = write!(
            h,
            "<tr><td class=\"name\">{}</td><td class=\"{class}\">{word}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
            escape(&o.name),
            o.ms,
            escape(&o.detail)
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_from_file_names() {
        assert_eq!(
            escape("<img src=x onerror='a'>&\"b\""),
            "&lt;img src=x onerror=&#39;a&#39;&gt;&amp;&quot;b&quot;"
        );
    }

    #[test]
    fn chart_draws_one_bar_per_busy_minute() {
        let mut h = String::new();
        let mut m = vec![0u64; 60];
        m[10] = 3;
        m[59] = 6;
        chart(&mut h, &m);
        assert_eq!(h.matches("class=\"bar\"").count(), 2);
        assert!(h.contains("data-n=\"6\"") && h.contains("height=\"120\""));
        assert!(h.contains("peak 6/min"), "{h}");
        // Nothing yet: no bar, and no peak of 1 made up.
        let mut h = String::new();
        chart(&mut h, &[0; 60]);
        assert!(!h.contains("class=\"bar\"") && !h.contains("peak"), "{h}");
        assert!(h.contains("none yet"), "{h}");
    }

    #[test]
    fn an_unhealthy_state_names_its_keyword_once() {
        assert_eq!(
            state_and_reason("stuck: the infer stage has run 90 s"),
            ("stuck".into(), "the infer stage has run 90 s".into())
        );
        assert_eq!(
            state_and_reason("starting"),
            ("starting".into(), String::new())
        );
    }
}
