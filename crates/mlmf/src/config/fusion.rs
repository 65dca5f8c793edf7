//! [`FusionStrategy`]: how per-modality embeddings become one (docs/fusion.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// The `[fusion]` section of a model config: the strategy with its options, and the
/// settings of the layer a `MultiModalModel` builds from it.
///
/// ```toml
/// [fusion]
/// strategy = "attention"   # the strategy's options sit beside it
/// attention_dim = 256
/// out_dim = 512            # width of the fused embedding
/// weights = "fusion.safetensors"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FusionConfig {
    #[serde(flatten)]
    pub strategy: FusionStrategy,
    /// Width of the fused embedding; `None` = the widest fusion input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dim: Option<usize>,
    /// Trained weights (safetensors, the names docs/fusion.md lists); `None` = a seeded,
    /// untrained initialisation. A relative path is taken from the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Seed of the untrained initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Modalities every call must include (else `MissingModalityError`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<Modality>,
    /// What each modality hands the fusion: `pooled` embeddings or `tokens`; `None` =
    /// `tokens` for `early` and `middle`, `pooled` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<FusionLevel>,
}

/// Which encoder output a fusion takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusionLevel {
    /// The encoder's pooled embedding `[B, D']` (its projection, when it has one).
    Pooled,
    /// The token states `[B, T, D]` with their mask.
    Tokens,
}

impl FusionConfig {
    /// The fusion input level in effect.
    pub fn level(&self) -> FusionLevel {
        self.inputs.unwrap_or(match self.strategy {
            FusionStrategy::Early(_) | FusionStrategy::Middle(_) => FusionLevel::Tokens,
            _ => FusionLevel::Pooled,
        })
    }

    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        self.strategy.validate()?;
        if self.out_dim == Some(0) {
            return Err(MlmfError::config("out_dim", "must be at least 1"));
        }
        if let Some(r) = self
            .required
            .iter()
            .enumerate()
            .find(|(i, r)| self.required[..*i].contains(r))
        {
            return Err(MlmfError::config(
                "required",
                format!("`{}` is listed twice", r.1),
            ));
        }
        Ok(())
    }
}

/// Fusion strategies. In a config file the variant is the `strategy` key and its
/// options sit beside it: `{ strategy = "early", num_layers = 2 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum FusionStrategy {
    /// Tokens of all modalities concatenated (with a modality-type embedding), then
    /// joint transformer layers, then a masked mean.
    Early(LayerStackOptions),
    /// Each modality's tokens attend over the others' in cross-attention fusion layers.
    Middle(LayerStackOptions),
    /// Pooled embeddings combined at the end.
    Late(LateOptions),
    /// Per-modality projections weighted by a softmax over modalities.
    Attention(AttentionFusionOptions),
    /// Input-dependent sigmoid gates per modality (`adaptive` is the same strategy).
    #[serde(alias = "adaptive")]
    Gated(GatedOptions),
    /// A user-registered fusion component, by name.
    Custom(CustomOptions),
}

/// `gated` fusion has no options (the struct rejects unknown keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GatedOptions {}

/// Options of `custom` fusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CustomOptions {
    /// The name the component was registered under.
    pub name: String,
}

impl Default for FusionStrategy {
    fn default() -> Self {
        Self::Gated(GatedOptions {})
    }
}

/// How `late` fusion combines the pooled embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LateMode {
    /// One projection of the concatenation.
    #[default]
    Concat,
    /// The mean of per-modality projections.
    Mean,
    /// Per-modality projections weighted by a learned softmax over modalities.
    Weighted,
    /// Per-modality classifier logits (LayerNorm + linear head), averaged.
    Logits,
    /// For the towers of one aligned checkpoint (CLIP, SigLIP): the mean of the
    /// L2-normalised pooled embeddings, in the checkpoint's own space (no weights);
    /// `infer` also returns the checkpoint's similarity logits (docs/aligned.md).
    Similarity,
}

/// Options of `late` fusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LateOptions {
    pub mode: LateMode,
}

/// Options of `attention` fusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionFusionOptions {
    /// Hidden width of the modality scorer (`Linear -> tanh -> Linear`); `None` = one
    /// linear map from the concatenation to the modality scores.
    pub attention_dim: Option<usize>,
}

/// The MLP of a transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `fc2(gelu(fc1(x)))`.
    #[default]
    Gelu,
    /// `down_proj(silu(gate_proj(x)) * up_proj(x))`.
    Swiglu,
}

/// The normalisation of a transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm (eps 1e-5).
    #[default]
    Layer,
    /// RMSNorm (eps 1e-6).
    Rms,
}

/// The residual gate of a `middle` fusion layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// Plain residual.
    #[default]
    None,
    /// `tanh(alpha) * y`, alpha starting at 0 (the layer starts as the identity).
    Tanh,
    /// `sigmoid(gate(x)) * y`, elementwise.
    Sigmoid,
}

/// Options of the layer stacks of `early` and `middle` fusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerStackOptions {
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp: MlpKind,
    /// MLP hidden width = `int(mlp_ratio * width)`.
    pub mlp_ratio: f64,
    pub norm: NormKind,
    /// `middle` only.
    pub gate: GateKind,
}

impl Default for LayerStackOptions {
    fn default() -> Self {
        Self {
            num_layers: 1,
            num_heads: 8,
            mlp: MlpKind::Gelu,
            mlp_ratio: 4.0,
            norm: NormKind::Layer,
            gate: GateKind::None,
        }
    }
}

impl FusionStrategy {
    /// The strategy's name as configs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Early(_) => "early",
            Self::Middle(_) => "middle",
            Self::Late(_) => "late",
            Self::Attention(_) => "attention",
            Self::Gated(_) => "gated",
            Self::Custom(_) => "custom",
        }
    }

    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Attention(AttentionFusionOptions {
                attention_dim: Some(0),
            }) => Err(MlmfError::config("attention_dim", "must be at least 1")),
            Self::Custom(CustomOptions { name }) if name.trim().is_empty() => {
                Err(MlmfError::config(
                    "name",
                    "a custom fusion needs the name it was registered under",
                ))
            }
            Self::Early(o) | Self::Middle(o) => {
                if o.num_layers == 0 {
                    return Err(MlmfError::config("num_layers", "must be at least 1"));
                }
                if o.num_heads == 0 {
                    return Err(MlmfError::config("num_heads", "must be at least 1"));
                }
                if !(o.mlp_ratio.is_finite() && o.mlp_ratio > 0.0) {
                    return Err(MlmfError::config(
                        "mlp_ratio",
                        format!("must be a positive number, got {}", o.mlp_ratio),
                    ));
                }
                if matches!(self, Self::Early(_)) && o.gate != GateKind::None {
                    return Err(MlmfError::config(
                        "gate",
                        "residual gates belong to `middle` fusion; `early` has none",
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<FusionStrategy, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn options_sit_beside_the_strategy() {
        assert_eq!(
            parse(r#"{"strategy": "early", "num_layers": 2, "mlp": "swiglu"}"#).unwrap(),
            FusionStrategy::Early(LayerStackOptions {
                num_layers: 2,
                mlp: MlpKind::Swiglu,
                ..Default::default()
            })
        );
        assert_eq!(
            parse(r#"{"strategy": "adaptive"}"#).unwrap(),
            FusionStrategy::Gated(GatedOptions {})
        );
        assert_eq!(
            parse(r#"{"strategy": "late", "mode": "weighted"}"#).unwrap(),
            FusionStrategy::Late(LateOptions {
                mode: LateMode::Weighted
            })
        );
        let err = parse(r#"{"strategy": "early", "num_layer": 2}"#).unwrap_err();
        assert!(err.contains("num_layer"), "{err}");
        let err = parse(r#"{"strategy": "gated", "mode": "max"}"#).unwrap_err();
        assert!(err.contains("mode"), "{err}");
        let err = parse(r#"{"strategy": "custom", "nme": "x"}"#).unwrap_err();
        assert!(err.contains("nme"), "{err}");
        let err = parse(r#"{"strategy": "late", "mode": "max"}"#).unwrap_err();
        assert!(err.contains("max"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = [
            (
                FusionStrategy::Attention(AttentionFusionOptions {
                    attention_dim: Some(0),
                }),
                "attention_dim",
            ),
            (
                FusionStrategy::Early(LayerStackOptions {
                    num_layers: 0,
                    ..Default::default()
                }),
                "num_layers",
            ),
            (
                FusionStrategy::Middle(LayerStackOptions {
                    mlp_ratio: -1.0,
                    ..Default::default()
                }),
                "mlp_ratio",
            ),
            (
                FusionStrategy::Early(LayerStackOptions {
                    gate: GateKind::Tanh,
                    ..Default::default()
                }),
                "gate",
            ),
        ];
        for (s, field) in bad {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
