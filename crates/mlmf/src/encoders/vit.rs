//! ViT (`model_type: vit`), as transformers' `ViTModel`.
//!
//! A stride-`P` patch convolution with bias, a class token, learned positions, pre-norm
//! layers (`layernorm_before` / `layernorm_after`), a final `layernorm` (part of
//! `hidden_states`, as in `last_hidden_state`). Pooled is `ViTModel.pooler_output`
//! (`tanh(W h_CLS + b)`) when the checkpoint has pooler weights, the class token's state
//! otherwise (checkpoints saved from `ViTForImageClassification` carry none).

use candle_core::{DType, Device, Tensor};

use crate::encoders::clip::pixels_tensor;
use crate::encoders::config::Cfg;
use crate::encoders::layers::{
    ce, load_patch_embedding, patchify, run_layers, Activation, AttentionNames, EncoderLayer,
    LayerNorm, Linear, Placement, SelfAttention, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{full_mask, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A loaded ViT encoder.
pub struct Vit {
    patch: Linear,
    class: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    pooler: Option<Linear>,
    hidden: usize,
    image_size: usize,
    patch_size: usize,
    channels: usize,
    place: Placement,
}

/// Loads a ViT checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Image])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let hidden = cfg.size("hidden_size", 768)?;
    let layers_n = cfg.size("num_hidden_layers", 12)?;
    let heads = cfg.size("num_attention_heads", 12)?;
    let inter = cfg.size("intermediate_size", 3072)?;
    let eps = cfg.positive("layer_norm_eps", 1e-12)?;
    let act = Activation::parse(cfg.string("hidden_act", "gelu")?, &cfg.name("hidden_act"))?;
    let image_size = cfg.size("image_size", 224)?;
    let patch_size = cfg.size("patch_size", 16)?;
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
        .find_prefix("embeddings.cls_token")
        .ok_or_else(|| ckpt.error("weight `embeddings.cls_token` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let names = AttentionNames {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
        o: "attention.output.dense",
        k_bias: true,
    };
    let layers = (0..layers_n)
        .map(|i| {
            let l = p(&format!("encoder.layer.{i}."));
            Ok(EncoderLayer {
                attn: SelfAttention::load(w, &l, &names, hidden, heads)?,
                norm1: LayerNorm::load(w, &format!("{l}layernorm_before"), hidden, eps)?,
                fc1: Linear::load(w, &format!("{l}intermediate.dense"), hidden, inter, true)?,
                fc2: Linear::load(w, &format!("{l}output.dense"), inter, hidden, true)?,
                norm2: LayerNorm::load(w, &format!("{l}layernorm_after"), hidden, eps)?,
                act,
                pre_norm: true,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n_pos = (image_size / patch_size).pow(2) + 1;
    let pooler = if w.contains(&p("pooler.dense.weight")) {
        Some(Linear::load(w, &p("pooler.dense"), hidden, hidden, true)?)
    } else {
        None
    };
    Ok(Box::new(Vit {
        patch: load_patch_embedding(
            w,
            &p("embeddings.patch_embeddings.projection"),
            hidden,
            channels,
            patch_size,
            true,
        )?,
        class: w.get(&p("embeddings.cls_token"), &[1, 1, hidden])?,
        position: w.get(&p("embeddings.position_embeddings"), &[1, n_pos, hidden])?,
        layers,
        norm: LayerNorm::load(w, &p("layernorm"), hidden, eps)?,
        pooler,
        hidden,
        image_size,
        patch_size,
        channels,
        place,
    }))
}

impl ModalityEncoder for Vit {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn model_type(&self) -> &str {
        "vit"
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
        let f = ce("vit");
        let b = px.dim(0).map_err(&f)?;
        let patches = self.patch.forward(&patchify(&px, self.patch_size)?)?;
        let class = self.class.repeat((b, 1, 1)).map_err(&f)?;
        let x = Tensor::cat(&[&class, &patches], 1)
            .and_then(|x| x.broadcast_add(&self.position))
            .map_err(&f)?;
        let hidden = self.norm.forward(&run_layers(&self.layers, x, &None)?)?;
        let t = hidden.dim(1).map_err(&f)?;
        let cls = hidden
            .narrow(1, 0, 1)
            .and_then(|c| c.squeeze(1))
            .map_err(&f)?;
        let pooled = match &self.pooler {
            Some(p) => p.forward(&cls)?.tanh().map_err(&f)?,
            None => cls,
        };
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.place.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}
