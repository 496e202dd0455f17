//! Per-item parameters end to end (`[params]`): a real scripted TorchScript model that
//! takes a prompt and a seed per image, driven by `process --manifest` and `--param`, and
//! checked against the same model run in the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use tch::{CModule, IValue, Kind, Tensor};

/// Tints each image by a hash of its prompt (red) and of its seed (green), so every
/// prompt and seed leaves its own mark; scripted, as lists of strings need.
const TINT: &str = r#"
import sys, torch
from typing import List
class Tint(torch.nn.Module):
    def forward(self, x: torch.Tensor, prompt: List[str], seed: List[int]) -> torch.Tensor:
        out = []
        for i in range(x.shape[0]):
            h = 0
            for c in prompt[i]:
                h = (h * 31 + ord(c)) % 997
            t = float(h) / 997.0
            s = float((seed[i] * 7919) % 256) / 255.0
            out.append(x[i] * 0.5 + torch.tensor([t, s, 0.5]).view(3, 1, 1) * 0.5)
        return torch.stack(out)
torch.jit.script(Tint()).save(sys.argv[1])
"#;

/// Three variations of each image (K = 3): the tint of its prompt with seeds `seed`,
/// `seed + 1`, `seed + 2`, rows `3i .. 3i+3` for input `i`.
const VARIATIONS: &str = r#"
import sys, torch
from typing import List
class Variations(torch.nn.Module):
    def forward(self, x: torch.Tensor, prompt: List[str], seed: List[int]) -> torch.Tensor:
        out = []
        for i in range(x.shape[0]):
            h = 0
            for c in prompt[i]:
                h = (h * 31 + ord(c)) % 997
            t = float(h) / 997.0
            for j in range(3):
                s = float(((seed[i] + j) * 7919) % 256) / 255.0
                out.append(x[i] * 0.5 + torch.tensor([t, s, 0.5]).view(3, 1, 1) * 0.5)
        return torch.stack(out)
torch.jit.script(Variations()).save(sys.argv[1])
"#;

/// The tint model at `path`, or `None` (after [`skip`]) without the venv's Python.
fn tint_model(path: &Path) -> Option<()> {
    scripted_model(TINT, path)
}

/// The model `source` writes to `path` (from a file: TorchScript reads the class's source
/// through `inspect`), or `None` (after [`skip`]) without the venv's Python.
fn scripted_model(source: &str, path: &Path) -> Option<()> {
    let Some(py) = python() else {
        skip("params: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return None;
    };
    let script = write(&path.with_extension("py"), source);
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// 32 x 32 images fitted 1:1 (the fit copies), the tint model, PNG out.
fn config(dir: &Path, schema: &str) -> PathBuf {
    write(
        &dir.join("p.toml"),
        &format!(
            "[model]\npath = \"tint.pt\"\ndevice = \"cpu\"\nmax_batch = 8\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\nfilter = \"lanczos3\"\n\n\
             [encode]\nformat = \"png\"\n\n[params.schema]\n{schema}"
        ),
    )
}

const SCHEMA: &str =
    "prompt = { type = \"string\" }\nseed = { type = \"int\", default = 0, min = 0 }\n";

/// What the model makes of `png` with `prompt` and `seed`, run here through tch.
fn reference(model: &CModule, png: &Path, prompt: &str, seed: i64) -> Vec<u8> {
    let img = image::open(png).unwrap().into_rgb8();
    let x = Tensor::from_slice(img.as_raw())
        .view([1, 32, 32, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let y = model
        .forward_is(&[
            IValue::Tensor(x),
            IValue::StringList(vec![prompt.to_string()]),
            IValue::IntList(vec![seed]),
        ])
        .unwrap();
    let IValue::Tensor(y) = y else {
        panic!("a tensor")
    };
    let y = (y.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let n = y.numel();
    let mut out = vec![0u8; n];
    y.copy_data_u8(&mut out, n);
    out
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(std::fs::read(path).unwrap());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_manifest_gives_each_image_its_own_prompt_in_mixed_batches() {
    let d = tempfile::tempdir().unwrap();
    if tint_model(&d.path().join("tint.pt")).is_none() {
        return;
    }
    let faces = d.path().join("faces");
    std::fs::create_dir(&faces).unwrap();
    let mut lines = String::new();
    let n = 100;
    for i in 0..n {
        write_png(&faces.join(format!("f{i:03}.png")), 32, 32, i);
        lines.push_str(&format!(
            "{{\"image\": \"faces/f{i:03}.png\", \"prompt\": \"person {i} in a red coat\", \"seed\": {}}}\n",
            i * 3
        ));
    }
    let cfg = config(d.path(), SCHEMA);
    let out = d.path().join("out");
    let process = |manifest: &Path| {
        cli([
            "process".as_ref(),
            "--quiet".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
        ])
    };
    // A row naming a missing image (line 51 of 102) and a bad seed (line 102) stop the
    // run before any work, both named.
    let bad = format!(
        "{}{{\"image\": \"faces/gone.png\", \"prompt\": \"x\"}}\n{}{{\"image\": \"faces/f000.png\", \"prompt\": \"x\", \"seed\": \"7\"}}\n",
        lines
            .lines()
            .take(50)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        lines
            .lines()
            .skip(50)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    let r = process(&write(&d.path().join("bad.jsonl"), &bad));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("2 rows cannot run")
            && r.stderr
                .contains("line 51: image `faces/gone.png` not found")
            && r.stderr
                .contains("line 102: parameter `seed` must be an integer"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "nothing ran");

    let r = process(&write(&d.path().join("jobs.jsonl"), &lines));
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("done {n}, failed 0")),
        "{}",
        r.stdout
    );

    let model = CModule::load(d.path().join("tint.pt")).unwrap();
    let hash = sha256(&d.path().join("tint.pt"));
    for i in 0..n {
        let got = image::open(out.join(format!("f{i:03}.png")))
            .unwrap()
            .into_rgb8();
        let want = reference(
            &model,
            &faces.join(format!("f{i:03}.png")),
            &format!("person {i} in a red coat"),
            i as i64 * 3,
        );
        let worst = got
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "f{i:03}: off by {worst} from its own prompt's output"
        );
        // The sidecar says what made it.
        let side: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("f{i:03}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            side["params"]["prompt"],
            format!("person {i} in a red coat")
        );
        assert_eq!(side["params"]["seed"], i * 3);
        assert_eq!(side["model"]["sha256"], hash.as_str());
    }
    // Neighbours in one batch got different prompts: their outputs differ in red.
    let a = image::open(out.join("f000.png")).unwrap().into_rgb8();
    let b = reference(&model, &faces.join("f000.png"), "person 1 in a red coat", 0);
    assert_ne!(a.as_raw(), &b, "the prompt changes the output");
}

/// Two inputs with the same stem, run with a config named relatively from its own
/// folder: each output's sidecar names its own input (path, name, hash, size), the
/// model by its absolute path with its precision, and the settings that made it;
/// `--json`'s `results` pairs each input with its outputs.
#[test]
fn every_sidecar_names_its_input_and_what_made_it() {
    let d = tempfile::tempdir().unwrap();
    if tint_model(&d.path().join("tint.pt")).is_none() {
        return;
    }
    let inputs = [d.path().join("faces/a.png"), d.path().join("other/a.png")];
    for (i, p) in inputs.iter().enumerate() {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_png(p, 32, 32, i as u32);
    }
    config(d.path(), SCHEMA);
    let r: Cli = hotpipe()
        .current_dir(d.path())
        .args([
            "process", "--quiet", "--json", "-c", "p.toml", "--out", "out",
        ])
        .args(["--param", "prompt=x", "faces/a.png", "other/a.png"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let summary: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let results = summary["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{summary}");
    for res in results {
        let given = res["input"].as_str().unwrap();
        let input = d.path().join(given);
        // The output and its sidecar.
        let [output, json] = &res["outputs"].as_array().unwrap()[..] else {
            panic!("one output each: {res}")
        };
        let output = d.path().join(output.as_str().unwrap());
        assert!(output.exists(), "{res}");
        let side = sidecar(&d.path().join(json.as_str().unwrap()));
        let i = &side["input"];
        assert_eq!(i["path"], input.to_string_lossy().as_ref(), "{side}");
        assert_eq!(i["name"], "a.png");
        assert_eq!(i["sha256"], sha256(&input).as_str());
        assert_eq!(i["bytes"], std::fs::metadata(&input).unwrap().len());
        let m = &side["model"];
        assert_eq!(
            m["path"],
            d.path().join("tint.pt").to_string_lossy().as_ref()
        );
        assert_eq!(m["precision"], "fp32");
        let recipe = &side["recipe"];
        assert_eq!(
            recipe["config"],
            d.path().join("p.toml").to_string_lossy().as_ref()
        );
        assert_eq!(recipe["preprocess"]["size"], serde_json::json!([32, 32]));
        assert_eq!(recipe["preprocess"]["filter"], "lanczos3");
        assert_eq!(recipe["encode"]["format"], "png");
        assert_eq!(recipe["decode"]["dct_scaling"], "auto");
        assert_eq!(recipe["face_crop"], serde_json::Value::Null);
    }
    let (a, b) = (sha256(&inputs[0]), sha256(&inputs[1]));
    assert_ne!(a, b, "two different inputs");
}

/// A model returning K = 3 outputs per input: `check` says so, `process` and the hot
/// folder write `<name>_1 .. <name>_3` with a sidecar each that names its output and
/// the parameters, and every output is the model's own for its input, prompt and seed,
/// across batch boundaries (5 images in batches of 4).
#[test]
fn k_outputs_per_input_each_with_its_sidecar() {
    let d = tempfile::tempdir().unwrap();
    if scripted_model(VARIATIONS, &d.path().join("tint.pt")).is_none() {
        return;
    }
    let cfg = config(d.path(), SCHEMA).to_string_lossy().into_owned();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("max_batch = 8", "max_batch = 4"),
    )
    .unwrap();
    let r = cli(["check", "--config", &cfg]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("3 outputs per input, written <name>_1 .. <name>_3"),
        "{}",
        r.stdout
    );
    let faces = d.path().join("faces");
    std::fs::create_dir(&faces).unwrap();
    write_png(&faces.join("f0.png"), 32, 32, 0);
    // bench encodes all K outputs of each input and reports inputs per second.
    let bench = cli([
        "bench",
        "--config",
        &cfg,
        "--seconds",
        "0",
        "--stages-only",
        faces.to_str().unwrap(),
    ]);
    assert_eq!(bench.code, Some(0), "{}", bench.stderr);
    assert!(
        bench.stdout.contains("3 outputs per input"),
        "{}",
        bench.stdout
    );
    let mut lines = String::new();
    for i in 0..5 {
        write_png(&faces.join(format!("f{i}.png")), 32, 32, i);
        lines.push_str(&format!(
            "{{\"image\": \"faces/f{i}.png\", \"prompt\": \"look {i}\", \"seed\": {}}}\n",
            10 * i
        ));
    }
    let manifest = write(&d.path().join("jobs.jsonl"), &lines);
    let out = d.path().join("out");
    let r = cli([
        "process".as_ref(),
        "--quiet".as_ref(),
        "--config".as_ref(),
        cfg.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
    ]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(names(&out).len(), 5 * 3 * 2, "{:?}", names(&out));
    let model = CModule::load(d.path().join("tint.pt")).unwrap();
    let check = |dir: &Path, i: u32, prompt: &str, seed: i64| {
        let want = reference(&model, &faces.join(format!("f{i}.png")), prompt, seed);
        for k in 1..=3usize {
            let got = image::open(dir.join(format!("f{i}_{k}.png")))
                .unwrap()
                .into_rgb8();
            let part = &want[(k - 1) * 32 * 32 * 3..k * 32 * 32 * 3];
            assert_eq!(got.as_raw(), part, "f{i}_{k}: not output {k} of its input");
            let side = sidecar(&dir.join(format!("f{i}_{k}.json")));
            assert_eq!(
                (&side["output"], &side["outputs"]),
                (&serde_json::json!(k), &serde_json::json!(3)),
                "{side}"
            );
            assert_eq!(
                side["params"],
                serde_json::json!({"prompt": prompt, "seed": seed})
            );
        }
    };
    for i in 0..5 {
        check(&out, i, &format!("look {i}"), 10 * i as i64);
    }

    // The hot folder publishes an item's six files together, and moves it on once.
    let hot = hot_config(d.path(), "");
    let hf = d.path().join("hf");
    for i in 0..3 {
        let json = format!("{{\"prompt\": \"hot {i}\", \"seed\": {i}}}");
        deliver(&hf, &format!("f{i}.json"), json.as_bytes());
        let png = std::fs::read(faces.join(format!("f{i}.png"))).unwrap();
        deliver(&hf, &format!("f{i}.png"), &png);
    }
    let daemon = Daemon::start(&hot, &[]);
    let done = wait_until(Duration::from_secs(120), || {
        names(&hf.join("done")).len() == 6
    });
    let log = daemon.log();
    assert!(done, "{log}");
    daemon.stop();
    assert_eq!(names(&hf.join("outbox")).len(), 3 * 3 * 2);
    for i in 0..3 {
        check(&hf.join("outbox"), i, &format!("hot {i}"), i as i64);
    }
}

#[test]
fn the_same_parameters_give_the_same_bytes_and_mistakes_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    if tint_model(&d.path().join("tint.pt")).is_none() {
        return;
    }
    write_png(&d.path().join("a.png"), 32, 32, 1);
    let cfg = config(d.path(), SCHEMA);
    let run = |out: &str, params: &[&str]| {
        let out = d.path().join(out);
        let mut args: Vec<std::ffi::OsString> = vec![
            "process".into(),
            "--quiet".into(),
            "--config".into(),
            cfg.clone().into(),
            "--out".into(),
            out.clone().into(),
        ];
        for p in params {
            args.push("--param".into());
            args.push(p.into());
        }
        args.push(d.path().join("a.png").into());
        (cli(args), out)
    };
    let (r1, o1) = run("o1", &["prompt=a studio portrait", "seed=42"]);
    let (r2, o2) = run("o2", &["prompt=a studio portrait", "seed=42"]);
    let (r3, o3) = run("o3", &["prompt=a studio portrait", "seed=43"]);
    for r in [&r1, &r2, &r3] {
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
    let bytes = |o: &Path| std::fs::read(o.join("a.png")).unwrap();
    assert_eq!(bytes(&o1), bytes(&o2), "same seed, same bytes");
    assert_ne!(bytes(&o1), bytes(&o3), "another seed, another output");

    // Mistakes stop the run before anything is processed, naming the key.
    for (params, needle) in [
        (&["prompt=x", "sede=1"][..], "unknown parameter `sede`"),
        (
            &["prompt=x", "seed=-4"][..],
            "`seed` is -4, outside its range",
        ),
        (&["prompt=x", "seed=four"][..], "`seed` must be an integer"),
        (&["seed=4"][..], "`prompt` is required"),
    ] {
        let (r, o) = run("bad", params);
        assert_eq!(r.code, Some(2), "{params:?}: {}", r.stderr);
        // Said once: not again as the error's cause.
        assert_eq!(
            r.stderr.matches(needle).count(),
            1,
            "{params:?}: {}",
            r.stderr
        );
        assert!(names(&o).is_empty(), "nothing processed");
    }
}

/// A hot folder at `dir/hf` running the tint model with `[params]` (`extra` goes into the
/// `[params]` table), PNG out.
fn hot_config(dir: &Path, extra: &str) -> PathBuf {
    for sub in ["inbox", "work", "outbox", "done", "failed"] {
        std::fs::create_dir_all(dir.join("hf").join(sub)).unwrap();
    }
    write(
        &dir.join("hot.toml"),
        &format!(
            "[model]\npath = \"tint.pt\"\ndevice = \"cpu\"\nmax_batch = 4\n\n\
             [preprocess]\nsize = 32\nfit = \"stretch\"\nfilter = \"lanczos3\"\n\n\
             [encode]\nformat = \"png\"\n\n[pipeline]\ndecode_threads = 2\nencode_threads = 2\nchannel_capacity = 4\n\n\
             [params]\n{extra}\n[params.schema]\nprompt = {{ type = \"string\", default = \"\" }}\nseed = {{ type = \"int\", default = 0, min = 0 }}\n\n\
             [hotfolder]\nroot = \"hf\"\nsettle_ms = 100\nretry_s = 1\n\n[metrics]\nlisten = \"off\"\n"
        ),
    )
}

/// The tint model's hot folder ([`hot_config`] with `extra`) started and past its first
/// scan, and its root; `None` (skipped) without the venv's Python.
fn ready_daemon(dir: &Path, extra: &str) -> Option<(Daemon, PathBuf)> {
    tint_model(&dir.join("tint.pt"))?;
    let daemon = Daemon::start(&hot_config(dir, extra), &[]);
    daemon.expect_log("hot folder ready", Duration::from_secs(120));
    Some((daemon, dir.join("hf")))
}

fn png_bytes(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    picture(w, h, seed)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn sidecar(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn parameters_files_travel_with_their_images_and_bad_ones_fail_with_the_key() {
    let d = tempfile::tempdir().unwrap();
    if tint_model(&d.path().join("tint.pt")).is_none() {
        return;
    }
    let cfg = hot_config(d.path(), "");
    let hf = d.path().join("hf");
    // Before the start, in the order the protocol asks: parameters, then the image.
    deliver(&hf, "a.json", br#"{"prompt": "a red coat", "seed": 5}"#);
    deliver(&hf, "a.png", &png_bytes(32, 32, 1));
    deliver(&hf, "b.json", br#"{"prompt": "x", "sede": 5}"#);
    deliver(&hf, "b.png", &png_bytes(32, 32, 2));
    deliver(&hf, "c.png", &png_bytes(32, 32, 3));
    deliver(&hf, "lonely.json", br#"{"prompt": "no image"}"#);
    let daemon = Daemon::start(&cfg, &[]);
    let settled = wait_until(Duration::from_secs(120), || {
        names(&hf.join("done")).len() == 3 && names(&hf.join("failed")).len() == 3
    });
    let log = daemon.log();
    assert!(
        settled,
        "done {:?} failed {:?}\n{log}",
        names(&hf.join("done")),
        names(&hf.join("failed"))
    );
    // Give a wrongly claimed lonely.json time to show up somewhere.
    std::thread::sleep(Duration::from_millis(500));
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));

    assert_eq!(names(&hf.join("done")), ["a.json", "a.png", "c.png"]);
    assert_eq!(
        names(&hf.join("inbox")),
        ["lonely.json"],
        "a JSON alone is never an item"
    );
    assert_eq!(
        names(&hf.join("work")),
        Vec::<String>::new(),
        "no parameters file left behind"
    );
    assert_eq!(
        names(&hf.join("failed")),
        ["b.png", "b.png.error.json", "b.png.params.json"]
    );
    let reason = sidecar(&hf.join("failed/b.png.error.json"))["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("b.json") && reason.contains("unknown parameter `sede`"),
        "{reason}"
    );
    // a ran with its own parameters, c on the defaults; the sidecars say so.
    let model = CModule::load(d.path().join("tint.pt")).unwrap();
    let src = d.path().join("src.png");
    std::fs::write(&src, png_bytes(32, 32, 1)).unwrap();
    let got = image::open(hf.join("outbox/a.png")).unwrap().into_rgb8();
    assert_eq!(got.as_raw(), &reference(&model, &src, "a red coat", 5));
    let side = sidecar(&hf.join("outbox/a.json"));
    assert_eq!(
        side["params"],
        serde_json::json!({"prompt": "a red coat", "seed": 5})
    );
    // Its input: where it was dropped, and its bytes' hash (those now in done/).
    assert_eq!(
        side["input"]["path"],
        hf.join("inbox/a.png").to_string_lossy().as_ref()
    );
    assert_eq!(
        side["input"]["sha256"],
        sha256(&hf.join("done/a.png")).as_str()
    );
    assert_eq!(
        sidecar(&hf.join("outbox/c.json"))["params"],
        serde_json::json!({"prompt": "", "seed": 0})
    );
}

#[test]
fn required_parameters_are_waited_for_then_the_image_fails() {
    let d = tempfile::tempdir().unwrap();
    let Some((daemon, hf)) = ready_daemon(d.path(), "required = true\nwait_s = 3\n") else {
        return;
    };
    // late.png's parameters come a second after it: it waits for them.
    deliver(&hf, "late.png", &png_bytes(32, 32, 4));
    deliver(&hf, "never.png", &png_bytes(32, 32, 5));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        names(&hf.join("inbox")),
        ["late.png", "never.png"],
        "both wait"
    );
    deliver(&hf, "late.json", br#"{"prompt": "arrived", "seed": 1}"#);
    let settled = wait_until(Duration::from_secs(60), || {
        names(&hf.join("failed")).len() == 2 && names(&hf.join("done")).len() == 2
    });
    let log = daemon.log();
    assert!(settled, "{log}");
    daemon.stop();
    assert_eq!(names(&hf.join("done")), ["late.json", "late.png"]);
    assert_eq!(
        sidecar(&hf.join("outbox/late.json"))["params"]["prompt"],
        "arrived"
    );
    let reason = sidecar(&hf.join("failed/never.png.error.json"))["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("no parameters file never.json arrived within 3 s"),
        "{reason}"
    );
}

/// An image whose wait for its parameters file ran out while that file was still being
/// written: the daemon keeps waiting for the file without spinning (the expired wait
/// used to wake the claim loop at once, every time, a whole core), and the image runs
/// with it once it is complete.
#[test]
fn an_expired_wait_does_not_spin_while_the_parameters_file_is_written() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let Some((daemon, hf)) = ready_daemon(d.path(), "required = true\nwait_s = 1\n") else {
        return;
    };
    deliver(&hf, "slow.png", &png_bytes(32, 32, 6));
    // The image is seen alone (its wait starts), then its parameters file is opened.
    std::thread::sleep(Duration::from_millis(500));
    let mut json = std::fs::File::create(hf.join("inbox/slow.json")).unwrap();
    json.write_all(br#"{"prompt": "sl"#).unwrap();
    // Past the end of the wait.
    std::thread::sleep(Duration::from_secs(2));
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(3));
    let share = (cpu_ticks(daemon.pid()) - before) as f64 / ticks_per_s / 3.0;
    assert!(
        share < 0.2,
        "{:.0}% of a core while waiting\n{}",
        share * 100.0,
        daemon.log()
    );
    assert_eq!(names(&hf.join("inbox")), ["slow.json", "slow.png"]);
    json.write_all(br#"ow", "seed": 2}"#).unwrap();
    drop(json);
    let done = wait_until(Duration::from_secs(60), || {
        names(&hf.join("done")) == ["slow.json", "slow.png"]
    });
    let log = daemon.log();
    assert!(done, "{log}");
    daemon.stop();
    assert_eq!(
        sidecar(&hf.join("outbox/slow.json"))["params"],
        serde_json::json!({"prompt": "slow", "seed": 2})
    );
}

/// The crash test with a parameters file beside every image: SIGKILL at random moments,
/// 22 times, while 176 image+parameters pairs arrive; then drained. Every image is done
/// exactly once with its own parameters (the sidecars prove which), and no parameters
/// file is left behind or processed alone.
#[test]
fn sigkill_storm_keeps_every_image_with_its_own_parameters() {
    let d = tempfile::tempdir().unwrap();
    if tint_model(&d.path().join("tint.pt")).is_none() {
        return;
    }
    let cfg = hot_config(d.path(), "");
    let hf = d.path().join("hf");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("params storm seed {seed}");
    let mut rand = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    // Large PNGs, so that kills land while items are being decoded.
    let bytes: Vec<Vec<u8>> = (0..4).map(|s| png_bytes(1000, 800, s)).collect();
    let (n, kills) = (176usize, 22usize);
    let mut next = 0;
    let mut resumed = 0;
    for k in 0..kills {
        let mut daemon = Daemon::start(&cfg, &[]);
        for _ in 0..8.min(n - next) {
            deliver(
                &hf,
                &format!("img{next:03}.json"),
                format!("{{\"prompt\": \"p{next}\", \"seed\": {next}}}").as_bytes(),
            );
            deliver(&hf, &format!("img{next:03}.png"), &bytes[next % 4]);
            next += 1;
        }
        if k % 3 == 2 {
            wait_until(Duration::from_secs(60), || {
                daemon.log().contains("hot folder ready") || !daemon.alive()
            });
        }
        std::thread::sleep(Duration::from_millis(50 + rand(550)));
        daemon.kill();
        resumed += usize::from(names(&hf.join("work")).iter().any(|n| !n.starts_with('.')));
    }
    while next < n {
        deliver(
            &hf,
            &format!("img{next:03}.json"),
            format!("{{\"prompt\": \"p{next}\", \"seed\": {next}}}").as_bytes(),
        );
        deliver(&hf, &format!("img{next:03}.png"), &bytes[next % 4]);
        next += 1;
    }
    let daemon = Daemon::start(&cfg, &[]);
    let drained = wait_until(Duration::from_secs(300), || {
        names(&hf.join("inbox")).is_empty() && names(&hf.join("work")).is_empty()
    });
    let log = daemon.log();
    assert!(
        drained,
        "inbox {:?} work {:?}\n{log}",
        names(&hf.join("inbox")),
        names(&hf.join("work"))
    );
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));
    assert!(
        resumed > 0,
        "no kill left items in work/: recovery was not exercised"
    );
    assert_eq!(names(&hf.join("failed")), Vec::<String>::new());
    let mut want_done = Vec::new();
    let mut want_out = Vec::new();
    for i in 0..n {
        want_done.extend([format!("img{i:03}.json"), format!("img{i:03}.png")]);
        want_out.extend([format!("img{i:03}.json"), format!("img{i:03}.png")]);
        let side = sidecar(&hf.join(format!("outbox/img{i:03}.json")));
        assert_eq!(
            side["params"],
            serde_json::json!({"prompt": format!("p{i}"), "seed": i}),
            "img{i:03}"
        );
    }
    want_done.sort();
    want_out.sort();
    assert_eq!(
        names(&hf.join("done")),
        want_done,
        "each image and its parameters file done once"
    );
    assert_eq!(
        names(&hf.join("outbox")),
        want_out,
        "one output and one sidecar per image"
    );
    eprintln!("params storm: {kills} SIGKILLs, {resumed} left items in work/");
}
