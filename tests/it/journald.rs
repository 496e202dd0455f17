//! Under systemd (JOURNAL_STREAM set) logs go to journald as structured fields. This
//! runs a real systemd-journald (started here when none is running) and reads the entry
//! back with journalctl. Where journald is not installed, or none runs and the test is not
//! root, it skips with the reason (and fails under scripts/test.sh's HOTPIPE_TEST_STRICT=1).

use crate::common::*;
use std::path::Path;
use std::time::Duration;

const JOURNAL_DIR: &str = "/run/systemd/journal";

/// A systemd-journald this test started: killed, and its sockets removed, however the
/// test ends, so the next run never mistakes a dead journald's socket for a live one.
struct OwnJournald(std::process::Child);

impl OwnJournald {
    fn remove_sockets() {
        for name in ["socket", "stdout", "dev-log", "io.systemd.journal"] {
            let _ = std::fs::remove_file(Path::new(JOURNAL_DIR).join(name));
        }
    }
}

impl Drop for OwnJournald {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        OwnJournald::remove_sockets();
    }
}

#[test]
fn logs_reach_journald_with_fields() {
    let journald = Path::new("/lib/systemd/systemd-journald");
    if !journald.exists()
        || std::process::Command::new("journalctl")
            .arg("--version")
            .output()
            .is_err()
    {
        skip("systemd-journald / journalctl not installed");
        return;
    }
    let socket = Path::new(JOURNAL_DIR).join("socket");
    // A socket file left by a journald that has exited refuses datagrams: only a socket
    // that accepts a connect has a journald behind it.
    let _own = if journal_alive(&socket) {
        None
    } else {
        // Starting a journald needs root (it owns /run/systemd/journal).
        if !nix_root() {
            skip("no journald running, and starting one needs root");
            return;
        }
        std::fs::create_dir_all(JOURNAL_DIR).unwrap();
        OwnJournald::remove_sockets();
        let own = OwnJournald(
            std::process::Command::new(journald)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || journal_alive(&socket)),
            "systemd-journald started but its socket never answered"
        );
        Some(own)
    };
    let d = tempfile::tempdir().unwrap();
    let marker = format!("journald-marker-{}", std::process::id());
    let bad = d.path().join(format!("{marker}.jpg"));
    std::fs::write(&bad, b"not an image").unwrap();
    let cfg = write(&d.path().join("p.toml"), "[preprocess]\nsize = 64\n");
    let run = |stream: &str, stderr: std::process::Stdio| {
        hotpipe()
            .env("JOURNAL_STREAM", stream)
            .args(["process", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(d.path().join("out"))
            .arg(&bad)
            .stderr(stderr)
            .output()
            .unwrap()
    };
    // Inherited from a parent whose stderr was the journal, but this stderr is a pipe:
    // text on stderr, not journal fields (systemd's rule: compare device and inode).
    let inherited = run("8:12345", std::process::Stdio::piped());
    assert_eq!(inherited.status.code(), Some(1));
    let text = String::from_utf8_lossy(&inherited.stderr);
    assert!(
        text.contains(&marker) && text.contains("not a recognised image"),
        "{text}"
    );
    // The stream systemd would connect: JOURNAL_STREAM names this very pipe.
    let (mut reader, writer) = std::io::pipe().unwrap();
    let st = rustix::fs::fstat(&writer).unwrap();
    let r = run(&format!("{}:{}", st.st_dev, st.st_ino), writer.into());
    let mut on_stderr = String::new();
    std::io::Read::read_to_string(&mut reader, &mut on_stderr).unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(
        !on_stderr.contains(&marker),
        "went to stderr, not the journal: {on_stderr}"
    );
    let (mut found, mut last) = (String::new(), String::new());
    wait_until(Duration::from_secs(10), || {
        let out = std::process::Command::new("journalctl")
            .args(["--no-pager", "-t", "hotpipe", "-o", "json"])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        found = last
            .lines()
            .find(|l| l.contains(&marker))
            .unwrap_or_default()
            .to_string();
        !found.is_empty()
    });
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
