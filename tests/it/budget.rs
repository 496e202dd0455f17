//! The frame budget (`decode.frame_budget_mib`, issue 11 item 5) end to end: the real
//! `hotpipe run` under a burst of 16000 x 16000 PNGs, its resident memory sampled from
//! `/proc`, and a frame too large for any budget failing alone. The images are zeros, so
//! the files are small and decoding is quick; the output is 64 x 64 and there is no
//! model, so the run is bounded by decoding and fitting the frames.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// `hotpipe run` on `cfg`, started and ready (the frame budget is logged at debug level).
fn start(cfg: &Path) -> Daemon {
    let d = Daemon::start(cfg, &[("HOTPIPE_LOG", "info,hotpipe::pipeline=debug")]);
    d.expect_log("hot folder ready", Duration::from_secs(60));
    d
}

/// The daemon's resident memory, in bytes.
fn rss(d: &Daemon) -> u64 {
    vm_rss_kib(d.pid()) * 1024
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

/// Put files into the inbox as a producer would (written aside, renamed in), all at once.
fn deliver_all(hf: &Path, files: &[(&str, &[u8])]) {
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
    let daemon = start(&cfg);
    assert!(
        daemon.log().contains("frame budget 2048 MiB"),
        "{}",
        daemon.log()
    );
    // Idle, after one ordinary image has warmed every stage.
    deliver_all(&hf, &[("warm.jpg", &jpeg_bytes(3))]);
    assert!(wait_until(Duration::from_secs(30), || names(
        &hf.join("done")
    )
    .len()
        == 1));
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss(&daemon);

    let png = zeros_png(16000, 16000);
    let names6: Vec<String> = (0..6).map(|i| format!("huge{i}.png")).collect();
    let files: Vec<(&str, &[u8])> = names6.iter().map(|n| (n.as_str(), &png[..])).collect();
    let t = Instant::now();
    deliver_all(&hf, &files);
    let mut peak = idle;
    let done = |hf: &Path| names(&hf.join("done")).len() + names(&hf.join("failed")).len();
    while done(&hf) < 7 && t.elapsed() < Duration::from_secs(240) {
        peak = peak.max(rss(&daemon));
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t.elapsed();
    // Freed buffers go back to the OS at once; a few seconds for the last output's
    // publish and any allocator trimming.
    let back = wait_until(Duration::from_secs(5), || rss(&daemon) < idle + 300 * MIB);
    let after = rss(&daemon);
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
    assert_eq!(daemon.stop().0, Some(0));
}

/// A frame larger than the whole budget fails at once with a reason naming the key, and
/// does not hold up the file after it.
#[test]
fn a_frame_over_the_whole_budget_fails_and_the_next_file_is_done() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "frame_budget_mib = 64\n");
    let hf = d.path().join("hf");
    let daemon = start(&cfg);
    // 6000 x 6000 RGB is 103 MiB decoded.
    deliver_all(&hf, &[("big.png", &zeros_png(6000, 6000))]);
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
    deliver_all(&hf, &[("next.jpg", &jpeg_bytes(3))]);
    assert!(
        wait_until(Duration::from_secs(30), || names(&hf.join("done"))
            == vec!["next.jpg".to_string()]),
        "done {:?}\n{}",
        names(&hf.join("done")),
        daemon.log()
    );
    assert!(names(&hf.join("outbox")).contains(&"next.jpg".to_string()));
    assert_eq!(daemon.stop().0, Some(0));
}
