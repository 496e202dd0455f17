//! Fixtures shared by the integration tests: real images, real TorchScript models traced
//! with tch, config files, all built in temp dirs in code. (No `allow(dead_code)`: in the
//! one test binary every helper has a user, and one that loses its last is flagged.)

mod daemon;
mod nats;

pub use daemon::*;
pub use nats::NatsServer;

use std::path::{Path, PathBuf};

use tch::{CModule, Device, Kind, Tensor, nn};

/// A smooth, deterministic RGB test picture (gradients and a disc).
pub fn picture(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let d = ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt();
        let disc = if d < 0.25 { 80.0 } else { 0.0 };
        image::Rgb([
            (fx * 200.0 + disc + seed as f32 * 7.0) as u8,
            (fy * 200.0 + (seed % 5) as f32 * 9.0) as u8,
            ((1.0 - fx) * 150.0 + disc) as u8,
        ])
    })
}

/// A 64 x 64 [`picture`] as JPEG bytes: the tests' ordinary small input.
pub fn jpeg_bytes(seed: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    picture(64, 64, seed)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap();
    out.into_inner()
}

pub fn write_jpeg(path: &Path, w: u32, h: u32, seed: u32) {
    picture(w, h, seed)
        .save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

pub fn write_png(path: &Path, w: u32, h: u32, seed: u32) {
    picture(w, h, seed)
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

/// libtorch's random generator is one per process, and all the integration tests share
/// a process: the model fixtures below hold this while they draw from it, so that
/// `restore_model`'s `manual_seed(1)` and the weights drawn after it are not interleaved
/// with another test's draws (its weights are the same in every run).
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    // A test that panicked while holding it left nothing half-done that matters here.
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Trace and save a small residual conv net: x + 0.1 * tanh(conv(x)), clamped to [0, 1].
pub fn restore_model(path: &Path) {
    let _rng = torch_rng();
    let mut vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(1);
    let conv = nn::conv2d(
        vs.root(),
        3,
        3,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    );
    vs.freeze();
    let mut f = |xs: &[Tensor]| {
        let x = &xs[0];
        vec![(x + x.apply(&conv).tanh() * 0.1).clamp(0.0, 1.0)]
    };
    let m = CModule::create_by_tracing(
        "Restore",
        "forward",
        &[Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu))],
        &mut f,
    )
    .unwrap();
    m.save(path).unwrap();
}

/// A model that breaks the contract: returns two channels (1, 3 and 4 are images).
pub fn two_channel_model(path: &Path) {
    let _rng = torch_rng();
    let mut f = |xs: &[Tensor]| vec![xs[0].narrow(1, 0, 2) * 1.0];
    let m = CModule::create_by_tracing(
        "Grey",
        "forward",
        &[Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu))],
        &mut f,
    )
    .unwrap();
    m.save(path).unwrap();
}

/// A 2x nearest upscaler (output size differs from input).
pub fn upscale_model(path: &Path) {
    let _rng = torch_rng();
    let mut f = |xs: &[Tensor]| {
        vec![
            xs[0]
                .repeat_interleave_self_int(2, Some(2), None)
                .repeat_interleave_self_int(2, Some(3), None),
        ]
    };
    let m = CModule::create_by_tracing(
        "Up",
        "forward",
        &[Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu))],
        &mut f,
    )
    .unwrap();
    m.save(path).unwrap();
}

/// Writes `text` to `path`, making its folders first.
pub fn write(path: &Path, text: &str) -> PathBuf {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The binary under test; `HOTPIPE_TEST_BIN` runs the suite against another build (an
/// older one, to check that a new test fails without its fix).
pub fn hotpipe() -> std::process::Command {
    match std::env::var_os("HOTPIPE_TEST_BIN") {
        Some(bin) => std::process::Command::new(bin),
        None => std::process::Command::new(env!("CARGO_BIN_EXE_hotpipe")),
    }
}

/// The library's `process::run` on every image in `dir`, into `out`; it must start.
pub fn run_folder(
    cfg: &hotpipe::config::Config,
    dir: &Path,
    out: &Path,
    opts: hotpipe::process::RunOptions,
) -> hotpipe::process::Summary {
    let inputs = hotpipe::process::collect_inputs(&[dir.to_path_buf()]).unwrap();
    hotpipe::process::run(cfg, inputs, out, opts).unwrap()
}

/// What a run of the binary gave.
pub struct Cli {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Cli {
    fn from(r: std::process::Output) -> Cli {
        Cli {
            code: r.status.code(),
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        }
    }
}

/// Where `tool` is on `PATH`, if it is.
pub fn which(tool: &str) -> Option<PathBuf> {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Run `hotpipe ARGS...` to its end.
pub fn cli<I, S>(args: I) -> Cli
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    hotpipe().args(args).output().unwrap().into()
}

/// `hotpipe process --quiet --config CFG --out OUT INPUTS...`, which must have run to the
/// end (exit 0, or 1 when some input failed): anything else panics with its stderr.
pub fn process<P: AsRef<Path>>(cfg: &Path, out: &Path, inputs: &[P]) -> Cli {
    let mut args: Vec<&std::ffi::OsStr> = vec!["process".as_ref(), "--quiet".as_ref()];
    args.extend([
        "--config".as_ref(),
        cfg.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    args.extend(inputs.iter().map(|p| p.as_ref().as_os_str()));
    let r = cli(args);
    assert!(
        matches!(r.code, Some(0 | 1)),
        "hotpipe process exited with {:?}: {}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    r
}

/// Sorted file names in a folder, but for the hot folder's crash record (`work/.hp-crash`,
/// always there while a daemon has run: its room is kept preallocated).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".hp-crash")
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// PSNR in dB between two equally sized RGB8 buffers.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// The reference bench folder: `$HOTPIPE_SHARED_BENCH`, else `../shared/bench` beside the
/// checkout, else the vendored copy in `tests/data/bench` (so a clean clone anywhere has it).
pub fn shared_bench() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("HOTPIPE_SHARED_BENCH")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join("../shared/bench"), root.join("tests/data/bench")])
        .find(|p| p.join("peers.py").is_file() && p.join("astronaut.png").is_file())
        .map(|p| p.canonicalize().unwrap())
}

/// A test that cannot run here says why. Under `scripts/test.sh` (which sets
/// `HOTPIPE_TEST_STRICT=1`) a missing fixture is a failure, not a skip: CI must not
/// pass by skipping what it is meant to check.
pub fn skip(why: &str) {
    if std::env::var_os("HOTPIPE_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("required fixture missing under HOTPIPE_TEST_STRICT=1: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// The bench folder and the venv's Python, or `None` after saying (through [`skip`]) why.
fn bench_python() -> Option<(PathBuf, PathBuf)> {
    match (shared_bench(), python()) {
        (Some(b), Some(p)) => Some((b, p)),
        _ => {
            skip("needs the bench fixtures and HOTPIPE_PYTHON (run through scripts/test.sh)");
            None
        }
    }
}

/// Run `script` from the bench folder with the venv's Python; its stdout. Panics with the
/// script's stderr when it fails; `None` (after [`skip`]) when it cannot run here.
pub fn bench_script<I, S>(script: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let (bench, py) = bench_python()?;
    let out = std::process::Command::new(py)
        .arg(bench.join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The reference set, `make_data.py astronaut.png DIR n 7`, written into `dir`: its files,
/// sorted.
pub fn reference_set(dir: &Path, n: usize) -> Option<Vec<PathBuf>> {
    let (bench, _) = bench_python()?;
    bench_script(
        "make_data.py",
        [
            bench.join("astronaut.png").into_os_string(),
            dir.into(),
            n.to_string().into(),
            "7".into(),
        ],
    )?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    Some(files)
}

/// The bench's scripted residual model, `make_model.py PATH channels layers` (scripted,
/// so it has parameters `to(kind)` can cast, as users' exported models do).
pub fn bench_model(path: &Path, channels: u32, layers: u32) -> Option<()> {
    bench_script(
        "make_model.py",
        [
            path.as_os_str().to_owned(),
            channels.to_string().into(),
            layers.to_string().into(),
        ],
    )
    .map(drop)
}

/// Poll `f` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f()
}

/// The venv interpreter with torch (set by scripts/env.sh).
pub fn python() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("HOTPIPE_PYTHON")?);
    p.is_file().then_some(p)
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG signature and a valid IHDR claiming `w x h` RGB8, and nothing else: a decoder
/// that trusts the header would try to allocate w * h * 3 bytes.
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&w.to_be_bytes());
    chunk.extend_from_slice(&h.to_be_bytes());
    chunk.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    png
}

/// A deliberately slow model (two 9x9 convolutions through 32 channels): seconds per
/// image at 1536 px on a CPU, to make a stage look stuck.
pub fn slow_model(path: &Path) {
    let _rng = torch_rng();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = nn::ConvConfig {
        padding: 4,
        ..Default::default()
    };
    let a = nn::conv2d(vs.root() / "a", 3, 32, 9, cfg);
    let b = nn::conv2d(vs.root() / "b", 32, 3, 9, cfg);
    vs.freeze();
    let mut f = |xs: &[Tensor]| vec![xs[0].apply(&a).relu().apply(&b).sigmoid()];
    let m = CModule::create_by_tracing(
        "Slow",
        "forward",
        &[Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu))],
        &mut f,
    )
    .unwrap();
    m.save(path).unwrap();
}

/// Whether the tests run as root (some start system daemons).
pub fn nix_root() -> bool {
    rustix::process::geteuid().is_root()
}
