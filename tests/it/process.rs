//! `hotpipe process` end to end: real images, real TorchScript models, the real binary.

use std::path::Path;

use crate::common::*;
use hotpipe::config::Config;
use hotpipe::stages::decode::Decoder;
use hotpipe::stages::fit::Fitter;
use tch::{CModule, Device, Kind, Tensor};

fn config(dir: &Path, model: &str, extra: &str) -> std::path::PathBuf {
    write(
        &dir.join("p.toml"),
        &format!(
            "[model]\npath = \"{model}\"\ndevice = \"cpu\"\nmax_batch = 4\n\n[preprocess]\nsize = 64\n\n[encode]\nformat = \"png\"\n\n[pipeline]\ndecode_threads = 2\nencode_threads = 2\n{extra}"
        ),
    )
}

#[test]
fn good_and_bad_files_give_exactly_the_expected_outputs_and_failures() {
    let d = tempfile::tempdir().unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    restore_model(&d.path().join("m.pt"));
    for i in 0..6 {
        write_jpeg(
            &inp.join(format!("good{i}.jpg")),
            100 + 13 * i,
            80 + 7 * i,
            i,
        );
    }
    write_png(&inp.join("pic ü.png"), 90, 90, 9);
    std::fs::write(inp.join("empty.jpg"), b"").unwrap();
    std::fs::write(inp.join("notes.txt"), b"this is not an image").unwrap();
    let mut jpg = std::fs::read(inp.join("good0.jpg")).unwrap();
    jpg.truncate(jpg.len() / 3);
    std::fs::write(inp.join("truncated.jpg"), &jpg).unwrap();
    // 20000 x 20000 PNG header: over the default 16384 limit, never decoded.
    let png = png_header(20000, 20000);
    std::fs::write(inp.join("huge.png"), &png).unwrap();

    let cfg = config(d.path(), "m.pt", "");
    let out = d.path().join("out");
    let r = process(&cfg, &out, &[&inp]);
    let stdout = r.stdout;
    assert_eq!(
        r.code,
        Some(1),
        "any failure gives exit 1\n{stdout}\n{}",
        r.stderr
    );
    let mut expected: Vec<String> = (0..6).map(|i| format!("good{i}.png")).collect();
    expected.push("pic ü.png".into());
    expected.sort();
    assert_eq!(names(&out), expected);
    assert!(stdout.contains("done 7, failed 4"), "{stdout}");
    for (name, reason) in [
        ("empty.jpg", "empty file"),
        ("notes.txt", "not a recognised image"),
        ("truncated.jpg", "JPEG"),
        ("huge.png", "over the"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{stdout}"));
        assert!(line.contains(reason), "{line}");
    }
    // Running again never overwrites: outputs get a suffix.
    let r = process(&cfg, &out, &[inp.join("good0.jpg")]);
    assert!(r.code == Some(0));
    assert!(names(&out).contains(&"good0-1.png".to_string()));
}

#[test]
fn output_equals_the_model_applied_in_the_test() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.pt");
    restore_model(&m);
    let src = d.path().join("a.png");
    write_png(&src, 150, 100, 3);
    let cfg_path = config(d.path(), "m.pt", "");
    let out = d.path().join("out");
    let r = process(&cfg_path, &out, &[&src]);
    assert!(r.code == Some(0), "{}", r.stderr);
    let got = image::open(out.join("a.png")).unwrap().into_rgb8();
    assert_eq!(got.dimensions(), (64, 64));

    // Reference: the library's decode and fit, then the model through tch directly.
    let cfg = Config::load(&cfg_path).unwrap();
    let mut dec = Decoder::new(cfg.decode.clone(), hotpipe::vocab::pool::BufPool::new(2));
    let frame = dec.decode(&std::fs::read(&src).unwrap()).unwrap();
    let mut fitted = vec![0u8; 64 * 64 * 3];
    Fitter::new(cfg.preprocess.clone())
        .fit(&frame, None, &mut fitted)
        .unwrap();
    let x = Tensor::from_slice(&fitted)
        .view([1, 64, 64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let model = CModule::load_on_device(&m, Device::Cpu).unwrap();
    let y = model.forward_ts(&[x]).unwrap();
    let y: Vec<u8> = Vec::try_from(
        (y.clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([0, 2, 3, 1])
            .flatten(0, -1),
    )
    .unwrap();
    let max_diff = got
        .as_raw()
        .iter()
        .zip(&y)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    // Tolerance: identical arithmetic, so at most one level from float rounding order.
    assert!(max_diff <= 1, "max difference {max_diff}");
    // And the model really changed the image (the test could not pass by copying input).
    assert!(fitted.iter().zip(got.as_raw()).any(|(a, b)| a != b));
}

#[test]
fn model_breaking_the_contract_fails_at_start_up() {
    let d = tempfile::tempdir().unwrap();
    two_channel_model(&d.path().join("grey.pt"));
    write_png(&d.path().join("a.png"), 64, 64, 1);
    let cfg = config(d.path(), "grey.pt", "");
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    let err = r.stderr;
    assert_eq!(r.code, Some(1));
    assert!(
        err.contains("must return N*K x C' x H' x W' (K outputs per input")
            && err.contains("[2, 2, 64, 64]"),
        "{err}"
    );
    assert!(
        !err.contains("frame #"),
        "no C++ backtrace for users: {err}"
    );
    let (o, a) = (d.path().join("o"), d.path().join("a.png"));
    let r = cli([
        "process".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--out".as_ref(),
        o.as_os_str(),
        a.as_os_str(),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(names(&d.path().join("o")).is_empty(), "nothing processed");
    let cfg = config(d.path(), "missing.pt", "");
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert!(r.stderr.contains("no such file"));
}

#[test]
fn check_describes_model_and_upscaler_output_size() {
    let d = tempfile::tempdir().unwrap();
    upscale_model(&d.path().join("up.pt"));
    let cfg = config(d.path(), "up.pt", "");
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    let out = r.stdout;
    assert!(r.code == Some(0), "{}", r.stderr);
    assert!(
        out.contains("device: cpu")
            && out.contains("output: N x 3 x 128 x 128")
            && out.contains("batch: 4"),
        "{out}"
    );
    write_jpeg(&d.path().join("a.jpg"), 200, 100, 1);
    let r = process(&cfg, &d.path().join("o"), &[d.path().join("a.jpg")]);
    assert!(r.code == Some(0));
    assert_eq!(image::open(d.path().join("o/a.png")).unwrap().width(), 128);
}

#[test]
fn config_errors_name_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write(
        &d.path().join("bad.toml"),
        "[model]\npath = \"m.pt\"\ndevise = \"cpu\"\n",
    );
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    let err = r.stderr;
    assert_eq!(r.code, Some(78));
    assert!(
        err.contains("line 3") && err.contains("devise") && err.contains("device"),
        "{err}"
    );
}

#[test]
fn frame_buffers_do_not_grow_with_the_number_of_images() {
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let cfg = Config::load(&config(d.path(), "m.pt", "channel_capacity = 2\n")).unwrap();
    let mut created = Vec::new();
    for n in [8usize, 48] {
        let inp = d.path().join(format!("in{n}"));
        std::fs::create_dir(&inp).unwrap();
        for i in 0..n {
            write_jpeg(&inp.join(format!("{i:03}.jpg")), 120, 90, i as u32);
        }
        let s = run_folder(
            &cfg,
            &inp,
            &d.path().join(format!("out{n}")),
            Default::default(),
        );
        assert_eq!(s.done, n);
        created.push(s.frame_buffers_created);
    }
    // The pool is bounded by its capacity: 6x more images allocate no more buffers than
    // the pool holds, and at most what the smaller run had plus the pipeline's depth.
    let cap = 2 + 1 + 3;
    assert!(created[1] <= cap, "{created:?}");
    assert!(
        created[1] <= created[0] + 8,
        "buffers grew with image count: {created:?}"
    );
}

#[test]
fn oom_split_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let cfg = Config::load(&config(d.path(), "m.pt", "")).unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    for i in 0..12 {
        write_jpeg(&inp.join(format!("{i:02}.jpg")), 100, 100, i);
    }
    // Five forward calls of this test's batches fail with an injected out-of-memory
    // error (the rule matches this test's temp dir only).
    hotpipe::vocab::fault::arm(&format!("infer:oom:5:{}", inp.display()));
    let s = run_folder(&cfg, &inp, &d.path().join("oom"), Default::default());
    assert_eq!((s.done, s.failed.len()), (12, 0));
    let s2 = run_folder(&cfg, &inp, &d.path().join("plain"), Default::default());
    assert_eq!(s2.done, 12);
    // Split batches give the same pixels as whole ones.
    for n in names(&d.path().join("plain")) {
        let a = image::open(d.path().join("oom").join(&n))
            .unwrap()
            .into_rgb8();
        let b = image::open(d.path().join("plain").join(&n))
            .unwrap()
            .into_rgb8();
        assert_eq!(a.as_raw(), b.as_raw(), "{n}");
    }
}

#[test]
fn outputs_identical_with_one_slot_and_several() {
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    for i in 0..10 {
        write_jpeg(&inp.join(format!("{i:02}.jpg")), 90 + 11 * i, 120, i);
    }
    let inputs = hotpipe::process::collect_inputs(&[inp]).unwrap();
    let mut outs = Vec::new();
    for slots in [1, 4] {
        let cfg = Config::load(&config(
            d.path(),
            "m.pt",
            &format!("batch_slots = {slots}\n"),
        ))
        .unwrap();
        let out = d.path().join(format!("out{slots}"));
        let s = hotpipe::process::run(&cfg, inputs.clone(), &out, Default::default()).unwrap();
        assert_eq!((s.done, s.failed.len()), (10, 0));
        outs.push(out);
    }
    for n in names(&outs[0]) {
        let a = image::open(outs[0].join(&n)).unwrap().into_rgb8();
        let b = image::open(outs[1].join(&n)).unwrap().into_rgb8();
        assert_eq!(a.as_raw(), b.as_raw(), "{n}");
    }
    assert_eq!(names(&outs[0]).len(), 10);
}

#[test]
fn half_precisions_stay_close_to_fp32() {
    // A model traced in Rust holds its weights as constants, which `to(kind)` cannot
    // cast; a scripted model (as users export them) has parameters. Write one with the
    // venv's Python.
    let d = tempfile::tempdir().unwrap();
    if bench_model(&d.path().join("m.pt"), 8, 2).is_none() {
        return;
    }
    let src = d.path().join("a.png");
    write_png(&src, 120, 100, 5);
    let mut outs = Vec::new();
    // fp16 convolutions are not implemented on every CPU build; bf16 is. On a GPU the
    // CUDA test covers fp16 too.
    for p in ["fp32", "bf16"] {
        let mut cfg = Config::load(&config(d.path(), "m.pt", "")).unwrap();
        cfg.model.as_mut().unwrap().precision = match p {
            "fp32" => hotpipe::config::Precision::Fp32,
            _ => hotpipe::config::Precision::Bf16,
        };
        let out = d.path().join(p);
        let s = hotpipe::process::run(&cfg, vec![src.clone()], &out, Default::default()).unwrap();
        assert_eq!(s.done, 1, "{p}: {:?}", s.failed);
        outs.push(image::open(out.join("a.png")).unwrap().into_rgb8());
    }
    // Stated tolerance: bf16 keeps 8 bits of mantissa, so pixels may differ by a few
    // levels; PSNR >= 35 dB and no pixel off by more than 8 levels.
    let p = psnr(outs[0].as_raw(), outs[1].as_raw());
    let max = outs[0]
        .as_raw()
        .iter()
        .zip(outs[1].as_raw())
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(
        p >= 35.0 && max <= 8,
        "bf16 vs fp32: PSNR {p:.1} dB, max diff {max}"
    );
}

#[test]
fn several_cpu_inference_workers_give_the_same_outputs() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.pt");
    restore_model(&m);
    let inp = d.path().join("in");
    std::fs::create_dir_all(&inp).unwrap();
    for i in 0..12 {
        write_jpeg(&inp.join(format!("x{i:02}.jpg")), 300 + i * 20, 200, i);
    }
    let mut outs = Vec::new();
    for workers in [1, 3] {
        let cfg_path = config(
            d.path(),
            "m.pt",
            &format!("infer_threads = 3\ncpu_infer_workers = {workers}\n"),
        );
        let cfg = Config::load(&cfg_path).unwrap();
        assert_eq!(cfg.pipeline.cpu_infer_workers, workers);
        let out = d.path().join(format!("out{workers}"));
        let s = run_folder(&cfg, &inp, &out, Default::default());
        assert_eq!((s.done, s.failed.len()), (12, 0));
        assert_eq!(s.info.devices.len(), workers);
        outs.push(out);
    }
    for i in 0..12 {
        let a = std::fs::read(outs[0].join(format!("x{i:02}.png"))).unwrap();
        let b = std::fs::read(outs[1].join(format!("x{i:02}.png"))).unwrap();
        assert!(a == b, "x{i:02}.png differs between 1 and 3 workers");
    }
}

/// A panic while decoding one input of 20 in `hotpipe process`: 19 outputs, one failure
/// naming the stage and the panic, exit status 1, and no hang (the run ends by itself).
#[test]
fn panic_in_decode_fails_one_item_in_process() {
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let cfg = config(d.path(), "m.pt", "");
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    for i in 0..20 {
        write_jpeg(&inp.join(format!("p{i:02}.jpg")), 70, 60, i);
    }
    let out = d.path().join("out");
    let r = hotpipe()
        .args(["process", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .arg(&inp)
        .env("HOTPIPE_FAULTS", "decode:panic::p07.jpg")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.status.code(), Some(1), "{stdout}");
    assert_eq!(names(&out).len(), 19, "{stdout}");
    assert!(!out.join("p07.png").exists());
    assert!(stdout.contains("done 19, failed 1"), "{stdout}");
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("failed:"))
        .collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(
        failed[0].ends_with("p07.jpg: decode: internal error in decode: injected panic at decode"),
        "{stdout}"
    );
}

/// `check`, `bench` and `process` resolve `max_batch = "auto"` through the one runtime
/// plan, so they report the same batch size (on the CPU: 8, the plan's rule there).
#[test]
fn auto_batch_is_the_same_in_check_bench_and_process() {
    let d = tempfile::tempdir().unwrap();
    restore_model(&d.path().join("m.pt"));
    let cfg = write(
        &d.path().join("p.toml"),
        "[model]\npath = \"m.pt\"\ndevice = \"cpu\"\nmax_batch = \"auto\"\n\n[preprocess]\nsize = 64\n\n[encode]\nformat = \"png\"\n",
    );
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    for i in 0..3 {
        write_jpeg(&inp.join(format!("a{i}.jpg")), 80, 80, i);
    }
    let batch_after = |text: &str, key: &str| -> usize {
        let i = text
            .find(key)
            .unwrap_or_else(|| panic!("no `{key}` in\n{text}"))
            + key.len();
        text[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let check = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert_eq!(check.code, Some(0), "{}", check.stderr);
    let bench = cli([
        "bench".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--seconds".as_ref(),
        "0".as_ref(),
        "--stages-only".as_ref(),
        inp.as_os_str(),
    ]);
    assert_eq!(bench.code, Some(0), "{}", bench.stderr);
    let process = process(&cfg, &d.path().join("out"), &[&inp]);
    let sizes = [
        batch_after(&check.stdout, "batch: "),
        batch_after(&bench.stdout, "batch "),
        batch_after(&process.stdout, "batch "),
    ];
    assert_eq!(sizes, [8, 8, 8], "check, bench, process");
}
