//! [`MultiModalLoader`]: a [`MultiModalConfig`] (plus checkpoint directories given in
//! code) to a loaded [`MultiModalModel`].

use std::path::PathBuf;

use crate::config::MultiModalConfig;
use crate::encoders::{Encoder, EncoderOptions, VideoPooling};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::model::{MultiModalModel, Parts};

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
        self.config.modalities.entry(modality).or_default().model = Some(dir.into());
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
        let jobs: Vec<(Modality, EncoderOptions, PathBuf)> = config
            .modalities
            .iter()
            .map(|(m, mc)| {
                let at = format!("modalities.{m}");
                if let Modality::Custom(_) = m {
                    return Err(MlmfError::config(
                        at,
                        "custom modalities have no built-in processor; encode them yourself \
                         and fuse with mlmf::fusion::Fusion",
                    ));
                }
                let dir = mc.model.clone().ok_or_else(|| {
                    MlmfError::config(
                        format!("{at}.model"),
                        "no checkpoint directory: set `model` or call with_modality_path",
                    )
                })?;
                let options = EncoderOptions {
                    modality: Some(*m),
                    device: config.device,
                    precision: config.dtype,
                    video_pooling: self.video_pooling,
                    video: None,
                    preprocessing: mc.preprocessing.clone(),
                };
                Ok((*m, options, dir))
            })
            .collect::<Result<_>>()?;
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
        let encoders = loaded.into_iter().collect::<Result<Vec<_>>>()?;
        MultiModalModel::assemble(Parts {
            config,
            encoders,
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
