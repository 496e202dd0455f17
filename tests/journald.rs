//! Under systemd (JOURNAL_STREAM set) logs go to journald as structured fields. This
//! runs a real systemd-journald (started here when none is running) and reads the entry
//! back with journalctl. Skips with a printed reason where journald is not installed.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn logs_reach_journald_with_fields() {
    let journald = Path::new("/lib/systemd/systemd-journald");
    if !journald.exists()
        || std::process::Command::new("journalctl")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("SKIPPED: systemd-journald / journalctl not installed");
        return;
    }
    let socket = Path::new("/run/systemd/journal/socket");
    let mut own = None;
    // A socket file left by a journald that has exited refuses datagrams: only a socket
    // that accepts a connect has a journald behind it.
    if !journal_alive(socket) {
        // Starting a journald needs root (it owns /run/systemd/journal); elsewhere there is
        // no journal to test against.
        if !nix_root() {
            eprintln!("SKIPPED: no journald running, and starting one needs root");
            return;
        }
        std::fs::create_dir_all("/run/systemd/journal").unwrap();
        for stale in ["socket", "stdout", "dev-log", "io.systemd.journal"] {
            let _ = std::fs::remove_file(Path::new("/run/systemd/journal").join(stale));
        }
        std::fs::create_dir_all("/var/log/journal").ok();
        own = Some(
            std::process::Command::new(journald)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let end = Instant::now() + Duration::from_secs(10);
        while !journal_alive(socket) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            journal_alive(socket),
            "systemd-journald started but its socket never answered"
        );
    }
    let d = tempfile::tempdir().unwrap();
    let marker = format!("journald-marker-{}", std::process::id());
    let bad = d.path().join(format!("{marker}.jpg"));
    std::fs::write(&bad, b"not an image").unwrap();
    let cfg = write(&d.path().join("p.toml"), "[preprocess]\nsize = 64\n");
    let r = hotpipe()
        .env("JOURNAL_STREAM", "8:12345")
        .args(["process", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(d.path().join("out"))
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let mut found = String::new();
    let mut last = String::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let out = std::process::Command::new("journalctl")
            .args(["--no-pager", "-t", "hotpipe", "-o", "json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text.lines().find(|l| l.contains(&marker)) {
            found = line.to_string();
            break;
        }
        last = text;
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(mut c) = own {
        let _ = c.kill();
        let _ = c.wait();
        // The next run must not mistake our journald's sockets for a live one.
        for stale in ["socket", "stdout", "dev-log", "io.systemd.journal"] {
            let _ = std::fs::remove_file(Path::new("/run/systemd/journal").join(stale));
        }
    }
    let tail: String = last.lines().rev().take(3).collect::<Vec<_>>().join("\n");
    assert!(
        !found.is_empty(),
        "no journal entry for {marker}; hotpipe stderr: {}; last journal lines: {tail}",
        String::from_utf8_lossy(&r.stderr)
    );
    for field in [
        "\"F_FILE\"",
        "\"F_REASON\":\"not a recognised image",
        "\"F_STAGE\":\"decode\"",
        "\"SYSLOG_IDENTIFIER\":\"hotpipe\"",
    ] {
        assert!(found.contains(field), "{field} missing in {found}");
    }
}

fn journal_alive(socket: &Path) -> bool {
    std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(socket))
        .is_ok()
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
