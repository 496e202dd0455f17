//! Colour-correct decoding end to end: the real binary on a generated corpus, against
//! references made by Pillow and LittleCMS.
//!
//! `colour_corpus.py make` (beside this file) writes one 96 x 64 picture in every
//! encoding the decoder takes: untagged sRGB in each format, ICC-tagged (Display P3,
//! Adobe RGB, ProPhoto, SwappedRedAndGreen, gray), CMYK JPEGs with and without a
//! profile, 16-bit, alpha, EXIF orientations, HEIC and AVIF, and for each the 8-bit sRGB
//! upright image a correct decoder gives, with a tolerance in mean CIEDE2000 below the
//! error of the likeliest mistake (recorded as `wrong_mean_de`). `hotpipe process` runs
//! over it at 96 x 64 (a 1:1 fit, so an exact copy) into PNG, and `compare` measures.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// The venv's Python on `colour_corpus.py ARGS...`: its stdout, or `None` after
/// [`skip`] when there is no Python here. Panics with the script's stderr when it fails.
fn corpus<S: AsRef<OsStr>>(args: &[S]) -> Option<String> {
    let Some(py) = python() else {
        skip("colour corpus: needs HOTPIPE_PYTHON (run through scripts/test.sh)");
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/colour_corpus.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "colour_corpus.py: {stderr}");
    // The per-case table and any skip warnings, for the test's output.
    eprint!("{stderr}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 96 x 64 out of 96 x 64 inputs, stretched, so the fit is the identity; Lanczos3 at
/// scale 1 copies exactly (the untagged PNG case measures 0). No model: decode, fit,
/// encode.
fn config(dir: &Path) -> PathBuf {
    write(
        &dir.join("colour.toml"),
        "[preprocess]\nsize = [96, 64]\nfit = \"stretch\"\nfilter = \"lanczos3\"\n\n\
         [encode]\nformat = \"png\"\n",
    )
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// In strict mode a skipped case (profile or encoder missing) fails the test.
fn check_skipped(dir: &Path) {
    let skipped = json_file(&dir.join("skipped.json"));
    let skipped = skipped.as_array().unwrap();
    if !skipped.is_empty() {
        skip(&format!("colour corpus cases skipped: {skipped:?}"));
    }
}

/// What is wrong with one case's measurement, if anything.
fn judge(entry: &Value, m: &Value) -> Option<String> {
    let stem = entry["stem"].as_str().unwrap();
    let tol = entry["max_mean_de"].as_f64().unwrap();
    let wrong = match (entry.get("wrong_mean_de"), entry.get("wrong")) {
        (Some(v), Some(w)) => format!(", {}: {v}", w.as_str().unwrap()),
        _ => String::new(),
    };
    if m.get("missing").is_some() {
        return Some(format!("{stem}: no output"));
    }
    if m["size_ok"] != Value::Bool(true) {
        return Some(format!("{stem}: output is {} (want 96 x 64)", m["size"]));
    }
    let mean = m["mean_de"].as_f64().unwrap();
    (mean > tol).then(|| {
        format!(
            "{stem} ({}): mean ΔE {mean} > {tol} (max {}, PSNR {} dB{wrong})",
            entry["kind"].as_str().unwrap(),
            m["max_de"],
            m["psnr"]
        )
    })
}

#[test]
fn every_corpus_image_decodes_to_its_srgb_reference() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("corpus");
    if corpus(&[OsStr::new("make"), dir.as_os_str()]).is_none() {
        return;
    }
    check_skipped(&dir);
    let manifest = json_file(&dir.join("manifest.json"));
    let entries = manifest.as_array().unwrap();
    assert!(entries.len() >= 40, "{} cases", entries.len());

    let out = d.path().join("out");
    let r = process(&config(d.path()), &out, &[dir.join("in")]);
    let mut problems: Vec<String> = Vec::new();
    let summary = format!("done {}, failed 0", entries.len());
    if !r.stdout.contains(&summary) {
        problems.push(format!("the summary does not say \"{summary}\""));
    }
    problems.extend(
        r.stdout
            .lines()
            .filter(|l| l.starts_with("failed: "))
            .map(String::from),
    );
    // Exactly one output per input: <stem>.png, and nothing else (no `-1` duplicates).
    let want: Vec<String> = entries
        .iter()
        .map(|e| format!("{}.png", e["stem"].as_str().unwrap()))
        .collect();
    let got = names(&out);
    for extra in got.iter().filter(|n| !want.contains(n)) {
        problems.push(format!("unexpected output {extra}"));
    }

    let measured: Value = serde_json::from_str(
        &corpus(&[OsStr::new("compare"), dir.as_os_str(), out.as_os_str()]).unwrap(),
    )
    .unwrap();
    for e in entries {
        let m = &measured[e["stem"].as_str().unwrap()];
        problems.extend(judge(e, m));
    }
    assert!(
        problems.is_empty(),
        "{} problems over {} colour cases:\n  {}\n{}",
        problems.len(),
        entries.len(),
        problems.join("\n  "),
        r.stderr
    );
}

/// `cmd` run to its end with stdout and stderr captured, and its peak resident memory
/// (`ru_maxrss` from `wait4`, that child's own: the test process's other children, run
/// by other tests on other threads, do not count).
// The child is reaped by `wait4` below; `Child::wait` after that could reap another
// test's child that was given the same pid.
#[allow(clippy::zombie_processes)]
fn run_measuring_rss(cmd: &mut std::process::Command) -> (Cli, u64) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            r.read_to_end(&mut s).unwrap();
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid, and wait4 only writes the two out-parameters;
    // it reaps our own child, which `child` then never waits for (dropping does not wait).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let cli = Cli {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    // Linux reports ru_maxrss in KiB.
    (cli, usage.ru_maxrss as u64 * 1024)
}

/// `hotpipe process --json` of `inputs` at the corpus config: the run and its peak RSS.
fn process_measured(dir: &Path, out: &str, inputs: &Path) -> (Cli, u64) {
    let mut cmd = hotpipe();
    cmd.args(["process", "--quiet", "--json", "--config"])
        .arg(config(dir))
        .arg("--out")
        .arg(dir.join(out))
        .arg(inputs);
    run_measuring_rss(&mut cmd)
}

/// Tiny files whose headers claim 50000 x 50000 (and a HEIC at 30000 x 30000, under
/// libheif's own 32768 limit, so that hotpipe's limit is the one that refuses it) fail
/// from the header, "over the" limit, and the process's peak memory stays that of a run
/// on one small ordinary image (about 480 MiB, most of it libtorch's libraries) plus
/// little: decoding even one of them would take gigabytes.
#[test]
fn tiff_and_heic_bombs_fail_from_their_headers() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("bombs");
    if corpus(&[OsStr::new("bombs"), dir.as_os_str()]).is_none() {
        return;
    }
    let files = names(&dir);
    assert!(files.contains(&"bomb_tiff.tif".to_string()), "{files:?}");
    if files.len() < 3 {
        // No HEIC encoder (pillow_heif) here: the TIFF alone.
        skip(&format!("HEIC bombs not made: {files:?}"));
    }
    let small = d.path().join("small.png");
    write_png(&small, 96, 64, 1);
    let (base, baseline) = process_measured(d.path(), "out0", &small);
    assert_eq!(base.code, Some(0), "{}\n{}", base.stdout, base.stderr);
    let (r, peak) = process_measured(d.path(), "out", &dir);
    eprintln!(
        "bombs: peak RSS {} MiB, {} MiB on one small image",
        peak / MIB,
        baseline / MIB
    );
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    let j: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!(j["done"], 0, "{j}");
    let failures = j["failures"].as_array().unwrap();
    assert_eq!(failures.len(), files.len(), "{j}");
    let wrong: Vec<String> = failures
        .iter()
        .filter(|f| !f["reason"].as_str().unwrap().contains("over the"))
        .map(|f| format!("{}: {}", f["file"], f["reason"]))
        .collect();
    assert!(
        wrong.is_empty(),
        "not refused by a size limit:\n{}",
        wrong.join("\n")
    );
    assert!(
        peak < baseline + 100 * MIB,
        "peak RSS {} MiB, {} MiB on one small image",
        peak / MIB,
        baseline / MIB
    );
}
