//! `[decode]`: how faithfully JPEGs are decoded (`dct_scaling`), what transparency becomes
//! (`alpha`), the limits a file must pass before it is decoded (dimensions, decoder
//! allocation, file size), so one hostile or broken input cannot exhaust memory; and the
//! byte budget all decoded frames in flight share (`frame_budget_mib`), so many large
//! inputs at once cannot either. The budget's default is derived here from the memory
//! this process may use, read from `/proc/meminfo` and the cgroup limits.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::{Ctx, config_names};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDecode {
    max_width: Option<Spanned<i64>>,
    max_height: Option<Spanned<i64>>,
    max_alloc_mib: Option<Spanned<i64>>,
    max_file_mib: Option<Spanned<i64>>,
    frame_budget_mib: Option<Spanned<i64>>,
    dct_scaling: Option<Spanned<String>>,
    alpha: Option<Spanned<String>>,
}

/// `decode.dct_scaling`: whether a JPEG much larger than the model's input may be decoded
/// at 1/2, 1/4 or 1/8 scale in the DCT domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DctScaling {
    /// Reduce while the decoded image keeps at least twice the output's resolution: as
    /// faithful as a full decode (within 0.3 dB), and most of its speed.
    Auto,
    /// Reduce while the decoded image is at least the output's size: fastest, and 1.5 dB
    /// less faithful on average on high-detail photos (the rule before issue 12).
    Fast,
    /// Decode every pixel.
    Off,
}

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub max_width: u32,
    pub max_height: u32,
    pub max_alloc_bytes: u64,
    pub max_file_bytes: u64,
    /// Bytes all decoded frames (and their conversion buffers) in flight may take.
    pub frame_budget_bytes: u64,
    /// The memory the default budget was derived from, when it was (not configured).
    pub frame_budget_from_memory: Option<u64>,
    pub dct_scaling: DctScaling,
    /// What transparent pixels are composited over, in sRGB (`decode.alpha`); `None`
    /// (`alpha = "keep"`): frames are RGBA and the model takes 4 channels.
    pub background: Option<[u8; 3]>,
}

config_names!(
    DctScaling,
    "decode.dct_scaling",
    [("auto", Auto), ("fast", Fast), ("off", Off),]
);

/// The smallest configurable budget: below this, ordinary photos would not fit.
const MIN_BUDGET_MIB: i64 = 16;

/// The derived default is clamped to this range. At least 256 MiB: a 24 MP photo's frame
/// with an EXIF-rotation copy is 138 MiB, and a budget that refuses ordinary photos on a
/// small machine would be worse than the risk it bounds. At most 4 GiB: the largest frame
/// the default limits admit (16384 x 16384 RGB) is 768 MiB, so 4 GiB lets two such
/// decodes (with rotation copies) run at once next to ordinary traffic; more buys no
/// throughput (the decode threads are few) and only raises the peak.
const DEFAULT_BUDGET_RANGE: (u64, u64) = (256 << 20, 4 << 30);

/// When the memory cannot be read (not Linux, no /proc): as if it were 4 GiB.
const DEFAULT_BUDGET_UNKNOWN: u64 = 1 << 30;

/// What the other sections say that `decode.alpha` must agree with.
pub(super) struct Neighbours {
    /// `[preprocess] pad_color`, what `alpha = "pad_color"` composites over.
    pub pad_color: [u8; 3],
    /// A `[face_crop]` is configured: its detector takes opaque RGB frames.
    pub face_crop: bool,
    /// No `[model]` and JPEG output: kept alpha would reach an encoder that cannot
    /// write it (with a model, its output channels decide, checked when it is loaded).
    pub rgba_to_jpeg: bool,
}

pub(super) fn validate(
    cx: &Ctx,
    d: &RawDecode,
    n: &Neighbours,
) -> Result<DecodeConfig, ConfigError> {
    let (frame_budget_bytes, frame_budget_from_memory) = frame_budget(cx, d)?;
    let dct_scaling = cx.choice(
        &d.dct_scaling,
        "decode.dct_scaling",
        DctScaling::NAMES,
        DctScaling::Auto,
    )?;
    let background = cx.choice(
        &d.alpha,
        "decode.alpha",
        &[
            ("white", Some([255; 3])),
            ("pad_color", Some(n.pad_color)),
            ("keep", None),
        ],
        Some([255; 3]),
    )?;
    if let (None, Some(a)) = (background, &d.alpha) {
        if n.face_crop {
            return cx.err(
                a.span(),
                "decode.alpha",
                "is \"keep\", which [face_crop] cannot take: its detector works on opaque RGB frames (set it to \"white\" or \"pad_color\", or remove [face_crop])",
            );
        }
        if n.rgba_to_jpeg {
            return cx.err(
                a.span(),
                "decode.alpha",
                "is \"keep\" with no [model], so the outputs are RGBA, which JPEG cannot carry (set [encode] format to \"png\" or \"webp\")",
            );
        }
    }
    Ok(DecodeConfig {
        dct_scaling,
        background,
        max_width: cx.int_in(&d.max_width, "decode.max_width", 1, 1 << 20, 16384u32)?,
        max_height: cx.int_in(&d.max_height, "decode.max_height", 1, 1 << 20, 16384u32)?,
        max_alloc_bytes: cx.int_in(
            &d.max_alloc_mib,
            "decode.max_alloc_mib",
            1,
            1 << 20,
            1024u64,
        )? << 20,
        max_file_bytes: cx.int_in(&d.max_file_mib, "decode.max_file_mib", 1, 1 << 20, 256u64)?
            << 20,
        frame_budget_bytes,
        frame_budget_from_memory,
    })
}

impl DecodeConfig {
    /// Bytes per pixel of decoded frames, and so of the model's input: 3 (RGB), or 4
    /// (RGBA) when `alpha = "keep"`. The one place this is decided.
    pub fn channels(&self) -> usize {
        if self.background.is_some() { 3 } else { 4 }
    }
}

#[cfg(test)]
impl DecodeConfig {
    /// Small limits and a fixed 1 GiB budget, for the decoder's unit tests.
    pub(crate) fn for_tests() -> DecodeConfig {
        DecodeConfig {
            max_width: 4096,
            max_height: 4096,
            max_alloc_bytes: 256 << 20,
            max_file_bytes: 256 << 20,
            frame_budget_bytes: 1 << 30,
            frame_budget_from_memory: None,
            dct_scaling: DctScaling::Auto,
            background: Some([255; 3]),
        }
    }
}

/// `decode.frame_budget_mib`: 0 or absent is the default derived from memory.
fn frame_budget(cx: &Ctx, d: &RawDecode) -> Result<(u64, Option<u64>), ConfigError> {
    let key = "decode.frame_budget_mib";
    let mib: u64 = cx.int_in(&d.frame_budget_mib, key, 0, 1 << 20, 0)?;
    if mib == 0 {
        let memory = memory_limit();
        return Ok((default_frame_budget(memory), memory));
    }
    if mib < MIN_BUDGET_MIB as u64 {
        let span = d
            .frame_budget_mib
            .as_ref()
            .expect("set when nonzero")
            .span();
        return cx.err(
            span,
            key,
            format!(
                "is {mib}; allowed: 0 (derived from the machine's memory) or {MIN_BUDGET_MIB} to {} MiB",
                1 << 20
            ),
        );
    }
    Ok((mib << 20, None))
}

/// A quarter of the memory this process may use, clamped to [`DEFAULT_BUDGET_RANGE`]. A
/// quarter, because the rest is needed too: libtorch and the model's weights and
/// activations, the batch slots, the mapped input files (page cache), the other stages'
/// buffers, and whatever else shares the machine or container.
pub fn default_frame_budget(memory: Option<u64>) -> u64 {
    let (lo, hi) = DEFAULT_BUDGET_RANGE;
    memory.map_or(DEFAULT_BUDGET_UNKNOWN, |m| (m / 4).clamp(lo, hi))
}

/// The memory this process may use: `MemTotal`, or a lower cgroup limit on its cgroup or
/// any ancestor (v2 `memory.max`, v1 `memory.limit_in_bytes`). `None` when none is known.
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_total(&t));
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limit = cgroup_limit(Path::new("/sys/fs/cgroup"), &cgroups);
    [total, limit].into_iter().flatten().min()
}

/// `MemTotal` from `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The lowest memory limit on the cgroups listed in `/proc/self/cgroup` text, read under
/// `root` (the cgroup mount). Each level from the process's own cgroup up to the root is
/// read, since a limit on a parent (a systemd slice) binds too; in a container with its
/// own cgroup namespace the listed path is `/` and the mount root is the container's.
fn cgroup_limit(root: &Path, cgroups: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (dir, file) = if id == "0" && ctrl.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if ctrl.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let rel = Path::new(path.trim_start_matches('/'));
        for level in rel.ancestors() {
            let text = std::fs::read_to_string(dir.join(level).join(file)).unwrap_or_default();
            if let Some(v) = parse_limit(&text) {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
        }
    }
    best
}

/// A cgroup limit file's value; `None` for "max" (v2) or none at all. v1 writes "no
/// limit" as a number near `i64::MAX`, which `min` then ignores against `MemTotal`.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn frame_budget_configured_default_and_errors() {
        let c = parse("[decode]\nframe_budget_mib = 2048\n").unwrap();
        assert_eq!(c.decode.frame_budget_bytes, 2048 << 20);
        assert_eq!(c.decode.frame_budget_from_memory, None);
        for text in ["", "[decode]\nframe_budget_mib = 0\n"] {
            let c = parse(text).unwrap();
            let m = memory_limit();
            assert_eq!(c.decode.frame_budget_from_memory, m);
            assert_eq!(c.decode.frame_budget_bytes, default_frame_budget(m));
        }
        for bad in ["-1", "8", "2000000"] {
            let e = parse(&format!(
                "[decode]\nmax_width = 100\nframe_budget_mib = {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("line 3") && e.contains("decode.frame_budget_mib"),
                "{e}"
            );
            assert!(e.contains(&format!("is {bad}")), "{e}");
        }
    }

    #[test]
    fn alpha_keep_gives_four_channels_and_refuses_what_cannot_take_them() {
        let c = parse("").unwrap();
        assert_eq!(
            (c.decode.background, c.preprocess.channels),
            (Some([255; 3]), 3)
        );
        let c = parse("[preprocess]\npad_color = [1, 2, 3]\n[decode]\nalpha = \"pad_color\"\n")
            .unwrap();
        assert_eq!(c.decode.background, Some([1, 2, 3]));
        let c = parse("[decode]\nalpha = \"keep\"\n[encode]\nformat = \"png\"\n").unwrap();
        assert_eq!((c.decode.background, c.preprocess.channels), (None, 4));
        let e = parse("[decode]\nalpha = \"keep\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("decode.alpha") && e.contains("JPEG cannot carry"),
            "{e}"
        );
        let e = parse("[face_crop]\n[decode]\nalpha = \"keep\"\n[encode]\nformat = \"png\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[face_crop] cannot take"), "{e}");
        let e = parse("[decode]\nalpha = \"clear\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"keep\""), "the choices are listed: {e}");
    }

    #[test]
    fn default_is_a_quarter_of_memory_clamped() {
        assert_eq!(default_frame_budget(Some(8 << 30)), 2 << 30);
        assert_eq!(default_frame_budget(Some(512 << 20)), 256 << 20);
        assert_eq!(default_frame_budget(Some(256 << 30)), 4 << 30);
        assert_eq!(default_frame_budget(None), 1 << 30);
    }

    #[test]
    fn memory_from_meminfo_and_cgroups() {
        assert_eq!(
            mem_total("MemTotal:       24683788 kB\nMemFree: 1 kB\n"),
            Some(24683788 * 1024)
        );
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // v2: a limit on the slice binds its service; "max" is no limit.
        let svc = root.join("system.slice/hotpipe.service");
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(root.join("system.slice/memory.max"), "2147483648\n").unwrap();
        std::fs::write(svc.join("memory.max"), "max\n").unwrap();
        let v2 = "0::/system.slice/hotpipe.service\n";
        assert_eq!(cgroup_limit(root, v2), Some(2 << 30));
        // v1, the memory controller's own hierarchy.
        let v1 = root.join("memory/docker/abc");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        std::fs::write(
            root.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_limit(root, "4:memory:/docker/abc\n1:cpu:/\n"),
            Some(1 << 30)
        );
        assert_eq!(cgroup_limit(root, "1:cpu:/\n"), None);
    }
}
