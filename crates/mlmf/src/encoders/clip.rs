//! CLIP (`clip`, `clip_vision_model`, `clip_text_model`), as transformers' `CLIPModel`
//! and its single-tower classes.
//!
//! Vision: a stride-`P` patch convolution (no bias), a class token, learned positions,
//! `pre_layrnorm`, pre-norm layers; `hidden_states` is the last layer's output and the
//! pooled vector is `post_layernorm` of the class token, projected by
//! `visual_projection` when the checkpoint has it (`CLIPModel.get_image_features`,
//! `CLIPVisionModelWithProjection`), as is (`CLIPVisionModel.pooler_output`) otherwise.
//!
//! Text: token + position embeddings, pre-norm layers under a causal and a padding
//! mask, `final_layer_norm`; pooled is the state at the end-of-text token (the first
//! `eos_token_id`, or the largest id for configs with the legacy `eos_token_id = 2`),
//! projected by `text_projection` when present.

use candle_core::{DType, Device, Tensor};

use crate::encoders::bert::{check_ids, embed};
use crate::encoders::config::Cfg;
use crate::encoders::layers::{
    causal_bias, ce, gather_rows, load_patch_embedding, padding_bias, patchify, run_layers,
    Activation, AttentionNames, EncoderLayer, LayerNorm, Linear, Placement, SelfAttention, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{
    full_mask, mask_tensor, wrong_input, EncoderInput, EncoderOutput, ModalityEncoder,
    ProcessorKind,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Attention tensor names shared by CLIP and SigLIP layers.
pub(crate) const CLIP_ATTENTION: AttentionNames<'static> = AttentionNames {
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.out_proj",
    k_bias: true,
};

/// Sizes shared by the CLIP and SigLIP towers.
pub(crate) struct TowerSizes {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub inter: usize,
    pub eps: f64,
    pub act: Activation,
}

impl TowerSizes {
    pub fn read(cfg: Cfg<'_>, defaults: (usize, usize, usize, usize, f64, &str)) -> Result<Self> {
        let (hidden, layers, heads, inter, eps, act) = defaults;
        Ok(Self {
            hidden: cfg.size("hidden_size", hidden)?,
            layers: cfg.size("num_hidden_layers", layers)?,
            heads: cfg.size("num_attention_heads", heads)?,
            inter: cfg.size("intermediate_size", inter)?,
            eps: cfg.positive("layer_norm_eps", eps)?,
            act: Activation::parse(cfg.string("hidden_act", act)?, &cfg.name("hidden_act"))?,
        })
    }
}

/// The pre-norm layers `{prefix}encoder.layers.{i}` of a CLIP or SigLIP tower.
pub(crate) fn load_layers(
    w: Weights<'_>,
    prefix: &str,
    s: &TowerSizes,
) -> Result<Vec<EncoderLayer>> {
    (0..s.layers)
        .map(|i| {
            let l = format!("{prefix}encoder.layers.{i}.");
            Ok(EncoderLayer {
                attn: SelfAttention::load(w, &l, &CLIP_ATTENTION, s.hidden, s.heads)?,
                norm1: LayerNorm::load(w, &format!("{l}layer_norm1"), s.hidden, s.eps)?,
                fc1: Linear::load(w, &format!("{l}mlp.fc1"), s.hidden, s.inter, true)?,
                fc2: Linear::load(w, &format!("{l}mlp.fc2"), s.inter, s.hidden, true)?,
                norm2: LayerNorm::load(w, &format!("{l}layer_norm2"), s.hidden, s.eps)?,
                act: s.act,
                pre_norm: true,
            })
        })
        .collect()
}

/// Checks pixels are `[B, channels, size, size]` with `B >= 1`; returns them as a tensor.
pub(crate) fn pixels_tensor(
    input: &EncoderInput,
    channels: usize,
    size: usize,
    place: &Placement,
    modality: Modality,
) -> Result<Tensor> {
    let EncoderInput::Image(px) = input else {
        return Err(wrong_input(
            modality,
            format!("image pixels [B, {channels}, {size}, {size}]"),
            input,
        ));
    };
    let shape = px.shape();
    if shape[0] == 0 || shape[1] != channels || shape[2] != size || shape[3] != size {
        return Err(MlmfError::input(
            modality,
            format!(
                "expected pixel values shaped [B >= 1, {channels}, {size}, {size}] (the \
                 checkpoint's image_size), got {shape:?}"
            ),
        ));
    }
    let data: Vec<f32> = px.iter().copied().collect();
    Tensor::from_vec(data, shape, &place.device)
        .and_then(|t| t.to_dtype(place.dtype))
        .map_err(ce("pixels"))
}

/// The config of one tower: the nested `{key}` of a dual config, the root otherwise.
pub(crate) fn tower_cfg<'a>(root: &'a serde_json::Value, dual: bool, key: &'a str) -> Cfg<'a> {
    let c = Cfg::new(root, "");
    if dual {
        c.sub(key)
    } else {
        c
    }
}

/// CLIP's image tower.
pub struct ClipVision {
    patch: Linear,
    class: Tensor,
    position: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Option<Linear>,
    hidden: usize,
    out_dim: usize,
    image_size: usize,
    patch_size: usize,
    channels: usize,
    model_type: String,
    place: Placement,
}

/// CLIP's text tower.
pub struct ClipText {
    token: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    hidden: usize,
    out_dim: usize,
    vocab: usize,
    max_positions: usize,
    eos: i64,
    model_type: String,
    place: Placement,
}

/// Loads the tower of a CLIP checkpoint that the request's modality selects.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    let model_type = req.checkpoint.model_type().unwrap_or("clip").to_string();
    let supported: &[Modality] = match model_type.as_str() {
        "clip_text_model" => &[Modality::Text],
        "clip_vision_model" => &[Modality::Image],
        _ => &[Modality::Image, Modality::Text],
    };
    match req.check_modality(supported)? {
        Modality::Text => Ok(Box::new(load_text(req, &model_type)?)),
        _ => Ok(Box::new(load_vision(req, &model_type)?)),
    }
}

fn load_vision(req: &LoadRequest<'_>, model_type: &str) -> Result<ClipVision> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), model_type == "clip", "vision_config");
    let s = TowerSizes::read(cfg, (768, 12, 12, 3072, 1e-5, "quick_gelu"))?;
    let image_size = cfg.size("image_size", 224)?;
    let patch_size = cfg.size("patch_size", 32)?;
    let channels = cfg.size("num_channels", 3)?;
    if image_size % patch_size != 0 {
        return Err(MlmfError::config(
            cfg.name("image_size"),
            format!("{image_size} is not a multiple of patch_size {patch_size}"),
        ));
    }
    let place = Placement {
        device: req.device.clone(),
        dtype: req.precision.dtype(),
    };
    let prefix = ckpt
        .find_prefix("embeddings.class_embedding")
        .ok_or_else(|| ckpt.error("weight `vision_model.embeddings.class_embedding` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let n_pos = (image_size / patch_size).pow(2) + 1;
    // The projection sits beside the tower (`visual_projection`), not under its prefix.
    let root = prefix.strip_suffix("vision_model.").unwrap_or("");
    let proj_name = format!("{root}visual_projection");
    let projection = if w.contains(&format!("{proj_name}.weight")) {
        let root_cfg = Cfg::new(ckpt.config(), "");
        let dim = if model_type == "clip" {
            root_cfg.size("projection_dim", 512)?
        } else {
            cfg.size("projection_dim", 512)?
        };
        Some(Linear::load(w, &proj_name, s.hidden, dim, false)?)
    } else {
        None
    };
    let out_dim = match &projection {
        Some(l) => l.out_dim()?,
        None => s.hidden,
    };
    Ok(ClipVision {
        patch: load_patch_embedding(
            w,
            &p("embeddings.patch_embedding"),
            s.hidden,
            channels,
            patch_size,
            false,
        )?,
        class: w.get(&p("embeddings.class_embedding"), &[s.hidden])?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[n_pos, s.hidden],
        )?,
        pre_norm: LayerNorm::load(w, &p("pre_layrnorm"), s.hidden, s.eps)?,
        layers: load_layers(w, &prefix, &s)?,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), s.hidden, s.eps)?,
        projection,
        hidden: s.hidden,
        out_dim,
        image_size,
        patch_size,
        channels,
        model_type: model_type.to_string(),
        place,
    })
}

fn load_text(req: &LoadRequest<'_>, model_type: &str) -> Result<ClipText> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), model_type == "clip", "text_config");
    let s = TowerSizes::read(cfg, (512, 12, 8, 2048, 1e-5, "quick_gelu"))?;
    let vocab = cfg.size("vocab_size", 49408)?;
    let max_positions = cfg.size("max_position_embeddings", 77)?;
    let eos = cfg.id("eos_token_id")?.unwrap_or(49407);
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
    let root = prefix.strip_suffix("text_model.").unwrap_or("");
    let proj_name = format!("{root}text_projection");
    let projection = if w.contains(&format!("{proj_name}.weight")) {
        let root_cfg = Cfg::new(ckpt.config(), "");
        let dim = if model_type == "clip" {
            root_cfg.size("projection_dim", 512)?
        } else {
            cfg.size("projection_dim", 512)?
        };
        Some(Linear::load(w, &proj_name, s.hidden, dim, false)?)
    } else {
        None
    };
    let out_dim = match &projection {
        Some(l) => l.out_dim()?,
        None => s.hidden,
    };
    Ok(ClipText {
        token: w.get(&p("embeddings.token_embedding.weight"), &[vocab, s.hidden])?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[max_positions, s.hidden],
        )?,
        layers: load_layers(w, &prefix, &s)?,
        final_norm: LayerNorm::load(w, &p("final_layer_norm"), s.hidden, s.eps)?,
        projection,
        hidden: s.hidden,
        out_dim,
        vocab,
        max_positions,
        eos,
        model_type: model_type.to_string(),
        place,
    })
}

impl ModalityEncoder for ClipVision {
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
        self.out_dim
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
        let f = ce("clip vision");
        let b = px.dim(0).map_err(&f)?;
        let patches = self.patch.forward(&patchify(&px, self.patch_size)?)?;
        let class = self
            .class
            .reshape((1, 1, self.hidden))
            .and_then(|c| c.repeat((b, 1, 1)))
            .map_err(&f)?;
        let x = Tensor::cat(&[&class, &patches], 1)
            .and_then(|x| x.broadcast_add(&self.position.unsqueeze(0)?))
            .map_err(&f)?;
        let x = self.pre_norm.forward(&x)?;
        let hidden = run_layers(&self.layers, x, &None)?;
        let t = hidden.dim(1).map_err(&f)?;
        let cls = hidden
            .narrow(1, 0, 1)
            .and_then(|c| c.squeeze(1))
            .map_err(&f)?;
        let pooled = self.post_norm.forward(&cls)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.place.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}

/// The checked `[B, T]` token batch of a text encoder.
pub(crate) fn text_batch(
    input: &EncoderInput,
    vocab: usize,
    max_positions: usize,
) -> Result<&crate::preprocess::text::TextBatch> {
    let EncoderInput::Text(batch) = input else {
        return Err(wrong_input(Modality::Text, "text token ids", input));
    };
    let (b, t) = batch.input_ids.dim();
    if b == 0 || t == 0 {
        return Err(MlmfError::input(
            Modality::Text,
            format!("expected a non-empty batch of token ids, got shape [{b}, {t}]"),
        ));
    }
    if t > max_positions {
        return Err(MlmfError::input(
            Modality::Text,
            format!("expected at most max_position_embeddings = {max_positions} tokens, got {t}"),
        ));
    }
    check_ids(&batch.input_ids, vocab, "token id")?;
    Ok(batch)
}

/// The batch's attention mask as a u8 tensor (all ones when absent or misshapen).
pub(crate) fn text_mask(
    batch: &crate::preprocess::text::TextBatch,
    device: &Device,
) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dim();
    let rows: Vec<u8> = if batch.attention_mask.dim() == (b, t) {
        batch
            .attention_mask
            .iter()
            .map(|&v| u8::from(v != 0))
            .collect()
    } else {
        vec![1; b * t]
    };
    mask_tensor(b, t, rows, device)
}

impl ModalityEncoder for ClipText {
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
            max_length: None,
            pad_to_max_length: false,
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
        let f = ce("clip text");
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
        let bias = causal_bias(t, dev)?
            .broadcast_add(&padding_bias(&mask)?)
            .map_err(&f)?;
        let hidden = run_layers(&self.layers, x, &Some(bias))?;
        let hidden = self.final_norm.forward(&hidden)?;
        // The end-of-text position: transformers takes the first eos id, or the argmax
        // of the ids for the legacy eos_token_id == 2 configs.
        let eos: Vec<usize> = batch
            .input_ids
            .outer_iter()
            .map(|row| {
                if self.eos == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&v| v == max).unwrap_or(0)
                } else {
                    row.iter().position(|&v| v == self.eos).unwrap_or(0)
                }
            })
            .collect();
        let pooled = gather_rows(&hidden, &eos)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}
