//! Text: strings -> token ids with the checkpoint's own `tokenizer.json`.
//!
//! Output: `input_ids`, `attention_mask`, `token_type_ids`, each int64 `[B, T]`.
//!
//! Padding and truncation follow what transformers' fast tokenizers do for
//! `tok(texts, padding=..., truncation=..., max_length=...)`: the settings stored in
//! tokenizer.json are replaced by the call's, the pad token comes from
//! tokenizer_config.json / special_tokens_map.json, and `truncation` without a
//! `max_length` means the tokenizer's `model_max_length`. The ids are those of the HF
//! `tokenizers` library itself, so they equal the Python package's exactly. Where a
//! family's reference tokenizes differently from its shipped tokenizer.json (SigLIP 2
//! lower-cases), the pipeline is rewritten as the reference builds it
//! ([`super::text_family`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use ndarray::Array2;
use serde::{Deserialize, Serialize};
use tokenizers::{
    EncodeInput, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::text_family::TextFamily;
pub use crate::preprocess::text_limit::DEFAULT_MAX_INPUT_BYTES;
use crate::preprocess::text_limit::{cut_point, splits_at_spaces};
use crate::preprocess::Processor;

/// transformers treats a `model_max_length` at or above this as "no limit".
const UNBOUNDED_MAX_LENGTH: u64 = 1 << 40;

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Pad to the longest sequence of the batch.
    Longest,
    /// Pad every sequence to `max_length` (or the tokenizer's `model_max_length`).
    MaxLength,
    /// No padding: every sequence must then have the same length to form a batch.
    DoNotPad,
}

impl FromStr for Padding {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "longest" | "true" => Ok(Self::Longest),
            "max_length" => Ok(Self::MaxLength),
            "do_not_pad" | "false" => Ok(Self::DoNotPad),
            other => Err(MlmfError::config(
                "padding",
                format!("unknown padding {other:?}: expected longest, max_length or do_not_pad"),
            )),
        }
    }
}

/// Settings of a [`TextProcessor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextProcessorConfig {
    /// Truncation / `max_length` padding length; `None` means the tokenizer's
    /// `model_max_length`.
    pub max_length: Option<usize>,
    pub padding: Padding,
    /// Cut sequences longer than the maximum length (from the right, or as
    /// `truncation_side` in tokenizer_config.json says).
    pub truncation: bool,
    /// Add the tokenizer's special tokens (`[CLS] ... [SEP]`, `<|startoftext|> ...`).
    pub add_special_tokens: bool,
    /// Longest text (UTF-8 bytes) tokenised whole; a longer one is cut before
    /// tokenising when that gives the same ids, else refused (`text_limit.rs`).
    pub max_input_bytes: usize,
    /// Put before every text (not before the second text of a pair): an
    /// instruction, as Qwen3-Embedding's queries take
    /// (`"Instruct: {task}\nQuery:"`), or E5's `"query: "`. Empty by default, and
    /// then left out of the serialised settings (cache keys stay as they were).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl Default for TextProcessorConfig {
    fn default() -> Self {
        Self {
            max_length: None,
            padding: Padding::Longest,
            truncation: true,
            add_special_tokens: true,
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            prefix: String::new(),
        }
    }
}

impl TextProcessorConfig {
    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_length == Some(0) {
            return Err(MlmfError::config("max_length", "must be at least 1"));
        }
        if self.max_input_bytes == 0 {
            return Err(MlmfError::config("max_input_bytes", "must be at least 1"));
        }
        Ok(())
    }
}

/// A batch of tokenised text, each array int64 `[B, T]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextBatch {
    pub input_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub token_type_ids: Array2<i64>,
}

/// What tokenizer_config.json / special_tokens_map.json contribute.
#[derive(Debug, Clone, Default)]
struct TokenizerMeta {
    pad_token: Option<String>,
    model_max_length: Option<usize>,
    padding_left: bool,
    /// tokenizer_config.json names a padding side.
    padding_side_given: bool,
    truncation_left: bool,
}

/// Tokenises text batches with a Hugging Face `tokenizer.json`.
///
/// Padding and truncation are set on a copy of the tokenizer once, when the processor is
/// built (copying a tokenizer costs milliseconds: its vocabulary is copied), so a call
/// does no setup.
#[derive(Clone)]
pub struct TextProcessor {
    /// As loaded, with tokenizer.json's own padding/truncation removed.
    tokenizer: Arc<Tokenizer>,
    /// `tokenizer` with this processor's padding and truncation.
    configured: Arc<Tokenizer>,
    /// Padding was asked for but the tokenizer has no pad token.
    pad_missing: bool,
    config: TextProcessorConfig,
    pad: Option<(u32, String)>,
    meta: TokenizerMeta,
    source: PathBuf,
    /// The pre-tokenizer splits at spaces: a long text may be cut before tokenising.
    cuttable: bool,
}

impl std::fmt::Debug for TextProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextProcessor")
            .field("source", &self.source)
            .field("config", &self.config)
            .field("pad", &self.pad)
            .field("model_max_length", &self.meta.model_max_length)
            .finish()
    }
}

impl TextProcessor {
    /// Loads `tokenizer.json` from a checkpoint directory (or the file itself), with
    /// tokenizer_config.json and special_tokens_map.json beside it where present.
    pub fn from_pretrained(path: impl AsRef<Path>, config: TextProcessorConfig) -> Result<Self> {
        let path = path.as_ref();
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
                path.to_path_buf(),
            )
        };
        if !file.is_file() {
            let hint = if dir.join("vocab.txt").is_file() || dir.join("vocab.json").is_file() {
                "; only slow-tokenizer files (vocab.txt / vocab.json) are present: convert them \
                 with `transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`, \
                 which writes tokenizer.json"
            } else {
                ""
            };
            return Err(MlmfError::model_load(
                "tokenizer",
                &file,
                format!("tokenizer.json not found{hint}"),
            ));
        }
        let bytes = std::fs::read(&file)
            .map_err(|e| MlmfError::model_load("tokenizer", &file, e.to_string()))?;
        // Some families' reference rebuilds the shipped pipeline (SigLIP 2).
        let family = TextFamily::of(&dir);
        let bytes = family.rewrite(&bytes, &file)?;
        let tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| MlmfError::model_load("tokenizer", &file, e.to_string()))?;
        let mut meta = read_meta(&dir)?;
        if family.pads_left_by_default() && !meta.padding_side_given {
            meta.padding_left = true;
        }
        Self::from_tokenizer(tokenizer, meta, config, file)
    }

    /// Wraps an in-memory tokenizer.json (bytes), with no tokenizer_config.json.
    pub fn from_json_bytes(bytes: &[u8], config: TextProcessorConfig) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(bytes)
            .map_err(|e| MlmfError::model_load("tokenizer", "<memory>", e.to_string()))?;
        Self::from_tokenizer(tokenizer, TokenizerMeta::default(), config, PathBuf::new())
    }

    fn from_tokenizer(
        mut tokenizer: Tokenizer,
        mut meta: TokenizerMeta,
        config: TextProcessorConfig,
        source: PathBuf,
    ) -> Result<Self> {
        config.validate()?;
        // Without tokenizer_config.json, fall back on what tokenizer.json itself says.
        if meta.pad_token.is_none() {
            meta.pad_token = tokenizer.get_padding().map(|p| p.pad_token.clone());
        }
        let pad = meta
            .pad_token
            .as_ref()
            .and_then(|t| tokenizer.token_to_id(t).map(|id| (id, t.clone())));
        // The processor's settings replace whatever tokenizer.json stored.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| MlmfError::model_load("tokenizer", &source, e.to_string()))?;
        let cuttable = splits_at_spaces(&tokenizer);
        let tokenizer = Arc::new(tokenizer);
        let (configured, pad_missing) = configure(&tokenizer, &config, &meta, pad.as_ref())?;
        Ok(Self {
            tokenizer,
            configured: Arc::new(configured),
            pad_missing,
            config,
            pad,
            meta,
            source,
            cuttable,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &TextProcessorConfig {
        &self.config
    }

    /// The same tokenizer with other settings (copies the tokenizer once).
    pub fn with_config(&self, config: TextProcessorConfig) -> Result<Self> {
        config.validate()?;
        let (configured, pad_missing) =
            configure(&self.tokenizer, &config, &self.meta, self.pad.as_ref())?;
        Ok(Self {
            configured: Arc::new(configured),
            pad_missing,
            config,
            ..self.clone()
        })
    }

    /// `model_max_length` from tokenizer_config.json, when it is a real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.meta.model_max_length
    }

    /// The pad token and its id, when the tokenizer has one.
    pub fn pad_token(&self) -> Option<(u32, &str)> {
        self.pad.as_ref().map(|(id, t)| (*id, t.as_str()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The tokenizer file this processor was loaded from (empty for in-memory ones).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Tokenises a batch.
    pub fn encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<TextBatch> {
        if !self.config.prefix.is_empty() {
            let prefixed: Vec<String> = texts
                .iter()
                .map(|t| format!("{}{}", self.config.prefix, t.as_ref()))
                .collect();
            let inputs = prefixed
                .iter()
                .enumerate()
                .map(|(i, t)| self.bounded(i, t).map(EncodeInput::from))
                .collect::<Result<Vec<_>>>()?;
            return self.encode_inputs(inputs);
        }
        let inputs = texts
            .iter()
            .enumerate()
            .map(|(i, t)| self.bounded(i, t.as_ref()).map(EncodeInput::from))
            .collect::<Result<Vec<_>>>()?;
        self.encode_inputs(inputs)
    }

    /// `text`, or the prefix of it that gives the same ids, within `max_input_bytes`
    /// (see `text_limit.rs`); an `InputError` naming input `i` when neither fits.
    fn bounded<'t>(&self, i: usize, text: &'t str) -> Result<&'t str> {
        let limit = self.config.max_input_bytes;
        if text.len() <= limit {
            return Ok(text);
        }
        let refuse = |why: &str| {
            MlmfError::input(
                Modality::Text,
                format!(
                    "{} bytes of text, above max_input_bytes = {limit}: {why}; split the text \
                     or raise max_input_bytes (tokenising a whole text takes about 1 s and \
                     200 MB per MB)",
                    text.len()
                ),
            )
            .at_index(i)
        };
        let max_length = match self.truncation() {
            Some((n, false)) => n,
            Some((_, true)) => return Err(refuse("truncation from the left keeps its end")),
            None => return Err(refuse("without truncation every token is kept")),
        };
        if !self.cuttable {
            return Err(refuse(
                "this tokenizer's pre-tokenizer does not split at spaces, so the text \
                 cannot be cut before tokenising",
            ));
        }
        // Words enough for `max_length` tokens, doubling until the prefix overflows.
        let mut from = max_length.saturating_mul(16).max(256);
        loop {
            let Some(cut) = cut_point(text, from) else {
                return Err(refuse(
                    "found no space to cut it at before max_length tokens",
                ));
            };
            let enc = self
                .configured
                .encode(&text[..cut], self.config.add_special_tokens)
                .map_err(|e| MlmfError::input(Modality::Text, e.to_string()).at_index(i))?;
            if !enc.get_overflowing().is_empty() {
                return Ok(&text[..cut]);
            }
            from = cut.saturating_mul(2);
        }
    }

    /// The truncation length and whether it cuts from the left, as configured.
    fn truncation(&self) -> Option<(usize, bool)> {
        self.configured
            .get_truncation()
            .map(|t| (t.max_length, t.direction == TruncationDirection::Left))
    }

    /// Tokenises a batch of sentence pairs (`[CLS] a [SEP] b [SEP]` for BERT), as
    /// cross-encoders take them; `token_type_ids` mark the second sentence.
    pub fn encode_pairs<S: AsRef<str> + Sync>(
        &self,
        first: &[S],
        second: &[S],
    ) -> Result<TextBatch> {
        if first.len() != second.len() {
            return Err(MlmfError::input(
                Modality::Text,
                format!(
                    "{} first sentences but {} second sentences: expected one pair per item",
                    first.len(),
                    second.len()
                ),
            ));
        }
        let limit = self.config.max_input_bytes;
        let mut inputs: Vec<EncodeInput> = Vec::with_capacity(first.len());
        let firsts: Vec<String> = first
            .iter()
            .map(|a| format!("{}{}", self.config.prefix, a.as_ref()))
            .collect();
        for (i, (a, b)) in firsts.iter().zip(second).enumerate() {
            let (a, b) = (a.as_str(), b.as_ref());
            if a.len() > limit || b.len() > limit {
                return Err(MlmfError::input(
                    Modality::Text,
                    format!(
                        "a sentence pair of {} and {} bytes, above max_input_bytes = {limit}: \
                         pairs are truncated by their lengths in tokens, so each is tokenised \
                         whole; shorten them or raise max_input_bytes",
                        a.len(),
                        b.len()
                    ),
                )
                .at_index(i));
            }
            inputs.push((a, b).into());
        }
        self.encode_inputs(inputs)
    }

    fn encode_inputs(&self, texts: Vec<EncodeInput<'_>>) -> Result<TextBatch> {
        if texts.is_empty() {
            return Err(MlmfError::input(
                Modality::Text,
                "empty batch: expected at least one string",
            ));
        }
        if self.pad_missing && (texts.len() > 1 || self.config.padding == Padding::MaxLength) {
            return Err(MlmfError::input(
                Modality::Text,
                "the tokenizer has no pad token, so a batch cannot be padded: set pad_token \
                 in tokenizer_config.json, or pass one string at a time",
            ));
        }
        let encodings = self
            .configured
            .encode_batch_fast(texts, self.config.add_special_tokens)
            .map_err(|e| MlmfError::input(Modality::Text, e.to_string()))?;
        let width = encodings.first().map(|e| e.len()).unwrap_or(0);
        if let Some(i) = encodings.iter().position(|e| e.len() != width) {
            return Err(MlmfError::input(
                Modality::Text,
                format!(
                    "sequence has {} tokens but input 0 has {width}: without padding every \
                     sequence of a batch must have the same length (use padding=longest)",
                    encodings[i].len()
                ),
            )
            .at_index(i));
        }
        let b = encodings.len();
        let mut input_ids = Array2::<i64>::zeros((b, width));
        let mut attention_mask = Array2::<i64>::zeros((b, width));
        let mut token_type_ids = Array2::<i64>::zeros((b, width));
        for (i, e) in encodings.iter().enumerate() {
            let fill = |dst: &mut Array2<i64>, src: &[u32]| {
                for (d, s) in dst.row_mut(i).iter_mut().zip(src) {
                    *d = i64::from(*s);
                }
            };
            fill(&mut input_ids, e.get_ids());
            fill(&mut attention_mask, e.get_attention_mask());
            fill(&mut token_type_ids, e.get_type_ids());
        }
        Ok(TextBatch {
            input_ids,
            attention_mask,
            token_type_ids,
        })
    }

    /// Turns ids back into text (special tokens skipped when asked).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| MlmfError::input(Modality::Text, e.to_string()))
    }
}

impl Processor for TextProcessor {
    type Input = String;
    type Output = TextBatch;

    fn modality(&self) -> Modality {
        Modality::Text
    }

    fn process(&self, inputs: &[String]) -> Result<TextBatch> {
        self.encode(inputs)
    }
}

/// A copy of `raw` with `config`'s truncation and padding, and whether padding had to be
/// left off for want of a pad token.
fn configure(
    raw: &Tokenizer,
    config: &TextProcessorConfig,
    meta: &TokenizerMeta,
    pad: Option<&(u32, String)>,
) -> Result<(Tokenizer, bool)> {
    let mut tok = raw.clone();
    let max_length = config.max_length.or(meta.model_max_length);
    if config.truncation {
        if let Some(max_length) = max_length {
            tok.with_truncation(Some(TruncationParams {
                direction: if meta.truncation_left {
                    TruncationDirection::Left
                } else {
                    TruncationDirection::Right
                },
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| MlmfError::config("max_length", e.to_string()))?;
        }
    }
    let strategy = match config.padding {
        Padding::DoNotPad => return Ok((tok, false)),
        Padding::Longest => PaddingStrategy::BatchLongest,
        Padding::MaxLength => match max_length {
            Some(n) => PaddingStrategy::Fixed(n),
            None => {
                return Err(MlmfError::config(
                    "max_length",
                    "padding=max_length needs max_length: the tokenizer declares no \
                     model_max_length",
                ))
            }
        },
    };
    let Some((pad_id, pad_token)) = pad else {
        return Ok((tok, true));
    };
    tok.with_padding(Some(PaddingParams {
        strategy,
        direction: if meta.padding_left {
            PaddingDirection::Left
        } else {
            PaddingDirection::Right
        },
        pad_to_multiple_of: None,
        pad_id: *pad_id,
        pad_type_id: 0,
        pad_token: pad_token.clone(),
    }));
    Ok((tok, false))
}

/// Reads the parts of tokenizer_config.json and special_tokens_map.json that shape a
/// call. A token may be given as a string or as an AddedToken object (`{"content": ..}`).
fn read_meta(dir: &Path) -> Result<TokenizerMeta> {
    let mut meta = TokenizerMeta::default();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| MlmfError::model_load("tokenizer config", &path, e.to_string()))?;
        if let Some(tok) = v.get("pad_token").and_then(token_content) {
            meta.pad_token = Some(tok);
        }
        if let Some(n) = v
            .get("model_max_length")
            .and_then(serde_json::Value::as_f64)
        {
            if n >= 1.0 && n < UNBOUNDED_MAX_LENGTH as f64 {
                meta.model_max_length = Some(n as usize);
            }
        }
        if let Some(side) = v.get("padding_side").and_then(serde_json::Value::as_str) {
            meta.padding_left = side == "left";
            meta.padding_side_given = true;
        }
        if let Some(side) = v.get("truncation_side").and_then(serde_json::Value::as_str) {
            meta.truncation_left = side == "left";
        }
    }
    Ok(meta)
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whitespace word-level tokenizer built in memory: enough to test padding,
    /// truncation and masks without a checkpoint.
    fn tiny_tokenizer_json(with_pad: bool) -> String {
        let pad = if with_pad {
            r#"{"id":0,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},"#
        } else {
            ""
        };
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{pad}
              {{"id":1,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}},
              {{"id":2,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}},
              {{"id":3,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}],
            "normalizer":null,
            "pre_tokenizer":{{"type":"Whitespace"}},
            "post_processor":{{"type":"TemplateProcessing",
               "single":[{{"SpecialToken":{{"id":"[CLS]","type_id":0}}}},{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"[SEP]","type_id":0}}}}],
               "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":1}}}}],
               "special_tokens":{{"[CLS]":{{"id":"[CLS]","ids":[2],"tokens":["[CLS]"]}},"[SEP]":{{"id":"[SEP]","ids":[3],"tokens":["[SEP]"]}}}}}},
            "decoder":null,
            "model":{{"type":"WordLevel","vocab":{{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"a":4,"cat":5,"dog":6,"sat":7}},"unk_token":"[UNK]"}}}}"#
        )
    }

    fn processor(config: TextProcessorConfig) -> TextProcessor {
        let json = tiny_tokenizer_json(true);
        let mut p = TextProcessor::from_json_bytes(json.as_bytes(), TextProcessorConfig::default())
            .unwrap();
        p.pad = Some((0, "[PAD]".into()));
        p.with_config(config).unwrap()
    }

    #[test]
    fn pads_to_longest_with_mask() {
        let p = processor(TextProcessorConfig::default());
        let b = p.encode(&["a cat", "a dog sat zebra"]).unwrap();
        assert_eq!(b.input_ids.shape(), &[2, 6]);
        assert_eq!(b.input_ids.row(0).to_vec(), vec![2, 4, 5, 3, 0, 0]);
        assert_eq!(b.attention_mask.row(0).to_vec(), vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(b.input_ids.row(1).to_vec(), vec![2, 4, 6, 7, 1, 3]);
        assert_eq!(b.token_type_ids.sum(), 0);
    }

    #[test]
    fn truncates_and_pads_to_max_length() {
        let p = processor(TextProcessorConfig {
            max_length: Some(4),
            padding: Padding::MaxLength,
            ..Default::default()
        });
        let b = p.encode(&["a", "a dog sat sat sat"]).unwrap();
        assert_eq!(b.input_ids.shape(), &[2, 4]);
        assert_eq!(b.input_ids.row(0).to_vec(), vec![2, 4, 3, 0]);
        // Special tokens survive truncation, as in transformers.
        assert_eq!(b.input_ids.row(1).to_vec(), vec![2, 4, 6, 3]);
    }

    #[test]
    fn ragged_batch_without_padding_is_an_error() {
        let p = processor(TextProcessorConfig {
            padding: Padding::DoNotPad,
            ..Default::default()
        });
        let err = p.encode(&["a", "a", "a cat"]).unwrap_err().to_string();
        assert!(err.starts_with("text input 2:"), "{err}");
        assert!(err.contains("padding=longest"), "{err}");
        assert!(p.encode(&["a cat", "a dog"]).is_ok());
    }

    #[test]
    fn empty_batch_and_missing_pad_token() {
        let p = processor(TextProcessorConfig::default());
        let none: [&str; 0] = [];
        assert!(p
            .encode(&none)
            .unwrap_err()
            .to_string()
            .contains("empty batch"));

        let json = tiny_tokenizer_json(false);
        let p = TextProcessor::from_json_bytes(json.as_bytes(), Default::default()).unwrap();
        assert!(p.encode(&["a cat"]).is_ok());
        let err = p.encode(&["a", "a cat"]).unwrap_err().to_string();
        assert!(err.contains("no pad token"), "{err}");
    }

    #[test]
    fn missing_tokenizer_file_says_how_to_fix() {
        let dir = std::env::temp_dir().join(format!("mlmf-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vocab.txt"), "[PAD]\n").unwrap();
        let err = TextProcessor::from_pretrained(&dir, Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json not found"), "{err}");
        assert!(err.contains("save_pretrained"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn config_validation_names_field() {
        let err = TextProcessorConfig {
            max_length: Some(0),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`max_length`"), "{err}");
        assert!("sideways".parse::<Padding>().is_err());
    }
}
