//! The frame budget (`decode.frame_budget_mib`, issue 11 item 5) end to end: the real
//! `hotpipe run` under a burst of 16000 x 16000 PNGs, its resident memory sampled from
//! `/proc`, and a frame too large for any budget failing alone. The images are zeros, so
//! the files are small and decoding is quick; the output is 64 x 64 and there is no
//! model, so the run is bounded by decoding and fitting the frames.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A running `hotpipe run` with its stderr collected; killed when dropped. (A slimmer
/// copy of the hot folder tests' one.)
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(cfg: &Path) -> Daemon {
        let mut child = hotpipe()
            .args(["run", "--config"])
            .arg(cfg)
            // The frame budget is logged at debug level.
            .env("HOTPIPE_LOG", "info,hotpipe::pipeline=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                l2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let d = Daemon { child, log };
        assert!(
            wait_until(Duration::from_secs(60), || d
                .log()
                .contains("hot folder ready")),
            "daemon did not start:\n{}",
            d.log()
        );
        d
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// VmRSS of the daemon, in bytes.
    fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        kib * 1024
    }

    /// SIGTERM, and the exit code.
    fn stop(mut self) -> Option<i32> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hot folder at `dir/hf` with 64 x 64 JPEG outputs, no model, and `decode` as the
/// `[decode]` table.
fn config(dir: &Path, decode: &str) -> PathBuf {
    write(
        &dir.join("p.toml"),
        &format!(
            "[preprocess]\nsize = 64\n\n[encode]\nformat = \"jpeg\"\n\n\
             [pipeline]\ndecode_threads = 2\nfit_threads = 1\nencode_threads = 1\nchannel_capacity = 4\n\n\
             [decode]\n{decode}\n\
             [hotfolder]\nroot = \"hf\"\nsettle_ms = 100\nretry_s = 1\nshutdown_grace_s = 5\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
}

/// A `w x h` RGB PNG of zeros: megapixels in a file of kilobytes.
fn zeros_png(w: u32, h: u32) -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    // Zeroed by the allocator (calloc): the pages are only read, never written here.
    let px = vec![0u8; w as usize * h as usize * 3];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::NoFilter)
        .write_image(&px, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

fn small_jpeg() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    picture(64, 64, 3)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap();
    out.into_inner()
}

/// Put files into the inbox as a producer would (written aside, renamed in), all at once.
fn deliver(hf: &Path, files: &[(&str, &[u8])]) {
    let stage = hf.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    for (name, bytes) in files {
        std::fs::write(stage.join(name), bytes).unwrap();
    }
    for (name, _) in files {
        std::fs::rename(stage.join(name), hf.join("inbox").join(name)).unwrap();
    }
}

fn mib(b: u64) -> u64 {
    b / MIB
}

/// Six 16000 x 16000 PNGs (732 MiB each decoded) at once under a 2048 MiB budget: at
/// most two frames are in memory at a time, all six are done, and the memory goes back
/// afterwards. Without the budget the count-bounded pool held five such frames at once
/// and kept them.
#[test]
fn a_burst_of_huge_frames_stays_in_the_budget_and_memory_comes_back() {
    let d = tempfile::tempdir().unwrap();
    let budget = 2048 * MIB;
    let cfg = config(
        d.path(),
        "max_width = 16384\nmax_height = 16384\nmax_alloc_mib = 1024\nframe_budget_mib = 2048\n",
    );
    let hf = d.path().join("hf");
    let daemon = Daemon::start(&cfg);
    assert!(
        daemon.log().contains("frame budget 2048 MiB"),
        "{}",
        daemon.log()
    );
    // Idle, after one ordinary image has warmed every stage.
    deliver(&hf, &[("warm.jpg", &small_jpeg())]);
    assert!(wait_until(Duration::from_secs(30), || names(
        &hf.join("done")
    )
    .len()
        == 1));
    std::thread::sleep(Duration::from_millis(500));
    let idle = daemon.rss();

    let png = zeros_png(16000, 16000);
    let names6: Vec<String> = (0..6).map(|i| format!("huge{i}.png")).collect();
    let files: Vec<(&str, &[u8])> = names6.iter().map(|n| (n.as_str(), &png[..])).collect();
    let t = Instant::now();
    deliver(&hf, &files);
    let mut peak = idle;
    let done = |hf: &Path| names(&hf.join("done")).len() + names(&hf.join("failed")).len();
    while done(&hf) < 7 && t.elapsed() < Duration::from_secs(240) {
        peak = peak.max(daemon.rss());
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t.elapsed();
    // Freed buffers go back to the OS at once; a few seconds for the last output's
    // publish and any allocator trimming.
    let back = wait_until(Duration::from_secs(5), || daemon.rss() < idle + 300 * MIB);
    let after = daemon.rss();
    eprintln!(
        "frame budget: idle {} MiB, peak {} MiB (+{}), after {} MiB; {:.1} s for six",
        mib(idle),
        mib(peak),
        mib(peak - idle),
        mib(after),
        took.as_secs_f64()
    );
    let mut done_names = names(&hf.join("done"));
    done_names.retain(|n| n != "warm.jpg");
    assert_eq!(
        (done_names, names(&hf.join("failed"))),
        (names6, vec![]),
        "all six are done\n{}",
        daemon.log()
    );
    assert!(
        peak < idle + budget + 300 * MIB,
        "peak RSS {} MiB over idle {} MiB + the 2048 MiB budget + 300",
        mib(peak),
        mib(idle)
    );
    assert!(
        back,
        "RSS {} MiB after the burst, idle was {} MiB",
        mib(after),
        mib(idle)
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// A frame larger than the whole budget fails at once with a reason naming the key, and
/// does not hold up the file after it.
#[test]
fn a_frame_over_the_whole_budget_fails_and_the_next_file_is_done() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "frame_budget_mib = 64\n");
    let hf = d.path().join("hf");
    let daemon = Daemon::start(&cfg);
    // 6000 x 6000 RGB is 103 MiB decoded.
    deliver(&hf, &[("big.png", &zeros_png(6000, 6000))]);
    let failed = hf.join("failed");
    assert!(
        wait_until(Duration::from_secs(30), || failed
            .join("big.png.error.json")
            .is_file()),
        "failed/ {:?}\n{}",
        names(&failed),
        daemon.log()
    );
    let side = std::fs::read_to_string(failed.join("big.png.error.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&side).unwrap();
    let reason = v["reason"].as_str().unwrap();
    for part in [
        "6000 x 6000",
        "103.0 MiB",
        "budget of 64 MiB",
        "decode.frame_budget_mib",
    ] {
        assert!(reason.contains(part), "{part}: {side}");
    }
    assert_eq!(v["stage"], "decode", "{side}");
    deliver(&hf, &[("next.jpg", &small_jpeg())]);
    assert!(
        wait_until(Duration::from_secs(30), || names(&hf.join("done"))
            == vec!["next.jpg".to_string()]),
        "done {:?}\n{}",
        names(&hf.join("done")),
        daemon.log()
    );
    assert!(names(&hf.join("outbox")).contains(&"next.jpg".to_string()));
    assert_eq!(daemon.stop(), Some(0));
}
