//! Items found in `work/`: start-up recovery, and the decision made before every
//! attempt (a fresh claim, a retry after a transient error, or a leftover of a crash all
//! go through [`begin`]).
//!
//! An item in `work/` is in one of three situations, told apart by its state file:
//! its output is published (only the move to `done/` is missing), it was being
//! quarantined (finish that), or anything else (process it again, counting the attempt
//! durably first so a file that crashes hotpipe is quarantined after `max_attempts`).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};

use super::Layout;
use super::publish::is_temp_name;
use super::sink::{complete_orphan_failing, fail_item, finish_success};
use super::state::{self, STATE_PREFIX};
use crate::config::OnSuccess;
use crate::stages::read::check_file_type;
use crate::vocab::error::Stage;

/// What to do with an item of `work/` now.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// Process it: this is attempt number `n`.
    Process(u32),
    /// Its output was already published; it has now been moved on.
    Finished,
    /// It has been moved to `failed/` (the reason is in the sidecar).
    Failed(String),
    /// It is no longer in `work/`.
    Gone,
}

/// Start-up: remove temporary leftovers of interrupted writes, finish or drop state files
/// whose item is gone, and return the items to resume (sorted by name).
pub fn startup(layout: &Layout) -> std::io::Result<Vec<OsString>> {
    for dir in [&layout.outbox, &layout.failed, &layout.done, &layout.work] {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let n = e.file_name();
            let s = n.to_string_lossy();
            if is_temp_name(&s) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut items = Vec::new();
    let mut states = Vec::new();
    for e in std::fs::read_dir(&layout.work)? {
        let n = e?.file_name();
        if n.to_string_lossy().starts_with(STATE_PREFIX) {
            states.push(n);
        } else if !n.to_string_lossy().starts_with('.') {
            items.push(n);
        }
    }
    let live: HashSet<std::path::PathBuf> =
        items.iter().map(|n| state::path(&layout.work, n)).collect();
    for s in states {
        let p = layout.work.join(&s);
        if live.contains(&p) {
            continue;
        }
        if let Ok(Some(st)) = state::load_path(&p) {
            complete_orphan_failing(layout, &st);
        }
        let _ = std::fs::remove_file(&p);
    }
    items.sort();
    Ok(items)
}

/// Decide about the item `name` in `work/` and record the decision durably.
pub fn begin(
    layout: &Layout,
    name: &OsStr,
    max_attempts: u32,
    on_success: OnSuccess,
) -> std::io::Result<Begin> {
    let path = layout.work.join(name);
    let mut st = state::load(&layout.work, name)?.unwrap_or_default();
    st.name = name.to_string_lossy().into_owned();
    if let Some(f) = &st.failing {
        let reason = f.reason.clone();
        fail_item(layout, name, &reason, Stage::Claim, st.attempts)?;
        return Ok(Begin::Failed(reason));
    }
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            state::remove(&layout.work, name);
            return Ok(Begin::Gone);
        }
        Err(e) => return Err(e),
    };
    if !st.outputs.is_empty() {
        let ours: Vec<bool> = st
            .outputs
            .iter()
            .map(|o| state::is_ours(&layout.outbox, o))
            .collect();
        if ours.iter().all(|&b| b) {
            finish_success(layout, name, on_success)?;
            return Ok(Begin::Finished);
        }
        // A partial publication (the image but not its sidecar): take ours back so the
        // next attempt does not leave a duplicate.
        for (o, mine) in st.outputs.iter().zip(ours) {
            if mine {
                let _ = std::fs::remove_file(layout.outbox.join(&o.file));
            }
        }
    }
    if let Err(reason) = check_file_type(&meta) {
        fail_item(layout, name, &reason, Stage::Claim, st.attempts)?;
        return Ok(Begin::Failed(reason));
    }
    if st.attempts >= max_attempts {
        let reason = format!(
            "gave up after {} attempts that did not finish (hotpipe stopped during each; \
             possibly a file that crashes it)",
            st.attempts
        );
        fail_item(layout, name, &reason, Stage::Claim, st.attempts)?;
        return Ok(Begin::Failed(reason));
    }
    if !st.outputs.is_empty() {
        st.outputs.clear();
        state::save(&layout.work, name, &st, false)?;
    }
    // Counted by `count` when decoding starts, not here: an item that only waited in a
    // queue when the process died did not cause the crash.
    Ok(Begin::Process(st.attempts + 1))
}

/// Count an attempt as started (called when the decode stage picks the item up).
pub fn count(layout: &Layout, name: &OsStr) {
    let mut st = state::load(&layout.work, name)
        .ok()
        .flatten()
        .unwrap_or_default();
    st.attempts += 1;
    if let Err(e) = state::save(&layout.work, name, &st, false) {
        tracing::warn!(file = ?name, error = %e, "cannot record an attempt");
    }
}

/// Take back an attempt that did not really happen (a transient error, or an item that
/// was never handed to the pipeline), so waiting for a full disk does not use up
/// `max_attempts`.
pub fn uncount(layout: &Layout, name: &OsStr) {
    if let Ok(Some(mut st)) = state::load(&layout.work, name)
        && st.attempts > 0
    {
        st.attempts -= 1;
        // Outputs stay recorded: a half-published attempt (image out, sidecar failed)
        // must be taken back by the next `begin`, not duplicated.
        let _ = state::save(&layout.work, name, &st, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.prepare().unwrap();
        (d, l)
    }

    #[test]
    fn attempts_are_counted_and_capped() {
        let (_d, l) = layout();
        let n = OsStr::new("x.jpg");
        std::fs::write(l.work.join(n), b"data").unwrap();
        assert_eq!(begin(&l, n, 2, OnSuccess::Move).unwrap(), Begin::Process(1));
        // Not started (the process died while it waited in a queue): not counted.
        assert_eq!(begin(&l, n, 2, OnSuccess::Move).unwrap(), Begin::Process(1));
        count(&l, n);
        assert_eq!(begin(&l, n, 2, OnSuccess::Move).unwrap(), Begin::Process(2));
        count(&l, n);
        assert!(matches!(
            begin(&l, n, 2, OnSuccess::Move).unwrap(),
            Begin::Failed(_)
        ));
        assert!(l.failed.join("x.jpg").is_file());
        let side = std::fs::read_to_string(l.failed.join("x.jpg.error.json")).unwrap();
        assert!(side.contains("gave up after 2 attempts"), "{side}");
        assert_eq!(std::fs::read_dir(&l.work).unwrap().count(), 0);
    }

    #[test]
    fn published_output_is_only_moved_on() {
        let (_d, l) = layout();
        let n = OsStr::new("y.jpg");
        std::fs::write(l.work.join(n), b"data").unwrap();
        assert_eq!(begin(&l, n, 3, OnSuccess::Move).unwrap(), Begin::Process(1));
        count(&l, n); // decoding started
        // Simulate a crash right after the output's rename.
        std::fs::write(l.outbox.join("y.jpg"), b"out").unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(l.outbox.join("y.jpg")).unwrap().ino();
        let mut st = state::load(&l.work, n).unwrap().unwrap();
        st.outputs.push(state::Output {
            file: "y.jpg".into(),
            ino,
        });
        state::save(&l.work, n, &st, true).unwrap();
        std::fs::write(l.outbox.join(".y.1.2.hotpipe-tmp"), b"partial").unwrap();
        assert_eq!(startup(&l).unwrap(), vec![OsString::from("y.jpg")]);
        assert_eq!(begin(&l, n, 3, OnSuccess::Move).unwrap(), Begin::Finished);
        assert!(l.done.join("y.jpg").is_file());
        assert_eq!(std::fs::read_dir(&l.outbox).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&l.work).unwrap().count(), 0);
    }

    #[test]
    fn symlink_and_fifo_are_moved_not_followed_or_opened() {
        let (d, l) = layout();
        let target = d.path().join("secret");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, l.work.join("link.jpg")).unwrap();
        let fifo = std::ffi::CString::new(l.work.join("p.jpg").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        for n in ["link.jpg", "p.jpg"] {
            assert!(matches!(
                begin(&l, OsStr::new(n), 3, OnSuccess::Move).unwrap(),
                Begin::Failed(_)
            ));
            assert!(l.failed.join(format!("{n}.error.json")).is_file());
        }
        assert!(
            std::fs::symlink_metadata(l.failed.join("link.jpg"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
