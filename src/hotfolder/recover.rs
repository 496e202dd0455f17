//! Items found in `work/`: start-up recovery, crash attribution, and the decision made
//! before every attempt (a fresh claim, a retry after a transient error, or a leftover of
//! a crash all go through [`begin`]).
//!
//! An item in `work/` is in one of three situations, told apart by its state file:
//! its output is published (only the move to `done/` is missing), it was being
//! quarantined (finish that), or anything else (process it again).
//!
//! ## Who is blamed for a crash
//! A crash counts against an item only when the crash record of the run that died
//! ([`crate::vocab::crash`], written by hotpipe's fatal-signal handler) names it alone:
//! - the items the crashing thread was working on are the culprits; when that thread held
//!   none (a crash in a libtorch worker thread, say), the items every thread held are;
//! - exactly one culprit: its crash count goes up (durably, before anything else runs);
//! - several (a batch in the model): none is counted; each becomes a *suspect*;
//! - a culprit is a suspect too, and suspects run one at a time, alone in the pipeline,
//!   before anything else resumes, so a crash during one names that one.
//!
//! So a file that crashes hotpipe whenever it is processed is quarantined after
//! `max_attempts` crashes (one more if it first crashed inside a batch), and the daemon
//! does not crash-loop; a file that only waited in a queue, or was on another thread, is
//! never blamed. A stop hotpipe cannot catch (SIGKILL, the OOM killer, a power cut)
//! leaves no record and blames no one: the byte budget for frames, not a retry limit, is
//! what keeps an input from exhausting memory. A graceful stop blames no one either.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;

use super::Layout;
use super::params::PARAMS_PREFIX;
use super::publish::is_temp_name;
use super::sink::{complete_orphan_failing, fail_item, finish_success};
use super::state::{self, STATE_PREFIX};
use crate::config::OnSuccess;
use crate::stages::read::check_file_type;
use crate::vocab::crash;
use crate::vocab::error::Stage;

/// The crash record's name in `work/` (hidden: never taken for an input).
pub const CRASH_RECORD: &str = ".hp-crash";

/// Room kept for a crash record: written into preallocated blocks, so the record is
/// still written when the disk is full (what makes a full disk crash-prone is no excuse
/// to forget who crashed).
const CRASH_RECORD_BYTES: u64 = 64 << 10;

/// What to do with an item of `work/` now.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// Process it.
    Process,
    /// Its output was already published; it has now been moved on.
    Finished,
    /// It has been moved to `failed/` (the reason is in the sidecar).
    Failed(String),
    /// It is no longer in `work/`.
    Gone,
}

/// The items start-up found in `work/`.
#[derive(Debug, Default, PartialEq)]
pub struct Recovered {
    /// Suspects of a crash: each runs alone, before anything else (sorted by name).
    pub isolate: Vec<OsString>,
    /// The rest, to resume at full concurrency (sorted by name).
    pub resume: Vec<OsString>,
}

impl Recovered {
    pub fn len(&self) -> usize {
        self.isolate.len() + self.resume.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A crash record, parsed (see [`crate::vocab::crash`] for the format).
#[derive(Debug, Default, PartialEq)]
struct CrashRecord {
    signal: i32,
    /// (key, thread) held by the thread that crashed.
    culprits: Vec<(u64, String)>,
    /// (key, thread) held by the other threads.
    others: Vec<(u64, String)>,
}

impl CrashRecord {
    /// `None` for an empty record (the run did not crash).
    fn parse(bytes: &[u8]) -> Option<CrashRecord> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[..end]);
        let mut rec = CrashRecord::default();
        let mut seen = false;
        for line in text.lines() {
            let mut w = line.split(' ');
            match (w.next(), w.next(), w.next()) {
                (Some("signal"), Some(n), _) => {
                    rec.signal = n.parse().unwrap_or(0);
                    seen = true;
                }
                (Some(tag @ ("c" | "o")), Some(k), thread) => {
                    let Ok(k) = u64::from_str_radix(k, 16) else {
                        continue;
                    };
                    let entry = (k, thread.unwrap_or("").to_string());
                    if tag == "c" {
                        rec.culprits.push(entry);
                    } else {
                        rec.others.push(entry);
                    }
                }
                _ => {}
            }
        }
        seen.then_some(rec)
    }

    /// The items the crash is laid at (see the module docs), each once.
    fn blamed(&self) -> Vec<(u64, String)> {
        let from = if self.culprits.is_empty() {
            &self.others
        } else {
            &self.culprits
        };
        let mut seen = HashSet::new();
        from.iter()
            .filter(|(k, _)| seen.insert(*k))
            .cloned()
            .collect()
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        n => format!("signal {n}"),
    }
}

/// Apply the last run's crash record to the states of the items it names (`items`: the
/// names in `work/`). The record itself is emptied later, by [`arm_crash_record`], once
/// these saves are done.
fn apply_crash_record(layout: &Layout, items: &[OsString]) -> std::io::Result<()> {
    let bytes = match std::fs::read(layout.work.join(CRASH_RECORD)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(rec) = CrashRecord::parse(&bytes) else {
        return Ok(());
    };
    let by_key: HashMap<u64, &OsString> = items.iter().map(|n| (crash::key(n), n)).collect();
    let blamed = rec.blamed();
    let alone = blamed.len() == 1;
    let signal = signal_name(rec.signal);
    for (k, thread) in &blamed {
        let Some(name) = by_key.get(k) else {
            continue; // finished before the crash
        };
        let mut st = state::load(&layout.work, name)?.unwrap_or_default();
        st.name = name.to_string_lossy().into_owned();
        st.suspect = true;
        if alone {
            st.crashes += 1;
            st.last_crash = Some(format!("{signal} in {thread}"));
        }
        if let Err(e) = state::save(&layout.work, name, &st, true) {
            // Not fatal (the daemon must start on a full disk too), but never silent.
            tracing::error!(file = ?name, %signal, error = %e, "cannot record that the last run crashed on this file; it is not counted");
            continue;
        }
        tracing::warn!(file = ?name, %signal, thread = %thread, counted = alone, crashes = st.crashes, "the last run crashed while working on this file; it runs alone next");
    }
    if blamed.is_empty() {
        tracing::warn!(%signal, "the last run crashed while no file was being worked on");
    }
    Ok(())
}

/// Empty the crash record (after [`startup`] applied it) and preallocate its room; the
/// file to hand to [`crash::record_to`].
pub fn arm_crash_record(layout: &Layout) -> std::io::Result<File> {
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(layout.work.join(CRASH_RECORD))?;
    // What posix_fallocate(3) does: fallocate(2), and where the filesystem has no
    // fallocate, zeros written over the range (at offset 0 with pwrite: the record is
    // written from the start). Should both fail, the record is written on demand, which
    // only fails on a full disk.
    let r = rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::empty(),
        0,
        CRASH_RECORD_BYTES,
    );
    if r == Err(rustix::io::Errno::OPNOTSUPP) {
        use std::os::unix::fs::FileExt;
        let _ = f.write_all_at(&vec![0; CRASH_RECORD_BYTES as usize], 0);
    }
    Ok(f)
}

/// Start-up: remove temporary leftovers of interrupted writes, finish or drop state files
/// whose item is gone, apply the last run's crash record, and return the items to resume.
pub fn startup(layout: &Layout) -> std::io::Result<Recovered> {
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
    let mut params = Vec::new();
    for e in std::fs::read_dir(&layout.work)? {
        let n = e?.file_name();
        if n.to_string_lossy().starts_with(STATE_PREFIX) {
            states.push(n);
        } else if n.to_string_lossy().starts_with(PARAMS_PREFIX) {
            params.push(n);
        } else if !n.to_string_lossy().starts_with('.') {
            items.push(n);
        }
    }
    let claimed: HashSet<std::path::PathBuf> = items
        .iter()
        .map(|n| super::params::claimed_path(layout, n))
        .collect();
    for p in params {
        if !claimed.contains(&layout.work.join(&p)) {
            super::params::orphan(layout, &p);
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
    apply_crash_record(layout, &items)?;
    let mut out = Recovered::default();
    for n in items {
        let suspect = matches!(state::load(&layout.work, &n), Ok(Some(st)) if st.suspect);
        if suspect {
            out.isolate.push(n);
        } else {
            out.resume.push(n);
        }
    }
    Ok(out)
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
        fail_item(layout, name, &reason, Stage::Claim)?;
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
        fail_item(layout, name, &reason, Stage::Claim)?;
        return Ok(Begin::Failed(reason));
    }
    if st.crashes >= max_attempts {
        let reason = format!(
            "hotpipe crashed {} times while working on this file (last: {}); quarantined so \
             that it cannot crash-loop the service (hotfolder.max_attempts = {max_attempts})",
            st.crashes,
            st.last_crash.as_deref().unwrap_or("unknown")
        );
        fail_item(layout, name, &reason, Stage::Claim)?;
        return Ok(Begin::Failed(reason));
    }
    if !st.outputs.is_empty() {
        st.outputs.clear();
        state::save(&layout.work, name, &st, false)?;
    }
    Ok(Begin::Process)
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

    fn record(l: &Layout, lines: &[String]) {
        let mut text = String::from("signal 6\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        // As the handler leaves it: the record, then the preallocated rest as NULs.
        let mut bytes = text.into_bytes();
        bytes.resize(4096, 0);
        std::fs::write(l.work.join(CRASH_RECORD), bytes).unwrap();
    }

    fn key(n: &str) -> String {
        format!("{:016x}", crash::key(OsStr::new(n)))
    }

    fn crashes(l: &Layout, n: &str) -> u32 {
        state::load(&l.work, OsStr::new(n))
            .unwrap()
            .map_or(0, |s| s.crashes)
    }

    #[test]
    fn only_a_crash_that_names_an_item_alone_counts() {
        let (_d, l) = layout();
        for n in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] {
            std::fs::write(l.work.join(n), b"data").unwrap();
        }
        // No record (a SIGKILL): nobody is blamed, nothing is isolated.
        let r = startup(&l).unwrap();
        assert!(r.isolate.is_empty() && r.resume.len() == 4, "{r:?}");
        // The decoder holding a.jpg crashed while b.jpg was on another thread.
        record(
            &l,
            &[
                format!("c {} hp-decode-0", key("a.jpg")),
                format!("o {} hp-decode-1", key("b.jpg")),
            ],
        );
        let r = startup(&l).unwrap();
        assert_eq!(r.isolate, vec![OsString::from("a.jpg")]);
        assert_eq!((crashes(&l, "a.jpg"), crashes(&l, "b.jpg")), (1, 0));
        // The record is applied once: arming empties it.
        drop(arm_crash_record(&l).unwrap());
        startup(&l).unwrap();
        assert_eq!(crashes(&l, "a.jpg"), 1);
        // A batch crashed in the model: c.jpg and d.jpg are suspects, neither is counted.
        record(
            &l,
            &[
                format!("c {} hp-infer-0", key("c.jpg")),
                format!("c {} hp-infer-0", key("d.jpg")),
            ],
        );
        let r = startup(&l).unwrap();
        assert_eq!(
            r.isolate,
            vec![OsString::from("a.jpg"), "c.jpg".into(), "d.jpg".into()]
        );
        assert_eq!(r.resume, vec![OsString::from("b.jpg")]);
        assert_eq!((crashes(&l, "c.jpg"), crashes(&l, "d.jpg")), (0, 0));
        // A crash on a thread that held nothing, with one item held elsewhere: that one.
        record(&l, &[format!("o {} hp-infer-0", key("d.jpg"))]);
        startup(&l).unwrap();
        assert_eq!(crashes(&l, "d.jpg"), 1);
    }

    #[test]
    fn an_item_that_crashes_max_attempts_times_is_quarantined() {
        let (_d, l) = layout();
        let n = OsStr::new("x.jpg");
        std::fs::write(l.work.join(n), b"data").unwrap();
        record(&l, &[format!("c {} hp-decode-0", key("x.jpg"))]);
        startup(&l).unwrap();
        assert_eq!(begin(&l, n, 2, OnSuccess::Move).unwrap(), Begin::Process);
        record(&l, &[format!("c {} hp-decode-0", key("x.jpg"))]);
        startup(&l).unwrap();
        assert!(matches!(
            begin(&l, n, 2, OnSuccess::Move).unwrap(),
            Begin::Failed(_)
        ));
        assert!(l.failed.join("x.jpg").is_file());
        let side = std::fs::read_to_string(l.failed.join("x.jpg.error.json")).unwrap();
        assert!(side.contains("hotpipe crashed 2 times"), "{side}");
        assert!(side.contains("SIGABRT in hp-decode-0"), "{side}");
        assert!(side.contains("\"crashes\": 2"), "{side}");
        assert_eq!(names_in(&l.work), Vec::<String>::new());
    }

    fn names_in(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != CRASH_RECORD)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn published_output_is_only_moved_on() {
        let (_d, l) = layout();
        let n = OsStr::new("y.jpg");
        std::fs::write(l.work.join(n), b"data").unwrap();
        assert_eq!(begin(&l, n, 3, OnSuccess::Move).unwrap(), Begin::Process);
        // Simulate a crash right after the output's rename.
        std::fs::write(l.outbox.join("y.jpg"), b"out").unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(l.outbox.join("y.jpg")).unwrap().ino();
        let mut st = state::load(&l.work, n).unwrap().unwrap_or_default();
        st.outputs.push(state::Output {
            file: "y.jpg".into(),
            ino,
        });
        state::save(&l.work, n, &st, true).unwrap();
        std::fs::write(l.outbox.join(".y.1.2.hotpipe-tmp"), b"partial").unwrap();
        assert_eq!(startup(&l).unwrap().resume, vec![OsString::from("y.jpg")]);
        assert_eq!(begin(&l, n, 3, OnSuccess::Move).unwrap(), Begin::Finished);
        assert!(l.done.join("y.jpg").is_file());
        assert_eq!(std::fs::read_dir(&l.outbox).unwrap().count(), 1);
        assert_eq!(names_in(&l.work), Vec::<String>::new());
    }

    #[test]
    fn symlink_and_fifo_are_moved_not_followed_or_opened() {
        let (d, l) = layout();
        let target = d.path().join("secret");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, l.work.join("link.jpg")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            l.work.join("p.jpg"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
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
