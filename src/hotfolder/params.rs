//! Parameters files in the hot folder (with `[params]`): `<stem>.json` (or `<stem>.JSON`)
//! beside the image `<stem>.<ext>` carries that image's parameters.
//!
//! The protocol, for producers: write `a.json` first, complete (under a temporary name,
//! `.a.json` or `a.json.tmp`, then renamed, like any drop), then the image `a.jpg`. An
//! image is claimed only once its parameters file, if there is one, is ready too (settled
//! and closed by its writer, as images are), so it never runs with half-written
//! parameters; without one it runs on the defaults, or with `required = true` waits for
//! it up to `wait_s` and then fails with that reason. A `.json` is never an item of its
//! own: one without an image stays in the inbox.
//!
//! The life of the file, each step a rename, in an order that survives a kill anywhere:
//! 1. the image is claimed (`inbox/a.jpg` -> `work/a.jpg`);
//! 2. before its first attempt, its parameters file follows it under a hidden name tied
//!    to the image (`work/.hp-params-<key>.json`, the key of its state file), and the
//!    item's state records whether it had one; a kill between 1 and 2 leaves the file in
//!    the inbox, where the resumed attempt finds it by the stem. Later attempts (retries,
//!    resumes) go by that record, so a `<stem>.json` dropped meanwhile for the next image
//!    of the same name is never taken by this one;
//! 3. it is read and checked on every attempt (a malformed file fails the image, the key
//!    named);
//! 4. when the image is finished, the parameters file moves *before* the image, so a kill
//!    in between leaves the image to be finished again and no parameters file behind:
//!    to `done/a.json` beside `done/a.jpg`, under the same suffix when a name is taken
//!    (`a-1.json` beside `a-1.jpg`), or deleted with `on_success = "delete"`; on failure
//!    to `failed/<name>.params.json` beside the quarantined `failed/<name>`.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use super::publish::{candidate_name, place_noreplace, rename_noreplace, sync_dir};
use super::{Layout, split_name, state};
use crate::config::{MAX_PARAMS_BYTES, ParamError, ParamsConfig};
use crate::vocab::crash;
use crate::vocab::params::Params;

/// Prefix of claimed parameters files in `work/`.
pub const PARAMS_PREFIX: &str = ".hp-params-";

/// The extensions of a parameters file, as producers write them.
const EXTENSIONS: [&str; 2] = ["json", "JSON"];

/// Whether an inbox entry is a parameters file (never an item of its own).
pub fn is_params_file(name: &OsStr) -> bool {
    let (_, ext) = split_name(name);
    EXTENSIONS.contains(&ext.as_str())
}

/// The names of the parameters file an image's stem names: `a.jpg` -> `a.json`, `a.JSON`.
pub fn companions(image: &OsStr) -> [OsString; 2] {
    let (stem, _) = split_name(image);
    EXTENSIONS.map(|ext| OsString::from(format!("{stem}.{ext}")))
}

/// The name errors give the parameters file of `image`.
pub fn companion_shown(image: &OsStr) -> String {
    let (stem, _) = split_name(image);
    format!("{stem}.json")
}

/// Where the item `name`'s claimed parameters file lives in `work/`.
pub fn claimed_path(layout: &Layout, name: &OsStr) -> PathBuf {
    layout
        .work
        .join(format!("{PARAMS_PREFIX}{:016x}.json", crash::key(name)))
}

/// What an item has for parameters (step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Its parameters file is in `work/`.
    File,
    /// It has none: it runs on the defaults.
    None,
    /// It had one, which is no longer in `work/` (removed by hand): it cannot run as
    /// its producer meant.
    Vanished,
}

/// Step 2: bring `inbox/<stem>.json` to the item `name` (already in `work/`) at its first
/// attempt, and record the outcome in its state; later attempts go by the record.
pub fn claim(layout: &Layout, name: &OsStr) -> std::io::Result<Claimed> {
    let to = claimed_path(layout, name);
    if std::fs::symlink_metadata(&to).is_ok() {
        return Ok(Claimed::File);
    }
    let mut st = state::load(&layout.work, name)?.unwrap_or_default();
    match st.params_file {
        Some(true) => return Ok(Claimed::Vanished),
        Some(false) => return Ok(Claimed::None),
        None => {}
    }
    let mut has = false;
    for json in companions(name) {
        match rename_noreplace(&layout.inbox.join(json), &to) {
            Ok(()) => {
                has = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Not durable: a crash before this save is seen by the file's place (it is in work/
    // or it is not), and the page cache survives a crash.
    st.name = name.to_string_lossy().into_owned();
    st.params_file = Some(has);
    state::save(&layout.work, name, &st, false)?;
    Ok(if has { Claimed::File } else { Claimed::None })
}

/// Why an item's parameters could not be had: its file cannot be read, or is refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the parameters file: {0}")]
    Io(#[from] std::io::Error),
    #[error("{file}: {error}")]
    Refused { file: String, error: ParamError },
}

/// Step 3: the item's parameters from its claimed file, `None` when it has none.
pub fn load(
    layout: &Layout,
    name: &OsStr,
    schema: &ParamsConfig,
) -> Result<Option<Params>, LoadError> {
    let path = claimed_path(layout, name);
    let file = companion_shown(name);
    let refused = |error| LoadError::Refused {
        file: file.clone(),
        error,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_file() || meta.len() > MAX_PARAMS_BYTES as u64 {
        return Err(refused(ParamError::Malformed(format!(
            "not a regular file of at most {} KiB",
            MAX_PARAMS_BYTES >> 10
        ))));
    }
    let bytes = std::fs::read(&path)?;
    let given = ParamsConfig::parse_json(&bytes).map_err(refused)?;
    schema.resolve(&given).map(Some).map_err(refused)
}

/// Step 4 on success with `on_success = "move"`: the item's parameters file (if it has
/// one) and then the item to `done/`, under the same suffix (`a-1.json`, `a-1.jpg`) when
/// a name is taken. The image keeps its exact name when free, which `split_name` does not
/// always give back (`x.`).
pub fn finish_to_done(layout: &Layout, name: &OsStr) -> std::io::Result<PathBuf> {
    let from = layout.work.join(name);
    let params = claimed_path(layout, name);
    let has_params = std::fs::symlink_metadata(&params).is_ok();
    let mut st = state::load(&layout.work, name)?.unwrap_or_default();
    let (stem, ext) = split_name(name);
    // After a kill between the two renames, the suffix the parameters file took.
    for n in st.done_suffix.unwrap_or(0)..100_000u32 {
        let image = match n {
            0 => layout.done.join(name),
            n => layout.done.join(candidate_name(&stem, &ext, n)),
        };
        if std::fs::symlink_metadata(&image).is_ok() {
            continue;
        }
        let json = layout.done.join(candidate_name(&stem, "json", n));
        if has_params {
            if std::fs::symlink_metadata(&json).is_ok() {
                continue;
            }
            st.name = name.to_string_lossy().into_owned();
            st.done_suffix = Some(n);
            state::save(&layout.work, name, &st, false)?;
            match rename_noreplace(&params, &json) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        match rename_noreplace(&from, &image) {
            Ok(()) => {
                sync_dir(&layout.done)?;
                return Ok(image);
            }
            Err(e) => {
                // The parameters file goes back to wait for its image.
                if has_params {
                    std::fs::rename(&json, &params)?;
                }
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
            }
        }
    }
    Err(std::io::Error::other(format!(
        "no free name for {stem}.{ext} in {}",
        layout.done.display()
    )))
}

/// Step 4 on success with `on_success = "delete"`: the parameters file goes with the
/// image.
pub fn discard(layout: &Layout, name: &OsStr) -> std::io::Result<()> {
    match std::fs::remove_file(claimed_path(layout, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Step 4 on failure: the item's parameters file beside it in `failed/`, as
/// `<as_name>.params.json`. Returns where it went, for [`unquarantine`] should the
/// image not get `as_name` after all.
pub fn quarantine(
    layout: &Layout,
    name: &OsStr,
    as_name: &str,
) -> std::io::Result<Option<PathBuf>> {
    let from = claimed_path(layout, name);
    if std::fs::symlink_metadata(&from).is_err() {
        return Ok(None);
    }
    let to = place_noreplace(&from, &layout.failed, &format!("{as_name}.params"), "json")?;
    sync_dir(&layout.failed)?;
    Ok(Some(to))
}

/// Undo [`quarantine`]: the image's name in `failed/` was taken meanwhile, and its
/// parameters file follows it to the next one.
pub fn unquarantine(layout: &Layout, name: &OsStr, placed: &Path) -> std::io::Result<()> {
    std::fs::rename(placed, claimed_path(layout, name))
}

/// A claimed parameters file whose image is no longer in `work/` (found at start-up):
/// its image was finished by hand, or never existed. Kept, in `failed/`, named after the
/// image its state names (`a.orphan.json` for `a.jpg`), not deleted.
pub fn orphan(layout: &Layout, file: &OsStr) {
    let from = layout.work.join(file);
    let key = file
        .to_string_lossy()
        .trim_start_matches(PARAMS_PREFIX)
        .trim_end_matches(".json")
        .to_string();
    let state_file = layout
        .work
        .join(format!("{}{key}.json", state::STATE_PREFIX));
    let stem = match state::load_path(&state_file) {
        Ok(Some(st)) if !st.name.is_empty() => split_name(OsStr::new(&st.name)).0,
        _ => format!("params-{key}"),
    };
    match place_noreplace(&from, &layout.failed, &format!("{stem}.orphan"), "json") {
        Ok(to) => {
            tracing::warn!(file = ?to, "a claimed parameters file without its image was moved to failed/")
        }
        Err(e) => {
            tracing::error!(file = ?from, error = %e, "cannot move an orphaned parameters file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnSuccess;
    use crate::hotfolder::sink::finish_success;
    use crate::vocab::error::Stage;

    fn layout() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        (d, l)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_first_attempt_decides_and_later_drops_are_not_taken() {
        let (_d, l) = layout();
        let a = OsStr::new("a.png");
        std::fs::write(l.work.join(a), b"1").unwrap();
        assert_eq!(claim(&l, a).unwrap(), Claimed::None);
        // The next a.png's parameters arrive while this one waits for a retry.
        std::fs::write(l.inbox.join("a.json"), b"{}").unwrap();
        assert_eq!(claim(&l, a).unwrap(), Claimed::None);
        assert_eq!(names(&l.inbox), ["a.json"], "left for the next a.png");
        // Upper case is a parameters file too; one claimed and then lost is said so.
        let b = OsStr::new("b.jpg");
        std::fs::write(l.work.join(b), b"1").unwrap();
        std::fs::write(l.inbox.join("b.JSON"), b"{}").unwrap();
        assert!(is_params_file(OsStr::new("b.JSON")));
        assert_eq!(claim(&l, b).unwrap(), Claimed::File);
        std::fs::remove_file(claimed_path(&l, b)).unwrap();
        assert_eq!(claim(&l, b).unwrap(), Claimed::Vanished);
    }

    #[test]
    fn done_names_pair_up_when_taken() {
        let (_d, l) = layout();
        // An earlier a.json (its image deleted since) and an earlier b.png.
        std::fs::write(l.done.join("a.json"), b"old").unwrap();
        std::fs::write(l.done.join("b.png"), b"old").unwrap();
        for n in ["a.png", "b.png"] {
            let n = OsStr::new(n);
            std::fs::write(l.work.join(n), b"1").unwrap();
            std::fs::write(claimed_path(&l, n), b"{}").unwrap();
            finish_success(&l, n, OnSuccess::Move).unwrap();
        }
        assert_eq!(
            names(&l.done),
            [
                "a-1.json", "a-1.png", "a.json", "b-1.json", "b-1.png", "b.png"
            ]
        );
        assert_eq!(names(&l.work), Vec::<String>::new());
    }

    /// A kill between the parameters file's move and the image's: finished again, the
    /// image takes the suffix its parameters file took, not the first free name.
    #[test]
    fn an_image_finished_again_after_a_kill_keeps_its_pair() {
        let (_d, l) = layout();
        std::fs::write(l.done.join("a.json"), b"old").unwrap();
        let n = OsStr::new("a.png");
        std::fs::write(l.work.join(n), b"1").unwrap();
        std::fs::write(claimed_path(&l, n), b"{}").unwrap();
        // What finish_to_done does up to the kill: record the suffix, move the JSON.
        let mut st = state::load(&l.work, n).unwrap().unwrap_or_default();
        st.done_suffix = Some(1);
        state::save(&l.work, n, &st, false).unwrap();
        std::fs::rename(claimed_path(&l, n), l.done.join("a-1.json")).unwrap();
        finish_success(&l, n, OnSuccess::Move).unwrap();
        assert_eq!(names(&l.done), ["a-1.json", "a-1.png", "a.json"]);
        assert_eq!(names(&l.work), Vec::<String>::new());
    }

    #[test]
    fn a_quarantine_retried_under_another_name_takes_the_parameters_file_along() {
        let (_d, l) = layout();
        let x = OsStr::new("x.png");
        std::fs::write(l.work.join(x), b"1").unwrap();
        std::fs::write(claimed_path(&l, x), b"{}").unwrap();
        // As a kill leaves it: the name chosen, then taken by another file before the move.
        let mut st = state::ItemState {
            name: "x.png".into(),
            ..Default::default()
        };
        st.failing = Some(state::Failing {
            as_name: "x.png".into(),
            reason: "bad".into(),
            stage: "decode".into(),
            crashes: 0,
            time: String::new(),
        });
        state::save(&l.work, x, &st, true).unwrap();
        std::fs::write(l.failed.join("x.png"), b"another").unwrap();
        let to = crate::hotfolder::sink::fail_item(&l, x, "bad", Stage::Decode).unwrap();
        assert_eq!(to, l.failed.join("x-1.png"));
        assert_eq!(
            names(&l.failed),
            [
                "x-1.png",
                "x-1.png.error.json",
                "x-1.png.params.json",
                "x.png"
            ]
        );
    }

    #[test]
    fn an_orphan_is_named_after_its_image() {
        let (_d, l) = layout();
        let a = OsStr::new("photo.jpg");
        std::fs::write(l.work.join(a), b"1").unwrap();
        std::fs::write(l.inbox.join("photo.json"), b"{}").unwrap();
        assert_eq!(claim(&l, a).unwrap(), Claimed::File);
        // The image is taken out of work/ by hand.
        std::fs::remove_file(l.work.join(a)).unwrap();
        crate::hotfolder::recover::startup(&l).unwrap();
        assert_eq!(names(&l.failed), ["photo.orphan.json"]);
    }
}
