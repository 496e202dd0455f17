//! `[model]`: the TorchScript file (or, with `backend = "python"`, the Python pipeline
//! class and its interpreter), the device(s) it runs on, batching and precision.
//! Optional: without it the pipeline only decodes, fits and re-encodes.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::parse::{Ctx, config_names, parse_device};
use super::{ConfigError, DeviceChoice};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    #[serde(default)]
    backend: Option<Spanned<String>>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    entry: Option<Spanned<String>>,
    #[serde(default)]
    python: Option<Spanned<String>>,
    #[serde(default)]
    options: Option<Spanned<toml::Table>>,
    #[serde(default)]
    batch_timeout_s: Option<Spanned<i64>>,
    #[serde(default)]
    max_attempts: Option<Spanned<i64>>,
    #[serde(default)]
    device: Option<Spanned<DeviceSpec>>,
    #[serde(default)]
    max_batch: Option<Spanned<BatchSpec>>,
    #[serde(default)]
    batch_timeout_ms: Option<Spanned<i64>>,
    #[serde(default)]
    precision: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum DeviceSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum BatchSpec {
    Fixed(i64),
    Auto(String),
}

/// Numeric precision of the model on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

config_names!(
    Precision,
    "model.precision",
    [("fp32", Fp32), ("fp16", Fp16), ("bf16", Bf16),]
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Fixed(usize),
    /// Size from free device memory and the model's measured footprint at start-up.
    Auto,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The TorchScript file; for a Python pipeline, the file its `entry` names.
    pub path: PathBuf,
    /// `backend = "python"`: the pipeline class and how its workers run.
    pub python: Option<PythonModel>,
    pub devices: Vec<DeviceChoice>,
    pub max_batch: BatchSize,
    pub batch_timeout_ms: u64,
    pub precision: Precision,
}

/// `backend = "python"`: a pipeline class run in supervised worker processes, one per
/// device (`runtime::python`).
#[derive(Debug, Clone)]
pub struct PythonModel {
    /// `path/to/pipeline.py:ClassName`, the path resolved against the config's folder.
    pub entry: String,
    /// The interpreter: `python` (a bare name looked up on the PATH, a path resolved
    /// against the config's folder), else `$HOTPIPE_PYTHON`, else the active venv's,
    /// else the venv hotpipe was built against (scripts/setup.sh's), else `python3` on the
    /// PATH.
    pub interpreter: PathBuf,
    /// Given to the class's constructor, as JSON.
    pub options: serde_json::Value,
    /// A batch that takes longer kills its worker (0: no limit).
    pub batch_timeout_s: u64,
    /// How often one image may take a worker down before it fails.
    pub max_attempts: u32,
}

/// Keys that only one backend reads: naming one under the other is a mistake to report,
/// not to ignore.
const PYTHON_ONLY: &str = "applies to backend = \"python\" only";

/// `cuda_count` is how many CUDA devices exist, so "cuda:3" on a one-GPU machine is a
/// config error, not a crash. `table` is the span of `[model]` itself, for the error of
/// a key it lacks.
pub(super) fn validate(
    cx: &Ctx,
    m: &RawModel,
    table: std::ops::Range<usize>,
    cuda_count: usize,
) -> Result<ModelConfig, ConfigError> {
    let devices = devices(cx, &m.device, cuda_count)?;
    let max_batch = max_batch(cx, &m.max_batch)?;
    let python = match m.backend.as_ref().map(|b| b.get_ref().as_str()) {
        None | Some("torch") => {
            torch_only(cx, m)?;
            None
        }
        Some("python") => Some(python(cx, m, table.clone())?),
        Some(other) => {
            let span = m.backend.as_ref().expect("matched Some").span();
            return cx.err(
                span,
                "model.backend",
                format!("is \"{other}\"; allowed: \"torch\" | \"python\""),
            );
        }
    };
    let path = match (&python, &m.path) {
        (Some(py), _) => PathBuf::from(py.entry.rsplit_once(':').map_or("", |(f, _)| f)),
        (None, Some(p)) => cx.resolve(p.get_ref()),
        (None, None) => {
            return cx.err(
                table,
                "model.path",
                "is missing: name the TorchScript file (or set backend = \"python\" and entry)",
            );
        }
    };
    Ok(ModelConfig {
        path,
        python,
        devices,
        max_batch,
        batch_timeout_ms: cx.int_in(
            &m.batch_timeout_ms,
            "model.batch_timeout_ms",
            0,
            60_000,
            10u64,
        )?,
        precision: cx.choice(
            &m.precision,
            "model.precision",
            Precision::NAMES,
            Precision::Fp32,
        )?,
    })
}

/// A TorchScript model: the Python backend's keys are mistakes here.
fn torch_only(cx: &Ctx, m: &RawModel) -> Result<(), ConfigError> {
    let spans = [
        ("model.entry", m.entry.as_ref().map(Spanned::span)),
        ("model.python", m.python.as_ref().map(Spanned::span)),
        ("model.options", m.options.as_ref().map(Spanned::span)),
        (
            "model.batch_timeout_s",
            m.batch_timeout_s.as_ref().map(Spanned::span),
        ),
        (
            "model.max_attempts",
            m.max_attempts.as_ref().map(Spanned::span),
        ),
    ];
    match spans.into_iter().find_map(|(k, s)| Some((k, s?))) {
        Some((key, span)) => cx.err(span, key, PYTHON_ONLY),
        None => Ok(()),
    }
}

/// `backend = "python"`: `entry` (required), `python`, `options`, `batch_timeout_s`,
/// `max_attempts`; `path` and `precision` belong to TorchScript models.
fn python(
    cx: &Ctx,
    m: &RawModel,
    table: std::ops::Range<usize>,
) -> Result<PythonModel, ConfigError> {
    if let Some(p) = &m.path {
        return cx.err(p.span(), "model.path", "is for TorchScript models; a Python pipeline is named by entry = \"path/to/pipeline.py:ClassName\"");
    }
    if let Some(p) = &m.precision {
        return cx.err(p.span(), "model.precision", "is for TorchScript models; a Python pipeline chooses its own precision (pass it in [model.options])");
    }
    let Some(e) = &m.entry else {
        return cx.err(
            table,
            "model.entry",
            "is missing: backend = \"python\" needs entry = \"path/to/pipeline.py:ClassName\"",
        );
    };
    let entry = match e.get_ref().rsplit_once(':') {
        Some((file, class)) if !file.is_empty() && is_identifier(class) => {
            format!("{}:{class}", cx.resolve(file).display())
        }
        _ => {
            return cx.err(
                e.span(),
                "model.entry",
                format!(
                    "is \"{}\"; expected \"path/to/pipeline.py:ClassName\"",
                    e.get_ref()
                ),
            );
        }
    };
    let interpreter = match &m.python {
        // A bare command name, as in a shell: the PATH's, not a file beside the config.
        Some(p) if !p.get_ref().contains('/') => match on_path(p.get_ref()) {
            Some(found) => found,
            None => {
                return cx.err(
                    p.span(),
                    "model.python",
                    format!(
                        "no `{}` on the PATH; name the interpreter of a venv with your pipeline's packages (e.g. /opt/venv/bin/python)",
                        p.get_ref()
                    ),
                );
            }
        },
        Some(p) => cx.resolve(p.get_ref()),
        None => default_interpreter(),
    };
    let options = match &m.options {
        Some(t) => match serde_json::to_value(t.get_ref()) {
            Ok(v) => v,
            Err(err) => {
                return cx.err(
                    t.span(),
                    "model.options",
                    format!("cannot be passed on: {err}"),
                );
            }
        },
        None => serde_json::Value::Object(Default::default()),
    };
    Ok(PythonModel {
        entry,
        interpreter,
        options,
        batch_timeout_s: cx.int_in(
            &m.batch_timeout_s,
            "model.batch_timeout_s",
            0,
            86_400,
            600u64,
        )?,
        max_attempts: cx.int_in(&m.max_attempts, "model.max_attempts", 1, 100, 2u32)?,
    })
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_alphabetic() || f == '_')
        && c.all(|x| x.is_alphanumeric() || x == '_')
}

/// hotpipe's own venv when the environment names it (`scripts/env.sh` does), else the
/// first `python3` on the PATH.
/// Without `[model] python`: `$HOTPIPE_PYTHON`, the active venv's, the venv hotpipe was
/// built against when it is still there (it has numpy: scripts/setup.sh made it), else
/// `python3` on the PATH. `check` prints which.
fn default_interpreter() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let built = Some(PathBuf::from(env!("HOTPIPE_BUILD_PYTHON"))).filter(|p| p.is_file());
    var("HOTPIPE_PYTHON")
        .map(PathBuf::from)
        .or_else(|| var("VIRTUAL_ENV").map(|v| PathBuf::from(v).join("bin/python")))
        .or(built)
        .or_else(|| on_path("python3"))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// `name` as a shell finds it: the first executable file of that name on the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `model.device`: one name, or a list of distinct CUDA devices.
fn devices(
    cx: &Ctx,
    device: &Option<Spanned<DeviceSpec>>,
    cuda_count: usize,
) -> Result<Vec<DeviceChoice>, ConfigError> {
    let Some(d) = device else {
        return Ok(vec![
            parse_device("auto", cuda_count).expect("auto always parses"),
        ]);
    };
    let names: Vec<String> = match d.get_ref() {
        DeviceSpec::One(s) => vec![s.clone()],
        DeviceSpec::Many(v) => v.clone(),
    };
    if names.is_empty() {
        return cx.err(
            d.span(),
            "model.device",
            "is an empty list; allowed: \"auto\" | \"cpu\" | \"cuda:N\" or a list of \"cuda:N\"",
        );
    }
    let mut out = Vec::new();
    for n in &names {
        match parse_device(n, cuda_count) {
            Ok(dev) if !out.contains(&dev) => out.push(dev),
            Ok(_) => {
                return cx.err(d.span(), "model.device", format!("lists \"{n}\" twice"));
            }
            Err(msg) => return cx.err(d.span(), "model.device", msg),
        }
    }
    if out.len() > 1 && out.contains(&DeviceChoice::Cpu) {
        return cx.err(
            d.span(),
            "model.device",
            "a list may only name CUDA devices",
        );
    }
    Ok(out)
}

fn max_batch(cx: &Ctx, v: &Option<Spanned<BatchSpec>>) -> Result<BatchSize, ConfigError> {
    let Some(s) = v else {
        return Ok(BatchSize::Fixed(8));
    };
    match s.get_ref() {
        BatchSpec::Fixed(n) if (1..=1024).contains(n) => Ok(BatchSize::Fixed(*n as usize)),
        BatchSpec::Auto(a) if a == "auto" => Ok(BatchSize::Auto),
        BatchSpec::Fixed(n) => cx.err(
            s.span(),
            "model.max_batch",
            format!("is {n}; allowed: 1 to 1024 or \"auto\""),
        ),
        BatchSpec::Auto(a) => cx.err(
            s.span(),
            "model.max_batch",
            format!("is \"{a}\"; allowed: 1 to 1024 or \"auto\""),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn bad_device_says_what_is_allowed() {
        let e = parse("[model]\npath = \"m.pt\"\ndevice = \"gpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("model.device") && e.contains("cuda:N"),
            "{e}"
        );
        let e = parse("[model]\npath = \"m.pt\"\ndevice = \"cuda:4\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 CUDA device"), "{e}");
    }

    #[test]
    fn relative_model_path_resolves_against_config_dir() {
        let c = parse("[model]\npath = \"m.pt\"\ndevice = [\"cuda:0\"]\nmax_batch = \"auto\"\n")
            .unwrap();
        let m = c.model.unwrap();
        assert_eq!(m.path, Path::new("/base/m.pt"));
        assert_eq!(m.devices, vec![DeviceChoice::Cuda(0)]);
        assert_eq!(m.max_batch, BatchSize::Auto);
    }
}
