//! The training forward of every built-in fusion strategy (docs/fusion.md), over the
//! same tensor names as [`crate::fusion::Fusion`], in differentiable candle ops.
//!
//! Inputs are padded batches, and a modality may be absent for some rows only (a row
//! of the data without it, or modality dropout): row `b` is fused exactly as if only
//! its present modalities had been passed to the inference layer. Concatenations read
//! zeros for an absent row, softmaxes and means over modalities run per row over the
//! present ones, and an absent row's tokens are masked out of every sequence.

use candle_core::{DType, Tensor};

use super::attention::AttnNet;
use super::nn::{self, Lin};
use super::vars::VarStore;
use crate::config::fusion::{GateKind, LayerStackOptions, MlpKind, NormKind};
use crate::config::{CrossModalAttentionConfig, FusionStrategy};
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};
use crate::fusion::blocks::LayerNorm as InferenceLayerNorm;
use crate::modality::Modality;

/// One modality's input to a training forward.
#[derive(Debug, Clone)]
pub(crate) struct ModIn {
    /// `[B, D]` pooled or `[B, T, D]` tokens.
    pub(crate) x: Tensor,
    /// `[B, T]` 0/1 (tokens only); all 0 on absent rows.
    pub(crate) mask: Option<Tensor>,
    /// `[B, 1]` 0/1: which rows carry the modality.
    pub(crate) present: Tensor,
    /// The same, on the host.
    pub(crate) rows: Vec<bool>,
}

impl ModIn {
    /// `[B, D]`: the pooled input (0 on absent rows), or the masked mean of the tokens.
    pub(crate) fn pooled(&self) -> Result<Tensor> {
        if self.x.rank() == 2 {
            return self
                .x
                .broadcast_mul(&self.present)
                .map_err(ce("fusion pool"));
        }
        let (x, mask) = self.tokens()?;
        nn::masked_mean(&x, &mask)
    }

    /// Tokens `[B, T, D]` and their mask `[B, T]`, absent rows masked out (a pooled
    /// input is one token).
    pub(crate) fn tokens(&self) -> Result<(Tensor, Tensor)> {
        let f = ce("fusion tokens");
        let x = match self.x.rank() {
            2 => self.x.unsqueeze(1).map_err(&f)?,
            _ => self.x.clone(),
        };
        let mask = match &self.mask {
            Some(m) if self.rows.iter().all(|&r| r) => m.clone(),
            Some(m) => m.broadcast_mul(&self.present).map_err(&f)?,
            None => {
                let (b, t, _) = x.dims3().map_err(&f)?;
                self.present
                    .broadcast_as((b, t))
                    .and_then(|m| m.contiguous())
                    .map_err(&f)?
            }
        };
        Ok((x, mask))
    }

    /// The same input with `x` replaced (an adapter's output).
    pub(crate) fn with_x(&self, x: Tensor) -> Self {
        Self {
            x,
            mask: self.mask.clone(),
            present: self.present.clone(),
            rows: self.rows.clone(),
        }
    }
}

/// `[B, M]` 0/1 presence of every modality (0 for modalities absent from the batch).
fn presence(inputs: &[Option<ModIn>], batch: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let f = ce("fusion presence");
    let cols = inputs
        .iter()
        .map(|i| match i {
            Some(i) => Ok(i.present.clone()),
            None => Tensor::zeros((batch, 1), DType::F32, dev),
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(&f)?;
    Tensor::cat(&cols, 1).map_err(f)
}

/// Softmax over each row's present modalities; absent ones get 0.
fn softmax_present(scores: &Tensor, presence: &Tensor) -> Result<Tensor> {
    nn::masked_softmax(scores, Some(presence))
}

/// `presence / max(1, number present)` per row.
fn mean_weights(presence: &Tensor) -> Result<Tensor> {
    let f = ce("modality mean");
    let n = presence
        .sum_keepdim(1)
        .and_then(|n| n.maximum(1f32))
        .map_err(&f)?;
    presence.broadcast_div(&n).map_err(f)
}

/// `sum_m s[:, m] * lin_m(p_m)` over the modalities in the batch.
fn weighted_maps(maps: &[Lin], pooled: &[Option<Tensor>], s: &Tensor) -> Result<Tensor> {
    let f = ce("fusion projections");
    let mut acc: Option<Tensor> = None;
    for (m, (lin, p)) in maps.iter().zip(pooled).enumerate() {
        let Some(p) = p else { continue };
        let y = lin
            .forward(p)?
            .broadcast_mul(&s.narrow(1, m, 1).map_err(&f)?)
            .map_err(&f)?;
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y).map_err(&f)?,
        });
    }
    acc.ok_or_else(|| MlmfError::Internal("fusion without inputs".into()))
}

/// The concatenation of the pooled inputs (zeros for modalities absent from the batch).
fn concat(
    pooled: &[Option<Tensor>],
    widths: &[usize],
    batch: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let f = ce("fusion concat");
    let parts = pooled
        .iter()
        .zip(widths)
        .map(|(p, &d)| match p {
            Some(p) => Ok(p.clone()),
            None => Tensor::zeros((batch, d), DType::F32, dev),
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(&f)?;
    Tensor::cat(&parts, 1).map_err(f)
}

/// LayerNorm or RMSNorm with trainable weights.
enum Norm {
    Layer(Tensor, Tensor),
    Rms(Tensor),
}

impl Norm {
    fn take(vs: &VarStore, name: &str, kind: NormKind) -> Result<Self> {
        Ok(match kind {
            NormKind::Layer => Self::Layer(
                vs.get(&format!("{name}.weight"))?,
                vs.get(&format!("{name}.bias"))?,
            ),
            NormKind::Rms => Self::Rms(vs.get(&format!("{name}.weight"))?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Layer(w, b) => nn::layer_norm(x, w, b, f64::from(InferenceLayerNorm::EPS)),
            Self::Rms(w) => nn::rms_norm(x, w, f64::from(crate::fusion::blocks::RmsNorm::EPS)),
        }
    }
}

/// A GELU or SwiGLU MLP with trainable weights.
struct Mlp {
    first: Lin,
    up: Option<Lin>,
    last: Lin,
}

impl Mlp {
    fn take(vs: &VarStore, name: &str, kind: MlpKind) -> Result<Self> {
        let lin = |n: &str, bias: bool| -> Result<Lin> {
            Ok(Lin {
                w: vs.get(&format!("{name}.{n}.weight"))?,
                b: if bias {
                    Some(vs.get(&format!("{name}.{n}.bias"))?)
                } else {
                    None
                },
            })
        };
        Ok(match kind {
            MlpKind::Gelu => Self {
                first: lin("fc1", true)?,
                up: None,
                last: lin("fc2", true)?,
            },
            MlpKind::Swiglu => Self {
                first: lin("gate_proj", false)?,
                up: Some(lin("up_proj", false)?),
                last: lin("down_proj", false)?,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("mlp");
        let h = self.first.forward(x)?;
        let h = match &self.up {
            None => nn::gelu(&h)?,
            Some(up) => (h.silu().map_err(&f)? * up.forward(x)?).map_err(&f)?,
        };
        self.last.forward(&h)
    }
}

/// The residual gate `G(x, y)` with trainable weights.
enum Gate {
    None,
    Tanh(Tensor),
    Sigmoid(Lin),
}

impl Gate {
    fn take(vs: &VarStore, name: &str, kind: GateKind) -> Result<Self> {
        Ok(match kind {
            GateKind::None => Self::None,
            GateKind::Tanh => Self::Tanh(vs.get(name)?),
            GateKind::Sigmoid => Self::Sigmoid(Lin {
                w: vs.get(&format!("{name}.weight"))?,
                b: Some(vs.get(&format!("{name}.bias"))?),
            }),
        })
    }

    fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let f = ce("gate");
        match self {
            Self::None => Ok(y.clone()),
            Self::Tanh(a) => y.broadcast_mul(&a.tanh().map_err(&f)?).map_err(f),
            Self::Sigmoid(l) => (nn::sigmoid(&l.forward(x)?)? * y).map_err(f),
        }
    }
}

/// One pre-norm joint layer of `early`.
struct JointLayer {
    norm1: Norm,
    attn: AttnNet,
    norm2: Norm,
    mlp: Mlp,
}

/// One modality's half of a `middle` layer.
struct CrossLayer {
    norm_q: Norm,
    norm_kv: Norm,
    attn: AttnNet,
    attn_gate: Gate,
    norm_mlp: Norm,
    mlp: Mlp,
    mlp_gate: Gate,
}

impl CrossLayer {
    /// The layer as one fused op (`ops_layer`) where it has that op's form: LayerNorms,
    /// a GELU MLP with biases, no gates, plain attention, float32 on the CPU; `None`
    /// otherwise.
    fn fused(
        &self,
        x: &Tensor,
        c: &Tensor,
        mask: &Tensor,
        cmask: &Tensor,
    ) -> Result<Option<Tensor>> {
        let (Norm::Layer(qw, qb), Norm::Layer(kw, kb), Norm::Layer(mw, mb)) =
            (&self.norm_q, &self.norm_kv, &self.norm_mlp)
        else {
            return Ok(None);
        };
        let (Gate::None, Gate::None, None) = (&self.attn_gate, &self.mlp_gate, &self.mlp.up) else {
            return Ok(None);
        };
        let (Some(b1), Some(b2)) = (&self.mlp.first.b, &self.mlp.last.b) else {
            return Ok(None);
        };
        let f = ce("middle fusion");
        let (b, tq, _) = x.dims3().map_err(&f)?;
        let tk = c.dim(1).map_err(&f)?;
        let Some(parts) = self
            .attn
            .plain_parts(x, Some(mask), Some(cmask), (b, tq, tk))?
        else {
            return Ok(None);
        };
        let mut params = vec![qw.clone(), qb.clone(), kw.clone(), kb.clone()];
        for l in parts.lins {
            let Some(bias) = &l.b else { return Ok(None) };
            params.extend([l.w.clone(), bias.clone()]);
        }
        params.extend([mw.clone(), mb.clone()]);
        params.extend([self.mlp.first.w.clone(), b1.clone()]);
        params.extend([self.mlp.last.w.clone(), b2.clone()]);
        super::ops_layer::cross_layer(
            params,
            parts.core,
            parts.keep,
            InferenceLayerNorm::EPS,
            x,
            c,
        )
        .map(Some)
        .map_err(f)
    }
}

/// A built-in fusion strategy over trainable tensors.
enum Net {
    LateConcat(Lin),
    LateMean(Vec<Lin>),
    LateWeighted(Vec<Lin>, Tensor),
    LateLogits(Vec<Norm>, Vec<Lin>),
    Attention {
        score: Lin,
        fc2: Option<Lin>,
        proj: Vec<Lin>,
    },
    Gated {
        gate: Lin,
        proj: Vec<Lin>,
    },
    Early {
        proj: Vec<Lin>,
        types: Tensor,
        layers: Vec<JointLayer>,
        norm: Norm,
    },
    Middle {
        proj: Vec<Lin>,
        layers: Vec<Vec<CrossLayer>>,
        norm: Norm,
    },
}

/// The training twin of a [`crate::fusion::Fusion`]; see the module docs.
pub(crate) struct FusionNet {
    net: Net,
    widths: Vec<usize>,
}

/// What a training forward of the fusion returns.
pub(crate) struct FusedOut {
    /// `[B, out]`.
    pub(crate) fused: Tensor,
    /// `[B, M]` per-modality weights, for the strategies that have them.
    pub(crate) gates: Option<Tensor>,
}

fn attention(vs: &VarStore, name: &str, dim: usize, heads: usize) -> Result<AttnNet> {
    let cfg = CrossModalAttentionConfig {
        num_heads: heads,
        ..Default::default()
    };
    AttnNet::from_store(vs, &format!("{name}."), (heads, heads, dim / heads), &cfg)
}

impl FusionNet {
    /// The strategy over `dims`, its tensors read from `vs` under `prefix`.
    pub(crate) fn new(
        vs: &VarStore,
        prefix: &str,
        strategy: &FusionStrategy,
        dims: &[(Modality, usize)],
    ) -> Result<Self> {
        let lin = |n: &str, bias: bool| -> Result<Lin> {
            Ok(Lin {
                w: vs.get(&format!("{prefix}{n}.weight"))?,
                b: if bias {
                    Some(vs.get(&format!("{prefix}{n}.bias"))?)
                } else {
                    None
                },
            })
        };
        let per = |n: &str| -> Result<Vec<Lin>> {
            dims.iter()
                .map(|(m, _)| lin(&format!("{n}.{m}"), true))
                .collect()
        };
        use crate::config::fusion::LateMode;
        let net = match strategy {
            FusionStrategy::Late(o) => match o.mode {
                LateMode::Concat => Net::LateConcat(lin("proj", true)?),
                LateMode::Mean => Net::LateMean(per("proj")?),
                LateMode::Weighted => {
                    Net::LateWeighted(per("proj")?, vs.get(&format!("{prefix}modality_logits"))?)
                }
                LateMode::Similarity => {
                    return Err(MlmfError::config(
                        "fusion.strategy",
                        "late mode `similarity` has no weights to train: it is the aligned \
                         checkpoint's own space; train another mode (concat, mean, weighted, \
                         logits) or another strategy",
                    ))
                }
                LateMode::Logits => Net::LateLogits(
                    dims.iter()
                        .map(|(m, _)| Norm::take(vs, &format!("{prefix}norm.{m}"), NormKind::Layer))
                        .collect::<Result<_>>()?,
                    per("head")?,
                ),
            },
            FusionStrategy::Attention(o) => match o.attention_dim {
                None => Net::Attention {
                    score: lin("score", true)?,
                    fc2: None,
                    proj: per("proj")?,
                },
                Some(_) => Net::Attention {
                    score: lin("score.fc1", true)?,
                    fc2: Some(lin("score.fc2", true)?),
                    proj: per("proj")?,
                },
            },
            FusionStrategy::Gated(_) => Net::Gated {
                gate: lin("gate", true)?,
                proj: per("proj")?,
            },
            FusionStrategy::Early(o) => Self::early(vs, prefix, o, per("proj")?)?,
            FusionStrategy::Middle(o) => Self::middle(vs, prefix, dims, o, per("proj")?)?,
            FusionStrategy::Custom(_) => {
                return Err(MlmfError::config(
                    "fusion.strategy",
                    "a custom fusion (a Python callable or a registered component) holds its \
                     own weights: mlmf trains the built-in strategies only",
                ))
            }
        };
        Ok(Self {
            net,
            widths: dims.iter().map(|(_, d)| *d).collect(),
        })
    }

    fn early(vs: &VarStore, prefix: &str, o: &LayerStackOptions, proj: Vec<Lin>) -> Result<Net> {
        let out = proj
            .first()
            .map(|p| p.w.dim(0))
            .transpose()
            .map_err(ce("early fusion"))?
            .unwrap_or(0);
        let layers = (0..o.num_layers)
            .map(|i| {
                let n = format!("{prefix}layers.{i}");
                Ok(JointLayer {
                    norm1: Norm::take(vs, &format!("{n}.norm1"), o.norm)?,
                    attn: attention(vs, &format!("{n}.attn"), out, o.num_heads)?,
                    norm2: Norm::take(vs, &format!("{n}.norm2"), o.norm)?,
                    mlp: Mlp::take(vs, &format!("{n}.mlp"), o.mlp)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Net::Early {
            proj,
            types: vs.get(&format!("{prefix}type_embedding"))?,
            layers,
            norm: Norm::take(vs, &format!("{prefix}norm"), o.norm)?,
        })
    }

    fn middle(
        vs: &VarStore,
        prefix: &str,
        dims: &[(Modality, usize)],
        o: &LayerStackOptions,
        proj: Vec<Lin>,
    ) -> Result<Net> {
        let out = proj
            .first()
            .map(|p| p.w.dim(0))
            .transpose()
            .map_err(ce("middle fusion"))?
            .unwrap_or(0);
        let layers = (0..o.num_layers)
            .map(|i| {
                dims.iter()
                    .map(|(m, _)| {
                        let n = format!("{prefix}layers.{i}.{m}");
                        Ok(CrossLayer {
                            norm_q: Norm::take(vs, &format!("{n}.norm_q"), o.norm)?,
                            norm_kv: Norm::take(vs, &format!("{n}.norm_kv"), o.norm)?,
                            attn: attention(vs, &format!("{n}.attn"), out, o.num_heads)?,
                            attn_gate: Gate::take(vs, &format!("{n}.attn_gate"), o.gate)?,
                            norm_mlp: Norm::take(vs, &format!("{n}.norm_mlp"), o.norm)?,
                            mlp: Mlp::take(vs, &format!("{n}.mlp"), o.mlp)?,
                            mlp_gate: Gate::take(vs, &format!("{n}.mlp_gate"), o.gate)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(Net::Middle {
            proj,
            layers,
            norm: Norm::take(vs, &format!("{prefix}norm"), o.norm)?,
        })
    }

    /// Fuses `inputs` (the fusion's modalities in order; `None` = absent from the
    /// batch; at least one present).
    pub(crate) fn forward(&self, inputs: &[Option<ModIn>]) -> Result<FusedOut> {
        let first = inputs
            .iter()
            .flatten()
            .next()
            .ok_or_else(|| MlmfError::Internal("fusion without inputs".into()))?;
        let dev = first.x.device().clone();
        let batch = first.x.dim(0).map_err(ce("fusion"))?;
        let f = ce("fusion");
        let pooled = || -> Result<Vec<Option<Tensor>>> {
            inputs
                .iter()
                .map(|i| i.as_ref().map(ModIn::pooled).transpose())
                .collect()
        };
        let (fused, gates) = match &self.net {
            Net::LateConcat(proj) => {
                let x = concat(&pooled()?, &self.widths, batch, &dev)?;
                (proj.forward(&x)?, None)
            }
            Net::LateMean(proj) => {
                let s = mean_weights(&presence(inputs, batch, &dev)?)?;
                (weighted_maps(proj, &pooled()?, &s)?, None)
            }
            Net::LateWeighted(proj, logits) => {
                let p = presence(inputs, batch, &dev)?;
                let scores = logits
                    .unsqueeze(0)
                    .and_then(|l| l.broadcast_as(p.dims()))
                    .map_err(&f)?;
                let w = softmax_present(&scores, &p)?;
                (weighted_maps(proj, &pooled()?, &w)?, Some(w))
            }
            Net::LateLogits(norms, heads) => {
                let s = mean_weights(&presence(inputs, batch, &dev)?)?;
                let normed = norms
                    .iter()
                    .zip(pooled()?)
                    .map(|(n, p)| p.map(|p| n.forward(&p)).transpose())
                    .collect::<Result<Vec<_>>>()?;
                (weighted_maps(heads, &normed, &s)?, None)
            }
            Net::Attention { score, fc2, proj } => {
                let pooled = pooled()?;
                let mut s = score.forward(&concat(&pooled, &self.widths, batch, &dev)?)?;
                if let Some(fc2) = fc2 {
                    s = fc2.forward(&s.tanh().map_err(&f)?)?;
                }
                let w = softmax_present(&s, &presence(inputs, batch, &dev)?)?;
                (weighted_maps(proj, &pooled, &w)?, Some(w))
            }
            Net::Gated { gate, proj } => {
                let pooled = pooled()?;
                let g = gate.forward(&concat(&pooled, &self.widths, batch, &dev)?)?;
                let g = nn::sigmoid(&g)?
                    .broadcast_mul(&presence(inputs, batch, &dev)?)
                    .map_err(&f)?;
                (weighted_maps(proj, &pooled, &g)?, Some(g))
            }
            Net::Early {
                proj,
                types,
                layers,
                norm,
            } => (
                Self::early_forward(inputs, proj, types, layers, norm)?,
                None,
            ),
            Net::Middle { proj, layers, norm } => {
                (Self::middle_forward(inputs, proj, layers, norm)?, None)
            }
        };
        Ok(FusedOut { fused, gates })
    }

    fn early_forward(
        inputs: &[Option<ModIn>],
        proj: &[Lin],
        types: &Tensor,
        layers: &[JointLayer],
        norm: &Norm,
    ) -> Result<Tensor> {
        let f = ce("early fusion");
        let mut xs = Vec::new();
        let mut masks = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let Some(input) = input else { continue };
            let (x, mask) = input.tokens()?;
            let t = types.get(i).map_err(&f)?;
            xs.push(proj[i].forward(&x)?.broadcast_add(&t).map_err(&f)?);
            masks.push(mask);
        }
        let mut x = Tensor::cat(&xs, 1).map_err(&f)?;
        let mask = Tensor::cat(&masks, 1).map_err(&f)?;
        for l in layers {
            let h = l.norm1.forward(&x)?;
            let a = l.attn.forward(&h, &h, Some(&mask), Some(&mask))?;
            x = super::ops::add(&x, &a).map_err(&f)?;
            let h = l.mlp.forward(&l.norm2.forward(&x)?)?;
            x = super::ops::add(&x, &h).map_err(&f)?;
        }
        nn::masked_mean(&norm.forward(&x)?, &mask)
    }

    fn middle_forward(
        inputs: &[Option<ModIn>],
        proj: &[Lin],
        layers: &[Vec<CrossLayer>],
        norm: &Norm,
    ) -> Result<Tensor> {
        let f = ce("middle fusion");
        let m_all = inputs.len();
        let mut xs: Vec<Option<Tensor>> = vec![None; m_all];
        let mut masks: Vec<Option<Tensor>> = vec![None; m_all];
        for (i, input) in inputs.iter().enumerate() {
            let Some(input) = input else { continue };
            let (x, mask) = input.tokens()?;
            xs[i] = Some(proj[i].forward(&x)?);
            masks[i] = Some(mask);
        }
        let present: Vec<usize> = (0..m_all).filter(|&i| xs[i].is_some()).collect();
        for layer in layers {
            let mut next = xs.clone();
            for &m in &present {
                let l = &layer[m];
                let (Some(x), Some(mask)) = (&xs[m], &masks[m]) else {
                    continue;
                };
                let mut y = x.clone();
                let others: Vec<usize> = present.iter().copied().filter(|&n| n != m).collect();
                if !others.is_empty() {
                    // One other modality is the context as it is (no copy).
                    let join = |v: Vec<Tensor>| -> Result<Tensor> {
                        match v.len() {
                            1 => Ok(v[0].clone()),
                            _ => Tensor::cat(&v, 1).map_err(ce("middle fusion")),
                        }
                    };
                    let c = join(others.iter().filter_map(|&n| xs[n].clone()).collect())?;
                    let cmask = join(others.iter().filter_map(|&n| masks[n].clone()).collect())?;
                    if let Some(y) = l.fused(x, &c, mask, &cmask)? {
                        next[m] = Some(y);
                        continue;
                    }
                    let a = l.attn.forward(
                        &l.norm_q.forward(x)?,
                        &l.norm_kv.forward(&c)?,
                        Some(mask),
                        Some(&cmask),
                    )?;
                    y = super::ops::add(&y, &l.attn_gate.forward(x, &a)?).map_err(&f)?;
                }
                let h = l.mlp.forward(&l.norm_mlp.forward(&y)?)?;
                y = super::ops::add(&y, &l.mlp_gate.forward(&y, &h)?).map_err(&f)?;
                next[m] = Some(y);
            }
            xs = next;
        }
        // Mean over each row's present modalities of the pooled, normalised sequences.
        let mut acc: Option<Tensor> = None;
        let mut cols = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let (Some(x), Some(mask), Some(input)) = (&xs[i], &masks[i], input) else {
                continue;
            };
            let pool = nn::masked_mean(&norm.forward(x)?, mask)?
                .broadcast_mul(&input.present)
                .map_err(&f)?;
            cols.push(input.present.clone());
            acc = Some(match acc {
                None => pool,
                Some(a) => (a + pool).map_err(&f)?,
            });
        }
        let acc = acc.ok_or_else(|| MlmfError::Internal("middle fusion without inputs".into()))?;
        let n = Tensor::cat(&cols, 1)
            .and_then(|c| c.sum_keepdim(1))
            .and_then(|c| c.maximum(1f32))
            .map_err(&f)?;
        acc.broadcast_div(&n).map_err(f)
    }
}
