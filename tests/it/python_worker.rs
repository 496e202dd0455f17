//! The Python worker processes (`hotpipe::runtime::python`) on their own: a real
//! `python -m hotpipe_worker` serving a stand-in pipeline written here, through the shared
//! memory and the control pipes, supervised. The hot folder's tests with the Python
//! backend are in `python_backend.rs`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hotpipe::runtime::python::{
    Limits, PyError, RowError, RowOutcome, Shape, Supervisor, WorkerSpec, start_workers,
};
use serde_json::json;

use crate::common::*;

/// Two outputs per image at half size: the image brightened by its seed, and its
/// negative; `poison` raises, `die` kills the worker.
const STAND_IN: &str = r#"
import os, signal
import numpy as np

class StandIn:
    def __init__(self, device, options):
        self.device = device

    def output_shape(self, h, w, c):
        return (2, h // 2, w // 2, 3)

    def __call__(self, images, params):
        out = []
        for x, p in zip(images, params):
            if p["prompt"] == "poison":
                raise ValueError("poisoned input")
            if p["prompt"] == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if p["prompt"] == "hang":
                import time
                time.sleep(3600)
            half = x[::2, ::2, :3].astype(np.int32)
            out.append(np.clip(half + p["seed"], 0, 255).astype(np.uint8))
            out.append((255 - half).astype(np.uint8))
        return np.stack(out)

class Broken:
    def __init__(self, device, options):
        raise RuntimeError("no weights at /models/f2p")
"#;

fn spec(dir: &Path, class: &str) -> Option<WorkerSpec> {
    let Some(py) = python() else {
        skip("python worker: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return None;
    };
    let file = write(&dir.join("standin.py"), STAND_IN);
    Some(WorkerSpec {
        python: py,
        module_dir: WorkerSpec::default_module_dir(),
        entry: format!("{}:{class}", file.display()),
        device: "cpu".into(),
        options: json!({}),
        placeholders: json!({}),
        cpu_threads: None,
    })
}

/// One supervised worker over batch slots of `rows` 8 x 8 RGB images.
fn start(spec: WorkerSpec, rows: usize, limits: Limits) -> Result<Supervisor, PyError> {
    let shape = Shape {
        slots: 2,
        rows,
        hwc: [8, 8, 3],
    };
    let stats = vec![Default::default()];
    let (mut sups, _) = start_workers(vec![spec], shape, limits, stats)?;
    Ok(sups.remove(0))
}

const PATIENT: Limits = Limits {
    batch_timeout: Some(Duration::from_secs(60)),
    max_attempts: 2,
};

fn image(seed: u8) -> Vec<u8> {
    (0..8 * 8 * 3)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// What the stand-in makes of `img` with `seed`: its two outputs, 4 x 4 x 3 each.
fn expected(img: &[u8], seed: i32) -> (Vec<u8>, Vec<u8>) {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for y in (0..8).step_by(2) {
        for x in (0..8).step_by(2) {
            for c in 0..3 {
                let v = img[(y * 8 + x) * 3 + c] as i32;
                a.push((v + seed).clamp(0, 255) as u8);
                b.push((255 - v) as u8);
            }
        }
    }
    (a, b)
}

#[test]
fn a_batch_crosses_shared_memory_with_its_parameters_and_errors_stay_per_item() {
    let d = tempfile::tempdir().unwrap();
    let Some(spec) = spec(d.path(), "StandIn") else {
        return;
    };
    let mut sup = start(spec, 4, PATIENT).unwrap();
    assert_eq!(sup.output(), [2, 4, 4, 3]);
    let imgs: Vec<Vec<u8>> = (0..6).map(|i| image(i * 40)).collect();
    let prompts = ["a", "poison", "c", "x", "y", "z"];
    let seeds = [5, 0, 60, 1, 2, 3];
    let params: Vec<_> = (prompts.iter().zip(seeds))
        .map(|(p, s)| json!({"prompt": p, "seed": s}))
        .collect();
    let n = 4 * 4 * 3;
    let mut out = vec![0u8; 6 * 2 * n];
    // Six images in slots of four: two runs.
    let outcomes = sup.run(&imgs.concat(), &params, &mut out).unwrap();
    for (i, img) in imgs.iter().enumerate() {
        if prompts[i] == "poison" {
            assert_eq!(
                outcomes[i],
                RowOutcome::Failed(RowError::Raised("ValueError: poisoned input".into()))
            );
            continue;
        }
        assert_eq!(outcomes[i], RowOutcome::Made);
        let (a, b) = expected(img, seeds[i]);
        assert_eq!(&out[2 * i * n..(2 * i + 1) * n], &a[..], "row {i} output 1");
        assert_eq!(
            &out[(2 * i + 1) * n..(2 * i + 2) * n],
            &b[..],
            "row {i} output 2"
        );
    }
    assert_eq!(sup.stats().restarts.load(Ordering::Relaxed), 0);
    assert_eq!(sup.stats().failed_items.load(Ordering::Relaxed), 1);
}

#[test]
fn a_failed_construction_says_why_and_a_killed_or_hung_worker_says_how() {
    let d = tempfile::tempdir().unwrap();
    let Some(broken) = spec(d.path(), "Broken") else {
        return;
    };
    match start(broken, 1, PATIENT) {
        Err(PyError::Fatal(e)) => {
            assert!(e.contains("RuntimeError: no weights at /models/f2p"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("started"),
    }
    let Some(spec) = spec(d.path(), "StandIn") else {
        return;
    };
    let once = Limits {
        batch_timeout: Some(Duration::from_secs(1)),
        max_attempts: 1,
    };
    let mut sup = start(spec, 1, once).unwrap();
    let img = image(9);
    let mut out = vec![0u8; 2 * 4 * 4 * 3];
    let run = |sup: &mut Supervisor, prompt: &str, out: &mut [u8]| {
        sup.run(&img, &[json!({"prompt": prompt, "seed": 0})], out)
            .unwrap()
            .remove(0)
    };
    assert_eq!(
        run(&mut sup, "die", &mut out),
        RowOutcome::KilledWorker("model worker died on this input (signal 9)".into())
    );
    // A hung worker is killed at the time limit.
    let t = std::time::Instant::now();
    let hung = run(&mut sup, "hang", &mut out);
    assert!(
        hung.message().is_some_and(|m| m
            .starts_with("model worker hung on this input (no answer within 1 s")),
        "{hung:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // Each death was followed by a restart, and the next image is made.
    assert_eq!(run(&mut sup, "fine", &mut out), RowOutcome::Made);
    assert_eq!(&out[..4 * 4 * 3], &expected(&img, 0).0[..]);
    assert_eq!(sup.stats().restarts.load(Ordering::Relaxed), 2);
    assert!(sup.stats().alive.load(Ordering::Relaxed));
}

/// One input that kills the worker and one that hangs it, among eight: the supervisor
/// restarts the worker, runs the batch again one image at a time, and the six others
/// come out right after the one lost batch; each culprit fails alone with how the
/// worker died.
#[test]
fn the_supervisor_isolates_an_input_that_kills_or_hangs_the_worker() {
    let d = tempfile::tempdir().unwrap();
    let Some(spec) = spec(d.path(), "StandIn") else {
        return;
    };
    let limits = Limits {
        batch_timeout: Some(Duration::from_secs(1)),
        max_attempts: 2,
    };
    let mut sup = start(spec, 8, limits).unwrap();
    let imgs: Vec<Vec<u8>> = (0..8).map(|i| image(i * 30)).collect();
    let input: Vec<u8> = imgs.concat();
    let prompts = ["a", "b", "die", "c", "d", "hang", "e", "f"];
    let params: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"prompt": p, "seed": i}))
        .collect();
    let n = 4 * 4 * 3;
    let mut out = vec![0u8; 8 * 2 * n];
    assert!(
        sup.run(&[], &[], &mut []).unwrap().is_empty(),
        "an empty batch"
    );
    let outcomes = sup.run(&input, &params, &mut out).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        match *p {
            "die" => assert_eq!(
                outcomes[i].message(),
                Some("model worker died on this input (signal 9)")
            ),
            "hang" => assert!(
                outcomes[i].message().is_some_and(
                    |e| e.starts_with("model worker hung on this input (no answer within 1 s")
                ),
                "{:?}",
                outcomes[i]
            ),
            _ => {
                assert_eq!(outcomes[i], RowOutcome::Made, "{p}");
                let (a, b) = expected(&imgs[i], i as i32);
                assert_eq!(&out[2 * i * n..(2 * i + 1) * n], &a[..], "{p}");
                assert_eq!(&out[(2 * i + 1) * n..(2 * i + 2) * n], &b[..], "{p}");
            }
        }
    }
    // The batch of 8 (dies at "die"), then singles: "die" and "hang" once each, and
    // once more each after the others (max_attempts 2). Halving took 8 or more: every
    // half holding a culprit cost a restart, and the good images waited for each.
    let restarts = sup.stats().restarts.load(Ordering::Relaxed);
    assert_eq!(restarts, 5);
}
