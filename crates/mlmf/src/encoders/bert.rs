//! BERT (`model_type: bert`), as transformers' `BertModel`, and sentence-transformers
//! directories built on it.
//!
//! Embeddings (word + absolute position + token type, then layer norm), post-norm
//! encoder layers with exact GELU, key-padding mask. `pooled` is:
//! - in a sentence-transformers directory (`modules.json`), what its Pooling module
//!   computes (`1_Pooling/config.json`: CLS, mean, max, mean-sqrt-len, last token; several
//!   modes are concatenated in sentence-transformers' order), L2-normalised when a
//!   Normalize module follows;
//! - otherwise `BertModel`'s `pooler_output` (`tanh(W h_CLS + b)`), or the CLS state when
//!   the checkpoint has no pooler weights.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::inputs::{check_ids, text_batch, text_mask};
use crate::encoders::layers::{
    ce, embed, gather_rows, l2_normalize, load_layers, masked_mean, padding_bias, run_layers,
    AttentionNames, EncoderLayer, LayerNames, LayerNorm, Linear, Sizes, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A sentence-transformers pooling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cls,
    Max,
    Mean,
    MeanSqrtLen,
    LastToken,
}

#[derive(Debug, Clone)]
enum Pooling {
    /// `BertModel.pooler` on the CLS state.
    Pooler(Linear),
    /// The CLS state itself.
    Cls,
    /// sentence-transformers' Pooling (+ Normalize).
    Sentence { modes: Vec<Mode>, normalize: bool },
}

/// A loaded BERT encoder.
pub struct Bert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    pooling: Pooling,
    vocab: usize,
    max_positions: usize,
    type_vocab: usize,
    info: EncoderInfo,
}

/// BERT's layer tensor names (post-norm).
const LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "attention.self.query",
        k: "attention.self.key",
        v: "attention.self.value",
        o: "attention.output.dense",
        k_bias: true,
    },
    norm1: "attention.output.LayerNorm",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    norm2: "output.LayerNorm",
    pre_norm: false,
};

/// `sentence_bert_config.json`'s `max_seq_length`, which sentence-transformers
/// truncates to (instead of the tokenizer's `model_max_length`).
pub fn sentence_max_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

/// Reads `modules.json` and the Pooling module's config; `None` without `modules.json`.
fn sentence_pooling(dir: &Path, hidden: usize) -> Result<Option<Pooling>> {
    let path = dir.join("modules.json");
    if !path.is_file() {
        return Ok(None);
    }
    let what = "sentence-transformers modules";
    let text = std::fs::read_to_string(&path)
        .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
    let modules: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| MlmfError::model_load(what, &path, format!("invalid JSON: {e}")))?;
    let mut modes = None;
    let mut normalize = false;
    for m in &modules {
        let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let short = kind.rsplit('.').next().unwrap_or(kind);
        match short {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let sub = m.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let cfg_path = dir.join(sub).join("config.json");
                let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
                    MlmfError::model_load("pooling config", &cfg_path, e.to_string())
                })?;
                let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    MlmfError::model_load("pooling config", &cfg_path, format!("invalid JSON: {e}"))
                })?;
                if let Some(d) = cfg.get("word_embedding_dimension").and_then(|d| d.as_u64()) {
                    if d as usize != hidden {
                        return Err(MlmfError::model_load(
                            "pooling config",
                            &cfg_path,
                            format!("word_embedding_dimension is {d}, the model's hidden size is {hidden}"),
                        ));
                    }
                }
                let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                if on("pooling_mode_weightedmean_tokens") {
                    return Err(MlmfError::model_load(
                        "pooling config",
                        &cfg_path,
                        "pooling_mode_weightedmean_tokens is not supported; supported modes: \
                         cls_token, max_tokens, mean_tokens, mean_sqrt_len_tokens, lasttoken",
                    ));
                }
                // sentence-transformers concatenates the modes in this order.
                let list: Vec<Mode> = [
                    ("pooling_mode_cls_token", Mode::Cls),
                    ("pooling_mode_max_tokens", Mode::Max),
                    ("pooling_mode_mean_tokens", Mode::Mean),
                    ("pooling_mode_mean_sqrt_len_tokens", Mode::MeanSqrtLen),
                    ("pooling_mode_lasttoken", Mode::LastToken),
                ]
                .into_iter()
                .filter(|(k, _)| on(k))
                .map(|(_, m)| m)
                .collect();
                if list.is_empty() {
                    return Err(MlmfError::model_load(
                        "pooling config",
                        &cfg_path,
                        "no pooling mode is enabled",
                    ));
                }
                modes = Some(list);
            }
            _ => {
                return Err(MlmfError::model_load(
                    what,
                    &path,
                    format!(
                        "module type {kind:?} is not supported; supported: Transformer, \
                         Pooling, Normalize"
                    ),
                ))
            }
        }
    }
    let modes = modes.ok_or_else(|| {
        MlmfError::model_load(what, &path, "modules.json lists no Pooling module")
    })?;
    Ok(Some(Pooling::Sentence { modes, normalize }))
}

/// Loads a BERT checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Text])?;
    let ckpt = req.checkpoint;
    let cfg = Cfg::new(ckpt.config(), "");
    let sizes = Sizes::read(cfg, (768, 12, 12, 3072, 1e-12, "gelu"))?;
    let hidden = sizes.hidden;
    let vocab = cfg.size("vocab_size", 30522)?;
    let max_positions = cfg.size("max_position_embeddings", 512)?;
    let type_vocab = cfg.size("type_vocab_size", 2)?;
    let pos_kind = cfg.string("position_embedding_type", "absolute")?;
    if pos_kind != "absolute" {
        return Err(MlmfError::config(
            cfg.name("position_embedding_type"),
            format!("{pos_kind:?} is not supported; only \"absolute\""),
        ));
    }
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.word_embeddings.weight")
        .ok_or_else(|| ckpt.error("weight `embeddings.word_embeddings.weight` is missing"))?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let layers = load_layers(w, &p("encoder.layer."), &LAYER, &sizes)?;
    let pooling = match sentence_pooling(ckpt.dir(), hidden)? {
        Some(p) => p,
        None if w.contains(&p("pooler.dense.weight")) => {
            Pooling::Pooler(Linear::load(w, &p("pooler.dense"), hidden, hidden, true)?)
        }
        None => Pooling::Cls,
    };
    Ok(Box::new(Bert {
        word: w.get(&p("embeddings.word_embeddings.weight"), &[vocab, hidden])?,
        position: w.get(
            &p("embeddings.position_embeddings.weight"),
            &[max_positions, hidden],
        )?,
        token_type: w.get(
            &p("embeddings.token_type_embeddings.weight"),
            &[type_vocab, hidden],
        )?,
        emb_norm: LayerNorm::load(w, &p("embeddings.LayerNorm"), hidden, sizes.eps)?,
        layers,
        vocab,
        max_positions,
        type_vocab,
        info: place.info(
            Modality::Text,
            "bert",
            hidden,
            match &pooling {
                Pooling::Sentence { modes, .. } => hidden * modes.len(),
                _ => hidden,
            },
            ProcessorKind::Text {
                max_length: None,
                pad_to_max_length: false,
            },
        ),
        pooling,
    }))
}

impl Bert {
    fn pool(&self, hidden: &Tensor, mask: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let f = ce("pooling");
        let cls = || {
            hidden
                .narrow(1, 0, 1)
                .and_then(|x| x.squeeze(1))
                .map_err(&f)
        };
        match &self.pooling {
            Pooling::Cls => cls(),
            Pooling::Pooler(dense) => dense.forward(&cls()?)?.tanh().map_err(&f),
            Pooling::Sentence { modes, normalize } => {
                let mut parts = Vec::with_capacity(modes.len());
                for m in modes {
                    parts.push(match m {
                        Mode::Cls => cls()?,
                        Mode::Mean => masked_mean(hidden, mask)?,
                        Mode::MeanSqrtLen => {
                            let mean = masked_mean(hidden, mask)?;
                            let scale: Vec<f32> =
                                lengths.iter().map(|&n| (n.max(1) as f32).sqrt()).collect();
                            let b = lengths.len();
                            // sum / sqrt(n) = mean * n / sqrt(n) = mean * sqrt(n)
                            let s = Tensor::from_vec(scale, (b, 1), hidden.device())
                                .and_then(|s| s.to_dtype(hidden.dtype()))
                                .map_err(&f)?;
                            mean.broadcast_mul(&s).map_err(&f)?
                        }
                        Mode::Max => {
                            let dtype = hidden.dtype();
                            let h = hidden.to_dtype(DType::F32).map_err(&f)?;
                            let m = mask
                                .to_dtype(DType::F32)
                                .and_then(|m| m.unsqueeze(2))
                                .map_err(&f)?;
                            // masked positions -> -1e9, as sentence-transformers does
                            let fill = m.affine(1e9, -1e9).map_err(&f)?;
                            h.broadcast_mul(&m)
                                .and_then(|h| h.broadcast_add(&fill))
                                .and_then(|h| h.max(1))
                                .and_then(|h| h.to_dtype(dtype))
                                .map_err(&f)?
                        }
                        Mode::LastToken => {
                            let last: Vec<usize> =
                                lengths.iter().map(|&n| n.saturating_sub(1)).collect();
                            gather_rows(hidden, &last)?
                        }
                    });
                }
                let pooled = Tensor::cat(&parts, 1).map_err(&f)?;
                if *normalize {
                    l2_normalize(&pooled)
                } else {
                    Ok(pooled)
                }
            }
        }
    }
}

impl ModalityEncoder for Bert {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let batch = text_batch(input, self.vocab, self.max_positions)?;
        let (b, t) = batch.input_ids.dim();
        let types = if batch.token_type_ids.dim() == (b, t) {
            batch.token_type_ids.clone()
        } else {
            ndarray::Array2::zeros((b, t))
        };
        check_ids(&types, self.type_vocab, "token type id")?;
        let dev = &self.info.device;
        let mask = text_mask(batch, dev)?;
        let f = ce("bert embeddings");
        let lengths: Vec<usize> = mask
            .to_dtype(DType::U32)
            .and_then(|m| m.sum(1))
            .and_then(|m| m.to_vec1::<u32>())
            .map_err(&f)?
            .into_iter()
            .map(|n| n as usize)
            .collect();
        let positions = self
            .position
            .narrow(0, 0, t)
            .and_then(|p| p.unsqueeze(0))
            .map_err(&f)?;
        let x = embed(&self.word, &batch.input_ids, dev)?
            .broadcast_add(&positions)
            .map_err(&f)?
            .add(&embed(&self.token_type, &types, dev)?)
            .map_err(&f)?;
        let x = self.emb_norm.forward(&x)?;
        let bias = Some(padding_bias(&mask)?);
        let hidden = run_layers(&self.layers, x, &bias)?;
        let pooled = self.pool(&hidden, &mask, &lengths)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}
