//! Configuration: what a `mlmf.toml` (or .yaml / .json) file holds.
//!
//! ```toml
//! device = "cpu"
//!
//! [modalities.text]
//! model = "models/all-MiniLM-L6-v2"      # checkpoint directory, Hugging Face layout
//! preprocessing = { max_length = 128 }    # processor keys, Hugging Face names
//!
//! [modalities.image.preprocessing]
//! size = { shortest_edge = 224 }
//!
//! [fusion]
//! strategy = "attention"
//! attention_dim = 512
//! ```
//!
//! Parsing reports the path of a bad or unknown field (`modalities.image.enabled`), and
//! [`MultiModalConfig::validate`] checks values, naming the full field path
//! (`modalities.image.preprocessing.size`).

mod adapters;
mod attention;
mod cache;
mod distributed;
pub mod fusion;
pub(crate) mod modality;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use adapters::AdaptersConfig;
pub use attention::{AttentionPair, CrossModalAttentionConfig};
pub use cache::{
    ByteSize, CacheConfig, CachePolicy, DiskCacheConfig, ModalityCacheConfig, PolicyKind,
};
pub use distributed::{DistributedConfig, ModalityAssignment, ShardingStrategy};
pub use fusion::{FusionConfig, FusionLevel, FusionStrategy};
pub use modality::{ModalityConfig, PreprocessingConfig};
pub use train::TrainConfig;

use crate::device::DeviceSpec;
use crate::encoders::Precision;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// The whole configuration of a multimodal model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MultiModalConfig {
    /// Per-modality settings, keyed by modality name (`text`, `image`, `custom:3`).
    pub modalities: BTreeMap<Modality, ModalityConfig>,
    /// How modality embeddings are combined.
    pub fusion: FusionConfig,
    /// The cross-modal attention inside the fusion stage.
    pub cross_modal_attention: CrossModalAttentionConfig,
    /// Per-modality projection adapters in front of the fusion; absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapters: Option<AdaptersConfig>,
    /// Caching of encodings.
    pub cache: CacheConfig,
    /// Spreading modalities over a Ray cluster; absent = one process.
    pub distributed: Option<DistributedConfig>,
    /// Where encoders run.
    pub device: DeviceSpec,
    /// The precision encoders run in: `float32`, `float16` or `bfloat16`.
    pub dtype: Precision,
    /// How `mlmf train` trains the model; inference ignores it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainConfig>,
}

/// File formats a config can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Json,
    Toml,
    Yaml,
}

impl ConfigFormat {
    /// The format a file name's extension names.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("json") => Ok(Self::Json),
            Some("toml") => Ok(Self::Toml),
            Some("yaml" | "yml") => Ok(Self::Yaml),
            _ => Err(MlmfError::ConfigFile {
                path: path.to_path_buf(),
                message: "unknown extension: expected .toml, .yaml, .yml or .json".into(),
            }),
        }
    }
}

impl MultiModalConfig {
    /// Reads and validates a config file (or the `mlmf.toml` of a folder); the format
    /// follows the extension. Relative paths are taken relative to the file's directory.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // A folder is a trained model's: its config is `mlmf.toml`.
        let owned;
        let path = if path.is_dir() {
            owned = path.join("mlmf.toml");
            if !owned.is_file() {
                return Err(MlmfError::ConfigFile {
                    path: path.to_path_buf(),
                    message: "a folder without mlmf.toml: expected a config file or a trained model's folder".into(),
                });
            }
            owned.as_path()
        } else {
            path
        };
        let format = ConfigFormat::from_path(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| MlmfError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut config = Self::from_str_as(&text, format).map_err(|e| match e {
            MlmfError::ConfigFile { message, .. } => MlmfError::ConfigFile {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // Relative paths in the file are taken from its folder, made absolute so that
        // they mean the same wherever the config travels (other processes, nodes).
        let folder = path
            .parent()
            .map(|d| std::path::absolute(d).unwrap_or(d.to_path_buf()));
        if let Some(dir) = folder.as_deref() {
            for m in config.modalities.values_mut() {
                if let Some(model) = m.model.as_mut().filter(|p| p.is_relative()) {
                    *model = dir.join(&*model);
                }
            }
            for p in [
                config.fusion.weights.as_mut(),
                config.cross_modal_attention.weights.as_mut(),
                config.adapters.as_mut().and_then(|a| a.weights.as_mut()),
                config.cache.disk.as_mut().map(|d| &mut d.path),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates a config held in a string.
    pub fn from_str_as(text: &str, format: ConfigFormat) -> Result<Self> {
        let file_err = |message: String| MlmfError::ConfigFile {
            path: "<string>".into(),
            message,
        };
        // Every format goes through one JSON value, so that field paths in errors look
        // the same whatever the file format.
        let value: serde_json::Value = match format {
            ConfigFormat::Json => {
                serde_json::from_str(text).map_err(|e| file_err(e.to_string()))?
            }
            ConfigFormat::Toml => {
                let v: toml::Value = toml::from_str(text).map_err(|e| file_err(e.to_string()))?;
                serde_json::to_value(v).map_err(|e| file_err(e.to_string()))?
            }
            ConfigFormat::Yaml => {
                let v: serde_yaml::Value =
                    serde_yaml::from_str(text).map_err(|e| file_err(e.to_string()))?;
                serde_json::to_value(v).map_err(|e| file_err(e.to_string()))?
            }
        };
        let config = Self::from_value(value)?;
        config.validate()?;
        Ok(config)
    }

    /// Deserialises from a JSON value without validating.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            MlmfError::config(
                if path == "." { String::new() } else { path },
                e.inner().to_string(),
            )
        })
    }

    /// The config as a JSON value (what `to_file` writes).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Writes the config; the format follows the extension.
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let err = |message: String| MlmfError::ConfigFile {
            path: path.to_path_buf(),
            message,
        };
        let text = match ConfigFormat::from_path(path)? {
            ConfigFormat::Json => {
                serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?
            }
            ConfigFormat::Toml => toml::to_string_pretty(self).map_err(|e| err(e.to_string()))?,
            ConfigFormat::Yaml => serde_yaml::to_string(self).map_err(|e| err(e.to_string()))?,
        };
        std::fs::write(path, text).map_err(|e| err(e.to_string()))
    }

    /// Checks every value, reporting the first bad one with its full field path.
    pub fn validate(&self) -> Result<()> {
        for (modality, m) in &self.modalities {
            m.validate(*modality)
                .map_err(|e| e.under(&format!("modalities.{modality}")))?;
        }
        self.fusion.validate().map_err(|e| e.under("fusion"))?;
        self.cross_modal_attention
            .validate()
            .map_err(|e| e.under("cross_modal_attention"))?;
        self.cache.validate().map_err(|e| e.under("cache"))?;
        if let Some(a) = &self.adapters {
            a.validate().map_err(|e| e.under("adapters"))?;
        }
        if let Some(t) = &self.train {
            t.validate().map_err(|e| e.under("train"))?;
        }
        if let Some(d) = &self.distributed {
            d.validate(self).map_err(|e| e.under("distributed"))?;
        }
        Ok(())
    }

    /// The modalities switched on, in canonical order.
    pub fn enabled_modalities(&self) -> Vec<Modality> {
        self.modalities
            .iter()
            .filter(|(_, m)| m.enabled)
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
device = "cpu"
[modalities.text]
preprocessing = { max_length = 16, padding = "max_length" }
[modalities.image]
enabled = false
[fusion]
strategy = "attention"
attention_dim = 256
[cross_modal_attention]
num_heads = 4
[cache]
max_memory = "64 MiB"
[distributed.sharding]
strategy = "modality_specific"
modality_assignments = { text = ["text-node"] }
"#;

    #[test]
    fn toml_yaml_json_agree() {
        let a = MultiModalConfig::from_str_as(TOML, ConfigFormat::Toml).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        let b = MultiModalConfig::from_str_as(&json, ConfigFormat::Json).unwrap();
        let yaml = serde_yaml::to_string(&a).unwrap();
        let c = MultiModalConfig::from_str_as(&yaml, ConfigFormat::Yaml).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            a.fusion.strategy,
            FusionStrategy::Attention(fusion::AttentionFusionOptions {
                attention_dim: Some(256)
            })
        );
        assert_eq!(a.cache.max_memory, ByteSize(64 << 20));
        assert_eq!(a.enabled_modalities(), vec![Modality::Text]);
    }

    #[test]
    fn file_roundtrip_every_format() {
        let a = MultiModalConfig::from_str_as(TOML, ConfigFormat::Toml).unwrap();
        let dir = std::env::temp_dir().join(format!("mlmf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ext in ["toml", "yaml", "json"] {
            let p = dir.join(format!("c.{ext}"));
            a.to_file(&p).unwrap();
            assert_eq!(MultiModalConfig::from_file(&p).unwrap(), a, "{ext}");
        }
        let err = MultiModalConfig::from_file(dir.join("c.ini")).unwrap_err();
        assert!(err.to_string().contains("expected .toml"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn fusion_settings_sit_beside_the_strategy() {
        let c = MultiModalConfig::from_str_as(
            "dtype = \"bf16\"\n[fusion]\nstrategy = \"early\"\nnum_layers = 2\nout_dim = 64\n\
             weights = \"f.safetensors\"\nrequired = [\"image\"]\n\
             [cross_modal_attention]\npairs = [\"text->image\"]\n",
            ConfigFormat::Toml,
        )
        .unwrap();
        assert_eq!(c.dtype, Precision::BF16);
        assert_eq!(c.fusion.out_dim, Some(64));
        assert_eq!(c.fusion.required, vec![Modality::Image]);
        assert_eq!(c.fusion.level(), FusionLevel::Tokens);
        assert!(matches!(c.fusion.strategy, FusionStrategy::Early(ref o) if o.num_layers == 2));
        assert_eq!(c.cross_modal_attention.pairs[0].to_string(), "text->image");
        let dir = std::env::temp_dir().join(format!("mlmf-fusion-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.toml");
        c.to_file(&p).unwrap();
        let back = MultiModalConfig::from_file(&p).unwrap();
        // Relative weights paths are taken from the file's folder.
        assert_eq!(back.fusion.weights, Some(dir.join("f.safetensors")));
        assert_eq!(back.fusion.strategy, c.fusion.strategy);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_field_is_reported_with_its_path() {
        let err = MultiModalConfig::from_str_as(
            "[modalities.image]\nenabld = true\n",
            ConfigFormat::Toml,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`modalities.image.enabld`") || err.contains("modalities.image"),
            "{err}"
        );
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field_path() {
        let cases = [
            (
                "[modalities.text.preprocessing]\nmax_length = 0\n",
                "modalities.text.preprocessing.max_length",
            ),
            (
                "[modalities.text.preprocessing]\nmax_lenght = 3\n",
                "modalities.text.preprocessing",
            ),
            (
                "[fusion]\nstrategy = \"attention\"\nattention_dim = 0\n",
                "fusion.attention_dim",
            ),
            (
                "[cross_modal_attention]\nnum_heads = 0\n",
                "cross_modal_attention.num_heads",
            ),
            (
                "[cross_modal_attention]\ndropout = 1.5\n",
                "cross_modal_attention.dropout",
            ),
            (
                "[cross_modal_attention]\ntemperature = -1.0\n",
                "cross_modal_attention.temperature",
            ),
            ("[cache]\nmax_memory = \"12 parsecs\"\n", "cache.max_memory"),
            ("[fusion]\nstrategy = \"quantum\"\n", "fusion"),
            (
                "[fusion]\nstrategy = \"late\"\nout_dim = 0\n",
                "fusion.out_dim",
            ),
            (
                "[fusion]\nstrategy = \"early\"\nnum_layer = 2\n",
                "num_layer",
            ),
            (
                "[fusion]\nstrategy = \"late\"\nrequired = [\"text\", \"text\"]\n",
                "fusion.required",
            ),
            ("dtype = \"float8\"\n", "dtype"),
            (
                "[cross_modal_attention]\npairs = [\"text->text\"]\n",
                "cross_modal_attention",
            ),
            (
                "[cross_modal_attention]\npairs = [\"text->image\", \"text->image\"]\n",
                "cross_modal_attention.pairs.1",
            ),
            ("[modalities.smell]\n", "modalities"),
            (
                "[modalities.image.preprocessing]\nsize = 0\n",
                "modalities.image.preprocessing.size",
            ),
            (
                "[modalities.image.preprocessing]\nresample = \"lanczos9\"\n",
                "modalities.image.preprocessing.resample",
            ),
            (
                "[modalities.image.preprocessing]\nsise = 3\n",
                "modalities.image.preprocessing.sise",
            ),
            (
                "[modalities.audio.preprocessing]\nfeature_size = 0\n",
                "modalities.audio.preprocessing.feature_size",
            ),
            (
                "[modalities.audio.preprocessing]\nsampling_rate = -5\n",
                "modalities.audio.preprocessing.sampling_rate",
            ),
        ];
        for (text, path) in cases {
            let err = MultiModalConfig::from_str_as(text, ConfigFormat::Toml)
                .unwrap_err()
                .to_string();
            assert!(err.contains(path), "{text:?} -> {err}");
        }
    }
}
