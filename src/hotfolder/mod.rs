//! The hot folder: the folder protocol behind `hotpipe run`, and the only code that
//! renames files.
//!
//! ```text
//! inbox/x ──claim──► work/x ──publish──► outbox/<stem>.<ext>, then work/x ──► done/x
//!                       └──(cannot be processed)──► failed/x + failed/x.error.json
//! ```
//! - [`watch`]: notify watcher (or polling, or none) that only nudges a scan;
//! - [`claim`]: the inbox scan, readiness (settle) and the claim by rename;
//! - [`folders`]: folders dropped into the inbox, emptied into it once settled;
//! - [`state`]: the durable per-item journal in `work/` (crashes blamed, outputs being published);
//! - [`sink`]: publication into `outbox/`, the final move to `done/`, quarantine in `failed/`;
//! - [`recover`]: what start-up (and every retry) does with an item found in `work/`;
//! - [`params`]: parameters files (`<stem>.json`) that travel with their images;
//! - [`publish`]: atomic, never-replacing file writes.
//!
//! Every step is a rename or a write to a temporary name followed by a rename, and every
//! decision that must survive a crash is recorded in the item's state file before the
//! step it guards, so the process may be killed at any instruction.

pub mod claim;
pub mod folders;
pub mod params;
pub mod publish;
pub mod recover;
pub mod sink;
pub mod state;
pub mod watch;

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Something that stops the hot folder from working at all (as opposed to one item).
#[derive(Debug, thiserror::Error)]
pub enum HotfolderError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "{a} and {b} are on different filesystems; all hot-folder folders must share one (renames between them must be atomic)"
    )]
    CrossDevice { a: PathBuf, b: PathBuf },
    #[error("another hotpipe already runs on {0} (it holds the lock file)")]
    Locked(PathBuf),
    #[error("cannot watch {path}: {message}")]
    Watch { path: PathBuf, message: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HotfolderError {
    let context = context.into();
    move |source| HotfolderError::Io { context, source }
}

/// The five folders under the root.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub inbox: PathBuf,
    pub work: PathBuf,
    pub outbox: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            inbox: root.join("inbox"),
            work: root.join("work"),
            outbox: root.join("outbox"),
            done: root.join("done"),
            failed: root.join("failed"),
        }
    }

    /// Create what is missing (`work/` private: mode 0700) and check that every folder
    /// is a real directory on the root's filesystem.
    pub fn prepare(&self) -> Result<(), HotfolderError> {
        std::fs::create_dir_all(&self.root)
            .map_err(io_err(format!("cannot create {}", self.root.display())))?;
        let root_dev = std::fs::metadata(&self.root)
            .map_err(io_err(format!("cannot stat {}", self.root.display())))?
            .dev();
        for dir in [
            &self.inbox,
            &self.work,
            &self.outbox,
            &self.done,
            &self.failed,
        ] {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
            }
            let meta =
                std::fs::metadata(dir).map_err(io_err(format!("cannot stat {}", dir.display())))?;
            if !meta.is_dir() {
                return Err(HotfolderError::Io {
                    context: format!("{} is not a directory", dir.display()),
                    source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
                });
            }
            if meta.dev() != root_dev {
                return Err(HotfolderError::CrossDevice {
                    a: self.root.clone(),
                    b: dir.clone(),
                });
            }
        }
        std::fs::set_permissions(&self.work, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("cannot chmod {}", self.work.display())))?;
        Ok(())
    }

    /// Take the root's lock: two daemons on one folder would each think the other's
    /// `work/` items were left by a crash and process them twice.
    pub fn lock(&self) -> Result<RootLock, HotfolderError> {
        let path = self.root.join(".hotpipe.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        // flock(LOCK_EX | LOCK_NB) on Linux: held by the open file, so it ends with the
        // process however that dies, and a second open (even in this process) is refused.
        match f.try_lock() {
            Ok(()) => Ok(RootLock(f)),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(HotfolderError::Locked(self.root.clone()))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(io_err(format!("cannot lock {}", path.display()))(e))
            }
        }
    }
}

impl Layout {
    /// How many items are in `work/` (its hidden files, the journal, are not items).
    pub fn items_in_work(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.work)? {
            n += usize::from(!e?.file_name().to_string_lossy().starts_with('.'));
        }
        Ok(n)
    }
}

/// Held while a daemon works on a root; released when dropped (or the process dies).
pub struct RootLock(#[allow(dead_code)] File);

/// Split a file name into (stem, extension) for suffixing (`x.jpg` -> `x`, `jpg`).
/// Names that are not UTF-8 are converted lossily (the result only names a new file).
pub fn split_name(name: &std::ffi::OsStr) -> (String, String) {
    let s = name.to_string_lossy();
    match s.rfind('.') {
        Some(i) if i > 0 => (s[..i].to_string(), s[i + 1..].to_string()),
        _ => (s.into_owned(), String::new()),
    }
}

/// `2026-11-26T11:28:39Z` for a Unix time (sidecars; no date crate for one line).
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_names() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(
            split_name(std::ffi::OsStr::new("a.b.jpg")),
            ("a.b".into(), "jpg".into())
        );
        assert_eq!(
            split_name(std::ffi::OsStr::new("noext")),
            ("noext".into(), String::new())
        );
    }

    #[test]
    fn layout_is_created_private_and_locked() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(&d.path().join("hf"));
        l.prepare().unwrap();
        let mode = std::fs::metadata(&l.work).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let _held = l.lock().unwrap();
        assert!(matches!(l.lock(), Err(HotfolderError::Locked(_))));
    }
}
