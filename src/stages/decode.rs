//! Decode: bytes of a JPEG, PNG or WebP file to a packed RGB8 [`Frame`] in a pooled buffer.
//!
//! Inputs are untrusted: dimensions and the decoder's allocations are bounded by
//! `image::Limits` from `[decode]`, checked from the header before any pixel buffer is
//! touched, so a 50000 x 50000 header costs nothing. EXIF orientation is applied, so a
//! phone photo is upright before it is fitted. Greyscale, alpha (composited on white) and
//! 16-bit inputs are converted to RGB8.

use std::io::Cursor;
use std::sync::Arc;

use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::config::DecodeConfig;
use crate::pipeline::item::Frame;
use crate::pipeline::pool::{BufPool, PooledBuf};

/// One decode worker's state: limits and reusable scratch memory.
pub struct Decoder {
    cfg: DecodeConfig,
    pool: Arc<BufPool>,
    scratch: Vec<u8>,
}

impl Decoder {
    pub fn new(cfg: DecodeConfig, pool: Arc<BufPool>) -> Decoder {
        Decoder {
            cfg,
            pool,
            scratch: Vec::new(),
        }
    }

    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        l.max_image_width = Some(self.cfg.max_width);
        l.max_image_height = Some(self.cfg.max_height);
        l.max_alloc = Some(self.cfg.max_alloc_bytes);
        l
    }

    /// Decode `data`. The error is a reason for the user ("not an image", "over the
    /// limits", "truncated").
    pub fn decode(&mut self, data: &[u8]) -> Result<Frame, String> {
        let reader = ImageReader::new(Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))?;
        let format = match reader.format() {
            Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
            Some(f) => {
                return Err(format!(
                    "{f:?} images are not supported (JPEG, PNG, WebP are)"
                ));
            }
            None => return Err("not a recognised image (JPEG, PNG or WebP expected)".to_string()),
        };
        let mut reader = reader;
        reader.limits(self.limits());
        let mut dec = reader.into_decoder().map_err(|e| describe(format, e))?;
        let (w, h) = dec.dimensions();
        if w > self.cfg.max_width || h > self.cfg.max_height {
            return Err(format!(
                "image is {w} x {h}, over the limit of {} x {} (decode.max_width, decode.max_height)",
                self.cfg.max_width, self.cfg.max_height
            ));
        }
        if w == 0 || h == 0 {
            return Err(format!("image has no pixels ({w} x {h})"));
        }
        let rgb_len = w as usize * h as usize * 3;
        if rgb_len as u64 > self.cfg.max_alloc_bytes {
            return Err(format!(
                "decoded image would take {} MiB, over the limit of {} MiB (decode.max_alloc_mib)",
                rgb_len >> 20,
                self.cfg.max_alloc_bytes >> 20
            ));
        }
        let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
        let color = dec.color_type();
        let mut out = self.pool.get(rgb_len);
        if color == ColorType::Rgb8 {
            dec.read_image(&mut out).map_err(|e| describe(format, e))?;
        } else {
            let total =
                usize::try_from(dec.total_bytes()).map_err(|_| "image too large".to_string())?;
            self.scratch.resize(total, 0);
            dec.read_image(&mut self.scratch)
                .map_err(|e| describe(format, e))?;
            to_rgb8(color, &self.scratch, &mut out)?;
        }
        let (out, w, h) = if orientation == Orientation::NoTransforms {
            (out, w, h)
        } else {
            let mut dst = self.pool.get(rgb_len);
            let (nw, nh) = orient(&out, w, h, orientation, &mut dst);
            drop(out);
            (dst, nw, nh)
        };
        Ok(Frame {
            pixels: out,
            width: w,
            height: h,
            orig_width: w,
            orig_height: h,
        })
    }

    pub fn pool(&self) -> &Arc<BufPool> {
        &self.pool
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

fn describe(format: ImageFormat, e: image::ImageError) -> String {
    let format = format_name(format);
    use image::ImageError as E;
    match e {
        E::Limits(l) => format!("over the decode limits: {l}"),
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("truncated {format} file")
        }
        other => format!("invalid {format} data: {other}"),
    }
}

/// Convert decoder output of another colour type to packed RGB8. Alpha is composited on
/// white: transparent product shots and logos are drawn on white far more often than on
/// black, and a model never sees the checkerboard a viewer would show.
fn to_rgb8(color: ColorType, src: &[u8], dst: &mut PooledBuf) -> Result<(), String> {
    let px = dst.len() / 3;
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
            // Native-endian u16 samples; keep the high byte.
            let ch = color.channel_count() as usize;
            let s16: Vec<u16> = src
                .chunks_exact(2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .collect();
            for (i, d) in dst.chunks_exact_mut(3).enumerate().take(px) {
                let s = &s16[i * ch..i * ch + ch];
                let (r, g, b, a) = match ch {
                    1 => (s[0], s[0], s[0], 65535),
                    2 => (s[0], s[0], s[0], s[1]),
                    3 => (s[0], s[1], s[2], 65535),
                    _ => (s[0], s[1], s[2], s[3]),
                };
                let a8 = a >> 8;
                d[0] = over_white(r >> 8, a8);
                d[1] = over_white(g >> 8, a8);
                d[2] = over_white(b >> 8, a8);
            }
        }
        other => return Err(format!("colour type {other:?} is not supported")),
    }
    Ok(())
}

/// Apply an EXIF orientation: write the upright image into `dst`, return its size.
pub fn orient(src: &[u8], w: u32, h: u32, o: Orientation, dst: &mut [u8]) -> (u32, u32) {
    let (w, h) = (w as usize, h as usize);
    let swap = matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (dw, dh) = if swap { (h, w) } else { (w, h) };
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
                .contains("not a recognised image")
        );
        let good = png(
            64,
            64,
            image::ExtendedColorType::Rgb8,
            &vec![9; 64 * 64 * 3],
        );
        let e = d.decode(&good[..good.len() / 2]).unwrap_err();
        assert!(e.contains("PNG"), "{e}");
        let mut small = cfg();
        small.max_width = 32;
        let mut d = Decoder::new(small, BufPool::new(2));
        assert!(d.decode(&good).unwrap_err().contains("over the"));
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
