//! VideoMAE (`model_type: videomae`), as transformers' `VideoMAEModel`: a native video
//! encoder, not an image encoder run per frame.
//!
//! - Tubelet embedding: a `[D, C, tubelet, P, P]` convolution with stride
//!   `(tubelet, P, P)` over frames `[B, T, C, H, W]`, computed as one matrix product
//!   over the gathered tubelets; tokens in (time, row, column) order.
//! - Fixed sinusoidal positions (`sin` on even, `cos` on odd dimensions, angle
//!   `pos / 10000^(2 floor(j / 2) / D)`), made in float64 and rounded to float32 as the
//!   reference builds its table.
//! - Pre-norm ViT layers whose query and value biases are stored apart (`q_bias`,
//!   `v_bias`; `qv_bias: false` has none) and whose key has no bias.
//! - `use_mean_pooling: true` (the default): `hidden_states` are the last layer's states
//!   and pooled is their mean over tokens, through `fc_norm` when the checkpoint has one
//!   (classification checkpoints); otherwise a final `layernorm` is part of
//!   `hidden_states` and pooled is the first token, as `VideoMAEForVideoClassification`
//!   reads them.
//!
//! The clip must have exactly `num_frames` frames of `image_size`: the position table
//! is fixed by them, as in the reference. Models made by [`crate::encoders::Encoder`]
//! sample `num_frames` frames by default.

use std::path::Path;

use candle_core::Tensor;
use ndarray::Array5;

use crate::encoders::clip::first_token;
use crate::encoders::config::Cfg;
use crate::encoders::inputs::{clip_frames, full_mask};
use crate::encoders::layers::{
    ce, run_layers, EncoderLayer, LayerNorm, Linear, Placement, SelfAttention, Sizes, Weights,
};
use crate::encoders::patch::Geometry;
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// The `model_type`s that encode a clip as a whole (the others run per frame).
pub(crate) const NATIVE_VIDEO: &[&str] = &["videomae", "xclip"];

/// `num_frames` of a native video checkpoint's `config.json` in `dir` (`None` for
/// other checkpoints, or when there is no readable config).
pub(crate) fn native_frames(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let t = json.get("model_type")?.as_str()?;
    if t == "xclip" {
        return Some(crate::encoders::xclip::num_frames(&json));
    }
    NATIVE_VIDEO.contains(&t).then(|| {
        json.get("num_frames")
            .and_then(|v| v.as_u64())
            .map_or(16, |n| n as usize)
    })
}

/// A loaded VideoMAE encoder.
pub struct VideoMae {
    geometry: Geometry,
    frames: usize,
    tubelet: usize,
    projection: Linear,
    /// `[1, N, D]`.
    position: Tensor,
    layers: Vec<EncoderLayer>,
    /// The final norm of `use_mean_pooling: false`.
    norm: Option<LayerNorm>,
    fc_norm: Option<LayerNorm>,
    mean_pooling: bool,
    place: Placement,
    info: EncoderInfo,
}

/// The sinusoidal table `[n, d]` of the reference, in float64, rounded to float32.
fn sinusoid_table(n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for pos in 0..n {
        for j in 0..d {
            let angle = pos as f64 / 10000f64.powf((2 * (j / 2)) as f64 / d as f64);
            out.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    out
}

/// Loads a VideoMAE checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Video])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-12, "gelu"))?;
    let geometry = Geometry::read(cfg, 224, 16)?;
    let frames = cfg.size("num_frames", 16)?;
    let tubelet = cfg.size("tubelet_size", 2)?;
    if !frames.is_multiple_of(tubelet) {
        return Err(MlmfError::config(
            cfg.name("num_frames"),
            format!("{frames} is not a multiple of tubelet_size {tubelet}"),
        ));
    }
    let qv_bias = cfg.boolean("qv_bias", true)?;
    let mean_pooling = cfg.boolean("use_mean_pooling", true)?;
    if s.heads == 0 || !s.hidden.is_multiple_of(s.heads) {
        return Err(ckpt.error(format!(
            "hidden size {} is not divisible by the number of attention heads {}",
            s.hidden, s.heads
        )));
    }
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.patch_embeddings.projection.weight")
        .ok_or_else(|| {
            ckpt.error("weight `embeddings.patch_embeddings.projection.weight` is missing")
        })?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let (d, c, pz) = (s.hidden, geometry.channels, geometry.patch_size);
    let f = ce("videomae");
    let feat = c * tubelet * pz * pz;
    let projection = Linear::from_parts(
        w.get(
            &p("embeddings.patch_embeddings.projection.weight"),
            &[d, c, tubelet, pz, pz],
        )?
        .reshape((d, feat))
        .map_err(&f)?,
        Some(w.get(&p("embeddings.patch_embeddings.projection.bias"), &[d])?),
    )?;
    let tokens = geometry.patches() * (frames / tubelet);
    let position = Tensor::from_vec(sinusoid_table(tokens, d), (1, tokens, d), &place.device)
        .and_then(|t| t.to_dtype(place.dtype))
        .map_err(&f)?;
    let layers = (0..s.layers)
        .map(|i| load_layer(w, &p(&format!("encoder.layer.{i}.")), &s, qv_bias))
        .collect::<Result<Vec<_>>>()?;
    let norm = if mean_pooling {
        None
    } else {
        Some(LayerNorm::load(w, &p("layernorm"), d, s.eps)?)
    };
    // Classification checkpoints keep `fc_norm` beside the `videomae.` model (PyTorch's
    // default LayerNorm eps).
    let fc_norm = if mean_pooling && w.contains("fc_norm.weight") {
        Some(LayerNorm::load(w, "fc_norm", d, 1e-5)?)
    } else {
        None
    };
    let processor = ProcessorKind::Video {
        height: geometry.image_size,
        width: geometry.image_size,
        frames: Some(frames),
    };
    Ok(Box::new(VideoMae {
        geometry,
        frames,
        tubelet,
        projection,
        position,
        layers,
        norm,
        fc_norm,
        mean_pooling,
        info: place.info(Modality::Video, "videomae", d, d, processor),
        place,
    }))
}

/// One pre-norm layer under `l` (`encoder.layer.{i}.`).
fn load_layer(w: Weights<'_>, l: &str, s: &Sizes, qv_bias: bool) -> Result<EncoderLayer> {
    let d = s.hidden;
    let n = |name: &str| format!("{l}{name}");
    let proj = |name: &str, bias: Option<&str>| -> Result<Linear> {
        let mut lin = Linear::load(w, &n(&format!("attention.attention.{name}")), d, d, false)?;
        if let Some(b) = bias {
            // `q_bias` / `v_bias` as the reference stores them; `query.bias` /
            // `value.bias` where a conversion folded them in.
            let folded = n(&format!("attention.attention.{name}.bias"));
            let name = if w.contains(&folded) {
                folded
            } else {
                n(&format!("attention.attention.{b}"))
            };
            lin.bias = Some(w.get(&name, &[d])?);
        }
        Ok(lin)
    };
    let attn = SelfAttention::from_parts(
        proj("query", qv_bias.then_some("q_bias"))?,
        proj("key", None)?,
        proj("value", qv_bias.then_some("v_bias"))?,
        Linear::load(w, &n("attention.output.dense"), d, d, true)?,
        d,
        s.heads,
    );
    Ok(EncoderLayer {
        attn,
        norm1: LayerNorm::load(w, &n("layernorm_before"), d, s.eps)?,
        fc1: Linear::load(w, &n("intermediate.dense"), d, s.inter, true)?,
        fc2: Linear::load(w, &n("output.dense"), s.inter, d, true)?,
        norm2: LayerNorm::load(w, &n("layernorm_after"), d, s.eps)?,
        act: s.act,
        pre_norm: true,
    })
}

impl VideoMae {
    /// Checks the clip's shape and gathers its tubelets: `[B * N, C * tubelet * P * P]`
    /// rows in the convolution's (channel, time, row, column) order.
    fn tubelets(&self, input: &EncoderInput) -> Result<(usize, Tensor)> {
        let g = &self.geometry;
        let (c, size, pz, tub) = (g.channels, g.image_size, g.patch_size, self.tubelet);
        let px = clip_frames(input, self.frames, c, size)?;
        let b = px.shape()[0];
        let data = gather(px, tub, pz);
        let rows = data.len() / (c * tub * pz * pz);
        let t = Tensor::from_vec(data, (rows, c * tub * pz * pz), &self.place.device)
            .and_then(|t| t.to_dtype(self.place.dtype))
            .map_err(ce("videomae tubelets"))?;
        Ok((b, t))
    }
}

/// The tubelets of `px` `[B, T, C, H, W]`, one row each, tokens in (time, row, column)
/// order.
fn gather(px: &Array5<f32>, tub: usize, pz: usize) -> Vec<f32> {
    let px = px.as_standard_layout();
    let (b, t, c, h, w) = px.dim();
    let data = px.as_slice().unwrap_or(&[]);
    let (gt, gh, gw) = (t / tub, h / pz, w / pz);
    let mut out = Vec::with_capacity(b * gt * gh * gw * c * tub * pz * pz);
    for bi in 0..b {
        for ti in 0..gt {
            for hi in 0..gh {
                for wi in 0..gw {
                    for ci in 0..c {
                        for k in 0..tub {
                            for y in 0..pz {
                                let frame = bi * t + ti * tub + k;
                                let at = ((frame * c + ci) * h + hi * pz + y) * w + wi * pz;
                                out.extend_from_slice(&data[at..at + pz]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

impl ModalityEncoder for VideoMae {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let f = ce("videomae");
        let (b, tubelets) = self.tubelets(input)?;
        let d = self.info.hidden_size;
        let x = self
            .projection
            .forward(&tubelets)?
            .reshape((b, (), d))
            .and_then(|x| x.broadcast_add(&self.position))
            .map_err(&f)?;
        let mut hidden = run_layers(&self.layers, x, &None)?;
        if let Some(norm) = &self.norm {
            hidden = norm.forward(&hidden)?;
        }
        let t = hidden.dim(1).map_err(&f)?;
        let pooled = if self.mean_pooling {
            let mean = hidden
                .to_dtype(candle_core::DType::F32)
                .and_then(|h| h.mean(1))
                .and_then(|h| h.to_dtype(hidden.dtype()))
                .map_err(&f)?;
            match &self.fc_norm {
                Some(n) => n.forward(&mean)?,
                None => mean,
            }
        } else {
            first_token(&hidden)?
        };
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.info.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tubelets_follow_the_convolution_order() {
        // One clip of 2 frames, 1 channel, 4x4, tubelet 2, patch 2: 4 tokens of 8.
        let px = Array5::from_shape_fn((1, 2, 1, 4, 4), |(_, t, _, y, x)| {
            (t * 100 + y * 10 + x) as f32
        });
        let rows = gather(&px, 2, 2);
        assert_eq!(rows.len(), 4 * 8);
        // Token 1 is the top-right patch: frame 0 rows 0-1, then frame 1.
        assert_eq!(
            &rows[8..16],
            &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]
        );
    }

    #[test]
    fn the_position_table_alternates_sin_and_cos() {
        let t = sinusoid_table(3, 4);
        assert_eq!(&t[..4], &[0.0, 1.0, 0.0, 1.0]);
        assert!((t[4] - 1f64.sin() as f32).abs() < 1e-7);
        assert!((t[7] - (1.0 / 100f64).cos() as f32).abs() < 1e-7);
    }
}
