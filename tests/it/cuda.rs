//! GPU data path: pinned double buffers and the copy/compute streams. Needs CUDA, so
//! each test is ignored by default with that reason (CI is CPU-only: "ignored", not a
//! pass that tested nothing); on a GPU host `it cuda:: --include-ignored` runs them
//! (`scripts/device_w1.sh`), and one that finds no CUDA device then fails.

use crate::common::*;
use hotpipe::config::Config;

/// Run (by `--include-ignored`) on a machine without CUDA: fail, since a pass would
/// test nothing.
fn require_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device (tch::Cuda::is_available() is false)"
    );
}

fn cfg(dir: &std::path::Path, device: &str, precision: &str, slots: usize) -> Config {
    Config::load(&write(
        &dir.join(format!("{device}-{precision}-{slots}.toml").replace(':', "_")),
        &format!(
            "[model]\npath = \"m.pt\"\ndevice = \"{device}\"\nmax_batch = 4\nprecision = \"{precision}\"\n[preprocess]\nsize = 64\n[encode]\nformat = \"png\"\n[pipeline]\nbatch_slots = {slots}\n"
        ),
    ))
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA device: run `cuda:: --include-ignored` on a GPU host"]
fn gpu_streams_match_cpu_outputs() {
    require_cuda();
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    for i in 0..37 {
        write_jpeg(&inp.join(format!("{i:02}.jpg")), 80 + 3 * i, 100, i);
    }
    let inputs = hotpipe::process::collect_inputs(&[inp]).unwrap();
    let run = |c: &Config, name: &str, inject_oom: usize| {
        let out = d.path().join(name);
        if inject_oom > 0 {
            // Only this test's inputs (its temp dir) match the rule.
            let dir = inputs[0].parent().unwrap().display().to_string();
            hotpipe::vocab::fault::arm(&format!("infer:oom:{inject_oom}:{dir}"));
        }
        let s = hotpipe::process::run(c, inputs.clone(), &out, Default::default()).unwrap();
        assert_eq!((s.done, s.failed.len()), (37, 0), "{name}");
        out
    };
    let cpu = run(&cfg(d.path(), "cpu", "fp32", 2), "cpu", 0);
    // The last run injects out-of-memory errors on the CUDA path: split, stream sync,
    // cache flush and chunking at the learned size must lose nothing and change no pixel.
    for (precision, slots, max_allowed, oom) in [
        ("fp32", 2, 1, 0),
        ("fp32", 1, 1, 0),
        ("fp32", 4, 1, 0),
        ("fp16", 2, 8, 0),
        ("bf16", 3, 8, 0),
        ("fp32", 2, 1, 3),
    ] {
        let gpu = run(
            &cfg(d.path(), "cuda:0", precision, slots),
            &format!("gpu-{precision}-{slots}-{oom}"),
            oom,
        );
        for n in names(&cpu) {
            let a = image::open(cpu.join(&n)).unwrap().into_rgb8();
            let b = image::open(gpu.join(&n)).unwrap().into_rgb8();
            let max = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(&x, &y)| (x as i32 - y as i32).abs())
                .max()
                .unwrap();
            assert!(
                max <= max_allowed,
                "{precision} slots {slots} oom {oom} {n}: max diff {max}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: run `cuda:: --include-ignored` on a GPU host"]
fn cuda_shim_streams_events_and_memory() {
    require_cuda();
    use hotpipe::runtime::cuda::{self, Event, Stream};
    use tch::{Device, Kind, Tensor};
    let copy = Stream::from_pool(0, false).unwrap();
    let host = Tensor::arange(1 << 20, (Kind::Float, Device::Cpu)).pin_memory(Device::Cuda(0));
    let mut dev = Tensor::zeros([1 << 20], (Kind::Float, Device::Cuda(0)));
    {
        let _g = copy.enter().unwrap();
        cuda::copy_(&mut dev, &host, true).unwrap();
    }
    let mut ev = Event::new().unwrap();
    ev.record(&copy).unwrap();
    ev.synchronize().unwrap();
    assert!(ev.query().unwrap());
    let mut ev2 = Event::new().unwrap();
    {
        let _g = copy.enter().unwrap();
        let mut again = Tensor::zeros([1 << 20], (Kind::Float, Device::Cuda(0)));
        cuda::copy_(&mut again, &host, true).unwrap();
    }
    ev2.record(&copy).unwrap();
    ev2.wait().unwrap();
    assert!(ev2.query().unwrap());
    cuda::device_synchronize(0).unwrap();
    assert_eq!(
        dev.sum(Kind::Double).double_value(&[]),
        host.sum(Kind::Double).double_value(&[])
    );
    let (free, total) = cuda::mem_info(0).unwrap();
    assert!(free > 0 && free <= total);
    cuda::empty_cache().unwrap();
}

/// The Python backend on CUDA: the worker page-locks the shared slots (cudaHostRegister,
/// checked through torch, which asks the driver), a class with `inputs = "torch"` gets
/// its batch as a uint8 tensor on the GPU, and its GPU result comes back through the
/// output slot.
#[test]
#[ignore = "needs a CUDA device: run `cuda:: --include-ignored` on a GPU host"]
fn python_worker_pins_the_shared_slots_and_hands_cuda_tensors() {
    use hotpipe::runtime::python::{Limits, RowOutcome, Shape, WorkerSpec, start_workers};
    require_cuda();
    let py = python().expect("HOTPIPE_PYTHON: an interpreter with CUDA torch");
    let d = tempfile::tempdir().unwrap();
    let entry = write(
        &d.path().join("on_gpu.py"),
        r#"
import torch
import hotpipe_worker

class OnGpu:
    inputs = "torch"

    def __init__(self, device, options):
        self.device = device

    def output_shape(self, h, w, c):
        return (1, h, w, c)

    def __call__(self, images, params):
        assert hotpipe_worker.pinned_bytes > 0, "the shared slots are not page-locked"
        assert images.is_cuda and images.dtype == torch.uint8, (images.device, images.dtype)
        return 255 - images
"#,
    );
    let spec = WorkerSpec {
        python: py,
        module_dir: WorkerSpec::default_module_dir(),
        entry: format!("{}:OnGpu", entry.display()),
        device: "cuda:0".into(),
        options: serde_json::json!({}),
        placeholders: serde_json::json!({}),
        cpu_threads: None,
    };
    let shape = Shape {
        slots: 2,
        rows: 4,
        hwc: [16, 16, 3],
    };
    let limits = Limits {
        batch_timeout: Some(std::time::Duration::from_secs(120)),
        max_attempts: 1,
    };
    let (mut sups, _) = start_workers(vec![spec], shape, limits, vec![Default::default()])
        .unwrap_or_else(|e| panic!("{e}"));
    let input: Vec<u8> = (0..6 * 16 * 16 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let params = vec![serde_json::json!({}); 6];
    let mut out = vec![0u8; input.len()];
    let outcomes = sups[0].run(&input, &params, &mut out).unwrap();
    assert_eq!(outcomes, vec![RowOutcome::Made; 6]);
    let want: Vec<u8> = input.iter().map(|v| 255 - v).collect();
    assert_eq!(out, want);
}
