//! [`AdaptersConfig`]: per-modality projection adapters in front of the fusion.
//!
//! ```toml
//! [adapters]
//! dim = 128                      # every adapted modality is mapped to this width
//! modalities = ["text", "image"] # default: every modality of the model
//! hidden = 256                   # optional: Linear -> GELU -> Linear instead of one Linear
//! weights = "adapters.safetensors"
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Projection adapters: one small map per modality from its embedding width to `dim`,
/// applied to what the fusion takes (pooled vectors or every token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersConfig {
    /// Output width of every adapter.
    pub dim: usize,
    /// The adapted modalities; empty = all of the model's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modalities: Vec<Modality>,
    /// Hidden width of a two-layer adapter (`fc1`, GELU, `fc2`); `None` = one `Linear`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// Trained weights (safetensors, names `{modality}.weight` / `.bias`, or
    /// `{modality}.fc1.*` / `{modality}.fc2.*`); `None` = seeded, untrained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Seed of the untrained initialisation.
    pub seed: u64,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        Self {
            dim: 128,
            modalities: Vec::new(),
            hidden: None,
            weights: None,
            seed: 0,
        }
    }
}

impl AdaptersConfig {
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(MlmfError::config("dim", "must be at least 1"));
        }
        if self.hidden == Some(0) {
            return Err(MlmfError::config("hidden", "must be at least 1"));
        }
        if let Some((i, m)) = self
            .modalities
            .iter()
            .enumerate()
            .find(|(i, m)| self.modalities[..*i].contains(m))
        {
            return Err(MlmfError::config(
                format!("modalities.{i}"),
                format!("`{m}` is listed twice"),
            ));
        }
        Ok(())
    }

    /// Whether `m` is adapted (given the model's modalities).
    pub fn covers(&self, m: Modality) -> bool {
        self.modalities.is_empty() || self.modalities.contains(&m)
    }
}
