//! `gated` (alias `adaptive`) fusion: input-dependent sigmoid gates, one per modality,
//! each computed from every modality's embedding.

use super::params::Params;
use super::{
    project_present, projections, weighted_sum, FusionComponent, FusionInputs, FusionOutput,
    SplitLinear,
};
use crate::encoders::layers::{ce, Linear};
use crate::error::Result;
use crate::modality::Modality;

pub(crate) struct Gated {
    /// `gate`: `sum D -> M`.
    gate: SplitLinear,
    proj: Vec<Linear>,
}

impl Gated {
    pub(crate) fn new(p: &mut Params, dims: &[(Modality, usize)], out_dim: usize) -> Result<Self> {
        let widths: Vec<usize> = dims.iter().map(|(_, d)| *d).collect();
        Ok(Self {
            gate: SplitLinear::take(p, "gate", &widths, dims.len(), true)?,
            proj: projections(p, "proj", dims, out_dim)?,
        })
    }
}

impl FusionComponent for Gated {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        let g = self.gate.forward(&pooled)?;
        let presence = inputs.presence()?;
        let g = candle_nn::ops::sigmoid(&g)
            .and_then(|g| g.broadcast_mul(&presence))
            .map_err(ce("gated fusion"))?;
        let fused = weighted_sum(&g, &project_present(&self.proj, &pooled)?)?;
        Ok(FusionOutput {
            fused,
            gates: Some(g),
            attention: Vec::new(),
        })
    }
}
