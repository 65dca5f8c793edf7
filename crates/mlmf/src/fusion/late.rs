//! `late` fusion: pooled embeddings combined at the end (concat + projection, mean,
//! learned weighted sum, or averaged per-modality logits).

use candle_core::Tensor;

use super::blocks::LayerNorm;
use super::params::{Init, Params};
use super::{mean_weights, softmax_present, FusionComponent, FusionInputs, FusionOutput, Stacked};
use crate::config::fusion::LateMode;
use crate::encoders::layers::{ce, l2_normalize};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

pub(crate) enum Late {
    /// `proj(cat_m p_m)`.
    Concat(Stacked),
    /// `mean_m proj.m(p_m)`.
    Mean(Stacked),
    /// `sum_m softmax(modality_logits)_m proj.m(p_m)`.
    Weighted(Stacked, Tensor),
    /// `mean_m head.m(norm.m(p_m))`.
    Logits(Vec<LayerNorm>, Stacked),
    /// `mean_m p_m / |p_m|`: aligned towers' vectors in their own space.
    Similarity,
}

impl Late {
    pub(crate) fn new(
        p: &mut Params,
        dims: &[(Modality, usize)],
        out_dim: usize,
        mode: LateMode,
    ) -> Result<Self> {
        Ok(match mode {
            LateMode::Concat => {
                let widths: Vec<usize> = dims.iter().map(|(_, d)| *d).collect();
                Self::Concat(Stacked::concat(p, "proj", &widths, out_dim, true)?)
            }
            LateMode::Mean => Self::Mean(Stacked::per_modality(p, "proj", dims, out_dim)?),
            LateMode::Weighted => {
                let proj = Stacked::per_modality(p, "proj", dims, out_dim)?;
                let logits = p.tensor("modality_logits", &[dims.len()], Init::Zeros)?;
                Self::Weighted(proj, logits)
            }
            LateMode::Similarity => {
                if let Some((m, d)) = dims.iter().find(|(_, d)| *d != out_dim) {
                    return Err(MlmfError::config(
                        "out_dim",
                        format!(
                            "late mode `similarity` keeps the aligned towers' space: every \
                             modality's pooled width must equal out_dim ({out_dim}), and {m}'s \
                             is {d}"
                        ),
                    ));
                }
                Self::Similarity
            }
            LateMode::Logits => {
                let norms = dims
                    .iter()
                    .map(|(m, d)| {
                        let w = p.tensor(&format!("norm.{m}.weight"), &[*d], Init::Ones)?;
                        let b = p.tensor(&format!("norm.{m}.bias"), &[*d], Init::Zeros)?;
                        LayerNorm::new(w, b, LayerNorm::EPS)
                    })
                    .collect::<Result<_>>()?;
                Self::Logits(norms, Stacked::per_modality(p, "head", dims, out_dim)?)
            }
        })
    }
}

impl FusionComponent for Late {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        let (fused, gates) = match self {
            Self::Concat(proj) => (proj.forward(&pooled, None)?, None),
            Self::Mean(proj) => (proj.forward(&pooled, Some(&mean_weights(inputs)?))?, None),
            Self::Weighted(proj, logits) => {
                let f = ce("late fusion");
                let scores = logits
                    .unsqueeze(0)
                    .and_then(|l| l.broadcast_as((inputs.batch, logits.dim(0)?)))
                    .and_then(|l| l.contiguous())
                    .map_err(f)?;
                let w = softmax_present(&scores, &inputs.presence()?)?;
                (proj.forward(&pooled, Some(&w))?, Some(w))
            }
            Self::Similarity => {
                let w = mean_weights(inputs)?;
                let f = ce("late similarity");
                let mut acc: Option<Tensor> = None;
                for (i, x) in pooled.iter().enumerate() {
                    let Some(x) = x else { continue };
                    let term = l2_normalize(x)?
                        .broadcast_mul(&w.narrow(1, i, 1).map_err(&f)?)
                        .map_err(&f)?;
                    acc = Some(match acc {
                        None => term,
                        Some(a) => (a + term).map_err(&f)?,
                    });
                }
                let fused =
                    acc.ok_or_else(|| MlmfError::Internal("late fusion without inputs".into()))?;
                (fused, None)
            }
            Self::Logits(norms, heads) => {
                let normed = norms
                    .iter()
                    .zip(&pooled)
                    .map(|(norm, x)| x.as_ref().map(|x| norm.forward(x)).transpose())
                    .collect::<Result<Vec<_>>>()?;
                (heads.forward(&normed, Some(&mean_weights(inputs)?))?, None)
            }
        };
        Ok(FusionOutput {
            fused,
            gates,
            attention: Vec::new(),
        })
    }
}
