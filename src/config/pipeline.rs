//! `[pipeline]`: worker counts per stage and queue depths. The thread defaults follow
//! the number of cores, so the same file suits a laptop and a server; the one default
//! that also depends on `[face_crop]` is set in `Config::from_toml`.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::parse::Ctx;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPipeline {
    decode_threads: Option<Spanned<i64>>,
    fit_threads: Option<Spanned<i64>>,
    encode_threads: Option<Spanned<i64>>,
    infer_threads: Option<Spanned<i64>>,
    cpu_infer_workers: Option<Spanned<i64>>,
    /// Read by `Config::from_toml`: unset, its default depends on the detector's device.
    pub(super) detect_threads: Option<Spanned<i64>>,
    channel_capacity: Option<Spanned<i64>>,
    batch_slots: Option<Spanned<i64>>,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub decode_threads: usize,
    pub fit_threads: usize,
    pub encode_threads: usize,
    /// Intra-op threads libtorch uses for inference on the CPU.
    pub infer_threads: usize,
    /// Inference workers when the model runs on the CPU, each with its own copy of the
    /// model and `infer_threads / cpu_infer_workers` intra-op threads: small models scale
    /// better across workers than across intra-op threads.
    pub cpu_infer_workers: usize,
    /// Face-crop detect workers (with `[face_crop]`), each with its own copy of the
    /// MTCNN weights; on the CPU each runs libtorch on one thread.
    pub detect_threads: usize,
    pub channel_capacity: usize,
    pub batch_slots: usize,
}

/// `cores`: what [`available_cores`](super::available_cores) says, passed in so the
/// whole config sees one count.
pub(super) fn validate(
    cx: &Ctx,
    pl: &RawPipeline,
    cores: usize,
) -> Result<PipelineConfig, ConfigError> {
    Ok(PipelineConfig {
        decode_threads: cx.int_in(
            &pl.decode_threads,
            "pipeline.decode_threads",
            1,
            256,
            cores.max(1),
        )?,
        fit_threads: cx.int_in(
            &pl.fit_threads,
            "pipeline.fit_threads",
            1,
            256,
            (cores / 4).max(1),
        )?,
        encode_threads: cx.int_in(
            &pl.encode_threads,
            "pipeline.encode_threads",
            1,
            256,
            (cores / 2).max(1),
        )?,
        infer_threads: cx.int_in(
            &pl.infer_threads,
            "pipeline.infer_threads",
            1,
            256,
            cores.max(1),
        )?,
        cpu_infer_workers: cx.int_in(
            &pl.cpu_infer_workers,
            "pipeline.cpu_infer_workers",
            1,
            256,
            1usize,
        )?,
        detect_threads: cx.int_in(
            &pl.detect_threads,
            "pipeline.detect_threads",
            1,
            64,
            cores.clamp(1, 8),
        )?,
        channel_capacity: cx.int_in(
            &pl.channel_capacity,
            "pipeline.channel_capacity",
            1,
            4096,
            2 * cores.max(4),
        )?,
        batch_slots: cx.int_in(&pl.batch_slots, "pipeline.batch_slots", 1, 16, 3usize)?,
    })
}
