//! Watching the inbox: a notify watcher whose only job is to nudge the scan loop.
//!
//! Events are hints: an event that can mean a new or changed entry (a create, a rename
//! in, a write or a writer closing, an overflow or "rescan" flag, an error) becomes one
//! `try_send` on a channel of capacity one, so the callback never blocks and a burst of
//! events collapses into one scan of the listing, which is the truth. Access events are
//! dropped: the scan's own `read_dir` opens and closes the inbox, and inotify reports
//! that as `IN_OPEN`/`IN_CLOSE_NOWRITE` on the watched directory, so passing them on made
//! every scan nudge the next one (an idle daemon spun at 0.8 of a core). The watcher is armed before the initial scan, so nothing arriving in between
//! is missed. Symlinks are not followed. `poll` serves NFS/SMB inboxes (inotify sees no
//! remote changes); `none` leaves discovery to the periodic rescan alone.
//!
//! With inotify the watcher also keeps [`Writers`]: the inbox files a writer still has
//! open (written to, or created, and no `IN_CLOSE_WRITE` since). A producer that pauses
//! longer than `settle_ms` mid-file (a slow copy, a stalled network write) looks settled
//! by size and mtime, and claiming it then fails a file that would have been complete;
//! the scan does not claim such a file on settle time alone.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use notify::Watcher;

use super::HotfolderError;
use crate::config::WatcherKind;

/// Keeps the watcher alive; dropping it stops the events.
pub struct Watch {
    _watcher: Option<Box<dyn Watcher + Send>>,
    /// With no watcher, the nudge channel's sender, held so the channel stays open.
    _idle: Option<Sender<()>>,
    writers: Option<Writers>,
}

impl Watch {
    /// Open writers as inotify reports them (`None` with the other watchers).
    pub fn writers(&self) -> Option<Writers> {
        self.writers.clone()
    }
}

/// How many inbox files with an open writer are tracked at most: past that the rest are
/// judged by settle time alone (a bound on memory, not a limit anyone should reach).
const MAX_WRITERS: usize = 65_536;

/// A file written without a close since is taken for open this long at most (a writer
/// that never closes must not hold its file back forever).
const WRITER_TIMEOUT: Duration = Duration::from_secs(600);

/// What inotify said about one inbox file since its last close-after-write.
#[derive(Debug, Clone, Copy)]
struct Writer {
    /// The last create or write.
    at: Instant,
    /// Written to (not only created: a hard link made into the inbox reports a create
    /// and never a close, so a create alone only counts while the file is empty).
    wrote: bool,
}

/// Inbox files a writer has open, by name.
#[derive(Clone, Default)]
pub struct Writers(Arc<Mutex<HashMap<OsString, Writer>>>);

impl Writers {
    /// True while `name` (now `len` bytes) has had a write, or a create and no bytes yet,
    /// and no close-after-write since (for at most [`WRITER_TIMEOUT`]).
    pub fn is_open(&self, name: &OsStr, len: u64) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name)
            .is_some_and(|w| (w.wrote || len == 0) && w.at.elapsed() < WRITER_TIMEOUT)
    }

    fn event(&self, ev: &notify::Event) {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
        let Some(name) = ev.paths.first().and_then(|p| p.file_name()) else {
            return;
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let wrote = match ev.kind {
            EventKind::Create(CreateKind::File) => false,
            EventKind::Modify(ModifyKind::Data(_)) => true,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::Both)) => {
                map.remove(name);
                return;
            }
            _ => return,
        };
        if map.len() < MAX_WRITERS || map.contains_key(name) {
            let w = map.entry(name.to_os_string()).or_insert(Writer {
                at: Instant::now(),
                wrote,
            });
            w.at = Instant::now();
            w.wrote |= wrote;
        }
    }
}

/// Start watching `inbox`; each event nudges `nudge` (never blocking).
pub fn arm(
    kind: WatcherKind,
    inbox: &Path,
    poll: Duration,
    nudge: Sender<()>,
) -> Result<Watch, HotfolderError> {
    let cfg = notify::Config::default()
        .with_follow_symlinks(false)
        .with_poll_interval(poll);
    let err = |e: notify::Error| HotfolderError::Watch {
        path: inbox.to_path_buf(),
        message: e.to_string(),
    };
    let mut writers = None;
    let mut watcher: Box<dyn Watcher + Send> = match kind {
        WatcherKind::None => {
            // Keep the sender alive: a dropped one disconnects the channel, and a receive
            // on a disconnected channel returns at once, forever (a 100% busy loop).
            return Ok(Watch {
                _watcher: None,
                _idle: Some(nudge),
                writers: None,
            });
        }
        WatcherKind::Inotify => {
            let w = Writers::default();
            writers = Some(w.clone());
            Box::new(notify::RecommendedWatcher::new(nudger(nudge, Some(w)), cfg).map_err(err)?)
        }
        WatcherKind::Poll => {
            Box::new(notify::PollWatcher::new(nudger(nudge, None), cfg).map_err(err)?)
        }
    };
    watcher
        .watch(inbox, notify::RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(Watch {
        _watcher: Some(watcher),
        _idle: None,
        writers,
    })
}

/// The watcher's callback: one non-blocking nudge per event that [`wants_scan`], after
/// the open writers are updated.
fn nudger(
    nudge: Sender<()>,
    writers: Option<Writers>,
) -> impl Fn(notify::Result<notify::Event>) + Send + 'static {
    move |ev| {
        if let (Some(w), Ok(ev)) = (&writers, &ev) {
            w.event(ev);
        }
        if wants_scan(&ev) {
            let _ = nudge.try_send(());
        }
    }
}

/// Whether an event can mean that the listing changed (or that we cannot know).
fn wants_scan(ev: &notify::Result<notify::Event>) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match ev {
        Err(_) => true,
        Ok(ev) if ev.need_rescan() => true,
        // A writer closing its file may make it ready sooner than the settle timer.
        Ok(ev) => match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, Flag};
    use notify::{Event, EventKind};

    #[test]
    fn reads_of_the_inbox_do_not_nudge_a_scan() {
        let ev = |k| Ok(Event::new(k));
        assert!(!wants_scan(&ev(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!wants_scan(&ev(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(wants_scan(&ev(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        )))));
        assert!(wants_scan(&ev(EventKind::Create(CreateKind::File))));
        assert!(wants_scan(&Ok(
            Event::new(EventKind::Other).set_flag(Flag::Rescan)
        )));
        assert!(wants_scan(&Err(notify::Error::generic("overflow"))));
    }

    #[test]
    fn a_file_is_open_from_its_first_write_to_its_close() {
        use notify::event::{DataChange, ModifyKind, RemoveKind, RenameMode};
        let w = Writers::default();
        let ev = |k, p: &str| Event::new(k).add_path(format!("/in/{p}").into());
        let open = |n: &str| w.is_open(OsStr::new(n), 100);
        w.event(&ev(EventKind::Create(CreateKind::File), "a.jpg"));
        assert!(
            w.is_open(OsStr::new("a.jpg"), 0),
            "created, nothing written yet"
        );
        assert!(
            !open("a.jpg"),
            "created with bytes: a hard link, never closed"
        );
        w.event(&ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "a.jpg",
        ));
        assert!(open("a.jpg"));
        w.event(&ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "a.jpg",
        ));
        assert!(!open("a.jpg"));
        // Reopened and written (an append): open again until closed.
        w.event(&ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "a.jpg",
        ));
        assert!(open("a.jpg"));
        w.event(&ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            "a.jpg",
        ));
        assert!(!open("a.jpg"), "renamed away (claimed)");
        w.event(&ev(EventKind::Create(CreateKind::File), "b.jpg"));
        w.event(&ev(EventKind::Remove(RemoveKind::File), "b.jpg"));
        assert!(!open("b.jpg"));
        // Opening for reading (the scan's own reads, a viewer) says nothing.
        w.event(&ev(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            "c.jpg",
        ));
        assert!(!open("c.jpg"));
    }
}
