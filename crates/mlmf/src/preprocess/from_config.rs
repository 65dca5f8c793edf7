//! [`Preprocessors`]: the processors a [`MultiModalConfig`] describes, one per enabled
//! built-in modality.
//!
//! Each starts from its checkpoint's own settings (`modalities.<m>.model`: tokenizer.json
//! for text, preprocessor_config.json for image and audio) or the defaults (CLIP,
//! Whisper), and the `preprocessing` keys of the config are laid over them. Video frames
//! of a native video checkpoint (VideoMAE) go through its own image settings, and its
//! `num_frames` is the sampler's default; other video frames go through the image
//! modality's processor when one is configured, else through the video checkpoint's
//! image settings, else CLIP's; the video `preprocessing` keys are
//! those of [`VideoProcessorConfig`] (`sampler`, `default_fps`, `max_frames`,
//! `short_video`).

use std::path::Path;

use crate::config::{ModalityConfig, MultiModalConfig};
use crate::encoders::videomae;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::audio::AudioProcessor;
use crate::preprocess::image::ImageProcessor;
use crate::preprocess::text::TextProcessor;
use crate::preprocess::video::{FrameSampler, VideoProcessor, VideoProcessorConfig};

/// The processors of a config's enabled modalities.
#[derive(Debug, Default)]
pub struct Preprocessors {
    pub text: Option<TextProcessor>,
    pub image: Option<ImageProcessor>,
    pub audio: Option<AudioProcessor>,
    pub video: Option<VideoProcessor>,
}

fn model_dir(m: &ModalityConfig) -> Option<&Path> {
    m.model.as_deref()
}

/// A checkpoint's processor settings (as `load` reads them) as a JSON object of
/// processor keys, to lay a config's overrides over.
fn checkpoint_settings<P, C: serde::Serialize>(
    dir: Option<&Path>,
    load: impl Fn(&Path) -> Result<P>,
    config: impl Fn(&P) -> &C,
) -> Result<Option<serde_json::Value>> {
    dir.map(|d| {
        let p = load(d)?;
        serde_json::to_value(config(&p)).map_err(|e| MlmfError::Internal(e.to_string()))
    })
    .transpose()
}

/// The checkpoint's image settings.
fn image_base(dir: Option<&Path>) -> Result<Option<serde_json::Value>> {
    checkpoint_settings(
        dir,
        |d| ImageProcessor::from_pretrained(d),
        ImageProcessor::config,
    )
}

fn image_processor(m: &ModalityConfig) -> Result<ImageProcessor> {
    let base = image_base(model_dir(m)).map_err(|e| e.under("model"))?;
    ImageProcessor::new(
        m.preprocessing
            .image(base.as_ref())
            .map_err(|e| e.under("preprocessing"))?,
    )
}

impl Preprocessors {
    /// Builds the processor of every enabled built-in modality; errors name the
    /// config field (`modalities.image.preprocessing.size`, `modalities.text.model`).
    pub fn from_config(config: &MultiModalConfig) -> Result<Self> {
        let mut out = Self::default();
        for (modality, m) in config.modalities.iter().filter(|(_, m)| m.enabled) {
            let at = |e: MlmfError| e.under(&format!("modalities.{modality}"));
            match modality {
                Modality::Text => {
                    let dir = model_dir(m).ok_or_else(|| {
                        at(MlmfError::config(
                            "model",
                            "the text modality needs a checkpoint directory with tokenizer.json",
                        ))
                    })?;
                    let cfg = m
                        .preprocessing
                        .text()
                        .map_err(|e| at(e.under("preprocessing")))?;
                    out.text = Some(TextProcessor::from_pretrained(dir, cfg)?);
                }
                Modality::Image => out.image = Some(image_processor(m).map_err(at)?),
                Modality::Audio => {
                    let base = checkpoint_settings(
                        model_dir(m),
                        |d| AudioProcessor::from_pretrained(d),
                        AudioProcessor::config,
                    )
                    .map_err(|e| at(e.under("model")))?;
                    let cfg = m
                        .preprocessing
                        .audio(base.as_ref())
                        .map_err(|e| at(e.under("preprocessing")))?;
                    out.audio = Some(AudioProcessor::new(cfg)?);
                }
                Modality::Video | Modality::Custom(_) => {}
            }
        }
        if let Some(m) = config
            .modalities
            .get(&Modality::Video)
            .filter(|m| m.enabled)
        {
            let at = |e: MlmfError| e.under("modalities.video");
            // A native video checkpoint (VideoMAE) brings its own frame settings and
            // clip length; per-frame models share the image modality's processor.
            let native = model_dir(m).and_then(videomae::native_frames);
            let frames = match (native, &out.image, model_dir(m)) {
                (None, Some(image), _) => image.clone(),
                (_, _, dir) => {
                    let base = image_base(dir).map_err(|e| at(e.under("model")))?;
                    let empty = crate::config::PreprocessingConfig::default();
                    ImageProcessor::new(empty.image(base.as_ref())?)?
                }
            };
            let mut base = VideoProcessorConfig::default();
            if let Some(num_frames) = native {
                base.sampler = FrameSampler::Uniform { num_frames };
            }
            let cfg: VideoProcessorConfig = m
                .preprocessing
                .video_over(&base)
                .map_err(|e| at(e.under("preprocessing")))?;
            out.video = Some(VideoProcessor::new(cfg, frames).map_err(at)?);
        }
        Ok(out)
    }
}
