//! hotpipe as systemd runs it.
//!
//! - `notify_protocol_*`: the daemon with a notify socket this test owns, as systemd would
//!   give it one (any user): what it says at start, reload, a failed reload and stop, in
//!   order, with `MONOTONIC_USEC` checked against this process's clock.
//! - `installed_service_*`: `scripts/install-service.sh` and the shipped unit under a real
//!   systemd (root only). This machine's PID 1 is not systemd, so the test boots one: a
//!   systemd 252 as PID 1 of new PID, mount, UTS and IPC namespaces, with a tmpfs on
//!   `/run` and overlays on `/etc` and `/var/lib` (users, the unit, the config and the
//!   state directory land in the overlays and vanish with the namespaces), and a unit path
//!   of its own: a target with nothing in it but journald, and empty `sysinit.target` and
//!   `basic.target` (the real ones would run tmpfiles, udev and sysctl on the shared host
//!   filesystem; tmpfiles empties /tmp). The install goes to a scratch prefix under `/srv`,
//!   on the real filesystem (the venv's libraries are hard-linked, not copied) and outside
//!   the unit's PrivateTmp and ProtectHome. Then: start (READY=1), a photo dropped by an
//!   operator in the service's group is processed, reload, stop within the grace, a broken
//!   config exits 78 and is not restarted, the unit's exposure, uninstall and purge.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// The notify socket's messages, one datagram each, in arrival order.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket { sock, path }
    }

    /// Messages until one contains `needle` (which is returned last); panics with what
    /// came after `timeout`.
    fn until(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok(n) = self.sock.recv(&mut buf) else {
                break;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.contains(needle);
            got.push(msg);
            if hit {
                return got;
            }
        }
        panic!("no `{needle}` from the daemon within {timeout:?}; got {got:?}");
    }
}

fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn config(dir: &Path) -> PathBuf {
    write(
        &dir.join("p.toml"),
        "[preprocess]\nsize = 64\n\n[pipeline]\ndecode_threads = 1\nfit_threads = 1\nencode_threads = 1\n\n[hotfolder]\nroot = \"hf\"\nsettle_ms = 0\nshutdown_grace_s = 7\n\n[metrics]\nlisten = \"off\"\n",
    )
}

#[test]
fn notify_protocol_start_reload_stop() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let notify = NotifySocket::bind(d.path());
    let daemon = Daemon::start(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            // A load that takes 3 s: the start timeout must be extended meanwhile.
            ("HOTPIPE_FAULTS", "load:stall:1:p.toml"),
        ],
    );
    let start = notify.until("READY=1", Duration::from_secs(60));
    assert!(
        start
            .iter()
            .any(|m| field(m, "EXTEND_TIMEOUT_USEC").is_some()),
        "no EXTEND_TIMEOUT_USEC while loading: {start:?}"
    );
    assert!(
        start.iter().any(|m| m == "WATCHDOG=1"),
        "watchdog not fed during start-up: {start:?}"
    );
    // Idle and healthy: the watchdog is fed every half period.
    notify.until("WATCHDOG=1", Duration::from_secs(5));

    // Reload: RELOADING=1 stamped after the signal, then READY=1 after the new start.
    let before = monotonic_usec();
    daemon.signal(libc::SIGHUP);
    let reload = notify.until("READY=1", Duration::from_secs(60));
    let reloading = reload
        .iter()
        .position(|m| m.starts_with("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1: {reload:?}"));
    let stamp: u64 = field(&reload[reloading], "MONOTONIC_USEC")
        .expect("RELOADING=1 without MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(
        stamp >= before && stamp <= monotonic_usec(),
        "MONOTONIC_USEC={stamp} not between the signal ({before}) and now"
    );
    daemon.expect_log("config reloaded", Duration::from_secs(5));
    deliver(&d.path().join("hf"), "a.jpg", &jpeg_bytes(1));
    assert!(wait_until(Duration::from_secs(30), || d
        .path()
        .join("hf/outbox/a.jpg")
        .exists()));

    // A broken config: the reload still ends (READY=1), saying it failed.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("size = 64", "size = 3")).unwrap();
    daemon.signal(libc::SIGHUP);
    let failed = notify.until("READY=1", Duration::from_secs(30));
    let ready = failed.last().unwrap();
    assert!(failed[0].starts_with("RELOADING=1"), "{failed:?}");
    assert!(
        field(ready, "STATUS")
            .is_some_and(|s| s.contains("reload failed") && s.contains("preprocess.size")),
        "{ready}"
    );

    // Stop: STOPPING=1 and the stop timeout extended to the grace (7 s) plus the margin.
    let (code, _) = daemon.stop();
    assert_eq!(code, Some(0));
    let stop = notify.until("STOPPING=1", Duration::from_secs(10));
    let extend = notify.until("EXTEND_TIMEOUT_USEC", Duration::from_secs(5));
    assert_eq!(
        field(extend.last().unwrap(), "EXTEND_TIMEOUT_USEC"),
        Some("22000000"),
        "{stop:?} {extend:?}"
    );
}

/// A systemd booted as PID 1 of its own namespaces (see the module docs); killed, with
/// everything it started, when dropped.
struct Systemd {
    unshare: std::process::Child,
    /// systemd's PID as this process sees it: what `nsenter` enters.
    pid: u32,
}

impl Systemd {
    fn boot(scratch: &Path) -> Systemd {
        for d in ["etc.upper", "etc.work", "varlib.upper", "varlib.work"] {
            std::fs::create_dir_all(scratch.join(d)).unwrap();
        }
        let s = scratch.display();
        let boot = write(
            &scratch.join("boot.sh"),
            &format!(
                r#"set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t overlay overlay -o lowerdir=/etc,upperdir={s}/etc.upper,workdir={s}/etc.work /etc
mount -t overlay overlay -o lowerdir=/var/lib,upperdir={s}/varlib.upper,workdir={s}/varlib.work /var/lib
# Only these units exist for this systemd: the host's enabled ones (timesyncd, ...) are
# removed from the overlay, and sysinit.target and basic.target, which every service
# with default dependencies pulls in, are empty (the real ones run tmpfiles, which empties
# the shared /tmp, udev, sysctl: all of it the host's business).
rm -rf /etc/systemd/system/*.wants
units=/run/hp-units
mkdir -p $units /run/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\n' > /run/systemd/journald.conf.d/volatile.conf
for t in sysinit basic; do printf '[Unit]\nDescription=%s (empty)\nDefaultDependencies=no\n' $t > $units/$t.target; done
printf '[Unit]\nDescription=hotpipe test\nDefaultDependencies=no\nWants=systemd-journald.socket systemd-journald.service\n' > $units/hp-test.target
cp /lib/systemd/system/systemd-journald.socket /lib/systemd/system/systemd-journald.service \
   /lib/systemd/system/systemd-journald-dev-log.socket $units/
export SYSTEMD_UNIT_PATH=/etc/systemd/system:$units container=hotpipe-test
exec /lib/systemd/systemd --system --unit=hp-test.target --log-target=null
"#
            ),
        );
        let unshare = Command::new("unshare")
            .args([
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--mount-proc",
                "--propagation",
                "private",
                "bash",
            ])
            .arg(&boot)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let mut pid = 0;
        assert!(
            wait_until(Duration::from_secs(10), || {
                pid = std::fs::read_to_string(&children)
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                pid != 0
            }),
            "unshare started no systemd"
        );
        let sd = Systemd { unshare, pid };
        assert!(
            wait_until(Duration::from_secs(30), || {
                let s = sd.sh("systemctl is-system-running 2>/dev/null || true");
                s.stdout.trim() == "running" || s.stdout.trim() == "degraded"
            }),
            "the namespace's systemd did not come up"
        );
        sd
    }

    /// `bash -c SCRIPT` inside the namespaces, as root.
    fn sh(&self, script: &str) -> Cli {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-p", "-u", "-i", "--"])
            .args(["bash", "-c", script])
            .output()
            .unwrap()
            .into()
    }

    /// Like [`Systemd::sh`], and it must succeed.
    fn ok(&self, script: &str) -> String {
        let r = self.sh(script);
        assert_eq!(
            r.code,
            Some(0),
            "`{script}` failed:\n{}\n{}\njournal:\n{}",
            r.stdout,
            r.stderr,
            self.sh("journalctl -u hotpipe --no-pager -n 50").stdout
        );
        r.stdout
    }

    fn show(&self, props: &str) -> String {
        self.ok(&format!("systemctl show hotpipe -p {props} --value"))
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init ends every process in it; its mounts go with
        // the mount namespace.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.unshare.wait();
    }
}

/// A folder removed however the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn can_boot_systemd() -> Result<(), &'static str> {
    if !nix_root() {
        return Err("booting a systemd in namespaces needs root");
    }
    for tool in ["unshare", "nsenter", "patchelf", "systemd-analyze"] {
        if which(tool).is_none() {
            return Err("needs unshare, nsenter, patchelf and systemd-analyze");
        }
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return Err("systemd is not installed");
    }
    Ok(())
}

#[test]
fn installed_service_under_a_real_systemd() {
    if let Err(why) = can_boot_systemd() {
        // Not a missing fixture: an ordinary user cannot run this at all, and the
        // notify test above checks the protocol for them.
        eprintln!("SKIPPED: {why}");
        return;
    }
    let Some(bench) = shared_bench() else {
        skip("no bench fixtures (astronaut.png)");
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !repo.join("models/mtcnn/pnet.pt").exists() {
        skip("models/mtcnn missing: run scripts/setup.sh");
        return;
    }
    // Everything on the real filesystem, outside /tmp and /home (the unit hides both).
    let top = Scratch(PathBuf::from(format!(
        "/srv/hotpipe-it-{}",
        std::process::id()
    )));
    let (scratch, prefix) = (top.0.join("ns"), top.0.join("opt"));
    let sd = Systemd::boot(&scratch);
    let install = repo.join("scripts/install-service.sh");
    let bin = std::env::var("HOTPIPE_TEST_BIN").unwrap_or(env!("CARGO_BIN_EXE_hotpipe").into());
    let p = prefix.display();
    sd.ok(&format!(
        "{} --prefix {p} --binary {bin} >&2",
        install.display()
    ));

    // Started (systemctl restart returned, so READY=1 came) as its own user, with the
    // libraries from the prefix and the journal as its log.
    assert_eq!(sd.show("ActiveState").trim(), "active");
    let main_pid = sd.show("MainPID").trim().to_string();
    let status = sd.ok(&format!("cat /proc/{main_pid}/status"));
    let uid = sd.ok("id -u hotpipe");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(uid.trim())),
        "{status}"
    );
    let maps = sd.ok(&format!("cat /proc/{main_pid}/maps"));
    assert!(
        maps.contains(&format!("{p}/lib/torch/lib/libtorch_cpu.so")),
        "libtorch not from the prefix"
    );
    assert!(
        !maps.contains("/.cache/hotpipe/"),
        "libtorch from the build's venv"
    );

    // An operator in the service's group drops a photo; its face crop appears.
    sd.ok("useradd --no-create-home op && usermod -aG hotpipe op");
    std::fs::copy(bench.join("astronaut.png"), scratch.join("face.png")).unwrap();
    sd.ok(&format!(
        "runuser -u op -- cp {0}/face.png /var/lib/hotpipe/inbox/.face.png.part && runuser -u op -- mv /var/lib/hotpipe/inbox/.face.png.part /var/lib/hotpipe/inbox/face.png",
        scratch.display()
    ));
    assert!(
        wait_until(Duration::from_secs(60), || sd
            .sh("test -s /var/lib/hotpipe/outbox/face.jpg")
            .code
            == Some(0)),
        "no output; journal:\n{}",
        sd.sh("journalctl -u hotpipe --no-pager -n 50").stdout
    );
    assert_eq!(sd.ok("ls /var/lib/hotpipe/done").trim(), "face.png");
    // Logged to the journal with fields (stderr is its stream: JOURNAL_STREAM matched).
    let journal = sd.ok("journalctl -u hotpipe -o json --no-pager");
    assert!(
        journal.contains("\"SYSLOG_IDENTIFIER\":\"hotpipe\"")
            && journal.contains("\"MESSAGE\":\"done\""),
        "{journal}"
    );

    // Reload: the same process, a new session.
    sd.ok("systemctl reload hotpipe");
    assert!(wait_until(Duration::from_secs(30), || sd
        .sh("journalctl -u hotpipe --no-pager | grep -q 'config reloaded'")
        .code
        == Some(0)));
    assert_eq!(sd.show("MainPID").trim(), main_pid);
    assert_eq!(sd.show("ActiveState").trim(), "active");

    // Stop: within the grace (10 s by default), cleanly.
    let t = Instant::now();
    sd.ok("systemctl stop hotpipe");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(sd.show("ExecMainStatus").trim(), "0");
    assert_eq!(sd.show("Result").trim(), "success");

    // A broken config: exit 78, and no restart loop.
    sd.ok("sed -i 's/^quality = 90/quality = 900/' /etc/hotpipe/pipeline.toml");
    let r = sd.sh("systemctl start hotpipe");
    assert_ne!(r.code, Some(0));
    std::thread::sleep(Duration::from_secs(7)); // past RestartSec=5
    assert_eq!(sd.show("ExecMainStatus").trim(), "78");
    assert_eq!(sd.show("NRestarts").trim(), "0");
    assert_eq!(sd.show("ActiveState").trim(), "failed");
    let journal = sd.ok("journalctl -u hotpipe --no-pager");
    assert!(
        journal.contains("encode.quality"),
        "the error names the key:\n{journal}"
    );

    // The exposure the README quotes.
    let sec = sd.ok("systemd-analyze security hotpipe.service --no-pager");
    let exposure: f64 = sec
        .lines()
        .find_map(|l| l.split("hotpipe.service: ").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{sec}"));
    eprintln!("systemd-analyze security hotpipe.service: {exposure}");
    assert!(exposure <= 2.5, "exposure {exposure}:\n{sec}");

    // Uninstall keeps the config and the hot folder; purge removes them and the user.
    sd.ok(&format!(
        "{} --uninstall --prefix {p} >&2",
        install.display()
    ));
    assert!(!prefix.exists());
    sd.ok("test ! -e /etc/systemd/system/hotpipe.service && test -f /etc/hotpipe/pipeline.toml && test -f /var/lib/hotpipe/done/face.png && id hotpipe");
    sd.ok(&format!(
        "{} --uninstall --purge --prefix {p} >&2",
        install.display()
    ));
    sd.ok("test ! -e /etc/hotpipe && test ! -e /var/lib/hotpipe && ! id hotpipe 2>/dev/null");
}
