//! `[model]`: the TorchScript file, the device(s) it runs on, batching and precision.
//! Optional: without it the pipeline only decodes, fits and re-encodes.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::parse::{Ctx, parse_device};
use super::{ConfigError, DeviceChoice};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    path: Spanned<String>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Fixed(usize),
    /// Size from free device memory and the model's measured footprint at start-up.
    Auto,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub devices: Vec<DeviceChoice>,
    pub max_batch: BatchSize,
    pub batch_timeout_ms: u64,
    pub precision: Precision,
}

/// `cuda_count` is how many CUDA devices exist, so "cuda:3" on a one-GPU machine is a
/// config error, not a crash.
pub(super) fn validate(
    cx: &Ctx,
    m: &RawModel,
    cuda_count: usize,
) -> Result<ModelConfig, ConfigError> {
    let devices = devices(cx, &m.device, cuda_count)?;
    let max_batch = max_batch(cx, &m.max_batch)?;
    Ok(ModelConfig {
        path: cx.resolve(m.path.get_ref()),
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
            &[
                ("fp32", Precision::Fp32),
                ("fp16", Precision::Fp16),
                ("bf16", Precision::Bf16),
            ],
            Precision::Fp32,
        )?,
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
