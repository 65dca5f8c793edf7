//! X-CLIP's video-specific prompts (`XCLIPPromptGenerator`): before a text vector is
//! compared with a video, it attends to that video's patch features and moves by
//! `alpha * decoder(text)`. So X-CLIP's logits are not a product of two fixed
//! matrices: each (video, text) pair has its own text vector.
//!
//! `visual = layernorm(features)`; per decoder layer `t = t + proj(attn(norm1(t),
//! visual))` (cross-attention: queries from the texts, keys and values from the video,
//! no biases on q/k/v) and `t = t + fc2(act(fc1(norm3(t))))`; the result is `t_text +
//! alpha * t` with `alpha` one weight per dimension.

use std::fmt;

use candle_core::{DType, Device, Tensor};

use crate::encoders::checkpoint::Checkpoint;
use crate::encoders::config::Cfg;
use crate::encoders::layers::{
    ce, Activation, LayerNorm, Linear, Placement, SelfAttention, Weights,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

struct PromptLayer {
    attn: SelfAttention,
    norm1: LayerNorm,
    norm3: LayerNorm,
    fc1: Linear,
    act: Activation,
    fc2: Linear,
}

/// The prompt generator of an X-CLIP checkpoint, on the CPU in float32.
pub struct PromptGenerator {
    norm: LayerNorm,
    layers: Vec<PromptLayer>,
    /// `[P]`.
    alpha: Tensor,
    dim: usize,
}

impl fmt::Debug for PromptGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptGenerator")
            .field("layers", &self.layers.len())
            .field("dim", &self.dim)
            .finish()
    }
}

impl PromptGenerator {
    /// Reads `prompts_generator.*` of an X-CLIP checkpoint.
    pub(crate) fn load(ckpt: &Checkpoint) -> Result<Self> {
        let root = Cfg::new(ckpt.config(), "");
        let text_eps = root.sub("text_config").positive("layer_norm_eps", 1e-5)?;
        let vision_eps = root.sub("vision_config").positive("layer_norm_eps", 1e-5)?;
        let dim = root.size("projection_dim", 512)?;
        let heads = root.size("prompt_num_attention_heads", 8)?;
        let n = root.size("prompt_layers", 2)?;
        let act = Activation::parse(
            root.string("prompt_hidden_act", "quick_gelu")?,
            &root.name("prompt_hidden_act"),
        )?;
        let place = Placement::cpu_f32();
        let w = Weights {
            ckpt,
            place: &place,
        };
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(ckpt.error(format!(
                "projection_dim {dim} is not divisible by prompt_num_attention_heads {heads}"
            )));
        }
        let layers = (0..n)
            .map(|i| {
                let l = |name: &str| format!("prompts_generator.decoder.{i}.{name}");
                let lin = |name: &str, bias| Linear::load(w, &l(name), dim, dim, bias);
                Ok(PromptLayer {
                    attn: SelfAttention::from_parts(
                        lin("cross_attn.q_proj", false)?,
                        lin("cross_attn.k_proj", false)?,
                        lin("cross_attn.v_proj", false)?,
                        lin("cross_attn.proj", true)?,
                        dim,
                        heads,
                    ),
                    norm1: LayerNorm::load(w, &l("norm1"), dim, text_eps)?,
                    norm3: LayerNorm::load(w, &l("norm3"), dim, text_eps)?,
                    fc1: Linear::load(w, &l("mlp.0"), dim, 4 * dim, true)?,
                    act,
                    fc2: Linear::load(w, &l("mlp.3"), 4 * dim, dim, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: LayerNorm::load(w, "prompts_generator.layernorm", dim, vision_eps)?,
            layers,
            alpha: w.get("prompts_generator.alpha", &[dim])?,
            dim,
        })
    }

    /// The texts `[Nt, P]` as compared with each video whose patch features are
    /// `visual` `[B, N, P]`: `[B, Nt, P]`.
    pub fn prompted(&self, text: &Tensor, visual: &Tensor) -> Result<Tensor> {
        let f = ce("xclip prompts");
        let visual = visual
            .to_device(&Device::Cpu)
            .and_then(|v| v.to_dtype(DType::F32))
            .map_err(&f)?;
        let (b, n, p) = visual.dims3().map_err(&f)?;
        if p != self.dim || n == 0 {
            return Err(MlmfError::input(
                Modality::Video,
                format!(
                    "X-CLIP's prompts read each video's patch features: expected [B, N >= 1, \
                     {}] (the video tower's hidden_states), got [{b}, {n}, {p}]",
                    self.dim
                ),
            ));
        }
        let (nt, _) = text.dims2().map_err(&f)?;
        let base = text
            .to_dtype(DType::F32)
            .and_then(|t| t.unsqueeze(0))
            .and_then(|t| t.broadcast_as((b, nt, p)))
            .and_then(|t| t.contiguous())
            .map_err(&f)?;
        let visual = self.norm.forward(&visual)?;
        let mut t = base.clone();
        for l in &self.layers {
            let h = l.attn.attend(&l.norm1.forward(&t)?, &visual, &None)?;
            t = (t + h).map_err(&f)?;
            let h = l
                .fc2
                .forward(&l.act.forward(&l.fc1.forward(&l.norm3.forward(&t)?)?)?)?;
            t = (t + h).map_err(&f)?;
        }
        t.broadcast_mul(&self.alpha)
            .and_then(|t| t + base)
            .map_err(f)
    }
}
