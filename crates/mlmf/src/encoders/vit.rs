//! ViT (`model_type: vit`), as transformers' `ViTModel`.
//!
//! A stride-`P` patch convolution with bias, a class token, learned positions, pre-norm
//! layers (`layernorm_before` / `layernorm_after`), a final `layernorm` (part of
//! `hidden_states`, as in `last_hidden_state`). Pooled is `ViTModel.pooler_output`
//! (`tanh(W h_CLS + b)`) when the checkpoint has pooler weights, the class token's state
//! otherwise (checkpoints saved from `ViTForImageClassification` carry none).

use crate::encoders::clip::first_token;
use crate::encoders::config::Cfg;
use crate::encoders::inputs::full_mask;
use crate::encoders::layers::{
    ce, load_layers, run_layers, AttentionNames, EncoderLayer, LayerNames, LayerNorm, Linear,
    Placement, Sizes, Weights,
};
use crate::encoders::patch::{Geometry, PatchEmbedding, PatchNames};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder};
use crate::error::Result;
use crate::modality::Modality;

/// ViT's layer tensor names (pre-norm), under `encoder.layer.`.
pub(crate) const LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
        o: "attention.output.dense",
        k_bias: true,
    },
    norm1: "layernorm_before",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    norm2: "layernorm_after",
    pre_norm: true,
};

/// A loaded ViT encoder.
pub struct Vit {
    embedding: PatchEmbedding,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    pooler: Option<Linear>,
    place: Placement,
    info: EncoderInfo,
}

/// Loads a ViT checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Image])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-12, "gelu"))?;
    let geometry = Geometry::read(cfg, 224, 16)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.cls_token")
        .ok_or_else(|| ckpt.error("weight `embeddings.cls_token` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let pooler = if w.contains(&p("pooler.dense.weight")) {
        Some(Linear::load(
            w,
            &p("pooler.dense"),
            s.hidden,
            s.hidden,
            true,
        )?)
    } else {
        None
    };
    let names = PatchNames {
        projection: &p("embeddings.patch_embeddings.projection"),
        projection_bias: true,
        class: Some(&p("embeddings.cls_token")),
        position: &p("embeddings.position_embeddings"),
        position_batched: true,
    };
    Ok(Box::new(Vit {
        embedding: PatchEmbedding::load(w, &names, geometry, s.hidden)?,
        layers: load_layers(w, &p("encoder.layer."), &LAYER, &s)?,
        norm: LayerNorm::load(w, &p("layernorm"), s.hidden, s.eps)?,
        pooler,
        info: place.info(
            Modality::Image,
            "vit",
            s.hidden,
            s.hidden,
            geometry.processor(),
        ),
        place,
    }))
}

impl ModalityEncoder for Vit {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let f = ce("vit");
        let x = self.embedding.forward(input, &self.place)?;
        let hidden = self.norm.forward(&run_layers(&self.layers, x, &None)?)?;
        let (b, t, _) = hidden.dims3().map_err(&f)?;
        let cls = first_token(&hidden)?;
        let pooled = match &self.pooler {
            Some(p) => p.forward(&cls)?.tanh().map_err(&f)?,
            None => cls,
        };
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.info.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}
