//! `early` fusion: the tokens of every present modality, projected to one width and
//! tagged with a learned modality-type embedding, form one sequence that pre-norm
//! transformer layers process jointly; the result is the masked mean of that sequence.

use candle_core::Tensor;

use super::blocks::{Mlp, Norm};
use super::params::{Init, Params};
use super::{masked_mean, projections, FusionComponent, FusionInputs, FusionOutput};
use crate::attention::CrossModalAttention;
use crate::config::fusion::LayerStackOptions;
use crate::config::fusion::{MlpKind, NormKind};
use crate::config::CrossModalAttentionConfig;
use crate::encoders::cpu;
use crate::encoders::layers::{ce, Activation, EncoderLayer, Linear, SelfAttention};
use crate::error::Result;
use crate::modality::Modality;

/// One pre-norm transformer layer over the joint sequence.
pub(crate) struct JointLayer {
    norm1: Norm,
    attn: CrossModalAttention,
    norm2: Norm,
    mlp: Mlp,
}

/// The attention of a fusion layer: `{name}.{q,k,v,out}_proj`, biases on.
pub(crate) fn take_attention(
    p: &mut Params,
    name: &str,
    dim: usize,
    num_heads: usize,
) -> Result<CrossModalAttention> {
    let cfg = CrossModalAttentionConfig {
        num_heads,
        ..Default::default()
    };
    let untrained = p.is_seeded();
    CrossModalAttention::from_projections(
        dim,
        dim,
        &cfg,
        |proj, out, inp| {
            let (w, b) = p.linear_parts(&format!("{name}.{proj}"), inp, out, true)?;
            let b = b.ok_or_else(|| crate::MlmfError::Internal("attention: no bias".into()))?;
            Ok((w, b))
        },
        untrained,
    )
}

/// MLP hidden width `int(mlp_ratio * dim)`, at least 1.
pub(crate) fn hidden_width(ratio: f64, dim: usize) -> usize {
    ((ratio * dim as f64) as usize).max(1)
}

impl JointLayer {
    /// The same layer as the encoders' pre-norm layer, whose float32 CPU kernels fuse
    /// the q/k/v projections, bias, GELU and residual passes; LayerNorm + GELU only.
    fn encoder_layer(&self, dim: usize) -> Option<EncoderLayer> {
        let (Norm::Layer(n1), Norm::Layer(n2), None) = (&self.norm1, &self.norm2, &self.mlp.up)
        else {
            return None;
        };
        let [q, k, v, o] = self.attn.projections();
        Some(EncoderLayer {
            attn: SelfAttention::from_parts(
                q.clone(),
                k.clone(),
                v.clone(),
                o.clone(),
                dim,
                self.attn.heads().0,
            ),
            norm1: n1.0.clone(),
            norm2: n2.0.clone(),
            fc1: self.mlp.first.clone(),
            fc2: self.mlp.last.clone(),
            act: Activation::Gelu,
            pre_norm: true,
        })
    }
}

pub(crate) struct Early {
    proj: Vec<Linear>,
    /// `[M, out]`.
    type_embedding: Tensor,
    layers: Vec<JointLayer>,
    /// The layers as encoder layers (LayerNorm + GELU stacks), for the fused CPU path.
    fast: Option<Vec<EncoderLayer>>,
    norm: Norm,
}

impl Early {
    pub(crate) fn new(
        p: &mut Params,
        dims: &[(Modality, usize)],
        out_dim: usize,
        o: &LayerStackOptions,
    ) -> Result<Self> {
        let proj = projections(p, "proj", dims, out_dim)?;
        let bound = 1.0 / (out_dim as f32).sqrt();
        let type_embedding = p.tensor(
            "type_embedding",
            &[dims.len(), out_dim],
            Init::Uniform(bound),
        )?;
        let hidden = hidden_width(o.mlp_ratio, out_dim);
        let layers: Vec<JointLayer> = (0..o.num_layers)
            .map(|i| {
                let n = format!("layers.{i}");
                Ok(JointLayer {
                    norm1: Norm::take(p, &format!("{n}.norm1"), o.norm, out_dim)?,
                    attn: take_attention(p, &format!("{n}.attn"), out_dim, o.num_heads)?,
                    norm2: Norm::take(p, &format!("{n}.norm2"), o.norm, out_dim)?,
                    mlp: Mlp::take(p, &format!("{n}.mlp"), o.mlp, out_dim, hidden)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = Norm::take(p, "norm", o.norm, out_dim)?;
        let fast = (o.norm == NormKind::Layer && o.mlp == MlpKind::Gelu)
            .then(|| {
                layers
                    .iter()
                    .map(|l| l.encoder_layer(out_dim))
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        Ok(Self {
            proj,
            type_embedding,
            layers,
            fast,
            norm,
        })
    }
}

/// Concatenates token sequences (and their masks; all ones where a sequence has none)
/// along the token axis; the mask is `None` when no sequence has one.
pub(crate) fn concat_tokens(
    parts: &[(&Tensor, Option<&Tensor>)],
) -> Result<(Tensor, Option<Tensor>)> {
    let f = ce("fusion tokens");
    let xs: Vec<&Tensor> = parts.iter().map(|(x, _)| *x).collect();
    let x = if xs.len() == 1 {
        xs[0].clone()
    } else {
        Tensor::cat(&xs, 1).map_err(&f)?
    };
    if parts.iter().all(|(_, m)| m.is_none()) {
        return Ok((x, None));
    }
    let masks = parts
        .iter()
        .map(|(x, m)| match m {
            Some(m) => Ok((*m).clone()),
            None => {
                let (b, t, _) = x.dims3()?;
                Tensor::ones((b, t), candle_core::DType::F32, x.device())
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(&f)?;
    let mask = Tensor::cat(&masks, 1).map_err(f)?;
    Ok((x, Some(mask)))
}

impl FusionComponent for Early {
    fn fuse(&self, inputs: &FusionInputs, return_attention: bool) -> Result<FusionOutput> {
        let f = ce("early fusion");
        // The packed CPU path (see `cpu::packed`): padded tokens dropped before the
        // layers; taken when no attention weights are asked for.
        if let (Some(fast), false, Norm::Layer(norm)) = (&self.fast, return_attention, &self.norm) {
            let xs: Vec<_> = inputs
                .values
                .iter()
                .map(|v| v.as_ref().map(|p| (&p.tokens, p.mask.as_ref())))
                .collect();
            let packed =
                cpu::packed::early_stack(&xs, &self.proj, &self.type_embedding, fast, &norm.0)?;
            if let Some(fused) = packed {
                let d = fused.len() / inputs.batch.max(1);
                let fused =
                    Tensor::from_vec(fused, (inputs.batch, d), &inputs.device).map_err(&f)?;
                return Ok(FusionOutput {
                    fused,
                    gates: None,
                    attention: Vec::new(),
                });
            }
        }
        let mut seqs = Vec::new();
        for (i, _, x) in inputs.present() {
            let t = self.type_embedding.get(i).map_err(&f)?;
            let y = self.proj[i]
                .forward(&x.tokens)?
                .broadcast_add(&t)
                .map_err(&f)?;
            seqs.push((y, x.mask.clone()));
        }
        let parts: Vec<(&Tensor, Option<&Tensor>)> =
            seqs.iter().map(|(x, m)| (x, m.as_ref())).collect();
        let (mut x, mask) = concat_tokens(&parts)?;
        let mut attention = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.norm1.forward(&x)?;
            let a = layer
                .attn
                .forward(&h, &h, mask.as_ref(), mask.as_ref(), return_attention)?;
            x = (x + a.output).map_err(&f)?;
            if let Some(w) = a.weights {
                attention.push((format!("layers.{i}"), w));
            }
            let h = layer.mlp.forward(&layer.norm2.forward(&x)?)?;
            x = (x + h).map_err(&f)?;
        }
        let fused = masked_mean(&self.norm.forward(&x)?, mask.as_ref())?;
        Ok(FusionOutput {
            fused,
            gates: None,
            attention,
        })
    }
}
