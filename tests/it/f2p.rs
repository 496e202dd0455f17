//! `examples/f2p` for real: the shipped config and class, with only the paths and the
//! device changed, run DiffSynth-Studio's and diffusers' own Qwen-Image-Edit pipeline
//! code in the generator's venv (`scripts/setup_f2p.sh`) on the tiny random-weights
//! fixture (`models/f2p-tiny`, `scripts/f2p_tiny/make.py`), offline, through the hot
//! folder, `process --manifest` and `check`. Any network connection a worker attempts
//! fails it and is recorded (a `sitecustomize` guard), and the test fails on the record.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// The generator's interpreter and the fixture, or `None` after [`skip`] said why.
fn f2p_env() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("models/f2p-tiny");
    let py = std::env::var_os("HOTPIPE_F2P_PYTHON").map(PathBuf::from);
    match py {
        Some(py) if py.is_file() && fixture.join("diffsynth/model_configs.json").is_file() => {
            Some((py, fixture))
        }
        _ => {
            skip("f2p: needs HOTPIPE_F2P_PYTHON and models/f2p-tiny (scripts/setup_f2p.sh)");
            None
        }
    }
}

/// Fails any IPv4/IPv6 connection (and notes it in `$HOTPIPE_TEST_NET_LOG`), then runs
/// the fixture's own `sitecustomize` (which registers the tiny models with DiffSynth).
const NET_GUARD: &str = r#"
import os, runpy, socket
_log = os.environ["HOTPIPE_TEST_NET_LOG"]
_connect = socket.socket.connect

def _guard(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(_log, "a") as f:
            f.write(f"pid {os.getpid()} tried {address!r}\n")
        raise OSError(f"no network in hotpipe's tests (tried {address!r})")
    return _connect(self, address)

socket.socket.connect = _guard
socket.socket.connect_ex = _guard
runpy.run_path(os.environ["HOTPIPE_TEST_TINY_SITE"])
"#;

/// One F2P run's folder: the config, the guard, the environment the daemon (and so its
/// workers) gets.
struct F2p {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    env: Vec<(String, String)>,
    py: PathBuf,
    fixture: PathBuf,
}

impl F2p {
    /// `examples/f2p/pipeline.toml` with its paths pointed here and the device on the CPU;
    /// `uncomment` turns commented option lines on (`library = "diffusers"`).
    fn new(uncomment: &[&str]) -> Option<F2p> {
        let (py, fixture) = f2p_env()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf");
        for sub in ["inbox", "work", "outbox", "done", "failed"] {
            std::fs::create_dir_all(hf.join(sub)).unwrap();
        }
        let shipped = std::fs::read_to_string(root.join("examples/f2p/pipeline.toml")).unwrap();
        let q = |p: &Path| format!("\"{}\"", p.display());
        let mut swaps: Vec<(String, String)> = vec![
            (
                "\"../../models/mtcnn\"".into(),
                q(&root.join("models/mtcnn")),
            ),
            (
                "\"pipeline.py:F2P\"".into(),
                format!(
                    "\"{}:F2P\"",
                    root.join("examples/f2p/pipeline.py").display()
                ),
            ),
            ("\"/opt/f2p/venv/bin/python\"".into(), q(&py)),
            ("[\"cuda:0\"]".into(), "\"cpu\"".into()),
            (
                "\"/opt/f2p/models/DiffSynth-Studio/Qwen-Image-Edit-F2P/model.safetensors\"".into(),
                q(&fixture.join("lora/f2p-tiny.safetensors")),
            ),
            ("\"/opt/f2p/models\"".into(), q(&fixture)),
            // The daemon's listener on a free port (tests run side by side).
            (
                "root = \"hotfolder\"".into(),
                format!(
                    "root = {}\nsettle_ms = 100\n\n[metrics]\nlisten = \"127.0.0.1:0\"",
                    q(&hf)
                ),
            ),
        ];
        swaps.extend(
            uncomment
                .iter()
                .map(|l| (format!("# {l}\n"), format!("{l}\n"))),
        );
        let mut cfg = shipped;
        for (from, to) in &swaps {
            assert!(
                cfg.contains(from.as_str()),
                "examples/f2p/pipeline.toml no longer has {from}"
            );
            cfg = cfg.replace(from.as_str(), to);
        }
        let cfg = write(&dir.path().join("f2p.toml"), &cfg);
        let site = dir.path().join("site");
        write(&site.join("sitecustomize.py"), NET_GUARD);
        let s = |p: &Path| p.display().to_string();
        let env = vec![
            // The guard first (it runs the fixture's sitecustomize), then the fixture's
            // DiffSynth classes.
            (
                "PYTHONPATH".into(),
                format!("{}:{}", s(&site), s(&fixture.join("diffsynth"))),
            ),
            (
                "HOTPIPE_TEST_NET_LOG".into(),
                s(&dir.path().join("net.log")),
            ),
            (
                "HOTPIPE_TEST_TINY_SITE".into(),
                s(&fixture.join("diffsynth/sitecustomize.py")),
            ),
            ("HF_HUB_OFFLINE".into(), "1".into()),
            ("TRANSFORMERS_OFFLINE".into(), "1".into()),
            ("DIFFSYNTH_SKIP_DOWNLOAD".into(), "True".into()),
            // One torch thread per worker: the 2-core machine also runs the face crop.
            ("OMP_NUM_THREADS".into(), "1".into()),
        ];
        Some(F2p {
            dir,
            cfg,
            env,
            py,
            fixture,
        })
    }

    fn hf(&self) -> PathBuf {
        self.dir.path().join("hf")
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// `hotpipe ARGS` with the workers' environment.
    fn cli(&self, args: &[&str]) -> Cli {
        let mut cmd = hotpipe();
        cmd.args(args).envs(self.env());
        cmd.output().unwrap().into()
    }

    /// `process --json --manifest` over the astronaut photo saved once per row as
    /// `<name>.png`, each row `(name, its parameters as JSON fields)`, with `extra` args;
    /// the output folder and the summary (the run must have succeeded).
    fn manifest(&self, rows: &[(&str, String)], extra: &[&str]) -> (PathBuf, serde_json::Value) {
        let d = self.dir.path();
        let photo = astronaut();
        let mut lines = String::new();
        for (name, fields) in rows {
            std::fs::write(d.join(format!("{name}.png")), &photo).unwrap();
            lines.push_str(&format!("{{\"image\": \"{name}.png\", {fields}}}\n"));
        }
        let manifest = write(&d.join("jobs.jsonl"), &lines);
        let out = d.join("out");
        let (cfg, out_s, man) = (
            self.cfg.display().to_string(),
            out.display().to_string(),
            manifest.display().to_string(),
        );
        let mut args = vec!["process", "--json", "--config", &cfg, "--out", &out_s];
        args.extend(extra);
        args.extend(["--manifest", man.as_str()]);
        let r = self.cli(&args);
        assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
        (out, serde_json::from_str(&r.stdout).unwrap())
    }

    /// No worker tried the network.
    fn assert_offline(&self) {
        let log = std::fs::read_to_string(self.dir.path().join("net.log")).unwrap_or_default();
        assert!(log.is_empty(), "network connections attempted:\n{log}");
    }
}

fn astronaut() -> Vec<u8> {
    std::fs::read(
        shared_bench()
            .expect("bench fixtures")
            .join("astronaut.png"),
    )
    .unwrap()
}

fn sidecar(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn rgb(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().into_rgb8().into_raw()
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// DiffSynth's own pipeline called directly (not through the example's class) on `crop`
/// with `params`, without and then with the LoRA: each image's raw RGB to `<out>.nolora`
/// and `<out>.lora`.
const REFERENCE: &str = r#"
import contextlib, io, json, sys
import numpy as np, torch
from PIL import Image
from diffsynth.pipelines.qwen_image import ModelConfig, QwenImagePipeline
torch.set_num_threads(1)
models, lora, crop, out, p = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
cfg = lambda m, pat: ModelConfig(model_id=m, origin_file_pattern=pat, local_model_path=models, skip_download=True)
with contextlib.redirect_stdout(io.StringIO()):
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[cfg("Qwen/Qwen-Image-Edit", "transformer/diffusion_pytorch_model*.safetensors"),
                       cfg("Qwen/Qwen-Image", "text_encoder/model*.safetensors"),
                       cfg("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors")],
        tokenizer_config=None, processor_config=cfg("Qwen/Qwen-Image-Edit", "processor/"))
face = Image.open(crop).convert("RGB")
def gen():
    return np.asarray(pipe(p["prompt"], negative_prompt=p["negative_prompt"], cfg_scale=p["cfg_scale"],
                           edit_image=face, seed=p["seed"], num_inference_steps=p["steps"],
                           height=1152, width=864, progress_bar_cmd=lambda s: s).convert("RGB"))
open(out + ".nolora", "wb").write(gen().tobytes())
with contextlib.redirect_stdout(io.StringIO()):
    pipe.load_lora(pipe.dit, lora)
open(out + ".lora", "wb").write(gen().tobytes())
"#;

/// The exact 1024 px face crop hotpipe hands the generator: the same config's face crop
/// and fit, without the model, as PNG (lossless).
fn face_crop_of(f: &F2p, photo: &Path) -> PathBuf {
    let text = std::fs::read_to_string(&f.cfg).unwrap();
    let model_at = text.find("[model]").unwrap();
    let pre_at = text.find("[preprocess]").unwrap();
    let mut crop = format!("{}{}", &text[..model_at], &text[pre_at..]);
    let params_at = crop.find("[params]").unwrap();
    crop.truncate(params_at);
    crop = crop.replace("format = \"jpeg\"", "format = \"png\"");
    let cfg = write(&f.dir.path().join("crop.toml"), &crop);
    let out = f.dir.path().join("crop");
    let r = process(&cfg, &out, &[photo]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    out.join(format!(
        "{}.png",
        photo.file_stem().unwrap().to_string_lossy()
    ))
}

const BASE: &str =
    r#""prompt": "a woman in a red coat walking in a park, full body", "seed": 7, "steps": 2"#;

/// The whole story through the hot folder with DiffSynth and the F2P LoRA: each photo's
/// parameters reach the pipeline (each one changed alone changes the output; the same
/// ones twice give the same bytes), a prompt the pipeline itself rejects fails that
/// photo alone with the exception's last line, a worker SIGKILLed mid-generation is
/// restarted and every photo is published exactly once, the sidecars name the parameters
/// and the model, /metrics shows the worker's busy time, and nothing touched the network.
#[test]
fn the_f2p_example_generates_through_the_hot_folder_with_diffsynth_and_its_lora() {
    let Some(f) = F2p::new(&[]) else {
        return;
    };
    let hf = f.hf();
    let photo = astronaut();
    let daemon = Daemon::start(&f.cfg, &f.env());
    daemon.expect_log("hot folder ready", Duration::from_secs(300));
    let worker = *workers_of(daemon.pid()).first().expect("a model worker");

    // A long generation, its worker killed half-way (seen busy for over a second of CPU).
    let idle = cpu_ticks(worker);
    deliver(
        &hf,
        "slow.json",
        br#"{"prompt": "a man in a suit", "seed": 3, "steps": 12}"#,
    );
    deliver(&hf, "slow.png", &photo);
    assert!(
        wait_until(Duration::from_secs(120), || cpu_ticks(worker) > idle + 150),
        "the worker never got busy\n{}",
        daemon.log()
    );
    unsafe { libc::kill(worker, libc::SIGKILL) };

    let cases: [(&str, String); 8] = [
        ("a", format!("{{{BASE}}}")),
        ("same", format!("{{{BASE}}}")),
        (
            "prompt",
            format!("{{{}}}", BASE.replace("red coat", "blue dress")),
        ),
        (
            "negative",
            format!("{{{BASE}, \"negative_prompt\": \"blurry, low quality\"}}"),
        ),
        (
            "seed",
            format!("{{{}}}", BASE.replace("\"seed\": 7", "\"seed\": 8")),
        ),
        (
            "steps",
            format!("{{{}}}", BASE.replace("\"steps\": 2", "\"steps\": 3")),
        ),
        ("cfg", format!("{{{BASE}, \"cfg_scale\": 1.5}}")),
        (
            "rejected",
            format!("{{{}}}", BASE.replace("red coat", "red <|image_pad|> coat")),
        ),
    ];
    for (name, params) in &cases {
        deliver(&hf, &format!("{name}.json"), params.as_bytes());
        deliver(&hf, &format!("{name}.png"), &photo);
    }
    let all = cases.len() + 1;
    assert!(
        wait_until(Duration::from_secs(600), || names(&hf.join("done")).len()
            == 2 * (all - 1)
            && names(&hf.join("failed")).len() == 3),
        "done {:?} failed {:?}\n{}",
        names(&hf.join("done")),
        names(&hf.join("failed")),
        daemon.log()
    );
    let (_, metrics) = http_get(&daemon.metrics_addr(), "/metrics");
    assert_eq!(daemon.stop().0, Some(0));
    f.assert_offline();

    // Exactly once: every photo but the rejected one, one output and one sidecar each.
    let mut want: Vec<String> = ["slow"]
        .into_iter()
        .chain(cases.iter().map(|(n, _)| *n).filter(|n| *n != "rejected"))
        .flat_map(|n| [format!("{n}.jpg"), format!("{n}.json")])
        .collect();
    want.sort();
    assert_eq!(names(&hf.join("outbox")), want);
    assert_eq!(
        names(&hf.join("failed")),
        [
            "rejected.png",
            "rejected.png.error.json",
            "rejected.png.params.json"
        ]
    );
    let why = sidecar(&hf.join("failed/rejected.png.error.json"));
    let reason = why["reason"].as_str().unwrap();
    assert!(
        reason.contains("ValueError: The total number of <|image_pad|> tokens"),
        "{why}"
    );
    assert!(
        metric(
            &metrics,
            "hotpipe_model_worker_restarts_total{worker=\"0\"}"
        ) >= 1.0
    );
    let busy = metric(
        &metrics,
        "hotpipe_model_worker_busy_seconds_total{worker=\"0\"}",
    );
    assert!(busy > 5.0, "busy {busy} s\n{metrics}");

    // Each parameter reaches the call; the same ones give the same bytes.
    let out = |n: &str| std::fs::read(hf.join(format!("outbox/{n}.jpg"))).unwrap();
    assert_eq!(out("a"), out("same"), "same seed, different bytes");
    for changed in ["prompt", "negative", "seed", "steps", "cfg"] {
        assert_ne!(
            out("a"),
            out(changed),
            "{changed} did not change the output"
        );
    }

    // The sidecar names the parameters and the model that made it.
    let side = sidecar(&hf.join("outbox/a.json"));
    assert_eq!(side["params"]["seed"], 7);
    assert_eq!(side["params"]["steps"], 2);
    assert_eq!(side["params"]["cfg_scale"], 4.0);
    let pipe = &side["model"]["pipeline"];
    assert_eq!(pipe["library"], "diffsynth", "{side}");
    assert_eq!(pipe["version"], "2.1.12");
    assert_eq!(
        pipe["pipeline"],
        "diffsynth.pipelines.qwen_image.QwenImagePipeline"
    );
    assert_eq!(pipe["models"], f.fixture.display().to_string());
    assert_eq!(pipe["lora"]["tensors_changed"], 16, "{side}");
}

/// `process --manifest` (PNG out, so nothing is lost to JPEG): two photos with the same
/// parameters give the same bytes, and the output is exactly what DiffSynth's own
/// pipeline makes, called directly on hotpipe's face crop with the LoRA loaded by
/// DiffSynth, and not what it makes without the LoRA: the example's class is the real
/// library, and the LoRA is applied.
#[test]
fn a_manifest_through_the_f2p_example_matches_diffsynth_called_directly() {
    let Some(f) = F2p::new(&[]) else {
        return;
    };
    let d = f.dir.path();
    let row =
        r#""prompt": "a woman in a red coat walking in a park, full body", "seed": 7, "steps": 2"#;
    let (out, summary) = f.manifest(
        &[("a", row.to_string()), ("b", row.to_string())],
        &["--set", "encode.format=png"],
    );
    assert_eq!(
        (summary["done"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(0)),
        "{summary}"
    );
    let made = rgb(&out.join("a.png"));
    assert_eq!(
        made,
        rgb(&out.join("b.png")),
        "same parameters, different images"
    );
    assert_eq!(
        sidecar(&out.join("a.json"))["params"]["prompt"],
        "a woman in a red coat walking in a park, full body"
    );

    let crop = face_crop_of(&f, &d.join("a.png"));
    let refs = d.join("ref");
    let p = r#"{"prompt": "a woman in a red coat walking in a park, full body", "negative_prompt": "", "cfg_scale": 4.0, "seed": 7, "steps": 2}"#;
    let r: Cli = std::process::Command::new(&f.py)
        .args(["-c", REFERENCE])
        .arg(&f.fixture)
        .arg(f.fixture.join("lora/f2p-tiny.safetensors"))
        .arg(&crop)
        .arg(&refs)
        .arg(p)
        .envs(f.env())
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    f.assert_offline();
    let with = std::fs::read(refs.with_extension("lora")).unwrap();
    let without = std::fs::read(refs.with_extension("nolora")).unwrap();
    let (p_with, p_without) = (psnr(&made, &with), psnr(&made, &without));
    assert!(
        p_with > 60.0 && p_without < 40.0,
        "PSNR against DiffSynth with the LoRA {p_with:.1} dB, without {p_without:.1} dB"
    );
}

/// The diffusers variants, chosen in `[model.options]`: `QwenImageEditPipeline` and
/// `QwenImageEditPlusPipeline` (the 2509/2511 models) load the same fixture and the
/// DiffSynth-format LoRA (diffusers converts its keys: every LoRA tensor changed a
/// weight), take each row's parameters (same seed, same bytes; another prompt, another
/// image) and say in the sidecar which pipeline made the output.
#[test]
fn the_f2p_example_runs_on_diffusers_edit_and_edit_plus() {
    let variants: [(&[&str], &str); 2] = [
        (
            &["library = \"diffusers\""],
            "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit.QwenImageEditPipeline",
        ),
        (
            &[
                "library = \"diffusers\"",
                "pipeline = \"edit-plus\"",
                "model = \"Qwen/Qwen-Image-Edit-2509\"",
            ],
            "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus.QwenImageEditPlusPipeline",
        ),
    ];
    for (lines, class) in variants {
        let Some(f) = F2p::new(lines) else {
            return;
        };
        let row = |prompt: &str| format!(r#""prompt": "{prompt}", "seed": 5, "steps": 2"#);
        let (out, _) = f.manifest(
            &[
                ("a", row("a man in a grey suit")),
                ("b", row("a man in a grey suit")),
                ("c", row("a man in a green jacket")),
            ],
            &[],
        );
        f.assert_offline();
        let read = |n: &str| std::fs::read(out.join(format!("{n}.jpg"))).unwrap();
        assert_eq!(read("a"), read("b"), "{class}: same seed, different bytes");
        assert_ne!(
            read("a"),
            read("c"),
            "{class}: the prompt did not reach the call"
        );
        let side = sidecar(&out.join("a.json"));
        let pipe = &side["model"]["pipeline"];
        assert_eq!(pipe["pipeline"], class, "{side}");
        assert_eq!(pipe["library"], "diffusers");
        assert_eq!(pipe["version"], "0.42.1");
        assert_eq!(pipe["lora"]["tensors_changed"], 16, "{side}");
    }
}

/// `check` starts the generator once and names the pipeline, its library and version,
/// and the weights (text and `--json`).
#[test]
fn check_names_the_f2p_pipeline_its_library_and_version() {
    let Some(f) = F2p::new(&[]) else {
        return;
    };
    let cfg = f.cfg.display().to_string();
    let r = f.cli(&["check", "--json", "--config", &cfg]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let pipe = &j["model"]["pipeline"];
    assert_eq!(pipe["library"], "diffsynth", "{j}");
    assert_eq!(pipe["version"], "2.1.12");
    assert_eq!(pipe["class"], "F2P");
    assert_eq!(pipe["model"], "Qwen/Qwen-Image-Edit");
    let r = f.cli(&["check", "--config", &cfg]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(
            "  pipeline: diffsynth.pipelines.qwen_image.QwenImagePipeline (diffsynth 2.1.12)"
        ),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("lora: {"), "{}", r.stdout);
    f.assert_offline();
}

/// The full-size timing run's models (scripts/f2p_full.py, for a lent GPU) build at the
/// published sizes: on the meta device (no memory), counted (about 20.4 B, 8.3 B and
/// 0.13 B parameters) and equal to DiffSynth's own full-size classes, its pipeline
/// assembled with the real processor's image sizes and the text encoder looking for the
/// tokenizer's image token, so the first run on a GPU does not fail on a typo.
#[test]
fn the_full_size_f2p_models_build_at_the_published_sizes() {
    let Some((py, fixture)) = f2p_env() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/f2p_full.py"))
        .arg("meta")
        .env("HOTPIPE_F2P_FIXTURE", &fixture)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let n = |k: &str| j["parameters"][k].as_f64().unwrap();
    assert!((20.0e9..21.0e9).contains(&n("transformer")), "{j}");
    assert!((8.0e9..8.6e9).contains(&n("text_encoder")), "{j}");
    assert!((0.11e9..0.14e9).contains(&n("vae")), "{j}");
    assert_eq!(j["parameters"], j["diffsynth_parameters"], "{j}");
    assert_eq!(j["image_token_id"][0], j["image_token_id"][1], "{j}");
    assert_eq!(j["max_pixels"], 12_845_056);
}
