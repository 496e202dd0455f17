//! Decode: the bytes of a photo to a packed sRGB RGB8 [`Frame`] in a pooled buffer.
//!
//! Formats: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF (8 and 16 bits; none, LZW,
//! Deflate, PackBits and JPEG compression), HEIC/HEIF and AVIF. What the model sees must
//! be the photo, so the decode is faithful: embedded ICC profiles are converted to sRGB,
//! CMYK is converted (through its profile when it has one), 16-bit samples are rounded,
//! alpha is composited as `decode.alpha` says, and the EXIF orientation is applied, so a
//! phone photo is upright (see [`colour`] for each conversion and why). With
//! `encode.keep_metadata` the input's EXIF is kept as well, filtered, for the encoder
//! (see [`crate::stages::metadata`]).
//!
//! Inputs are untrusted: dimensions and the decoder's allocations are bounded by the
//! `[decode]` limits, checked from the header before any pixel buffer is touched, so a
//! 50000 x 50000 header costs nothing, in every format. Every pixel buffer of a decode
//! (the frame, its EXIF-rotated copy, the decoder's native pixels before conversion) comes
//! from the frame pool in one request, under its byte budget (`decode.frame_budget_mib`):
//! a decode that could never fit fails at once, one that fits waits for room while
//! holding no buffer, which is what keeps the waiting free of deadlock (see [`BufPool`]).
//!
//! Three codecs, split by what each is best at (measured: see `BENCHMARKS.md`):
//! - **JPEG goes through libjpeg-turbo 3** ([`jpeg`]). It is the faster full decoder and,
//!   above all, it can decode at 1/2, 1/4 or 1/8 scale in the DCT domain: when the image is
//!   several times the model's input, most pixels would be thrown away by the resize
//!   anyway, and not computing them is the largest single saving in the CPU stages. The
//!   scale is chosen per image by [`ScaleTarget::reduction`] so that the part the fit stage
//!   keeps stays at least twice the output (`decode.dct_scaling`): a reduced IDCT is a
//!   poor low-pass filter, and only with that margin does the resize's own filter do the
//!   antialiasing (measured against a careful resize of the full decode: `BENCHMARKS.md`).
//! - **HEIC/HEIF and AVIF go through libheif** ([`heif`]).
//! - **Everything else goes through the `image` crate** (png, image-webp, tiff, gif, bmp),
//!   with `image::Limits`; so do JPEGs libjpeg-turbo refuses only for stray bytes between
//!   markers (zune-jpeg is more lenient there).

mod colour;
mod heif;
mod jpeg;

use std::io::Cursor;
use std::sync::Arc;

use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::config::{DctScaling, DecodeConfig, FitMode, PreprocessConfig};
use crate::stages::fit::{Rect, source_rect};
use crate::stages::metadata;
use crate::stages::read::Input;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::item::{Frame, Item};
use crate::vocab::pool::{BufPool, OverBudget, PooledBuf};
use crate::vocab::stage::StageWorker;
use colour::{Colour, Native, Source};

/// Progressive JPEGs with more scans than this are refused: each scan re-reads the whole
/// coefficient buffer, so a crafted file with thousands of tiny scans is a cheap way to
/// burn CPU (libjpeg-turbo's own advice for untrusted input).
const MAX_JPEG_SCANS: u32 = 500;

/// What the decoded frame will be fitted to, so a JPEG can be decoded at a reduced scale
/// without losing what the fit needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleTarget {
    pub width: u32,
    pub height: u32,
    /// The fit mode whose source rectangle must keep `oversample` times the target.
    pub fit: FitMode,
    /// How many source pixels per output pixel a reduced decode must keep, at least.
    pub oversample: f64,
}

impl ScaleTarget {
    /// The target for the fit `pre` describes, or `None` (decode every pixel) when
    /// `dct` is off or a stage between decode and fit picks the region (the face crop):
    /// that region may be a small part of the image, and cut from a reduced decode it
    /// would be upscaled and blurred (tests/facecrop.rs measured 26 dB against a crop of
    /// the full decode).
    pub fn for_fit(
        pre: &PreprocessConfig,
        dct: DctScaling,
        region_chosen_later: bool,
    ) -> Option<ScaleTarget> {
        let oversample = match dct {
            DctScaling::Off => return None,
            DctScaling::Auto => 2.0,
            DctScaling::Fast => 1.0,
        };
        (!region_chosen_later).then_some(ScaleTarget {
            width: pre.width,
            height: pre.height,
            fit: pre.fit,
            oversample,
        })
    }

    /// The smallest DCT scale, in eighths (1 to 8; 8 is a full decode), that keeps the
    /// source rectangle of an upright `w x h` image at least `oversample` times the target
    /// on both axes. libjpeg-turbo decodes at any M/8, but only 1/8 to 4/8 are faster than
    /// a full decode: 5/8, 6/8 and 7/8 take its plain-C scaled IDCTs and measured 1.4x,
    /// 1.9x and 2.8x *slower* than the SIMD full decode (2400 x 1800, this machine), while
    /// 3/8 costs the same as 4/8. So the scales offered are 1/8 to 4/8, or every pixel.
    pub fn scale(&self, w: u32, h: u32) -> u32 {
        let full = Rect {
            x0: 0.0,
            y0: 0.0,
            x1: w as f64,
            y1: h as f64,
        };
        let r = source_rect(full, self.fit, self.width, self.height);
        // Pad mode's rectangle reaches past the image; only the image part is decoded, but
        // the scale factor (output pixels per source pixel) is what matters, and it is the
        // same for the whole rectangle.
        let slack = ((r.x1 - r.x0) / self.width as f64).min((r.y1 - r.y0) / self.height as f64);
        // libjpeg-turbo rounds scaled sizes up; a rounded-up size is still enough when the
        // exact product is, so the exact test is the safe one.
        (1..=4u32)
            .find(|&m| slack * m as f64 / 8.0 >= self.oversample)
            .unwrap_or(8)
    }
}

/// One decode worker's state: limits, codec handles, colour transforms, and the pool its
/// buffers come from.
pub struct Decoder {
    cfg: DecodeConfig,
    pool: Arc<BufPool>,
    /// `None` when libjpeg-turbo could not be initialised; JPEGs then go through `image`.
    tj: Option<turbojpeg::Decompressor>,
    target: Option<ScaleTarget>,
    /// The DCT scale of the last decoded image, in eighths (8 = full decode).
    last_scale: u32,
    colour: Colour,
    /// The last JPEG's ICC profile, reassembled from its segments (kept for its capacity).
    icc: Vec<u8>,
    /// Whether the input's EXIF is kept for the output (`encode.keep_metadata`).
    keep_exif: bool,
    /// The last image's EXIF, filtered; handed to its item by [`StageWorker::process`].
    exif: Option<Vec<u8>>,
    /// Hash each input for its sidecar ([`Decoder::with_digest`]).
    digest: bool,
}

impl Decoder {
    pub fn new(cfg: DecodeConfig, pool: Arc<BufPool>) -> Decoder {
        let tj = turbojpeg::Decompressor::new()
            .and_then(|mut d| d.set_scan_limit(MAX_JPEG_SCANS).map(|()| d))
            .map_err(|e| {
                tracing::warn!("libjpeg-turbo unavailable, JPEGs decode through image: {e}")
            })
            .ok();
        Decoder {
            cfg,
            pool,
            tj,
            target: None,
            last_scale: 8,
            colour: Colour::default(),
            icc: Vec::new(),
            keep_exif: false,
            exif: None,
            digest: false,
        }
    }

    /// Allow DCT-domain downscaling of JPEGs for frames that will be fitted to `target`
    /// (`None`: always decode at full size, which `Frame::orig_*` then equals).
    pub fn with_scaling(mut self, target: Option<ScaleTarget>) -> Decoder {
        self.target = target;
        self
    }

    /// Hash each input's bytes (SHA-256) for its sidecar. Here rather than in the read
    /// stage because decode has many threads and read one: a 5 MB photo costs about 3 ms
    /// of SHA-NI hashing, on bytes the decoder is about to touch anyway.
    pub fn with_digest(mut self, on: bool) -> Decoder {
        self.digest = on;
        self
    }

    /// Keep each input's EXIF, filtered to what is safe to publish, for the encoder
    /// (`encode.keep_metadata`). Off by default: then no EXIF is read at all.
    pub fn with_exif(mut self, keep: bool) -> Decoder {
        self.keep_exif = keep;
        self
    }

    /// The last image's filtered EXIF (`None` unless [`Decoder::with_exif`] is on and it
    /// had one), taken: the next image starts without.
    pub fn take_exif(&mut self) -> Option<Vec<u8>> {
        self.exif.take()
    }

    /// Each codec path calls this once with how to get its filtered EXIF, which runs only
    /// when it is kept, so by default nothing is read or allocated for it.
    fn capture_exif(&mut self, exif: impl FnOnce() -> Option<Vec<u8>>) {
        if self.keep_exif {
            self.exif = exif();
        }
    }

    /// Bytes per pixel of the frames this decoder makes.
    fn channels(&self) -> usize {
        self.cfg.channels()
    }

    /// The DCT scale the last image was decoded at, in eighths (8: every pixel).
    pub fn last_scale(&self) -> u32 {
        self.last_scale
    }

    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        l.max_image_width = Some(self.cfg.max_width);
        l.max_image_height = Some(self.cfg.max_height);
        l.max_alloc = Some(self.cfg.max_alloc_bytes);
        l
    }

    /// The header's size against the limits, before anything is allocated.
    fn check_size(&self, w: u32, h: u32, bytes_per_px: u64) -> Result<(), StageError> {
        if w > self.cfg.max_width || h > self.cfg.max_height {
            return Err(StageError::OverLimit(format!(
                "image is {w} x {h}, over the limit of {} x {} (decode.max_width, decode.max_height)",
                self.cfg.max_width, self.cfg.max_height
            )));
        }
        if w == 0 || h == 0 {
            return Err(StageError::BadInput(format!(
                "image has no pixels ({w} x {h})"
            )));
        }
        let need = w as u64 * h as u64 * bytes_per_px;
        if need > self.cfg.max_alloc_bytes {
            return Err(StageError::OverLimit(format!(
                "decoding would take {} MiB, over the limit of {} MiB (decode.max_alloc_mib)",
                need >> 20,
                self.cfg.max_alloc_bytes >> 20
            )));
        }
        Ok(())
    }

    /// Decode `data`. The error is a reason for the user ("not an image", "over the
    /// limits", "truncated").
    pub fn decode(&mut self, data: &[u8]) -> Result<Frame, StageError> {
        self.last_scale = 8;
        self.exif = None;
        if heif::is_heif(data) {
            return self.decode_heif(data);
        }
        if data.starts_with(&[0xFF, 0xD8, 0xFF]) && self.tj.is_some() {
            let r = self.decode_turbo(data);
            if r.is_err() {
                // A failed call can leave libjpeg-turbo's handle in a state that fails the
                // next file too (seen: a valid JPEG right after a truncated one read as
                // "integer value width overflowed"): the next file gets a fresh handle.
                self.tj = turbojpeg::Decompressor::new().ok();
            }
            match r {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                // libjpeg-turbo decides. It refuses files with mere warnings too; the one
                // warning cameras are known to cause (stray bytes between markers, before
                // the data they delimit) gets a second chance with the more lenient
                // zune-jpeg. Every other corruption fails: zune-jpeg accepts a damaged
                // scan and fills the rest grey, and a grey image must not reach outbox/.
                Err(StageError::BadInput(reason)) if reason.contains("extraneous bytes") => {
                    self.last_scale = 8;
                    return self
                        .decode_image(data)
                        .map_err(|_| StageError::BadInput(reason));
                }
                Err(reason) => return Err(reason),
            }
        }
        self.decode_image(data)
    }

    /// Everything else through the `image` crate, under `image::Limits`.
    fn decode_image(&mut self, data: &[u8]) -> Result<Frame, StageError> {
        let reader = ImageReader::new(Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| StageError::io("cannot read", e))?;
        let format = match reader.format() {
            Some(
                f @ (ImageFormat::Jpeg
                | ImageFormat::Png
                | ImageFormat::WebP
                | ImageFormat::Bmp
                | ImageFormat::Gif
                | ImageFormat::Tiff),
            ) => f,
            Some(f) => {
                return Err(StageError::Unsupported(format!(
                    "{f:?} images are not supported ({SUPPORTED} are)"
                )));
            }
            None => {
                return Err(StageError::BadInput(format!(
                    "not a recognised image ({SUPPORTED} expected)"
                )));
            }
        };
        let mut reader = reader;
        reader.limits(self.limits());
        let mut dec = reader.into_decoder().map_err(|e| describe(format, e))?;
        let (w, h) = dec.dimensions();
        let ch = self.channels();
        self.check_size(w, h, ch as u64)?;
        let frame_len = w as usize * h as usize * ch;
        let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
        self.capture_exif(|| metadata::from_decoder(format, &mut dec, data));
        let icc = match format {
            ImageFormat::Tiff => tiff_icc(data),
            _ => dec.icc_profile().ok().flatten(),
        };
        let color = dec.color_type();
        let (layout, sixteen) = native_layout(color)?;
        // RGB8 into an RGB frame is written straight into it (and converted there, if it
        // has a profile): no second buffer, no copy.
        let native_len = if layout == Native::Rgb && !sixteen && ch == 3 {
            0
        } else {
            usize::try_from(dec.total_bytes()).map_err(|_| too_large())?
        };
        let rotate = orientation != Orientation::NoTransforms;
        // Native pixels of 3 or more bytes each are done with before the rotation, so
        // their buffer is where the rotated frame goes: one buffer less to fit.
        let rotate_into_native = rotate && native_len >= frame_len;
        let rotated = if rotate && !rotate_into_native {
            frame_len
        } else {
            0
        };
        let [mut out, mut dst, mut native] =
            buffers(&self.pool, (w, h), frame_len, rotated, native_len)?;
        if native_len == 0 {
            dec.read_image(&mut out).map_err(|e| describe(format, e))?;
            if let Some(icc) = &icc {
                self.colour
                    .rgb_in_place(&mut out, w as usize, 3, icc, false);
            }
        } else {
            dec.read_image(&mut native)
                .map_err(|e| describe(format, e))?;
            let src = Source {
                px: &native,
                width: w as usize,
                stride: native_len / h as usize,
                layout,
                sixteen,
                icc: icc.as_deref(),
            };
            self.colour.convert(&src, &mut out, self.cfg.background)?;
            if rotate_into_native {
                native.truncate(frame_len);
                dst = native;
            }
        }
        let (out, w, h) = apply_orientation(out, dst, w, h, ch, orientation);
        Ok(Frame::full(out, w, h, ch))
    }
}

/// A TIFF's ICC profile (tag 34675), read with the tiff crate itself: the `image` crate's
/// TIFF decoder (0.25.10) returns none for profiles the tiff crate reads fine (measured on
/// Pillow-written TIFFs). Only the first IFD is parsed, under the tiff crate's limits.
fn tiff_icc(data: &[u8]) -> Option<Vec<u8>> {
    let mut d = tiff::decoder::Decoder::new(Cursor::new(data)).ok()?;
    d.get_tag_u8_vec(tiff::tags::Tag::IccProfile).ok()
}

/// The formats named in "not supported" messages.
const SUPPORTED: &str = "JPEG, PNG, WebP, HEIC/HEIF, AVIF, TIFF, BMP, GIF";

/// How the `image` crate's pixels of `color` are laid out, and whether they are 16-bit.
fn native_layout(color: ColorType) -> Result<(Native, bool), StageError> {
    Ok(match color {
        ColorType::L8 => (Native::Gray, false),
        ColorType::La8 => (Native::GrayAlpha, false),
        ColorType::Rgb8 => (Native::Rgb, false),
        ColorType::Rgba8 => (Native::Rgba, false),
        ColorType::L16 => (Native::Gray, true),
        ColorType::La16 => (Native::GrayAlpha, true),
        ColorType::Rgb16 => (Native::Rgb, true),
        ColorType::Rgba16 => (Native::Rgba, true),
        other => {
            return Err(StageError::Unsupported(format!(
                "colour type {other:?} is not supported (8 or 16 bits per sample are)"
            )));
        }
    })
}

/// The decode stage: each item's mapped bytes to a frame. The item's start hook runs
/// first: the hot folder counts an attempt only once a file is really being worked on.
impl StageWorker for Decoder {
    type In = Input;
    type Out = Frame;

    fn stage(&self) -> Stage {
        Stage::Decode
    }

    fn process(&mut self, item: &mut Item, input: Input) -> Result<Frame, StageError> {
        let r = self.decode(input.bytes());
        if self.digest && r.is_ok() {
            item.input_sha256 = Some(sha256_hex(input.bytes()));
        }
        // Taken whatever the result, so no image's EXIF stays behind for the next one.
        item.exif = self.take_exif();
        let truncated = input.truncated();
        drop(input);
        // A file shrunk under the mapping reads as zeros past its end: whatever the
        // decoder made of that, the truth is that the file was truncated.
        match r {
            _ if truncated => Err(StageError::BadInput(
                "file was truncated while being read".into(),
            )),
            r => r,
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Every buffer one `w x h` decode needs, from the pool in one request: the frame
/// (`frame` bytes), a copy to rotate it into (`rotated`, 0 for none) and the decoder's
/// native pixels (`native`, 0 when it writes RGB8 itself). Waits while the budget is
/// taken by other items; fails at once when the sum can never fit.
fn buffers(
    pool: &Arc<BufPool>,
    (w, h): (u32, u32),
    frame: usize,
    rotated: usize,
    native: usize,
) -> Result<[PooledBuf; 3], StageError> {
    pool.try_get_n([frame, rotated, native])
        .map_err(|e| over_budget(e, (w, h), frame, rotated, native))
}

/// The frame budget's refusal, phrased for the user: what the decode needed, part by
/// part, against the budget and the key that sets it.
fn over_budget(
    e: OverBudget,
    (w, h): (u32, u32),
    frame: usize,
    rotated: usize,
    native: usize,
) -> StageError {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut parts = format!("a {w} x {h} frame of {:.1} MiB", mib(frame));
    if rotated > 0 {
        parts.push_str(&format!(
            ", a copy for its EXIF rotation of {:.1} MiB",
            mib(rotated)
        ));
    }
    if native > 0 {
        parts.push_str(&format!(
            ", the decoder's own pixels of {:.1} MiB",
            mib(native)
        ));
    }
    StageError::OverLimit(format!(
        "decoding needs {:.1} MiB of frame buffers ({parts}), over the frame budget of {:.0} MiB (decode.frame_budget_mib)",
        mib(e.need),
        mib(e.budget)
    ))
}

/// The upright frame: `px` itself, or `px` rotated into `dst` (which the caller took
/// with it, of the same length, so no second request is made while holding `px`).
fn apply_orientation(
    px: PooledBuf,
    mut dst: PooledBuf,
    w: u32,
    h: u32,
    ch: usize,
    o: Orientation,
) -> (PooledBuf, u32, u32) {
    if o == Orientation::NoTransforms {
        return (px, w, h);
    }
    let (nw, nh) = orient(&px, w, h, ch, o, &mut dst);
    (dst, nw, nh)
}

fn too_large() -> StageError {
    StageError::OverLimit("image too large".to_string())
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

fn describe(format: ImageFormat, e: image::ImageError) -> StageError {
    let format = format_name(format);
    use image::ImageError as E;
    match e {
        E::Limits(l) => StageError::OverLimit(format!("over the decode limits: {l}")),
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            StageError::BadInput(format!("truncated {format} file"))
        }
        // The message stays the one users have always read; only the class is finer.
        e @ E::Unsupported(_) => StageError::Unsupported(format!("invalid {format} data: {e}")),
        other => StageError::BadInput(format!("invalid {format} data: {other}")),
    }
}

/// Apply an EXIF orientation to `ch`-byte pixels: write the upright image into `dst`,
/// return its size.
pub fn orient(src: &[u8], w: u32, h: u32, ch: usize, o: Orientation, dst: &mut [u8]) -> (u32, u32) {
    let (w, h) = (w as usize, h as usize);
    let (dw, dh) = if swaps_axes(o) { (h, w) } else { (w, h) };
    for y in 0..dh {
        let row = &mut dst[y * dw * ch..(y + 1) * dw * ch];
        for x in 0..dw {
            let (sx, sy) = match o {
                Orientation::NoTransforms => (x, y),
                Orientation::Rotate90 => (y, h - 1 - x),
                Orientation::Rotate180 => (w - 1 - x, h - 1 - y),
                Orientation::Rotate270 => (w - 1 - y, x),
                Orientation::FlipHorizontal => (w - 1 - x, y),
                Orientation::FlipVertical => (x, h - 1 - y),
                Orientation::Rotate90FlipH => (y, x),
                Orientation::Rotate270FlipH => (w - 1 - y, h - 1 - x),
            };
            let s = (sy * w + sx) * ch;
            row[x * ch..x * ch + ch].copy_from_slice(&src[s..s + ch]);
        }
    }
    (dw as u32, dh as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DecodeConfig {
        DecodeConfig::for_tests()
    }

    fn png(w: u32, h: u32, color: image::ExtendedColorType, px: &[u8]) -> Vec<u8> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(px, w, h, color)
            .unwrap();
        out
    }

    #[test]
    fn rgb_grey_and_alpha() {
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        let f = d
            .decode(&png(
                2,
                1,
                image::ExtendedColorType::Rgb8,
                &[1, 2, 3, 4, 5, 6],
            ))
            .unwrap();
        assert_eq!(
            (f.width, f.height, &f.pixels[..]),
            (2, 1, &[1, 2, 3, 4, 5, 6][..])
        );
        let f = d
            .decode(&png(2, 1, image::ExtendedColorType::L8, &[10, 200]))
            .unwrap();
        assert_eq!(&f.pixels[..], &[10, 10, 10, 200, 200, 200]);
        let f = d
            .decode(&png(
                2,
                1,
                image::ExtendedColorType::Rgba8,
                &[0, 0, 0, 0, 100, 50, 0, 255],
            ))
            .unwrap();
        assert_eq!(
            &f.pixels[..],
            &[255, 255, 255, 100, 50, 0],
            "transparent -> white, opaque kept"
        );
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        assert!(
            d.decode(b"hello world, not an image")
                .unwrap_err()
                .to_string()
                .contains("not a recognised image")
        );
        let good = png(
            64,
            64,
            image::ExtendedColorType::Rgb8,
            &vec![9; 64 * 64 * 3],
        );
        let e = d.decode(&good[..good.len() / 2]).unwrap_err();
        assert!(
            matches!(&e, StageError::BadInput(m) if m.contains("PNG")),
            "{e}"
        );
        let mut small = cfg();
        small.max_width = 32;
        let mut d = Decoder::new(small, BufPool::new(2));
        let e = d.decode(&good).unwrap_err();
        assert!(
            matches!(&e, StageError::OverLimit(m) if m.contains("over the")),
            "{e}"
        );
    }

    #[test]
    fn sixteen_bit_samples_are_rounded() {
        let mut d = Decoder::new(cfg(), BufPool::new(4));
        let ne = |v: &[u16]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let rgba = ne(&[
            0xFFFF, 0x0000, 0x8000, 0xFFFF, 0x1234, 0x5678, 0x9ABC, 0x0000,
        ]);
        let f = d
            .decode(&png(2, 1, image::ExtendedColorType::Rgba16, &rgba))
            .unwrap();
        assert_eq!(&f.pixels[..], &[255, 0, 128, 255, 255, 255]);
        let f = d
            .decode(&png(
                2,
                1,
                image::ExtendedColorType::L16,
                &ne(&[0x4000, 0xC0FF]),
            ))
            .unwrap();
        assert_eq!(&f.pixels[..], &[64, 64, 64, 192, 192, 192]);
    }

    #[test]
    fn a_frame_over_the_budget_fails_before_any_buffer_is_taken() {
        let pool = BufPool::with_budget(4, 1 << 20);
        let mut d = Decoder::new(cfg(), Arc::clone(&pool));
        let big = png(
            1000,
            1000,
            image::ExtendedColorType::Rgb8,
            &vec![7; 3_000_000],
        );
        let Err(e) = d.decode(&big) else {
            panic!("a 2.9 MiB frame decoded under a 1 MiB budget");
        };
        let msg = e.to_string();
        assert!(matches!(e, StageError::OverLimit(_)), "{e}");
        for part in [
            "1000 x 1000",
            "2.9 MiB",
            "budget of 1 MiB",
            "decode.frame_budget_mib",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        assert_eq!(pool.created(), 0);
        // The frame fits, its EXIF-rotation copy with it does not: refused, naming both.
        let rotated = with_exif_orientation(&jpeg_rgb(&halves(600, 400), 600, 400), 6);
        let Err(e) = d.decode(&rotated) else {
            panic!("1.4 MiB decoded under a 1 MiB budget");
        };
        let e = e.to_string();
        assert!(
            e.contains("1.4 MiB") && e.contains("rotation of 0.7 MiB"),
            "{e}"
        );
        assert_eq!(pool.created(), 0);
        // What fits still decodes, and again and again from the same buffers.
        let small = jpeg_rgb(&halves(300, 200), 300, 200);
        for _ in 0..5 {
            assert_eq!(d.decode(&small).unwrap().width, 300);
        }
        let grey = png(300, 200, image::ExtendedColorType::L8, &vec![9; 60_000]);
        for _ in 0..5 {
            assert_eq!(d.decode(&grey).unwrap().pixels[..3], [9, 9, 9]);
        }
        assert_eq!(
            (pool.created(), pool.released()),
            (2, 0),
            "frame + native pixels"
        );
        assert_eq!(pool.in_use(), 0);
    }

    /// A JPEG of `w x h` RGB pixels, by libjpeg-turbo at quality 95.
    pub(crate) fn jpeg_rgb(px: &[u8], w: usize, h: usize) -> Vec<u8> {
        let img = turbojpeg::Image {
            pixels: px,
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        };
        turbojpeg::compress(img, 95, turbojpeg::Subsamp::Sub2x2)
            .unwrap()
            .to_vec()
    }

    /// `jpeg` with an EXIF APP1 segment holding only an orientation tag, right after SOI.
    fn with_exif_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&value.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, next IFD = 0
        let mut seg = b"Exif\0\0".to_vec();
        seg.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((seg.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&seg);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    /// Left half red, right half blue.
    fn halves(w: usize, h: usize) -> Vec<u8> {
        (0..w * h)
            .flat_map(|i| {
                if i % w < w / 2 {
                    [230, 20, 20]
                } else {
                    [20, 20, 230]
                }
            })
            .collect()
    }

    fn px(f: &Frame, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * f.width + x) * 3) as usize;
        [f.pixels[i], f.pixels[i + 1], f.pixels[i + 2]]
    }

    fn near(a: [u8; 3], b: [u8; 3]) -> bool {
        a.iter().zip(b).all(|(&x, y)| x.abs_diff(y) <= 24)
    }

    #[test]
    fn exif_rotated_jpeg_is_upright() {
        let jpeg = jpeg_rgb(&halves(64, 32), 64, 32);
        let mut icc = Vec::new();
        assert_eq!(jpeg::markers(&jpeg, &mut icc).orientation, None);
        // 6 = rotate 90 degrees clockwise to display: the left (red) half goes on top.
        let rotated = with_exif_orientation(&jpeg, 6);
        let m = jpeg::markers(&rotated, &mut icc);
        assert_eq!(m.orientation, Some(Orientation::Rotate90));
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        let f = d.decode(&rotated).unwrap();
        assert_eq!((f.width, f.height), (32, 64));
        assert_eq!((f.orig_width, f.orig_height), (32, 64));
        assert!(near(px(&f, 16, 4), [230, 20, 20]), "{:?}", px(&f, 16, 4));
        assert!(near(px(&f, 16, 60), [20, 20, 230]), "{:?}", px(&f, 16, 60));
        // The same through the `image` path (its own EXIF reader) agrees.
        let g = d.decode_image(&rotated).unwrap();
        assert_eq!((g.width, g.height), (32, 64));
        assert!(near(px(&g, 16, 4), [230, 20, 20]));
    }

    #[test]
    fn scaled_decode_keeps_the_target_and_original_size() {
        let (w, h) = (2048usize, 1200usize);
        let jpeg = jpeg_rgb(&halves(w, h), w, h);
        let target = |fit, oversample| ScaleTarget {
            width: 512,
            height: 512,
            fit,
            oversample,
        };
        // Crop: shorter side 1200 / 512 = 2.34. Pad: longer side 2048 / 512 = 4. "fast"
        // keeps the target's size, "auto" twice that: the smallest M/8 (M <= 4) that does.
        for (fit, oversample, m, sw, sh) in [
            (FitMode::Crop, 1.0, 4, 1024, 600),
            (FitMode::Pad, 1.0, 2, 512, 300),
            (FitMode::Stretch, 1.0, 4, 1024, 600),
            (FitMode::Crop, 2.0, 8, 2048, 1200),
            (FitMode::Pad, 2.0, 4, 1024, 600),
            (FitMode::Pad, 1.5, 3, 768, 450),
        ] {
            let t = Some(target(fit, oversample));
            let mut dec = Decoder::new(cfg(), BufPool::new(8)).with_scaling(t);
            let f = dec.decode(&jpeg).unwrap();
            assert_eq!(dec.last_scale(), m, "{fit:?} {oversample}");
            assert_eq!((f.width, f.height), (sw, sh), "{fit:?} {oversample}");
            assert_eq!((f.orig_width, f.orig_height), (2048, 1200));
            assert!(near(px(&f, 2, 2), [230, 20, 20]));
        }
        // Less than twice the target: full decode.
        let small = jpeg_rgb(&halves(900, 700), 900, 700);
        let t = Some(target(FitMode::Crop, 2.0));
        let mut dec = Decoder::new(cfg(), BufPool::new(8)).with_scaling(t);
        let f = dec.decode(&small).unwrap();
        assert_eq!((dec.last_scale(), f.width, f.height), (8, 900, 700));
        assert_eq!(target(FitMode::Crop, 1.0).scale(4096, 4096), 1);
        assert_eq!(target(FitMode::Crop, 2.0).scale(4096, 4096), 2);
        assert_eq!(target(FitMode::Crop, 2.0).scale(1100, 4096), 8);
    }

    #[test]
    fn greyscale_jpeg_becomes_rgb() {
        let (w, h) = (32usize, 16usize);
        let grey: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 16 { 40 } else { 200 })
            .collect();
        let img = turbojpeg::Image {
            pixels: &grey[..],
            width: w,
            pitch: w,
            height: h,
            format: turbojpeg::PixelFormat::GRAY,
        };
        let jpeg = turbojpeg::compress(img, 95, turbojpeg::Subsamp::Gray)
            .unwrap()
            .to_vec();
        assert_eq!(
            turbojpeg::read_header(&jpeg).unwrap().colorspace,
            turbojpeg::Colorspace::Gray
        );
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        let f = d.decode(&jpeg).unwrap();
        assert_eq!((f.width, f.height, f.pixels.len()), (32, 16, 32 * 16 * 3));
        assert!(near(px(&f, 2, 8), [40, 40, 40]), "{:?}", px(&f, 2, 8));
        assert!(near(px(&f, 30, 8), [200, 200, 200]));
    }

    #[test]
    fn cmyk_jpeg_becomes_rgb() {
        // Left half pure cyan ink, right half no ink at all (white paper). Stored the way
        // Photoshop writes CMYK JPEGs (with an Adobe marker, as libjpeg-turbo adds): ink
        // values inverted, 255 = no ink. Real-world CMYK files follow that convention and
        // so does zune-jpeg when it converts them.
        let (w, h) = (32usize, 16usize);
        let cmyk: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                if i % w < 16 {
                    [0, 255, 255, 255]
                } else {
                    [255, 255, 255, 255]
                }
            })
            .collect();
        let img = turbojpeg::Image {
            pixels: &cmyk[..],
            width: w,
            pitch: w * 4,
            height: h,
            format: turbojpeg::PixelFormat::CMYK,
        };
        let mut c = turbojpeg::Compressor::new().unwrap();
        c.set_quality(95).unwrap();
        c.set_subsamp(turbojpeg::Subsamp::None).unwrap();
        let jpeg = c.compress_to_vec(img).unwrap();
        let cs = turbojpeg::read_header(&jpeg).unwrap().colorspace;
        assert!(matches!(
            cs,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ));
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        let f = d.decode(&jpeg).unwrap();
        assert_eq!((f.width, f.height), (32, 16));
        assert!(
            near(px(&f, 2, 8), [0, 255, 255]),
            "cyan: {:?}",
            px(&f, 2, 8)
        );
        assert!(
            near(px(&f, 30, 8), [255, 255, 255]),
            "white: {:?}",
            px(&f, 30, 8)
        );
    }

    #[test]
    fn a_failed_jpeg_does_not_fail_the_next_one() {
        let jpeg = jpeg_rgb(&halves(64, 64), 64, 64);
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        for _ in 0..3 {
            assert!(d.decode(&jpeg[..jpeg.len() / 3]).is_err());
            let Ok(f) = d.decode(&jpeg) else {
                panic!("a valid JPEG after a truncated one failed");
            };
            assert_eq!((f.width, f.height), (64, 64));
        }
    }

    #[test]
    fn a_corrupt_scan_fails_but_stray_bytes_between_markers_pass() {
        let jpeg = jpeg_rgb(&halves(256, 256), 256, 256);
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        // Bytes overwritten in the middle of the entropy-coded scan (no 0xFF, so no
        // marker is forged): libjpeg-turbo refuses it; the lenient decoder would not.
        let mut bad = jpeg.clone();
        let mid = bad.len() / 2;
        for (i, b) in bad[mid..mid + 200].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) % 0xF0;
        }
        // Not `unwrap_err`: a wrong Ok would print megabytes of pixels.
        let Err(e) = d.decode(&bad) else {
            panic!("a corrupt scan decoded");
        };
        assert!(
            matches!(&e, StageError::BadInput(m) if m.contains("JPEG")),
            "{e}"
        );
        // Stray bytes before the end-of-image marker, as some cameras write: decoded.
        let mut stray = jpeg.clone();
        let eoi = stray.len() - 2;
        stray.splice(eoi..eoi, [0x00, 0x11, 0x22]);
        let f = d
            .decode(&stray)
            .expect("stray bytes between markers still decode");
        assert_eq!((f.width, f.height), (256, 256));
    }

    #[test]
    fn truncated_and_corrupt_jpegs_fail_with_reasons() {
        let jpeg = jpeg_rgb(&halves(64, 64), 64, 64);
        let mut d = Decoder::new(cfg(), BufPool::new(8));
        let e = d.decode(&jpeg[..jpeg.len() / 2]).unwrap_err();
        assert!(
            matches!(&e, StageError::BadInput(m) if m.contains("JPEG")),
            "{e}"
        );
        let e = d.decode(&jpeg[..40]).unwrap_err();
        assert!(
            matches!(&e, StageError::BadInput(m) if m.contains("JPEG")),
            "{e}"
        );
        // A header over the limits is refused before any pixel buffer is allocated.
        let mut small = cfg();
        small.max_width = 32;
        let pool = BufPool::new(2);
        let mut d = Decoder::new(small, Arc::clone(&pool));
        let e = d.decode(&jpeg).unwrap_err();
        assert!(
            matches!(&e, StageError::OverLimit(m) if m.contains("over the limit")),
            "{e}"
        );
        assert_eq!(pool.created(), 0);
    }

    #[test]
    fn orientations_match_definitions() {
        // 3 x 2 image whose pixels are their own index.
        let src: Vec<u8> = (0..6u8).flat_map(|i| [i, i, i]).collect();
        let mut dst = vec![0u8; 18];
        let first = |d: &[u8]| d.chunks(3).map(|p| p[0]).collect::<Vec<_>>();
        // 0 1 2 / 3 4 5 rotated 90 clockwise: 3 0 / 4 1 / 5 2
        assert_eq!(
            orient(&src, 3, 2, 3, Orientation::Rotate90, &mut dst),
            (2, 3)
        );
        assert_eq!(first(&dst), vec![3, 0, 4, 1, 5, 2]);
        assert_eq!(
            orient(&src, 3, 2, 3, Orientation::Rotate270, &mut dst),
            (2, 3)
        );
        assert_eq!(first(&dst), vec![2, 5, 1, 4, 0, 3]);
        orient(&src, 3, 2, 3, Orientation::Rotate180, &mut dst);
        assert_eq!(first(&dst), vec![5, 4, 3, 2, 1, 0]);
        orient(&src, 3, 2, 3, Orientation::Rotate90FlipH, &mut dst);
        assert_eq!(first(&dst), vec![0, 3, 1, 4, 2, 5]);
        // RGBA pixels move whole, alpha with them.
        let src: Vec<u8> = (0..6u8).flat_map(|i| [i, i, i, 100 + i]).collect();
        let mut dst = vec![0u8; 24];
        orient(&src, 3, 2, 4, Orientation::Rotate90, &mut dst);
        let colour: Vec<u8> = dst.chunks(4).map(|p| p[0]).collect();
        let alpha: Vec<u8> = dst.chunks(4).map(|p| p[3]).collect();
        assert_eq!(colour, vec![3, 0, 4, 1, 5, 2]);
        assert_eq!(alpha, vec![103, 100, 104, 101, 105, 102]);
    }
}
