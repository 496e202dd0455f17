//! The built-in F2P face crop (MTCNN on tch). Not built yet: a config with
//! `[face_crop]` is refused at start-up with a clear message.

use crate::config::Config;
use crate::error::PipelineError;
use crate::pipeline::MiddleStage;

/// The detect stage for the pipeline, when `[face_crop]` is configured.
pub fn middle_stage(cfg: &Config) -> Result<Option<MiddleStage>, PipelineError> {
    match &cfg.face_crop {
        None => Ok(None),
        Some(_) => Err(PipelineError::FaceCrop(
            "[face_crop] is not available in this build yet".into(),
        )),
    }
}
