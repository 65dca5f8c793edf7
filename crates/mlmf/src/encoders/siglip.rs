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

use candle_core::{DType, Device, Tensor};

use crate::encoders::bert::embed;
use crate::encoders::clip::{
    load_layers, pixels_tensor, text_batch, text_mask, tower_cfg, TowerSizes,
};
use crate::encoders::layers::{
    attention, ce, load_patch_embedding, merge_heads, padding_bias, patchify, run_layers,
    split_heads, Activation, EncoderLayer, LayerNorm, Linear, Placement, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{full_mask, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// The attention-pooling head of the vision tower.
struct PoolingHead {
    probe: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: usize,
}

impl PoolingHead {
    fn load(w: Weights<'_>, p: &str, s: &TowerSizes) -> Result<Self> {
        let d = s.hidden;
        let f = ce("siglip head");
        let in_w = w.get(&format!("{p}attention.in_proj_weight"), &[3 * d, d])?;
        let in_b = w.get(&format!("{p}attention.in_proj_bias"), &[3 * d])?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::from_parts(
                in_w.narrow(0, i * d, d)
                    .and_then(|t| t.contiguous())
                    .map_err(&f)?,
                Some(
                    in_b.narrow(0, i * d, d)
                        .and_then(|t| t.contiguous())
                        .map_err(&f)?,
                ),
            ))
        };
        Ok(Self {
            probe: w.get(&format!("{p}probe"), &[1, 1, d])?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            o: Linear::load(w, &format!("{p}attention.out_proj"), d, d, true)?,
            norm: LayerNorm::load(w, &format!("{p}layernorm"), d, s.eps)?,
            fc1: Linear::load(w, &format!("{p}mlp.fc1"), d, s.inter, true)?,
            fc2: Linear::load(w, &format!("{p}mlp.fc2"), s.inter, d, true)?,
            act: s.act,
            heads: s.heads,
        })
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let f = ce("siglip head");
        let b = hidden.dim(0).map_err(&f)?;
        let probe = self.probe.repeat((b, 1, 1)).map_err(&f)?;
        let q = split_heads(&self.q.forward(&probe)?, self.heads)?;
        let k = split_heads(&self.k.forward(hidden)?, self.heads)?;
        let v = split_heads(&self.v.forward(hidden)?, self.heads)?;
        let d = probe.dim(2).map_err(&f)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let x = self
            .o
            .forward(&merge_heads(&attention(&q, &k, &v, scale, &None)?)?)?;
        let h = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.norm.forward(&x)?)?)?,
        )?;
        (x + h).and_then(|y| y.squeeze(1)).map_err(f)
    }
}

/// SigLIP's image tower.
pub struct SiglipVision {
    patch: Linear,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    head: Option<PoolingHead>,
    hidden: usize,
    image_size: usize,
    patch_size: usize,
    channels: usize,
    model_type: String,
    place: Placement,
}

/// SigLIP's text tower.
pub struct SiglipText {
    token: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    head: Linear,
    hidden: usize,
    out_dim: usize,
    vocab: usize,
    max_positions: usize,
    model_type: String,
    place: Placement,
}

/// Loads the tower of a SigLIP checkpoint that the request's modality selects.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    let model_type = req.checkpoint.model_type().unwrap_or("siglip").to_string();
    let supported: &[Modality] = match model_type.as_str() {
        "siglip_text_model" => &[Modality::Text],
        "siglip_vision_model" => &[Modality::Image],
        _ => &[Modality::Image, Modality::Text],
    };
    match req.check_modality(supported)? {
        Modality::Text => Ok(Box::new(load_text(req, &model_type)?)),
        _ => Ok(Box::new(load_vision(req, &model_type)?)),
    }
}

fn load_vision(req: &LoadRequest<'_>, model_type: &str) -> Result<SiglipVision> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), model_type == "siglip", "vision_config");
    let s = TowerSizes::read(cfg, (768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh"))?;
    let image_size = cfg.size("image_size", 224)?;
    let patch_size = cfg.size("patch_size", 16)?;
    let channels = cfg.size("num_channels", 3)?;
    if image_size % patch_size != 0 {
        return Err(MlmfError::config(
            cfg.name("image_size"),
            format!("{image_size} is not a multiple of patch_size {patch_size}"),
        ));
    }
    let use_head = cfg.boolean("vision_use_head", true)?;
    let place = Placement {
        device: req.device.clone(),
        dtype: req.precision.dtype(),
    };
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
    let n_pos = (image_size / patch_size).pow(2);
    Ok(SiglipVision {
        patch: load_patch_embedding(
            w,
            &p("embeddings.patch_embedding"),
            s.hidden,
            channels,
            patch_size,
            true,
        )?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[n_pos, s.hidden],
        )?,
        layers: load_layers(w, &prefix, &s)?,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), s.hidden, s.eps)?,
        head: if use_head {
            Some(PoolingHead::load(w, &p("head."), &s)?)
        } else {
            None
        },
        hidden: s.hidden,
        image_size,
        patch_size,
        channels,
        model_type: model_type.to_string(),
        place,
    })
}

fn load_text(req: &LoadRequest<'_>, model_type: &str) -> Result<SiglipText> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), model_type == "siglip", "text_config");
    let s = TowerSizes::read(cfg, (768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh"))?;
    let vocab = cfg.size("vocab_size", 32000)?;
    let max_positions = cfg.size("max_position_embeddings", 64)?;
    let out_dim = cfg.size("projection_size", s.hidden)?;
    let place = Placement {
        device: req.device.clone(),
        dtype: req.precision.dtype(),
    };
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
        token: w.get(&p("embeddings.token_embedding.weight"), &[vocab, s.hidden])?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[max_positions, s.hidden],
        )?,
        layers: load_layers(w, &prefix, &s)?,
        final_norm: LayerNorm::load(w, &p("final_layer_norm"), s.hidden, s.eps)?,
        head: Linear::load(w, &p("head"), s.hidden, out_dim, true)?,
        hidden: s.hidden,
        out_dim,
        vocab,
        max_positions,
        model_type: model_type.to_string(),
        place,
    })
}

impl ModalityEncoder for SiglipVision {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn model_type(&self) -> &str {
        &self.model_type
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
    fn output_dim(&self) -> usize {
        self.hidden
    }
    fn processor(&self) -> ProcessorKind {
        ProcessorKind::Image {
            height: self.image_size,
            width: self.image_size,
        }
    }
    fn device(&self) -> &Device {
        &self.place.device
    }
    fn dtype(&self) -> DType {
        self.place.dtype
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let px = pixels_tensor(
            input,
            self.channels,
            self.image_size,
            &self.place,
            Modality::Image,
        )?;
        let f = ce("siglip vision");
        let b = px.dim(0).map_err(&f)?;
        let x = self
            .patch
            .forward(&patchify(&px, self.patch_size)?)?
            .broadcast_add(&self.position.unsqueeze(0).map_err(&f)?)
            .map_err(&f)?;
        let hidden = self
            .post_norm
            .forward(&run_layers(&self.layers, x, &None)?)?;
        let t = hidden.dim(1).map_err(&f)?;
        let mask = full_mask(b, t, &self.place.device)?;
        let pooled = match &self.head {
            Some(h) => h.forward(&hidden)?,
            None => crate::encoders::layers::masked_mean(&hidden, &mask)?,
        };
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}

impl ModalityEncoder for SiglipText {
    fn modality(&self) -> Modality {
        Modality::Text
    }
    fn model_type(&self) -> &str {
        &self.model_type
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
    fn output_dim(&self) -> usize {
        self.out_dim
    }
    fn processor(&self) -> ProcessorKind {
        ProcessorKind::Text {
            max_length: Some(self.max_positions),
            pad_to_max_length: true,
        }
    }
    fn device(&self) -> &Device {
        &self.place.device
    }
    fn dtype(&self) -> DType {
        self.place.dtype
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let batch = text_batch(input, self.vocab, self.max_positions)?;
        let (_, t) = batch.input_ids.dim();
        let dev = &self.place.device;
        let f = ce("siglip text");
        let x = embed(&self.token, &batch.input_ids, dev)?
            .broadcast_add(
                &self
                    .position
                    .narrow(0, 0, t)
                    .and_then(|p| p.unsqueeze(0))
                    .map_err(&f)?,
            )
            .map_err(&f)?;
        let mask = text_mask(batch, dev)?;
        let bias = Some(padding_bias(&mask)?);
        let hidden = self
            .final_norm
            .forward(&run_layers(&self.layers, x, &bias)?)?;
        let last = hidden
            .narrow(1, t - 1, 1)
            .and_then(|h| h.squeeze(1))
            .map_err(&f)?;
        let pooled = self.head.forward(&last)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}
