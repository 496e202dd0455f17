//! Publishing files: write to a temporary name in the target directory, fsync, rename to
//! the final name without replacing anything, fsync the directory.
//!
//! A reader of the output directory therefore sees either nothing or a complete file,
//! even across a crash or power loss, and an existing file is never overwritten: a name
//! that is taken gets a `-1`, `-2`, ... suffix. Temporary names start with `.` and end
//! in `.hotpipe-tmp`, so tools (and hotpipe's own recovery) can tell and remove them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::vocab::error::StageError;
use crate::vocab::item::Item;
use crate::vocab::sink::Sink;

/// Suffix of temporary files; with a leading `.` (see [`is_temp_name`]) a name ending in
/// it is a leftover of an interrupted write.
pub const TMP_SUFFIX: &str = ".hotpipe-tmp";

/// Whether `name` is one of hotpipe's temporary files. Producers' names never start with
/// `.` (the inbox ignores those), so a producer's `x.hotpipe-tmp` is never taken for one.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TMP_SUFFIX)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Rename `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystems (or kernels) without RENAME_NOREPLACE: link() also refuses to
        // replace.
        Err(Errno::INVAL | Errno::NOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// fsync a directory, making the renames in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `bytes` as `dir/<stem>.<ext>` (or `<stem>-N.<ext>` when taken) durably.
/// Returns the final path.
pub fn write_new(
    dir: &Path,
    stem: &str,
    ext: &str,
    bytes: &[u8],
    durable: bool,
) -> std::io::Result<PathBuf> {
    let (tmp, _) = write_temp(dir, stem, bytes, durable)?;
    let placed = place_noreplace(&tmp, dir, stem, ext).and_then(|path| {
        if durable {
            sync_dir(dir)?;
        }
        Ok(path)
    });
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// Write `dir/name` whole or not at all, replacing what is there: a temporary file renamed
/// over it (with `durable`, the file and then `dir` fsynced). For files hotpipe owns the
/// name of: an item's state, a quarantined item's `.error.json`.
pub fn write_replace(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let (tmp, _) = write_temp(dir, name, bytes, durable)?;
    let r = std::fs::rename(&tmp, dir.join(name))
        .and_then(|()| if durable { sync_dir(dir) } else { Ok(()) });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The one place temporary files are written: a fresh hidden name ending in
/// [`TMP_SUFFIX`], created exclusively, optionally fsynced; removed again on error.
/// Returns the path and inode, so a caller can record which file it is about to publish
/// before renaming it (the hot folder's crash-safe publication).
pub fn write_temp(
    dir: &Path,
    stem: &str,
    bytes: &[u8],
    durable: bool,
) -> std::io::Result<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let tmp = dir.join(format!(
        ".{stem}.{}.{}{TMP_SUFFIX}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        Ok(f.metadata()?.ino())
    })();
    match result {
        Ok(ino) => Ok((tmp, ino)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The `n`-th name tried for an output: `<stem>.<ext>`, then `<stem>-1.<ext>`, ...
pub fn candidate_name(stem: &str, ext: &str, n: u32) -> String {
    let dot = if ext.is_empty() { "" } else { "." };
    if n == 0 {
        format!("{stem}{dot}{ext}")
    } else {
        format!("{stem}-{n}{dot}{ext}")
    }
}

/// The stem a sidecar takes: the output actually written (`x-1.jpg` -> `x-1`), so an
/// output and its `.json` always pair up.
pub fn sidecar_stem(output: &Path) -> String {
    output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rename `from` into `dir` as `<stem>.<ext>`, adding `-N` until the name is free.
pub fn place_noreplace(from: &Path, dir: &Path, stem: &str, ext: &str) -> std::io::Result<PathBuf> {
    for n in 0..100_000u32 {
        let to = dir.join(candidate_name(stem, ext, n));
        match rename_noreplace(from, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "no free name for {stem}.{ext} in {}",
        dir.display()
    )))
}

/// Writes outputs into one directory, never replacing a file (adds `-N` instead).
pub struct DirSink {
    pub dir: PathBuf,
    /// fsync each file and the directory (the hot folder needs it; a one-off `process`
    /// does not pay for it by default).
    pub durable: bool,
}

impl Sink for DirSink {
    fn publish(&self, item: &Item, encoded: &[u8], ext: &str) -> Result<Vec<PathBuf>, StageError> {
        let err = |e: std::io::Error| {
            StageError::io(format!("cannot write output in {}", self.dir.display()), e)
        };
        let out = write_new(&self.dir, &item.name, ext, encoded, self.durable).map_err(err)?;
        let mut written = vec![out.clone()];
        if let Some(sidecar) = &item.sidecar {
            // Name the sidecar after the output actually written (x-1.jpg -> x-1.json).
            let stem = sidecar_stem(&out);
            let text = serde_json::to_vec_pretty(sidecar).unwrap_or_default();
            written.push(write_new(&self.dir, &stem, "json", &text, self.durable).map_err(err)?);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let a = write_new(d.path(), "x", "jpg", b"1", true).unwrap();
        let b = write_new(d.path(), "x", "jpg", b"2", true).unwrap();
        assert_eq!(a.file_name().unwrap(), "x.jpg");
        assert_eq!(b.file_name().unwrap(), "x-1.jpg");
        assert_eq!(std::fs::read(&a).unwrap(), b"1");
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }
}
