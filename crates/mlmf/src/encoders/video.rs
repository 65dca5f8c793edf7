//! Video as an image encoder applied to every frame, pooled over time.
//!
//! Frames `[B, T, 3, H, W]` are encoded as one image batch of `B * T`; each frame's
//! pooled vector becomes a token of the video. With [`VideoPooling::Mean`] the tokens
//! are the frames (`hidden_states [B, T, D]`) and pooled is their mean; with
//! [`VideoPooling::Window`] consecutive frames are first averaged in windows of `size`
//! (`hidden_states [B, ceil(T / size), D]`, a shorter last window averaging what it has)
//! and pooled is the mean over all frames.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use ndarray::{Array4, Array5};

use crate::encoders::inputs::{full_mask, wrong_input};
use crate::encoders::layers::ce;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// How frame vectors are pooled over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoPooling {
    /// One token per frame; pooled is the mean over frames.
    #[default]
    Mean,
    /// One token per window of `size` consecutive frames (their mean).
    Window { size: usize },
}

impl FromStr for VideoPooling {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "mean" {
            return Ok(Self::Mean);
        }
        if let Some(n) = s.strip_prefix("window:") {
            if let Ok(size) = n.trim().parse::<usize>() {
                if size >= 1 {
                    return Ok(Self::Window { size });
                }
            }
        }
        Err(MlmfError::config(
            "video_pooling",
            format!("unknown video pooling {s:?}: expected \"mean\" or \"window:N\" (N >= 1)"),
        ))
    }
}

impl fmt::Display for VideoPooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mean => f.write_str("mean"),
            Self::Window { size } => write!(f, "window:{size}"),
        }
    }
}

/// Clips `[B, T, C, H, W]` as one batch of images `[B * T, C, H, W]`, clip by clip.
pub(crate) fn frames_as_images(frames: &Array5<f32>) -> Result<Array4<f32>> {
    let s = frames.shape();
    let shape = (s[0] * s[1], s[2], s[3], s[4]);
    frames
        .view()
        .into_shape_with_order(shape)
        .map(|v| v.to_owned())
        .or_else(|_| {
            frames
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order(shape)
        })
        .map_err(|e| MlmfError::Internal(format!("video frames: {e}")))
}

/// An image encoder run per frame.
pub struct FrameEncoder {
    image: Box<dyn ModalityEncoder>,
    pooling: VideoPooling,
    info: EncoderInfo,
}

impl FrameEncoder {
    /// Wraps an image encoder; errors if `image` encodes another modality.
    pub fn new(image: Box<dyn ModalityEncoder>, pooling: VideoPooling) -> Result<Self> {
        if image.modality() != Modality::Image {
            return Err(MlmfError::config(
                "modality",
                format!(
                    "a video encoder needs an image encoder per frame, got a {} encoder ({})",
                    image.modality(),
                    image.model_type()
                ),
            ));
        }
        let img = image.info();
        if matches!(img.processor, ProcessorKind::Patches { .. }) {
            return Err(MlmfError::input(
                Modality::Video,
                format!(
                    "a {} image encoder takes variable-resolution patches; video runs an \
                     image encoder of fixed input size per frame",
                    image.model_type()
                ),
            ));
        }
        let info = EncoderInfo {
            modality: Modality::Video,
            hidden_size: img.output_dim,
            processor: match img.processor {
                ProcessorKind::Image { height, width } => ProcessorKind::Video {
                    height,
                    width,
                    frames: None,
                },
                other => other,
            },
            ..img.clone()
        };
        Ok(Self {
            image,
            pooling,
            info,
        })
    }

    /// The temporal pooling.
    pub fn pooling(&self) -> VideoPooling {
        self.pooling
    }
}

impl ModalityEncoder for FrameEncoder {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let EncoderInput::Video(frames) = input else {
            return Err(wrong_input(
                Modality::Video,
                "video frames [B, T, 3, H, W]",
                input,
            ));
        };
        let s = frames.shape();
        let (b, t) = (s[0], s[1]);
        if b == 0 || t == 0 {
            return Err(MlmfError::input(
                Modality::Video,
                format!("expected at least one video with at least one frame, got shape {s:?}"),
            ));
        }
        let flat = frames_as_images(frames)?;
        let out = self
            .image
            .encode(&EncoderInput::Image(flat))
            .map_err(|e| match e {
                MlmfError::Input { message, .. } => MlmfError::input(Modality::Video, message),
                other => other,
            })?;
        let f = ce("video pooling");
        let d = self.image.output_dim();
        let per_frame = out.pooled.reshape((b, t, d)).map_err(&f)?;
        let pooled = per_frame
            .to_dtype(DType::F32)
            .and_then(|x| x.mean(1))
            .and_then(|x| x.to_dtype(per_frame.dtype()))
            .map_err(&f)?;
        let tokens = match self.pooling {
            VideoPooling::Mean => per_frame,
            VideoPooling::Window { size } => {
                let windows = (0..t)
                    .step_by(size)
                    .map(|start| {
                        let len = size.min(t - start);
                        per_frame
                            .narrow(1, start, len)?
                            .to_dtype(DType::F32)?
                            .mean_keepdim(1)?
                            .to_dtype(per_frame.dtype())
                    })
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(&f)?;
                Tensor::cat(&windows, 1).map_err(&f)?
            }
        };
        let n = tokens.dim(1).map_err(&f)?;
        Ok(EncoderOutput {
            mask: full_mask(b, n, self.image.device())?,
            hidden_states: tokens,
            pooled,
        })
    }
}
