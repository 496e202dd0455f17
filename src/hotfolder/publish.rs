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
use crate::vocab::sink::{Encoded, Sink};

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

/// The stem of output `k` (0-based) of `of`: the input's stem for a single output,
/// `<stem>_1 .. <stem>_K` for several.
pub fn output_stem(stem: &str, k: usize, of: usize) -> String {
    if of == 1 {
        stem.to_string()
    } else {
        format!("{stem}_{}", k + 1)
    }
}

/// The sidecar of output `k` of `of` (none when the item has none): the item's, and with
/// several outputs which one this is (`"output": 1 .. K`, `"outputs": K`), so each file
/// says how to make it again.
pub fn sidecar_bytes(item: &Item, k: usize, of: usize) -> Option<Vec<u8>> {
    let sidecar = item.sidecar.as_ref()?;
    let text = match sidecar {
        serde_json::Value::Object(m) if of > 1 => {
            let mut m = m.clone();
            m.insert("output".into(), (k + 1).into());
            m.insert("outputs".into(), of.into());
            serde_json::to_vec_pretty(&m)
        }
        other => serde_json::to_vec_pretty(other),
    };
    Some(text.unwrap_or_default())
}

/// The names of an item's files at suffix `n`, in publication order: each output
/// (`<stem>.<ext>`, or `<stem>_<k>.<ext>` of several; `-n` before the extension), each
/// followed by its sidecar, named after it, when there are sidecars.
pub fn file_names(stem: &str, ext: &str, of: usize, sidecars: bool, n: u32) -> Vec<String> {
    let mut names = Vec::with_capacity(if sidecars { 2 * of } else { of });
    for k in 0..of {
        let image = candidate_name(&output_stem(stem, k, of), ext, n);
        if sidecars {
            let json = candidate_name(&sidecar_stem(Path::new(&image)), "json", 0);
            names.push(image);
            names.push(json);
        } else {
            names.push(image);
        }
    }
    names
}

/// An item's files in publication order (its outputs, each followed by its sidecar when
/// it has one).
pub fn item_files<'a>(outputs: &'a Encoded, sidecars: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let mut files = Vec::with_capacity(outputs.len() + sidecars.len());
    for k in 0..outputs.len() {
        files.push(outputs.get(k));
        if let Some(s) = sidecars.get(k) {
            files.push(s);
        }
    }
    files
}

/// Place the written temporary files `temps` in `dir` under `names(n)` for the first
/// suffix `n` at which all of those names are free, so an item's files always share
/// their suffix; `before(names)` runs once the names are chosen and before any rename
/// (the hot folder records them in its journal there). A name taken between the look
/// and the rename puts back what was placed and tries the next `n`. On error nothing is
/// left placed; the temporary files are the caller's to remove.
pub fn place_together(
    dir: &Path,
    temps: &[(PathBuf, u64)],
    names: impl Fn(u32) -> Vec<String>,
    mut before: impl FnMut(&[String]) -> std::io::Result<()>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut placed: Vec<PathBuf> = Vec::with_capacity(temps.len());
    let r = (|| {
        'names: for n in 0..100_000u32 {
            let files = names(n);
            if files
                .iter()
                .any(|f| std::fs::symlink_metadata(dir.join(f)).is_ok())
            {
                continue;
            }
            before(&files)?;
            for (file, (tmp, _)) in files.iter().zip(temps) {
                let to = dir.join(file);
                match rename_noreplace(tmp, &to) {
                    Ok(()) => placed.push(to),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // `placed` is cleared only once all are back, so if a rename back
                        // fails the clean-up below still removes the rest.
                        for (p, (tmp, _)) in placed.iter().zip(temps) {
                            std::fs::rename(p, tmp)?;
                        }
                        placed.clear();
                        continue 'names;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(std::mem::take(&mut placed));
        }
        Err(std::io::Error::other(format!(
            "no free names for {} in {}",
            names(0).join(", "),
            dir.display()
        )))
    })();
    if r.is_err() {
        for p in &placed {
            let _ = std::fs::remove_file(p);
        }
    }
    r
}

/// Writes outputs into one directory, never replacing a file (adds `-N` instead).
pub struct DirSink {
    pub dir: PathBuf,
    /// fsync each file and the directory (the hot folder needs it; a one-off `process`
    /// does not pay for it by default).
    pub durable: bool,
}

impl Sink for DirSink {
    fn publish(
        &self,
        item: &Item,
        outputs: &Encoded,
        ext: &str,
    ) -> Result<Vec<PathBuf>, StageError> {
        let err = |e: std::io::Error| {
            StageError::io(format!("cannot write output in {}", self.dir.display()), e)
        };
        let of = outputs.len();
        let sidecars: Vec<Vec<u8>> = (0..of).filter_map(|k| sidecar_bytes(item, k, of)).collect();
        let mut temps = Vec::new();
        let r = (|| {
            for b in item_files(outputs, &sidecars) {
                temps.push(write_temp(&self.dir, &item.name, b, self.durable)?);
            }
            let has_sidecars = !sidecars.is_empty();
            let names = |n| file_names(&item.name, ext, of, has_sidecars, n);
            let placed = place_together(&self.dir, &temps, names, |_| Ok(()))?;
            if self.durable {
                sync_dir(&self.dir)?;
            }
            Ok(placed)
        })();
        if r.is_err() {
            for (tmp, _) in &temps {
                let _ = std::fs::remove_file(tmp);
            }
        }
        r.map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vocab::pool::{BufPool, PooledBuf};

    fn encoded(pool: &std::sync::Arc<BufPool>, bytes: &[u8]) -> PooledBuf {
        let mut b = pool.get(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    /// Never replaces; an item's K outputs and their sidecars share one suffix, even when
    /// only some of their names are taken.
    #[test]
    fn never_replaces_and_an_items_files_share_their_suffix() {
        let d = tempfile::tempdir().unwrap();
        let sink = DirSink {
            dir: d.path().to_path_buf(),
            durable: true,
        };
        let pool = BufPool::new(4);
        let mut item = Item::new(0, "in/x.png".into());
        let one = Encoded::new(encoded(&pool, b"1"));
        let a = sink.publish(&item, &one, "jpg").unwrap();
        let b = sink.publish(&item, &one, "jpg").unwrap();
        assert_eq!(
            (a[0].file_name().unwrap(), b[0].file_name().unwrap()),
            ("x.jpg".as_ref(), "x-1.jpg".as_ref())
        );
        std::fs::write(d.path().join("x_2.jpg"), b"someone else's").unwrap();
        item.sidecar = Some(serde_json::json!({"params": {"seed": 1}}));
        let mut two = Encoded::new(encoded(&pool, b"2"));
        two.push(encoded(&pool, b"3"));
        let c = sink.publish(&item, &two, "jpg").unwrap();
        let c: Vec<_> = c
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(c, ["x_1-1.jpg", "x_1-1.json", "x_2-1.jpg", "x_2-1.json"]);
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("x_2-1.json")).unwrap()).unwrap();
        assert_eq!(
            (side["output"].as_u64(), side["outputs"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(std::fs::read(d.path().join("x_2-1.jpg")).unwrap(), b"3");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 7, "no temporary file left: {names:?}");
    }
}
