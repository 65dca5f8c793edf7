//! BERT and the encoders built like it, as transformers' `BertModel`, `RobertaModel`,
//! `XLMRobertaModel`, `DistilBertModel` and `MPNetModel`, and sentence-transformers
//! directories built on any of them.
//!
//! Embeddings (word + absolute position [+ token type], then layer norm), post-norm
//! encoder layers, key-padding mask. The family members differ in:
//! - tensor names (DistilBERT's `q_lin`/`sa_layer_norm`/`ffn.lin1`, MPNet's
//!   `attention.attn.q`), read from a table per family;
//! - position ids: BERT and DistilBERT count from 0; RoBERTa, XLM-R and MPNet count
//!   from `pad_token_id + 1` over the non-padding tokens and give padding tokens the
//!   position `pad_token_id`;
//! - token types: DistilBERT and MPNet have none;
//! - MPNet adds a relative-position bias to every layer's attention logits (32
//!   log-spaced buckets of signed distance, one learned value per head).
//!
//! `pooled` is:
//! - in a sentence-transformers directory (`modules.json`), what its Pooling module
//!   computes (`1_Pooling/config.json`: CLS, mean, max, mean-sqrt-len, last token; several
//!   modes are concatenated in sentence-transformers' order), L2-normalised when a
//!   Normalize module follows;
//! - otherwise the model's `pooler_output` (`tanh(W h_CLS + b)`), or the CLS state when
//!   the checkpoint has no pooler weights (DistilBERT never has).

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::inputs::{check_ids, text_batch, text_mask};
use crate::encoders::layers::{
    ce, embed, gather_rows, l2_normalize, load_layers, masked_mean, padding_bias, run_layers,
    Activation, AttentionNames, EncoderLayer, LayerNames, LayerNorm, Linear, Sizes, Weights,
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

/// The members of the BERT family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    /// RoBERTa and XLM-RoBERTa: BERT's layout, positions offset by the padding id.
    Roberta,
    DistilBert,
    MPNet,
}

impl Family {
    /// The `model_type`s each member is registered under.
    pub const MODEL_TYPES: [(&'static str, Family); 5] = [
        ("bert", Family::Bert),
        ("roberta", Family::Roberta),
        ("xlm-roberta", Family::Roberta),
        ("distilbert", Family::DistilBert),
        ("mpnet", Family::MPNet),
    ];

    fn layer_names(self) -> (&'static str, &'static LayerNames<'static>) {
        match self {
            Self::Bert | Self::Roberta => ("encoder.layer.", &LAYER),
            Self::DistilBert => ("transformer.layer.", &DISTILBERT_LAYER),
            Self::MPNet => ("encoder.layer.", &MPNET_LAYER),
        }
    }

    /// Whether positions count from `pad_token_id + 1` over non-padding tokens.
    fn offset_positions(self) -> bool {
        matches!(self, Self::Roberta | Self::MPNet)
    }

    fn has_token_types(self) -> bool {
        matches!(self, Self::Bert | Self::Roberta)
    }
}

/// MPNet's relative-position bias: `weight` `[buckets, heads]`.
#[derive(Debug, Clone)]
struct RelativeBias {
    weight: Tensor,
    buckets: usize,
}

/// `MPNetEncoder.relative_position_bucket` (max distance 128): the signed distance
/// `key - query` into `buckets` classes, half per direction, exact below a quarter of
/// the buckets and log-spaced beyond, computed in float32 as transformers does.
fn relative_bucket(relative: i64, buckets: i64) -> i64 {
    const MAX_DISTANCE: f64 = 128.0;
    let half = buckets / 2;
    let n = -relative;
    let mut bucket = if n < 0 { half } else { 0 };
    let n = n.abs();
    let exact = half / 2;
    if n < exact {
        bucket += n;
    } else {
        let denom = (MAX_DISTANCE / exact as f64).ln() as f32;
        let log = ((n as f32 / exact as f32).ln() / denom * (half - exact) as f32) as i64;
        bucket += (exact + log).min(half - 1);
    }
    bucket
}

impl RelativeBias {
    /// The bias `[1, heads, T, T]` for a sequence of `t` positions.
    fn forward(&self, t: usize) -> Result<Tensor> {
        let f = ce("relative position bias");
        let idx: Vec<u32> = (0..t as i64)
            .flat_map(|q| (0..t as i64).map(move |k| (q, k)))
            .map(|(q, k)| relative_bucket(k - q, self.buckets as i64) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, t * t, self.weight.device()).map_err(&f)?;
        let heads = self.weight.dim(1).map_err(&f)?;
        self.weight
            .index_select(&idx, 0)
            .and_then(|v| v.to_dtype(DType::F32))
            .and_then(|v| v.reshape((t, t, heads)))
            .and_then(|v| v.permute((2, 0, 1)))
            .and_then(|v| v.unsqueeze(0))
            .and_then(|v| v.contiguous())
            .map_err(f)
    }
}

/// A loaded BERT-family encoder.
pub struct Bert {
    family: Family,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    relative: Option<RelativeBias>,
    pooling: Pooling,
    vocab: usize,
    max_positions: usize,
    type_vocab: usize,
    pad_id: i64,
    info: EncoderInfo,
}

/// DistilBERT's layer tensor names (post-norm).
const DISTILBERT_LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "attention.q_lin",
        k: "attention.k_lin",
        v: "attention.v_lin",
        o: "attention.out_lin",
        k_bias: true,
    },
    norm1: "sa_layer_norm",
    fc1: "ffn.lin1",
    fc2: "ffn.lin2",
    norm2: "output_layer_norm",
    pre_norm: false,
};

/// MPNet's layer tensor names (post-norm).
const MPNET_LAYER: LayerNames<'static> = LayerNames {
    attention: AttentionNames {
        q: "attention.attn.q",
        k: "attention.attn.k",
        v: "attention.attn.v",
        o: "attention.attn.o",
        k_bias: true,
    },
    norm1: "attention.LayerNorm",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    norm2: "output.LayerNorm",
    pre_norm: false,
};

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

/// Loads a BERT-family checkpoint; the family comes from `model_type`.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Text])?;
    let ckpt = req.checkpoint;
    let model_type = ckpt.model_type().unwrap_or("bert");
    let cfg = Cfg::new(ckpt.config(), "");
    Ok(Box::new(load_tower(req, cfg, model_type, None)?))
}

/// A BERT-family text tower of `model_type` with the sizes in `cfg`, its weights under
/// `prefix` (found from the weight names when `None`): the text tower of a dual
/// checkpoint (CLAP's RoBERTa) as well as a checkpoint of its own.
pub(crate) fn load_tower(
    req: &LoadRequest<'_>,
    cfg: Cfg<'_>,
    model_type: &str,
    prefix: Option<&str>,
) -> Result<Bert> {
    let ckpt = req.checkpoint;
    let family = Family::MODEL_TYPES
        .iter()
        .find(|(t, _)| *t == model_type)
        .map_or(Family::Bert, |(_, f)| *f);
    let sizes = if family == Family::DistilBert {
        Sizes {
            hidden: cfg.size("dim", 768)?,
            layers: cfg.size("n_layers", 6)?,
            heads: cfg.size("n_heads", 12)?,
            inter: cfg.size("hidden_dim", 3072)?,
            eps: 1e-12,
            act: Activation::parse(cfg.string("activation", "gelu")?, &cfg.name("activation"))?,
        }
    } else {
        Sizes::read(cfg, (768, 12, 12, 3072, 1e-12, "gelu"))?
    };
    // The config classes' defaults: vocabulary, positions, padding id.
    let (vocab, max_positions, pad_default) = match family {
        Family::Bert | Family::DistilBert => (30522, 512, 0),
        Family::Roberta if model_type == "roberta" => (50265, 512, 1),
        Family::Roberta => (30522, 512, 1),
        Family::MPNet => (30527, 514, 1),
    };
    let vocab = cfg.size("vocab_size", vocab)?;
    let max_positions = cfg.size("max_position_embeddings", max_positions)?;
    let type_vocab = if family.has_token_types() {
        cfg.size("type_vocab_size", 2)?
    } else {
        0
    };
    let hidden = sizes.hidden;
    // transformers' MPNetEmbeddings fixes its padding index at 1 whatever the config
    // says; RoBERTa's follows pad_token_id.
    let pad_id = if family == Family::MPNet {
        1
    } else {
        cfg.id("pad_token_id")?.unwrap_or(pad_default)
    };
    if family.offset_positions() && (pad_id < 0 || pad_id as usize + 1 >= max_positions) {
        return Err(MlmfError::config(
            cfg.name("pad_token_id"),
            format!(
                "{pad_id} leaves no positions: positions count from pad_token_id + 1 and \
                 max_position_embeddings is {max_positions}"
            ),
        ));
    }
    if family != Family::DistilBert {
        let pos_kind = cfg.string("position_embedding_type", "absolute")?;
        if pos_kind != "absolute" {
            return Err(MlmfError::config(
                cfg.name("position_embedding_type"),
                format!("{pos_kind:?} is not supported; only \"absolute\""),
            ));
        }
    }
    let place = req.placement();
    let prefix = match prefix {
        Some(p) => p.to_string(),
        None => ckpt
            .find_prefix("embeddings.word_embeddings.weight")
            .ok_or_else(|| ckpt.error("weight `embeddings.word_embeddings.weight` is missing"))?,
    };
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let (layer_prefix, names) = family.layer_names();
    let layers = load_layers(w, &p(layer_prefix), names, &sizes)?;
    let relative = if family == Family::MPNet {
        let buckets = cfg.size("relative_attention_num_buckets", 32)?;
        Some(RelativeBias {
            weight: w.get(
                &p("encoder.relative_attention_bias.weight"),
                &[buckets, sizes.heads],
            )?,
            buckets,
        })
    } else {
        None
    };
    let pooling = match sentence_pooling(ckpt.dir(), hidden)? {
        Some(p) => p,
        None if w.contains(&p("pooler.dense.weight")) => {
            Pooling::Pooler(Linear::load(w, &p("pooler.dense"), hidden, hidden, true)?)
        }
        None => Pooling::Cls,
    };
    let token_type = if family.has_token_types() {
        Some(w.get(
            &p("embeddings.token_type_embeddings.weight"),
            &[type_vocab, hidden],
        )?)
    } else {
        None
    };
    Ok(Bert {
        family,
        word: w.get_table(&p("embeddings.word_embeddings.weight"), &[vocab, hidden])?,
        position: w.get(
            &p("embeddings.position_embeddings.weight"),
            &[max_positions, hidden],
        )?,
        token_type,
        emb_norm: LayerNorm::load(w, &p("embeddings.LayerNorm"), hidden, sizes.eps)?,
        layers,
        relative,
        vocab,
        max_positions,
        type_vocab,
        pad_id,
        info: place.info(
            Modality::Text,
            model_type,
            hidden,
            match &pooling {
                Pooling::Sentence { modes, .. } => hidden * modes.len(),
                _ => hidden,
            },
            ProcessorKind::Text {
                max_length: None,
                pad_to_max_length: false,
                max_tokens: Some(if family.offset_positions() {
                    max_positions - pad_id as usize - 1
                } else {
                    max_positions
                }),
            },
        ),
        pooling,
    })
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
        // Offset positions reach pad_token_id + T.
        let limit = if self.family.offset_positions() {
            self.max_positions - self.pad_id as usize - 1
        } else {
            self.max_positions
        };
        let batch = text_batch(input, self.vocab, limit)?;
        let (b, t) = batch.input_ids.dim();
        let dev = &self.info.device;
        let mask = text_mask(batch, dev)?;
        let f = ce("bert embeddings");
        // Real tokens per row, counted on the host (as `text_mask` reads the mask).
        let lengths: Vec<usize> = if batch.attention_mask.dim() == (b, t) {
            batch
                .attention_mask
                .rows()
                .into_iter()
                .map(|r| r.iter().filter(|&&v| v != 0).count())
                .collect()
        } else {
            vec![t; b]
        };
        let mut x = embed(&self.word, &batch.input_ids, dev)?;
        x = if self.family.offset_positions() {
            // transformers' create_position_ids_from_input_ids: padding tokens sit at
            // pad_token_id, the others count on from it.
            let pad = self.pad_id;
            let mut ids = ndarray::Array2::<i64>::from_elem((b, t), pad);
            for (row, src) in ids.rows_mut().into_iter().zip(batch.input_ids.rows()) {
                let mut count = 0;
                for (p, &id) in row.into_iter().zip(src) {
                    if id != pad {
                        count += 1;
                        *p = pad + count;
                    }
                }
            }
            x.add(&embed(&self.position, &ids, dev)?).map_err(&f)?
        } else {
            let positions = self
                .position
                .narrow(0, 0, t)
                .and_then(|p| p.unsqueeze(0))
                .map_err(&f)?;
            x.broadcast_add(&positions).map_err(&f)?
        };
        if let Some(table) = &self.token_type {
            let types = if batch.token_type_ids.dim() == (b, t) {
                batch.token_type_ids.clone()
            } else {
                ndarray::Array2::zeros((b, t))
            };
            check_ids(&types, self.type_vocab, "token type id")?;
            x = x.add(&embed(table, &types, dev)?).map_err(&f)?;
        }
        let x = self.emb_norm.forward(&x)?;
        let mut bias = padding_bias(&mask)?;
        if let Some(relative) = &self.relative {
            bias = bias.broadcast_add(&relative.forward(t)?).map_err(&f)?;
        }
        let hidden = run_layers(&self.layers, x, &Some(bias))?;
        let pooled = self.pool(&hidden, &mask, &lengths)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn relative_buckets_are_exact_near_and_logarithmic_far() {
        // 32 buckets: 16 per direction, exact below 8, log-spaced up to 128.
        assert_eq!(relative_bucket(0, 32), 0);
        assert_eq!(relative_bucket(-3, 32), 3);
        assert_eq!(relative_bucket(3, 32), 19);
        // 8 * 16^(k/8) starts bucket 8 + k: 16 -> 10, 32 -> 12, 64 -> 14.
        assert_eq!(relative_bucket(-15, 32), 9);
        assert_eq!(relative_bucket(-16, 32), 10);
        assert_eq!(relative_bucket(-64, 32), 14);
        assert_eq!(relative_bucket(-127, 32), 15);
        assert_eq!(relative_bucket(-1000, 32), 15);
        assert_eq!(relative_bucket(1000, 32), 31);
    }
}
