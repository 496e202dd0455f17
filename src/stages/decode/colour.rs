//! Colour: a decoder's native pixels (grey, grey + alpha, RGB, RGBA, CMYK; 8 or 16 bits)
//! to the packed sRGB RGB8 the rest of the pipeline works in.
//!
//! What the model sees must be the photo, so an embedded ICC profile is honoured: the
//! pixels are converted from it to sRGB with moxcms (the colour engine the `image` crate
//! already depends on), perceptual intent, which for the matrix/TRC profiles cameras and
//! phones embed is relative colorimetric with gamut clipping, as LittleCMS and PIL's
//! ImageCms do it. A profile that already is sRGB (checked by converting a probe grid, so
//! every vendor's variant of it is recognised) costs nothing per pixel; a profile that
//! cannot be parsed, or does not fit the pixels (an RGB profile on a grey image), is
//! ignored with a warning and the pixels are taken as sRGB, as every viewer does: the
//! photo is still worth processing.
//!
//! The other conversions, and the choices behind them:
//! - **16 bits** are reduced by rounding (`v * 255 / 65535`, to nearest), not by keeping
//!   the high byte, which darkens every sample by up to one level and bands gradients.
//! - **CMYK without a profile** uses the naive formula PIL uses (`(255 - c) * (255 - k) /
//!   255`); JPEGs with an Adobe APP14 marker store inverted CMYK (Photoshop's convention,
//!   which libjpeg and PIL follow) and are inverted first.
//! - **Alpha** is composited over a background colour in sRGB-encoded values (as browsers
//!   do), after the colour conversion, so the background is the sRGB colour configured
//!   (`decode.alpha`: white, or `preprocess.pad_color` so that padding and transparency
//!   look alike to the model). With `alpha = "keep"` it is kept instead, unassociated
//!   (straight, as PNG stores it), and every frame is RGBA8, opaque pixels at 255.
//!
//! Conversion runs row by row through two scratch rows the worker keeps, so a frame takes
//! no buffer beyond the ones the decoder already holds, and nothing is allocated per image
//! once the widest row has been seen.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use moxcms::{ColorProfile, DataColorSpace, Layout, Transform8BitExecutor, TransformOptions};

use crate::vocab::error::StageError;

/// How a decoder's native pixels are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Native {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
    /// 4 channels of ink; `inverted`: stored as 255 - ink (Adobe JPEGs).
    Cmyk {
        inverted: bool,
    },
}

impl Native {
    pub fn channels(self) -> usize {
        match self {
            Native::Gray => 1,
            Native::GrayAlpha => 2,
            Native::Rgb => 3,
            Native::Rgba | Native::Cmyk { .. } => 4,
        }
    }

    fn has_alpha(self) -> bool {
        matches!(self, Native::GrayAlpha | Native::Rgba)
    }

    /// The colour space a profile for these pixels must describe.
    fn colour_space(self) -> DataColorSpace {
        match self {
            Native::Gray | Native::GrayAlpha => DataColorSpace::Gray,
            Native::Rgb | Native::Rgba => DataColorSpace::Rgb,
            Native::Cmyk { .. } => DataColorSpace::Cmyk,
        }
    }

    fn layouts(self) -> (Layout, Layout) {
        match self {
            Native::Gray => (Layout::Gray, Layout::Rgb),
            Native::GrayAlpha => (Layout::GrayAlpha, Layout::Rgba),
            Native::Rgb => (Layout::Rgb, Layout::Rgb),
            Native::Rgba => (Layout::Rgba, Layout::Rgba),
            // moxcms takes 4-channel ink through the 4-sample layout.
            Native::Cmyk { .. } => (Layout::Rgba, Layout::Rgb),
        }
    }
}

/// A decoder's native pixels, row after row.
pub struct Source<'a> {
    pub px: &'a [u8],
    pub width: usize,
    /// Bytes from one row's start to the next (at least a row's samples).
    pub stride: usize,
    pub layout: Native,
    /// Native-endian 16-bit samples (else 8-bit).
    pub sixteen: bool,
    /// The embedded ICC profile, if any.
    pub icc: Option<&'a [u8]>,
}

/// A transform for one (profile, layout), or `None` when the profile is sRGB, unusable or
/// for other pixels: then the pixels are taken as they are.
type Cached = Option<Arc<Transform8BitExecutor>>;

/// Profiles seen recently: photos from one phone or camera share one profile, so a
/// handful covers a stream, and building a transform (a few hundred microseconds, more for
/// a CMYK LUT profile) happens once per profile and worker.
const CACHE_PROFILES: usize = 16;

/// One decode worker's colour state: its transform cache and scratch rows.
pub struct Colour {
    cache: Vec<(u64, Native, Cached)>,
    srgb: ColorProfile,
    row8: Vec<u8>,
    row_out: Vec<u8>,
}

impl Default for Colour {
    fn default() -> Self {
        Colour {
            cache: Vec::with_capacity(CACHE_PROFILES),
            srgb: ColorProfile::new_srgb(),
            row8: Vec::new(),
            row_out: Vec::new(),
        }
    }
}

impl Colour {
    /// Convert `src` to packed sRGB in `out`, compositing any alpha over `background`
    /// (RGB8, `width * rows * 3` bytes), or with `background` `None` keeping it (RGBA8,
    /// `width * rows * 4` bytes; opaque pixels get 255). `src` holds at least that many
    /// rows.
    pub fn convert(
        &mut self,
        src: &Source<'_>,
        out: &mut [u8],
        background: Option<[u8; 3]>,
    ) -> Result<(), StageError> {
        let t = src.icc.and_then(|p| self.transform(p, src.layout));
        let w = src.width;
        let ch = src.layout.channels();
        let row_in = w * ch * if src.sixteen { 2 } else { 1 };
        let out_ch = if src.layout.has_alpha() { 4 } else { 3 };
        let frame_ch = if background.is_some() { 3 } else { 4 };
        self.row8.resize(w * ch, 0);
        self.row_out.resize(w * out_ch, 0);
        // Profiles take 255 as full ink: Adobe-inverted CMYK is flipped before one.
        let invert = t.is_some() && src.layout == Native::Cmyk { inverted: true };
        for (y, orow) in out.chunks_exact_mut(w * frame_ch).enumerate() {
            let srow = &src.px[y * src.stride..y * src.stride + row_in];
            if src.sixteen {
                reduce16(srow, &mut self.row8);
            } else if invert {
                self.row8.copy_from_slice(srow);
            }
            if invert {
                self.row8.iter_mut().for_each(|v| *v = 255 - *v);
            }
            let row8: &[u8] = if src.sixteen || invert {
                &self.row8
            } else {
                srow
            };
            match &t {
                Some(t) => {
                    let converted = &mut self.row_out[..w * out_ch];
                    t.transform(row8, converted).map_err(|e| colour_error(&e))?;
                    finish(converted, out_ch == 4, orow, background);
                }
                None => plain(row8, src.layout, orow, background),
            }
        }
        Ok(())
    }

    /// Convert packed RGB8 or RGBA8 pixels (`ch` = 3 or 4 bytes each, `width` per row)
    /// from the profile `icc` to sRGB in place; alpha passes through. `grey`: the pixels
    /// are a grey image the decoder expanded to RGB (a greyscale JPEG), so its profile is
    /// a grey one and its curve is applied to each channel; a grey profile on colour
    /// pixels is ignored like any profile for other pixels.
    pub fn rgb_in_place(&mut self, px: &mut [u8], width: usize, ch: usize, icc: &[u8], grey: bool) {
        let layout = match (grey, ch) {
            (true, _) => Native::Gray,
            (false, 4) => Native::Rgba,
            _ => Native::Rgb,
        };
        let Some(t) = self.transform(icc, layout) else {
            return;
        };
        if !grey {
            self.row8.resize(width * ch, 0);
            for row in px.chunks_exact_mut(width * ch) {
                self.row8.copy_from_slice(row);
                if let Err(e) = t.transform(&self.row8, row) {
                    tracing::warn!("colour conversion failed, pixels left as they are: {e}");
                    return;
                }
            }
        } else {
            let levels: [u8; 256] = std::array::from_fn(|i| i as u8);
            let mut lut = [0u8; 768];
            if t.transform(&levels, &mut lut).is_ok() {
                for p in px.chunks_exact_mut(ch) {
                    let v = p[0] as usize * 3;
                    p[..3].copy_from_slice(&lut[v..v + 3]);
                }
            }
        }
    }

    /// The cached transform for `icc` on `layout` pixels, built on first use.
    fn transform(&mut self, icc: &[u8], layout: Native) -> Cached {
        let mut h = DefaultHasher::new();
        icc.hash(&mut h);
        let key = h.finish();
        if let Some((_, _, t)) = self
            .cache
            .iter()
            .find(|(k, l, _)| *k == key && *l == layout)
        {
            return t.clone();
        }
        let t = build(icc, layout, &self.srgb);
        if self.cache.len() == CACHE_PROFILES {
            self.cache.remove(0);
        }
        self.cache.push((key, layout, t.clone()));
        t
    }
}

/// A transform from `icc` to sRGB for `layout` pixels; `None` when the profile is
/// unusable, describes other pixels, or is sRGB already.
fn build(icc: &[u8], layout: Native, srgb: &ColorProfile) -> Cached {
    let profile = match ColorProfile::new_from_slice(icc) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("embedded ICC profile ignored, cannot be read: {e}");
            return None;
        }
    };
    if profile.color_space != layout.colour_space() {
        tracing::warn!(
            "embedded ICC profile ignored: it is for {:?} pixels, these are {layout:?}",
            profile.color_space
        );
        return None;
    }
    let (from, to) = layout.layouts();
    let t = match profile.create_transform_8bit(from, srgb, to, TransformOptions::default()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("embedded ICC profile ignored, no transform to sRGB: {e}");
            return None;
        }
    };
    // The identity check probes colour only; alpha passes through a transform as is.
    let colour = match layout {
        Native::GrayAlpha => Native::Gray,
        Native::Rgba => Native::Rgb,
        other => other,
    };
    let (from, to) = colour.layouts();
    let identity = colour == layout && is_identity(&*t, colour)
        || colour != layout
            && profile
                .create_transform_8bit(from, srgb, to, TransformOptions::default())
                .is_ok_and(|c| is_identity(&*c, colour));
    (!identity).then_some(t)
}

/// Whether `t` maps every colour of a probe grid to itself within one level: the profile
/// is sRGB (or close enough that converting would change nothing visible).
fn is_identity(t: &Transform8BitExecutor, layout: Native) -> bool {
    let levels: Vec<u8> = (0..=8u32).map(|i| (i * 255 / 8) as u8).collect();
    let (probe, expect): (Vec<u8>, Vec<u8>) = match layout {
        Native::Rgb => {
            let mut p = Vec::new();
            for &r in &levels {
                for &g in &levels {
                    for &b in &levels {
                        p.extend([r, g, b]);
                    }
                }
            }
            (p.clone(), p)
        }
        Native::Gray => {
            let p: Vec<u8> = (0..=255).collect();
            let e = p.iter().flat_map(|&v| [v, v, v]).collect();
            (p, e)
        }
        // CMYK is never the identity; alpha layouts are probed as their colour alone.
        _ => return false,
    };
    let mut got = vec![0u8; expect.len()];
    t.transform(&probe, &mut got).is_ok()
        && got.iter().zip(&expect).all(|(a, b)| a.abs_diff(*b) <= 1)
}

/// 16-bit native-endian samples to 8 bits, rounded to nearest.
fn reduce16(src: &[u8], dst: &mut [u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        let v = u16::from_ne_bytes([s[0], s[1]]) as u32;
        *d = ((v * 255 + 32767) / 65535) as u8;
    }
}

/// `c` with alpha `a` over `bg`, in encoded values, rounded.
fn over(c: u8, a: u8, bg: u8) -> u8 {
    let (c, a, bg) = (c as u32, a as u32, bg as u32);
    ((c * a + bg * (255 - a) + 127) / 255) as u8
}

/// A converted RGB or RGBA row into the output row: RGB8 composited over `bg`, or RGBA8
/// with the alpha kept (`bg` `None`). Each case is its own loop, so the choice is made
/// once per row, not per pixel (measured: a per-pixel choice cost 10% of an RGBA PNG's
/// decode and fit).
fn finish(row: &[u8], alpha: bool, out: &mut [u8], bg: Option<[u8; 3]>) {
    match (alpha, bg) {
        // Same layout in and out: opaque to RGB, or RGBA kept.
        (false, Some(_)) | (true, None) => out.copy_from_slice(&row[..out.len()]),
        (true, Some(bg)) => {
            for (d, s) in out.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                for k in 0..3 {
                    d[k] = over(s[k], s[3], bg[k]);
                }
            }
        }
        (false, None) => {
            for (d, s) in out.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
                d[..3].copy_from_slice(s);
                d[3] = 255;
            }
        }
    }
}

/// A row taken as sRGB (no profile, or an sRGB one) into the output row (as [`finish`]).
fn plain(row: &[u8], layout: Native, out: &mut [u8], bg: Option<[u8; 3]>) {
    match (layout, bg) {
        (Native::Rgb, _) => finish(row, false, out, bg),
        (Native::Rgba, _) => finish(row, true, out, bg),
        (Native::Gray, Some(_)) => {
            for (d, &l) in out.chunks_exact_mut(3).zip(row) {
                d.fill(l);
            }
        }
        (Native::Gray, None) => {
            for (d, &l) in out.chunks_exact_mut(4).zip(row) {
                d.copy_from_slice(&[l, l, l, 255]);
            }
        }
        (Native::GrayAlpha, Some(bg)) => {
            for (d, s) in out.chunks_exact_mut(3).zip(row.chunks_exact(2)) {
                for k in 0..3 {
                    d[k] = over(s[0], s[1], bg[k]);
                }
            }
        }
        (Native::GrayAlpha, None) => {
            for (d, s) in out.chunks_exact_mut(4).zip(row.chunks_exact(2)) {
                d.copy_from_slice(&[s[0], s[0], s[0], s[1]]);
            }
        }
        (Native::Cmyk { inverted }, _) => {
            let oc = if bg.is_some() { 3 } else { 4 };
            for (d, s) in out.chunks_exact_mut(oc).zip(row.chunks_exact(4)) {
                let ink = |v: u8| if inverted { 255 - v } else { v };
                let nk = 255 - ink(s[3]) as u32;
                for k in 0..3 {
                    // PIL's cmyk2rgb, rounding included: nk - c * nk / 255.
                    let t = ink(s[k]) as u32 * nk + 128;
                    d[k] = (nk - (((t >> 8) + t) >> 8)) as u8;
                }
                if oc == 4 {
                    d[3] = 255;
                }
            }
        }
    }
}

fn colour_error(e: &moxcms::CmsError) -> StageError {
    StageError::BadInput(format!("colour conversion to sRGB failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(src: &[u8], w: usize, layout: Native, sixteen: bool, icc: Option<&[u8]>) -> Vec<u8> {
        convert_to(src, w, layout, sixteen, icc, Some([255; 3]))
    }

    /// [`convert`] with a background, or `None` to keep alpha (RGBA out).
    fn convert_to(
        src: &[u8],
        w: usize,
        layout: Native,
        sixteen: bool,
        icc: Option<&[u8]>,
        bg: Option<[u8; 3]>,
    ) -> Vec<u8> {
        let stride = w * layout.channels() * if sixteen { 2 } else { 1 };
        let oc = if bg.is_some() { 3 } else { 4 };
        let mut out = vec![0u8; w * (src.len() / stride) * oc];
        let source = Source {
            px: src,
            width: w,
            stride,
            layout,
            sixteen,
            icc,
        };
        Colour::default().convert(&source, &mut out, bg).unwrap();
        out
    }

    #[test]
    fn sixteen_bits_round_to_nearest() {
        // The high byte alone would give 0 and 255 for these two, each off by one level.
        let px: Vec<u8> = [0u16, 0x00FF, 0xFF00, 65535]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(
            convert(&px, 4, Native::Gray, true, None),
            [0, 0, 0, 1, 1, 1, 254, 254, 254, 255, 255, 255]
        );
    }

    #[test]
    fn alpha_composites_over_the_background_and_cmyk_follows_pil() {
        let rgba = [200, 100, 0, 128, 10, 20, 30, 255, 1, 2, 3, 0];
        assert_eq!(
            convert(&rgba, 3, Native::Rgba, false, None),
            [227, 177, 127, 10, 20, 30, 255, 255, 255]
        );
        // No ink is white, full black is black; Adobe-inverted storage flips both.
        let cmyk = [0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0];
        assert_eq!(
            convert(&cmyk, 3, Native::Cmyk { inverted: false }, false, None),
            [255, 255, 255, 0, 0, 0, 0, 255, 255]
        );
        let inverted: Vec<u8> = cmyk.iter().map(|v| 255 - v).collect();
        assert_eq!(
            convert(&inverted, 3, Native::Cmyk { inverted: true }, false, None),
            [255, 255, 255, 0, 0, 0, 0, 255, 255]
        );
    }

    #[test]
    fn kept_alpha_passes_through_every_layout_and_opaque_pixels_get_255() {
        let rgba = [200, 100, 0, 128, 10, 20, 30, 255, 1, 2, 3, 0];
        assert_eq!(
            convert_to(&rgba, 3, Native::Rgba, false, None, None),
            rgba,
            "straight alpha, colour untouched even where transparent"
        );
        assert_eq!(
            convert_to(&[9, 7, 5, 0], 2, Native::GrayAlpha, false, None, None),
            [9, 9, 9, 7, 5, 5, 5, 0]
        );
        assert_eq!(
            convert_to(&[1, 2, 3], 1, Native::Rgb, false, None, None),
            [1, 2, 3, 255]
        );
        assert_eq!(
            convert_to(
                &[0, 0, 0, 0],
                1,
                Native::Cmyk { inverted: false },
                false,
                None,
                None
            ),
            [255, 255, 255, 255]
        );
        // Through a profile, the colour converts and the alpha is kept as it was.
        let p3 = ColorProfile::new_display_p3().encode().unwrap();
        let out = convert_to(&[255, 0, 0, 77], 1, Native::Rgba, false, Some(&p3), None);
        assert_eq!(out, [255, 0, 0, 77]);
        let out = convert_to(&[0, 255, 0, 77], 1, Native::Rgb, false, Some(&p3), None);
        assert_eq!(out[3], 255);
        let composited = convert(&[0, 255, 0], 1, Native::Rgb, false, Some(&p3));
        assert_eq!(&out[..3], &composited[..]);
    }

    #[test]
    fn an_srgb_profile_changes_nothing_and_a_wide_one_converts() {
        let srgb = ColorProfile::new_srgb().encode().unwrap();
        let p3 = ColorProfile::new_display_p3().encode().unwrap();
        let px = [255u8, 0, 0, 128, 128, 128, 10, 200, 30];
        let mut c = Colour::default();
        assert!(
            c.transform(&srgb, Native::Rgb).is_none(),
            "sRGB is the identity"
        );
        assert_eq!(convert(&px, 3, Native::Rgb, false, Some(&srgb)), px);
        let out = convert(&px, 3, Native::Rgb, false, Some(&p3));
        // P3 red is outside sRGB: clipped to full red. Grey stays grey.
        assert_eq!(&out[..3], [255, 0, 0]);
        assert!(out[3..6].iter().all(|&v| v.abs_diff(128) <= 1), "{out:?}");
        // P3 green (10, 200, 30) is a more saturated green than sRGB's same numbers.
        assert!(out[6] < 10 && out[7] > 200, "{out:?}");
        // In place gives the same.
        let mut inplace = px;
        c.rgb_in_place(&mut inplace, 3, 3, &p3, false);
        assert_eq!(inplace.to_vec(), out);
    }

    #[test]
    fn unusable_profiles_are_ignored() {
        let px = [1u8, 2, 3];
        assert_eq!(
            convert(&px, 1, Native::Rgb, false, Some(b"not a profile")),
            px
        );
        let grey = ColorProfile::new_gray_with_gamma(2.2).encode().unwrap();
        assert_eq!(convert(&px, 1, Native::Rgb, false, Some(&grey)), px);
        // In place too: a grey profile's curve must not be applied to colour pixels.
        let mut colour = [10u8, 200, 30];
        Colour::default().rgb_in_place(&mut colour, 1, 3, &grey, false);
        assert_eq!(colour, [10, 200, 30]);
    }
}
