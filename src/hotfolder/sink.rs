//! The end of an item's life in the hot folder: publication into `outbox/`, the move of
//! the input to `done/` (or its deletion), and quarantine in `failed/` with a sidecar.
//!
//! Publication order, each step durable before the next:
//! 1. the output (and its JSON sidecar, if any) is written to temporary names in `outbox/`
//!    and fsynced;
//! 2. the final names and inodes of all of them are recorded in the item's state
//!    ([`super::state`]), in one save;
//! 3. they are renamed to those names without replacing anything, and `outbox/` is fsynced;
//! 4. the input moves from `work/` to `done/` (fsynced) and the state is dropped.
//!
//! A crash before 3 leaves hidden temporary files (removed at start-up) and a state whose
//! outputs do not exist: the item is processed again. A crash during 3 leaves some of the
//! recorded outputs: recovery takes them back and processes the item again. A crash after
//! 3 leaves a state whose outputs all exist with the recorded inodes: recovery only does
//! step 4. So an input yields exactly one visible set of outputs whatever moment the
//! process dies at.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crossbeam_channel::Sender;

use super::claim::changed_since_read;
use super::publish::{
    candidate_name, file_names, is_temp_name, item_files, place_together, rename_noreplace,
    sidecar_bytes, sync_dir, write_replace, write_temp,
};
use super::state::{self, Failing, Output};
use super::{Layout, split_name, utc_timestamp};
use crate::config::OnSuccess;
use crate::vocab::error::{Stage, StageError};
use crate::vocab::fault::{self, Fault};
use crate::vocab::item::Item;
use crate::vocab::sink::{Encoded, Sink};

/// The hot folder's [`Sink`]: durable, exactly-once publication.
pub struct HotSink {
    pub layout: Layout,
    pub on_success: OnSuccess,
    /// Items whose output is published but whose input could not be moved on (e.g.
    /// `done/` unwritable): the daemon finishes them later without processing again.
    pub finish_later: Sender<OsString>,
    /// Serialises choosing a free output name and recording it, so two items with the
    /// same stem (`a.jpg`, `a.png`) never both record `a.jpg`.
    names: Mutex<()>,
}

impl HotSink {
    pub fn new(layout: Layout, on_success: OnSuccess, finish_later: Sender<OsString>) -> HotSink {
        HotSink {
            layout,
            on_success,
            finish_later,
            names: Mutex::new(()),
        }
    }

    /// Steps 1 to 3 for all of an item's files together: its outputs (one, or the
    /// model's K) and, when it has one, each output's JSON sidecar. Their names are
    /// recorded in *one* durable state save before any is renamed: a crash (or a transient
    /// error) between two renames then leaves a state listing all, some missing, which
    /// recovery takes back and processes again. Recorded one at a time, the state would
    /// list only the first, recovery would call the item published, and the rest would
    /// never be written. `files` are the payloads in publication order; `names(n)` their
    /// names at suffix `n` (all free together, or the next `n` is tried).
    fn publish_files(
        &self,
        work_name: &OsStr,
        st: &mut state::ItemState,
        files: &[&[u8]],
        names: impl Fn(u32) -> Vec<String>,
    ) -> std::io::Result<Vec<PathBuf>> {
        let outbox = &self.layout.outbox;
        let first = names(0).swap_remove(0);
        let mut temps = Vec::with_capacity(files.len());
        let r = (|| {
            for b in files {
                temps.push(write_temp(outbox, &first, b, true)?);
            }
            let _g = self.names.lock().unwrap_or_else(|p| p.into_inner());
            place_together(outbox, &temps, names, |files| {
                st.outputs = files
                    .iter()
                    .zip(&temps)
                    .map(|(file, &(_, ino))| Output {
                        file: file.clone(),
                        ino,
                    })
                    .collect();
                state::save(&self.layout.work, work_name, st, true)?;
                if files.len() > 1
                    && fault::check("publish-mid", Path::new(work_name)) == Some(Fault::Abort)
                {
                    // The moment a crash leaves an item half-published: its first file
                    // placed, the rest not yet.
                    rename_noreplace(&temps[0].0, &outbox.join(&files[0]))?;
                    Fault::Abort.act("publish-mid");
                }
                Ok(())
            })
        })();
        if r.is_err() {
            // Every temporary file goes: the retry publishes the item whole.
            for (tmp, _) in &temps {
                let _ = std::fs::remove_file(tmp);
            }
        }
        r
    }
}

impl Sink for HotSink {
    fn publish(
        &self,
        item: &Item,
        outputs: &Encoded,
        ext: &str,
    ) -> Result<Vec<PathBuf>, StageError> {
        if changed_since_read(item) {
            // The service puts it back into the inbox when it sees this outcome.
            return Err(StageError::BadInput(
                "the file changed after it was claimed (its writer was not finished)".into(),
            ));
        }
        let err = |what: &str, e: std::io::Error| StageError::io(what, e);
        let work_name = item.path.file_name().unwrap_or_default().to_os_string();
        let mut st = state::load(&self.layout.work, &work_name)
            .map_err(|e| err("cannot read the item's state in work/", e))?
            .unwrap_or_default();
        st.name = work_name.to_string_lossy().into_owned();
        let of = outputs.len();
        let sidecars: Vec<Vec<u8>> = (0..of).filter_map(|k| sidecar_bytes(item, k, of)).collect();
        let files = item_files(outputs, &sidecars);
        let has_sidecars = !sidecars.is_empty();
        let written = self
            .publish_files(&work_name, &mut st, &files, |n| {
                file_names(&item.name, ext, of, has_sidecars, n)
            })
            .map_err(|e| {
                err(
                    &format!("cannot publish into {}", self.layout.outbox.display()),
                    e,
                )
            })?;
        sync_dir(&self.layout.outbox).map_err(|e| err("cannot sync outbox/", e))?;
        // Published: from here on the item must never be processed again, whatever fails.
        if let Err(e) = finish_success(&self.layout, &work_name, self.on_success) {
            tracing::error!(file = ?item.path, error = %e, "output published but the input could not be moved on; will retry the move");
            let _ = self.finish_later.send(work_name);
        }
        Ok(written)
    }

    /// Where it was dropped (`inbox/<name>`), not `work/` where it was read: the path the
    /// producer knows. It moves on to `done/` under the same name (`-N` if taken), or is
    /// deleted; the sidecar's hash finds it either way.
    fn input_origin(&self, item: &Item) -> Option<PathBuf> {
        Some(self.layout.inbox.join(item.path.file_name()?))
    }
}

/// Step 4: move the input to `done/` (or delete it) and drop its state. Its parameters
/// file goes first (see [`super::params`]), so a kill in between leaves nothing of it
/// behind.
pub fn finish_success(layout: &Layout, name: &OsStr, on_success: OnSuccess) -> std::io::Result<()> {
    match on_success {
        OnSuccess::Move => {
            super::params::finish_to_done(layout, name)?;
        }
        OnSuccess::Delete => {
            super::params::discard(layout, name)?;
            std::fs::remove_file(layout.work.join(name))?;
            sync_dir(&layout.work)?;
        }
    }
    state::remove(&layout.work, name);
    Ok(())
}

/// The sidecar written beside a quarantined input.
#[derive(serde::Serialize)]
struct Sidecar<'a> {
    file: &'a str,
    reason: &'a str,
    stage: &'a str,
    /// Crashes of hotpipe blamed on the file (0 unless it was quarantined for crashing).
    crashes: u32,
    time: &'a str,
}

fn write_sidecar(layout: &Layout, f: &Failing, original: &str) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(&Sidecar {
        file: original,
        reason: &f.reason,
        stage: &f.stage,
        crashes: f.crashes,
        time: &f.time,
    })
    .map_err(std::io::Error::other)?;
    // Replacing is right here: the name was reserved for this item in its state.
    write_replace(
        &layout.failed,
        &format!("{}.error.json", f.as_name),
        &text,
        true,
    )
}

/// The longest name an item gets in `failed/`: room for `.error.json` and for the
/// temporary name its sidecar is written under, within the usual 255-byte name limit (a
/// longer one failed to quarantine and was retried forever).
const MAX_FAILED_NAME: usize = 200;

/// Stem and extension for an item's name in `failed/`, the stem cut (and marked with `~`)
/// so that any `<stem>-<n>.<ext>` stays within [`MAX_FAILED_NAME`]. An extension too long
/// to be one is left in the stem.
fn failed_stem(name: &OsStr) -> (String, String) {
    let (mut stem, mut ext) = split_name(name);
    if ext.len() > 16 {
        stem = format!("{stem}.{ext}");
        ext.clear();
    }
    // "-100000" and the dot before the extension.
    let budget = MAX_FAILED_NAME - ext.len() - 8;
    if stem.len() > budget {
        let mut end = budget - 1;
        while !stem.is_char_boundary(end) {
            end -= 1;
        }
        stem.truncate(end);
        stem.push('~');
    }
    (stem, ext)
}

/// Quarantine the item `name` of `work/`: record the name it gets in `failed/`, write
/// `<that name>.error.json`, move the item (whatever it is: a symlink is moved, never
/// followed), fsync. Safe to call again after a crash at any point.
pub fn fail_item(
    layout: &Layout,
    name: &OsStr,
    reason: &str,
    stage: Stage,
) -> std::io::Result<PathBuf> {
    let mut st = state::load(&layout.work, name)?.unwrap_or_default();
    st.name = name.to_string_lossy().into_owned();
    let from = layout.work.join(name);
    loop {
        let f = match &st.failing {
            Some(f) => f.clone(),
            None => {
                let (stem, ext) = failed_stem(name);
                let exact = name.to_string_lossy().into_owned();
                // The exact name first when it fits (split_name does not round-trip every
                // name, e.g. "x."), then the usual suffixes.
                let as_name = (0..100_000u32)
                    .filter_map(|n| match n {
                        0 => (exact.len() <= MAX_FAILED_NAME).then(|| exact.clone()),
                        n => Some(candidate_name(&stem, &ext, n)),
                    })
                    .find(|c| {
                        let free =
                            |f: String| std::fs::symlink_metadata(layout.failed.join(f)).is_err();
                        !is_temp_name(c)
                            && free(c.clone())
                            && free(format!("{c}.error.json"))
                            && free(format!("{c}.params.json"))
                    })
                    .ok_or_else(|| std::io::Error::other("no free name in failed/"))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let f = Failing {
                    as_name,
                    reason: reason.to_string(),
                    stage: stage.as_str().to_string(),
                    crashes: st.crashes,
                    time: utc_timestamp(now),
                };
                st.failing = Some(f.clone());
                state::save(&layout.work, name, &st, true)?;
                f
            }
        };
        write_sidecar(layout, &f, &st.name)?;
        let params = super::params::quarantine(layout, name, &f.as_name)?;
        let to = layout.failed.join(&f.as_name);
        match rename_noreplace(&from, &to) {
            Ok(()) => {
                sync_dir(&layout.failed)?;
                state::remove(&layout.work, name);
                return Ok(to);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Someone else took the name meanwhile: drop our sidecar, take the
                // parameters file back, pick another.
                let _ =
                    std::fs::remove_file(layout.failed.join(format!("{}.error.json", f.as_name)));
                if let Some(p) = params {
                    super::params::unquarantine(layout, name, &p)?;
                }
                st.failing = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Moved before a crash; only the state was left.
                state::remove(&layout.work, name);
                return Ok(to);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Recovery of a quarantine interrupted after the move: the state survives, the item
/// is in `failed/`; make sure its sidecar is there.
pub fn complete_orphan_failing(layout: &Layout, st: &state::ItemState) {
    if let Some(f) = &st.failing
        && std::fs::symlink_metadata(layout.failed.join(&f.as_name)).is_ok()
        && std::fs::symlink_metadata(layout.failed.join(format!("{}.error.json", f.as_name)))
            .is_err()
    {
        let _ = write_sidecar(layout, f, &st.name);
        let _ = sync_dir(&layout.failed);
    }
}
