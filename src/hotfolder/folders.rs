//! Folders dropped into the inbox: users copy a whole folder of photos in, so a folder is
//! waited for like a file (its whole tree unchanged for `settle_ms`) and then emptied
//! into the inbox, where each file is an ordinary drop.
//!
//! A folder is not claimed as it arrives: `cp -r` creates it first and fills it after,
//! and a folder claimed at once (the old rule for anything not a regular file) failed
//! while its files were still being copied. Its files keep their names (`-N` when the
//! inbox already has one, the same `N` for every file of a stem, so `a.json` still pairs
//! with `a.jpg`), parameters files first, as the protocol asks. Subfolders are emptied
//! too. What is left (symbolic links, names still being written, anything but a regular
//! file) stays in the folder, which stays in the inbox and is logged; an emptied folder
//! is removed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Layout;
use super::claim::ignored;
use super::params::is_params_file;
use super::publish::{candidate_name, rename_noreplace};
use super::split_name;

/// Deeper than this, a tree is not walked (a folder of folders of photos is two).
const MAX_DEPTH: usize = 16;

/// What a folder's tree looks like now: it has settled when this stays the same.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TreeStat {
    pub entries: u64,
    pub bytes: u64,
    /// The newest mtime in it, folders included (a file added moves its folder's).
    pub newest: Option<SystemTime>,
}

/// The tree under `dir`, down to [`MAX_DEPTH`].
pub fn tree_stat(dir: &Path) -> std::io::Result<TreeStat> {
    let mut st = TreeStat {
        newest: std::fs::symlink_metadata(dir)?.modified().ok(),
        ..TreeStat::default()
    };
    walk(dir, 0, &mut |_, meta| {
        st.entries += 1;
        if meta.is_file() {
            st.bytes += meta.len();
        }
        st.newest = st.newest.max(meta.modified().ok());
    })?;
    Ok(st)
}

/// Visit every entry under `dir` (not following links), parents before children.
fn walk(
    dir: &Path,
    depth: usize,
    f: &mut impl FnMut(&Path, &std::fs::Metadata),
) -> std::io::Result<()> {
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        f(&e.path(), &meta);
        if meta.is_dir() {
            walk(&e.path(), depth + 1, f)?;
        }
    }
    Ok(())
}

/// Empty the settled folder `inbox/<name>` into the inbox (see the module docs); how many
/// files were moved, and whether the folder is gone.
pub fn empty_into_inbox(layout: &Layout, name: &OsString) -> std::io::Result<(usize, bool)> {
    let top = layout.inbox.join(name);
    let mut dirs = vec![top.clone()];
    let mut moved = 0;
    walk(&top, 0, &mut |p, meta| {
        if meta.is_dir() {
            dirs.push(p.to_path_buf());
        }
    })?;
    for dir in &dirs {
        moved += empty_one(layout, dir)?;
    }
    // Deepest first, so each is empty when its turn comes; a folder still holding
    // something is kept (remove_dir refuses it).
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in &dirs {
        let _ = std::fs::remove_dir(dir);
    }
    Ok((moved, !top.exists()))
}

/// Move the regular files directly in `dir` into the inbox, a stem's files under one
/// suffix, parameters files first.
fn empty_one(layout: &Layout, dir: &Path) -> std::io::Result<usize> {
    let mut stems: BTreeMap<String, Vec<(OsString, String)>> = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if ignored(&name) || !e.file_type()?.is_file() {
            continue;
        }
        let (stem, ext) = split_name(&name);
        stems.entry(stem).or_default().push((name, ext));
    }
    let mut moved = 0;
    for (stem, mut files) in stems {
        files.sort_by_key(|(n, _)| !is_params_file(n));
        moved += move_group(layout, dir, &stem, &files)?;
    }
    Ok(moved)
}

/// Move one stem's files under the first suffix free for all of them; a name taken in
/// between (a producer dropping the same name) moves on to the next suffix.
fn move_group(
    layout: &Layout,
    dir: &Path,
    stem: &str,
    files: &[(OsString, String)],
) -> std::io::Result<usize> {
    let target = |n: u32, ext: &str| -> PathBuf { layout.inbox.join(candidate_name(stem, ext, n)) };
    let mut done = 0;
    for n in 0..100_000u32 {
        if files[done..]
            .iter()
            .any(|(_, ext)| std::fs::symlink_metadata(target(n, ext)).is_ok())
        {
            continue;
        }
        while let Some((name, ext)) = files.get(done) {
            match rename_noreplace(&dir.join(name), &target(n, ext)) {
                Ok(()) => done += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                Err(e) => return Err(e),
            }
        }
        if done == files.len() {
            return Ok(done);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_emptied_into_the_inbox_pairs_kept_leftovers_kept() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        let top = l.inbox.join("batch");
        std::fs::create_dir_all(top.join("more")).unwrap();
        for (p, b) in [
            ("batch/a.jpg", "A"),
            ("batch/a.json", "{}"),
            ("batch/more/b.png", "B"),
            ("batch/.c.jpg.part", "C"),
        ] {
            std::fs::write(l.inbox.join(p), b).unwrap();
        }
        // The inbox already has an a.jpg: the pair moves together to a-1.*.
        std::fs::write(l.inbox.join("a.jpg"), "old").unwrap();
        let before = tree_stat(&top).unwrap();
        assert_eq!((before.entries, before.bytes), (5, 5), "{before:?}");
        let (moved, gone) = empty_into_inbox(&l, &"batch".into()).unwrap();
        assert_eq!((moved, gone), (3, false));
        let read = |n: &str| std::fs::read_to_string(l.inbox.join(n)).unwrap();
        assert_eq!(
            (
                read("a.jpg"),
                read("a-1.jpg"),
                read("a-1.json"),
                read("b.png")
            ),
            ("old".into(), "A".into(), "{}".into(), "B".into())
        );
        // Still being written: stays, and so does its folder; the emptied one is gone.
        assert!(top.join(".c.jpg.part").exists());
        assert!(!top.join("more").exists());
        std::fs::remove_file(top.join(".c.jpg.part")).unwrap();
        assert_eq!(empty_into_inbox(&l, &"batch".into()).unwrap(), (0, true));
    }
}
