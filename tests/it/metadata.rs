//! `encode.keep_metadata` end to end: a camera JPEG whose EXIF has a GPS position and a
//! serial number goes through `hotpipe process` (no model: decode, fit, encode), once by
//! default and once with the key on, into JPEG and into PNG.

use std::path::{Path, PathBuf};

use exif::experimental::Writer;
use exif::{Context, Field, In, Reader, Tag, Value};
use image::ImageDecoder;

use crate::common::*;

const SERIAL: &str = "BODY-SN-0042-SECRET";

/// A 96 x 64 JPEG (JFIF, then the EXIF in APP1, as cameras and editors write it) with
/// make, model, date, orientation 6, a serial number and a GPS position.
fn camera_jpeg(path: &Path) {
    let p = In::PRIMARY;
    let f = |tag, value| Field {
        tag,
        ifd_num: p,
        value,
    };
    let ascii = |s: &str| Value::Ascii(vec![s.as_bytes().to_vec()]);
    let fields = [
        f(Tag::Make, ascii("HotpipeCam")),
        f(Tag::Model, ascii("HP-1 Mark II")),
        f(Tag::Orientation, Value::Short(vec![6])),
        f(Tag::DateTimeOriginal, ascii("2024:05:06 07:08:09")),
        f(Tag::BodySerialNumber, ascii(SERIAL)),
        f(Tag::GPSLatitudeRef, ascii("N")),
        f(
            Tag::GPSLatitude,
            Value::Rational(vec![(51, 1).into(), (30, 1).into(), (1234, 100).into()]),
        ),
    ];
    let mut w = Writer::new();
    fields.iter().for_each(|f| w.push_field(f));
    let mut tiff = std::io::Cursor::new(Vec::new());
    w.write(&mut tiff, false).unwrap();
    let mut jpeg = Vec::new();
    let mut e = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
    image::ImageEncoder::set_exif_metadata(&mut e, tiff.into_inner()).unwrap();
    e.encode_image(&picture(96, 64, 1)).unwrap();
    std::fs::write(path, jpeg).unwrap();
}

/// The EXIF of an image file, as the `image` crate's decoder finds it.
fn exif_of(path: &Path) -> Option<Vec<u8>> {
    image::ImageReader::open(path)
        .unwrap()
        .with_guessed_format()
        .unwrap()
        .into_decoder()
        .unwrap()
        .exif_metadata()
        .unwrap()
}

fn config(dir: &Path, format: &str, keep: bool) -> PathBuf {
    let key = if keep { "keep_metadata = true\n" } else { "" };
    write(
        &dir.join(format!("{format}-{keep}.toml")),
        &format!("[preprocess]\nsize = 64\n\n[encode]\nformat = \"{format}\"\n{key}"),
    )
}

/// `hotpipe process` on `src` into a fresh folder: the one output's path.
fn run(dir: &Path, src: &Path, format: &str, keep: bool) -> PathBuf {
    let out = dir.join(format!("out-{format}-{keep}"));
    let r = process(&config(dir, format, keep), &out, &[src]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let ext = if format == "jpeg" { "jpg" } else { format };
    out.join(format!("cam.{ext}"))
}

fn holds(file: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(file).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn exif_reaches_the_output_only_when_kept_and_then_only_what_is_safe() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("cam.jpg");
    camera_jpeg(&src);
    assert!(holds(&src, SERIAL), "the input carries the serial");
    for format in ["jpeg", "png"] {
        let plain = run(d.path(), &src, format, false);
        assert_eq!(exif_of(&plain), None, "{format}: no EXIF by default");
        assert!(
            !holds(&plain, SERIAL) && !holds(&plain, "HotpipeCam"),
            "{format}"
        );

        let kept = run(d.path(), &src, format, true);
        let exif = exif_of(&kept).unwrap_or_else(|| panic!("{format}: EXIF not kept"));
        assert!(!holds(&kept, SERIAL), "{format}: the serial leaked");
        let e = Reader::new().read_raw(exif).expect("valid EXIF");
        let text = |tag| match &e.get_field(tag, In::PRIMARY)?.value {
            Value::Ascii(v) => Some(String::from_utf8_lossy(&v[0]).into_owned()),
            _ => None,
        };
        assert_eq!(text(Tag::Make).as_deref(), Some("HotpipeCam"), "{format}");
        assert_eq!(
            text(Tag::Model).as_deref(),
            Some("HP-1 Mark II"),
            "{format}"
        );
        assert_eq!(
            text(Tag::DateTimeOriginal).as_deref(),
            Some("2024:05:06 07:08:09")
        );
        let orientation = e.get_field(Tag::Orientation, In::PRIMARY);
        assert_eq!(
            orientation.and_then(|f| f.value.get_uint(0)),
            Some(1),
            "{format}"
        );
        for f in e.fields() {
            assert!(!matches!(f.tag.0, Context::Gps), "{format}: {f:?}");
            assert!(
                ![Tag::BodySerialNumber, Tag::GPSInfoIFDPointer].contains(&f.tag),
                "{format}: {f:?}"
            );
        }
    }
}
