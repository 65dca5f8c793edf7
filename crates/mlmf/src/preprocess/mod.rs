//! Raw media -> model-ready arrays, one module per modality.
//!
//! | module  | input                                   | output                                  |
//! |---------|-----------------------------------------|-----------------------------------------|
//! | `text`  | strings                                 | `input_ids`, `attention_mask`, `token_type_ids`: int64 `[B, T]` |
//! | `image` | path, encoded bytes, uint8 `HW`/`HWC`   | float32 `[B, 3, H, W]`                  |
//! | `audio` | path, encoded bytes, float32 samples    | float32 `[N, n_mels, frames]` + chunks per input |
//! | `video` | animated GIF/WebP, image folder, uint8 `[T, H, W, C]` | float32 `[B, T, 3, H, W]` (or windows `[B, W, K, 3, H, W]`) |
//!
//! Every processor takes a whole batch, works on its items in parallel (rayon) and
//! reports a failing item as an error carrying its modality and batch index.

pub mod audio;
mod from_config;
pub mod image;
mod share;
pub mod text;
mod text_family;
mod text_limit;
pub mod video;

use std::borrow::Cow;
use std::path::PathBuf;

pub use from_config::Preprocessors;

use crate::error::{read_file, Result};
use crate::modality::Modality;

/// The extension point every modality's processor implements.
pub trait Processor: Send + Sync {
    /// One raw item.
    type Input: Send + Sync;
    /// The batched result.
    type Output;

    /// The modality this processor prepares.
    fn modality(&self) -> Modality;

    /// Processes a whole batch. Errors name the failing item's index.
    fn process(&self, inputs: &[Self::Input]) -> Result<Self::Output>;
}

/// Encoded media: a file on disk or its bytes in memory.
#[derive(Debug, Clone)]
pub enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

impl Source {
    /// The encoded bytes (read from disk for `Path`).
    pub fn bytes(&self, modality: Modality) -> Result<Cow<'_, [u8]>> {
        match self {
            Source::Path(p) => read_file(modality, p).map(Cow::Owned),
            Source::Bytes(b) => Ok(Cow::Borrowed(b)),
        }
    }
}
