//! [`FusionStrategy`]: how per-modality embeddings become one.

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};

/// Fusion strategies. In a config file the variant is the `strategy` key:
/// `{ strategy = "attention", attention_dim = 512 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum FusionStrategy {
    /// Tokens of all modalities concatenated, then joint layers.
    Early,
    /// Token sequences exchange information through cross-attention layers.
    Middle,
    /// Pooled embeddings combined at the end.
    Late,
    /// Per-modality projections weighted by attention over modalities.
    Attention { attention_dim: usize },
    /// Input-dependent gates per modality.
    #[default]
    Gated,
    /// A user-registered fusion component, by name.
    Custom { name: String },
}

impl FusionStrategy {
    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Attention { attention_dim: 0 } => {
                Err(MlmfError::config("attention_dim", "must be at least 1"))
            }
            Self::Custom { name } if name.trim().is_empty() => Err(MlmfError::config(
                "name",
                "a custom fusion needs the name it was registered under",
            )),
            _ => Ok(()),
        }
    }
}
