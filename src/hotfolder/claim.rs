//! The inbox scan: which entries are ready, and the claim (a rename into `work/`).
//!
//! The directory listing is the truth; watcher events only say "look again". A file is
//! ready once it has not changed for `settle_ms`: either its mtime is already that old
//! when first seen (a file present at start-up, or delivered by rename after being
//! written elsewhere, is claimed at once) or its size and mtime stayed the same across
//! that long (a producer writing in chunks keeps moving its mtime, so it is never read
//! early), and, with inotify, its writer has closed it ([`super::watch::Writers`]: a
//! writer that pauses longer than `settle_ms` would otherwise lose its file). Names
//! starting with `.` or ending in `.part`, `.tmp`, `.crdownload` are
//! ignored until renamed. A folder settles the same way, by its whole tree, and is then
//! emptied into the inbox ([`super::folders`]). Other entries that are not regular files
//! are "ready" at once: they are claimed (a rename moves a symlink itself and never opens
//! a FIFO) and quarantined by [`super::recover::begin`].

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant, SystemTime};

use super::Layout;
use super::publish::rename_noreplace;
use super::state;
use super::watch::Writers;
use crate::vocab::item::{Item, SourceStat};

/// Names a producer is still writing, by the usual conventions.
pub fn ignored(name: &OsStr) -> bool {
    let s = name.to_string_lossy();
    s.starts_with('.') || s.ends_with(".part") || s.ends_with(".tmp") || s.ends_with(".crdownload")
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    size: u64,
    mtime: Option<SystemTime>,
    /// 1 for a file; for a folder, the entries in its tree (`size` is their bytes and
    /// `mtime` the newest).
    entries: u64,
    since: Instant,
}

impl Seen {
    fn folder(t: super::folders::TreeStat, now: Instant) -> Seen {
        Seen {
            size: t.bytes,
            mtime: t.newest,
            entries: t.entries,
            since: now,
        }
    }
}

/// Settle bookkeeping across scans.
pub struct Scanner {
    settle: Duration,
    pending: HashMap<OsString, Seen>,
    /// Files found ready and not claimed since (a parameters file waiting for its image,
    /// an image waiting for its parameters file): ready again while unchanged. Without
    /// this, a file whose mtime is in the future (a producer's clock ahead) is ready only
    /// every other scan, and an image and its parameters file could alternate forever.
    settled: HashMap<OsString, Seen>,
    writers: Option<Writers>,
}

/// The outcome of a claim.
#[derive(Debug, PartialEq)]
pub enum Claim {
    Claimed,
    /// Gone from the inbox (another consumer, or the producer took it back): not an error.
    Lost,
    /// `work/` already holds an item of that name: claim it once that one is finished.
    Busy,
}

impl Scanner {
    /// `writers`: the inbox's open writers, when the watcher can tell (inotify).
    pub fn new(settle: Duration, writers: Option<Writers>) -> Scanner {
        Scanner {
            settle,
            pending: HashMap::new(),
            settled: HashMap::new(),
            writers,
        }
    }

    /// When the earliest pending file could become ready (for the scan loop's timeout).
    pub fn next_check(&self) -> Option<Instant> {
        self.pending.values().map(|s| s.since + self.settle).min()
    }

    /// List the inbox and return the entries ready to claim, sorted by name. Settled
    /// folders are emptied into the inbox first, so their files are listed too.
    pub fn scan(&mut self, layout: &Layout) -> std::io::Result<Vec<OsString>> {
        let (ready, folders) = self.list(layout)?;
        let mut moved = 0;
        for name in &folders {
            match super::folders::empty_into_inbox(layout, name) {
                Ok((n, true)) => {
                    moved += n;
                    tracing::info!(folder = ?name, files = n, "folder emptied into the inbox");
                }
                Ok((n, false)) => {
                    moved += n;
                    tracing::warn!(folder = ?name, files = n, "folder emptied into the inbox but for what is not a regular file (links, names still being written); it stays");
                    // Left alone until it changes again.
                    if let Ok(t) = super::folders::tree_stat(&layout.inbox.join(name)) {
                        self.settled
                            .insert(name.clone(), Seen::folder(t, Instant::now()));
                    }
                }
                Err(e) => tracing::error!(folder = ?name, error = %e, "cannot empty the folder"),
            }
        }
        if moved == 0 {
            return Ok(ready);
        }
        Ok(self.list(layout)?.0)
    }

    /// One listing: the entries ready to claim, and the folders that have settled.
    fn list(&mut self, layout: &Layout) -> std::io::Result<(Vec<OsString>, Vec<OsString>)> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut ready = Vec::new();
        let mut folders = Vec::new();
        let mut present = HashMap::new();
        let mut settled = HashMap::new();
        for e in std::fs::read_dir(&layout.inbox)? {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            if ignored(&name) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let seen = if meta.is_dir() {
                let Ok(t) = super::folders::tree_stat(&e.path()) else {
                    continue;
                };
                Seen::folder(t, now)
            } else if meta.is_file() {
                Seen {
                    size: meta.len(),
                    mtime: meta.modified().ok(),
                    entries: 1,
                    since: now,
                }
            } else {
                ready.push(name);
                continue;
            };
            let old_enough = seen
                .mtime
                .and_then(|m| wall.duration_since(m).ok())
                .is_some_and(|age| age >= self.settle);
            let unchanged = |p: &Seen| {
                p.size == seen.size && p.mtime == seen.mtime && p.entries == seen.entries
            };
            let was_ready = self.settled.get(&name).is_some_and(unchanged);
            let stable = match self.pending.get(&name) {
                Some(p) if unchanged(p) => {
                    present.insert(name.clone(), *p);
                    now.duration_since(p.since) >= self.settle
                }
                _ => {
                    present.insert(name.clone(), seen);
                    false
                }
            };
            if self
                .writers
                .as_ref()
                .is_some_and(|w| w.is_open(&name, seen.size))
            {
                // Settled or not, it is not finished: look again a settle time after now
                // (its writer's close also nudges a scan).
                present.insert(name, seen);
            } else if meta.is_dir() && was_ready {
                // Emptied already, with leftovers: nothing new to do.
                present.remove(&name);
                settled.insert(name, seen);
            } else if meta.is_dir() && (old_enough || stable) {
                present.remove(&name);
                folders.push(name);
            } else if old_enough || stable || was_ready {
                present.remove(&name);
                settled.insert(name.clone(), seen);
                ready.push(name);
            }
        }
        self.pending = present;
        self.settled = settled;
        ready.sort();
        Ok((ready, folders))
    }
}

/// Move `inbox/name` to `work/name` without replacing anything.
pub fn claim(layout: &Layout, name: &OsStr) -> std::io::Result<Claim> {
    match rename_noreplace(&layout.inbox.join(name), &layout.work.join(name)) {
        Ok(()) => Ok(Claim::Claimed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Claim::Lost),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Claim::Busy),
        Err(e) => Err(e),
    }
}

/// True when the item's file in `work/` is no longer what the read stage read (its
/// writer was still writing when it was claimed): its result must not be trusted.
pub fn changed_since_read(item: &Item) -> bool {
    match (&item.source, std::fs::symlink_metadata(&item.path)) {
        (Some(seen), Ok(now)) => *seen != SourceStat::of(&now),
        _ => false,
    }
}

/// Put `work/name` back into the inbox to settle again (a file that changed after its
/// claim), dropping its state. `AlreadyExists`: a new file of that name arrived meanwhile;
/// the caller retries later. Its claimed parameters file goes back first, as `<stem>.json`
/// (a kill between the two renames leaves the image in `work/` and its JSON in the inbox,
/// which recovery handles as after a fresh claim).
pub fn unclaim(layout: &Layout, name: &OsStr) -> std::io::Result<()> {
    let params = super::params::claimed_path(layout, name);
    if std::fs::symlink_metadata(&params).is_ok() {
        let [json, _] = super::params::companions(name);
        rename_noreplace(&params, &layout.inbox.join(json))?;
    }
    rename_noreplace(&layout.work.join(name), &layout.inbox.join(name))?;
    state::remove(&layout.work, name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignores_partial_names() {
        for n in [".x.jpg", "x.jpg.part", "x.tmp", "x.crdownload"] {
            assert!(ignored(OsStr::new(n)), "{n}");
        }
        assert!(!ignored(OsStr::new("x.jpg")));
    }

    #[test]
    fn fresh_file_waits_old_file_is_ready() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        std::fs::write(l.inbox.join("new.jpg"), b"1").unwrap();
        let old = l.inbox.join("old.jpg");
        std::fs::write(&old, b"1").unwrap();
        let f = std::fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        let mut s = Scanner::new(Duration::from_millis(300), None);
        assert_eq!(s.scan(&l).unwrap(), vec![OsString::from("old.jpg")]);
        assert_eq!(claim(&l, OsStr::new("old.jpg")).unwrap(), Claim::Claimed);
        assert!(s.next_check().is_some());
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(s.scan(&l).unwrap(), vec![OsString::from("new.jpg")]);
        assert_eq!(claim(&l, OsStr::new("new.jpg")).unwrap(), Claim::Claimed);
        assert_eq!(claim(&l, OsStr::new("new.jpg")).unwrap(), Claim::Lost);
        std::fs::write(l.inbox.join("old2.jpg"), b"1").unwrap();
        std::fs::write(l.work.join("old2.jpg"), b"1").unwrap();
        assert_eq!(claim(&l, OsStr::new("old2.jpg")).unwrap(), Claim::Busy);
    }

    /// A file from a producer whose clock is ahead: once settled it stays ready on every
    /// later scan while unchanged (it was ready only every other scan, so an image and
    /// its parameters file could take turns and never be ready together).
    #[test]
    fn a_settled_file_stays_ready_even_with_a_future_mtime() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        let p = l.inbox.join("ahead.json");
        std::fs::write(&p, b"{}").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        let mut s = Scanner::new(Duration::from_millis(100), None);
        assert!(s.scan(&l).unwrap().is_empty(), "not settled yet");
        std::thread::sleep(Duration::from_millis(150));
        for scan in 0..3 {
            assert_eq!(
                s.scan(&l).unwrap(),
                vec![OsString::from("ahead.json")],
                "scan {scan}"
            );
        }
        // Changed: it settles again.
        std::fs::write(&p, b"{\"a\": 1}").unwrap();
        assert!(s.scan(&l).unwrap().is_empty());
    }

    /// A folder being filled is not ready (it was claimed and failed at once, while
    /// `cp -r` was still copying); once its tree is unchanged for the settle time its
    /// files are in the inbox, ready, and the folder is gone.
    #[test]
    fn a_folder_waits_for_its_tree_to_settle_then_its_files_are_ready() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        let dir = l.inbox.join("batch");
        std::fs::create_dir(&dir).unwrap();
        let mut s = Scanner::new(Duration::from_millis(300), None);
        for name in ["a.jpg", "b.jpg", "c.jpg"] {
            std::fs::write(dir.join(name), b"1").unwrap();
            assert!(s.scan(&l).unwrap().is_empty(), "still being filled");
            std::thread::sleep(Duration::from_millis(150));
        }
        assert!(s.scan(&l).unwrap().is_empty(), "not settled yet");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(s.scan(&l).unwrap(), ["a.jpg", "b.jpg", "c.jpg"]);
        assert!(!dir.exists());
    }

    #[test]
    fn unclaim_takes_the_parameters_file_back_too() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        std::fs::write(l.inbox.join("a.png"), b"1").unwrap();
        std::fs::write(l.inbox.join("a.json"), b"{}").unwrap();
        assert_eq!(claim(&l, OsStr::new("a.png")).unwrap(), Claim::Claimed);
        assert_eq!(
            super::super::params::claim(&l, OsStr::new("a.png")).unwrap(),
            super::super::params::Claimed::File
        );
        assert!(!l.inbox.join("a.json").exists());
        unclaim(&l, OsStr::new("a.png")).unwrap();
        assert!(l.inbox.join("a.png").exists() && l.inbox.join("a.json").exists());
        assert_eq!(
            std::fs::read_dir(&l.work).unwrap().count(),
            0,
            "nothing left in work/"
        );
    }
}
