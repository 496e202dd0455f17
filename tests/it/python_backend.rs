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

/// Every `python -m hotpipe_worker` whose parent is `pid`.
fn workers_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1));
        if ppid == Some(&pid.to_string())
            && String::from_utf8_lossy(&cmd).contains("hotpipe_worker")
        {
            v.push(p);
        }
    }
    v
}

/// 24 photos, each with its own prompt and seed, among them one whose prompt makes the
/// pipeline raise, one that kills the worker and one that hangs it: the 21 others are
/// published once each, equal to the class's own output computed in Python; the three
/// are in failed/ with what happened; the worker's restarts are in /metrics; the daemon
/// stops cleanly and leaves no worker behind.
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
    let bad = [(5, "poison"), (11, "die"), (17, "hang")];
    let mut good = Vec::new();
    for i in 0..24u32 {
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
        images("done") + images("failed") == 24 && names(&hf.join("work")).is_empty()
    });
    assert!(
        settled,
        "done {:?}\nfailed {:?}\n{}",
        names(&hf.join("done")),
        names(&hf.join("failed")),
        daemon.log()
    );
    let (_, metrics) = http_get(&daemon.metrics_addr(), "/metrics");
    let (health, _) = http_get(&daemon.metrics_addr(), "/healthz");
    let pid = daemon.pid();
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
        reason("p05.png").contains("ValueError: a poisoned prompt"),
        "{}",
        reason("p05.png")
    );
    assert!(
        reason("p11.png").contains("model worker died on this input (signal 9)"),
        "{}",
        reason("p11.png")
    );
    assert!(
        reason("p17.png").contains("model worker hung on this input"),
        "{}",
        reason("p17.png")
    );
    assert_eq!(images("failed"), 3);
    // Each culprit that takes the worker down does so max_attempts (2) times, and every
    // halving on the way there costs a restart too.
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

/// A stand-in for DiffSynth-Studio's `diffsynth.pipelines.qwen_image` with its call
/// signature: it checks what the example hands it and makes an image whose top rows say
/// which prompt, negative prompt, seed and steps it was given.
const DIFFSYNTH: &str = r#"
import os
import numpy as np
from PIL import Image

class ModelConfig:
    def __init__(self, model_id=None, origin_file_pattern=None, path=None):
        self.model_id, self.pattern, self.path = model_id, origin_file_pattern, path

class QwenImagePipeline:
    @staticmethod
    def from_pretrained(torch_dtype, device, model_configs, tokenizer_config, processor_config):
        assert len(model_configs) == 3 and processor_config.model_id == "Qwen/Qwen-Image-Edit"
        p = QwenImagePipeline()
        p.dit = object()
        return p

    def load_lora(self, module, path):
        assert module is self.dit and os.path.isfile(path), path

    def __call__(self, prompt, negative_prompt="", edit_image=None, seed=0,
                 num_inference_steps=40, height=1024, width=1024):
        assert isinstance(edit_image, Image.Image) and edit_image.mode == "RGB"
        out = np.asarray(edit_image.resize((width, height))).copy()
        out[:8] = (7 * len(prompt) + len(negative_prompt) + seed + num_inference_steps) % 256
        return Image.fromarray(out)
"#;

/// The shipped `examples/f2p` config and class, on the CPU against the stand-in above:
/// the config is valid, the face is cropped from the astronaut portrait, each photo's
/// parameters reach DiffSynth's call and its image reaches the outbox at the size the
/// options ask for.
#[test]
fn the_f2p_example_runs_against_diffsynths_api() {
    let Some(py) = python() else {
        skip("f2p example: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let weights = root.join("models/mtcnn");
    let Some(bench) = shared_bench() else {
        skip("f2p example: no bench fixtures with astronaut.png");
        return;
    };
    if !weights.join("pnet.pt").is_file() {
        skip("f2p example: no models/mtcnn (scripts/setup.sh writes it)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let stub = d.path().join("stub");
    write(&stub.join("diffsynth/__init__.py"), "");
    write(&stub.join("diffsynth/pipelines/__init__.py"), "");
    write(&stub.join("diffsynth/pipelines/qwen_image.py"), DIFFSYNTH);
    let lora = write(&d.path().join("f2p.safetensors"), "not weights");
    let hf = d.path().join("hf");
    let shipped = std::fs::read_to_string(root.join("examples/f2p/pipeline.toml")).unwrap();
    let mut cfg = shipped.clone();
    for (from, to) in [
        (
            "weights = \"../../models/mtcnn\"".to_string(),
            format!("weights = \"{}\"", weights.display()),
        ),
        (
            "entry = \"pipeline.py:F2P\"".into(),
            format!(
                "entry = \"{}:F2P\"",
                root.join("examples/f2p/pipeline.py").display()
            ),
        ),
        (
            "python = \"/opt/f2p/venv/bin/python\"".into(),
            format!("python = \"{}\"", py.display()),
        ),
        ("device = [\"cuda:0\"]".into(), "device = \"cpu\"".into()),
        (
            "lora = \"/opt/f2p/models/DiffSynth-Studio/Qwen-Image-Edit-F2P/model.safetensors\""
                .into(),
            format!("lora = \"{}\"", lora.display()),
        ),
        ("height = 1152".into(), "height = 96".into()),
        ("width = 864".into(), "width = 64".into()),
        ("size = 1024".into(), "size = 256".into()),
        (
            "root = \"hotfolder\"".into(),
            format!(
                "root = \"{}\"\nsettle_ms = 100\n\n[metrics]\nlisten = \"off\"",
                hf.display()
            ),
        ),
    ] {
        assert!(
            cfg.contains(&from),
            "examples/f2p/pipeline.toml no longer has {from}"
        );
        cfg = cfg.replace(&from, &to);
    }
    assert!(
        shipped.contains("margin = 0.05"),
        "the tight crop the model card asks for"
    );
    let cfg = write(&d.path().join("f2p.toml"), &cfg);
    for sub in ["inbox", "work", "outbox", "done", "failed"] {
        std::fs::create_dir_all(hf.join(sub)).unwrap();
    }
    let stub_path = stub.display().to_string();
    let daemon = Daemon::start(&cfg, &[("PYTHONPATH", stub_path.as_str())]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    let params =
        r#"{"prompt": "a man in a suit, full body", "seed": 9, "negative_prompt": "blur"}"#;
    deliver(&hf, "astro.json", params.as_bytes());
    deliver(
        &hf,
        "astro.png",
        &std::fs::read(bench.join("astronaut.png")).unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(120), || names(&hf.join("done")).len()
            == 2),
        "done {:?} failed {:?}\n{}",
        names(&hf.join("done")),
        names(&hf.join("failed")),
        daemon.log()
    );
    assert_eq!(daemon.stop().0, Some(0));
    let out = image::open(hf.join("outbox/astro.jpg"))
        .unwrap()
        .into_rgb8();
    assert_eq!(out.dimensions(), (64, 96));
    // 7 * 26 + 4 + 9 + 40 (the steps' default) = 235.
    let top: f64 = out.as_raw()[..64 * 4 * 3]
        .iter()
        .map(|&v| f64::from(v))
        .sum::<f64>()
        / (64.0 * 12.0);
    assert!((top - 235.0).abs() < 4.0, "top rows {top}");
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("outbox/astro.json")).unwrap())
            .unwrap();
    assert_eq!(side["params"]["steps"], 40);
    assert_eq!(side["params"]["negative_prompt"], "blur");
}
