//! What the status page shows that the counters do not: the daemon's phase, the running
//! model and devices, the last outcomes with their latency, the last failures with their
//! reasons, and outcomes per minute over the last hour.
//!
//! Everything is a fixed-size ring (names cut to [`NAME_MAX`] characters, reasons to
//! [`REASON_MAX`]), so a daemon that runs for months holds the same few kilobytes here
//! whatever it has seen. One mutex: written once per outcome, read once per page view.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Outcomes kept for the page's table.
pub const OUTCOMES: usize = 20;
/// Failures kept with their reasons.
pub const FAILURES: usize = 100;
/// Minutes of throughput history (the chart).
pub const MINUTES: usize = 60;
const NAME_MAX: usize = 200;
const REASON_MAX: usize = 500;

/// One handled item, as the page lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    /// Claim to outcome.
    pub ms: u64,
    /// The output's name when done; `stage: reason` when failed.
    pub detail: String,
}

/// The running daemon's phase, as the page's "state" says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Reloading,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Reloading => "reloading",
            Phase::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    model: String,
    devices: String,
    outcomes: VecDeque<Outcome>,
    failures: VecDeque<Outcome>,
    /// Outcomes per minute; `per_minute[m % MINUTES]` is minute `m` since `started`
    /// while `m` is within the last [`MINUTES`] of `minute`.
    per_minute: [u64; MINUTES],
    /// The minute `per_minute` was last brought up to date for.
    minute: u64,
}

/// The rings, shared by the main loop (writer) and the HTTP thread (reader).
#[derive(Debug)]
pub struct Recent {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                phase: Phase::Starting,
                model: String::new(),
                devices: String::new(),
                outcomes: VecDeque::with_capacity(OUTCOMES),
                failures: VecDeque::with_capacity(FAILURES),
                per_minute: [0; MINUTES],
                minute: 0,
            }),
        }
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Inner {
    /// Zero the minutes between the last update and `now` (they saw no outcome).
    fn advance(&mut self, now: u64) {
        let gap = now.saturating_sub(self.minute).min(MINUTES as u64);
        for m in 1..=gap {
            self.per_minute[((self.minute + m) % MINUTES as u64) as usize] = 0;
        }
        self.minute = self.minute.max(now);
    }
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    pub fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    /// The model and devices of the session that just became ready.
    pub fn set_running(&self, model: &str, devices: &str) {
        let mut g = self.lock();
        g.phase = Phase::Ready;
        g.model = cut(model, NAME_MAX);
        g.devices = cut(devices, NAME_MAX);
    }

    /// An item's outcome (done, or failed for good: moved to `failed/`).
    pub fn record(&self, name: &str, ok: bool, ms: u64, detail: &str) {
        self.record_at(self.now_minute(), name, ok, ms, detail);
    }

    fn record_at(&self, minute: u64, name: &str, ok: bool, ms: u64, detail: &str) {
        let o = Outcome {
            name: cut(name, NAME_MAX),
            ok,
            ms,
            detail: cut(detail, REASON_MAX),
        };
        let mut g = self.lock();
        g.advance(minute);
        g.per_minute[(minute % MINUTES as u64) as usize] += 1;
        if !ok {
            if g.failures.len() == FAILURES {
                g.failures.pop_front();
            }
            g.failures.push_back(o.clone());
        }
        if g.outcomes.len() == OUTCOMES {
            g.outcomes.pop_front();
        }
        g.outcomes.push_back(o);
    }

    /// What the page shows, copied out under the lock.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(self.now_minute())
    }

    fn snapshot_at(&self, minute: u64) -> Snapshot {
        let mut g = self.lock();
        g.advance(minute);
        // Oldest minute first; the last entry is the current (partial) minute.
        let per_minute = (0..MINUTES as u64)
            .map(|k| {
                let m = (g.minute + 1 + k) % MINUTES as u64;
                g.per_minute[m as usize]
            })
            .collect();
        Snapshot {
            phase: g.phase,
            model: g.model.clone(),
            devices: g.devices.clone(),
            outcomes: g.outcomes.iter().rev().cloned().collect(),
            failures: g.failures.iter().rev().cloned().collect(),
            per_minute,
        }
    }
}

/// A copy of [`Recent`] for one page: newest outcomes and failures first, minutes oldest
/// first.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub phase: Phase,
    pub model: String,
    pub devices: String,
    pub outcomes: Vec<Outcome>,
    pub failures: Vec<Outcome>,
    pub per_minute: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_bounded_and_newest_first() {
        let r = Recent::default();
        for i in 0..(FAILURES + 5) {
            r.record_at(0, &format!("f{i}"), false, 1, "decode: bad");
        }
        r.record_at(0, "ok", true, 2, "ok.jpg");
        let s = r.snapshot_at(0);
        assert_eq!(s.failures.len(), FAILURES);
        assert_eq!(s.failures[0].name, format!("f{}", FAILURES + 4));
        assert_eq!(s.outcomes.len(), OUTCOMES);
        assert_eq!(s.outcomes[0].name, "ok");
        assert_eq!(s.per_minute[MINUTES - 1], FAILURES as u64 + 6);
    }

    #[test]
    fn minutes_roll_over_and_expire() {
        let r = Recent::default();
        r.record_at(0, "a", true, 1, "");
        r.record_at(0, "b", true, 1, "");
        r.record_at(2, "c", true, 1, "");
        let s = r.snapshot_at(2);
        assert_eq!(&s.per_minute[MINUTES - 3..], &[2, 0, 1]);
        // An hour later minute 2 is gone.
        let s = r.snapshot_at(2 + MINUTES as u64);
        assert_eq!(s.per_minute.iter().sum::<u64>(), 0);
        // After a long gap every slot was cleared, not only the ones written.
        r.record_at(1000, "d", true, 1, "");
        assert_eq!(r.snapshot_at(1000).per_minute.iter().sum::<u64>(), 1);
    }

    #[test]
    fn long_names_are_cut() {
        let r = Recent::default();
        let long = "é".repeat(NAME_MAX + 10);
        r.record_at(0, &long, true, 1, "");
        let name = &r.snapshot_at(0).outcomes[0].name;
        assert_eq!(name.chars().count(), NAME_MAX + 1);
        assert!(name.ends_with('…'));
    }
}
