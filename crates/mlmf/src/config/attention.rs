//! [`CrossModalAttentionConfig`]: the shape of the cross-modal attention layers.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A cross-modal attention map a model computes: the query modality's tokens attend
/// over the key modality's. Written `"text->image"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttentionPair {
    pub query: Modality,
    pub key: Modality,
}

impl fmt::Display for AttentionPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.query, self.key)
    }
}

impl FromStr for AttentionPair {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            MlmfError::config(
                "pairs",
                format!("{s:?} is not a pair: expected \"query->key\", e.g. \"text->image\""),
            )
        };
        let (q, k) = s.split_once("->").ok_or_else(bad)?;
        let query: Modality = q.trim().parse().map_err(|_| bad())?;
        let key: Modality = k.trim().parse().map_err(|_| bad())?;
        if query == key {
            return Err(MlmfError::config(
                "pairs",
                format!("{s:?} pairs a modality with itself: expected two different ones"),
            ));
        }
        Ok(Self { query, key })
    }
}

impl Serialize for AttentionPair {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AttentionPair {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: MlmfError| serde::de::Error::custom(e.to_string()))
    }
}

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
    /// RMS-normalise queries and keys per head (learned `q_norm` / `k_norm` weights).
    pub qk_norm: bool,
    /// Epsilon of the QK RMSNorm.
    pub qk_norm_eps: f32,
    /// Logit soft-capping: `softcap * tanh(logits / softcap)`.
    pub softcap: Option<f32>,
    /// Query `i` sees key `j` only when `|i - j| <= sliding_window`.
    pub sliding_window: Option<usize>,
    /// Keep only the `top_k` largest logits of each query row.
    pub top_k: Option<usize>,
    /// Keep the `ceil((1 - sparsity_ratio) * n)` largest of a row's `n` allowed logits.
    pub sparsity_ratio: Option<f64>,
    /// Rotary position embeddings on queries and keys with this base.
    pub rope_base: Option<f64>,
    /// Rotary positions are divided by this (linear frequency scaling).
    pub rope_scale: f64,
    /// Adaptive attention: each query row picks its own temperature and sparsity from
    /// its logits (rule in docs/attention.md).
    pub adaptive: bool,
    /// The logit spread (standard deviation) adaptive rows are scaled towards.
    pub adaptive_target_std: f32,
    /// Lowest adaptive temperature.
    pub adaptive_min_temperature: f32,
    /// Highest adaptive temperature.
    pub adaptive_max_temperature: f32,
    /// Sparsity of a row whose distribution is a spike; a uniform row keeps every key.
    pub adaptive_max_sparsity: f64,
    /// The attention maps a `MultiModalModel` computes between encoder token states
    /// (one layer per pair, `"text->image"`), returned when a call asks for attention.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<AttentionPair>,
    /// A folder of trained layers for `pairs`, one `{query}-{key}.safetensors` each;
    /// `None` = seeded, untrained layers. A relative path is taken from the config
    /// file's folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Seed of the untrained layers (each pair offsets it by its position).
    pub seed: u64,
}

impl Default for CrossModalAttentionConfig {
    fn default() -> Self {
        Self {
            num_heads: 8,
            head_dim: None,
            num_kv_heads: None,
            dropout: 0.0,
            temperature: 1.0,
            qk_norm: false,
            qk_norm_eps: 1e-6,
            softcap: None,
            sliding_window: None,
            top_k: None,
            sparsity_ratio: None,
            rope_base: None,
            rope_scale: 1.0,
            adaptive: false,
            adaptive_target_std: 1.0,
            adaptive_min_temperature: 0.5,
            adaptive_max_temperature: 2.0,
            adaptive_max_sparsity: 0.5,
            pairs: Vec::new(),
            weights: None,
            seed: 0,
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
        let positive = |field: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(MlmfError::config(
                    field,
                    format!("{v} is not a positive finite number"),
                ))
            }
        };
        positive("qk_norm_eps", f64::from(self.qk_norm_eps))?;
        if let Some(c) = self.softcap {
            positive("softcap", f64::from(c))?;
        }
        if let Some(b) = self.rope_base {
            positive("rope_base", b)?;
        }
        positive("rope_scale", self.rope_scale)?;
        if self.top_k == Some(0) {
            return Err(MlmfError::config("top_k", "must be at least 1"));
        }
        if let Some(r) = self.sparsity_ratio {
            if !(0.0..1.0).contains(&r) {
                return Err(MlmfError::config(
                    "sparsity_ratio",
                    format!("{r} is outside [0, 1)"),
                ));
            }
            if self.top_k.is_some() {
                return Err(MlmfError::config(
                    "sparsity_ratio",
                    "set top_k or sparsity_ratio, not both",
                ));
            }
        }
        positive("adaptive_target_std", f64::from(self.adaptive_target_std))?;
        positive(
            "adaptive_min_temperature",
            f64::from(self.adaptive_min_temperature),
        )?;
        if !(self.adaptive_max_temperature >= self.adaptive_min_temperature
            && self.adaptive_max_temperature.is_finite())
        {
            return Err(MlmfError::config(
                "adaptive_max_temperature",
                format!(
                    "{} is below adaptive_min_temperature ({})",
                    self.adaptive_max_temperature, self.adaptive_min_temperature
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.adaptive_max_sparsity) {
            return Err(MlmfError::config(
                "adaptive_max_sparsity",
                format!("{} is outside [0, 1)", self.adaptive_max_sparsity),
            ));
        }
        if self.adaptive && (self.top_k.is_some() || self.sparsity_ratio.is_some()) {
            return Err(MlmfError::config(
                "adaptive",
                "adaptive attention chooses its own sparsity; unset top_k and sparsity_ratio",
            ));
        }
        if let Some((i, p)) = self
            .pairs
            .iter()
            .enumerate()
            .find(|(i, p)| self.pairs[..*i].contains(p))
        {
            return Err(MlmfError::config(
                format!("pairs.{i}"),
                format!("`{p}` is listed twice"),
            ));
        }
        Ok(())
    }
}
