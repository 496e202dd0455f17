//! Scaled JPEG decoding must not cost visible accuracy.
//!
//! On the reference data (`make_data.py astronaut.png D 100 7`, generated here with the
//! venv's Python), hotpipe's fitted 512 x 512 model inputs (libjpeg-turbo, DCT-scaled when
//! the image is at least twice the target, then the SIMD resize) are compared with a
//! reference that decodes every pixel (the `image` crate, an independent decoder) and
//! resizes with the same filter and geometry. Required: PSNR at least 35 dB on every image
//! and at least 40 dB on average over the images that were decoded at a reduced scale (the
//! others differ only by the two decoders' rounding, and would inflate an average).

mod common;

use common::psnr;

use std::path::PathBuf;
use std::process::Command;

use hotpipe::config::{Filter, FitMode, PreprocessConfig};
use hotpipe::pipeline::pool::BufPool;
use hotpipe::stages::decode::{Decoder, ScaleTarget};
use hotpipe::stages::fit::{Fitter, Rect, source_rect};

/// The reference data, or why it cannot be made here.
fn reference_data() -> Result<(tempfile::TempDir, Vec<PathBuf>), String> {
    let shared = common::shared_bench().ok_or("no bench fixtures")?;
    let script = shared.join("make_data.py");
    let source = shared.join("astronaut.png");
    let python = std::env::var("HOTPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = dir.path().join("D");
    let status = Command::new(&python)
        .arg(&script)
        .arg(&source)
        .arg(&out)
        .args(["100", "7"])
        .status()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{python} make_data.py failed ({status}); it needs numpy and pillow"
        ));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|e| e.to_string())?
        .map(|e| e.map(|e| e.path()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    files.sort();
    Ok((dir, files))
}

#[test]
fn scaled_decode_keeps_psnr_against_full_decode() {
    let (_dir, files) = match reference_data() {
        Ok(d) => d,
        Err(why) => {
            common::skip(&format!("no reference data ({why})"));
            return;
        }
    };
    assert_eq!(files.len(), 100);
    let pre = PreprocessConfig {
        width: 512,
        height: 512,
        fit: FitMode::Crop,
        filter: Filter::Bilinear,
        mean: None,
        std: None,
        pad_color: [0, 0, 0],
    };
    let decode_cfg = hotpipe::config::DecodeConfig {
        max_width: 16384,
        max_height: 16384,
        max_alloc_bytes: 1 << 30,
        max_file_bytes: 256 << 20,
    };
    let target = ScaleTarget {
        width: 512,
        height: 512,
        fit: FitMode::Crop,
    };
    let mut dec = Decoder::new(decode_cfg, BufPool::new(4)).with_scaling(Some(target));
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
