//! The hot folder with `[model] backend = "python"`: a stand-in generator written here
//! (torch on the CPU; it uses each photo's prompt and seed and returns two images of
//! half the size) served by real `python -m hotpipe_worker` processes, with photos that
//! make it raise, kill itself or hang among good ones.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const GENERATOR: &str = r#"
import os, signal, time, zlib
import torch

class Generator:
    inputs = "torch"

    def __init__(self, device, options):
        self.gain = int(options["gain"])

    def output_shape(self, h, w, c):
        return (2, h // 2, w // 2, 3)

    def __call__(self, images, params):
        out = []
        for x, p in zip(images, params):
            prompt = p["prompt"]
            if prompt == "poison":
                raise ValueError("a poisoned prompt")
            if prompt == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if prompt == "hang":
                time.sleep(3600)
            g = torch.Generator().manual_seed(p["seed"])
            half = x[::2, ::2, :3].to(torch.int32)
            noise = torch.randint(0, 16, tuple(half.shape), generator=g, dtype=torch.int32)
            tint = zlib.crc32(prompt.encode()) % 64
            out.append((half + tint + self.gain * noise).clamp(0, 255).to(torch.uint8))
            out.append((255 - half).to(torch.uint8))
        return torch.stack(out)
"#;

/// Runs the generator on each `(png, prompt, seed)` as a batch of one, in Python, and
/// writes its two outputs' raw RGB bytes to `<png>.ref`.
const REFERENCE: &str = r#"
import json, sys
import numpy as np, torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
from generator import Generator
g = Generator("cpu", {"gain": 3})
for png, prompt, seed in json.loads(sys.argv[2]):
    x = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy())[None]
    y = g(x, [{"prompt": prompt, "seed": seed}])
    open(png + ".ref", "wb").write(y.numpy().tobytes())
"#;

fn hot_config(dir: &Path, py: &Path) -> PathBuf {
    for sub in ["inbox", "work", "outbox", "done", "failed"] {
        std::fs::create_dir_all(dir.join("hf").join(sub)).unwrap();
    }
    write(&dir.join("generator.py"), GENERATOR);
    write(
        &dir.join("hot.toml"),
        &format!(
            "[model]\nbackend = \"python\"\nentry = \"generator.py:Generator\"\npython = \"{}\"\n\
             device = \"cpu\"\nmax_batch = 4\nbatch_timeout_s = 2\nmax_attempts = 2\n\n\
             [model.options]\ngain = 3\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\n\n[encode]\nformat = \"png\"\n\n\
             [pipeline]\ndecode_threads = 2\nencode_threads = 2\nchannel_capacity = 4\n\n\
             [params.schema]\nprompt = {{ type = \"string\", default = \"\" }}\nseed = {{ type = \"int\", default = 0, min = 0 }}\n\n\
             [hotfolder]\nroot = \"hf\"\nsettle_ms = 100\nretry_s = 1\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            py.display()
        ),
    )
}

fn png_bytes(seed: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    picture(32, 32, seed)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// 52 photos, each with its own prompt and seed, among them one whose prompt makes the
/// pipeline raise, one that kills the worker and one that hangs it: the 49 others are
/// published once each, equal to the class's own output computed in Python; the three
/// are in failed/ with what happened; the worker's restarts are in /metrics; the daemon
/// runs on throughout, then stops cleanly and leaves no worker behind.
#[test]
fn a_python_pipeline_serves_the_hot_folder_and_isolates_the_inputs_that_break_it() {
    let Some(py) = python() else {
        skip("python backend: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = hot_config(d.path(), &py);
    let hf = d.path().join("hf");
    let daemon = Daemon::start(&cfg, &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let workers = workers_of(daemon.pid());
    assert_eq!(workers.len(), 1, "one worker for one device: {workers:?}");
    const PHOTOS: usize = 52;
    let bad = [(7, "poison"), (23, "die"), (41, "hang")];
    let mut good = Vec::new();
    for i in 0..PHOTOS as u32 {
        let prompt = match bad.iter().find(|b| b.0 == i) {
            Some((_, p)) => p.to_string(),
            None => format!("a person in coat number {i}"),
        };
        let seed = 1000 + i;
        let params = serde_json::json!({"prompt": prompt, "seed": seed});
        deliver(&hf, &format!("p{i:02}.json"), params.to_string().as_bytes());
        deliver(&hf, &format!("p{i:02}.png"), &png_bytes(i));
        if !bad.iter().any(|b| b.0 == i) {
            let src = d.path().join(format!("p{i:02}.png"));
            std::fs::write(&src, png_bytes(i)).unwrap();
            good.push((src.display().to_string(), prompt, seed));
        }
    }
    let images = |dir: &str| {
        names(&hf.join(dir))
            .into_iter()
            .filter(|n| n.ends_with(".png"))
            .count()
    };
    let settled = wait_until(Duration::from_secs(240), || {
        images("done") + images("failed") == PHOTOS && names(&hf.join("work")).is_empty()
    });
    assert!(
        settled,
        "done {:?}\nfailed {:?}\n{}",
        names(&hf.join("done")),
        names(&hf.join("failed")),
        daemon.log()
    );
    let mut daemon = daemon;
    assert!(daemon.alive(), "the daemon runs on\n{}", daemon.log());
    let (_, metrics) = http_get(&daemon.metrics_addr(), "/metrics");
    let (health, _) = http_get(&daemon.metrics_addr(), "/healthz");
    let pid = daemon.pid();
    let log = daemon.log();
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));
    assert!(
        workers_of(pid).is_empty()
            && workers
                .iter()
                .all(|w| !Path::new(&format!("/proc/{w}")).exists()),
        "no worker left"
    );

    // Outputs: two per good photo, each equal to the class's own result.
    let refs = serde_json::to_string(&good).unwrap();
    let out = std::process::Command::new(&py)
        .arg("-c")
        .arg(REFERENCE)
        .arg(d.path())
        .arg(&refs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outbox = names(&hf.join("outbox"));
    assert_eq!(
        outbox.iter().filter(|n| n.ends_with(".png")).count(),
        2 * good.len(),
        "{outbox:?}"
    );
    for (src, prompt, _) in &good {
        let stem = Path::new(src)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let want = std::fs::read(format!("{src}.ref")).unwrap();
        let n = 16 * 16 * 3;
        for k in 0..2 {
            let got = image::open(hf.join(format!("outbox/{stem}_{}.png", k + 1)))
                .unwrap()
                .into_rgb8();
            assert_eq!(
                got.as_raw(),
                &want[k * n..(k + 1) * n],
                "{stem} output {}",
                k + 1
            );
        }
        let side: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(hf.join(format!("outbox/{stem}_1.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(side["params"]["prompt"], prompt.as_str());
    }
    // The three culprits, each with what it did.
    let reason = |n: &str| {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(hf.join(format!("failed/{n}.error.json"))).unwrap(),
        )
        .unwrap();
        v["reason"].as_str().unwrap().to_string()
    };
    assert!(
        reason("p07.png").contains("ValueError: a poisoned prompt"),
        "{}",
        reason("p07.png")
    );
    assert!(
        reason("p23.png").contains("model worker died on this input (signal 9)"),
        "{}",
        reason("p23.png")
    );
    assert!(
        reason("p41.png").contains("model worker hung on this input"),
        "{}",
        reason("p41.png")
    );
    assert_eq!(images("failed"), 3);
    assert_eq!(images("done"), good.len());
    assert_eq!(good.len(), 49);
    // The hang is logged at WARN with the worker's Python stack (faulthandler), which
    // shows the line it hung on.
    assert!(
        log.contains("WARN")
            && log.contains("model worker hung")
            && log.contains("most recent call first")
            && log.contains("in __call__"),
        "{log}"
    );
    // Each culprit that takes the worker down does so max_attempts (2) times, and the
    // batch it was in once more.
    let restarts: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hotpipe_model_worker_restarts_total{worker=\"0\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no restarts line:\n{metrics}"));
    assert!(restarts >= 4, "restarts {restarts}\n{metrics}");
    assert!(
        metrics.contains("hotpipe_model_worker_up{worker=\"0\"} 1"),
        "{metrics}"
    );
    assert_eq!(health, 200);
}

/// A pipeline that takes `delay_s` per batch and notes each call's start and end (with
/// its size) in the file `log`; it gives the images back as they came.
const SLOW: &str = r#"
import time

class Slow:
    def __init__(self, device, options):
        self.delay, self.log = float(options["delay_s"]), options["log"]

    def output_shape(self, h, w, c):
        return (1, h, w, c)

    def __call__(self, images, params):
        self.note(f"start {len(images)}")
        time.sleep(self.delay)
        self.note(f"end {len(images)}")
        return images.copy()

    def note(self, line):
        with open(self.log, "a") as f:
            f.write(line + "\n")
"#;

/// A hot folder on [`SLOW`] taking `delay_s` per batch, stopped within `grace_s`.
fn slow_config(dir: &Path, py: &Path, delay_s: f64, grace_s: u64) -> PathBuf {
    for sub in ["inbox", "work", "outbox", "done", "failed"] {
        std::fs::create_dir_all(dir.join("hf").join(sub)).unwrap();
    }
    write(&dir.join("slow.py"), SLOW);
    write(
        &dir.join("slow.toml"),
        &format!(
            "[model]\nbackend = \"python\"\nentry = \"slow.py:Slow\"\npython = \"{}\"\n\
             device = \"cpu\"\nmax_batch = 4\nbatch_timeout_s = 120\n\n\
             [model.options]\ndelay_s = {delay_s}\nlog = \"{}\"\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\n\n[encode]\nformat = \"png\"\n\n\
             [pipeline]\nchannel_capacity = 4\n\n\
             [hotfolder]\nroot = \"hf\"\nsettle_ms = 50\nshutdown_grace_s = {grace_s}\n\n\
             [metrics]\nlisten = \"off\"\n",
            py.display(),
            dir.join("calls.log").display()
        ),
    )
}

/// `(starts, ends, rows ended)` in [`SLOW`]'s log.
fn calls(dir: &Path) -> (usize, usize, usize) {
    let log = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
    let mut c = (0, 0, 0);
    for line in log.lines() {
        match line.split_once(' ') {
            Some(("start", _)) => c.0 += 1,
            Some(("end", n)) => (c.1, c.2) = (c.1 + 1, c.2 + n.parse::<usize>().unwrap()),
            _ => panic!("{line:?} in the calls log"),
        }
    }
    c
}

/// SIGTERM while a slow Python batch runs: the batch finishes within `shutdown_grace_s`,
/// its images are published, the daemon exits 0 and its worker is gone. A batch that
/// cannot finish within the grace is cut off: the daemon still exits on time, takes its
/// worker along, and the images stay in work/; a SIGKILL mid-batch takes the worker
/// along too. The next start makes each of the 16 exactly once.
#[test]
fn sigterm_lets_the_python_batch_in_flight_finish_within_the_grace() {
    let Some(py) = python() else {
        skip("python drain: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let pngs = |dir: &str| {
        names(&hf.join(dir))
            .into_iter()
            .filter(|n| n.ends_with(".png"))
            .count()
    };
    let deliver_range = |r: std::ops::Range<u32>| {
        for i in r {
            deliver(&hf, &format!("s{i:02}.png"), &png_bytes(i));
        }
    };

    // 1. One second per batch, ten of grace: the batch in flight finishes.
    let cfg = slow_config(d.path(), &py, 1.0, 10);
    let daemon = Daemon::start(&cfg, &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let workers = workers_of(daemon.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    deliver_range(0..12);
    assert!(wait_until(Duration::from_secs(60), || calls(d.path()).0 >= 1));
    let log = daemon.log.clone();
    let (code, took) = daemon.stop();
    let log = log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}\n{log}");
    let (starts, ends, rows) = calls(d.path());
    assert_eq!(starts, ends, "a batch was cut off\n{log}");
    assert!(rows >= 1);
    assert_eq!(
        pngs("done"),
        rows,
        "every image the model made is published\n{log}"
    );
    assert_eq!(pngs("outbox"), rows);
    assert!(gone(&workers), "worker {workers:?} outlived the stop");

    // 2. A minute per batch, two seconds of grace: cut off on time.
    let cfg = slow_config(d.path(), &py, 60.0, 2);
    let daemon = Daemon::start(&cfg, &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let workers = workers_of(daemon.pid());
    deliver_range(12..16);
    assert!(wait_until(Duration::from_secs(60), || calls(d.path()).0 > starts));
    let log = daemon.log.clone();
    let (code, took) = daemon.stop();
    let log = log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
    assert!(took < Duration::from_secs(8), "exit took {took:?}\n{log}");
    assert!(log.contains("stopped past the grace period"), "{log}");
    assert!(
        wait_until(Duration::from_secs(5), || gone(&workers)),
        "worker {workers:?} outlived the daemon"
    );
    assert_eq!(calls(d.path()).1, ends, "the cut-off batch did not end");
    assert!(
        pngs("work") >= 1,
        "the cut-off batch's images stay in work/"
    );

    // 2b. SIGKILL during that minute-long batch: the worker, which would otherwise sleep
    // on for the minute (it only notices hotpipe is gone when it next reads its pipe),
    // dies with the daemon (PR_SET_PDEATHSIG).
    // (The images resumed from work/ may enter their batch before the first scan.)
    let before = calls(d.path()).0;
    let daemon = Daemon::start(&cfg, &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let workers = workers_of(daemon.pid());
    assert!(wait_until(Duration::from_secs(60), || calls(d.path()).0 > before));
    daemon.kill();
    assert!(
        wait_until(Duration::from_secs(3), || gone(&workers)),
        "worker {workers:?} outlived the SIGKILLed daemon"
    );
    assert_eq!(calls(d.path()).1, ends, "no batch of the minute ended");

    // 3. The next start finishes everything, each image once.
    let cfg = slow_config(d.path(), &py, 0.0, 10);
    let daemon = Daemon::start(&cfg, &[]);
    let all = wait_until(Duration::from_secs(120), || pngs("done") == 16);
    assert!(all, "{} done\n{}", pngs("done"), daemon.log());
    assert_eq!(daemon.stop().0, Some(0));
    assert_eq!(pngs("outbox"), 16);
    assert_eq!(pngs("failed") + pngs("work") + pngs("inbox"), 0);
}

/// Whether none of `pids` runs any more (a zombie runs nothing).
fn gone(pids: &[i32]) -> bool {
    pids.iter().all(|p| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        state.is_none_or(|s| s == "Z")
    })
}

/// A pipeline on a device that holds `fits` images at once: a larger call raises what
/// torch raises when a GPU is out of memory. It notes each call's size in `log` and
/// returns each image inverted.
const TIGHT: &str = r#"
import torch

class Tight:
    def __init__(self, device, options):
        self.fits, self.log = int(options["fits"]), options["log"]

    def output_shape(self, h, w, c):
        return (1, h, w, c)

    def __call__(self, images, params):
        with open(self.log, "a") as f:
            f.write(f"{len(images)}\n")
        if len(images) > self.fits:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {len(images)}.00 GiB")
        return 255 - images
"#;

/// `torch.cuda.OutOfMemoryError` for a batch halves it, as the TorchScript backend does,
/// and later batches run in chunks of the size that fitted: all 12 images are made
/// (each checked against its inversion), none fails, and the pipeline saw one call too
/// large, then only calls that fit.
#[test]
fn an_out_of_memory_batch_is_split_and_every_image_is_made() {
    let Some(py) = python() else {
        skip("python out of memory: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("tight.py"), TIGHT);
    let log = d.path().join("calls.log");
    // A long batch timeout so that every batch is full (4) and the first one overflows.
    let cfg = write(
        &d.path().join("tight.toml"),
        &format!(
            "[model]\nbackend = \"python\"\nentry = \"tight.py:Tight\"\npython = \"{}\"\n\
             device = \"cpu\"\nmax_batch = 4\nbatch_timeout_ms = 5000\n\n\
             [model.options]\nfits = 2\nlog = \"{}\"\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\n\n[encode]\nformat = \"png\"\n",
            py.display(),
            log.display()
        ),
    );
    let inputs: Vec<PathBuf> = (0..12u32)
        .map(|i| {
            let p = d.path().join(format!("t{i:02}.png"));
            std::fs::write(&p, png_bytes(i)).unwrap();
            p
        })
        .collect();
    let out = d.path().join("out");
    let r = process(&cfg, &out, &inputs);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    for (i, src) in inputs.iter().enumerate() {
        let want = image::open(src).unwrap().into_rgb8();
        let got = image::open(out.join(format!("t{i:02}.png")))
            .unwrap()
            .into_rgb8();
        let inverted: Vec<u8> = want.as_raw().iter().map(|v| 255 - v).collect();
        assert_eq!(got.as_raw(), &inverted, "t{i:02}");
    }
    let sizes: Vec<usize> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let first_batch = sizes.iter().position(|&n| n == 4).expect("a full batch");
    let later = &sizes[first_batch + 1..];
    assert!(
        later.iter().all(|&n| n <= 2),
        "after the overflow every call fits: {sizes:?}"
    );
    assert_eq!(later.iter().sum::<usize>(), 12, "{sizes:?}");
    assert!(
        r.stderr
            .contains("out of memory for 4 images; running 2 at a time"),
        "{}",
        r.stderr
    );
}

/// Notes which process ran each call and its size, then returns each image inverted
/// after a pause (so that one worker cannot take every batch).
const PIDS: &str = r#"
import os, time

class Pids:
    def __init__(self, device, options):
        self.log = options["log"]

    def output_shape(self, h, w, c):
        return (1, h, w, c)

    def __call__(self, images, params):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {len(images)}\n")
        time.sleep(0.2)
        return 255 - images
"#;

/// `cpu_infer_workers = 2` on the CPU: two worker processes on the one shared file, each
/// with its own output slots, share the batches; every image comes back right.
#[test]
fn two_cpu_workers_share_the_batches_through_one_shared_file() {
    let Some(py) = python() else {
        skip("python workers: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("pids.py"), PIDS);
    let log = d.path().join("calls.log");
    let cfg = write(
        &d.path().join("pids.toml"),
        &format!(
            "[model]\nbackend = \"python\"\nentry = \"pids.py:Pids\"\npython = \"{}\"\n\
             device = \"cpu\"\nmax_batch = 2\n\n[model.options]\nlog = \"{}\"\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\n\n[encode]\nformat = \"png\"\n\n\
             [pipeline]\ncpu_infer_workers = 2\n",
            py.display(),
            log.display()
        ),
    );
    let inputs: Vec<PathBuf> = (0..16u32)
        .map(|i| {
            let p = d.path().join(format!("w{i:02}.png"));
            std::fs::write(&p, png_bytes(i)).unwrap();
            p
        })
        .collect();
    let out = d.path().join("out");
    let r = process(&cfg, &out, &inputs);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    for (i, src) in inputs.iter().enumerate() {
        let want = image::open(src).unwrap().into_rgb8();
        let got = image::open(out.join(format!("w{i:02}.png")))
            .unwrap()
            .into_rgb8();
        let inverted: Vec<u8> = want.as_raw().iter().map(|v| 255 - v).collect();
        assert_eq!(got.as_raw(), &inverted, "w{i:02}");
    }
    let calls = std::fs::read_to_string(&log).unwrap();
    let mut rows = std::collections::BTreeMap::<&str, usize>::new();
    for line in calls.lines() {
        let (pid, n) = line.split_once(' ').unwrap();
        *rows.entry(pid).or_default() += n.parse::<usize>().unwrap();
    }
    assert_eq!(rows.len(), 2, "two workers served: {calls}");
    assert_eq!(rows.values().sum::<usize>(), 16, "{calls}");
}

/// A minimal Python pipeline (numpy in, the same out) and its config, with `python`
/// given as `python_line` (or left out when `None`).
fn echo_config(dir: &Path, python_line: Option<&str>) -> PathBuf {
    write(
        &dir.join("echo.py"),
        "class Echo:\n    def __init__(self, device, options): pass\n    def output_shape(self, h, w, c): return (1, h, w, c)\n    def __call__(self, images, params): return images.copy()\n",
    );
    let python = python_line.map_or_else(String::new, |p| format!("python = {p}\n"));
    write(
        &dir.join("echo.toml"),
        &format!(
            "[model]\nbackend = \"python\"\nentry = \"echo.py:Echo\"\n{python}device = \"cpu\"\nmax_batch = 1\n\n[preprocess]\nsize = 16\n\n[encode]\nformat = \"png\"\n"
        ),
    )
}

/// `hotpipe check` with only `env` (and a PATH of `path`): the rest of hotpipe's own
/// environment (the venv scripts/env.sh activates) is left out, as in a plain shell.
fn check_bare(cfg: &Path, path: &str, env: &[(&str, &str)]) -> Cli {
    let mut cmd = hotpipe();
    cmd.env_clear()
        .env("PATH", path)
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(env.iter().copied())
        .args(["check", "--config"])
        .arg(cfg);
    cmd.output().unwrap().into()
}

/// Which interpreter a Python pipeline runs, from a plain shell (issue 31, item 2): a bare
/// command name is looked up on the PATH (it was resolved against the config's folder);
/// without `python` and without the venv's environment the default is the venv hotpipe
/// was built against, which has numpy (it was `python3` on the PATH, which had none: a
/// traceback and "model worker died"); `check` prints the interpreter; one without numpy
/// is named in a plain error that says what to do.
#[test]
fn the_python_backend_finds_its_interpreter_from_a_plain_shell() {
    let Some(py) = python() else {
        skip("python backend: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // A wrapper, not a symlink (a venv is found from the path the interpreter is run as).
    let wrapper = write(
        &bin.join("hp-test-python"),
        &format!("#!/bin/sh\nexec {} \"$@\"\n", py.display()),
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let plain = format!("{}:/usr/bin:/bin", bin.display());

    let r = check_bare(
        &echo_config(d.path(), Some("\"hp-test-python\"")),
        &plain,
        &[],
    );
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let want = format!("  python: {}", bin.join("hp-test-python").display());
    assert!(r.stdout.contains(&want), "{}", r.stdout);

    let r = check_bare(
        &echo_config(d.path(), Some("\"no-such-python\"")),
        &plain,
        &[],
    );
    assert_eq!(r.code, Some(78), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("model.python") && r.stderr.contains("no `no-such-python` on the PATH"),
        "{}",
        r.stderr
    );

    // No `python`, no venv in the environment: the build's venv, not /usr/bin/python3.
    let r = check_bare(&echo_config(d.path(), None), "/usr/bin:/bin", &[]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("  python: {}", py.display())),
        "{}",
        r.stdout
    );

    // An interpreter without numpy: said plainly, with what to do.
    let bare = d.path().join("bare");
    let made = std::process::Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&bare)
        .status()
        .unwrap();
    assert!(made.success());
    let line = format!("\"{}\"", bare.join("bin/python").display());
    let r = check_bare(&echo_config(d.path(), Some(&line)), &plain, &[]);
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stderr.contains("has no numpy (No module named 'numpy')")
            && r.stderr.contains("[model] python must name"),
        "{}",
        r.stderr
    );
}

/// A generation longer than `stuck_s` is not a stuck service (issue 31, item 1): with a
/// Python pipeline taking 6 s a batch, `stuck_s = 2` and `batch_timeout_s = 120`,
/// /healthz stays 200 throughout and says a batch is running within what it is allowed
/// (it was 503 "no stage progress" from second 2 on, and the watchdog, fed by the same
/// rule, would have been withheld).
#[test]
fn a_long_generation_within_its_timeout_is_healthy() {
    let Some(py) = python() else {
        skip("python backend: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = slow_config(d.path(), &py, 6.0, 30);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("settle_ms = 50\n", "settle_ms = 50\nstuck_s = 2\n")
        .replace("listen = \"off\"", "listen = \"127.0.0.1:0\"");
    std::fs::write(&cfg, text).unwrap();
    let hf = d.path().join("hf");
    let daemon = Daemon::start(&cfg, &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let addr = daemon.metrics_addr();
    deliver(&hf, "a.png", &png_bytes(1));
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            seen.push(http_get(&addr, "/healthz"));
            std::thread::sleep(Duration::from_millis(200));
            hf.join("done/a.png").is_file()
        }),
        "{}",
        daemon.log()
    );
    let bad: Vec<_> = seen.iter().filter(|(code, _)| *code != 200).collect();
    assert!(bad.is_empty(), "unhealthy during a healthy batch: {bad:?}");
    assert!(
        seen.iter()
            .any(|(_, body)| body.contains("a batch running for") && body.contains("(allowed ")),
        "{seen:?}"
    );
    assert_eq!(daemon.stop().0, Some(0));
}
