//! `hotpipe process` on a terminal: log lines and the progress bar do not garble each
//! other. The bar is drawn only on a terminal, so the binary runs on a pseudo-terminal
//! made by `script` (util-linux), whose transcript is checked.

use std::path::Path;

use crate::common::*;

/// The transcript of `hotpipe ARGS...` run on a pseudo-terminal (stdout and stderr both
/// on it), or `None` when `script` is not there.
fn on_a_terminal(args: &[&Path]) -> Option<(Option<i32>, String)> {
    let bin = std::env::var_os("HOTPIPE_TEST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_hotpipe").into());
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let line: Vec<String> = std::iter::once(bin.as_path())
        .chain(args.iter().copied())
        .map(quote)
        .collect();
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .env("NO_COLOR", "1")
        .env("HOTPIPE_LOG", "warn")
        .env_remove("JOURNAL_STREAM")
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) => Some((
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )),
        Err(e) => {
            skip(&format!(
                "needs `script` (util-linux) for a pseudo-terminal: {e}"
            ));
            None
        }
    }
}

/// Every log line starts a line of its own on the screen: what precedes it since the last
/// newline is only cursor movement and erasing (the bar taken off the screen), never the
/// bar's text.
#[test]
fn log_lines_do_not_land_inside_the_progress_bar() {
    let d = tempfile::tempdir().unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    restore_model(&d.path().join("m.pt"));
    // Failures among good files: each is a WARN line while the bar is on the screen (the
    // bar is drawn after the first outcome, so from the second failure on at the latest).
    for i in 0..40 {
        let name = format!("f{i:02}.jpg");
        if i % 4 == 1 {
            std::fs::write(inp.join(name), b"").unwrap();
        } else {
            write_jpeg(&inp.join(name), 96, 80, i);
        }
    }
    let cfg = write(
        &d.path().join("p.toml"),
        "[model]\npath = \"m.pt\"\ndevice = \"cpu\"\nmax_batch = 4\n\n[preprocess]\nsize = 64\n\n[encode]\nformat = \"png\"\n\n[pipeline]\ndecode_threads = 2\nencode_threads = 2\n",
    );
    let out = d.path().join("out");
    let args: [&Path; 6] = [
        "process".as_ref(),
        "--config".as_ref(),
        &cfg,
        "--out".as_ref(),
        &out,
        &inp,
    ];
    let Some((code, screen)) = on_a_terminal(&args) else {
        return;
    };
    assert_eq!(code, Some(1), "10 inputs fail, so exit 1:\n{screen}");
    assert_eq!(names(&out).len(), 30, "{screen}");
    let warns: Vec<&str> = screen
        .split('\n')
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert_eq!(
        warns.len(),
        10,
        "one WARN line per failed input:\n{screen:?}"
    );
    // The bar shows "<pos>/40"; that it was drawn at all is what makes the test mean
    // something.
    assert!(screen.contains("/40"), "no progress bar drawn:\n{screen:?}");
    for l in warns {
        // The log line starts with its timestamp, just before " WARN ".
        let stamp_end = l[..l.find(" WARN ").unwrap()].trim_end().len();
        let stamp = l[..stamp_end]
            .rfind(|c: char| !(c.is_ascii_digit() || "-:.TZ".contains(c)))
            .map_or(0, |i| i + 1);
        let text = strip_controls(&l[..stamp]);
        assert!(
            text.trim().is_empty(),
            "a log line starts inside the bar's line ({text:?}):\n{l:?}"
        );
    }
}

/// What of `s` a terminal prints as text: escape sequences (`ESC [ ... letter`) and
/// control characters removed, and only what follows the last carriage return (a line
/// drawn again from its start).
fn strip_controls(s: &str) -> String {
    let s = s.rsplit('\r').next().unwrap_or_default();
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}
