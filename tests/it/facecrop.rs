//! The built-in face crop end to end: real photos composed in code from the public-domain
//! astronaut portrait (`../shared/bench/astronaut.png`), the real MTCNN weights from
//! `models/mtcnn` (written by `scripts/setup.sh`), the real binary.
//!
//! A test skips, saying why, only when the weights or the portrait are absent.

use std::path::{Path, PathBuf};

use crate::common::*;
use hotpipe::config::{Config, FaceSelect};
use hotpipe::facecrop::{FaceCropper, FoundFace, choose};
use hotpipe::stages::decode::Decoder;
use hotpipe::vocab::pool::BufPool;
use image::{Rgb, RgbImage};
use tch::{CModule, Device, Kind, Tensor};

fn weights() -> Option<PathBuf> {
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mtcnn");
    if w.join("onet.pt").is_file() {
        Some(w)
    } else {
        skip(&format!(
            "no MTCNN weights in {} (run scripts/setup.sh)",
            w.display()
        ));
        None
    }
}

fn astronaut() -> Option<RgbImage> {
    let Some(bench) = shared_bench() else {
        skip("no bench fixtures with astronaut.png");
        return None;
    };
    let p = bench.join("astronaut.png");
    Some(image::open(&p).expect("astronaut.png decodes").into_rgb8())
}

/// Both fixtures, or `None` (with the reason printed) to skip.
fn fixtures() -> Option<(PathBuf, RgbImage)> {
    Some((weights()?, astronaut()?))
}

/// A config with the face crop, small PNG outputs and `extra` lines appended.
fn config(dir: &Path, weights: &Path, face_extra: &str, extra: &str) -> PathBuf {
    write(
        &dir.join("p.toml"),
        &format!(
            "[face_crop]\nweights = \"{}\"\ndevice = \"cpu\"\n{face_extra}\n\n[preprocess]\nsize = 128\npad_color = [255, 0, 255]\n\n[encode]\nformat = \"png\"\n\n[pipeline]\ndecode_threads = 2\n{extra}",
            weights.display()
        ),
    )
}

/// `cfg` with a `[model]` (on the CPU, batches of 2) after the face crop, as chain.toml
/// beside it.
fn with_model(cfg: &Path, model: &Path) -> PathBuf {
    write(
        &cfg.with_file_name("chain.toml"),
        &std::fs::read_to_string(cfg).unwrap().replace(
            "[preprocess]",
            &format!(
                "[model]\npath = \"{}\"\ndevice = \"cpu\"\nmax_batch = 2\n\n[preprocess]",
                model.display()
            ),
        ),
    )
}

fn sidecar(out: &Path, stem: &str) -> serde_json::Value {
    let p = out.join(format!("{stem}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn boxf(v: &serde_json::Value) -> [f64; 4] {
    let a = v.as_array().unwrap();
    [0, 1, 2, 3].map(|i| a[i].as_f64().unwrap())
}

fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for c in &mut px {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *c = (s >> 24) as u8;
        }
        Rgb(px)
    })
}

/// Two astronauts side by side: a small one (256 px) on the left, a full-size one on
/// the right, on grey.
fn two_faces(a: &RgbImage) -> RgbImage {
    let mut canvas = RgbImage::from_pixel(1100, 560, Rgb([128, 128, 128]));
    let small = image::imageops::resize(a, 256, 256, image::imageops::FilterType::Triangle);
    image::imageops::overlay(&mut canvas, &small, 40, 150);
    image::imageops::overlay(&mut canvas, a, 560, 24);
    canvas
}

/// Every face the library finds in `path` (original-image pixels).
fn library_faces(cfg: &Path, path: &Path) -> Vec<FoundFace> {
    let cfg = Config::load(cfg).unwrap();
    let mut cropper = FaceCropper::new(cfg.face_crop.as_ref().unwrap(), 1024).unwrap();
    let mut dec = Decoder::new(cfg.decode.clone(), BufPool::new(2));
    let frame = dec.decode(&std::fs::read(path).unwrap()).unwrap();
    cropper.detect(&[&frame]).pop().unwrap().unwrap()
}

#[test]
fn no_face_fails_or_passes_through() {
    let Some(w) = weights() else { return };
    let d = tempfile::tempdir().unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    noise(640, 480, 3).save(inp.join("noise.png")).unwrap();
    RgbImage::from_pixel(300, 200, Rgb([40, 90, 200]))
        .save(inp.join("flat.jpg"))
        .unwrap();
    RgbImage::from_pixel(8, 8, Rgb([200, 150, 120]))
        .save(inp.join("tiny.png"))
        .unwrap();
    RgbImage::from_pixel(1, 1, Rgb([200, 150, 120]))
        .save(inp.join("dot.png"))
        .unwrap();
    let inputs: Vec<PathBuf> = ["noise.png", "flat.jpg", "tiny.png", "dot.png"]
        .iter()
        .map(|n| inp.join(n))
        .collect();

    let cfg = config(d.path(), &w, "", "");
    let out = d.path().join("out");
    let r = process(&cfg, &out, &inputs);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(names(&out).is_empty(), "{:?}", names(&out));
    assert!(r.stdout.contains("done 0, failed 4"), "{}", r.stdout);
    for n in ["noise.png", "flat.jpg", "tiny.png", "dot.png"] {
        let line = r.stdout.lines().find(|l| l.contains(n)).unwrap();
        assert!(line.contains("detect: no face found"), "{line}");
    }

    // on_no_face = "pass": the whole image, fitted, and a sidecar saying no face.
    let cfg = config(d.path(), &w, "on_no_face = \"pass\"", "");
    let out = d.path().join("out_pass");
    let r = process(&cfg, &out, &inputs);
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert_eq!(
        names(&out),
        [
            "dot.json",
            "dot.png",
            "flat.json",
            "flat.png",
            "noise.json",
            "noise.png",
            "tiny.json",
            "tiny.png"
        ]
    );
    let flat = image::open(out.join("flat.png")).unwrap().into_rgb8();
    assert_eq!(flat.dimensions(), (128, 128));
    // Uncropped "crop" fit of a flat image: flat colour everywhere, no padding.
    let p = flat.get_pixel(0, 64).0;
    assert!(p[0].abs_diff(40) < 6 && p[2].abs_diff(200) < 6, "{p:?}");
    let s = sidecar(&out, "noise");
    assert_eq!(s["faces_found"], 0);
    assert!(s["face"].is_null());
    assert_eq!(s["source"]["width"], 640);
    assert_eq!(s["source"]["height"], 480);
}

#[test]
fn select_picks_the_largest_or_the_most_confident_face() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("two.png");
    two_faces(&a).save(&src).unwrap();

    let cfg = config(d.path(), &w, "select = \"largest\"", "");
    let faces = library_faces(&cfg, &src);
    assert!(faces.len() >= 2, "both astronauts found: {faces:?}");
    let out = d.path().join("largest");
    assert_eq!(
        process(&cfg, &out, std::slice::from_ref(&src)).code,
        Some(0)
    );
    let s = sidecar(&out, "two");
    assert_eq!(s["faces_found"].as_u64().unwrap() as usize, faces.len());
    let b = boxf(&s["face"]["box"]);
    // The big astronaut's face: right half, about 87 x 110 px.
    assert!(b[0] > 560.0 && b[2] - b[0] > 70.0, "{b:?}");
    let largest = choose(&faces, FaceSelect::Largest).unwrap();
    assert!(
        (b[0] - largest.bbox[0] as f64).abs() < 0.2,
        "{b:?} {largest:?}"
    );

    let cfg = config(d.path(), &w, "select = \"most_confident\"", "");
    let out = d.path().join("confident");
    assert_eq!(
        process(&cfg, &out, std::slice::from_ref(&src)).code,
        Some(0)
    );
    let s = sidecar(&out, "two");
    let best = faces.iter().map(|f| f.score).fold(0f32, f32::max);
    let score = s["face"]["score"].as_f64().unwrap();
    assert!((score - best as f64).abs() < 1e-5, "{score} vs {best}");
    let chosen = choose(&faces, FaceSelect::MostConfident).unwrap();
    assert!((boxf(&s["face"]["box"])[0] - chosen.bbox[0] as f64).abs() < 0.2);
    // Only a fixture where the two rules pick different faces shows that `select` is obeyed.
    assert!(
        (chosen.bbox[0] - largest.bbox[0]).abs() > 10.0,
        "largest and most confident are the same face here: {largest:?}"
    );
}

#[test]
fn sidecar_describes_the_face_and_the_crop_is_the_face() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("astro.jpg");
    a.save(&src).unwrap();
    let cfg = config(d.path(), &w, "margin = 0.25", "");
    let out = d.path().join("out");
    let r = process(&cfg, &out, std::slice::from_ref(&src));
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert_eq!(names(&out), ["astro.json", "astro.png"]);
    let s = sidecar(&out, "astro");
    assert_eq!(s["source"]["width"], 512);
    assert_eq!(s["source"]["height"], 512);
    assert_eq!(s["faces_found"], 1);
    let f = &s["face"];
    let score = f["score"].as_f64().unwrap();
    assert!(score > 0.99 && score <= 1.0, "{score}");
    // Eileen Collins' face in the portrait is around x 181..268, y 62..172.
    let b = boxf(&f["box"]);
    for (got, want) in b.iter().zip([181.0, 62.0, 268.0, 172.0]) {
        assert!((got - want).abs() < 12.0, "{b:?}");
    }
    // Landmarks inside the box, eyes above the mouth, left eye left of the right eye.
    let pt = |k: &str| {
        let v = f["landmarks"][k].as_array().unwrap();
        (v[0].as_f64().unwrap(), v[1].as_f64().unwrap())
    };
    for k in ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"] {
        let (x, y) = pt(k);
        assert!(
            x > b[0] && x < b[2] && y > b[1] && y < b[3],
            "{k} {x},{y} {b:?}"
        );
    }
    assert!(pt("left_eye").0 < pt("right_eye").0);
    assert!(pt("left_eye").1 < pt("mouth_left").1);
    // The crop: a square of 1.5 x the longer side, centred on the box.
    let c = boxf(&f["crop"]);
    let side = (b[2] - b[0]).max(b[3] - b[1]) * 1.5;
    assert!(((c[2] - c[0]) - side).abs() < 0.5 && ((c[3] - c[1]) - side).abs() < 0.5);
    assert!(((c[0] + c[2]) / 2.0 - (b[0] + b[2]) / 2.0).abs() < 0.2);

    // The output is that square of the full-resolution photo, resized: compare with the same
    // square cut here from every pixel of an independent decode (the `image` crate) and
    // resized by the same fit. The issue asks for the crop from the original; a DCT-scaled
    // decode (the 512 px JPEG is 4x the 128 px output) cuts the face from a 128 px frame
    // and blurs it: 26 dB here, against 40+ for two full decodes.
    let got = image::open(out.join("astro.png")).unwrap().into_rgb8();
    assert_eq!(got.dimensions(), (128, 128));
    let decoded = image::open(&src).unwrap().into_rgb8();
    let mut fitter = hotpipe::stages::fit::Fitter::new(Config::load(&cfg).unwrap().preprocess);
    let mut want = vec![0u8; fitter.row_bytes()];
    let crop = hotpipe::stages::fit::Rect {
        x0: c[0],
        y0: c[1],
        x1: c[2],
        y1: c[3],
    };
    fitter
        .fit_rect(decoded.as_raw(), 512, 512, crop, &mut want)
        .unwrap();
    let db = psnr(got.as_raw(), &want);
    eprintln!("face crop vs a crop of the full decode: {db:.1} dB");
    assert!(db >= 38.0, "crop differs from the face square: {db:.1} dB");
}

/// The astronaut's face crop (about 165 px) made 1024 px is 6.2x: the sidecar says how
/// much and warns; with `max_upscale = 4` the photo fails saying why.
#[test]
fn a_small_face_is_warned_about_or_refused() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("astro.jpg");
    a.save(&src).unwrap();
    let cfg = config(d.path(), &w, "margin = 0.25", "");
    let run = |out: &str, extra: &[&str]| {
        let out = d.path().join(out);
        let mut args = vec!["process", "--quiet", "--json", "-c", cfg.to_str().unwrap()];
        args.extend([
            "--set",
            "preprocess.size=1024",
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(extra);
        args.push(src.to_str().unwrap());
        (cli(args), out)
    };
    let (r, out) = run("warned", &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let s = sidecar(&out, "astro");
    let up = s["face"]["upscale"].as_f64().unwrap();
    assert!((5.5..7.0).contains(&up), "{s}");
    let warning = s["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains(&format!("enlarged {up:.1}x to 1024 px")) && warning.contains("soft"),
        "{s}"
    );
    // At 128 px nothing is enlarged: no warning.
    let (r, out) = run("fine", &["--set", "preprocess.size=128"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(sidecar(&out, "astro")["warnings"].is_null());

    let (r, out) = run("refused", &["--set", "face_crop.max_upscale=4"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let summary: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let reason = summary["failures"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("the face is too small for the output")
            && reason.contains("over face_crop.max_upscale (4)"),
        "{reason}"
    );
    assert!(names(&out).is_empty());
}

#[test]
fn a_face_at_the_border_is_padded_not_shifted() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    // Cut the portrait just left of the face: the face is whole but its margin is not.
    let src = d.path().join("edge.png");
    image::imageops::crop_imm(&a, 160, 0, 352, 512)
        .to_image()
        .save(&src)
        .unwrap();
    let cfg = config(d.path(), &w, "", "");
    let out = d.path().join("out");
    assert_eq!(
        process(&cfg, &out, std::slice::from_ref(&src)).code,
        Some(0)
    );
    let s = sidecar(&out, "edge");
    let c = boxf(&s["face"]["crop"]);
    assert!(c[0] < -10.0, "crop reaches past the left border: {c:?}");
    let got = image::open(out.join("edge.png")).unwrap().into_rgb8();
    // The part of the square left of the image is pad_color (magenta), the rest is photo.
    let pad_cols = (-c[0] / (c[2] - c[0]) * 128.0).floor() as u32;
    assert!(pad_cols >= 3, "{pad_cols}");
    for y in (0..128).step_by(9) {
        for x in 0..pad_cols - 1 {
            assert_eq!(got.get_pixel(x, y).0, [255, 0, 255], "({x}, {y})");
        }
        assert_ne!(got.get_pixel(pad_cols + 2, y).0, [255, 0, 255]);
    }
    // The face is centred in the output: its box centre maps to the middle.
    let b = boxf(&s["face"]["box"]);
    let cx = ((b[0] + b[2]) / 2.0 - c[0]) / (c[2] - c[0]);
    assert!((cx - 0.5).abs() < 0.01, "{cx}");
}

#[test]
fn over_the_limits_fails_with_a_reason_and_weights_are_checked_at_start() {
    let Some(w) = weights() else { return };
    let d = tempfile::tempdir().unwrap();
    let huge = d.path().join("huge.png");
    std::fs::write(&huge, png_header(20000, 20000)).unwrap();
    let big = d.path().join("big.png");
    RgbImage::from_pixel(1200, 900, Rgb([9, 9, 9]))
        .save(&big)
        .unwrap();
    let cfg = config(d.path(), &w, "", "\n[decode]\nmax_width = 1000\n");
    let out = d.path().join("out");
    let r = process(&cfg, &out, &[huge, big]);
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("done 0, failed 2"), "{}", r.stdout);
    for n in ["huge.png", "big.png"] {
        let line = r.stdout.lines().find(|l| l.contains(n)).unwrap();
        assert!(
            line.contains("decode") && line.contains("over the"),
            "{line}"
        );
    }

    // Missing weights: the start fails, naming the file and the fix.
    let cfg = config(d.path(), &d.path().join("nowhere"), "", "");
    let (o2, big) = (d.path().join("o2"), d.path().join("big.png"));
    let r = cli([
        "process".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--out".as_ref(),
        o2.as_os_str(),
        big.as_os_str(),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    let err = r.stderr;
    assert!(
        err.contains("pnet.pt") && err.contains("scripts/setup.sh"),
        "{err}"
    );
}

#[test]
fn face_crop_then_model_in_one_pass() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("astro.jpg");
    a.save(&src).unwrap();
    let m = d.path().join("m.pt");
    restore_model(&m);

    // The crop alone (no model: identity), then crop + model.
    let cfg = config(d.path(), &w, "", "");
    let crop_out = d.path().join("crop");
    assert_eq!(
        process(&cfg, &crop_out, std::slice::from_ref(&src)).code,
        Some(0)
    );
    let cfg = with_model(&cfg, &m);
    let out = d.path().join("chain");
    let r = process(&cfg, &out, std::slice::from_ref(&src));
    assert_eq!(r.code, Some(0), "{}", r.stdout);
    assert_eq!(names(&out), ["astro.json", "astro.png"]);
    assert_eq!(
        sidecar(&out, "astro")["face"],
        sidecar(&crop_out, "astro")["face"]
    );

    // The chained output is the model applied to the crop.
    let crop = image::open(crop_out.join("astro.png")).unwrap().into_rgb8();
    let got = image::open(out.join("astro.png")).unwrap().into_rgb8();
    let module = CModule::load_on_device(&m, Device::Cpu).unwrap();
    let x = Tensor::from_slice(crop.as_raw())
        .view([1, 128, 128, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0;
    let y = module.forward_ts(&[x]).unwrap();
    let y = (y.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .view([-1]);
    let want = Vec::<u8>::try_from(&y).unwrap();
    let db = psnr(got.as_raw(), &want);
    assert!(
        db > 45.0,
        "chained output differs from model(crop): {db:.1} dB"
    );
    assert!(psnr(got.as_raw(), crop.as_raw()) < 60.0, "the model ran");
}

#[test]
fn boxes_are_in_original_pixels_when_the_frame_was_decoded_smaller() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    // min_face 12: the same pyramid for both frames (12 working pixels either way).
    let cfg = config(d.path(), &w, "min_face = 12", "");
    let cfg = Config::load(&cfg).unwrap();
    let mut cropper = FaceCropper::new(cfg.face_crop.as_ref().unwrap(), 1024).unwrap();
    let pool = BufPool::new(4);
    let frame = |orig: u32| {
        let mut px = pool.get(a.as_raw().len());
        px.copy_from_slice(a.as_raw());
        hotpipe::vocab::item::Frame {
            pixels: px,
            width: 512,
            height: 512,
            channels: 3,
            orig_width: orig,
            orig_height: orig,
            scale: 512.0 / orig as f64,
        }
    };
    // The same pixels, once as the full image and once as a 2x DCT-scaled decode of a
    // 1024 x 1024 original: the second's boxes are twice the first's.
    let (full, half) = (frame(512), frame(1024));
    let r = cropper.detect(&[&full, &half]);
    let f1 = choose(r[0].as_ref().unwrap(), FaceSelect::MostConfident).unwrap();
    let f2 = choose(r[1].as_ref().unwrap(), FaceSelect::MostConfident).unwrap();
    for i in 0..4 {
        assert!((f2.bbox[i] - 2.0 * f1.bbox[i]).abs() < 1.0, "{f1:?} {f2:?}");
    }
    assert!((f2.landmarks[2][0] - 2.0 * f1.landmarks[2][0]).abs() < 1.0);
    assert!((f2.crop.x1 - 2.0 * f1.crop.x1).abs() < 2.0);
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let i = w * h;
    i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)
}

#[test]
fn fine_pass_gives_the_boxes_of_the_whole_resolution_cascade() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    // A 1600 x 1300 photo, the face about 330 px, off centre (PNG: both decodes agree).
    let mut photo = RgbImage::from_pixel(1600, 1300, Rgb([90, 110, 130]));
    let big = image::imageops::resize(&a, 1150, 1150, image::imageops::FilterType::Triangle);
    image::imageops::overlay(&mut photo, &big, 380, 90);
    let path = d.path().join("photo.png");
    photo.save(&path).unwrap();
    let faces = |name: &str, face_extra: &str| {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, &w, face_extra, "");
        let f = library_faces(&cfg, &path);
        choose(&f, FaceSelect::MostConfident)
            .unwrap_or_else(|| panic!("{name}: no face"))
            .clone()
    };
    // The reference: the photo is no larger than detect_size, so the coarse pass is
    // MTCNN on the whole photo at full resolution (what facenet-pytorch runs).
    let whole = faces("whole", "detect_size = 2048");
    // Coarse on a 400 px copy, then the fine pass on the photo.
    let fine = faces("fine", "detect_size = 400");
    // Coarse only (refine_size <= detect_size turns the fine pass off).
    let coarse = faces("coarse", "detect_size = 400\nrefine_size = 400");
    let (i_fine, i_coarse) = (iou(fine.bbox, whole.bbox), iou(coarse.bbox, whole.bbox));
    eprintln!(
        "whole {:?} {}\nfine {:?} {} (IoU {i_fine})\ncoarse {:?} {} (IoU {i_coarse})",
        whole.bbox, whole.score, fine.bbox, fine.score, coarse.bbox, coarse.score
    );
    assert!(
        i_fine > 0.99,
        "fine pass box IoU {i_fine} with the whole-resolution box"
    );
    assert!((fine.score - whole.score).abs() < 1e-3);
    for (p, q) in fine.landmarks.iter().zip(&whole.landmarks) {
        assert!(
            (p[0] - q[0]).abs() < 1.5 && (p[1] - q[1]).abs() < 1.5,
            "{p:?} {q:?}"
        );
    }
    // Without it the box is the 400 px copy's, measurably further from the reference.
    assert!(
        i_coarse < i_fine - 0.005,
        "coarse IoU {i_coarse}, fine {i_fine}"
    );
}

#[test]
fn bench_measures_the_detect_stage_and_names_the_bound() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let photos = d.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let big = image::imageops::resize(&a, 900, 900, image::imageops::FilterType::Triangle);
    big.save(photos.join("a.jpg")).unwrap();
    two_faces(&a).save(photos.join("b.jpg")).unwrap();
    // A photo without a face (fails in the pipeline, cheaply) and a file that is no image.
    noise(300, 300, 7).save(photos.join("c.jpg")).unwrap();
    std::fs::write(photos.join("notes.txt"), "not a photo\n").unwrap();
    let m = d.path().join("m.pt");
    restore_model(&m);
    let cfg = config(d.path(), &w, "", "detect_threads = 2\n");
    let cfg = with_model(&cfg, &m);
    let r = cli([
        "bench".as_ref(),
        "--seconds".as_ref(),
        "0".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        photos.as_os_str(),
    ]);
    let out = r.stdout;
    assert_eq!(r.code, Some(0), "{out}\n{}", r.stderr);
    let rate = |prefix: &str| -> (usize, f64) {
        let line = out
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"));
        let f: Vec<&str> = line[prefix.len()..].split_whitespace().collect();
        let n = f.len();
        (f[n - 3].parse().unwrap(), f[n - 2].parse().unwrap())
    };
    // Every stage measured, the detect stage with its 2 workers.
    let (threads, ips) = rate("face detect");
    assert_eq!(threads, 2, "{out}");
    assert!(ips > 0.0, "{out}");
    assert!(rate("inference").1 > 0.0, "{out}");
    assert!(rate("encode").1 > 0.0, "{out}");
    assert!(rate("whole pipeline").1 > 0.0, "{out}");
    // What was left out is said, and the no-face failure is not counted as made.
    assert!(out.contains("3 images"), "{out}");
    assert!(
        out.contains("skipped 1 files") && out.contains("notes.txt: "),
        "{out}"
    );
    assert!(out.contains("(1 failed and are not counted)"), "{out}");
    // The face crop decodes every pixel: no DCT-scaling row and no "gain".
    assert!(!out.contains("DCT-scaled"), "{out}");
    assert!(
        out.contains("JPEG DCT scaling: not used by this config"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("bound: ")), "{out}");
}

#[test]
fn photos_without_a_fine_pass_keep_the_configured_thresholds() {
    // The coarse pass proposes with lower R-Net/O-Net bars only where a fine pass follows;
    // on a photo no larger than detect_size it is the final pass. In the reference set,
    // face_00019 (970 x 742) holds a face scoring about 0.55 at O-Net: below the 0.7 bar.
    let Some(w) = weights() else { return };
    let d = tempfile::tempdir().unwrap();
    let Some(files) = reference_set(&d.path().join("set"), 20) else {
        return;
    };
    let cfg = config(d.path(), &w, "detect_size = 1024", "");
    let mut checked = 0;
    for f in &files {
        let (fw, fh) = image::image_dimensions(f).unwrap();
        if fw.max(fh) > 1024 {
            continue;
        }
        checked += 1;
        for face in library_faces(&cfg, f) {
            assert!(
                face.score > 0.7,
                "{}: a face scoring {} passed the 0.7 O-Net bar",
                f.display(),
                face.score
            );
        }
    }
    assert!(checked >= 5, "only {checked} photos of at most 1024 px");
}

#[test]
fn check_describes_the_face_crop() {
    let Some(w) = weights() else { return };
    let d = tempfile::tempdir().unwrap();
    let run = |extra: &str, pl: &str| {
        let cfg = config(d.path(), &w, extra, pl);
        let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let out = r.stdout;
        out.lines()
            .find(|l| l.starts_with("face crop: "))
            .unwrap_or_else(|| panic!("no face crop line in:\n{out}"))
            .to_string()
    };
    let l = run("detect_size = 400\nmin_face = 30", "detect_threads = 3\n");
    assert!(l.contains("on cpu, 3 detect workers"), "{l}");
    assert!(
        l.contains("400 px copy, then around each face on the photo (at most 2048 px)"),
        "{l}"
    );
    assert!(l.contains("30 px or 3.0%"), "{l}");
    let l = run("detect_size = 400\nrefine_size = 400", "");
    assert!(l.contains("fine pass off"), "{l}");
}

#[test]
fn frame_buffers_stay_bounded_with_several_detect_workers() {
    let Some((w, a)) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        &w,
        "",
        "fit_threads = 1\ndetect_threads = 2\nchannel_capacity = 2\n",
    );
    let cfg = Config::load(&cfg).unwrap();
    let photo = image::imageops::resize(&a, 700, 700, image::imageops::FilterType::Triangle);
    let mut created = Vec::new();
    for n in [4usize, 24] {
        let inp = d.path().join(format!("in{n}"));
        std::fs::create_dir(&inp).unwrap();
        for i in 0..n {
            // Flipped every other time, so not every photo is the same.
            let p = if i % 2 == 0 {
                photo.clone()
            } else {
                image::imageops::flip_horizontal(&photo)
            };
            p.save(inp.join(format!("{i:03}.jpg"))).unwrap();
        }
        let s = run_folder(
            &cfg,
            &inp,
            &d.path().join(format!("out{n}")),
            Default::default(),
        );
        assert_eq!((s.done, s.failed.len()), (n, 0), "{:?}", s.failed);
        created.push(s.frame_buffers_created);
    }
    // Decoders (2) + fit (1) + 3 + what the 2 detect workers hold (2 frames each on the
    // CPU): 6x more photos allocate no more than that.
    assert!(created[1] <= 2 + 1 + 3 + 2 * 2, "{created:?}");
}
