//! Decode: bytes of a JPEG, PNG or WebP file to a packed RGB8 [`Frame`] in a pooled buffer.
//!
//! Inputs are untrusted: dimensions and the decoder's allocations are bounded by the
//! `[decode]` limits, checked from the header before any pixel buffer is touched, so a
//! 50000 x 50000 header costs nothing. Every pixel buffer of a decode (the frame, its
//! EXIF-rotated copy, the decoder's native pixels before conversion to RGB8) comes from
//! the frame pool in one request, under its byte budget (`decode.frame_budget_mib`): a
//! decode that could never fit fails at once, one that fits waits for room while
//! holding no buffer, which is what keeps the waiting free of deadlock (see [`BufPool`]). EXIF orientation is applied, so a phone photo is
//! upright before it is fitted. Greyscale, CMYK, alpha (composited on white) and 16-bit
//! inputs are converted to RGB8.
//!
//! Two codecs, split by what each is best at (measured: see `BENCHMARKS.md`):
//! - **JPEG (YCbCr, greyscale, RGB) goes through libjpeg-turbo 3** (the `turbojpeg` crate,
//!   built from its bundled source). It is the faster full decoder and, above all, it can
//!   decode at 1/2, 1/4 or 1/8 scale in the DCT domain: when the image is at least twice
//!   the model's input, most pixels would be thrown away by the resize anyway, and not
//!   computing them is the largest single saving in the CPU stages. The scale is chosen
//!   per image by [`ScaleTarget::reduction`] so that the part the fit stage keeps is never
//!   smaller than the output (the resize still does the last, exact step, so quality stays
//!   within a fraction of a dB-scale difference of a full decode; a test checks PSNR).
//!   libjpeg-turbo does not read EXIF, so the orientation is parsed here from the APP1
//!   segment ([`jpeg_orientation`]).
//! - **CMYK/YCCK JPEGs, PNG and WebP go through the `image` crate** (zune-jpeg, png,
//!   image-webp), with `image::Limits`. libjpeg-turbo can only emit CMYK pixels for CMYK
//!   files, and such files are rare enough that a second code path for them is not worth
//!   it; zune-jpeg converts them to RGB.

use std::io::Cursor;
use std::sync::Arc;

use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::config::{DecodeConfig, FitMode, PreprocessConfig};
use crate::stages::fit::{Rect, source_rect};
use crate::stages::read::Input;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::item::{Frame, Item};
use crate::vocab::pool::{BufPool, OverBudget, PooledBuf};
use crate::vocab::stage::StageWorker;

/// Progressive JPEGs with more scans than this are refused: each scan re-reads the whole
/// coefficient buffer, so a crafted file with thousands of tiny scans is a cheap way to
/// burn CPU (libjpeg-turbo's own advice for untrusted input).
const MAX_JPEG_SCANS: u32 = 500;

/// What the decoded frame will be fitted to, so a JPEG can be decoded at a reduced scale
/// without dropping below it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleTarget {
    pub width: u32,
    pub height: u32,
    /// The fit mode whose source rectangle must keep at least `width x height` pixels.
    pub fit: FitMode,
}

impl ScaleTarget {
    /// The target for the fit `pre` describes, or `None` (decode every pixel) when a stage
    /// between decode and fit picks the region (the face crop): that region may be a small
    /// part of the image, and cut from a reduced decode it would be upscaled and blurred
    /// (tests/facecrop.rs measured 26 dB against a crop of the full decode).
    pub fn for_fit(pre: &PreprocessConfig, region_chosen_later: bool) -> Option<ScaleTarget> {
        (!region_chosen_later).then_some(ScaleTarget {
            width: pre.width,
            height: pre.height,
            fit: pre.fit,
        })
    }

    /// The largest DCT reduction (1, 2, 4 or 8) that keeps the source rectangle of an
    /// upright `w x h` image at least as large as the target on both axes; 1 when the image
    /// is less than twice the target.
    pub fn reduction(&self, w: u32, h: u32) -> u32 {
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
        [8u32, 4, 2]
            .into_iter()
            .find(|&d| {
                // libjpeg-turbo rounds scaled sizes up; a rounded-up size is still >= target
                // when the exact quotient is, so the exact test is the safe one.
                slack >= d as f64
            })
            .unwrap_or(1)
    }
}

/// One decode worker's state: limits, codec handles and the pool its buffers come from.
pub struct Decoder {
    cfg: DecodeConfig,
    pool: Arc<BufPool>,
    /// `None` when libjpeg-turbo could not be initialised; JPEGs then go through `image`.
    tj: Option<turbojpeg::Decompressor>,
    target: Option<ScaleTarget>,
    /// The reduction used for the last decoded image (1 = full decode), for statistics.
    last_reduction: u32,
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
            last_reduction: 1,
        }
    }

    /// Allow DCT-domain downscaling of JPEGs for frames that will be fitted to `target`
    /// (`None`: always decode at full size, which `Frame::orig_*` then equals).
    pub fn with_scaling(mut self, target: Option<ScaleTarget>) -> Decoder {
        self.target = target;
        self
    }

    /// The DCT reduction applied to the last image decoded (1, 2, 4 or 8).
    pub fn last_reduction(&self) -> u32 {
        self.last_reduction
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
        self.last_reduction = 1;
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
                    self.last_reduction = 1;
                    return self
                        .decode_image(data)
                        .map_err(|_| StageError::BadInput(reason));
                }
                Err(reason) => return Err(reason),
            }
        }
        self.decode_image(data)
    }

    /// JPEG through libjpeg-turbo. `Ok(None)`: a JPEG it cannot turn into RGB (CMYK,
    /// YCCK), for the `image` path.
    fn decode_turbo(&mut self, data: &[u8]) -> Result<Option<Frame>, StageError> {
        let Some(tj) = self.tj.as_mut() else {
            return Ok(None);
        };
        let header = tj.read_header(data).map_err(|e| jpeg_error(&e))?;
        if matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ) {
            return Ok(None);
        }
        let (w, h) = (
            u32::try_from(header.width).map_err(|_| too_large())?,
            u32::try_from(header.height).map_err(|_| too_large())?,
        );
        // A full-size RGB frame bounds the output; a progressive file also holds every
        // DCT coefficient (2 bytes per sample, up to 3 samples per pixel) while decoding,
        // whatever the output scale.
        let per_px = if header.is_progressive { 6 } else { 3 };
        self.check_size(w, h, per_px)?;
        let orientation = jpeg_orientation(data).unwrap_or(Orientation::NoTransforms);
        let (uw, uh) = if swaps_axes(orientation) {
            (h, w)
        } else {
            (w, h)
        };
        let d = match self.target {
            Some(t) if !header.is_lossless => t.reduction(uw, uh),
            _ => 1,
        };
        let factor = turbojpeg::ScalingFactor::new(1, d as usize);
        let tj = self.tj.as_mut().expect("checked above");
        tj.set_scaling_factor(factor).map_err(|e| jpeg_error(&e))?;
        let (sw, sh) = (factor.scale(header.width), factor.scale(header.height));
        let len = sw * sh * 3;
        let rotated = if orientation == Orientation::NoTransforms {
            0
        } else {
            len
        };
        let [mut out, dst, _] = buffers(&self.pool, (sw as u32, sh as u32), len, rotated, 0)?;
        let img = turbojpeg::Image {
            pixels: &mut out[..],
            width: sw,
            pitch: sw * 3,
            height: sh,
            format: turbojpeg::PixelFormat::RGB,
        };
        tj.decompress(data, img).map_err(|e| jpeg_error(&e))?;
        self.last_reduction = d;
        let (sw, sh) = (sw as u32, sh as u32);
        let (pixels, fw, fh) = apply_orientation(out, dst, sw, sh, orientation);
        Ok(Some(Frame {
            pixels,
            width: fw,
            height: fh,
            orig_width: uw,
            orig_height: uh,
        }))
    }

    /// Everything else through the `image` crate, under `image::Limits`.
    fn decode_image(&mut self, data: &[u8]) -> Result<Frame, StageError> {
        let reader = ImageReader::new(Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| StageError::io("cannot read", e))?;
        let format = match reader.format() {
            Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
            Some(f) => {
                return Err(StageError::Unsupported(format!(
                    "{f:?} images are not supported (JPEG, PNG, WebP are)"
                )));
            }
            None => {
                return Err(StageError::BadInput(
                    "not a recognised image (JPEG, PNG or WebP expected)".to_string(),
                ));
            }
        };
        let mut reader = reader;
        reader.limits(self.limits());
        let mut dec = reader.into_decoder().map_err(|e| describe(format, e))?;
        let (w, h) = dec.dimensions();
        self.check_size(w, h, 3)?;
        let rgb_len = w as usize * h as usize * 3;
        let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
        let color = dec.color_type();
        let native_len = match color {
            ColorType::Rgb8 => 0,
            _ => usize::try_from(dec.total_bytes()).map_err(|_| too_large())?,
        };
        let rotate = orientation != Orientation::NoTransforms;
        // Native pixels of 3 or more bytes each are done with before the rotation, so
        // their buffer is where the rotated frame goes: one buffer less to fit.
        let rotate_into_native = rotate && native_len >= rgb_len;
        let rotated = if rotate && !rotate_into_native {
            rgb_len
        } else {
            0
        };
        let [mut out, mut dst, mut native] =
            buffers(&self.pool, (w, h), rgb_len, rotated, native_len)?;
        if native_len == 0 {
            dec.read_image(&mut out).map_err(|e| describe(format, e))?;
        } else {
            dec.read_image(&mut native)
                .map_err(|e| describe(format, e))?;
            to_rgb8(color, &native, &mut out)?;
            if rotate_into_native {
                native.truncate(rgb_len);
                dst = native;
            }
        }
        let (out, w, h) = apply_orientation(out, dst, w, h, orientation);
        Ok(Frame {
            pixels: out,
            width: w,
            height: h,
            orig_width: w,
            orig_height: h,
        })
    }
}

/// The decode stage: each item's mapped bytes to a frame. The item's start hook runs
/// first: the hot folder counts an attempt only once a file is really being worked on.
impl StageWorker for Decoder {
    type In = Input;
    type Out = Frame;

    fn stage(&self) -> Stage {
        Stage::Decode
    }

    fn process(&mut self, _item: &mut Item, input: Input) -> Result<Frame, StageError> {
        let r = self.decode(input.bytes());
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

/// libjpeg-turbo's message, phrased for the user. Its warnings (a truncated file, corrupt
/// data) are errors here: the pipeline would rather fail an item than feed a half-grey
/// image to the model.
fn jpeg_error(e: &turbojpeg::Error) -> StageError {
    let msg = match e {
        turbojpeg::Error::TurboJpegError(m) => m.clone(),
        other => other.to_string(),
    };
    StageError::BadInput(
        if msg.contains("Premature end") || msg.contains("premature end") {
            "truncated JPEG file".to_string()
        } else {
            format!("invalid JPEG data: {msg}")
        },
    )
}

/// Every buffer one `w x h` decode needs, from the pool in one request: the RGB8 frame
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
    let mut parts = format!("a {w} x {h} RGB frame of {:.1} MiB", mib(frame));
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
    o: Orientation,
) -> (PooledBuf, u32, u32) {
    if o == Orientation::NoTransforms {
        return (px, w, h);
    }
    let (nw, nh) = orient(&px, w, h, o, &mut dst);
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

/// The EXIF orientation of a JPEG, read from its APP1 "Exif" segment; `None` when there
/// is none or it is malformed (treated as upright, as every viewer does). Only the marker
/// segments before the first scan are walked, each skipped by its length, so the cost is a
/// few dozen bytes read however large the file.
pub fn jpeg_orientation(data: &[u8]) -> Option<Orientation> {
    let mut pos = 2; // after SOI
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        while *data.get(pos)? == 0xFF && *data.get(pos + 1)? == 0xFF {
            pos += 1;
        }
        if *data.get(pos)? != 0xFF {
            return None;
        }
        let marker = *data.get(pos + 1)?;
        match marker {
            // Start of scan or end of image: the metadata segments are all before these.
            0xDA | 0xD9 => return None,
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => {
                pos += 2;
                continue;
            }
            _ => {}
        }
        let len = u16::from_be_bytes([*data.get(pos + 2)?, *data.get(pos + 3)?]) as usize;
        if len < 2 {
            return None;
        }
        let seg = data.get(pos + 4..pos + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Orientation::from_exif_chunk(&seg[6..]);
        }
        pos += 2 + len;
    }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
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

/// Convert decoder output of another colour type to packed RGB8. Alpha is composited on
/// white: transparent product shots and logos are drawn on white far more often than on
/// black, and a model never sees the checkerboard a viewer would show.
fn to_rgb8(color: ColorType, src: &[u8], dst: &mut PooledBuf) -> Result<(), StageError> {
    let over_white = |c: u16, a: u16| ((c * a + 255 * (255 - a) + 127) / 255) as u8;
    match color {
        ColorType::L8 => {
            for (d, &l) in dst.chunks_exact_mut(3).zip(src.iter()) {
                d.fill(l);
            }
        }
        ColorType::La8 => {
            for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(2)) {
                d.fill(over_white(s[0] as u16, s[1] as u16));
            }
        }
        ColorType::Rgba8 => {
            for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(4)) {
                let a = s[3] as u16;
                d[0] = over_white(s[0] as u16, a);
                d[1] = over_white(s[1] as u16, a);
                d[2] = over_white(s[2] as u16, a);
            }
        }
        ColorType::L16 | ColorType::La16 | ColorType::Rgb16 | ColorType::Rgba16 => {
            // Native-endian u16 samples; keep the high byte. Read in place: a converted
            // copy would be as large as the native pixels and outside the frame budget.
            let ch = color.channel_count() as usize;
            for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(2 * ch)) {
                let hi = |k: usize| u16::from_ne_bytes([s[2 * k], s[2 * k + 1]]) >> 8;
                let (r, g, b, a) = match ch {
                    1 => (hi(0), hi(0), hi(0), 255),
                    2 => (hi(0), hi(0), hi(0), hi(1)),
                    3 => (hi(0), hi(1), hi(2), 255),
                    _ => (hi(0), hi(1), hi(2), hi(3)),
                };
                d[0] = over_white(r, a);
                d[1] = over_white(g, a);
                d[2] = over_white(b, a);
            }
        }
        other => {
            return Err(StageError::Unsupported(format!(
                "colour type {other:?} is not supported"
            )));
        }
    }
    Ok(())
}

/// Apply an EXIF orientation: write the upright image into `dst`, return its size.
pub fn orient(src: &[u8], w: u32, h: u32, o: Orientation, dst: &mut [u8]) -> (u32, u32) {
    let (w, h) = (w as usize, h as usize);
    let (dw, dh) = if swaps_axes(o) { (h, w) } else { (w, h) };
    for y in 0..dh {
        let row = &mut dst[y * dw * 3..(y + 1) * dw * 3];
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
            let s = (sy * w + sx) * 3;
            row[x * 3..x * 3 + 3].copy_from_slice(&src[s..s + 3]);
        }
    }
    (dw as u32, dh as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DecodeConfig {
        DecodeConfig {
            max_width: 4096,
            max_height: 4096,
            max_alloc_bytes: 256 << 20,
            max_file_bytes: 256 << 20,
            frame_budget_bytes: 1 << 30,
            frame_budget_from_memory: None,
        }
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
    fn sixteen_bit_samples_keep_the_high_byte() {
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
        assert_eq!(jpeg_orientation(&jpeg), None);
        // 6 = rotate 90 degrees clockwise to display: the left (red) half goes on top.
        let rotated = with_exif_orientation(&jpeg, 6);
        assert_eq!(jpeg_orientation(&rotated), Some(Orientation::Rotate90));
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
        let target = |fit| ScaleTarget {
            width: 512,
            height: 512,
            fit,
        };
        // Crop: shorter side 1200 / 512 = 2.3 -> 1/2. Pad: longer side 2048 / 512 = 4 -> 1/4.
        for (fit, d, sw, sh) in [
            (FitMode::Crop, 2, 1024, 600),
            (FitMode::Pad, 4, 512, 300),
            (FitMode::Stretch, 2, 1024, 600),
        ] {
            let mut dec = Decoder::new(cfg(), BufPool::new(8)).with_scaling(Some(target(fit)));
            let f = dec.decode(&jpeg).unwrap();
            assert_eq!(dec.last_reduction(), d, "{fit:?}");
            assert_eq!((f.width, f.height), (sw, sh), "{fit:?}");
            assert_eq!((f.orig_width, f.orig_height), (2048, 1200));
            assert!(near(px(&f, 2, 2), [230, 20, 20]));
        }
        // Less than twice the target: full decode.
        let small = jpeg_rgb(&halves(900, 700), 900, 700);
        let mut dec =
            Decoder::new(cfg(), BufPool::new(8)).with_scaling(Some(target(FitMode::Crop)));
        let f = dec.decode(&small).unwrap();
        assert_eq!((dec.last_reduction(), f.width, f.height), (1, 900, 700));
        assert_eq!(target(FitMode::Crop).reduction(4096, 4096), 8);
        assert_eq!(target(FitMode::Crop).reduction(1023, 4096), 1);
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
        assert_eq!(orient(&src, 3, 2, Orientation::Rotate90, &mut dst), (2, 3));
        assert_eq!(first(&dst), vec![3, 0, 4, 1, 5, 2]);
        assert_eq!(orient(&src, 3, 2, Orientation::Rotate270, &mut dst), (2, 3));
        assert_eq!(first(&dst), vec![2, 5, 1, 4, 0, 3]);
        orient(&src, 3, 2, Orientation::Rotate180, &mut dst);
        assert_eq!(first(&dst), vec![5, 4, 3, 2, 1, 0]);
        orient(&src, 3, 2, Orientation::Rotate90FlipH, &mut dst);
        assert_eq!(first(&dst), vec![0, 3, 1, 4, 2, 5]);
    }
}
