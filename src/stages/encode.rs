//! Encode: one output row (packed RGB8) to JPEG, PNG or WebP bytes in a reused buffer.
//!
//! Each encode worker owns one [`Encoder`]; its output buffer keeps its capacity between
//! images, so steady-state encoding allocates nothing for the result. PNG uses fast
//! compression (outputs are intermediate files, written often, read once). WebP is
//! lossless: the `image` crate has no lossy WebP encoder, and `quality` does not apply.

use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;

use crate::config::{EncodeConfig, Format};

pub struct Encoder {
    cfg: EncodeConfig,
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(cfg: EncodeConfig) -> Encoder {
        Encoder {
            cfg,
            buf: Vec::new(),
        }
    }

    pub fn extension(&self) -> &'static str {
        self.cfg.format.extension()
    }

    /// Encode `pixels` (`w x h` packed RGB8). The returned slice is valid until the next
    /// call.
    pub fn encode(&mut self, pixels: &[u8], w: u32, h: u32) -> Result<&[u8], String> {
        self.buf.clear();
        let color = image::ExtendedColorType::Rgb8;
        let r = match self.cfg.format {
            Format::Jpeg => JpegEncoder::new_with_quality(&mut self.buf, self.cfg.quality)
                .write_image(pixels, w, h, color),
            Format::Png => PngEncoder::new_with_quality(
                &mut self.buf,
                CompressionType::Fast,
                FilterType::Adaptive,
            )
            .write_image(pixels, w, h, color),
            Format::Webp => {
                WebPEncoder::new_lossless(&mut self.buf).write_image(pixels, w, h, color)
            }
        };
        r.map_err(|e| format!("{:?} encoding failed: {e}", self.cfg.format))?;
        Ok(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_format() {
        let px: Vec<u8> = (0..16 * 16 * 3).map(|i| (i % 251) as u8).collect();
        for format in [Format::Jpeg, Format::Png, Format::Webp] {
            let mut e = Encoder::new(EncodeConfig {
                format,
                quality: 95,
            });
            let bytes = e.encode(&px, 16, 16).unwrap().to_vec();
            let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!(img.dimensions(), (16, 16));
            if format != Format::Jpeg {
                assert_eq!(img.as_raw(), &px, "{format:?} is lossless");
            }
        }
    }
}
