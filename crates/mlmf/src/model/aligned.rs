//! Similarity and zero-shot on a model whose text modality and another modality load
//! the two towers of one aligned checkpoint (docs/aligned.md). The towers run through
//! the model's caches: label prompts, like any text, are encoded once.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use ndarray::Array2;

use super::encode::{stack_pooled, stack_tokens};
use super::{keys, ItemEncoding, MultiModalModel, TokenStates};
use crate::aligned::{self, AlignedHead, Similarity, ZeroShot};
use crate::config::fusion::{FusionStrategy, LateMode};
use crate::encoders::layers::ce;
use crate::encoders::RawInputs;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Whether the fusion is late fusion in `similarity` mode.
fn late_similarity_mode(strategy: &FusionStrategy) -> bool {
    matches!(strategy, FusionStrategy::Late(o) if o.mode == LateMode::Similarity)
}

/// Pooled embeddings `[B, D]` as rows.
fn rows_of(t: &Tensor) -> Result<Array2<f32>> {
    let f = ce("pooled embeddings");
    let v: Vec<Vec<f32>> = t
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec2())
        .map_err(f)?;
    let (n, d) = (v.len(), v.first().map_or(0, Vec::len));
    Array2::from_shape_vec((n, d), v.concat()).map_err(|e| MlmfError::Internal(e.to_string()))
}

impl MultiModalModel {
    /// With late `similarity` fusion, finds the aligned heads now (a load error when
    /// no modality pairs with the text as one aligned checkpoint's towers).
    pub(super) fn with_late_similarity(self) -> Result<Self> {
        if !late_similarity_mode(self.fusion().strategy()) {
            return Ok(self);
        }
        let mut why = Vec::new();
        for m in self.modalities() {
            if m == Modality::Text {
                continue;
            }
            match self.aligned_head(m) {
                Ok(h) => {
                    let _ = self.inner.aligned.set(h);
                    return Ok(self);
                }
                Err(e) => why.push(format!("{m}: {e}")),
            }
        }
        Err(MlmfError::config(
            "fusion.strategy",
            format!(
                "late mode `similarity` needs a text modality and another modality loading the \
                 two towers of one aligned checkpoint ({}){}",
                aligned::FAMILIES
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", "),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join("; "))
                }
            ),
        ))
    }

    /// The checkpoint's logits for a call's embeddings, with late `similarity` fusion
    /// and both modalities present.
    pub(super) fn late_similarity(
        &self,
        embeddings: &BTreeMap<Modality, Tensor>,
        tokens: &BTreeMap<Modality, TokenStates>,
    ) -> Result<Option<Similarity>> {
        let Some(head) = self.inner.aligned.get() else {
            return Ok(None);
        };
        let (Some(t), Some(o)) = (embeddings.get(&Modality::Text), embeddings.get(&head.other))
        else {
            return Ok(None);
        };
        Ok(Some(Similarity {
            other: head.other,
            logits_per_text: head.logits(
                &rows_of(t)?,
                &rows_of(o)?,
                tokens.get(&head.other).map(|s| &s.hidden_states),
            )?,
            head: head.clone(),
        }))
    }

    /// The aligned heads of the checkpoint whose text tower the text modality loads and
    /// whose other tower `other` loads; an error naming what differs otherwise.
    pub fn aligned_head(&self, other: Modality) -> Result<AlignedHead> {
        // A model has one text modality, so one aligned checkpoint: kept once found.
        if let Some(h) = self.inner.aligned.get().filter(|h| h.other == other) {
            return Ok(h.clone());
        }
        if other == Modality::Text {
            return Err(MlmfError::input(
                other,
                "similarity compares texts with another modality (image for CLIP and SigLIP, \
                 audio for CLAP, video for X-CLIP)",
            ));
        }
        if !self.modalities().contains(&Modality::Text) {
            return Err(MlmfError::MissingModality {
                modality: Modality::Text,
                message: format!(
                    "similarity and zero-shot compare {other} with texts, and this model has \
                     no text modality"
                ),
            });
        }
        let text = self.encoder(Modality::Text)?;
        let enc = self.encoder(other)?;
        let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
        let (td, od) = (canon(text.dir()), canon(enc.dir()));
        if td != od {
            return Err(MlmfError::config(
                format!("modalities.{other}.model"),
                format!(
                    "similarity needs the text and {other} towers of one aligned checkpoint: \
                     text loads {}, {other} loads {}",
                    td.display(),
                    od.display()
                ),
            ));
        }
        let head = AlignedHead::from_checkpoint(&td)?;
        if head.other == other {
            let _ = self.inner.aligned.set(head.clone());
        } else {
            return Err(MlmfError::input(
                other,
                format!(
                    "a `{}` checkpoint aligns text with {}, not {other}",
                    head.family, head.other
                ),
            ));
        }
        Ok(head)
    }

    /// `logits_per_text` of `texts` against `others` (one modality's raw inputs), as
    /// the checkpoint's own model computes them.
    pub fn similarity(&self, texts: Vec<String>, others: RawInputs) -> Result<Similarity> {
        let m = keys::modality(&others);
        self.aligned_head(m)?;
        if texts.is_empty() {
            return Err(MlmfError::input(
                Modality::Text,
                "empty batch: expected at least one text",
            ));
        }
        if keys::len(&others) == 0 {
            return Err(MlmfError::input(
                m,
                format!("empty batch: expected at least one {m} input"),
            ));
        }
        let texts = self.encode_items(Modality::Text, RawInputs::Text(texts))?;
        let others = self.encode_items(m, others)?;
        self.similarity_encoded(&texts, m, &others)
    }

    /// [`Self::similarity`] on items already encoded (texts, then `m`'s).
    pub(crate) fn similarity_encoded(
        &self,
        texts: &[ItemEncoding],
        m: Modality,
        items: &[ItemEncoding],
    ) -> Result<Similarity> {
        let head = self.aligned_head(m)?;
        if texts.is_empty() || items.is_empty() {
            return Err(MlmfError::input(
                if texts.is_empty() { Modality::Text } else { m },
                "empty batch: expected at least one item",
            ));
        }
        let t = rows_of(&stack_pooled(texts)?)?;
        let o = rows_of(&stack_pooled(items)?)?;
        let tokens = if head.needs_tokens() {
            Some(stack_tokens(items)?.hidden_states)
        } else {
            None
        };
        Ok(Similarity {
            other: m,
            logits_per_text: head.logits(&t, &o, tokens.as_ref())?,
            head,
        })
    }

    /// Each input of `inputs` classified among `labels`, each put into `template`
    /// (`"a photo of a {}."`): the family's probabilities (softmax for CLIP, sigmoid
    /// for SigLIP) and the best label.
    pub fn zero_shot(
        &self,
        inputs: RawInputs,
        labels: &[String],
        template: &str,
    ) -> Result<ZeroShot> {
        let m = keys::modality(&inputs);
        self.aligned_head(m)?;
        let prompts = aligned::prompts(labels, template, m)?;
        let sim = self.similarity(prompts.clone(), inputs)?;
        Ok(zero_shot_from(sim, labels, prompts))
    }
}

/// The zero-shot answer from the similarity of the label prompts with the inputs.
pub(crate) fn zero_shot_from(sim: Similarity, labels: &[String], prompts: Vec<String>) -> ZeroShot {
    let logits = sim.logits_per_other();
    let probs = sim.head.probabilities(&logits);
    let best = aligned::argmax_rows(&probs);
    ZeroShot {
        other: sim.other,
        labels: labels.to_vec(),
        prompts,
        logits,
        probs,
        best,
        head: sim.head,
    }
}
