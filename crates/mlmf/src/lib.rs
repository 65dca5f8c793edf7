//! mlmf: a multimodal inference framework.
//!
//! The core turns raw media (text, image files, audio files, video) into model-ready
//! tensors, and (in later layers) into per-modality embeddings and a fused embedding.
//! Everything here is plain Rust; the Python bindings live in `python/` behind the
//! `python` feature.

pub mod adapters;
pub mod aligned;
pub mod attention;
#[doc(hidden)]
pub mod bench;
pub mod cache;
pub mod config;
pub mod device;
pub mod encoders;
pub mod error;
pub mod fusion;
pub(crate) mod kernels;
pub mod loader;
pub mod modality;
pub mod model;
mod pool;
pub mod preprocess;
pub mod quant;
#[cfg(feature = "serve")]
pub mod serve;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use error::{MlmfError, Result};
pub use loader::MultiModalLoader;
pub use modality::Modality;
pub use model::{MultiModalInput, MultiModalModel, MultiModalOutput};

/// The crate version, shared with the Python package.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
