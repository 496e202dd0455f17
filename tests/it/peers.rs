//! Equivalence with the Python peer: on the shared reference data and model, hotpipe's
//! outputs match `peers.py ... naive` with PSNR >= 35 dB on every image. The two use
//! different resizers and JPEG codecs, so bit-exactness is not expected; 35 dB is far
//! below what a wrong crop, a colour swap or a missing model step would give (< 20 dB).
//!
//! Needs the bench fixtures (`../shared/bench` or the vendored `tests/data/bench`) and the
//! venv's Python (`HOTPIPE_PYTHON`, set by scripts/env.sh); under scripts/test.sh a missing
//! one fails the test.

use crate::common::*;

#[test]
fn outputs_match_the_naive_python_peer() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("D");
    let model = d.path().join("m.pt");
    let Some(files) = reference_set(&data, 100) else {
        return;
    };
    assert_eq!(files.len(), 100);
    bench_model(&model, 16, 4).unwrap();
    let peer_out = d.path().join("peer");
    let line = bench_script(
        "peers.py",
        [
            model.as_os_str(),
            data.as_os_str(),
            peer_out.as_os_str(),
            "cpu".as_ref(),
            "naive".as_ref(),
            "2".as_ref(),
            "1".as_ref(),
            "512".as_ref(),
        ],
    )
    .unwrap();
    assert!(line.contains("images=100"), "{line}");

    let cfg = write(
        &d.path().join("p.toml"),
        "[model]\npath = \"m.pt\"\ndevice = \"cpu\"\nmax_batch = 8\n[preprocess]\nsize = 512\nfit = \"crop\"\nfilter = \"bilinear\"\n[encode]\nformat = \"jpeg\"\nquality = 90\n",
    );
    let ours = d.path().join("ours");
    let r = process(&cfg, &ours, &[data]);
    assert!(r.code == Some(0), "{}", r.stderr);

    let names = names(&peer_out.join("naive"));
    assert_eq!(names.len(), 100);
    let mut worst = f64::INFINITY;
    let mut sum = 0.0;
    for n in &names {
        let a = image::open(peer_out.join("naive").join(n))
            .unwrap()
            .into_rgb8();
        let b = image::open(ours.join(n))
            .unwrap_or_else(|e| panic!("{n}: {e}"))
            .into_rgb8();
        assert_eq!(a.dimensions(), b.dimensions(), "{n}");
        let p = psnr(a.as_raw(), b.as_raw());
        assert!(p >= 35.0, "{n}: PSNR {p:.1} dB < 35");
        worst = worst.min(p);
        sum += p;
    }
    eprintln!(
        "PSNR vs naive peer over {} images: worst {worst:.1} dB, mean {:.1} dB",
        names.len(),
        sum / names.len() as f64
    );
}
