//! Tokenizers that a model family's reference builds differently from the
//! tokenizer.json it ships.
//!
//! SigLIP 2 (`model_type: siglip2`): its checkpoints ship Gemma's tokenizer.json, but
//! transformers tokenizes their text with its own `Siglip2Tokenizer`, which keeps the
//! vocabulary, merges and post-processor and replaces the rest with SigLIP 2's
//! training-time text pipeline:
//!
//! - normaliser: lower-case, then spaces become `▁` (no `▁` is prepended);
//! - pre-tokenizer: split at spaces, each space kept with the word before it (which
//!   splits nothing: the normaliser has already turned every space into `▁`, so a
//!   text is one BPE word, as with Gemma's own pipeline);
//! - model: BPE with byte fallback and fused unknowns;
//! - padding on the left unless tokenizer_config.json names a side.
//!
//! [`TextProcessor::from_pretrained`](super::text::TextProcessor::from_pretrained)
//! applies this to a folder whose config.json says `siglip2`.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{MlmfError, Result};

/// The tokenizer pipeline a checkpoint folder's reference uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextFamily {
    /// tokenizer.json as shipped.
    AsShipped,
    /// transformers' `Siglip2Tokenizer`.
    Siglip2,
}

impl TextFamily {
    /// The family of the checkpoint in `dir`, from its config.json (as shipped when
    /// there is none).
    pub(crate) fn of(dir: &Path) -> Self {
        let model_type = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
        match model_type.as_deref() {
            Some("siglip2") => Self::Siglip2,
            _ => Self::AsShipped,
        }
    }

    /// Whether texts are padded on the left when tokenizer_config.json names no side.
    pub(crate) fn pads_left_by_default(self) -> bool {
        self == Self::Siglip2
    }

    /// tokenizer.json `bytes` rewritten into the family's pipeline.
    pub(crate) fn rewrite(self, bytes: &[u8], file: &Path) -> Result<Vec<u8>> {
        if self == Self::AsShipped {
            return Ok(bytes.to_vec());
        }
        let err = |m: String| MlmfError::model_load("tokenizer", file, m);
        let mut v: Value = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
        let model = v
            .get_mut("model")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| err("tokenizer.json has no model".into()))?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err(err(
                "a SigLIP 2 tokenizer must be a BPE model (Gemma's), as transformers' \
                 Siglip2Tokenizer rebuilds it from the vocabulary and merges"
                    .into(),
            ));
        }
        for (key, value) in [
            ("dropout", Value::Null),
            ("continuing_subword_prefix", Value::Null),
            ("end_of_word_suffix", Value::Null),
            ("fuse_unk", Value::Bool(true)),
            ("byte_fallback", Value::Bool(true)),
            ("ignore_merges", Value::Bool(false)),
        ] {
            model.insert(key.into(), value);
        }
        if model.get("unk_token").is_none_or(Value::is_null) {
            model.insert("unk_token".into(), json!("<unk>"));
        }
        v["normalizer"] = json!({
            "type": "Sequence",
            "normalizers": [
                {"type": "Lowercase"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            ],
        });
        v["pre_tokenizer"] = json!({
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": false,
        });
        serde_json::to_vec(&v).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::Tokenizer;

    /// A BPE tokenizer.json over a few pieces, with a normaliser that keeps case.
    fn shipped() -> Vec<u8> {
        let v = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": null,
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": "<unk>",
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": {"<unk>": 0, "a": 1, "b": 2, "\u{2581}": 3, "ab": 4, "A": 5, "<0x41>": 6},
                "merges": [["a", "b"]],
            },
        });
        serde_json::to_vec(&v).unwrap()
    }

    fn ids(bytes: &[u8], text: &str) -> Vec<u32> {
        let t = Tokenizer::from_bytes(bytes).unwrap();
        t.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn siglip2_lower_cases_and_splits_at_spaces() {
        let raw = shipped();
        let s2 = TextFamily::Siglip2.rewrite(&raw, Path::new("t")).unwrap();
        // As shipped, case is kept; SigLIP 2's pipeline lower-cases first.
        assert_eq!(ids(&raw, "Ab"), vec![5, 2]);
        assert_eq!(ids(&s2, "Ab"), vec![4]);
        // Spaces become `▁` before the pre-tokenizer sees them, so the text is one BPE
        // word: "ab", "▁", "ab".
        assert_eq!(ids(&s2, "ab ab"), vec![4, 3, 4]);
        assert_eq!(
            TextFamily::AsShipped.rewrite(&raw, Path::new("t")).unwrap(),
            raw
        );
    }

    #[test]
    fn siglip2_needs_a_bpe_model() {
        let mut v: Value = serde_json::from_slice(&shipped()).unwrap();
        v["model"]["type"] = json!("WordPiece");
        let e = TextFamily::Siglip2
            .rewrite(&serde_json::to_vec(&v).unwrap(), Path::new("t"))
            .unwrap_err();
        assert!(e.to_string().contains("BPE"), "{e}");
    }
}
