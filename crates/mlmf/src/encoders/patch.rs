//! The input side of the vision transformers (CLIP, SigLIP, ViT): image geometry from
//! the config, and the patch embedding that turns checked pixels `[B, C, H, W]` into
//! tokens `[B, T, D]` (patches, an optional class token first, plus learned positions).

use candle_core::Tensor;

use crate::encoders::config::Cfg;
use crate::encoders::inputs::pixels_tensor;
use crate::encoders::layers::{ce, load_patch_embedding, patchify, Linear, Placement, Weights};
use crate::encoders::{EncoderInput, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Square images of `image_size` cut into `patch_size` patches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
}

impl Geometry {
    /// `image_size`, `patch_size`, `num_channels` of `cfg`, with defaults.
    pub fn read(cfg: Cfg<'_>, image_size: usize, patch_size: usize) -> Result<Self> {
        let g = Self {
            image_size: cfg.size("image_size", image_size)?,
            patch_size: cfg.size("patch_size", patch_size)?,
            channels: cfg.size("num_channels", 3)?,
        };
        if !g.image_size.is_multiple_of(g.patch_size) {
            return Err(MlmfError::config(
                cfg.name("image_size"),
                format!(
                    "{} is not a multiple of patch_size {}",
                    g.image_size, g.patch_size
                ),
            ));
        }
        Ok(g)
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The image processor output this geometry takes.
    pub fn processor(&self) -> ProcessorKind {
        ProcessorKind::Image {
            height: self.image_size,
            width: self.image_size,
        }
    }
}

/// Where a checkpoint keeps the pieces of its patch embedding.
pub(crate) struct PatchNames<'a> {
    /// The `[D, C, P, P]` convolution.
    pub projection: &'a str,
    pub projection_bias: bool,
    /// The class token (any shape holding `D` values), if the model has one.
    pub class: Option<&'a str>,
    /// The learned positions and their stored shape (`[T, D]` or `[1, T, D]`).
    pub position: &'a str,
    pub position_batched: bool,
}

/// Patches -> tokens.
pub(crate) struct PatchEmbedding {
    geometry: Geometry,
    projection: Linear,
    /// `[1, 1, D]`.
    class: Option<Tensor>,
    /// `[1, T, D]`.
    position: Tensor,
    hidden: usize,
}

impl PatchEmbedding {
    pub fn load(
        w: Weights<'_>,
        names: &PatchNames<'_>,
        geometry: Geometry,
        hidden: usize,
    ) -> Result<Self> {
        let f = ce("patch embedding");
        let class = match names.class {
            Some(name) => {
                let shape: &[usize] = if names.position_batched {
                    &[1, 1, hidden]
                } else {
                    &[hidden]
                };
                Some(w.get(name, shape)?.reshape((1, 1, hidden)).map_err(&f)?)
            }
            None => None,
        };
        let tokens = geometry.patches() + usize::from(class.is_some());
        let position = if names.position_batched {
            w.get(names.position, &[1, tokens, hidden])?
        } else {
            w.get(names.position, &[tokens, hidden])?
                .unsqueeze(0)
                .map_err(&f)?
        };
        Ok(Self {
            geometry,
            projection: load_patch_embedding(
                w,
                names.projection,
                hidden,
                geometry.channels,
                geometry.patch_size,
                names.projection_bias,
            )?,
            class,
            position,
            hidden,
        })
    }

    /// Checks `input` holds pixels of this geometry and embeds them: `[B, T, D]`.
    pub fn forward(&self, input: &EncoderInput, place: &Placement) -> Result<Tensor> {
        let g = &self.geometry;
        let px = pixels_tensor(input, g.channels, g.image_size, place, Modality::Image)?;
        let f = ce("patch embedding");
        let patches = self.projection.forward(&patchify(&px, g.patch_size)?)?;
        let x = match &self.class {
            Some(class) => {
                let b = px.dim(0).map_err(&f)?;
                let class = class.broadcast_as((b, 1, self.hidden)).map_err(&f)?;
                Tensor::cat(&[&class, &patches], 1).map_err(&f)?
            }
            None => patches,
        };
        x.broadcast_add(&self.position).map_err(f)
    }
}
