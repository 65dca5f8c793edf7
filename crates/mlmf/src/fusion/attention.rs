//! `attention` fusion (TorchMultimodal's attention fusion): per-modality projections
//! weighted by a softmax over modalities, scored from the concatenation of all of them.

use super::params::Params;
use super::{softmax_present, FusionComponent, FusionInputs, FusionOutput, Stacked};
use crate::encoders::layers::{ce, Linear};
use crate::error::Result;
use crate::modality::Modality;

pub(crate) struct AttentionFusion {
    /// `score` (`sum D -> M`) or `score.fc1` (`sum D -> attention_dim`).
    score: Stacked,
    /// `score.fc2` (`attention_dim -> M`) after a tanh, with `attention_dim`.
    fc2: Option<Linear>,
    proj: Stacked,
}

impl AttentionFusion {
    pub(crate) fn new(
        p: &mut Params,
        dims: &[(Modality, usize)],
        out_dim: usize,
        attention_dim: Option<usize>,
    ) -> Result<Self> {
        let widths: Vec<usize> = dims.iter().map(|(_, d)| *d).collect();
        let m = dims.len();
        let (score, fc2) = match attention_dim {
            None => (Stacked::concat(p, "score", &widths, m, true)?, None),
            Some(a) => (
                Stacked::concat(p, "score.fc1", &widths, a, true)?,
                Some(p.linear("score.fc2", a, m, true)?),
            ),
        };
        Ok(Self {
            score,
            fc2,
            proj: Stacked::per_modality(p, "proj", dims, out_dim)?,
        })
    }
}

impl FusionComponent for AttentionFusion {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        let mut s = self.score.forward(&pooled, None)?;
        if let Some(fc2) = &self.fc2 {
            let t = match crate::encoders::cpu::tanh_forward(&s)? {
                Some(t) => t,
                None => s.tanh().map_err(ce("attention fusion"))?,
            };
            s = fc2.forward(&t)?;
        }
        let w = softmax_present(&s, &inputs.presence()?)?;
        let fused = self.proj.forward(&pooled, Some(&w))?;
        Ok(FusionOutput {
            fused,
            gates: Some(w),
            attention: Vec::new(),
        })
    }
}
