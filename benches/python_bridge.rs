//! The Python backend's bridge cost: an identity pipeline in a `hotpipe_worker` process
//! (the batch read in place from shared memory, the result written in place into the
//! output slot: one frame each way) against the in-process identity (the TorchScript
//! backend's CPU path without a model: one copy of the batch into the output ring), at
//! 512 and 1024 px, batches of 8, alternating, median of 5 rounds of 20 batches each.
//!
//! Run: `source scripts/env.sh && cargo bench --bench python_bridge`. The Python side
//! needs `$HOTPIPE_PYTHON` (hotpipe's venv: numpy).

use std::time::{Duration, Instant};

use serde_json::json;
use tch::{Device, Kind, Tensor};

use hotpipe::runtime::python::{Limits, Shape, WorkerSpec, start_workers};

const IDENTITY: &str = "
class Identity:
    def __init__(self, device, options): pass
    def output_shape(self, h, w, c): return (1, h, w, c)
    def __call__(self, images, params): return images
";

const ROWS: usize = 8;
const BATCHES: usize = 20;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds per image of `BATCHES` batches through `run`.
fn per_image(mut run: impl FnMut()) -> f64 {
    run(); // warm
    let t = Instant::now();
    for _ in 0..BATCHES {
        run();
    }
    t.elapsed().as_secs_f64() * 1e3 / (BATCHES * ROWS) as f64
}

fn main() {
    let python =
        std::env::var_os("HOTPIPE_PYTHON").expect("HOTPIPE_PYTHON (source scripts/env.sh)");
    let dir = tempfile::tempdir().unwrap();
    let entry = dir.path().join("identity.py");
    std::fs::write(&entry, IDENTITY).unwrap();
    println!(
        "| size | in-process ms/image | Python bridge ms/image | bridge cost ms/image | ratio |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for side in [512usize, 1024] {
        let spec = WorkerSpec {
            python: python.clone().into(),
            module_dir: WorkerSpec::default_module_dir(),
            entry: format!("{}:Identity", entry.display()),
            device: "cpu".into(),
            options: json!({}),
            placeholders: json!({}),
            cpu_threads: None,
        };
        let shape = Shape {
            slots: 2,
            rows: ROWS,
            hwc: [side, side, 3],
        };
        let limits = Limits {
            batch_timeout: Some(Duration::from_secs(60)),
            max_attempts: 1,
        };
        let (mut sups, _shared) =
            start_workers(vec![spec], shape, limits, vec![Default::default()]).unwrap();
        let sup = &mut sups[0];
        let params = vec![json!({}); ROWS];
        let n = side as i64;
        let slot = Tensor::randint(256, [ROWS as i64, n, n, 3], (Kind::Uint8, Device::Cpu));
        let mut ring = Tensor::zeros([ROWS as i64, n, n, 3], (Kind::Uint8, Device::Cpu));
        let (mut inproc, mut bridge) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            inproc.push(per_image(|| {
                ring.copy_(&slot);
            }));
            bridge.push(per_image(|| {
                let r = sup.run_slots(0, 0, &params).unwrap();
                assert_eq!(r.len(), ROWS);
            }));
        }
        let (a, b) = (median(inproc), median(bridge));
        println!(
            "| {side} x {side} | {a:.3} | {b:.3} | {:.3} | {:.2}x |",
            b - a,
            b / a
        );
    }
}
