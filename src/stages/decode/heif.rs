//! HEIC/HEIF (iPhone photos) and AVIF through libheif, Debian's `libheif1` (LGPL-3.0;
//! its HEVC decoder libde265 is LGPL-3.0, its AV1 decoders dav1d and libaom are
//! BSD-2-Clause), bound by the `libheif-rs` crate (MIT).
//!
//! libheif applies the file's own geometry (`irot`, `imir`, `clap`) while decoding, so the
//! frame comes out upright and an EXIF orientation inside a HEIF is ignored, as the
//! format says. The primary image's size is read from its header (`ispe`) and checked
//! against the limits before libheif allocates anything. libheif decodes into memory of
//! its own, which the frame budget does not hand out: its size is reserved from the
//! budget (a buffer taken and not written) for as long as libheif holds it.

use std::sync::OnceLock;

use libheif_rs::{
    ColorPrimaries, ColorSpace, FileTypeResult, HeifContext, LibHeif, RgbChroma, check_file_type,
};

use super::colour::{Native, Source};
use super::{Decoder, buffers};
use crate::stages::metadata;
use crate::vocab::error::StageError;
use crate::vocab::item::Frame;

/// Whether `data` starts like an ISO-BMFF image (HEIC, HEIF, AVIF) libheif can read.
pub fn is_heif(data: &[u8]) -> bool {
    data.len() >= 12
        && &data[4..8] == b"ftyp"
        && matches!(
            check_file_type(data),
            FileTypeResult::Supported | FileTypeResult::Unsupported
        )
}

impl Decoder {
    pub(super) fn decode_heif(&mut self, data: &[u8]) -> Result<Frame, StageError> {
        let lib = LibHeif::new();
        let ctx = HeifContext::read_from_bytes(data).map_err(|e| heif_error("read", &e))?;
        let handle = ctx
            .primary_image_handle()
            .map_err(|e| heif_error("read", &e))?;
        let (w, h) = (handle.width(), handle.height());
        self.capture_exif(|| metadata::from_heif(&handle));
        let alpha = handle.has_alpha_channel();
        let ch = if alpha { 4 } else { 3 };
        // libheif's own pixels: the decoded YCbCr planes (up to 16 bits a sample) and the
        // interleaved result.
        self.check_size(w, h, 6 + ch as u64)?;
        let frame = w as usize * h as usize * self.channels();
        let held = w as usize * h as usize * (6 + ch);
        let [mut out, _, reserved] = buffers(&self.pool, (w, h), frame, 0, held)?;
        let chroma = if alpha {
            RgbChroma::Rgba
        } else {
            RgbChroma::Rgb
        };
        let img = lib
            .decode(&handle, ColorSpace::Rgb(chroma), None)
            .map_err(|e| heif_error("decode", &e))?;
        let planes = img.planes();
        let plane = planes
            .interleaved
            .ok_or_else(|| StageError::Unsupported("HEIF image without RGB pixels".into()))?;
        let (pw, ph) = (plane.width as usize, plane.height as usize);
        if (pw, ph) != (w as usize, h as usize) || plane.storage_bits_per_pixel as usize != ch * 8 {
            return Err(StageError::Unsupported(format!(
                "HEIF image decoded to {pw} x {ph} at {} bits per pixel, expected {w} x {h} at {}",
                plane.storage_bits_per_pixel,
                ch * 8
            )));
        }
        let profile = handle.color_profile_raw();
        let icc = match &profile {
            Some(p) => Some(&p.data[..]),
            None => nclx_profile(&handle),
        };
        let src = Source {
            px: plane.data,
            width: pw,
            stride: plane.stride,
            layout: if alpha { Native::Rgba } else { Native::Rgb },
            sixteen: false,
            icc,
        };
        self.colour.convert(&src, &mut out, self.cfg.background)?;
        drop(img);
        drop(reserved);
        Ok(Frame::full(out, w, h, self.channels()))
    }
}

/// A profile for a HEIF image that states its colours only as CICP (`nclx`) primaries:
/// Display P3 (the iPhone's) and BT.2020 are converted; BT.709 is sRGB's own primaries.
fn nclx_profile(handle: &libheif_rs::ImageHandle) -> Option<&'static [u8]> {
    // Encoded once per process, not per photo.
    static P3: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    static BT2020: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let nclx = handle.color_profile_nclx()?;
    let (cell, make): (_, fn() -> moxcms::ColorProfile) = match nclx.color_primaries() {
        ColorPrimaries::SMPTE_EG_432_1 => (&P3, moxcms::ColorProfile::new_display_p3),
        ColorPrimaries::ITU_R_BT_2020_2_and_2100_0 => (&BT2020, moxcms::ColorProfile::new_bt2020),
        _ => return None,
    };
    cell.get_or_init(|| make().encode().ok()).as_deref()
}

fn heif_error(what: &str, e: &libheif_rs::HeifError) -> StageError {
    use libheif_rs::HeifErrorCode as C;
    let msg = format!("cannot {what} HEIF/AVIF file: {}", e.message);
    if matches!(
        e.sub_code,
        libheif_rs::HeifErrorSubCode::SecurityLimitExceeded
    ) {
        // libheif's own size limits (32768 x 32768 in 1.15), checked while parsing, before
        // hotpipe's: the same class and wording as the decode limits.
        return StageError::OverLimit(format!("over the decode limits: {}", e.message));
    }
    match e.code {
        C::UnsupportedFeature | C::UnsupportedFileType | C::DecoderPluginError => {
            StageError::Unsupported(msg)
        }
        C::MemoryAllocationError => StageError::OverLimit(msg),
        _ => StageError::BadInput(msg),
    }
}
