//! The durable per-item journal: one small JSON file per item in `work/`, named from a
//! hash of the item's name (`.hp-state-<hash>.json`, hidden so it is never mistaken for
//! an input).
//!
//! It holds what a crash must not forget: how many crashes of the process were blamed on
//! the item (so a file that kills the process is quarantined after `max_attempts` instead
//! of crash-looping the service; see [`super::recover`] for who is blamed), which outputs an attempt is publishing (file name and inode, recorded
//! *before* the rename that makes each visible, so recovery can tell "published" from
//! "not yet" and never publishes twice), and the name an item is being quarantined
//! under. Every save is write-temp then rename (atomic); the saves a power cut must not lose
//! also fsync the file and `work/` (see [`save`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vocab::crash;

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
    /// Crashes blamed on the item (the sidecar's `crashes`).
    #[serde(alias = "attempts")]
    pub crashes: u32,
    pub time: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ItemState {
    /// The item's name in `work/` (lossy for names that are not UTF-8; for people).
    pub name: String,
    /// Crashes of hotpipe blamed on this item (a crash record named it alone). Read from
    /// `attempts` too, the name of an older, coarser count.
    #[serde(default, alias = "attempts")]
    pub crashes: u32,
    /// Named in a crash record: its next attempt runs alone, so that a crash during it
    /// names this item only.
    #[serde(default)]
    pub suspect: bool,
    /// The last crash blamed on it, for the quarantine reason (`SIGABRT in hp-decode-0`).
    #[serde(default)]
    pub last_crash: Option<String>,
    /// Outputs of the current attempt, in publication order.
    #[serde(default)]
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub failing: Option<Failing>,
    /// `[params]`: whether the item's first attempt took a parameters file (`Some(true)`)
    /// or ran without one (`Some(false)`). Decided once, so a retry or a resumed attempt
    /// never takes a `<stem>.json` that arrived later, for another drop of the same name.
    #[serde(default)]
    pub params_file: Option<bool>,
    /// The suffix its move to `done/` chose (0: none), recorded before its parameters
    /// file moves there, so that an image finished again after a kill between the two
    /// renames takes the name that pairs with it.
    #[serde(default)]
    pub done_suffix: Option<u32>,
    /// Cluster mode: the item's id on the server, recorded (durably) before anything about
    /// the item leaves the host, and kept for its life in `work/`: a resumed attempt is
    /// the same item to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

/// The state file of the item called `name` in `work` (named by the item's crash-record
/// key, so a record's keys are also state file names).
pub fn path(work: &Path, name: &OsStr) -> PathBuf {
    work.join(format!("{STATE_PREFIX}{:016x}.json", crash::key(name)))
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

/// The item's cluster id: the recorded one, else a new one (128 random bits, hex),
/// recorded durably before it is returned.
pub fn cluster_id(work: &Path, name: &OsStr) -> std::io::Result<String> {
    let mut st = load(work, name)?.unwrap_or_default();
    if let Some(id) = &st.cluster_id {
        return Ok(id.clone());
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    st.name = name.to_string_lossy().into_owned();
    st.cluster_id = Some(id.clone());
    save(work, name, &st, true)?;
    Ok(id)
}

/// The cluster ids recorded in `work/`'s journal: the items the server's entries may
/// belong to. An unreadable `work/` gives no ids, and then the sweep removes nothing
/// (see [`crate::cluster::Cluster::sweep`]): it is given every id it may not remove.
pub fn cluster_ids(work: &Path) -> Option<HashSet<String>> {
    let mut ids = HashSet::new();
    for e in std::fs::read_dir(work).ok()? {
        let e = e.ok()?;
        if !e.file_name().to_string_lossy().starts_with(STATE_PREFIX) {
            continue;
        }
        if let Some(st) = load_path(&e.path()).ok()? {
            ids.extend(st.cluster_id);
        }
    }
    Some(ids)
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
            crashes: 2,
            suspect: true,
            last_crash: Some("SIGABRT in hp-decode-0".into()),
            outputs: vec![Output {
                file: "a.jpg".into(),
                ino: 7,
            }],
            failing: None,
            params_file: Some(true),
            done_suffix: None,
            cluster_id: None,
        };
        save(d.path(), name, &st, true).unwrap();
        assert_eq!(load(d.path(), name).unwrap().unwrap(), st);
        remove(d.path(), name);
        assert!(load(d.path(), name).unwrap().is_none());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_cluster_id_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (OsStr::new("a.jpg"), OsStr::new("b.jpg"));
        let id = cluster_id(d.path(), a).unwrap();
        assert_eq!(id.len(), 32, "{id}");
        assert_eq!(cluster_id(d.path(), a).unwrap(), id);
        assert_eq!(
            load(d.path(), a).unwrap().unwrap().cluster_id,
            Some(id.clone())
        );
        assert_ne!(cluster_id(d.path(), b).unwrap(), id);
    }
}
