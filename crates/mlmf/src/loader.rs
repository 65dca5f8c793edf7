//! [`MultiModalLoader`]: a [`MultiModalConfig`] (plus checkpoint directories given in
//! code) to a loaded [`MultiModalModel`].

use std::path::PathBuf;

use crate::config::MultiModalConfig;
use crate::encoders::{Encoder, EncoderOptions, VideoPooling};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::model::{MultiModalModel, Parts, Producer};

/// Loads a [`MultiModalModel`]: one encoder per configured modality (their checkpoints
/// read concurrently), the fusion layer and the attention layers.
///
/// ```no_run
/// use mlmf::{config::MultiModalConfig, loader::MultiModalLoader, Modality};
/// let config = MultiModalConfig::from_file("mlmf.toml")?;
/// let model = MultiModalLoader::new(config)
///     .with_modality_path(Modality::Image, "models/clip-vit-base-patch32")
///     .load()?;
/// # Ok::<(), mlmf::MlmfError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MultiModalLoader {
    config: MultiModalConfig,
    video_pooling: VideoPooling,
}

impl MultiModalLoader {
    pub fn new(config: MultiModalConfig) -> Self {
        Self {
            config,
            video_pooling: VideoPooling::default(),
        }
    }

    /// Sets (or adds) the checkpoint directory of `modality`.
    pub fn with_modality_path(mut self, modality: Modality, dir: impl Into<PathBuf>) -> Self {
        let m = self.config.modalities.entry(modality).or_default();
        m.model = Some(dir.into());
        m.dim = None;
        self
    }

    /// Adds a modality whose embeddings (`dim` wide) the caller passes to `infer`.
    pub fn with_given_modality(mut self, modality: Modality, dim: usize) -> Self {
        let m = self.config.modalities.entry(modality).or_default();
        m.model = None;
        m.dim = Some(dim);
        self
    }

    /// How a video encoder pools its frames over time.
    pub fn with_video_pooling(mut self, pooling: VideoPooling) -> Self {
        self.video_pooling = pooling;
        self
    }

    /// The configuration as it stands.
    pub fn config(&self) -> &MultiModalConfig {
        &self.config
    }

    /// Loads every configured modality (enabled or not, so that a disabled one can be
    /// switched on later without reloading); errors name the config field.
    pub fn load(self) -> Result<MultiModalModel> {
        let config = self.config;
        config.validate()?;
        if config.modalities.is_empty() {
            return Err(MlmfError::config(
                "modalities",
                "the model has no modalities: configure at least one checkpoint",
            ));
        }
        let device = config.device.open()?;
        let mut given = Vec::new();
        let mut jobs: Vec<(Modality, EncoderOptions, PathBuf)> = Vec::new();
        for (m, mc) in &config.modalities {
            let at = format!("modalities.{m}");
            if let (Some(dim), None) = (mc.dim, &mc.model) {
                given.push(Producer::Given(*m, dim));
                continue;
            }
            if let Modality::Custom(_) = m {
                return Err(MlmfError::config(
                    format!("{at}.dim"),
                    "a custom modality has no built-in processor: set `dim`, the width of \
                     the embeddings you pass to infer",
                ));
            }
            let dir = mc.model.clone().ok_or_else(|| {
                MlmfError::config(
                    format!("{at}.model"),
                    "no checkpoint directory: set `model` (or `dim` to pass embeddings \
                     yourself), or call with_modality_path",
                )
            })?;
            let options = EncoderOptions {
                modality: Some(*m),
                device: config.device,
                precision: mc.dtype.unwrap_or(config.dtype),
                video_pooling: self.video_pooling,
                video: None,
                preprocessing: mc.preprocessing.clone(),
            };
            jobs.push((*m, options, dir));
        }
        let loaded: Vec<Result<Encoder>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(m, options, dir)| {
                    s.spawn(move || {
                        crate::error::catch_panic("loading an encoder panicked", || {
                            Encoder::from_pretrained(dir, options)
                                .map_err(|e| e.under(&format!("modalities.{m}")))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(MlmfError::Internal("a loading thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut producers = loaded
            .into_iter()
            .map(|e| e.map(Producer::Encoder))
            .collect::<Result<Vec<_>>>()?;
        producers.extend(given);
        MultiModalModel::assemble(Parts {
            config,
            producers,
            device,
        })
    }

    /// [`load`](Self::load) on tokio's blocking pool, for async callers.
    pub async fn load_async(self) -> Result<MultiModalModel> {
        tokio::task::spawn_blocking(move || self.load())
            .await
            .map_err(|e| MlmfError::Internal(format!("the loading task failed: {e}")))?
    }
}

impl MultiModalModel {
    /// Loads the model a config file describes.
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        MultiModalLoader::new(MultiModalConfig::from_file(path)?).load()
    }
}
