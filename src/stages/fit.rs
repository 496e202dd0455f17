//! Fit: resize a decoded frame to the model's input size, straight into its batch row.
//!
//! One geometry serves every mode: a source rectangle (in frame pixels, possibly reaching
//! past the image) maps linearly onto the whole output. "crop" picks the centred
//! rectangle of the output's aspect inside the image, "pad" the one around it, "stretch"
//! the image itself, and the face crop passes its own square. The part of the rectangle
//! inside the image is resized with fast_image_resize (SIMD convolution) into the matching
//! part of the row; the rest is filled with `pad_color`.
//!
//! RGBA frames (`decode.alpha = "keep"`) are resized with their colour premultiplied by
//! alpha (fast_image_resize's default for 4-channel pixels), so transparent pixels'
//! colours do not bleed into their neighbours, and padding is `pad_color` at alpha 0:
//! it is not part of the photo.

use fast_image_resize as fir;
use fir::images::{CroppedImageMut, Image, ImageRef};
use fir::{FilterType, PixelType, ResizeAlg, ResizeOptions};

use crate::config::{Filter, FitMode, PreprocessConfig};
use crate::vocab::item::{Frame, Region};

/// One fit worker's state (the resizer keeps its scratch buffers between images).
pub struct Fitter {
    resizer: fir::Resizer,
    cfg: PreprocessConfig,
    alg: ResizeAlg,
}

/// A rectangle in frame pixels, `f64` so sub-pixel crops keep their precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl Rect {
    fn w(&self) -> f64 {
        self.x1 - self.x0
    }
    fn h(&self) -> f64 {
        self.y1 - self.y0
    }
}

pub fn resize_alg(f: Filter) -> ResizeAlg {
    match f {
        Filter::Nearest => ResizeAlg::Nearest,
        Filter::Box => ResizeAlg::Convolution(FilterType::Box),
        Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        Filter::Hamming => ResizeAlg::Convolution(FilterType::Hamming),
        Filter::CatmullRom => ResizeAlg::Convolution(FilterType::CatmullRom),
        Filter::Mitchell => ResizeAlg::Convolution(FilterType::Mitchell),
        Filter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
    }
}

/// The source rectangle that maps onto the whole `out_w x out_h` output, for an image
/// (or region of it) `base`.
pub fn source_rect(base: Rect, fit: FitMode, out_w: u32, out_h: u32) -> Rect {
    let (ow, oh) = (out_w as f64, out_h as f64);
    let scale = match fit {
        FitMode::Stretch => return base,
        FitMode::Crop => (ow / base.w()).max(oh / base.h()),
        FitMode::Pad => (ow / base.w()).min(oh / base.h()),
    };
    let (rw, rh) = (ow / scale, oh / scale);
    let cx = (base.x0 + base.x1) / 2.0;
    let cy = (base.y0 + base.y1) / 2.0;
    Rect {
        x0: cx - rw / 2.0,
        y0: cy - rh / 2.0,
        x1: cx + rw / 2.0,
        y1: cy + rh / 2.0,
    }
}

impl Fitter {
    pub fn new(cfg: PreprocessConfig) -> Fitter {
        Fitter {
            resizer: fir::Resizer::new(),
            alg: resize_alg(cfg.filter),
            cfg,
        }
    }

    pub fn out_size(&self) -> (u32, u32) {
        (self.cfg.width, self.cfg.height)
    }

    /// Bytes of one fitted row (the batch slot's row size).
    pub fn row_bytes(&self) -> usize {
        self.cfg.width as usize * self.cfg.height as usize * self.cfg.channels
    }

    /// The rectangle of `frame` that `region` (original-image coordinates) or, without
    /// one, the whole image becomes after the fit mode.
    pub fn plan(&self, frame: &Frame, region: Option<Region>) -> Rect {
        let k = frame.scale;
        let base = match region {
            Some(r) => Rect {
                x0: r.x0 as f64 * k,
                y0: r.y0 as f64 * k,
                x1: r.x1 as f64 * k,
                y1: r.y1 as f64 * k,
            },
            // The image's own extent, which a scaled decode's rounded-up last pixel
            // reaches past.
            None => Rect {
                x0: 0.0,
                y0: 0.0,
                x1: frame.orig_width as f64 * k,
                y1: frame.orig_height as f64 * k,
            },
        };
        source_rect(base, self.cfg.fit, self.cfg.width, self.cfg.height)
    }

    /// Fit `frame` into `dst` (`row_bytes` long, packed pixels of the output size).
    pub fn fit(
        &mut self,
        frame: &Frame,
        region: Option<Region>,
        dst: &mut [u8],
    ) -> Result<(), String> {
        if frame.channels != self.cfg.channels {
            // The decoders and fitters are built from one config; this is a wiring bug.
            return Err(format!(
                "a {}-channel frame for a {}-channel fit",
                frame.channels, self.cfg.channels
            ));
        }
        let r = self.plan(frame, region);
        self.fit_rect(&frame.pixels, frame.width, frame.height, r, dst)
    }

    /// Resize the source rectangle `r` of a packed image (RGB8, or RGBA8 for a 4-channel
    /// fit) into `dst`.
    pub fn fit_rect(
        &mut self,
        src: &[u8],
        fw: u32,
        fh: u32,
        r: Rect,
        dst: &mut [u8],
    ) -> Result<(), String> {
        let (ow, oh) = (self.cfg.width, self.cfg.height);
        if r.w() <= 0.0 || r.h() <= 0.0 {
            return Err("empty source region".to_string());
        }
        let (pt, ch) = match self.cfg.channels {
            4 => (PixelType::U8x4, 4),
            _ => (PixelType::U8x3, 3),
        };
        let src_img = ImageRef::new(fw, fh, src, pt).map_err(|e| format!("source image: {e}"))?;
        let mut dst_img =
            Image::from_slice_u8(ow, oh, dst, pt).map_err(|e| format!("batch row: {e}"))?;
        // Part of the output the image covers, in whole output pixels.
        let kx = ow as f64 / r.w();
        let ky = oh as f64 / r.h();
        let dx0 = ((0.0 - r.x0).max(0.0) * kx).round().clamp(0.0, ow as f64) as u32;
        let dy0 = ((0.0 - r.y0).max(0.0) * ky).round().clamp(0.0, oh as f64) as u32;
        let dx1 = ((fw as f64 - r.x0) * kx).round().clamp(0.0, ow as f64) as u32;
        let dy1 = ((fh as f64 - r.y0) * ky).round().clamp(0.0, oh as f64) as u32;
        let covers_all = dx0 == 0 && dy0 == 0 && dx1 == ow && dy1 == oh;
        if !covers_all {
            let [r, g, b] = self.cfg.pad_color;
            let pad = [r, g, b, 0];
            for px in dst_img.buffer_mut().chunks_exact_mut(ch) {
                px.copy_from_slice(&pad[..ch]);
            }
        }
        if dx1 <= dx0 || dy1 <= dy0 {
            return Ok(()); // the region lies wholly outside the image: all padding
        }
        // Source crop matching the integer destination rectangle exactly.
        let sx0 = (r.x0 + dx0 as f64 / kx).clamp(0.0, fw as f64);
        let sy0 = (r.y0 + dy0 as f64 / ky).clamp(0.0, fh as f64);
        let sx1 = (r.x0 + dx1 as f64 / kx).clamp(0.0, fw as f64);
        let sy1 = (r.y0 + dy1 as f64 / ky).clamp(0.0, fh as f64);
        let opts = ResizeOptions::new().resize_alg(self.alg).crop(
            sx0,
            sy0,
            (sx1 - sx0).max(1e-3),
            (sy1 - sy0).max(1e-3),
        );
        if covers_all {
            self.resizer.resize(&src_img, &mut dst_img, &opts)
        } else {
            let mut sub = CroppedImageMut::new(&mut dst_img, dx0, dy0, dx1 - dx0, dy1 - dy0)
                .map_err(|e| format!("batch row crop: {e}"))?;
            self.resizer.resize(&src_img, &mut sub, &opts)
        }
        .map_err(|e| format!("resize: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fit: FitMode, w: u32, h: u32) -> PreprocessConfig {
        PreprocessConfig {
            width: w,
            height: h,
            fit,
            filter: Filter::Bilinear,
            mean: None,
            std: None,
            pad_color: [7, 8, 9],
            channels: 3,
        }
    }

    fn full(w: f64, h: f64) -> Rect {
        Rect {
            x0: 0.0,
            y0: 0.0,
            x1: w,
            y1: h,
        }
    }

    #[test]
    fn geometry() {
        // 200 x 100 into 50 x 50: crop keeps the centre 100 x 100.
        let r = source_rect(full(200.0, 100.0), FitMode::Crop, 50, 50);
        assert_eq!(
            r,
            Rect {
                x0: 50.0,
                y0: 0.0,
                x1: 150.0,
                y1: 100.0
            }
        );
        // pad extends vertically to 200 x 200.
        let r = source_rect(full(200.0, 100.0), FitMode::Pad, 50, 50);
        assert_eq!(
            r,
            Rect {
                x0: 0.0,
                y0: -50.0,
                x1: 200.0,
                y1: 150.0
            }
        );
        assert_eq!(
            source_rect(full(200.0, 100.0), FitMode::Stretch, 50, 50),
            full(200.0, 100.0)
        );
    }

    #[test]
    fn pad_fills_outside_and_resizes_inside() {
        let mut f = Fitter::new(cfg(FitMode::Pad, 4, 4));
        let src = vec![200u8; 8 * 4 * 3]; // 8 x 4 grey
        let mut dst = vec![0u8; 4 * 4 * 3];
        let r = source_rect(full(8.0, 4.0), FitMode::Pad, 4, 4);
        f.fit_rect(&src, 8, 4, r, &mut dst).unwrap();
        // Rows 0 and 3 are padding, rows 1 and 2 image.
        assert_eq!(&dst[0..3], &[7, 8, 9]);
        assert_eq!(&dst[3 * 12..3 * 12 + 3], &[7, 8, 9]);
        assert_eq!(&dst[12..15], &[200, 200, 200]);
        assert_eq!(&dst[2 * 12 + 9..2 * 12 + 12], &[200, 200, 200]);
    }

    #[test]
    fn region_past_border_is_padded() {
        let mut f = Fitter::new(cfg(FitMode::Stretch, 10, 10));
        let src = vec![100u8; 10 * 10 * 3];
        let mut dst = vec![0u8; 10 * 10 * 3];
        // Left half of the region lies outside the image.
        f.fit_rect(
            &src,
            10,
            10,
            Rect {
                x0: -5.0,
                y0: 0.0,
                x1: 5.0,
                y1: 10.0,
            },
            &mut dst,
        )
        .unwrap();
        assert_eq!(&dst[0..3], &[7, 8, 9]);
        assert_eq!(&dst[9 * 3..30], &[100, 100, 100]);
    }

    #[test]
    fn rgba_resizes_premultiplied_and_pads_transparent() {
        let mut c = cfg(FitMode::Pad, 1, 3);
        c.channels = 4;
        c.filter = Filter::Box;
        let mut f = Fitter::new(c);
        assert_eq!(f.row_bytes(), 12);
        // Opaque red beside fully transparent green, 2 x 1, padded into 1 x 3: the middle
        // pixel is the image, above and below it padding.
        let src = [255u8, 0, 0, 255, 0, 255, 0, 0];
        let mut dst = [1u8; 12];
        let r = source_rect(full(2.0, 1.0), FitMode::Pad, 1, 3);
        f.fit_rect(&src, 2, 1, r, &mut dst).unwrap();
        assert_eq!(
            &dst[..4],
            &[7, 8, 9, 0],
            "padding is pad_color, transparent"
        );
        assert_eq!(&dst[8..], &[7, 8, 9, 0]);
        // Premultiplied: the transparent green adds nothing to the colour, half the alpha.
        let image = &dst[4..8];
        assert_eq!(image[..3], [255, 0, 0], "{image:?}");
        assert!(image[3].abs_diff(128) <= 1, "{image:?}");
    }
}
