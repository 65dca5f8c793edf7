//! SigLIP (`siglip`, `siglip_vision_model`, `siglip_text_model`), as transformers'
//! `SiglipModel` and its single-tower classes.
//!
//! Vision: a stride-`P` patch convolution with bias, learned positions (no class
//! token), pre-norm layers with tanh-GELU, `post_layernorm` (part of `hidden_states`,
//! as in transformers' `last_hidden_state`). Pooled is the multi-head attention pooling
//! head (a learned probe attends over the patches, then layer norm and an MLP with a
//! residual), or, for checkpoints built with `vision_use_head: false`, the mean over
//! patches.
//!
//! Text: token + position embeddings, pre-norm layers under the padding mask,
//! `final_layer_norm`; pooled is `head` applied to the last position (SigLIP text is
//! used with `padding="max_length"`, so the last position is the sequence's end).

use candle_core::Tensor;

use crate::encoders::clip::{embed_text, tower, tower_cfg, CLIP_LAYER};
use crate::encoders::inputs::{full_mask, text_batch, text_mask};
use crate::encoders::layers::{
    ce, load_layers, masked_mean, padding_bias, run_layers, Activation, AttnBias, EncoderLayer,
    LayerNorm, Linear, Placement, SelfAttention, Sizes, Weights,
};
use crate::encoders::patch::{Geometry, PatchEmbedding, PatchNames};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::Result;
use crate::modality::Modality;

/// The attention-pooling head of the vision tower.
pub(crate) struct PoolingHead {
    probe: Tensor,
    attn: SelfAttention,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl PoolingHead {
    pub(crate) fn load(w: Weights<'_>, p: &str, s: &Sizes) -> Result<Self> {
        let d = s.hidden;
        let f = ce("siglip head");
        // nn.MultiheadAttention keeps q, k and v stacked in one `[3D, D]` weight.
        let in_w = w.get(&format!("{p}attention.in_proj_weight"), &[3 * d, d])?;
        let in_b = w.get(&format!("{p}attention.in_proj_bias"), &[3 * d])?;
        let part = |i: usize| -> Result<Linear> {
            let rows = |t: &Tensor| t.narrow(0, i * d, d).and_then(|t| t.contiguous());
            Linear::from_parts(rows(&in_w).map_err(&f)?, Some(rows(&in_b).map_err(&f)?))
        };
        let o = Linear::load(w, &format!("{p}attention.out_proj"), d, d, true)?;
        Ok(Self {
            probe: w.get(&format!("{p}probe"), &[1, 1, d])?,
            attn: SelfAttention::from_parts(part(0)?, part(1)?, part(2)?, o, d, s.heads),
            norm: LayerNorm::load(w, &format!("{p}layernorm"), d, s.eps)?,
            fc1: Linear::load(w, &format!("{p}mlp.fc1"), d, s.inter, true)?,
            fc2: Linear::load(w, &format!("{p}mlp.fc2"), s.inter, d, true)?,
            act: s.act,
        })
    }

    /// The pooled vector `[B, D]` of `hidden` `[B, T, D]`; `bias` masks padded keys.
    pub(crate) fn forward(&self, hidden: &Tensor, bias: &AttnBias) -> Result<Tensor> {
        let f = ce("siglip head");
        let b = hidden.dim(0).map_err(&f)?;
        let probe = self.probe.repeat((b, 1, 1)).map_err(&f)?;
        let x = self.attn.attend(&probe, hidden, bias)?;
        let h = self.fc1.forward(&self.norm.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.forward(&h)?)?;
        (x + h).and_then(|y| y.squeeze(1)).map_err(f)
    }
}

/// SigLIP's image tower.
pub struct SiglipVision {
    embedding: PatchEmbedding,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    head: Option<PoolingHead>,
    place: Placement,
    info: EncoderInfo,
}

/// SigLIP's text tower.
pub struct SiglipText {
    token: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    head: Linear,
    vocab: usize,
    max_positions: usize,
    info: EncoderInfo,
}

/// Loads the tower of a SigLIP checkpoint that the request's modality selects.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    match tower(req, "siglip")? {
        (Modality::Text, t) => Ok(Box::new(load_text(req, &t)?)),
        (_, t) => Ok(Box::new(load_vision(req, &t)?)),
    }
}

fn load_vision(req: &LoadRequest<'_>, model_type: &str) -> Result<SiglipVision> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), is_dual(model_type), "vision_config");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh"))?;
    let geometry = Geometry::read(cfg, 224, 16)?;
    let use_head = cfg.boolean("vision_use_head", true)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.patch_embedding.weight")
        .ok_or_else(|| {
            ckpt.error("weight `vision_model.embeddings.patch_embedding.weight` is missing")
        })?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let names = PatchNames {
        projection: &p("embeddings.patch_embedding"),
        projection_bias: true,
        class: None,
        position: &p("embeddings.position_embedding.weight"),
        position_batched: false,
    };
    Ok(SiglipVision {
        embedding: PatchEmbedding::load(w, &names, geometry, s.hidden)?,
        layers: load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), s.hidden, s.eps)?,
        head: if use_head {
            Some(PoolingHead::load(w, &p("head."), &s)?)
        } else {
            None
        },
        info: place.info(
            Modality::Image,
            model_type,
            s.hidden,
            s.hidden,
            geometry.processor(),
        ),
        place,
    })
}

/// Whether `model_type` names a dual checkpoint (towers under `*_config`), not one of
/// its `*_text_model` / `*_vision_model` towers.
pub(crate) fn is_dual(model_type: &str) -> bool {
    !model_type.ends_with("_text_model") && !model_type.ends_with("_vision_model")
}

/// The text tower (SigLIP 2's is the same network).
pub(crate) fn load_text(req: &LoadRequest<'_>, model_type: &str) -> Result<SiglipText> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), is_dual(model_type), "text_config");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh"))?;
    let vocab = cfg.size("vocab_size", 32000)?;
    let max_positions = cfg.size("max_position_embeddings", 64)?;
    let out_dim = cfg.size("projection_size", s.hidden)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.token_embedding.weight")
        .ok_or_else(|| {
            ckpt.error("weight `text_model.embeddings.token_embedding.weight` is missing")
        })?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    Ok(SiglipText {
        token: w.get_table(&p("embeddings.token_embedding.weight"), &[vocab, s.hidden])?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[max_positions, s.hidden],
        )?,
        layers: load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?,
        final_norm: LayerNorm::load(w, &p("final_layer_norm"), s.hidden, s.eps)?,
        head: Linear::load(w, &p("head"), s.hidden, out_dim, true)?,
        vocab,
        max_positions,
        info: place.info(
            Modality::Text,
            model_type,
            s.hidden,
            out_dim,
            ProcessorKind::Text {
                max_length: Some(max_positions),
                pad_to_max_length: true,
                max_tokens: Some(max_positions),
            },
        ),
    })
}

impl ModalityEncoder for SiglipVision {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let x = self.embedding.forward(input, &self.place)?;
        let hidden = self
            .post_norm
            .forward(&run_layers(&self.layers, x, &None)?)?;
        let (b, t, _) = hidden.dims3().map_err(ce("siglip vision"))?;
        let mask = full_mask(b, t, &self.info.device)?;
        let pooled = match &self.head {
            Some(h) => h.forward(&hidden, &None)?,
            None => masked_mean(&hidden, &mask)?,
        };
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}

impl ModalityEncoder for SiglipText {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let batch = text_batch(input, self.vocab, self.max_positions)?;
        let t = batch.input_ids.ncols();
        let dev = &self.info.device;
        let x = embed_text(&self.token, &self.position, &batch.input_ids, dev)?;
        let mask = text_mask(batch, dev)?;
        let bias = Some(padding_bias(&mask)?);
        let hidden = self
            .final_norm
            .forward(&run_layers(&self.layers, x, &bias)?)?;
        let last = hidden
            .narrow(1, t - 1, 1)
            .and_then(|h| h.squeeze(1))
            .map_err(ce("siglip text"))?;
        let pooled = self.head.forward(&last)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}
