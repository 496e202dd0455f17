//! Scaled JPEG decoding must not cost visible accuracy.
//!
//! On the reference data (`make_data.py astronaut.png D 100 7`, generated here with the
//! venv's Python), hotpipe's fitted 512 x 512 model inputs (libjpeg-turbo, DCT-scaled when
//! the image is at least twice the target, then the SIMD resize) are compared with a
//! reference that decodes every pixel (the `image` crate, an independent decoder) and
//! resizes with the same filter and geometry. Required: PSNR at least 35 dB on every image
//! and at least 40 dB on average over the images that were decoded at a reduced scale (the
//! others differ only by the two decoders' rounding, and would inflate an average).

use crate::common::{self, psnr};

use std::path::Path;

use hotpipe::config::Config;
use hotpipe::stages::decode::{Decoder, ScaleTarget};
use hotpipe::stages::fit::{Fitter, Rect, source_rect};
use hotpipe::vocab::pool::BufPool;

#[test]
fn scaled_decode_keeps_psnr_against_full_decode() {
    let dir = tempfile::tempdir().unwrap();
    let Some(files) = common::reference_set(&dir.path().join("D"), 100) else {
        return;
    };
    assert_eq!(files.len(), 100);
    // The reference job's fit, with the product's decode limits.
    let cfg = Config::from_toml(
        "[preprocess]\nsize = 512\nfit = \"crop\"\nfilter = \"bilinear\"\n",
        "quality",
        Path::new("."),
        0,
    )
    .unwrap();
    let pre = cfg.preprocess;
    let target = ScaleTarget::for_fit(&pre, false);
    let mut dec = Decoder::new(cfg.decode, BufPool::new(4)).with_scaling(target);
    let mut fit = Fitter::new(pre.clone());
    let mut ours = vec![0u8; fit.row_bytes()];
    let mut reference = vec![0u8; fit.row_bytes()];
    let (mut scaled, mut worst, mut sum) = (0usize, f64::INFINITY, 0.0);
    let mut unscaled_worst = f64::INFINITY;
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let frame = dec.decode(&bytes).unwrap();
        let d = dec.last_reduction();
        fit.fit(&frame, None, &mut ours).unwrap();
        drop(frame);

        let full = image::load_from_memory(&bytes).unwrap().into_rgb8();
        let (w, h) = full.dimensions();
        let whole = Rect {
            x0: 0.0,
            y0: 0.0,
            x1: w as f64,
            y1: h as f64,
        };
        let r = source_rect(whole, pre.fit, 512, 512);
        fit.fit_rect(full.as_raw(), w, h, r, &mut reference)
            .unwrap();
        let p = psnr(&ours, &reference);
        let name = path.file_name().unwrap().to_string_lossy();
        if d > 1 {
            scaled += 1;
            worst = worst.min(p);
            sum += p;
            println!("{name}: {w} x {h}, 1/{d}: {p:.2} dB");
        } else {
            unscaled_worst = unscaled_worst.min(p);
        }
        assert!(p >= 35.0, "{name} ({w} x {h}, 1/{d}): {p:.2} dB < 35 dB");
    }
    let mean = sum / scaled.max(1) as f64;
    println!(
        "{scaled} of {} images DCT-scaled: PSNR min {worst:.2} dB, mean {mean:.2} dB; unscaled min {unscaled_worst:.2} dB",
        files.len()
    );
    assert!(scaled >= 30, "the reference set should exercise scaling");
    assert!(mean >= 40.0, "mean PSNR {mean:.2} dB < 40 dB");
}
