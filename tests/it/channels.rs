//! Pixels that are not three channels, end to end: `decode.alpha = "keep"` gives the
//! model RGBA, and models returning 1 (grey) or 4 (RGBA) channels are encoded as such,
//! with the real binary, real PNG/JPEG/WebP files and real TorchScript models.

use std::path::{Path, PathBuf};

use crate::common::*;
use tch::{CModule, Device, Kind, Tensor};

/// Trace `f` over an `N x in_ch x 16 x 16` example and save it as `path`.
fn traced(path: &Path, in_ch: i64, f: impl Fn(&Tensor) -> Tensor) {
    let _rng = torch_rng();
    let mut g = |xs: &[Tensor]| vec![f(&xs[0])];
    let m = CModule::create_by_tracing(
        "M",
        "forward",
        &[Tensor::rand([1, in_ch, 16, 16], (Kind::Float, Device::Cpu))],
        &mut g,
    )
    .unwrap();
    m.save(path).unwrap();
}

/// 64 x 48, a 1:1 stretch (the fit copies), PNG out unless `extra` says otherwise.
fn config(dir: &Path, model: Option<&str>, extra: &str) -> PathBuf {
    let model = model.map_or(String::new(), |m| {
        format!("[model]\npath = \"{m}\"\ndevice = \"cpu\"\nmax_batch = 4\n\n")
    });
    write(
        &dir.join("c.toml"),
        &format!(
            "{model}[preprocess]\nsize = [64, 48]\nfit = \"stretch\"\nfilter = \"lanczos3\"\n\n{extra}"
        ),
    )
}

/// An RGBA picture with an alpha ramp across it (0 at the left to 255 at the right).
fn rgba_picture(seed: u32) -> image::RgbaImage {
    let rgb = picture(64, 48, seed);
    image::RgbaImage::from_fn(64, 48, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], (x * 255 / 63) as u8])
    })
}

fn open(path: &Path) -> image::DynamicImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn kept_alpha_reaches_the_output_and_opaque_inputs_get_full_alpha() {
    let d = tempfile::tempdir().unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    let src = rgba_picture(3);
    src.save(inp.join("rgba.png")).unwrap();
    let la = image::DynamicImage::ImageRgba8(src.clone()).into_luma_alpha8();
    la.save(inp.join("la.png")).unwrap();
    write_jpeg(&inp.join("opaque.jpg"), 64, 48, 4);
    let cfg = config(
        d.path(),
        None,
        "[decode]\nalpha = \"keep\"\n\n[encode]\nformat = \"png\"\n",
    );
    let out = d.path().join("out");
    let r = process(&cfg, &out, &[&inp]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);

    let got = open(&out.join("rgba.png"));
    assert_eq!(got.color(), image::ColorType::Rgba8, "written as RGBA");
    let got = got.into_rgba8();
    for (g, s) in got.pixels().zip(src.pixels()) {
        assert_eq!(g.0[3], s.0[3], "alpha exactly as given");
        // Premultiplied resampling keeps colour to a level where alpha is high; where it
        // is low the colour carries little and is rounded more.
        if s.0[3] >= 128 {
            for k in 0..3 {
                assert!(g.0[k].abs_diff(s.0[k]) <= 1, "{g:?} vs {s:?}");
            }
        }
    }
    let got = open(&out.join("la.png")).into_rgba8();
    for (g, s) in got.pixels().zip(la.pixels()) {
        assert_eq!(g.0[3], s.0[1]);
        if s.0[1] >= 128 {
            assert!(g.0[..3].iter().all(|&v| v.abs_diff(s.0[0]) <= 1), "{g:?}");
        }
    }
    // An opaque JPEG: every alpha 255, the colour the plain RGB path gives.
    let opaque = open(&out.join("opaque.png"));
    assert_eq!(opaque.color(), image::ColorType::Rgba8);
    let opaque = opaque.into_rgba8();
    assert!(opaque.pixels().all(|p| p.0[3] == 255));
    let rgb_cfg = config(d.path(), None, "[encode]\nformat = \"png\"\n");
    let rgb_out = d.path().join("rgb");
    process(&rgb_cfg, &rgb_out, &[inp.join("opaque.jpg")]);
    let rgb = open(&rgb_out.join("opaque.png")).into_rgb8();
    let colour: Vec<u8> = opaque
        .pixels()
        .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
        .collect();
    assert_eq!(colour, rgb.into_raw(), "same colour as without alpha");
}

#[test]
fn a_model_given_rgba_returning_grey_writes_grey_masks() {
    let d = tempfile::tempdir().unwrap();
    // The mask: the alpha channel itself.
    traced(&d.path().join("mask.pt"), 4, |x| x.narrow(1, 3, 1) * 1.0);
    let src = rgba_picture(5);
    src.save(d.path().join("a.png")).unwrap();
    let cfg = config(
        d.path(),
        Some("mask.pt"),
        "[decode]\nalpha = \"keep\"\n\n[encode]\nformat = \"png\"\n",
    );
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("input:  N x 4 x 48 x 64")
            && r.stdout.contains("output: N x 1 x 48 x 64 (grey"),
        "{}",
        r.stdout
    );
    let out = d.path().join("out");
    let r = process(&cfg, &out, &[d.path().join("a.png")]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let got = open(&out.join("a.png"));
    assert_eq!(got.color(), image::ColorType::L8, "a one-channel PNG");
    let got = got.into_luma8();
    let want: Vec<u8> = src.pixels().map(|p| p.0[3]).collect();
    assert_eq!(got.into_raw(), want, "the mask is the input's alpha");

    // The same model wired for RGB input cannot run: said at start-up, with the key.
    traced(&d.path().join("rgb.pt"), 3, |x| {
        x.conv2d(
            &Tensor::ones([1, 3, 1, 1], (Kind::Float, Device::Cpu)),
            None::<Tensor>,
            [1],
            [0],
            [1],
            1,
        ) / 3.0
    });
    let cfg = config(
        d.path(),
        Some("rgb.pt"),
        "[decode]\nalpha = \"keep\"\n\n[encode]\nformat = \"png\"\n",
    );
    let r = cli(["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("2 x 4 x 48 x 64") && r.stderr.contains("decode.alpha = \"keep\""),
        "{}",
        r.stderr
    );
}

#[test]
fn a_model_returning_rgba_writes_webp_with_alpha_and_refuses_jpeg() {
    let d = tempfile::tempdir().unwrap();
    // RGB in, RGBA out: the colour, and as alpha the mean of the three channels.
    traced(&d.path().join("rgba.pt"), 3, |x| {
        Tensor::cat(
            &[
                x.shallow_clone(),
                x.mean_dim(Some([1i64].as_slice()), true, Kind::Float),
            ],
            1,
        )
    });
    write_png(&d.path().join("p.png"), 64, 48, 7);
    let cfg = config(d.path(), Some("rgba.pt"), "[encode]\nformat = \"webp\"\n");
    let out = d.path().join("out");
    let r = process(&cfg, &out, &[d.path().join("p.png")]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let got = open(&out.join("p.webp"));
    assert_eq!(got.color(), image::ColorType::Rgba8);
    let src = open(&d.path().join("p.png")).into_rgb8();
    for (g, s) in got.into_rgba8().pixels().zip(src.pixels()) {
        assert_eq!(&g.0[..3], &s.0[..], "colour passes through (lossless WebP)");
        let mean = s.0.iter().map(|&v| v as f64).sum::<f64>() / 3.0;
        assert!((g.0[3] as f64 - mean).abs() <= 0.51, "{g:?} {s:?}");
    }
    // JPEG cannot carry it: refused before any input is read.
    let cfg = config(d.path(), Some("rgba.pt"), "[encode]\nformat = \"jpeg\"\n");
    let out = d.path().join("jpeg");
    let r = cli([
        "process".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        d.path().join("p.png").as_os_str(),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("4 channels (RGBA)") && r.stderr.contains("[encode] format"),
        "{}",
        r.stderr
    );
    assert!(names(&out).is_empty());
}
