//! Whisper's audio encoder (`model_type: whisper`), as transformers' `WhisperEncoder`.
//! The decoder's weights are never read.
//!
//! Two 1-D convolutions over the log-mel frames (kernel 3, padding 1, strides 1 and 2,
//! each followed by GELU) halve 3000 frames to 1500 positions; stored sinusoidal
//! positions are added; pre-norm layers (the key projection has no bias) and a final
//! `layer_norm` follow. The mask marks the positions that cover real audio (position
//! `j` covers frames `2j` and `2j + 1`), and pooled is the mean over those positions.

use candle_core::Tensor;

use crate::encoders::config::Cfg;
use crate::encoders::inputs::{mask_tensor, wrong_input};
use crate::encoders::layers::{
    ce, load_layers, masked_mean, run_layers, Activation, AttentionNames, EncoderLayer, LayerNames,
    LayerNorm, Linear, Placement, Sizes, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A kernel-3 convolution as a linear map over 3 stacked neighbouring frames.
struct Conv3 {
    linear: Linear,
    stride: usize,
}

impl Conv3 {
    fn load(
        w: Weights<'_>,
        name: &str,
        in_ch: usize,
        out_ch: usize,
        stride: usize,
    ) -> Result<Self> {
        let f = ce("whisper conv");
        let weight = w.get(&format!("{name}.weight"), &[out_ch, in_ch, 3])?;
        // [out, in, k] -> [out, k, in]: the column order of the stacked frames.
        let weight = weight
            .permute((0, 2, 1))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((out_ch, 3 * in_ch)))
            .map_err(&f)?;
        let bias = w.get(&format!("{name}.bias"), &[out_ch])?;
        Ok(Self {
            linear: Linear::from_parts(weight, Some(bias))?,
            stride,
        })
    }

    /// `[B, L, C]` -> `[B, L_out, D]` with zero padding 1 on both sides.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("whisper conv");
        let (b, l, c) = x.dims3().map_err(&f)?;
        let padded = x.pad_with_zeros(1, 1, 1).map_err(&f)?;
        let out_len = (l + 2 - 3) / self.stride + 1;
        let taps = (0..3)
            .map(|k| {
                if self.stride == 1 {
                    padded.narrow(1, k, out_len)
                } else {
                    padded
                        .narrow(1, k, self.stride * out_len)?
                        .reshape((b, out_len, self.stride, c))?
                        .narrow(2, 0, 1)?
                        .squeeze(2)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&f)?;
        let stacked = Tensor::cat(&taps, 2).map_err(&f)?;
        self.linear.forward(&stacked)
    }
}

/// A loaded Whisper encoder.
pub struct WhisperEncoder {
    conv1: Conv3,
    conv2: Conv3,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    act: Activation,
    n_mels: usize,
    positions: usize,
    place: Placement,
    info: EncoderInfo,
}

/// Whisper's encoder layer tensor names (pre-norm; the key projection has no bias),
/// under `encoder.layers.`.
const LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        o: "self_attn.out_proj",
        k_bias: false,
    },
    norm1: "self_attn_layer_norm",
    fc1: "fc1",
    fc2: "fc2",
    norm2: "final_layer_norm",
    pre_norm: true,
};

/// Loads the encoder of a Whisper checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Audio])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    // Whisper's config names its sizes its own way; transformers' WhisperEncoder
    // hard-codes 1e-5 for its layer norms.
    let sizes = Sizes {
        hidden: cfg.size("d_model", 1280)?,
        layers: cfg.size("encoder_layers", 32)?,
        heads: cfg.size("encoder_attention_heads", 20)?,
        inter: cfg.size("encoder_ffn_dim", 5120)?,
        eps: 1e-5,
        act: Activation::parse(
            cfg.string("activation_function", "gelu")?,
            &cfg.name("activation_function"),
        )?,
    };
    let hidden = sizes.hidden;
    let n_mels = cfg.size("num_mel_bins", 80)?;
    let positions = cfg.size("max_source_positions", 1500)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("encoder.conv1.weight")
        .ok_or_else(|| ckpt.error("weight `model.encoder.conv1.weight` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}encoder.{n}");
    Ok(Box::new(WhisperEncoder {
        conv1: Conv3::load(w, &p("conv1"), n_mels, hidden, 1)?,
        conv2: Conv3::load(w, &p("conv2"), hidden, hidden, 2)?,
        position: w.get(&p("embed_positions.weight"), &[positions, hidden])?,
        layers: load_layers(w, &p("layers."), &LAYER, &sizes)?,
        norm: LayerNorm::load(w, &p("layer_norm"), hidden, sizes.eps)?,
        act: sizes.act,
        n_mels,
        positions,
        info: place.info(
            Modality::Audio,
            "whisper",
            hidden,
            hidden,
            ProcessorKind::Audio {
                n_mels,
                frames: 2 * positions,
            },
        ),
        place,
    }))
}

impl ModalityEncoder for WhisperEncoder {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let frames = 2 * self.positions;
        let EncoderInput::Audio {
            features,
            valid_frames,
        } = input
        else {
            return Err(wrong_input(
                Modality::Audio,
                format!("log-mel features [B, {}, {frames}]", self.n_mels),
                input,
            ));
        };
        let shape = features.shape();
        if shape[0] == 0 || shape[1] != self.n_mels || shape[2] != frames {
            return Err(MlmfError::input(
                Modality::Audio,
                format!(
                    "expected log-mel features shaped [B >= 1, {}, {frames}] (num_mel_bins, \
                     2 x max_source_positions), got {shape:?}",
                    self.n_mels
                ),
            ));
        }
        let b = shape[0];
        if let Some(v) = valid_frames {
            if v.len() != b {
                return Err(MlmfError::input(
                    Modality::Audio,
                    format!(
                        "expected {b} valid-frame counts, one per row, got {}",
                        v.len()
                    ),
                ));
            }
        }
        let f = ce("whisper encoder");
        let data: Vec<f32> = features.iter().copied().collect();
        let x = Tensor::from_vec(data, shape, &self.place.device)
            .and_then(|t| t.to_dtype(self.place.dtype))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .map_err(&f)?;
        let x = self.act.forward(&self.conv1.forward(&x)?)?;
        let x = self.act.forward(&self.conv2.forward(&x)?)?;
        let x = x
            .broadcast_add(&self.position.unsqueeze(0).map_err(&f)?)
            .map_err(&f)?;
        let hidden = self.norm.forward(&run_layers(&self.layers, x, &None)?)?;
        let t = self.positions;
        let rows: Vec<u8> = (0..b)
            .flat_map(|i| {
                let valid = valid_frames
                    .as_ref()
                    .and_then(|v| v.get(i).copied())
                    .unwrap_or(frames);
                (0..t).map(move |j| u8::from(2 * j < valid))
            })
            .collect();
        let mask = mask_tensor(b, t, rows, &self.place.device)?;
        let pooled = masked_mean(&hidden, &mask)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}
