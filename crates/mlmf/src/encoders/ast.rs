//! Audio Spectrogram Transformer (`model_type: audio-spectrogram-transformer`), as
//! transformers' `ASTModel`: a ViT over Kaldi filter banks.
//!
//! The filter banks `[B, num_mel_bins, max_length]` (mel bins by frames, from the
//! `ASTFeatureExtractor` processor) are cut into `patch_size` squares, one every
//! `frequency_stride` bins and `time_stride` frames (overlapping), each embedded by one
//! matrix product; tokens run frequency-major, as the reference's convolution output is
//! flattened. A class token and a distillation token lead, learned positions are added,
//! pre-norm ViT layers and a final `layernorm` follow. Pooled is the mean of the two
//! leading tokens (`ASTModel.pooler_output`, what `ASTForAudioClassification` reads).
//!
//! Every frame is a token input, padding included: the reference pads short clips with
//! the normalised zero and lets the model see it, so the mask is all ones. Long audio
//! comes in several chunks of `max_length` frames; their pooled vectors are averaged.

use candle_core::{DType, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::inputs::{full_mask, wrong_input};
use crate::encoders::layers::{
    ce, load_layers, run_layers, EncoderLayer, LayerNorm, Linear, Placement, Sizes, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{
    vit, ChunkPooling, EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A loaded AST encoder.
pub struct Ast {
    n_mels: usize,
    frames: usize,
    patch: usize,
    strides: (usize, usize),
    /// Patches along frequency and time.
    grid: (usize, usize),
    projection: Linear,
    /// `[1, 2, D]`: the class and distillation tokens.
    leading: Tensor,
    /// `[1, N + 2, D]`.
    position: Tensor,
    layers: Vec<EncoderLayer>,
    norm: LayerNorm,
    place: Placement,
    info: EncoderInfo,
}

/// Loads an AST checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Audio])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-12, "gelu"))?;
    let patch = cfg.size("patch_size", 16)?;
    let n_mels = cfg.size("num_mel_bins", 128)?;
    let frames = cfg.size("max_length", 1024)?;
    let strides = (
        cfg.size("frequency_stride", 10)?,
        cfg.size("time_stride", 10)?,
    );
    if patch > n_mels || patch > frames {
        return Err(MlmfError::config(
            cfg.name("patch_size"),
            format!("{patch} exceeds num_mel_bins {n_mels} or max_length {frames}"),
        ));
    }
    let grid = (
        (n_mels - patch) / strides.0 + 1,
        (frames - patch) / strides.1 + 1,
    );
    let tokens = grid.0 * grid.1 + 2;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.distillation_token")
        .ok_or_else(|| ckpt.error("weight `embeddings.distillation_token` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let d = s.hidden;
    let f = ce("ast load");
    let projection = Linear::from_parts(
        w.get(
            &p("embeddings.patch_embeddings.projection.weight"),
            &[d, 1, patch, patch],
        )?
        .reshape((d, patch * patch))
        .map_err(&f)?,
        Some(w.get(&p("embeddings.patch_embeddings.projection.bias"), &[d])?),
    )?;
    let leading = Tensor::cat(
        &[
            w.get(&p("embeddings.cls_token"), &[1, 1, d])?,
            w.get(&p("embeddings.distillation_token"), &[1, 1, d])?,
        ],
        1,
    )
    .map_err(&f)?;
    let position = w.get(&p("embeddings.position_embeddings"), &[1, tokens, d])?;
    Ok(Box::new(Ast {
        n_mels,
        frames,
        patch,
        strides,
        grid,
        projection,
        leading,
        position,
        layers: load_layers(w, &p("encoder.layer."), &vit::LAYER, &s)?,
        norm: LayerNorm::load(w, &p("layernorm"), d, s.eps)?,
        info: place.info(
            Modality::Audio,
            "audio-spectrogram-transformer",
            d,
            d,
            ProcessorKind::Audio { n_mels, frames },
        ),
        place,
    }))
}

impl Ast {
    /// Checks the batch and gathers its patches: `[B * N, P * P]`, frequency-major.
    fn patches(&self, input: &EncoderInput) -> Result<(usize, Tensor)> {
        let expected = format!(
            "filter banks [B >= 1, {}, {}] (num_mel_bins, max_length) from the \
             ASTFeatureExtractor processor",
            self.n_mels, self.frames
        );
        let EncoderInput::Audio { features, .. } = input else {
            return Err(wrong_input(Modality::Audio, &expected, input));
        };
        let (b, m, t) = features.dim();
        if b == 0 || m != self.n_mels || t != self.frames {
            return Err(MlmfError::input(
                Modality::Audio,
                format!("expected {expected}, got {:?}", features.shape()),
            ));
        }
        let x = features.as_standard_layout();
        let data = x.as_slice().unwrap_or(&[]);
        let (pz, (fs, ts), (gf, gt)) = (self.patch, self.strides, self.grid);
        let mut rows = Vec::with_capacity(b * gf * gt * pz * pz);
        for bi in 0..b {
            for fi in 0..gf {
                for ti in 0..gt {
                    for y in 0..pz {
                        let at = (bi * m + fi * fs + y) * t + ti * ts;
                        rows.extend_from_slice(&data[at..at + pz]);
                    }
                }
            }
        }
        let patches = Tensor::from_vec(rows, (b * gf * gt, pz * pz), &self.place.device)
            .and_then(|p| p.to_dtype(self.place.dtype))
            .map_err(ce("ast patches"))?;
        Ok((b, patches))
    }
}

impl ModalityEncoder for Ast {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn chunk_pooling(&self) -> ChunkPooling {
        ChunkPooling::MeanOfChunks
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let f = ce("ast");
        let (b, patches) = self.patches(input)?;
        let d = self.info.hidden_size;
        let x = self
            .projection
            .forward(&patches)?
            .reshape((b, (), d))
            .map_err(&f)?;
        let leading = self.leading.broadcast_as((b, 2, d)).map_err(&f)?;
        let x = Tensor::cat(&[&leading, &x], 1)
            .and_then(|x| x.broadcast_add(&self.position))
            .map_err(&f)?;
        let hidden = self.norm.forward(&run_layers(&self.layers, x, &None)?)?;
        let t = hidden.dim(1).map_err(&f)?;
        let pooled = hidden
            .narrow(1, 0, 2)
            .and_then(|h| h.to_dtype(DType::F32))
            .and_then(|h| h.sum(1))
            .and_then(|h| h / 2.0)
            .and_then(|h| h.to_dtype(hidden.dtype()))
            .map_err(&f)?;
        Ok(EncoderOutput {
            mask: full_mask(b, t, &self.info.device)?,
            hidden_states: hidden,
            pooled,
        })
    }
}
