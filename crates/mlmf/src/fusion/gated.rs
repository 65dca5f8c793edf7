//! `gated` (alias `adaptive`) fusion: input-dependent sigmoid gates, one per modality,
//! each computed from every modality's embedding.

use super::params::Params;
use super::{FusionComponent, FusionInputs, FusionOutput, Stacked};
use crate::encoders::layers::ce;
use crate::error::Result;
use crate::modality::Modality;

pub(crate) struct Gated {
    /// `gate`: `sum D -> M`.
    gate: Stacked,
    proj: Stacked,
}

impl Gated {
    pub(crate) fn new(p: &mut Params, dims: &[(Modality, usize)], out_dim: usize) -> Result<Self> {
        let widths: Vec<usize> = dims.iter().map(|(_, d)| *d).collect();
        Ok(Self {
            gate: Stacked::concat(p, "gate", &widths, dims.len(), true)?,
            proj: Stacked::per_modality(p, "proj", dims, out_dim)?,
        })
    }
}

impl FusionComponent for Gated {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        let g = self.gate.forward(&pooled, None)?;
        let presence = inputs.presence()?;
        let g = candle_nn::ops::sigmoid(&g)
            .and_then(|g| g.broadcast_mul(&presence))
            .map_err(ce("gated fusion"))?;
        let fused = self.proj.forward(&pooled, Some(&g))?;
        Ok(FusionOutput {
            fused,
            gates: Some(g),
            attention: Vec::new(),
        })
    }
}
