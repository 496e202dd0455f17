//! Watching the inbox: a notify watcher whose only job is to nudge the scan loop.
//!
//! Events are hints: any event (a create, a rename in, an overflow or "rescan" flag, an
//! error) becomes one `try_send` on a channel of capacity one, so the callback never
//! blocks and a burst of events collapses into one scan of the listing, which is the
//! truth. The watcher is armed before the initial scan, so nothing arriving in between
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
}

/// Start watching `inbox`; each event nudges `nudge` (never blocking).
pub fn arm(
    kind: WatcherKind,
    inbox: &Path,
    poll: Duration,
    nudge: Sender<()>,
) -> Result<Watch, HotfolderError> {
    let handler = move |_ev: notify::Result<notify::Event>| {
        let _ = nudge.try_send(());
    };
    let cfg = notify::Config::default()
        .with_follow_symlinks(false)
        .with_poll_interval(poll);
    let err = |e: notify::Error| HotfolderError::Watch {
        path: inbox.to_path_buf(),
        message: e.to_string(),
    };
    let mut watcher: Box<dyn Watcher + Send> = match kind {
        WatcherKind::None => return Ok(Watch { _watcher: None }),
        WatcherKind::Inotify => {
            Box::new(notify::RecommendedWatcher::new(handler, cfg).map_err(err)?)
        }
        WatcherKind::Poll => Box::new(notify::PollWatcher::new(handler, cfg).map_err(err)?),
    };
    watcher
        .watch(inbox, notify::RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(Watch {
        _watcher: Some(watcher),
    })
}
