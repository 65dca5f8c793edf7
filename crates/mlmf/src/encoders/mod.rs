//! Encoders: Hugging Face checkpoints loaded as they are on disk and run on candle.
//!
//! A [`ModalityEncoder`] turns a preprocessed batch ([`EncoderInput`]) into an
//! [`EncoderOutput`]: token-level `hidden_states [B, T, D]`, their `mask [B, T]` and one
//! `pooled [B, D']` vector per item. The [`registry`] picks the implementation from
//! `config.json`'s `model_type` (and `architectures`); [`Encoder`] pairs it with the
//! processor the checkpoint ships, so that raw media can be encoded in one call.
//!
//! Supported: `bert` (and sentence-transformers directories around it), `clip`,
//! `clip_vision_model`, `clip_text_model`, `siglip`, `siglip_vision_model`,
//! `siglip_text_model`, `siglip2` (and its towers; NaFlex images), `qwen3` (a text
//! embedder), `vit`, `videomae`, `whisper` (encoder
//! only), `wav2vec2` and `hubert` (raw-waveform speech), `audio-spectrogram-transformer`,
//! `clap` (audio and text towers), `xclip` (video and text towers), and video as an image encoder applied per frame
//! ([`video::FrameEncoder`]).

pub mod ast;
pub mod bert;
pub mod checkpoint;
pub mod clap;
pub mod clip;
pub(crate) mod config;
pub(crate) mod cpu;
pub(crate) mod encoder;
pub(crate) mod htsat;
pub(crate) mod inputs;
pub(crate) mod layers;
pub(crate) mod patch;
pub mod qwen3;
pub mod registry;
pub mod siglip;
pub mod siglip2;
pub mod video;
pub mod videomae;
pub mod vit;
pub mod wav2vec2;
pub mod whisper;
pub mod xclip;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use ndarray::{Array3, Array4, Array5};
use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::text::TextBatch;

pub use checkpoint::Checkpoint;
pub use encoder::{Encoder, EncoderOptions, RawInputs};
pub use registry::{register_encoder, supported_model_types, EncoderFactory, LoadRequest};
pub use video::{FrameEncoder, VideoPooling};

/// The numeric precision a model's weights are kept in.
///
/// On the CPU, 16-bit and int8 weights run on the float32 kernels: activations,
/// norms, softmax and accumulation stay float32, and only the linear maps' weights
/// (and the token embedding tables) change format. On a GPU, `float16` and
/// `bfloat16` run natively in that dtype; `int8` runs on the CPU only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    BF16,
    /// Linear maps in int8 per output channel, activations quantised per row at run
    /// time (dynamic quantisation).
    Int8,
}

/// What the `dtype` settings accept.
const PRECISIONS: &str = "float32, bfloat16, float16 or int8";

impl Precision {
    /// The dtype of the weights' storage (int8 maps keep their own format; their
    /// other weights are float32).
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 | Self::Int8 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// The dtype activations run in on `device`: float32 on the CPU (16-bit weights are
    /// widened as they are read), the weights' dtype elsewhere.
    pub fn compute_dtype(self, device: &Device) -> DType {
        if device.is_cpu() {
            DType::F32
        } else {
            self.dtype()
        }
    }
}

impl FromStr for Precision {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Ok(Self::F32),
            "float16" | "f16" | "fp16" | "half" => Ok(Self::F16),
            "bfloat16" | "bf16" => Ok(Self::BF16),
            "int8" | "i8" | "qint8" => Ok(Self::Int8),
            _ => Err(MlmfError::config(
                "dtype",
                format!("unknown dtype {s:?}: expected {PRECISIONS}"),
            )),
        }
    }
}

impl Serialize for Precision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!("unknown dtype {s:?}: expected {PRECISIONS}"))
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::Int8 => "int8",
        })
    }
}

/// A preprocessed batch, as the processors produce it.
#[derive(Debug, Clone)]
pub enum EncoderInput {
    /// Token ids, attention mask and token types, int64 `[B, T]`.
    Text(TextBatch),
    /// Normalised pixels `[B, 3, H, W]` float32.
    Image(Array4<f32>),
    /// Log-mel features `[B, n_mels, frames]` float32, with the number of frames that
    /// hold real audio per row (`None`: all of them).
    Audio {
        features: Array3<f32>,
        valid_frames: Option<Vec<usize>>,
    },
    /// Frames `[B, T, 3, H, W]` float32.
    Video(Array5<f32>),
    /// Variable-resolution image patches (NaFlex, SigLIP 2): `[B, N, P * P * 3]`
    /// float32, each image's patch grid `(rows, columns)`; the first `rows * columns`
    /// patches of a row are real, the rest padding.
    Patches {
        patches: Array3<f32>,
        shapes: Vec<(usize, usize)>,
    },
}

impl EncoderInput {
    /// The modality this input belongs to.
    pub fn modality(&self) -> Modality {
        match self {
            Self::Text(_) => Modality::Text,
            Self::Image(_) | Self::Patches { .. } => Modality::Image,
            Self::Audio { .. } => Modality::Audio,
            Self::Video(_) => Modality::Video,
        }
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.input_ids.nrows(),
            Self::Image(x) => x.shape()[0],
            Self::Audio { features, .. } => features.shape()[0],
            Self::Video(x) => x.shape()[0],
            Self::Patches { patches, .. } => patches.shape()[0],
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short description for error messages ("image pixels [2, 3, 224, 224]").
    pub fn describe(&self) -> String {
        match self {
            Self::Text(t) => format!("text token ids {:?}", t.input_ids.shape()),
            Self::Image(x) => format!("image pixels {:?}", x.shape()),
            Self::Audio { features, .. } => format!("audio features {:?}", features.shape()),
            Self::Video(x) => format!("video frames {:?}", x.shape()),
            Self::Patches { patches, .. } => format!("image patches {:?}", patches.shape()),
        }
    }
}

/// What an encoder produces for a batch.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Token-level states `[B, T, D]` in the model dtype.
    pub hidden_states: Tensor,
    /// `[B, T]` u8: 1 where `hidden_states` holds a real token, 0 for padding.
    pub mask: Tensor,
    /// One vector per item `[B, D']` in the model dtype (`D'` is [`ModalityEncoder::output_dim`]).
    pub pooled: Tensor,
}

/// The processor an encoder's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    /// `TextProcessor` (tokenizer.json), truncating to `max_length` when set and
    /// padding every sequence to it when `pad_to_max_length` (SigLIP).
    Text {
        max_length: Option<usize>,
        pad_to_max_length: bool,
        /// The most tokens the model takes (its position table); texts are truncated
        /// to it even when the tokenizer allows more.
        max_tokens: Option<usize>,
    },
    /// `ImageProcessor` at this `(height, width)`.
    Image { height: usize, width: usize },
    /// `PatchProcessor` (NaFlex): `patch`-pixel patches, the grid chosen per image.
    Patches { patch: usize },
    /// `AudioProcessor` with this many mel bins and frames per chunk.
    Audio { n_mels: usize, frames: usize },
    /// `VideoProcessor` whose frames are `(height, width)`; `frames`: the clip length a
    /// native video model takes (its default sampler), `None` for per-frame models.
    Video {
        height: usize,
        width: usize,
        frames: Option<usize>,
    },
}

/// What an encoder is: its modality, widths, processor and placement.
#[derive(Debug, Clone)]
pub struct EncoderInfo {
    pub modality: Modality,
    /// The `model_type` it was loaded as (for messages and stats).
    pub model_type: String,
    /// Width `D` of `hidden_states`.
    pub hidden_size: usize,
    /// Width of `pooled`.
    pub output_dim: usize,
    /// The processor (and its geometry) the inputs must come from.
    pub processor: ProcessorKind,
    pub device: Device,
    pub dtype: DType,
}

/// How the pooled vectors of a long clip's chunks become the clip's one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkPooling {
    /// The mean over every real position of every chunk (for models whose pooled
    /// vector is the mean of their positions: Whisper, wav2vec 2.0).
    #[default]
    TokenMean,
    /// The mean of the chunks' own pooled vectors (models that pool leading tokens:
    /// AST).
    MeanOfChunks,
}

/// One modality's encoder: the extension point for new architectures. Implement it and
/// register a factory with [`register_encoder`] to make `Encoder::from_pretrained` load
/// your checkpoints.
pub trait ModalityEncoder: Send + Sync {
    /// What the encoder is; the accessors below read it.
    fn info(&self) -> &EncoderInfo;

    /// Encodes one batch. Implementations check the input's kind and shape and return
    /// [`MlmfError::Input`] naming the modality and what was expected.
    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput>;

    /// The modality it encodes.
    fn modality(&self) -> Modality {
        self.info().modality
    }

    /// The `model_type` it was loaded as.
    fn model_type(&self) -> &str {
        &self.info().model_type
    }

    /// Width `D` of `hidden_states`.
    fn hidden_size(&self) -> usize {
        self.info().hidden_size
    }

    /// Width of `pooled`.
    fn output_dim(&self) -> usize {
        self.info().output_dim
    }

    /// The processor the inputs must come from.
    fn processor(&self) -> ProcessorKind {
        self.info().processor
    }

    /// The device the weights live on.
    fn device(&self) -> &Device {
        &self.info().device
    }

    /// The dtype of the weights and outputs.
    fn dtype(&self) -> DType {
        self.info().dtype
    }

    /// How a long audio clip's chunks are pooled into one vector.
    fn chunk_pooling(&self) -> ChunkPooling {
        ChunkPooling::TokenMean
    }
}
