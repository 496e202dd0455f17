//! Read: open an input without following symlinks, check it is a plain regular file of a
//! sane size, and map it into memory (memmap2) so the decoder reads the page cache
//! directly instead of a copy.
//!
//! A mapping has one hazard a `read` does not: if a producer truncates the file while it
//! is mapped, touching the vanished pages raises SIGBUS. [`guard`] installs a handler that
//! replaces such pages with zeros and marks the mapping, so the decoder sees a truncated
//! image (a normal decode error) and hotpipe keeps running.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use memmap2::Mmap;

use crate::vocab::error::{Stage, StageError};
use crate::vocab::item::{Item, SourceStat};
use crate::vocab::stage::StageWorker;

pub mod guard;

/// An input file's bytes, mapped.
pub struct Input {
    map: Option<Mmap>,
    /// Bytes that came over the network (a cluster worker's item), instead of a map.
    owned: Option<Vec<u8>>,
    guard: Option<guard::Registration>,
    /// The file's size and mtime when it was opened.
    pub stat: SourceStat,
}

impl Input {
    pub fn bytes(&self) -> &[u8] {
        match (&self.map, &self.owned) {
            (Some(m), _) => m,
            (None, Some(v)) => v,
            (None, None) => &[],
        }
    }

    /// True when the file shrank while mapped (the bytes read past the new end were
    /// zeros, not file data).
    pub fn truncated(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.faulted())
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        // Unregister before unmapping so the handler never looks at a stale range.
        self.guard.take();
        self.map.take();
    }
}

/// The read stage: open and map each item's file, within `[decode] max_file_mib`.
pub struct Reader {
    pub max_bytes: u64,
}

impl StageWorker for Reader {
    type In = ();
    type Out = Input;

    fn stage(&self) -> Stage {
        Stage::Read
    }

    fn process(&mut self, item: &mut Item, _: ()) -> Result<Input, StageError> {
        if let Some(bytes) = item.data.take() {
            let input = owned_input(bytes, self.max_bytes)?;
            // Its size, for the sidecar (no mtime: the bytes came from the server).
            item.source = Some(input.stat);
            return Ok(input);
        }
        let input = read_input(&item.path, self.max_bytes)?;
        item.source = Some(input.stat);
        Ok(input)
    }
}

/// Open and map `path`. Errors are reasons for `failed/` (or the summary), classed so
/// that a passing shortage (descriptors, memory, an I/O error) is retried, not blamed on
/// the file.
pub fn read_input(path: &Path, max_bytes: u64) -> Result<Input, StageError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                StageError::Unsupported("is a symbolic link (not followed)".to_string())
            }
            Some(libc::ENOENT) => {
                StageError::BadInput("disappeared before it could be read".to_string())
            }
            _ => StageError::io("cannot open", e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| StageError::io("cannot stat", e))?;
    check_file_type(&meta).map_err(StageError::Unsupported)?;
    let len = meta.len();
    check_len(len, max_bytes)?;
    map(&file, SourceStat::of(&meta))
}

fn check_len(len: u64, max_bytes: u64) -> Result<(), StageError> {
    if len == 0 {
        return Err(StageError::BadInput("empty file".to_string()));
    }
    if len > max_bytes {
        return Err(StageError::OverLimit(format!(
            "file is {} MiB, over the limit of {} MiB (decode.max_file_mib)",
            len >> 20,
            max_bytes >> 20
        )));
    }
    Ok(())
}

/// A cluster worker's input, whose bytes came from the server: the same limits as a
/// file's.
fn owned_input(bytes: Vec<u8>, max_bytes: u64) -> Result<Input, StageError> {
    check_len(bytes.len() as u64, max_bytes)?;
    Ok(Input {
        stat: SourceStat {
            len: bytes.len() as u64,
            mtime: None,
        },
        map: None,
        owned: Some(bytes),
        guard: None,
    })
}

fn map(file: &File, stat: SourceStat) -> Result<Input, StageError> {
    // SAFETY: the mapping is read-only and private to this process; the one way another
    // process can invalidate it (truncation) is handled by the SIGBUS guard registered
    // before any byte is read.
    let map = unsafe { Mmap::map(file) }.map_err(|e| StageError::io("cannot map", e))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let guard = guard::register(map.as_ptr(), map.len());
    Ok(Input {
        map: Some(map),
        owned: None,
        guard: Some(guard),
        stat,
    })
}

/// Only regular files with one link are processed: a FIFO would block the reader, a
/// device could be endless, and a hard link means another name still points at the data
/// (moving ours to `done/` would not take it out of the producer's hands).
pub fn check_file_type(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        "a symbolic link (not followed)"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if !ft.is_file() {
        "not a regular file"
    } else if meta.nlink() > 1 {
        return Err(format!(
            "has {} hard links; only files with one link are processed",
            meta.nlink()
        ));
    } else {
        return Ok(());
    };
    Err(format!("is {kind}; only regular files are processed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_input(&f, 1 << 20).unwrap().bytes(), b"hello");
        let e = dir.path().join("e.bin");
        std::fs::write(&e, b"").unwrap();
        assert_eq!(
            read_input(&e, 1 << 20).err().unwrap().to_string(),
            "empty file"
        );
        let l = dir.path().join("l.bin");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(
            read_input(&l, 1 << 20)
                .err()
                .unwrap()
                .to_string()
                .contains("symbolic link")
        );
        assert!(
            read_input(dir.path(), 1 << 20)
                .err()
                .unwrap()
                .to_string()
                .contains("directory")
        );
        assert!(matches!(
            read_input(&f, 2).err().unwrap(),
            StageError::OverLimit(m) if m.contains("over the limit")
        ));
    }

    #[test]
    fn truncation_while_mapped_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.bin");
        std::fs::write(&f, vec![7u8; 64 * 4096]).unwrap();
        let input = read_input(&f, 1 << 30).unwrap();
        assert_eq!(input.bytes()[0], 7);
        // The producer truncates the file under us.
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let bytes = input.bytes();
        let tail_sum: u64 = bytes[8192..].iter().map(|&b| b as u64).sum();
        assert_eq!(tail_sum, 0, "pages past the new end read as zeros");
        assert!(input.truncated());
        assert_eq!(bytes[0], 7, "pages before the new end still hold the file");
    }
}
