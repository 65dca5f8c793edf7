//! Which [`ModalityEncoder`] loads a checkpoint: a table from `config.json`'s
//! `model_type` to a factory. The built-in architectures are registered on first use;
//! [`register_encoder`] adds (or overrides) one, which is how a user plugs in an
//! architecture of their own, from Rust or (through the bindings) from Python.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::Device;

use crate::encoders::checkpoint::Checkpoint;
use crate::encoders::{
    ast, bert, clap, clip, qwen3, siglip, siglip2, videomae, vit, wav2vec2, whisper, xclip,
    ModalityEncoder, Precision,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// What a factory is asked to load.
pub struct LoadRequest<'a> {
    pub checkpoint: &'a Checkpoint,
    /// The modality the caller asked for (`None`: the checkpoint's natural one; dual
    /// models such as CLIP then default to their image tower).
    pub modality: Option<Modality>,
    pub device: Device,
    pub precision: Precision,
    /// Weight bytes loaded (see [`crate::encoders::layers::Placement::bytes`]).
    pub(crate) bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Receives the names of the linear weights an int8 load quantises
    /// ([`crate::quant`] asks which weights are linear maps).
    pub(crate) record: Option<crate::encoders::layers::Record>,
}

impl LoadRequest<'_> {
    /// The requested device and dtype.
    pub(crate) fn placement(&self) -> crate::encoders::layers::Placement {
        crate::encoders::layers::Placement {
            device: self.device.clone(),
            dtype: self.precision.compute_dtype(&self.device),
            precision: self.precision,
            bytes: self.bytes.clone(),
            record: self.record.clone(),
        }
    }

    /// The error for asking a single-modality checkpoint for another modality.
    pub fn check_modality(&self, supported: &[Modality]) -> Result<Modality> {
        match self.modality {
            None => supported
                .first()
                .copied()
                .ok_or_else(|| MlmfError::Internal("encoder supports no modality".into())),
            Some(m) if supported.contains(&m) => Ok(m),
            Some(m) => Err(MlmfError::model_load(
                "encoder",
                self.checkpoint.dir(),
                format!(
                    "a {} checkpoint encodes {}, not {m}",
                    self.checkpoint.model_type().unwrap_or("?"),
                    supported
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )),
        }
    }
}

/// Builds an encoder from a checkpoint.
pub type EncoderFactory =
    Arc<dyn Fn(&LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> + Send + Sync>;

fn table() -> &'static RwLock<BTreeMap<String, EncoderFactory>> {
    static TABLE: OnceLock<RwLock<BTreeMap<String, EncoderFactory>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: BTreeMap<String, EncoderFactory> = BTreeMap::new();
        let mut add = |names: &[&str], f: EncoderFactory| {
            for n in names {
                t.insert((*n).to_string(), f.clone());
            }
        };
        let family: Vec<&str> = bert::Family::MODEL_TYPES.iter().map(|(t, _)| *t).collect();
        add(&family, Arc::new(bert::load));
        add(
            &["clip", "clip_vision_model", "clip_text_model"],
            Arc::new(clip::load),
        );
        add(
            &["siglip", "siglip_vision_model", "siglip_text_model"],
            Arc::new(siglip::load),
        );
        add(
            &["siglip2", "siglip2_vision_model", "siglip2_text_model"],
            Arc::new(siglip2::load),
        );
        add(&["vit"], Arc::new(vit::load));
        add(&["videomae"], Arc::new(videomae::load));
        add(&["qwen3"], Arc::new(qwen3::load));
        add(&["whisper"], Arc::new(whisper::load));
        add(&["wav2vec2", "hubert"], Arc::new(wav2vec2::load));
        add(&["audio-spectrogram-transformer"], Arc::new(ast::load));
        add(&["clap"], Arc::new(clap::load));
        add(&["xclip"], Arc::new(xclip::load));
        RwLock::new(t)
    })
}

/// Registers `factory` for checkpoints whose `config.json` says `model_type`,
/// replacing any earlier one (built-ins included).
pub fn register_encoder(model_type: impl Into<String>, factory: EncoderFactory) {
    if let Ok(mut t) = table().write() {
        t.insert(model_type.into(), factory);
    }
}

/// The `model_type`s that can be loaded, sorted.
pub fn supported_model_types() -> Vec<String> {
    table()
        .read()
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// `model_type` from `config.json`, or guessed from `architectures` for configs that
/// lack it (old checkpoints).
fn model_type_of(ckpt: &Checkpoint) -> Result<String> {
    if let Some(t) = ckpt.model_type() {
        return Ok(t.to_string());
    }
    let guesses = [
        ("Bert", "bert"),
        ("XLMRoberta", "xlm-roberta"),
        ("Roberta", "roberta"),
        ("DistilBert", "distilbert"),
        ("MPNet", "mpnet"),
        ("ClapModel", "clap"),
        ("CLIPVision", "clip_vision_model"),
        ("CLIPText", "clip_text_model"),
        ("CLIP", "clip"),
        ("Siglip2Vision", "siglip2_vision_model"),
        ("Siglip2Text", "siglip2_text_model"),
        ("Siglip2", "siglip2"),
        ("SiglipVision", "siglip_vision_model"),
        ("SiglipText", "siglip_text_model"),
        ("Siglip", "siglip"),
        ("ViT", "vit"),
        ("VideoMAE", "videomae"),
        ("Whisper", "whisper"),
        ("Wav2Vec2", "wav2vec2"),
        ("Hubert", "hubert"),
        ("ASTFor", "audio-spectrogram-transformer"),
        ("ASTModel", "audio-spectrogram-transformer"),
        ("Qwen3", "qwen3"),
    ];
    for arch in ckpt.architectures() {
        if let Some((_, t)) = guesses.iter().find(|(p, _)| arch.starts_with(p)) {
            return Ok((*t).to_string());
        }
    }
    Err(ckpt.error(
        "config.json has no `model_type` (and no `architectures` entry that names a \
         supported model)",
    ))
}

/// Loads the encoder `request.checkpoint` describes.
pub fn load(request: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    let model_type = model_type_of(request.checkpoint)?;
    let factory = table()
        .read()
        .map_err(|_| MlmfError::Internal("encoder registry lock poisoned".into()))?
        .get(&model_type)
        .cloned();
    match factory {
        Some(f) => f(request),
        None => Err(request.checkpoint.error(format!(
            "unsupported model_type {model_type:?}; supported: {} (or register your own \
             with register_encoder)",
            supported_model_types().join(", ")
        ))),
    }
}
