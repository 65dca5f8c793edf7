//! `middle` fusion: every modality keeps its token sequence; in each layer each
//! modality's tokens attend over the tokens of all the other present modalities
//! (cross-attention + MLP, pre-norm, residual, optionally gated), then each sequence is
//! normalised and pooled and the pools are averaged.

use super::blocks::{Gate, Mlp, Norm};
use super::early::{concat_tokens, hidden_width, take_attention};
use super::params::Params;
use super::{masked_mean, mean_present, projections, FusionComponent, FusionInputs, FusionOutput};
use crate::attention::CrossModalAttention;
use crate::config::fusion::LayerStackOptions;
use crate::encoders::cpu;
use crate::encoders::layers::{ce, Activation, Linear};
use crate::error::Result;
use crate::modality::Modality;

/// One modality's half of a fusion layer.
struct FusionLayer {
    norm_q: Norm,
    norm_kv: Norm,
    attn: CrossModalAttention,
    attn_gate: Gate,
    norm_mlp: Norm,
    mlp: Mlp,
    mlp_gate: Gate,
    /// `out_proj` and `fc2` with the residual gates folded in (`tanh(alpha) W`,
    /// `tanh(alpha) b`; the maps themselves without a gate), for the packed CPU path;
    /// `None` when the layer is not LayerNorm + GELU + no/tanh gates + plain attention.
    folded: Option<(Linear, Linear)>,
}

impl FusionLayer {
    fn fold(&mut self) -> Result<()> {
        let factor = |g: &Gate| match g {
            Gate::None => Some(None),
            Gate::Tanh(t) => Some(Some(t.factor())),
            Gate::Sigmoid(_) => None,
        };
        let plain = matches!(
            (&self.norm_q, &self.norm_kv, &self.norm_mlp, &self.mlp.up),
            (Norm::Layer(_), Norm::Layer(_), Norm::Layer(_), None)
        ) && self.attn.is_plain()
            && self.attn.heads().0 == self.attn.heads().1;
        let (Some(a), Some(m), true) = (factor(&self.attn_gate), factor(&self.mlp_gate), plain)
        else {
            return Ok(());
        };
        let scale = |lin: &Linear, s: Option<f32>| match s {
            None => Ok(lin.clone()),
            Some(s) => lin.scaled(s),
        };
        self.folded = Some((
            scale(self.attn.projections()[3], a)?,
            scale(&self.mlp.last, m)?,
        ));
        Ok(())
    }

    /// The layer as the packed CPU path takes it.
    fn cross_block(&self) -> Option<cpu::packed::CrossBlock<'_>> {
        let (Norm::Layer(norm_q), Norm::Layer(norm_kv), Norm::Layer(norm_mlp), Some((o, fc2))) =
            (&self.norm_q, &self.norm_kv, &self.norm_mlp, &self.folded)
        else {
            return None;
        };
        let [q, k, v, _] = self.attn.projections();
        Some(cpu::packed::CrossBlock {
            norm_q: &norm_q.0,
            norm_kv: &norm_kv.0,
            attn: [q, k, v, o],
            heads: self.attn.heads().0,
            scale: self.attn.scale() as f32,
            norm_mlp: &norm_mlp.0,
            fc1: &self.mlp.first,
            fc2,
        })
    }

    /// `x + mlp(norm_mlp(x))` on the fused float32 CPU kernels (LayerNorm, GELU, no
    /// gate); `None` otherwise.
    fn fast_mlp(&self, x: &candle_core::Tensor) -> Result<Option<candle_core::Tensor>> {
        match (&self.norm_mlp, &self.mlp.up, &self.mlp_gate) {
            (Norm::Layer(n), None, Gate::None) => cpu::mlp_residual(
                x,
                (&n.0.weight, &n.0.bias, n.0.eps),
                &self.mlp.first,
                &self.mlp.last,
                Activation::Gelu,
            ),
            _ => Ok(None),
        }
    }
}

pub(crate) struct Middle {
    proj: Vec<Linear>,
    /// `[layer][modality]`.
    layers: Vec<Vec<FusionLayer>>,
    norm: Norm,
}

impl Middle {
    pub(crate) fn new(
        p: &mut Params,
        dims: &[(Modality, usize)],
        out_dim: usize,
        o: &LayerStackOptions,
    ) -> Result<Self> {
        let proj = projections(p, "proj", dims, out_dim)?;
        let hidden = hidden_width(o.mlp_ratio, out_dim);
        let layers = (0..o.num_layers)
            .map(|i| {
                dims.iter()
                    .map(|(m, _)| {
                        let n = format!("layers.{i}.{m}");
                        let mut l = FusionLayer {
                            norm_q: Norm::take(p, &format!("{n}.norm_q"), o.norm, out_dim)?,
                            norm_kv: Norm::take(p, &format!("{n}.norm_kv"), o.norm, out_dim)?,
                            attn: take_attention(p, &format!("{n}.attn"), out_dim, o.num_heads)?,
                            attn_gate: Gate::take(p, &format!("{n}.attn_gate"), o.gate, out_dim)?,
                            norm_mlp: Norm::take(p, &format!("{n}.norm_mlp"), o.norm, out_dim)?,
                            mlp: Mlp::take(p, &format!("{n}.mlp"), o.mlp, out_dim, hidden)?,
                            mlp_gate: Gate::take(p, &format!("{n}.mlp_gate"), o.gate, out_dim)?,
                            folded: None,
                        };
                        l.fold()?;
                        Ok(l)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let norm = Norm::take(p, "norm", o.norm, out_dim)?;
        Ok(Self { proj, layers, norm })
    }

    /// The packed float32 CPU path (see [`cpu::packed`]): padded tokens dropped, gates
    /// folded into the weights; `None` when a layer or input does not fit it.
    fn fuse_packed(&self, inputs: &FusionInputs) -> Result<Option<FusionOutput>> {
        let Norm::Layer(norm) = &self.norm else {
            return Ok(None);
        };
        let Some(blocks) = self
            .layers
            .iter()
            .map(|l| {
                l.iter()
                    .map(FusionLayer::cross_block)
                    .collect::<Option<Vec<_>>>()
            })
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let xs: Vec<_> = inputs
            .values
            .iter()
            .map(|v| v.as_ref().map(|p| (&p.tokens, p.mask.as_ref())))
            .collect();
        let Some(pools) = cpu::packed::middle_stack(&xs, &self.proj, &blocks, &norm.0)? else {
            return Ok(None);
        };
        let d = norm.0.weight.elem_count();
        let pools = pools
            .into_iter()
            .map(|p| {
                p.map(|p| candle_core::Tensor::from_vec(p, (inputs.batch, d), &inputs.device))
                    .transpose()
                    .map_err(ce("middle fusion"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(FusionOutput {
            fused: mean_present(&pools)?,
            gates: None,
            attention: Vec::new(),
        }))
    }
}

impl FusionComponent for Middle {
    fn fuse(&self, inputs: &FusionInputs, return_attention: bool) -> Result<FusionOutput> {
        if !return_attention {
            if let Some(out) = self.fuse_packed(inputs)? {
                return Ok(out);
            }
        }
        let f = ce("middle fusion");
        let m_all = inputs.modalities.len();
        let mut xs: Vec<Option<candle_core::Tensor>> = vec![None; m_all];
        let mut masks = vec![None; m_all];
        for (i, _, x) in inputs.present() {
            xs[i] = Some(self.proj[i].forward(&x.tokens)?);
            masks[i] = x.mask.clone();
        }
        let present: Vec<usize> = inputs.present().map(|(i, _, _)| i).collect();
        let mut attention = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            let mut next = xs.clone();
            for &m in &present {
                let l = &layer[m];
                let x = xs[m]
                    .as_ref()
                    .ok_or_else(|| crate::MlmfError::Internal("middle".into()))?;
                let others: Vec<(&candle_core::Tensor, Option<&candle_core::Tensor>)> = present
                    .iter()
                    .filter(|&&n| n != m)
                    .filter_map(|&n| xs[n].as_ref().map(|x| (x, masks[n].as_ref())))
                    .collect();
                let mut y = x.clone();
                if !others.is_empty() {
                    let (c, cmask) = concat_tokens(&others)?;
                    let a = l.attn.forward(
                        &l.norm_q.forward(x)?,
                        &l.norm_kv.forward(&c)?,
                        masks[m].as_ref(),
                        cmask.as_ref(),
                        return_attention,
                    )?;
                    if let Some(w) = a.weights {
                        let name = inputs.modalities[m].0;
                        attention.push((format!("layers.{li}.{name}"), w));
                    }
                    y = (y + l.attn_gate.forward(x, &a.output)?).map_err(&f)?;
                }
                y = match l.fast_mlp(&y)? {
                    Some(z) => z,
                    None => {
                        let h = l.mlp.forward(&l.norm_mlp.forward(&y)?)?;
                        (&y + l.mlp_gate.forward(&y, &h)?).map_err(&f)?
                    }
                };
                next[m] = Some(y);
            }
            xs = next;
        }
        let pools = xs
            .iter()
            .zip(&masks)
            .map(|(x, m)| {
                x.as_ref()
                    .map(|x| masked_mean(&self.norm.forward(x)?, m.as_ref()))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FusionOutput {
            fused: mean_present(&pools)?,
            gates: None,
            attention,
        })
    }
}
