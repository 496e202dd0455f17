//! JPEG through libjpeg-turbo 3: every colour space (YCbCr, grey, RGB, CMYK, YCCK), at
//! full or DCT-reduced scale, with what libjpeg-turbo does not read itself taken from the
//! marker segments: the EXIF (APP1: its orientation, and all of it for
//! `encode.keep_metadata`), the ICC profile (APP2, possibly split over several segments)
//! and the Adobe marker (APP14) that says CMYK is stored inverted.

use image::metadata::Orientation;

use super::colour::{Native, Source};
use super::{Decoder, apply_orientation, buffers, swaps_axes, too_large};
use crate::stages::metadata;
use crate::vocab::error::StageError;
use crate::vocab::item::Frame;

/// What the marker segments before the first scan say.
#[derive(Debug, Default)]
pub struct Markers<'a> {
    pub orientation: Option<Orientation>,
    /// The first EXIF APP1's TIFF structure (for `encode.keep_metadata`).
    pub exif: Option<&'a [u8]>,
    /// An Adobe APP14 segment is present (CMYK samples are stored inverted).
    pub adobe: bool,
    /// Whether an ICC profile was found and reassembled into the caller's buffer.
    pub icc: bool,
}

/// The marker segments of a JPEG before its first scan: `(marker, payload)`. Only these
/// are walked, each skipped by its length, so the cost is independent of the image size.
fn segments(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = 2; // after SOI
    std::iter::from_fn(move || {
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
                // Start of scan or end of image: the metadata segments are all before.
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
            pos += 2 + len;
            return Some((marker, seg));
        }
    })
}

/// Read the markers of `data`; an ICC profile is reassembled into `icc` (cleared first).
/// A profile whose chunks are missing, repeated or out of range is dropped: half a
/// profile would convert colours wrongly, and no profile means sRGB.
pub fn markers<'a>(data: &'a [u8], icc: &mut Vec<u8>) -> Markers<'a> {
    let mut m = Markers::default();
    icc.clear();
    let mut chunks: [Option<&[u8]>; 256] = [None; 256];
    let mut count = 0usize;
    let mut bad = false;
    for (marker, seg) in segments(data) {
        match marker {
            0xE1 if seg.starts_with(b"Exif\0\0") => {
                m.exif = m.exif.or(Some(&seg[6..]));
                if m.orientation.is_none() {
                    m.orientation = Orientation::from_exif_chunk(&seg[6..]);
                }
            }
            0xE2 if seg.starts_with(b"ICC_PROFILE\0") && seg.len() >= 14 => {
                let (seq, n) = (seg[12] as usize, seg[13] as usize);
                bad |= seq == 0 || seq > n || (count != 0 && n != count);
                bad |= chunks[seq].replace(&seg[14..]).is_some();
                count = n;
            }
            0xEE if seg.starts_with(b"Adobe") => m.adobe = true,
            _ => {}
        }
    }
    if count > 0 && !bad && chunks[1..=count].iter().all(Option::is_some) {
        chunks[1..=count]
            .iter()
            .flatten()
            .for_each(|c| icc.extend_from_slice(c));
        m.icc = true;
    } else if count > 0 {
        tracing::warn!("JPEG's ICC profile is incomplete; ignored, colours taken as sRGB");
    }
    m
}

impl Decoder {
    /// A JPEG through libjpeg-turbo; `Ok(None)` when it is not available.
    pub(super) fn decode_turbo(&mut self, data: &[u8]) -> Result<Option<Frame>, StageError> {
        let Some(tj) = self.tj.as_mut() else {
            return Ok(None);
        };
        let header = tj.read_header(data).map_err(|e| jpeg_error(&e))?;
        let (w, h) = (
            u32::try_from(header.width).map_err(|_| too_large())?,
            u32::try_from(header.height).map_err(|_| too_large())?,
        );
        let cmyk = matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        );
        // A full-size frame bounds the output; a progressive file also holds every DCT
        // coefficient (2 bytes per sample, up to 4 samples per pixel) while decoding,
        // whatever the output scale.
        // An RGBA frame (alpha kept) takes one byte more per pixel.
        let per_px = match (header.is_progressive, cmyk) {
            (true, true) => 8,
            (true, false) => 6,
            (false, true) => 4,
            (false, false) => 3,
        } + (self.channels() as u64 - 3);
        self.check_size(w, h, per_px)?;
        let m = markers(data, &mut self.icc);
        self.capture_exif(|| m.exif.and_then(metadata::filter));
        let orientation = m.orientation.unwrap_or(Orientation::NoTransforms);
        let (uw, uh) = if swaps_axes(orientation) {
            (h, w)
        } else {
            (w, h)
        };
        let eighths = match self.target {
            Some(t) if !header.is_lossless => t.scale(uw, uh),
            _ => 8,
        };
        let factor = turbojpeg::ScalingFactor::new(eighths as usize, 8);
        let ch = self.channels();
        let tj = self.tj.as_mut().expect("checked above");
        tj.set_scaling_factor(factor).map_err(|e| jpeg_error(&e))?;
        let (sw, sh) = (factor.scale(header.width), factor.scale(header.height));
        let len = sw * sh * ch;
        let rotated = if orientation == Orientation::NoTransforms {
            0
        } else {
            len
        };
        let native = if cmyk { sw * sh * 4 } else { 0 };
        let size = (sw as u32, sh as u32);
        let [mut out, dst, mut ink] = buffers(&self.pool, size, len, rotated, native)?;
        // With alpha kept, libjpeg-turbo writes RGBA itself, alpha 255.
        let (pixels, format) = match (cmyk, ch) {
            (true, _) => (&mut ink[..], turbojpeg::PixelFormat::CMYK),
            (false, 4) => (&mut out[..], turbojpeg::PixelFormat::RGBA),
            _ => (&mut out[..], turbojpeg::PixelFormat::RGB),
        };
        let img = turbojpeg::Image {
            width: sw,
            pitch: sw * format.size(),
            height: sh,
            format,
            pixels,
        };
        tj.decompress(data, img).map_err(|e| jpeg_error(&e))?;
        self.last_scale = eighths;
        let icc = m.icc.then_some(&self.icc[..]);
        if cmyk {
            let src = Source {
                px: &ink,
                width: sw,
                stride: sw * 4,
                layout: Native::Cmyk { inverted: m.adobe },
                sixteen: false,
                icc,
            };
            self.colour.convert(&src, &mut out, self.cfg.background)?;
        } else if let Some(icc) = icc {
            let grey = header.colorspace == turbojpeg::Colorspace::Gray;
            self.colour.rgb_in_place(&mut out, sw, ch, icc, grey);
        }
        drop(ink);
        let (pixels, fw, fh) = apply_orientation(out, dst, size.0, size.1, ch, orientation);
        Ok(Some(Frame {
            pixels,
            width: fw,
            height: fh,
            channels: ch,
            orig_width: uw,
            orig_height: uh,
            scale: eighths as f64 / 8.0,
        }))
    }
}

/// libjpeg-turbo's message, phrased for the user. Its warnings (a truncated file, corrupt
/// data) are errors here: the pipeline would rather fail an item than feed a half-grey
/// image to the model.
pub fn jpeg_error(e: &turbojpeg::Error) -> StageError {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG's SOI followed by the given segments.
    fn with_segments(segs: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        for (m, payload) in segs {
            out.extend([0xFF, *m]);
            out.extend(((payload.len() + 2) as u16).to_be_bytes());
            out.extend(payload);
        }
        out.extend([0xFF, 0xDA, 0, 2]);
        out
    }

    fn icc_chunk(seq: u8, n: u8, data: &[u8]) -> (u8, Vec<u8>) {
        let mut p = b"ICC_PROFILE\0".to_vec();
        p.extend([seq, n]);
        p.extend(data);
        (0xE2, p)
    }

    #[test]
    fn icc_chunks_are_reassembled_in_order_and_broken_sets_dropped() {
        let mut icc = Vec::new();
        let f = with_segments(&[
            (0xEE, b"Adobe\0\x64\0\0\0\0\x02".to_vec()),
            icc_chunk(2, 2, b"world"),
            icc_chunk(1, 2, b"hello "),
        ]);
        let m = markers(&f, &mut icc);
        assert!(m.icc && m.adobe);
        assert_eq!(icc, b"hello world");
        for broken in [
            vec![icc_chunk(1, 2, b"only one")],
            vec![icc_chunk(1, 1, b"a"), icc_chunk(1, 1, b"b")],
            vec![icc_chunk(0, 1, b"zero")],
        ] {
            let f = with_segments(&broken);
            let m = markers(&f, &mut icc);
            assert!(!m.icc && icc.is_empty(), "{broken:?}");
        }
    }
}
