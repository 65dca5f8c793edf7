//! Qwen3 as a text embedder (`model_type: qwen3`), as transformers' `Qwen3Model` used
//! the Qwen3-Embedding way: a causal decoder whose last real token's final state,
//! L2-normalised, is the text's embedding.
//!
//! Each layer: RMSNorm, grouped-query attention (`num_key_value_heads` key/value
//! heads shared by `num_attention_heads / num_key_value_heads` query heads) with
//! RMSNorm on every query and key head (QK-norm) and rotary positions (`rope_theta`,
//! rotate-half layout), a residual; RMSNorm, a SwiGLU MLP
//! (`down(silu(gate(x)) * up(x))`), a residual. A final RMSNorm gives `hidden_states`.
//!
//! Positions are `0..T` for every row whatever the padding, as transformers computes
//! them when it is given no `position_ids`; keys are masked causally and at padding.
//! The tokenizer's own `padding_side` is kept (Qwen3-Embedding pads on the left, so
//! the last position is every row's last real token).

use candle_core::{DType, Device, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::cpu::{
    self,
    decoder::{DecoderLayer, DecoderShape},
};
use crate::encoders::inputs::{text_batch, text_mask};
use crate::encoders::layers::{
    attention, causal_bias, ce, embed, l2_normalize, padding_bias, Linear, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::Result;
use crate::modality::Modality;

/// Set (to anything) in the environment, Qwen3 runs on candle's ops even where the
/// float32 CPU path could run it (for comparing the two).
const CANDLE_PATH: &str = "MLMF_QWEN3_CANDLE_PATH";

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension, in float32 (as
/// `Qwen3RMSNorm`), back in `x`'s dtype.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: Weights<'_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_f32(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        x.to_dtype(DType::F32)
            .and_then(|x| x.contiguous())
            .and_then(|x| candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32))
            .and_then(|y| y.to_dtype(dtype))
            .map_err(ce("rms norm"))
    }
}

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded Qwen3 text embedder.
pub struct Qwen3 {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    rope_theta: f64,
    vocab: usize,
    max_positions: usize,
    info: EncoderInfo,
}

/// Loads a Qwen3 checkpoint (`Qwen3Model`, or the base model inside a
/// `Qwen3ForCausalLM` checkpoint) as a text embedder.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Text])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let hidden = cfg.size("hidden_size", 1024)?;
    let layers_n = cfg.size("num_hidden_layers", 28)?;
    let heads = cfg.size("num_attention_heads", 16)?;
    let kv_heads = cfg.size("num_key_value_heads", heads)?;
    let head_dim = cfg.size("head_dim", hidden / heads.max(1))?;
    let inter = cfg.size("intermediate_size", 3072)?;
    let vocab = cfg.size("vocab_size", 151_669)?;
    let max_positions = cfg.size("max_position_embeddings", 32_768)?;
    let eps = cfg.positive("rms_norm_eps", 1e-6)?;
    // transformers 5 writes `rope_parameters {rope_theta, rope_type}`; older configs a
    // top-level `rope_theta` and `rope_scaling`.
    let root = ckpt.config();
    let params = root.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v
            .as_f64()
            .filter(|t| *t > 0.0)
            .ok_or_else(|| ckpt.error("rope_parameters.rope_theta must be a positive number"))?,
        None => cfg.positive("rope_theta", 1_000_000.0)?,
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ckpt.error(format!(
            "num_attention_heads ({heads}) must be a positive multiple of \
             num_key_value_heads ({kv_heads})"
        )));
    }
    if head_dim % 2 != 0 {
        return Err(ckpt.error(format!(
            "head_dim {head_dim} must be even (rotary positions)"
        )));
    }
    let scaling = params.or_else(|| root.get("rope_scaling").filter(|v| !v.is_null()));
    if let Some(s) = scaling {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if kind != "default" {
            return Err(ckpt.error(format!(
                "rope type {kind:?} is not supported (only the default rotary positions)"
            )));
        }
    }
    let sliding = cfg.boolean("use_sliding_window", false)?
        || root
            .get("layer_types")
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|t| t.as_str() != Some("full_attention")));
    if sliding {
        return Err(ckpt.error(
            "sliding-window attention layers are not supported (every layer must be \
             full_attention)",
        ));
    }
    let bias = cfg.boolean("attention_bias", false)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embed_tokens.weight")
        .ok_or_else(|| ckpt.error("weight `embed_tokens.weight` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let layers = (0..layers_n)
        .map(|i| {
            let l = |n: &str| p(&format!("layers.{i}.{n}"));
            Ok(Layer {
                input_norm: RmsNorm::load(w, &l("input_layernorm"), hidden, eps)?,
                q: Linear::load(w, &l("self_attn.q_proj"), hidden, heads * head_dim, bias)?,
                k: Linear::load(w, &l("self_attn.k_proj"), hidden, kv_heads * head_dim, bias)?,
                v: Linear::load(w, &l("self_attn.v_proj"), hidden, kv_heads * head_dim, bias)?,
                o: Linear::load(w, &l("self_attn.o_proj"), heads * head_dim, hidden, bias)?,
                q_norm: RmsNorm::load(w, &l("self_attn.q_norm"), head_dim, eps)?,
                k_norm: RmsNorm::load(w, &l("self_attn.k_norm"), head_dim, eps)?,
                post_norm: RmsNorm::load(w, &l("post_attention_layernorm"), hidden, eps)?,
                gate: Linear::load(w, &l("mlp.gate_proj"), hidden, inter, false)?,
                up: Linear::load(w, &l("mlp.up_proj"), hidden, inter, false)?,
                down: Linear::load(w, &l("mlp.down_proj"), inter, hidden, false)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let processor = ProcessorKind::Text {
        max_length: None,
        pad_to_max_length: false,
        max_tokens: Some(max_positions),
    };
    Ok(Box::new(Qwen3 {
        embed_tokens: w.get_table(&p("embed_tokens.weight"), &[vocab, hidden])?,
        layers,
        norm: RmsNorm::load(w, &p("norm"), hidden, eps)?,
        heads,
        kv_heads,
        head_dim,
        eps,
        rope_theta,
        vocab,
        max_positions,
        info: place.info(Modality::Text, "qwen3", hidden, hidden, processor),
    }))
}

/// `cos` and `sin` `[T, head_dim / 2]` of positions `0..T`, computed as transformers
/// does: float32 inverse frequencies and products.
fn rope_values(t: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for pos in 0..t {
        for &f in &inv {
            let a = pos as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// [`rope_values`] as tensors on `device`.
fn rope_tables(
    (cos, sin): (Vec<f32>, Vec<f32>),
    half: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let t = cos.len() / half.max(1);
    let f = ce("rotary tables");
    Ok((
        Tensor::from_vec(cos, (t, half), device).map_err(&f)?,
        Tensor::from_vec(sin, (t, half), device).map_err(f)?,
    ))
}

/// `x * cos + rotate_half(x) * sin` for `x` `[B, H, T, hd]` (candle's rotate-half
/// kernel, in float32).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    x.to_dtype(DType::F32)
        .and_then(|x| x.contiguous())
        .and_then(|x| candle_nn::rotary_emb::rope(&x, cos, sin))
        .and_then(|y| y.to_dtype(dtype))
        .map_err(ce("rotary embedding"))
}

impl Qwen3 {
    /// The layers on the float32 CPU path ([`cpu::decoder`]); `None` elsewhere.
    fn fast_layers(
        &self,
        x: &Tensor,
        keys: &[u8],
        (cos, sin): &(Vec<f32>, Vec<f32>),
    ) -> Result<Option<Tensor>> {
        if std::env::var_os(CANDLE_PATH).is_some() {
            return Ok(None);
        }
        let layers: Vec<DecoderLayer<'_>> = self
            .layers
            .iter()
            .map(|l| DecoderLayer {
                input_norm: &l.input_norm.weight,
                q: &l.q,
                k: &l.k,
                v: &l.v,
                o: &l.o,
                q_norm: &l.q_norm.weight,
                k_norm: &l.k_norm.weight,
                post_norm: &l.post_norm.weight,
                gate: &l.gate,
                up: &l.up,
                down: &l.down,
            })
            .collect();
        let shape = DecoderShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            eps: self.eps as f32,
        };
        cpu::decoder::run(x, &layers, shape, keys, (cos, sin))
    }

    /// `[B, T, n*hd]` -> `[B, n, T, hd]` with RMSNorm over each head.
    fn heads_of(&self, x: &Tensor, n: usize, norm: &RmsNorm) -> Result<Tensor> {
        let f = ce("qwen3 heads");
        let (b, t, _) = x.dims3().map_err(&f)?;
        let h = x
            .reshape((b, t, n, self.head_dim))
            .and_then(|h| h.transpose(1, 2))
            .and_then(|h| h.contiguous())
            .map_err(&f)?;
        norm.forward(&h)
    }

    /// Key/value heads repeated for their query heads: `[B, kv, T, hd]` -> `[B, H, T, hd]`.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let group = self.heads / self.kv_heads;
        if group == 1 {
            return Ok(x);
        }
        let f = ce("grouped-query attention");
        let (b, kv, t, hd) = x.dims4().map_err(&f)?;
        x.unsqueeze(2)
            .and_then(|x| x.broadcast_as((b, kv, group, t, hd)))
            .and_then(|x| x.contiguous())
            .and_then(|x| x.reshape((b, kv * group, t, hd)))
            .map_err(f)
    }

    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let f = ce("qwen3 layer");
        let h = l.input_norm.forward(x)?;
        let q = apply_rope(
            &self.heads_of(&l.q.forward(&h)?, self.heads, &l.q_norm)?,
            &rope.0,
            &rope.1,
        )?;
        let k = apply_rope(
            &self.heads_of(&l.k.forward(&h)?, self.kv_heads, &l.k_norm)?,
            &rope.0,
            &rope.1,
        )?;
        let (b, t, _) = h.dims3().map_err(&f)?;
        let v =
            l.v.forward(&h)?
                .reshape((b, t, self.kv_heads, self.head_dim))
                .and_then(|v| v.transpose(1, 2))
                .and_then(|v| v.contiguous())
                .map_err(&f)?;
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx = attention(&q, &k, &v, scale, &Some(bias.clone()))?;
        let ctx = ctx
            .transpose(1, 2)
            .and_then(|c| c.contiguous())
            .and_then(|c| c.reshape((b, t, self.heads * self.head_dim)))
            .map_err(&f)?;
        let x = (x + l.o.forward(&ctx)?).map_err(&f)?;
        let h = l.post_norm.forward(&x)?;
        let g = l.gate.forward(&h)?.silu().map_err(&f)?;
        let m = l.down.forward(&(g * l.up.forward(&h)?).map_err(&f)?)?;
        (x + m).map_err(f)
    }
}

impl ModalityEncoder for Qwen3 {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let batch = text_batch(input, self.vocab, self.max_positions)?;
        let (b, t) = batch.input_ids.dim();
        let dev = &self.info.device;
        let f = ce("qwen3");
        let mask = text_mask(batch, dev)?;
        let mut x = embed(&self.embed_tokens, &batch.input_ids, dev)?;
        let values = rope_values(t, self.head_dim, self.rope_theta);
        let keys: Vec<u8> = mask.flatten_all().and_then(|m| m.to_vec1()).map_err(&f)?;
        match self.fast_layers(&x, &keys, &values)? {
            Some(y) => x = y,
            None => {
                // Padding and causal masks, [B, 1, T, T].
                let bias = padding_bias(&mask)?
                    .broadcast_add(&causal_bias(t, dev)?)
                    .map_err(&f)?;
                let rope = rope_tables(values, self.head_dim / 2, dev)?;
                for l in &self.layers {
                    x = self.layer(l, &x, &bias, &rope)?;
                }
            }
        }
        let hidden = self.norm.forward(&x)?;
        // Each row's last real token (the last position under left padding).
        let m: Vec<Vec<u8>> = mask.to_vec2().map_err(&f)?;
        let last: Vec<u32> = m
            .iter()
            .map(|r| r.iter().rposition(|&v| v != 0).unwrap_or(t - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(last, (b, 1, 1), dev)
            .and_then(|i| i.broadcast_as((b, 1, self.info.hidden_size)))
            .and_then(|i| i.contiguous())
            .map_err(&f)?;
        let pooled = hidden
            .gather(&idx, 1)
            .and_then(|p| p.squeeze(1))
            .map_err(&f)?;
        Ok(EncoderOutput {
            pooled: l2_normalize(&pooled)?,
            hidden_states: hidden,
            mask,
        })
    }
}
