//! X-CLIP (`model_type: xclip`), as transformers' `XCLIPModel`: a video tower aligned
//! with a CLIP text tower.
//!
//! Video: every frame of a clip of exactly `num_frames` frames goes through a CLIP
//! vision transformer whose layers talk across frames. Before each layer, the class
//! state of every frame is mapped by `message_fc`, the clip's frames attend to each
//! other's (`message_ln`, `message_attn`, a residual), and the result joins its frame's
//! sequence as one extra token for that layer's attention; the token is dropped again
//! before the MLP. Since the MLP and the residuals are per token, a layer is run as a
//! CLIP layer over the longer sequence and the extra token cut afterwards, on the
//! float32 fast path. Each frame's `post_layernorm` class state is projected
//! (`visual_projection`), the multi-frame integration transformer (`mit`: learned
//! frame positions, CLIP layers, a residual around them) runs over the frames, and
//! `pooled` is the mean over frames: `get_video_features`.
//!
//! `hidden_states` `[B, N, P]` are what the checkpoint's prompt generator reads: each
//! patch's last-layer state (class token left out) through `prompts_visual_layernorm`
//! and `prompts_visual_projection`, averaged over the frames. The text side of
//! [`crate::aligned`] turns them into video-specific prompts; X-CLIP's text vectors
//! depend on the video they are compared with.
//!
//! Text: the CLIP text tower ([`crate::encoders::clip`]), pooled at the largest id as
//! `XCLIPTextModel` does, projected by `text_projection`.

use candle_core::{DType, Tensor};

use crate::encoders::clip::{self, first_token, tower_cfg, CLIP_LAYER};
use crate::encoders::config::Cfg;
use crate::encoders::inputs::{clip_frames, full_mask};
use crate::encoders::layers::{
    ce, load_layers, run_layers, AttentionNames, EncoderLayer, LayerNorm, Linear, Placement,
    SelfAttention, Sizes, Weights,
};
use crate::encoders::patch::{Geometry, PatchEmbedding};
use crate::encoders::registry::LoadRequest;
use crate::encoders::video::frames_as_images;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// The message attention's tensor names, under a layer's `message_attn.`.
const MESSAGE_ATTENTION: AttentionNames<'static> = AttentionNames {
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    o: "out_proj",
    k_bias: true,
};

/// `num_frames` of an X-CLIP config (`vision_config.num_frames`, 8 by default).
pub(crate) fn num_frames(config: &serde_json::Value) -> usize {
    config
        .get("vision_config")
        .and_then(|v| v.get("num_frames"))
        .and_then(|v| v.as_u64())
        .map_or(8, |n| n as usize)
}

/// One vision layer with its cross-frame message token.
struct FrameLayer {
    message_fc: Linear,
    message_ln: LayerNorm,
    message_attn: SelfAttention,
    layer: EncoderLayer,
}

/// X-CLIP's video tower.
pub struct XClipVideo {
    geometry: Geometry,
    frames: usize,
    embedding: PatchEmbedding,
    pre_norm: LayerNorm,
    layers: Vec<FrameLayer>,
    post_norm: LayerNorm,
    visual_projection: Linear,
    /// `[1, T, P]`.
    mit_position: Tensor,
    mit: Vec<EncoderLayer>,
    prompt_norm: LayerNorm,
    prompt_projection: Linear,
    place: Placement,
    info: EncoderInfo,
}

/// Loads the tower of an X-CLIP checkpoint the request's modality selects (video by
/// default).
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    match req.check_modality(&[Modality::Video, Modality::Text])? {
        Modality::Text => Ok(Box::new(clip::load_text(req, "xclip")?)),
        _ => Ok(Box::new(load_video(req)?)),
    }
}

fn load_video(req: &LoadRequest<'_>) -> Result<XClipVideo> {
    let ckpt = req.checkpoint;
    let root = Cfg::new(ckpt.config(), "");
    let cfg = tower_cfg(ckpt.config(), true, "vision_config");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-5, "quick_gelu"))?;
    let geometry = Geometry::read(cfg, 224, 32)?;
    let frames = cfg.size("num_frames", 8)?;
    let dim = root.size("projection_dim", 512)?;
    let mit = Sizes {
        hidden: cfg.size("mit_hidden_size", 512)?,
        layers: cfg.size("mit_num_hidden_layers", 1)?,
        heads: cfg.size("mit_num_attention_heads", 8)?,
        inter: cfg.size("mit_intermediate_size", 2048)?,
        eps: s.eps,
        act: s.act,
    };
    if frames == 0 {
        return Err(MlmfError::config(
            cfg.name("num_frames"),
            "must be at least 1",
        ));
    }
    if mit.hidden != dim {
        return Err(MlmfError::config(
            cfg.name("mit_hidden_size"),
            format!(
                "{} differs from projection_dim {dim}: the frame integration transformer runs \
                 on the projected frame vectors",
                mit.hidden
            ),
        ));
    }
    let place = req.placement();
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("vision_model.{n}");
    let embedding = clip::patch_embedding(w, "vision_model.", geometry, s.hidden)?;
    let layers = load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?
        .into_iter()
        .enumerate()
        .map(|(i, layer)| {
            let l = p(&format!("encoder.layers.{i}."));
            Ok(FrameLayer {
                message_fc: Linear::load(w, &format!("{l}message_fc"), s.hidden, s.hidden, true)?,
                message_ln: LayerNorm::load(w, &format!("{l}message_ln"), s.hidden, s.eps)?,
                message_attn: SelfAttention::load(
                    w,
                    &format!("{l}message_attn."),
                    &MESSAGE_ATTENTION,
                    s.hidden,
                    s.heads,
                )?,
                layer,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // `prompts_visual_projection` is a `[hidden, projection_dim]` parameter applied as
    // `x @ W`: the transpose of a Linear weight.
    let projection = w
        .get("prompts_visual_projection", &[s.hidden, dim])?
        .t()
        .and_then(|t| t.contiguous())
        .map_err(ce("xclip prompts_visual_projection"))?;
    let processor = ProcessorKind::Video {
        height: geometry.image_size,
        width: geometry.image_size,
        frames: Some(frames),
    };
    Ok(XClipVideo {
        geometry,
        frames,
        embedding,
        pre_norm: LayerNorm::load(w, &p("pre_layernorm"), s.hidden, s.eps)?,
        layers,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), s.hidden, s.eps)?,
        visual_projection: Linear::load(w, "visual_projection", s.hidden, dim, false)?,
        mit_position: w.get("mit.position_embedding", &[1, frames, dim])?,
        mit: load_layers(w, "mit.encoder.layers.", &CLIP_LAYER, &mit)?,
        prompt_norm: LayerNorm::load(w, "prompts_visual_layernorm", s.hidden, s.eps)?,
        prompt_projection: Linear::from_parts(projection, None)?,
        info: place.info(Modality::Video, "xclip", dim, dim, processor),
        place,
    })
}

impl FrameLayer {
    /// `x` `[B * T, S, D]`, frames of one clip adjacent.
    fn forward(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let f = ce("xclip vision layer");
        let (bt, s, d) = x.dims3().map_err(&f)?;
        let msg = self
            .message_fc
            .forward(&first_token(x)?)?
            .reshape((b, t, d))
            .map_err(&f)?;
        let talk = self
            .message_attn
            .forward(&self.message_ln.forward(&msg)?, &None)?;
        let msg = (msg + talk)
            .and_then(|m| m.reshape((bt, 1, d)))
            .map_err(&f)?;
        let x = Tensor::cat(&[x, &msg], 1).map_err(&f)?;
        let y = run_layers(std::slice::from_ref(&self.layer), x, &None)?;
        y.narrow(1, 0, s).map_err(f)
    }
}

/// The mean over dimension 1, computed in float32.
fn mean_1(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
        .and_then(|m| m.mean(1))
        .and_then(|m| m.to_dtype(x.dtype()))
        .map_err(ce("xclip mean over frames"))
}

impl XClipVideo {
    /// Checks the clip's shape and lays its frames out as images `[B * T, C, H, W]`.
    fn frames(&self, input: &EncoderInput) -> Result<(usize, EncoderInput)> {
        let g = &self.geometry;
        let (c, size) = (g.channels, g.image_size);
        let px = clip_frames(input, self.frames, c, size)?;
        Ok((px.shape()[0], EncoderInput::Image(frames_as_images(px)?)))
    }
}

impl ModalityEncoder for XClipVideo {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let f = ce("xclip video");
        let (b, images) = self.frames(input)?;
        let t = self.frames;
        let mut x = self
            .pre_norm
            .forward(&self.embedding.forward(&images, &self.place)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, b, t)?;
        }
        let (_, s, _) = x.dims3().map_err(&f)?;
        let dim = self.info.output_dim;
        // Per frame: the projected class state; then the frames integrated.
        let per_frame = self
            .visual_projection
            .forward(&self.post_norm.forward(&first_token(&x)?)?)?
            .reshape((b, t, dim))
            .map_err(&f)?;
        let h = per_frame.broadcast_add(&self.mit_position).map_err(&f)?;
        let h = run_layers(&self.mit, h, &None)?;
        let pooled = mean_1(&(h + &per_frame).map_err(&f)?)?;
        // What the prompt generator reads: projected patch states, mean over frames.
        let patches = x.narrow(1, 1, s - 1).map_err(&f)?;
        let feats = self
            .prompt_projection
            .forward(&self.prompt_norm.forward(&patches)?)?
            .reshape((b, t, (s - 1) * dim))
            .map_err(&f)?;
        let hidden = mean_1(&feats)?.reshape((b, s - 1, dim)).map_err(&f)?;
        Ok(EncoderOutput {
            mask: full_mask(b, s - 1, &self.info.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}
