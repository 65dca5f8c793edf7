//! [`CrossModalAttentionConfig`]: the shape of the cross-modal attention layers.

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};

/// Multi-head cross-modal attention settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossModalAttentionConfig {
    /// Number of attention heads.
    pub num_heads: usize,
    /// Width of each head; `None` = model width / `num_heads`.
    pub head_dim: Option<usize>,
    /// Key/value heads (grouped-query attention: each serves `num_heads /
    /// num_kv_heads` query heads; 1 = multi-query); `None` = `num_heads`.
    pub num_kv_heads: Option<usize>,
    /// Attention dropout, applied in training mode only.
    pub dropout: f32,
    /// Logits are divided by `temperature * sqrt(head_dim)`.
    pub temperature: f32,
}

impl Default for CrossModalAttentionConfig {
    fn default() -> Self {
        Self {
            num_heads: 8,
            head_dim: None,
            num_kv_heads: None,
            dropout: 0.0,
            temperature: 1.0,
        }
    }
}

impl CrossModalAttentionConfig {
    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 {
            return Err(MlmfError::config("num_heads", "must be at least 1"));
        }
        if let Some(kv) = self.num_kv_heads {
            if kv == 0 || !self.num_heads.is_multiple_of(kv) {
                return Err(MlmfError::config(
                    "num_kv_heads",
                    format!(
                        "{kv} must be at least 1 and divide num_heads ({})",
                        self.num_heads
                    ),
                ));
            }
        }
        if self.head_dim == Some(0) {
            return Err(MlmfError::config("head_dim", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(MlmfError::config(
                "dropout",
                format!("{} is outside [0, 1)", self.dropout),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(MlmfError::config(
                "temperature",
                format!("{} is not a positive finite number", self.temperature),
            ));
        }
        Ok(())
    }
}
