//! `late` fusion: pooled embeddings combined at the end (concat + projection, mean,
//! learned weighted sum, or averaged per-modality logits).

use candle_core::Tensor;

use super::blocks::LayerNorm;
use super::params::{Init, Params};
use super::{
    mean_present, project_present, projections, softmax_present, weighted_sum, FusionComponent,
    FusionInputs, FusionOutput, SplitLinear,
};
use crate::config::fusion::LateMode;
use crate::encoders::layers::{ce, Linear};
use crate::error::Result;
use crate::modality::Modality;

pub(crate) enum Late {
    /// `proj(cat_m p_m)`.
    Concat(SplitLinear),
    /// `mean_m proj.m(p_m)`.
    Mean(Vec<Linear>),
    /// `sum_m softmax(modality_logits)_m proj.m(p_m)`.
    Weighted(Vec<Linear>, Tensor),
    /// `mean_m head.m(norm.m(p_m))`.
    Logits(Vec<(LayerNorm, Linear)>),
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
                Self::Concat(SplitLinear::take(p, "proj", &widths, out_dim, true)?)
            }
            LateMode::Mean => Self::Mean(projections(p, "proj", dims, out_dim)?),
            LateMode::Weighted => {
                let proj = projections(p, "proj", dims, out_dim)?;
                let logits = p.tensor("modality_logits", &[dims.len()], Init::Zeros)?;
                Self::Weighted(proj, logits)
            }
            LateMode::Logits => Self::Logits(
                dims.iter()
                    .map(|(m, d)| {
                        let w = p.tensor(&format!("norm.{m}.weight"), &[*d], Init::Ones)?;
                        let b = p.tensor(&format!("norm.{m}.bias"), &[*d], Init::Zeros)?;
                        let norm = LayerNorm::new(w, b, LayerNorm::EPS)?;
                        Ok((norm, p.linear(&format!("head.{m}"), *d, out_dim, true)?))
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

impl FusionComponent for Late {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        let (fused, gates) = match self {
            Self::Concat(proj) => (proj.forward(&pooled)?, None),
            Self::Mean(proj) => (mean_present(&project_present(proj, &pooled)?)?, None),
            Self::Weighted(proj, logits) => {
                let f = ce("late fusion");
                let scores = logits
                    .unsqueeze(0)
                    .and_then(|l| l.broadcast_as((inputs.batch, logits.dim(0)?)))
                    .and_then(|l| l.contiguous())
                    .map_err(f)?;
                let w = softmax_present(&scores, &inputs.presence()?)?;
                let fused = weighted_sum(&w, &project_present(proj, &pooled)?)?;
                (fused, Some(w))
            }
            Self::Logits(heads) => {
                let logits = heads
                    .iter()
                    .zip(&pooled)
                    .map(|((norm, head), x)| {
                        x.as_ref()
                            .map(|x| head.forward(&norm.forward(x)?))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()?;
                (mean_present(&logits)?, None)
            }
        };
        Ok(FusionOutput {
            fused,
            gates,
            attention: Vec::new(),
        })
    }
}
