//! The unit of work: one input file, as it moves through the stages.
//!
//! An [`Item`] is owned by exactly one stage at a time and only moves forward; each stage
//! wraps it with what it produced ([`Frame`] after decode). Everything the end of the
//! pipeline needs to report or publish (name, sidecar data) rides on the item,
//! so no stage has to look anything up in another's state.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use crate::vocab::error::ItemError;
use crate::vocab::params::Params;
use crate::vocab::pool::PooledBuf;

/// A region of the source image to fit, in the coordinates of the original (not
/// DCT-scaled) image. May extend past the image border; the outside is padded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

#[derive(Debug)]
pub struct Item {
    /// Unique within one run; orders log lines and outcomes.
    pub id: u64,
    /// Where the input is read from (`work/` in the hot folder).
    pub path: PathBuf,
    /// Output base name: the input's stem, sanitised.
    pub name: String,
    /// When the item entered the pipeline, for latency.
    pub started: Instant,
    /// What to fit instead of the whole image (the face crop sets it).
    pub region: Option<Region>,
    /// JSON written beside the output as `<name>.json` (the face crop's box and landmarks).
    pub sidecar: Option<serde_json::Value>,
    /// The input file as the read stage found it: a file that differs from this later
    /// was changed after its claim (a writer that paused), and its result is not trusted.
    pub source: Option<SourceStat>,
    /// The input's EXIF, filtered to what is safe to publish (`encode.keep_metadata`, see
    /// `stages::metadata`): set by decode, written and dropped by encode. `None` unless
    /// the key is on, so by default nothing of the input's metadata travels.
    pub exif: Option<Vec<u8>>,
    /// SHA-256 of the input's bytes, in hex, for its sidecar (set by decode when outputs
    /// get sidecars): which file made an output, even after a rename.
    pub input_sha256: Option<String>,
    /// The item's parameters for the model (`[params]`), checked and complete; `None`
    /// when the config declares none.
    pub params: Option<Params>,
    /// Cluster mode: the item's id on the server, unique and recorded in the item's
    /// journal before anything about it leaves the host (so a resumed item is the same
    /// item, and its re-enqueue a duplicate the server drops).
    pub cluster_id: Option<String>,
    /// Cluster mode, on a worker: the input's bytes as they came from the server (the
    /// read stage takes them instead of mapping `path`, which then only names the item).
    pub data: Option<Vec<u8>>,
}

/// Size and modification time of an input file when it was read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceStat {
    pub len: u64,
    pub mtime: Option<SystemTime>,
}

impl SourceStat {
    pub fn of(meta: &std::fs::Metadata) -> SourceStat {
        SourceStat {
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }
}

impl Item {
    pub fn new(id: u64, path: PathBuf) -> Item {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Item {
            id,
            name: sanitize_name(&stem),
            path,
            started: Instant::now(),
            region: None,
            sidecar: None,
            source: None,
            exif: None,
            input_sha256: None,
            params: None,
            cluster_id: None,
            data: None,
        }
    }
}

/// A decoded image: tightly packed RGB8 (or RGBA8, with `decode.alpha = "keep"`) in a
/// pooled buffer.
#[derive(Debug)]
pub struct Frame {
    pub pixels: PooledBuf,
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel: 3 (RGB) or 4 (RGBA, straight alpha).
    pub channels: usize,
    /// Size of the image before any DCT-domain downscale at decode (what `Region`s and
    /// sidecars refer to). Equal to `width`/`height` for a full decode.
    pub orig_width: u32,
    pub orig_height: u32,
    /// Frame pixels per original pixel, on both axes: M/8 for a JPEG decoded at M/8 in the
    /// DCT domain, 1 otherwise. Exact, unlike `width / orig_width`: libjpeg-turbo rounds
    /// the scaled size up, so the last column covers only part of a scaled pixel, and
    /// mapping by the rounded size would stretch the image by up to a pixel.
    pub scale: f64,
}

impl Frame {
    /// A frame of every pixel of its image (no DCT-domain downscale).
    pub fn full(pixels: PooledBuf, width: u32, height: u32, channels: usize) -> Frame {
        Frame {
            pixels,
            width,
            height,
            channels,
            orig_width: width,
            orig_height: height,
            scale: 1.0,
        }
    }
}

/// What happened to one item, reported once by whichever stage finished it.
#[derive(Debug)]
pub struct Outcome {
    pub item: Item,
    /// Output files written, or why the item failed.
    pub result: Result<Vec<PathBuf>, ItemError>,
}

/// Make an output base name from an input stem: no path separators, no leading dot (a
/// hidden file, or `..`), no control characters (a newline in a name breaks every log
/// and shell loop downstream). Unicode and spaces survive; an empty result becomes
/// `unnamed`. Also capped at 200 bytes, leaving room for a suffix and extension under
/// the usual 255-byte name limit.
pub fn sanitize_name(stem: &str) -> String {
    let mut out: String = stem
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    while out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    if out.len() > 200 {
        let mut end = 200;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    if out.trim().is_empty() {
        out = "unnamed".to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(sanitize_name("a b ü 漢"), "a b ü 漢");
        assert_eq!(sanitize_name(".hidden"), "_hidden");
        assert_eq!(sanitize_name("..x"), "_.x");
        assert_eq!(sanitize_name("a\nb\tc"), "a_b_c");
        assert_eq!(sanitize_name(""), "unnamed");
        assert!(sanitize_name(&"é".repeat(300)).len() <= 200);
    }
}
