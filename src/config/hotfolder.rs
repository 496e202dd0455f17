//! `[hotfolder]`: the daemon's folder root, how it finds new files, and its timing
//! (settle, rescan, retries, shutdown grace, stuck detection). `hotpipe run` needs it;
//! `hotpipe process` does not.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHotfolder {
    root: Option<Spanned<String>>,
    rescan_s: Option<Spanned<i64>>,
    settle_ms: Option<Spanned<i64>>,
    max_attempts: Option<Spanned<i64>>,
    watcher: Option<Spanned<String>>,
    poll_ms: Option<Spanned<i64>>,
    on_success: Option<Spanned<String>>,
    shutdown_grace_s: Option<Spanned<i64>>,
    retry_s: Option<Spanned<i64>>,
    stuck_s: Option<Spanned<i64>>,
}

/// How the daemon learns about new files in `inbox/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatcherKind {
    /// inotify (local filesystems): events nudge a scan at once.
    Inotify,
    /// Periodic polling every `poll_ms` (NFS/SMB, where inotify sees nothing).
    Poll,
    /// No watcher: only the periodic full rescan finds files (and a test of lost events).
    None,
}

/// What happens to an input after its output is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    Move,
    Delete,
}

/// The validated `[hotfolder]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct HotfolderConfig {
    /// Holds inbox/, work/, outbox/, done/, failed/ (one filesystem).
    pub root: PathBuf,
    pub rescan_s: u64,
    pub settle_ms: u64,
    pub max_attempts: u32,
    pub watcher: WatcherKind,
    pub poll_ms: u64,
    pub on_success: OnSuccess,
    pub shutdown_grace_s: u64,
    /// Delay before an item that failed transiently (outbox full, unwritable) is retried.
    pub retry_s: u64,
    /// Items in flight but no stage progress for this long: unhealthy (503, no watchdog).
    pub stuck_s: u64,
}

pub(super) fn validate(cx: &Ctx, h: &RawHotfolder) -> Result<HotfolderConfig, ConfigError> {
    // A missing key has no span; line 1 points at the file.
    let Some(root) = &h.root else {
        return Err(ConfigError::Invalid {
            path: cx.path.to_string(),
            line: 1,
            key: "hotfolder.root".into(),
            message: "is required in [hotfolder] (the folder holding inbox/, work/, outbox/, done/, failed/)".into(),
        });
    };
    if root.get_ref().trim().is_empty() {
        return cx.err(root.span(), "hotfolder.root", "is empty; give a folder");
    }
    Ok(HotfolderConfig {
        root: cx.resolve(root.get_ref()),
        rescan_s: cx.int_in(&h.rescan_s, "hotfolder.rescan_s", 1, 86_400, 30u64)?,
        settle_ms: cx.int_in(&h.settle_ms, "hotfolder.settle_ms", 0, 600_000, 1000u64)?,
        max_attempts: cx.int_in(&h.max_attempts, "hotfolder.max_attempts", 1, 100, 3u32)?,
        watcher: cx.choice(
            &h.watcher,
            "hotfolder.watcher",
            &[
                ("inotify", WatcherKind::Inotify),
                ("poll", WatcherKind::Poll),
                ("none", WatcherKind::None),
            ],
            WatcherKind::Inotify,
        )?,
        poll_ms: cx.int_in(&h.poll_ms, "hotfolder.poll_ms", 10, 600_000, 2000u64)?,
        on_success: cx.choice(
            &h.on_success,
            "hotfolder.on_success",
            &[("move", OnSuccess::Move), ("delete", OnSuccess::Delete)],
            OnSuccess::Move,
        )?,
        shutdown_grace_s: cx.int_in(
            &h.shutdown_grace_s,
            "hotfolder.shutdown_grace_s",
            0,
            3600,
            10u64,
        )?,
        retry_s: cx.int_in(&h.retry_s, "hotfolder.retry_s", 0, 86_400, 10u64)?,
        stuck_s: cx.int_in(&h.stuck_s, "hotfolder.stuck_s", 1, 86_400, 60u64)?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn hotfolder_defaults_and_errors() {
        let c = parse(
            "[hotfolder]\nroot = \"hf\"\nwatcher = \"poll\"\n\n[metrics]\nlisten = \"off\"\n",
        )
        .unwrap();
        let h = c.hotfolder.unwrap();
        assert_eq!(h.root, Path::new("/base/hf"));
        assert_eq!(h.watcher, WatcherKind::Poll);
        assert_eq!((h.settle_ms, h.max_attempts, h.rescan_s), (1000, 3, 30));
        let e = parse("[hotfolder]\nroot = \"x\"\nsettle = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("settle_ms"), "{e}");
        let e = parse("[hotfolder]\nroot = \"x\"\non_success = \"keep\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("hotfolder.on_success"),
            "{e}"
        );
        assert!(
            parse("[hotfolder]\nrescan_s = 3\n")
                .unwrap_err()
                .to_string()
                .contains("hotfolder.root")
        );
    }
}
