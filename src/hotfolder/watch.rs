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

use std::path::Path;
use std::time::Duration;

use crossbeam_channel::Sender;
use notify::Watcher;

use super::HotfolderError;
use crate::config::WatcherKind;

/// Keeps the watcher alive; dropping it stops the events.
pub struct Watch {
    _watcher: Option<Box<dyn Watcher + Send>>,
    /// With no watcher, the nudge channel's sender, held so the channel stays open.
    _idle: Option<Sender<()>>,
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
    let mut watcher: Box<dyn Watcher + Send> = match kind {
        WatcherKind::None => {
            // Keep the sender alive: a dropped one disconnects the channel, and a receive
            // on a disconnected channel returns at once, forever (a 100% busy loop).
            return Ok(Watch {
                _watcher: None,
                _idle: Some(nudge),
            });
        }
        WatcherKind::Inotify => {
            Box::new(notify::RecommendedWatcher::new(nudger(nudge), cfg).map_err(err)?)
        }
        WatcherKind::Poll => Box::new(notify::PollWatcher::new(nudger(nudge), cfg).map_err(err)?),
    };
    watcher
        .watch(inbox, notify::RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(Watch {
        _watcher: Some(watcher),
        _idle: None,
    })
}

/// The watcher's callback: one non-blocking nudge per event that [`wants_scan`].
fn nudger(nudge: Sender<()>) -> impl Fn(notify::Result<notify::Event>) + Send + 'static {
    move |ev| {
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
}
