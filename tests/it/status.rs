//! The status page at `/`, rendered by a real browser: headless Chromium (Debian's
//! `chromium`) loads it from a running daemon that has processed good photos and failed a
//! bad one whose name is markup. The figures on the rendered page must equal `/metrics`
//! read at the same moment (the daemon is idle by then), the failure's name and reason
//! must be there as text (escaped, not markup), the chart must have a bar, and nothing
//! may run: no `<script>`, and a policy that forbids any. The screenshot is kept in
//! `target/test-output/status_page.png`.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::metrics::{get, scrape, start, wait_line};

/// Chromium, headless, with a profile of its own (runs in parallel with other tests).
fn browse(chromium: &Path, profile: &Path, args: &[&str]) -> String {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox", // root in CI; the page is ours and runs nothing
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in the rendered DOM.
fn by_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} on the page:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    &dom[start..end]
}

#[test]
fn status_page_in_chromium_agrees_with_metrics() {
    let Some(chromium) = which("chromium") else {
        skip("chromium not installed (apt-get install chromium; scripts/setup.sh does)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let daemon = start(d.path());
    let addr = daemon.metrics_addr();
    let hf = d.path().join("hf");
    for i in 0..3 {
        deliver(&hf, &format!("good{i}.jpg"), &jpeg_bytes(i));
    }
    let bad = "bad<b>x<i>.jpg";
    deliver(&hf, bad, b"not an image at all");
    wait_line(&addr, "hotpipe_files_done_total 3");
    wait_line(&addr, "hotpipe_files_failed_total 1");

    let page = get(&addr, "/", false);
    assert_eq!(page.code, 200);
    assert!(
        page.head
            .contains("Content-Security-Policy: default-src 'none'"),
        "{}",
        page.head
    );
    assert!(
        page.head.contains("Cache-Control: no-store"),
        "{}",
        page.head
    );
    assert!(!page.body.contains("<script"), "the page has a script");

    let profile = d.path().join("chromium");
    let url = format!("http://{addr}/");
    let dom = browse(&chromium, &profile, &["--dump-dom", &url]);
    let m = scrape(&addr, false).expect("the prometheus parser (scripts/setup.sh installs it)");
    for (id, metric) in [
        ("claimed", "hotpipe_files_claimed_total"),
        ("done", "hotpipe_files_done_total"),
        ("failed", "hotpipe_files_failed_total"),
        ("retried", "hotpipe_files_retried_total"),
    ] {
        let on_page: f64 = by_id(&dom, id).parse().unwrap();
        assert_eq!(Some(on_page), m.value(metric, &[]), "#{id} vs {metric}");
    }
    assert_eq!(by_id(&dom, "done"), "3");
    assert_eq!(by_id(&dom, "state"), "ready");
    assert_eq!(by_id(&dom, "queue-decode"), "0");
    // The failure, by name and reason, as text: the markup in its name did not become a
    // <b> element.
    let failures = &dom[dom.find("id=\"failures\"").expect("a failures table")..];
    assert!(
        failures.contains("bad&lt;b&gt;x&lt;i&gt;.jpg"),
        "{failures}"
    );
    assert!(!dom.contains("<b>x"));
    assert!(
        failures.contains("decode: not a recognised image"),
        "{failures}"
    );
    // The chart: this minute's bar counts the four outcomes.
    assert!(dom.contains("<svg id=\"chart\""), "no chart");
    assert!(
        dom.contains("class=\"bar\" data-n=\"4\""),
        "no bar of 4 outcomes:\n{dom}"
    );

    let shot_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("status_page.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,1200",
            &url,
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
    assert_eq!(daemon.stop().0, Some(0));
}
