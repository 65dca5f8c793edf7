//! [`ModalityConfig`] and [`PreprocessingConfig`]: one modality's checkpoint and
//! processor settings.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::audio::AudioProcessorConfig;
use crate::preprocess::image::ImageProcessorConfig;
use crate::preprocess::text::TextProcessorConfig;
use crate::preprocess::video::VideoProcessorConfig;

/// One modality of a [`MultiModalConfig`](super::MultiModalConfig).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModalityConfig {
    /// Checkpoint directory in the Hugging Face layout (config.json, *.safetensors,
    /// tokenizer.json / preprocessor_config.json).
    pub model: Option<PathBuf>,
    /// A disabled modality is configured but not run.
    pub enabled: bool,
    /// Processor settings overriding the checkpoint's own.
    pub preprocessing: PreprocessingConfig,
    /// For a modality without a checkpoint: the width of the embeddings a caller
    /// passes to `infer` directly (`[B, dim]` or `[B, T, dim]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
    /// The precision of this modality's weights (`float32`, `bfloat16`, `float16`,
    /// `int8`), overriding the config's `dtype`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::encoders::Precision>,
}

impl Default for ModalityConfig {
    fn default() -> Self {
        Self {
            model: None,
            enabled: true,
            preprocessing: PreprocessingConfig::default(),
            dim: None,
            dtype: None,
        }
    }
}

impl ModalityConfig {
    /// Checks the processor overrides against the modality's processor.
    pub fn validate(&self, modality: Modality) -> Result<()> {
        match (self.dim, &self.model) {
            (Some(0), _) => return Err(MlmfError::config("dim", "must be at least 1")),
            (Some(_), Some(_)) => {
                return Err(MlmfError::config(
                    "dim",
                    "set `model` (a checkpoint encodes raw inputs) or `dim` (embeddings are \
                     given), not both",
                ))
            }
            _ => {}
        }
        self.preprocessing
            .validate(modality)
            .map_err(|e| e.under("preprocessing"))
    }
}

/// Processor keys, with the Hugging Face names the processors take
/// (`max_length`, `size`, `crop_size`, `feature_size`, `num_frames`, ...). They are
/// laid over the checkpoint's preprocessor_config.json (or the processor's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct PreprocessingConfig(pub serde_json::Map<String, serde_json::Value>);

impl PreprocessingConfig {
    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text processor settings these keys describe.
    pub fn text(&self) -> Result<TextProcessorConfig> {
        self.text_over(&TextProcessorConfig::default())
    }

    /// These keys laid over the text settings `base`. `prefix`, left out of the
    /// serialised settings while empty, is a key like the others.
    pub fn text_over(&self, base: &TextProcessorConfig) -> Result<TextProcessorConfig> {
        let mut known =
            serde_json::to_value(base).map_err(|e| MlmfError::Internal(e.to_string()))?;
        if known.get("prefix").is_none() {
            known["prefix"] = "".into();
        }
        let mut value = known.clone();
        merge_known(&mut value, &known, &self.0)?;
        serde_path_to_error::deserialize(value)
            .map_err(|e| MlmfError::config(e.path().to_string(), e.inner().to_string()))
    }

    /// The image processor settings: `base` (a checkpoint's preprocessor_config.json,
    /// or CLIP's defaults when `None`) with these keys laid over it.
    pub fn image(&self, base: Option<&serde_json::Value>) -> Result<ImageProcessorConfig> {
        let default_base = serde_json::json!({ "image_processor_type": "CLIPImageProcessor" });
        let cfg = self.over_hf(
            &ImageProcessorConfig::clip(),
            base.unwrap_or(&default_base),
            ImageProcessorConfig::from_hf_json,
        )?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The audio processor settings: `base` (a checkpoint's preprocessor_config.json, or
    /// Whisper's defaults when `None`) with these keys laid over it.
    pub fn audio(&self, base: Option<&serde_json::Value>) -> Result<AudioProcessorConfig> {
        let empty = serde_json::json!({});
        let cfg = self.over_hf(
            &AudioProcessorConfig::whisper(),
            base.unwrap_or(&empty),
            AudioProcessorConfig::from_hf_json,
        )?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The NaFlex patch processor settings: these keys (`patch_size`,
    /// `max_num_patches`, or any per-image key such as `resample`) laid over `base`
    /// (a patch processor's serialised settings).
    pub fn patches(
        &self,
        base: &serde_json::Value,
    ) -> Result<crate::preprocess::image::PatchProcessorConfig> {
        use crate::preprocess::image::PatchProcessorConfig;
        let mut flat = base.get("image").cloned().unwrap_or_default();
        for k in ["patch_size", "max_num_patches"] {
            if let Some(v) = base.get(k) {
                flat[k] = v.clone();
            }
        }
        flat["image_processor_type"] = "Siglip2ImageProcessor".into();
        let mut known = flat.clone();
        if let Some(o) = known.as_object_mut() {
            o.remove("image_processor_type");
        }
        let mut merged = flat;
        merge_known(&mut merged, &known, &self.0)?;
        PatchProcessorConfig::from_hf_json(&merged)
    }

    /// Lays these keys over the Hugging Face settings `base` and parses the result with
    /// `parse`; keys the processor does not have (the fields of `defaults`) are refused.
    fn over_hf<T: Serialize>(
        &self,
        defaults: &T,
        base: &serde_json::Value,
        parse: impl Fn(&serde_json::Value) -> Result<T>,
    ) -> Result<T> {
        let known =
            serde_json::to_value(defaults).map_err(|e| MlmfError::Internal(e.to_string()))?;
        let mut merged = base.clone();
        merge_known(&mut merged, &known, &self.0)?;
        parse(&merged)
    }

    /// The video sampler settings these keys describe (`sampler`, `default_fps`,
    /// `max_frames`, `short_video`).
    pub fn video(&self) -> Result<VideoProcessorConfig> {
        self.video_over(&VideoProcessorConfig::default())
    }

    /// The video processor settings laid over `base` (a model's own defaults).
    pub fn video_over(&self, base: &VideoProcessorConfig) -> Result<VideoProcessorConfig> {
        let cfg = overlay(base, &self.0)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every key is known to the modality's processor and has a valid value.
    pub fn validate(&self, modality: Modality) -> Result<()> {
        match modality {
            Modality::Text => self.text()?.validate(),
            Modality::Image => self.image(None).map(|_| ()),
            Modality::Audio => self.audio(None).map(|_| ()),
            Modality::Video => self.video().map(|_| ()),
            _ if self.is_empty() => Ok(()),
            Modality::Custom(_) => Err(MlmfError::config(
                "",
                "custom modalities have no built-in processor to configure",
            )),
        }
    }
}

/// Lays `overrides` into the JSON object `target`, rejecting keys that `known` (a
/// serialised default config) does not have.
fn merge_known(
    target: &mut serde_json::Value,
    known: &serde_json::Value,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let known = known
        .as_object()
        .ok_or_else(|| MlmfError::Internal("processor config is not an object".into()))?;
    let target = target
        .as_object_mut()
        .ok_or_else(|| MlmfError::config("", "a processor config must be a JSON object"))?;
    for (k, v) in overrides {
        if !known.contains_key(k) {
            let mut names: Vec<&str> = known.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(MlmfError::config(
                k.clone(),
                format!("unknown key; expected one of: {}", names.join(", ")),
            ));
        }
        target.insert(k.clone(), v.clone());
    }
    Ok(())
}

/// Lays `overrides` over `base` (both as JSON objects) and reads the result back,
/// rejecting keys `base` does not have. Errors carry the field name.
pub(crate) fn overlay<T: Serialize + DeserializeOwned>(
    base: &T,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<T> {
    let known = serde_json::to_value(base).map_err(|e| MlmfError::Internal(e.to_string()))?;
    let mut value = known.clone();
    merge_known(&mut value, &known, overrides)?;
    serde_path_to_error::deserialize(value)
        .map_err(|e| MlmfError::config(e.path().to_string(), e.inner().to_string()))
}
