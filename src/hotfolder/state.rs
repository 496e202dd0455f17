//! The durable per-item journal: one small JSON file per item in `work/`, named from a
//! hash of the item's name (`.hp-state-<hash>.json`, hidden so it is never mistaken for
//! an input).
//!
//! It holds what a crash must not forget: how many attempts were started (so a file that
//! kills the process is quarantined after `max_attempts` instead of crash-looping the
//! service), which outputs an attempt is publishing (file name and inode, recorded
//! *before* the rename that makes each visible, so recovery can tell "published" from
//! "not yet" and never publishes twice), and the name an item is being quarantined
//! under. Every save is write-temp then rename (atomic); the saves a power cut must not lose
//! also fsync the file and `work/` (see [`save`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of state files in `work/`.
pub const STATE_PREFIX: &str = ".hp-state-";

/// One output this item published or is about to publish.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Output {
    /// File name in `outbox/`.
    pub file: String,
    /// Inode of the file written: a file of that name with another inode is not ours.
    pub ino: u64,
}

/// Recorded before an item is moved to `failed/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failing {
    /// Its name in `failed/` (the sidecar is `<as_name>.error.json`).
    pub as_name: String,
    pub reason: String,
    pub stage: String,
    pub attempts: u32,
    pub time: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ItemState {
    /// The item's name in `work/` (lossy for names that are not UTF-8; for people).
    pub name: String,
    /// Attempts started (counted before each one begins).
    pub attempts: u32,
    /// Outputs of the current attempt, in publication order.
    #[serde(default)]
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub failing: Option<Failing>,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The state file of the item called `name` in `work`.
pub fn path(work: &Path, name: &OsStr) -> PathBuf {
    work.join(format!("{STATE_PREFIX}{:016x}.json", fnv(name.as_bytes())))
}

/// Read an item's state; `None` when it has none (or it is unreadable: a state file is
/// only ever replaced whole, so a damaged one means a disk problem; starting the count
/// again is the safe side).
pub fn load(work: &Path, name: &OsStr) -> std::io::Result<Option<ItemState>> {
    load_path(&path(work, name))
}

pub fn load_path(p: &Path) -> std::io::Result<Option<ItemState>> {
    match std::fs::read(p) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                tracing::warn!(file = ?p, error = %e, "unreadable item state ignored");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replace an item's state atomically; `durable` also fsyncs the file and `work/`.
///
/// Why not always durable: an fsync pair costs ~8 ms on a plain ext4 disk, on the
/// latency path. The attempt count guards against a file that crashes the *process*,
/// and a process crash loses nothing from the page cache, so counting an attempt needs
/// atomicity, not durability (a power cut may forget one count: one more attempt).
/// What a power cut must not forget is which output is being published (else the item
/// is published twice) and where an item is being quarantined: those saves are durable.
pub fn save(work: &Path, name: &OsStr, st: &ItemState, durable: bool) -> std::io::Result<()> {
    let p = path(work, name);
    let file = p.file_name().unwrap_or_default().to_string_lossy();
    let json = serde_json::to_vec(st).map_err(std::io::Error::other)?;
    super::publish::write_replace(work, &file, &json, durable)
}

/// Forget an item's state (after it left `work/`). Not synced: a state file that
/// survives a crash without its item is removed by the next start-up.
pub fn remove(work: &Path, name: &OsStr) {
    let _ = std::fs::remove_file(path(work, name));
}

/// True when `dir/file` exists and is the file with inode `ino`.
pub fn is_ours(dir: &Path, out: &Output) -> bool {
    std::fs::symlink_metadata(dir.join(&out.file)).is_ok_and(|m| m.ino() == out.ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        let name = OsStr::new("a b\nü.jpg");
        assert!(load(d.path(), name).unwrap().is_none());
        let st = ItemState {
            name: "a".into(),
            attempts: 2,
            outputs: vec![Output {
                file: "a.jpg".into(),
                ino: 7,
            }],
            failing: None,
        };
        save(d.path(), name, &st, true).unwrap();
        assert_eq!(load(d.path(), name).unwrap().unwrap(), st);
        remove(d.path(), name);
        assert!(load(d.path(), name).unwrap().is_none());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
