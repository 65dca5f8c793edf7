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
//! projected by `text_projection` when present. X-CLIP's text tower
//! ([`crate::encoders::xclip`]) is this one, always pooled at the largest id.

use candle_core::{Device, Tensor};

use crate::encoders::checkpoint::Checkpoint;
use crate::encoders::config::Cfg;
use crate::encoders::inputs::{full_mask, text_batch, text_mask};
use crate::encoders::layers::{
    causal_bias, ce, embed, gather_rows, load_layers, padding_bias, run_layers, AttentionNames,
    EncoderLayer, LayerNames, LayerNorm, Linear, Placement, Sizes, Weights,
};
use crate::encoders::patch::{Geometry, PatchEmbedding, PatchNames};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::Result;
use crate::modality::Modality;

/// Layer tensor names shared by CLIP and SigLIP towers (pre-norm), under
/// `encoder.layers.`.
pub(crate) const CLIP_LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        o: "self_attn.out_proj",
        k_bias: true,
    },
    norm1: "layer_norm1",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    norm2: "layer_norm2",
    pre_norm: true,
};

/// The config of one tower: the nested `{key}` of a dual config, the root otherwise.
pub(crate) fn tower_cfg<'a>(root: &'a serde_json::Value, dual: bool, key: &'a str) -> Cfg<'a> {
    let c = Cfg::new(root, "");
    if dual {
        c.sub(key)
    } else {
        c
    }
}

/// Which tower a dual (CLIP / SigLIP) checkpoint's request selects: the
/// `{family}_text_model` and `{family}_vision_model` types have one tower, the family
/// type both (image by default).
pub(crate) fn tower(req: &LoadRequest<'_>, family: &str) -> Result<(Modality, String)> {
    let model_type = req.checkpoint.model_type().unwrap_or(family).to_string();
    let supported: &[Modality] = match model_type.strip_prefix(family) {
        Some("_text_model") => &[Modality::Text],
        Some("_vision_model") => &[Modality::Image],
        _ => &[Modality::Image, Modality::Text],
    };
    Ok((req.check_modality(supported)?, model_type))
}

/// The projection `{name}.weight` that sits beside a tower (not under its prefix), when
/// the checkpoint has it. Its width is `projection_dim`: the root config's for a dual
/// checkpoint, the tower's own otherwise.
fn load_projection(
    w: Weights<'_>,
    ckpt: &Checkpoint,
    name: &str,
    tower: Cfg<'_>,
    dual: bool,
    hidden: usize,
) -> Result<Option<Linear>> {
    if !w.contains(&format!("{name}.weight")) {
        return Ok(None);
    }
    let cfg = if dual {
        Cfg::new(ckpt.config(), "")
    } else {
        tower
    };
    let dim = cfg.size("projection_dim", 512)?;
    Linear::load(w, name, hidden, dim, false).map(Some)
}

/// CLIP's patch embedding under a vision tower's `prefix`: a convolution without bias,
/// a class token, `[T, D]` learned positions (X-CLIP's too).
pub(crate) fn patch_embedding(
    w: Weights<'_>,
    prefix: &str,
    geometry: Geometry,
    hidden: usize,
) -> Result<PatchEmbedding> {
    let p = |n: &str| format!("{prefix}{n}");
    let names = PatchNames {
        projection: &p("embeddings.patch_embedding"),
        projection_bias: false,
        class: Some(&p("embeddings.class_embedding")),
        position: &p("embeddings.position_embedding.weight"),
        position_batched: false,
    };
    PatchEmbedding::load(w, &names, geometry, hidden)
}

/// CLIP's image tower.
pub struct ClipVision {
    embedding: PatchEmbedding,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Option<Linear>,
    place: Placement,
    info: EncoderInfo,
}

/// CLIP's text tower.
pub struct ClipText {
    token: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    vocab: usize,
    max_positions: usize,
    eos: i64,
    info: EncoderInfo,
}

/// Loads the tower of a CLIP checkpoint that the request's modality selects.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    match tower(req, "clip")? {
        (Modality::Text, t) => Ok(Box::new(load_text(req, &t)?)),
        (_, t) => Ok(Box::new(load_vision(req, &t)?)),
    }
}

fn load_vision(req: &LoadRequest<'_>, model_type: &str) -> Result<ClipVision> {
    let ckpt = req.checkpoint;
    let dual = model_type == "clip";
    let cfg = tower_cfg(ckpt.config(), dual, "vision_config");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-5, "quick_gelu"))?;
    let geometry = Geometry::read(cfg, 224, 32)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.class_embedding")
        .ok_or_else(|| ckpt.error("weight `vision_model.embeddings.class_embedding` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let root = prefix.strip_suffix("vision_model.").unwrap_or("");
    let projection = load_projection(
        w,
        ckpt,
        &format!("{root}visual_projection"),
        cfg,
        dual,
        s.hidden,
    )?;
    let out_dim = match &projection {
        Some(l) => l.out_dim()?,
        None => s.hidden,
    };
    Ok(ClipVision {
        embedding: patch_embedding(w, &prefix, geometry, s.hidden)?,
        pre_norm: LayerNorm::load(w, &p("pre_layrnorm"), s.hidden, s.eps)?,
        layers: load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), s.hidden, s.eps)?,
        projection,
        info: place.info(
            Modality::Image,
            model_type,
            s.hidden,
            out_dim,
            geometry.processor(),
        ),
        place,
    })
}

/// Loads the text tower of a CLIP-layout checkpoint: `clip`, `clip_text_model`, or
/// `xclip`, whose text model always pools at the largest id.
pub(crate) fn load_text(req: &LoadRequest<'_>, model_type: &str) -> Result<ClipText> {
    let ckpt = req.checkpoint;
    let dual = matches!(model_type, "clip" | "xclip");
    let cfg = tower_cfg(ckpt.config(), dual, "text_config");
    let s = Sizes::read(cfg, (512, 12, 8, 2048, 1e-5, "quick_gelu"))?;
    let vocab = cfg.size("vocab_size", 49408)?;
    let max_positions = cfg.size("max_position_embeddings", 77)?;
    // X-CLIP's text model sets its eos id to 2 whatever the config says (the legacy
    // argmax pooling).
    let eos = if model_type == "xclip" {
        2
    } else {
        cfg.id("eos_token_id")?.unwrap_or(49407)
    };
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
    let root = prefix.strip_suffix("text_model.").unwrap_or("");
    let projection = load_projection(
        w,
        ckpt,
        &format!("{root}text_projection"),
        cfg,
        dual,
        s.hidden,
    )?;
    let out_dim = match &projection {
        Some(l) => l.out_dim()?,
        None => s.hidden,
    };
    Ok(ClipText {
        token: w.get_table(&p("embeddings.token_embedding.weight"), &[vocab, s.hidden])?,
        position: w.get(
            &p("embeddings.position_embedding.weight"),
            &[max_positions, s.hidden],
        )?,
        layers: load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?,
        final_norm: LayerNorm::load(w, &p("final_layer_norm"), s.hidden, s.eps)?,
        projection,
        vocab,
        max_positions,
        eos,
        info: place.info(
            Modality::Text,
            model_type,
            s.hidden,
            out_dim,
            ProcessorKind::Text {
                max_length: None,
                pad_to_max_length: false,
                max_tokens: Some(max_positions),
            },
        ),
    })
}

/// Token + position embeddings of a checked text batch `[B, T]` -> `[B, T, D]`.
pub(crate) fn embed_text(
    token: &Tensor,
    position: &Tensor,
    ids: &ndarray::Array2<i64>,
    device: &Device,
) -> Result<Tensor> {
    let f = ce("text embeddings");
    let t = ids.ncols();
    let positions = position
        .narrow(0, 0, t)
        .and_then(|p| p.unsqueeze(0))
        .map_err(&f)?;
    embed(token, ids, device)?
        .broadcast_add(&positions)
        .map_err(f)
}

/// The state of the first position of `x` `[B, T, D]` -> `[B, D]`.
pub(crate) fn first_token(x: &Tensor) -> Result<Tensor> {
    x.narrow(1, 0, 1)
        .and_then(|c| c.squeeze(1))
        .map_err(ce("first token"))
}

impl ModalityEncoder for ClipVision {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let x = self.embedding.forward(input, &self.place)?;
        let x = self.pre_norm.forward(&x)?;
        let hidden = run_layers(&self.layers, x, &None)?;
        let (b, t, _) = hidden.dims3().map_err(ce("clip vision"))?;
        let pooled = self.post_norm.forward(&first_token(&hidden)?)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.info.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}

impl ModalityEncoder for ClipText {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let batch = text_batch(input, self.vocab, self.max_positions)?;
        let t = batch.input_ids.ncols();
        let dev = &self.info.device;
        let x = embed_text(&self.token, &self.position, &batch.input_ids, dev)?;
        let mask = text_mask(batch, dev)?;
        let bias = causal_bias(t, dev)?
            .broadcast_add(&padding_bias(&mask)?)
            .map_err(ce("clip text"))?;
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
