//! Encode: one output row (packed grey, RGB8 or RGBA8) to JPEG, PNG or WebP bytes in a
//! reused buffer.
//!
//! Each encode worker owns one [`Encoder`]; its output buffer keeps its capacity between
//! images, so steady-state encoding allocates nothing for the result. PNG uses fast
//! compression (outputs are intermediate files, written often, read once). WebP is
//! lossless: the `image` crate has no lossy WebP encoder, and `quality` does not apply.
//!
//! JPEG goes through libjpeg-turbo (the same library that decodes): measured on the
//! reference outputs it is several times faster than the `image` crate's encoder (see
//! `BENCHMARKS.md`), and it is what PIL uses, so outputs look like the peers'. Chroma is
//! subsampled 4:2:0, PIL's default at this quality. It compresses straight into a slice
//! sized by libjpeg-turbo's worst-case bound, so no reallocation ever happens mid-image.
//!
//! Every output is tagged sRGB with an embedded profile (the decoder converted every input
//! to sRGB, so the tag is true, and viewers that assume another space for untagged files,
//! as some print and Apple tools do, show the colours meant). Nothing else of the input's
//! metadata is written by default: GPS positions and camera serial numbers stay with the
//! photo. With `encode.keep_metadata` the input's EXIF is written too, filtered to what
//! is safe to publish ([`crate::stages::metadata`] decides what that is): as an APP1
//! segment in a JPEG, before the profile, an `eXIf` chunk in a PNG, an `EXIF` chunk in a
//! WebP.

use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;

use std::sync::OnceLock;

use crate::config::{EncodeConfig, Format};
use crate::stages::metadata;

/// The creation date written into the profile's header (bytes 24..36, six big-endian
/// u16: 2026-01-01 00:00:00). moxcms writes the time of encoding there, which made the
/// same input with the same parameters give different bytes in two runs.
const ICC_DATE: [u8; 12] = [0x07, 0xEA, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0];

/// moxcms's sRGB profile, encoded once (ICC v4, a few hundred bytes), with a fixed
/// creation date so that outputs are reproducible. Its profile ID is zero ("not
/// computed"), so the date can change without invalidating it.
fn srgb_icc() -> &'static [u8] {
    static ICC: OnceLock<Vec<u8>> = OnceLock::new();
    ICC.get_or_init(|| {
        let mut icc = moxcms::ColorProfile::new_srgb()
            .encode()
            .expect("the built-in sRGB profile encodes");
        icc[24..36].copy_from_slice(&ICC_DATE);
        debug_assert!(icc[84..100].iter().all(|&b| b == 0), "profile ID unset");
        icc
    })
}

/// The JPEG APP2 segment that carries `icc` (one chunk: profiles here are far under the
/// 65519-byte chunk limit).
fn icc_segment(icc: &[u8]) -> Vec<u8> {
    let mut seg = vec![0xFF, 0xE2];
    seg.extend(((2 + 14 + icc.len()) as u16).to_be_bytes());
    seg.extend(b"ICC_PROFILE\0\x01\x01");
    seg.extend(icc);
    seg
}

pub struct Encoder {
    cfg: EncodeConfig,
    buf: Vec<u8>,
    /// The sRGB profile's APP2 segment, spliced in after a libjpeg-turbo JPEG's SOI.
    app2: Vec<u8>,
    /// libjpeg-turbo compressor for JPEG output; `None` when it could not be set up, and
    /// then the `image` crate's encoder is used.
    tj: Option<turbojpeg::Compressor>,
}

impl Encoder {
    pub fn new(cfg: EncodeConfig) -> Encoder {
        let tj = (cfg.format == Format::Jpeg)
            .then(|| {
                // Subsampling is set per image (grey or colour).
                turbojpeg::Compressor::new().and_then(|mut c| {
                    c.set_quality(cfg.quality as i32)?;
                    Ok(c)
                })
            })
            .and_then(|r| {
                r.map_err(|e| {
                    tracing::warn!("libjpeg-turbo unavailable, JPEG encodes through image: {e}")
                })
                .ok()
            });
        Encoder {
            cfg,
            buf: Vec::new(),
            app2: icc_segment(srgb_icc()),
            tj,
        }
    }

    /// Use the `image` crate's JPEG encoder even when libjpeg-turbo is available (for
    /// benchmarks comparing the two).
    pub fn without_turbojpeg(mut self) -> Encoder {
        self.tj = None;
        self
    }

    pub fn extension(&self) -> &'static str {
        self.cfg.format.extension()
    }

    /// Encode `pixels` (`w x h` packed RGB8) with no metadata but the profile. The
    /// returned slice is valid until the next call.
    pub fn encode(&mut self, pixels: &[u8], w: u32, h: u32) -> Result<&[u8], String> {
        self.encode_with(pixels, (w, h, 3), None)
    }

    /// Encode `pixels` of `(w, h, channels)`: 1 (grey, written as a greyscale image with
    /// no colour profile: a mask or a depth map is data, not colour), 3 (RGB) or 4 (RGBA,
    /// PNG and WebP only: the pipeline refuses to start RGBA into JPEG). Carries `exif`
    /// (a TIFF structure, already filtered by `stages::metadata`) when
    /// `encode.keep_metadata` is on; an EXIF too large for a JPEG APP1 segment is left out
    /// with a warning: the image matters more than its EXIF.
    pub fn encode_with(
        &mut self,
        pixels: &[u8],
        dims: (u32, u32, usize),
        exif: Option<&[u8]>,
    ) -> Result<&[u8], String> {
        let exif = exif.filter(|e| self.cfg.keep_metadata && self.exif_fits(e));
        if self.tj.is_some() {
            return self.encode_turbo(pixels, dims, exif);
        }
        self.encode_image(pixels, dims, exif)
    }

    fn exif_fits(&self, exif: &[u8]) -> bool {
        let fits = self.cfg.format != Format::Jpeg || exif.len() <= metadata::MAX_JPEG_EXIF;
        if !fits {
            tracing::warn!(
                "the input's EXIF is {} bytes, more than a JPEG APP1 segment holds ({}): output written without it",
                exif.len(),
                metadata::MAX_JPEG_EXIF
            );
        }
        fits
    }

    fn encode_turbo(
        &mut self,
        pixels: &[u8],
        (w, h, c): (u32, u32, usize),
        exif: Option<&[u8]>,
    ) -> Result<&[u8], String> {
        // A grey image is a one-component JPEG (libjpeg-turbo refuses to subsample it).
        let (format, subsamp) = match c {
            1 => (turbojpeg::PixelFormat::GRAY, turbojpeg::Subsamp::Gray),
            3 => (turbojpeg::PixelFormat::RGB, turbojpeg::Subsamp::Sub2x2),
            _ => return Err(format!("JPEG cannot carry {c}-channel pixels")),
        };
        let tj = self.tj.as_mut().expect("called with libjpeg-turbo");
        tj.set_subsamp(subsamp)
            .map_err(|e| format!("JPEG encoding failed: {e}"))?;
        let (w, h) = (w as usize, h as usize);
        let bound = tj
            .buf_len(w, h)
            .map_err(|e| format!("JPEG encoding failed: {e}"))?;
        // libjpeg-turbo writes the JPEG `k` bytes in, `k` being the length of the segments
        // spliced in (the EXIF's APP1 when there is one, then the profile's APP2); SOI and
        // the segments then go in front, overwriting the SOI it wrote, and the rest follows
        // on directly: the metadata costs no copy of the image.
        let app1 = exif.map_or(0, |e| 4 + metadata::EXIF_HEADER.len() + e.len());
        let app2 = if c == 1 { 0 } else { self.app2.len() };
        let k = app1 + app2;
        // Grows to the largest bound and prefix seen, then is reused as is.
        if self.buf.len() < bound + k {
            self.buf.resize(bound + k, 0);
        }
        let img = turbojpeg::Image {
            pixels,
            width: w,
            pitch: w * c,
            height: h,
            format,
        };
        let n = tj
            .compress_to_slice(img, &mut self.buf[k..])
            .map_err(|e| format!("JPEG encoding failed: {e}"))?;
        self.buf[..2].copy_from_slice(&[0xFF, 0xD8]);
        if let Some(exif) = exif {
            app1_into(&mut self.buf[2..2 + app1], exif);
        }
        self.buf[2 + app1..2 + k].copy_from_slice(&self.app2[..app2]);
        Ok(&self.buf[..k + n])
    }

    /// Through the `image` crate's encoders, which write the profile and EXIF chunks
    /// themselves.
    fn encode_image(
        &mut self,
        pixels: &[u8],
        (w, h, c): (u32, u32, usize),
        exif: Option<&[u8]>,
    ) -> Result<&[u8], String> {
        self.buf.clear();
        let color = match c {
            1 => image::ExtendedColorType::L8,
            3 => image::ExtendedColorType::Rgb8,
            4 => image::ExtendedColorType::Rgba8,
            _ => return Err(format!("cannot encode {c}-channel pixels")),
        };
        let colour = c > 1;
        let r = match self.cfg.format {
            Format::Jpeg => {
                let mut e = JpegEncoder::new_with_quality(&mut self.buf, self.cfg.quality);
                tag(&mut e, colour, exif).and_then(|()| e.write_image(pixels, w, h, color))
            }
            Format::Png => {
                let mut e = PngEncoder::new_with_quality(
                    &mut self.buf,
                    CompressionType::Fast,
                    FilterType::Adaptive,
                );
                tag(&mut e, colour, exif).and_then(|()| e.write_image(pixels, w, h, color))
            }
            Format::Webp => {
                let mut e = WebPEncoder::new_lossless(&mut self.buf);
                tag(&mut e, colour, exif).and_then(|()| e.write_image(pixels, w, h, color))
            }
        };
        r.map_err(|e| format!("{:?} encoding failed: {e}", self.cfg.format))?;
        Ok(&self.buf)
    }
}

/// Give an `image` encoder the sRGB profile (for `colour` pixels: an RGB profile on a
/// grey image is invalid) and, when kept, the EXIF (each of JPEG, PNG and WebP takes both
/// in image 0.25.10).
fn tag(e: &mut impl ImageEncoder, colour: bool, exif: Option<&[u8]>) -> image::ImageResult<()> {
    if colour {
        e.set_icc_profile(srgb_icc().to_vec())
            .map_err(image::ImageError::Unsupported)?;
    }
    if let Some(exif) = exif {
        e.set_exif_metadata(exif.to_vec())
            .map_err(image::ImageError::Unsupported)?;
    }
    Ok(())
}

/// Write the APP1 segment that carries `exif` into `dst`, which is exactly its length
/// (`exif` fits: [`metadata::MAX_JPEG_EXIF`]).
fn app1_into(dst: &mut [u8], exif: &[u8]) {
    let header = metadata::EXIF_HEADER;
    dst[..2].copy_from_slice(&[0xFF, 0xE1]);
    dst[2..4].copy_from_slice(&((2 + header.len() + exif.len()) as u16).to_be_bytes());
    dst[4..4 + header.len()].copy_from_slice(header);
    dst[4 + header.len()..].copy_from_slice(exif);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible outputs: the embedded profile carries a fixed date, not the time it
    /// was encoded at, and still parses as the sRGB profile.
    #[test]
    fn the_profile_is_the_same_in_every_run() {
        let icc = srgb_icc();
        assert_eq!(&icc[24..36], &ICC_DATE);
        let parsed = moxcms::ColorProfile::new_from_slice(icc).unwrap();
        assert_eq!(parsed.creation_date_time.year, 2026);
        assert_eq!(
            parsed.white_point,
            moxcms::ColorProfile::new_srgb().white_point
        );
    }

    #[test]
    fn round_trips_each_format() {
        let px: Vec<u8> = (0..16 * 16 * 3).map(|i| (i % 251) as u8).collect();
        for format in [Format::Jpeg, Format::Png, Format::Webp] {
            let mut e = Encoder::new(EncodeConfig {
                format,
                quality: 95,
                keep_metadata: false,
            });
            let bytes = e.encode(&px, 16, 16).unwrap().to_vec();
            let mut dec = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .unwrap()
                .into_decoder()
                .unwrap();
            use image::ImageDecoder;
            let icc = dec.icc_profile().unwrap().expect("tagged");
            assert_eq!(icc, srgb_icc(), "{format:?} carries the sRGB profile");
            let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!(img.dimensions(), (16, 16));
            if format != Format::Jpeg {
                assert_eq!(img.as_raw(), &px, "{format:?} is lossless");
            }
        }
    }

    #[test]
    fn grey_and_rgba_outputs_are_written_as_such() {
        use image::ImageDecoder;
        let grey: Vec<u8> = (0..16 * 16).map(|i| (i % 256) as u8).collect();
        let rgba: Vec<u8> = (0..16 * 16 * 4).map(|i| (i * 7 % 256) as u8).collect();
        let cases = [
            (Format::Png, 1, &grey, image::ColorType::L8),
            // WebP has no grey mode: stored as RGB with equal channels.
            (Format::Webp, 1, &grey, image::ColorType::Rgb8),
            (Format::Jpeg, 1, &grey, image::ColorType::L8),
            (Format::Png, 4, &rgba, image::ColorType::Rgba8),
            (Format::Webp, 4, &rgba, image::ColorType::Rgba8),
        ];
        for (format, c, px, colour) in cases {
            for turbo in [true, false] {
                let cfg = EncodeConfig {
                    format,
                    quality: 95,
                    keep_metadata: false,
                };
                let mut e = Encoder::new(cfg);
                if !turbo {
                    e = e.without_turbojpeg();
                }
                let bytes = e.encode_with(px, (16, 16, c), None).unwrap().to_vec();
                let mut dec = image::ImageReader::new(std::io::Cursor::new(&bytes))
                    .with_guessed_format()
                    .unwrap()
                    .into_decoder()
                    .unwrap();
                assert_eq!(dec.color_type(), colour, "{format:?} {c} channels");
                let icc = dec.icc_profile().unwrap();
                assert_eq!(icc.is_some(), c > 1, "grey outputs carry no RGB profile");
                let mut got = vec![0u8; dec.total_bytes() as usize];
                dec.read_image(&mut got).unwrap();
                if colour == image::ColorType::Rgb8 {
                    assert!(got.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
                    got = got.iter().step_by(3).copied().collect();
                }
                if format == Format::Jpeg {
                    assert!(got.iter().zip(px.iter()).all(|(a, b)| a.abs_diff(*b) <= 8));
                } else {
                    assert_eq!(&got, px, "{format:?} {c} channels lossless");
                }
            }
        }
        let mut jpeg = Encoder::new(EncodeConfig {
            format: Format::Jpeg,
            quality: 90,
            keep_metadata: false,
        });
        assert!(jpeg.encode_with(&rgba, (16, 16, 4), None).is_err());
    }

    #[test]
    fn jpeg_buffer_is_reused_and_both_encoders_agree() {
        // A smooth gradient, so a JPEG of it is close to the source.
        let (w, h) = (64u32, 48u32);
        let px: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 4) as u8, (y * 5) as u8, 128]
            })
            .collect();
        let cfg = EncodeConfig {
            format: Format::Jpeg,
            quality: 90,
            keep_metadata: false,
        };
        let mut e = Encoder::new(cfg.clone());
        assert!(e.tj.is_some(), "libjpeg-turbo is built in");
        let first = e.encode(&px, w, h).unwrap().to_vec();
        let ptr = e.buf.as_ptr();
        for _ in 0..5 {
            assert_eq!(e.encode(&px, w, h).unwrap(), &first[..]);
        }
        assert_eq!(e.buf.as_ptr(), ptr, "no reallocation after the first image");
        let mut plain = Encoder::new(cfg).without_turbojpeg();
        let other = plain.encode(&px, w, h).unwrap().to_vec();
        for bytes in [first, other] {
            let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
            let err = img
                .as_raw()
                .iter()
                .zip(&px)
                .map(|(&a, &b)| a.abs_diff(b) as u32)
                .max()
                .unwrap();
            assert!(err <= 16, "max error {err}");
        }
    }

    /// A small valid EXIF (Make "AB"), as `stages::metadata` hands it over.
    const EXIF: &[u8] = b"II\x2a\0\x08\0\0\0\x01\0\x0f\x01\x02\0\x03\0\0\0AB\0\0\0\0\0\0";

    /// The EXIF and profile an output carries, as the `image` crate's decoders read them.
    fn metadata_of(bytes: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        use image::ImageDecoder;
        let mut dec = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .unwrap()
            .into_decoder()
            .unwrap();
        (dec.exif_metadata().unwrap(), dec.icc_profile().unwrap())
    }

    #[test]
    fn exif_is_written_in_each_format_only_when_kept() {
        let px: Vec<u8> = (0..16 * 16 * 3).map(|i| (i % 251) as u8).collect();
        for format in [Format::Jpeg, Format::Png, Format::Webp] {
            for keep_metadata in [false, true] {
                let cfg = EncodeConfig {
                    format,
                    quality: 90,
                    keep_metadata,
                };
                let mut encoders = vec![Encoder::new(cfg.clone())];
                if format == Format::Jpeg {
                    encoders.push(Encoder::new(cfg).without_turbojpeg());
                }
                for mut e in encoders {
                    let bytes = e
                        .encode_with(&px, (16, 16, 3), Some(EXIF))
                        .unwrap()
                        .to_vec();
                    let (exif, icc) = metadata_of(&bytes);
                    let want = keep_metadata.then(|| EXIF.to_vec());
                    assert_eq!(exif, want, "{format:?}, keep {keep_metadata}");
                    assert_eq!(icc.as_deref(), Some(srgb_icc()), "{format:?} still tagged");
                    let img = image::load_from_memory(&bytes).unwrap();
                    assert_eq!((img.width(), img.height()), (16, 16));
                    // The next image without EXIF has none: nothing is left behind.
                    let bytes = e.encode(&px, 16, 16).unwrap().to_vec();
                    assert_eq!(metadata_of(&bytes).0, None);
                }
            }
        }
    }

    #[test]
    fn exif_too_large_for_a_jpeg_is_left_out_but_not_from_a_png() {
        let px = vec![128u8; 16 * 16 * 3];
        let mut big = EXIF.to_vec();
        big.resize(crate::stages::metadata::MAX_JPEG_EXIF + 1, 0);
        let fits = &big[..big.len() - 1];
        for format in [Format::Jpeg, Format::Png] {
            let mut e = Encoder::new(EncodeConfig {
                format,
                quality: 90,
                keep_metadata: true,
            });
            let bytes = e
                .encode_with(&px, (16, 16, 3), Some(&big))
                .unwrap()
                .to_vec();
            let kept = metadata_of(&bytes).0;
            assert_eq!(kept.is_some(), format == Format::Png, "{format:?}");
            let bytes = e
                .encode_with(&px, (16, 16, 3), Some(fits))
                .unwrap()
                .to_vec();
            assert_eq!(metadata_of(&bytes).0.as_deref(), Some(fits), "{format:?}");
        }
    }
}
