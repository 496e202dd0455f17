//! Fault points for tests: injected panics, aborts, I/O errors and device out-of-memory
//! errors at named points of the pipeline, so the tests can prove what happens to an item
//! (and to the daemon) when a stage fails in a way real inputs rarely make it fail.
//!
//! Compiled only with the `fault-injection` cargo feature. Without it [`check`] is an
//! empty inline function returning `None` and the release binary holds no fault code,
//! no rule table and no environment lookup.
//!
//! Rules come from `HOTPIPE_FAULTS` (read once) and from [`arm`] (in-process tests),
//! separated by `,`, each `point:fault:times:pattern`:
//! - `point`: a stage name (`read`, `decode`, `detect`, `fit`, `encode`; checked by the
//!   stage runner before the stage sees the item), `infer` (each forward call of more
//!   than one row), `publish-mid` (after an item's image is renamed into `outbox/`
//!   and before its sidecar is), or `load` (the daemon's start-up, before the pipeline
//!   loads its models; the pattern matches the config's path);
//! - `fault`: `panic`, `abort` (the whole process, as a crash would), `oom`, `stall`
//!   (three seconds' sleep: a slow model load), or an errno name: `eio`, `emfile`,
//!   `enospc`, `eacces`;
//! - `times`: how many hits before the rule is spent (empty: every hit);
//! - `pattern`: a substring of the item's path (empty: every item). Last, so it may
//!   hold `:`. In-process tests use their temp dir, so parallel tests never share a rule.

use std::path::Path;

/// What a fault point is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Panic,
    Abort,
    Oom,
    /// Three seconds of sleep, as a large model's load would take.
    Stall,
    /// An I/O error with this errno.
    Errno(i32),
}

impl Fault {
    /// A fault as the error a stage would return (`None` for panics and aborts, which
    /// [`Fault::act`] performs instead).
    pub fn as_io_error(self) -> Option<std::io::Error> {
        match self {
            Fault::Errno(n) => Some(std::io::Error::from_raw_os_error(n)),
            _ => None,
        }
    }

    /// Perform the faults that are not errors: panic, or abort the process.
    pub fn act(self, point: &str) {
        match self {
            Fault::Panic => panic!("injected panic at {point}"),
            Fault::Abort => {
                eprintln!("hotpipe: injected abort at {point}");
                std::process::abort()
            }
            Fault::Stall => std::thread::sleep(std::time::Duration::from_secs(3)),
            Fault::Oom | Fault::Errno(_) => {}
        }
    }
}

/// The fault armed for `point` and an item at `path`, if any (counting one hit).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn check(_point: &str, _path: &Path) -> Option<Fault> {
    None
}

/// The fault armed for `point` and an item at `path`, if any (counting one hit).
#[cfg(feature = "fault-injection")]
pub fn check(point: &str, path: &Path) -> Option<Fault> {
    let path = path.to_string_lossy();
    let mut rules = table().lock().unwrap_or_else(|p| p.into_inner());
    let rule = rules
        .iter_mut()
        .find(|r| r.point == point && r.left != Some(0) && path.contains(r.pattern.as_str()))?;
    if let Some(n) = rule.left.as_mut() {
        *n -= 1;
    }
    Some(rule.fault)
}

/// Add rules (same syntax as `HOTPIPE_FAULTS`) for the rest of the process.
#[cfg(feature = "fault-injection")]
pub fn arm(spec: &str) {
    let parsed = parse(spec).unwrap_or_else(|e| panic!("bad fault rule {spec:?}: {e}"));
    table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(parsed);
}

#[cfg(feature = "fault-injection")]
#[derive(Debug)]
struct Rule {
    point: String,
    fault: Fault,
    left: Option<usize>,
    pattern: String,
}

#[cfg(feature = "fault-injection")]
fn table() -> &'static std::sync::Mutex<Vec<Rule>> {
    static TABLE: std::sync::OnceLock<std::sync::Mutex<Vec<Rule>>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let spec = std::env::var("HOTPIPE_FAULTS").unwrap_or_default();
        let rules = parse(&spec).unwrap_or_else(|e| panic!("HOTPIPE_FAULTS={spec:?}: {e}"));
        std::sync::Mutex::new(rules)
    })
}

#[cfg(feature = "fault-injection")]
fn parse(spec: &str) -> Result<Vec<Rule>, String> {
    spec.split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| {
            let mut parts = r.trim().splitn(4, ':');
            let mut next = || parts.next().unwrap_or("");
            let (point, fault, times, pattern) = (next(), next(), next(), next());
            let fault = match fault {
                "panic" => Fault::Panic,
                "abort" => Fault::Abort,
                "oom" => Fault::Oom,
                "stall" => Fault::Stall,
                "eio" => Fault::Errno(libc::EIO),
                "emfile" => Fault::Errno(libc::EMFILE),
                "enospc" => Fault::Errno(libc::ENOSPC),
                "eacces" => Fault::Errno(libc::EACCES),
                other => return Err(format!("unknown fault {other:?}")),
            };
            let left = match times {
                "" => None,
                n => Some(n.parse().map_err(|_| format!("bad count {n:?}"))?),
            };
            Ok(Rule {
                point: point.to_string(),
                fault,
                left,
                pattern: pattern.to_string(),
            })
        })
        .collect()
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn rules_match_point_and_path_and_run_out() {
        arm("decode:panic::/unit-fault-test/a.jpg,read:eio:2:/unit-fault-test/");
        let (a, b) = (
            Path::new("/unit-fault-test/a.jpg"),
            Path::new("/unit-fault-test/b.jpg"),
        );
        assert_eq!(check("decode", a), Some(Fault::Panic));
        assert_eq!(
            check("decode", a),
            Some(Fault::Panic),
            "no count: every hit"
        );
        assert_eq!(check("decode", b), None);
        assert_eq!(check("read", b), Some(Fault::Errno(libc::EIO)));
        assert_eq!(check("read", a), Some(Fault::Errno(libc::EIO)));
        assert_eq!(check("read", a), None, "two hits, then spent");
        assert!(parse("read:boom::").is_err());
    }
}
