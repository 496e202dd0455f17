//! Criterion benchmarks of the CPU stages per format: JPEG decode (libjpeg-turbo full and
//! DCT-scaled, zune-jpeg through `image`), PNG decode, the fit, JPEG and PNG encode.
//!
//! The picture is the reference portrait (`tests/data/bench/astronaut.png`) scaled up to
//! photo sizes, so the JPEGs have realistic detail. Run: `cargo bench --bench cpu_stages`
//! (add `-- decode` etc. to pick a group).

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use fast_image_resize as fir;

use hotpipe::config::{Config, DecodeConfig, EncodeConfig, Format, PreprocessConfig};
use hotpipe::stages::decode::{Decoder, ScaleTarget};
use hotpipe::stages::encode::Encoder;
use hotpipe::stages::fit::Fitter;
use hotpipe::vocab::pool::BufPool;

/// Packed RGB8 `w x h`: the reference portrait (vendored in tests/data/bench) resized.
fn picture(w: u32, h: u32) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench/astronaut.png");
    let src = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_rgb8();
    let (sw, sh) = src.dimensions();
    let src = fir::images::Image::from_vec_u8(sw, sh, src.into_raw(), fir::PixelType::U8x3)
        .expect("source image");
    let mut dst = fir::images::Image::new(w, h, fir::PixelType::U8x3);
    fir::Resizer::new()
        .resize(&src, &mut dst, &fir::ResizeOptions::new())
        .expect("resize");
    dst.into_vec()
}

fn jpeg(px: &[u8], w: u32, h: u32) -> Vec<u8> {
    let img = turbojpeg::Image {
        pixels: px,
        width: w as usize,
        pitch: w as usize * 3,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(img, 90, turbojpeg::Subsamp::Sub2x2)
        .expect("compress")
        .to_vec()
}

/// The reference job (512 x 512 crop, bilinear) through the product's own config parser,
/// so the benchmark runs with the decode limits and fit the daemon would use.
fn config() -> Config {
    Config::from_toml(
        "[preprocess]\nsize = 512\nfit = \"crop\"\nfilter = \"bilinear\"\n",
        "cpu_stages",
        Path::new("."),
        0,
    )
    .expect("bench config")
}

fn decode_cfg() -> DecodeConfig {
    config().decode
}

fn preprocess() -> PreprocessConfig {
    config().preprocess
}

fn target() -> Option<ScaleTarget> {
    ScaleTarget::for_fit(&preprocess(), hotpipe::config::DctScaling::Auto, false)
}

fn decode(c: &mut Criterion) {
    let (w, h) = (1600, 1200);
    let data = jpeg(&picture(w, h), w, h);
    let mut g = c.benchmark_group("decode_jpeg_1600x1200");
    let mut full = Decoder::new(decode_cfg(), BufPool::new(4));
    g.bench_function("libjpeg-turbo full", |b| {
        b.iter(|| full.decode(black_box(&data)).unwrap())
    });
    let mut scaled = Decoder::new(decode_cfg(), BufPool::new(4)).with_scaling(target());
    g.bench_function("libjpeg-turbo DCT 1/2", |b| {
        b.iter(|| scaled.decode(black_box(&data)).unwrap())
    });
    g.bench_function("zune-jpeg (image) full", |b| {
        b.iter(|| image::load_from_memory(black_box(&data)).unwrap())
    });
    // Scales the pipeline does not use (n/8 other than 1/2, 1/4, 1/8), for comparison.
    let mut tj = turbojpeg::Decompressor::new().unwrap();
    for n in [5usize, 6] {
        let f = turbojpeg::ScalingFactor::new(n, 8);
        let (sw, sh) = (f.scale(w as usize), f.scale(h as usize));
        let mut buf = vec![0u8; sw * sh * 3];
        g.bench_function(format!("libjpeg-turbo DCT {n}/8"), |b| {
            b.iter(|| {
                tj.set_scaling_factor(f).unwrap();
                let img = turbojpeg::Image {
                    pixels: &mut buf[..],
                    width: sw,
                    pitch: sw * 3,
                    height: sh,
                    format: turbojpeg::PixelFormat::RGB,
                };
                tj.decompress(black_box(&data), img).unwrap()
            })
        });
    }
    g.finish();

    let (w, h) = (1024, 768);
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&picture(w, h), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut g = c.benchmark_group("decode_png_1024x768");
    g.bench_function("image png", |b| {
        b.iter(|| full.decode(black_box(&png)).unwrap())
    });
    g.finish();
}

use image::ImageEncoder as _;

fn fit(c: &mut Criterion) {
    let mut g = c.benchmark_group("fit_to_512_crop_bilinear");
    let mut fitter = Fitter::new(preprocess());
    let mut row = vec![0u8; fitter.row_bytes()];
    let mut dec = Decoder::new(decode_cfg(), BufPool::new(4));
    for (w, h) in [(1600u32, 1200u32), (800, 600)] {
        let frame = dec.decode(&jpeg(&picture(w, h), w, h)).unwrap();
        g.bench_function(format!("from {w}x{h}"), |b| {
            b.iter(|| fitter.fit(black_box(&frame), None, &mut row).unwrap())
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let px = picture(512, 512);
    let mut g = c.benchmark_group("encode_512x512");
    let jpeg_cfg = EncodeConfig {
        format: Format::Jpeg,
        quality: 90,
        keep_metadata: false,
    };
    let mut turbo = Encoder::new(jpeg_cfg.clone());
    g.bench_function("jpeg q90 libjpeg-turbo", |b| {
        b.iter(|| turbo.encode(black_box(&px), 512, 512).unwrap().len())
    });
    let mut plain = Encoder::new(jpeg_cfg).without_turbojpeg();
    g.bench_function("jpeg q90 image", |b| {
        b.iter(|| plain.encode(black_box(&px), 512, 512).unwrap().len())
    });
    let mut png = Encoder::new(EncodeConfig {
        format: Format::Png,
        quality: 90,
        keep_metadata: false,
    });
    g.bench_function("png fast", |b| {
        b.iter(|| png.encode(black_box(&px), 512, 512).unwrap().len())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = decode, fit, encode
}
criterion_main!(benches);
