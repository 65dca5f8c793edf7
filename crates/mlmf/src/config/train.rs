//! [`TrainConfig`]: how `mlmf train` / `mlmf.Trainer` train a model's fusion, attention
//! pairs, adapters and objective heads (docs/training.md).
//!
//! ```toml
//! [train]
//! epochs = 20
//! batch_size = 256
//! lr = 1e-3
//! modality_dropout = 0.3
//! objectives = [
//!   { type = "contrastive", between = ["text", "image"] },
//!   { type = "contrastive", pair = "text->image", loss = "sigmoid" },
//!   { type = "classify", num_classes = 10 },
//! ]
//! early_stopping = { metric = "accuracy", patience = 3 }
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::AttentionPair;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// One side of a contrastive objective: a modality's (adapted) embedding, or the
/// fused vector computed without the other side's modality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Fused,
    Modality(Modality),
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fused => f.write_str("fused"),
            Self::Modality(m) => write!(f, "{m}"),
        }
    }
}

impl FromStr for Side {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        if s.trim() == "fused" {
            return Ok(Self::Fused);
        }
        s.trim().parse().map(Self::Modality).map_err(|_| {
            MlmfError::config(
                "between",
                format!("{s:?} is neither `fused` nor a modality name (text, image, audio, video, custom:N)"),
            )
        })
    }
}

impl Serialize for Side {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Side {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: MlmfError| serde::de::Error::custom(e.to_string()))
    }
}

/// The loss of a contrastive objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ContrastiveLoss {
    /// Symmetric InfoNCE over the batch (CLIP).
    #[default]
    Infonce,
    /// Pairwise sigmoid loss (SigLIP).
    Sigmoid,
}

/// Align two sides over the batch: matching rows are positives, every other row a
/// negative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContrastiveConfig {
    /// Two sides (`["text", "image"]`, `["fused", "audio"]`); or use `pair`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub between: Vec<Side>,
    /// A configured attention pair (`"text->image"`): the query modality's tokens are
    /// scored against the other modality through the pair's attention layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair: Option<AttentionPair>,
    pub loss: ContrastiveLoss,
    pub weight: f64,
    /// Initial temperature (`logit_scale = ln(1 / temperature)`); default 0.07 for
    /// InfoNCE, 0.1 for the sigmoid loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Initial bias of the sigmoid loss (default -10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<f64>,
    /// Whether the temperature (and bias) are learned.
    pub learn_temperature: bool,
    /// Name used in metrics and saved tensors (default: `text-image`, `fused-audio`,
    /// `text->image`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        Self {
            between: Vec::new(),
            pair: None,
            loss: ContrastiveLoss::Infonce,
            weight: 1.0,
            temperature: None,
            bias: None,
            learn_temperature: true,
            name: None,
        }
    }
}

/// Classification of the fused vector: a linear head, cross-entropy over `label`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifyConfig {
    pub num_classes: usize,
    pub weight: f64,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            num_classes: 2,
            weight: 1.0,
        }
    }
}

/// Regression from the fused vector: a linear head, mean squared error on `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegressConfig {
    /// Width of `target` (1 for a scalar).
    pub dim: usize,
    pub weight: f64,
}

impl Default for RegressConfig {
    fn default() -> Self {
        Self {
            dim: 1,
            weight: 1.0,
        }
    }
}

/// One training objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectiveConfig {
    Contrastive(ContrastiveConfig),
    Classify(ClassifyConfig),
    Regress(RegressConfig),
}

impl ObjectiveConfig {
    /// The name metrics and saved tensors use.
    pub fn name(&self) -> String {
        match self {
            Self::Contrastive(c) => {
                c.name
                    .clone()
                    .unwrap_or_else(|| match (&c.pair, &c.between[..]) {
                        (Some(p), _) => p.to_string(),
                        (None, [a, b]) => format!("{a}-{b}"),
                        _ => "contrastive".to_string(),
                    })
            }
            Self::Classify(_) => "classify".to_string(),
            Self::Regress(_) => "regress".to_string(),
        }
    }

    pub fn weight(&self) -> f64 {
        match self {
            Self::Contrastive(c) => c.weight,
            Self::Classify(c) => c.weight,
            Self::Regress(c) => c.weight,
        }
    }

    fn validate(&self) -> Result<()> {
        let w = self.weight();
        if !(w.is_finite() && w > 0.0) {
            return Err(MlmfError::config(
                "weight",
                format!("{w} is not a positive finite number"),
            ));
        }
        match self {
            Self::Contrastive(c) => {
                match (&c.pair, c.between.len()) {
                    (Some(_), 0) => {}
                    (None, 2) => {
                        if c.between[0] == c.between[1] {
                            return Err(MlmfError::config(
                                "between",
                                format!(
                                    "aligns `{}` with itself: name two different sides",
                                    c.between[0]
                                ),
                            ));
                        }
                    }
                    (Some(_), _) => {
                        return Err(MlmfError::config(
                            "between",
                            "set `between` (two sides) or `pair` (an attention pair), not both",
                        ))
                    }
                    (None, n) => {
                        return Err(MlmfError::config(
                            "between",
                            format!("expected two sides such as [\"text\", \"image\"], got {n}"),
                        ))
                    }
                }
                if let Some(t) = c.temperature {
                    if !(t.is_finite() && t > 0.0) {
                        return Err(MlmfError::config(
                            "temperature",
                            format!("{t} is not a positive finite number"),
                        ));
                    }
                }
                if let Some(b) = c.bias {
                    if !b.is_finite() {
                        return Err(MlmfError::config("bias", format!("{b} is not finite")));
                    }
                    if c.loss == ContrastiveLoss::Infonce {
                        return Err(MlmfError::config(
                            "bias",
                            "only the sigmoid loss has a bias (InfoNCE is shift-invariant)",
                        ));
                    }
                }
                Ok(())
            }
            Self::Classify(c) if c.num_classes < 2 => Err(MlmfError::config(
                "num_classes",
                format!("{} classes: expected at least 2", c.num_classes),
            )),
            Self::Regress(r) if r.dim == 0 => Err(MlmfError::config("dim", "must be at least 1")),
            _ => Ok(()),
        }
    }
}

/// A curriculum stage: `steps` optimiser steps using only `modalities`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub modalities: Vec<Modality>,
    pub steps: usize,
}

/// Stop when the validation metric has not improved for `patience` epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// `loss` (the default), or any metric `evaluate` reports (`accuracy`, `macro_f1`,
    /// `mse`, `text->image/R@1`, `mean_R@1`, ...).
    pub metric: String,
    pub patience: usize,
    /// The smallest change that counts as an improvement.
    pub min_delta: f64,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self {
            metric: "loss".into(),
            patience: 3,
            min_delta: 0.0,
        }
    }
}

impl EarlyStoppingConfig {
    /// Whether larger values of the metric are better (recall, accuracy, F1).
    pub fn maximise(&self) -> bool {
        metric_maximised(&self.metric)
    }
}

/// Whether larger values of a metric are better.
pub fn metric_maximised(metric: &str) -> bool {
    !(metric == "loss" || metric.ends_with("loss") || metric == "mse")
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Half a cosine from `lr` down to 0.
    #[default]
    Cosine,
    /// A straight line from `lr` down to 0.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub objectives: Vec<ObjectiveConfig>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Linear warmup as a fraction of all steps (`warmup_steps` overrides it).
    pub warmup: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    pub schedule: ScheduleKind,
    /// AdamW's decoupled weight decay, applied to weight matrices only.
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Gradients are scaled so that their global L2 norm is at most this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// Probability that a batch drops each modality from the fusion's inputs (never
    /// all of them).
    pub modality_dropout: f64,
    /// Shuffle the rows every epoch (seeded); `false` keeps the data's order.
    pub shuffle: bool,
    /// Curriculum: stages run in order; when set, training lasts the sum of their steps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageConfig>,
    pub seed: u64,
    /// Held out from the training rows for validation when no validation set is given.
    pub val_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Write a checkpoint every this many steps (and at every epoch's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// Items per encoder call while the data is encoded.
    pub encode_batch_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objectives: Vec::new(),
            epochs: 10,
            batch_size: 64,
            lr: 1e-3,
            warmup: 0.05,
            warmup_steps: None,
            schedule: ScheduleKind::Cosine,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            clip_grad_norm: Some(1.0),
            modality_dropout: 0.0,
            shuffle: true,
            stages: Vec::new(),
            seed: 0,
            val_fraction: 0.0,
            early_stopping: None,
            checkpoint_every: None,
            encode_batch_size: 32,
        }
    }
}

impl TrainConfig {
    /// Checks values that do not depend on the model (the trainer checks the rest).
    pub fn validate(&self) -> Result<()> {
        if self.objectives.is_empty() {
            return Err(MlmfError::config(
                "objectives",
                "no objective: add one, e.g. {type = \"contrastive\", between = [\"text\", \"image\"]}",
            ));
        }
        for (i, o) in self.objectives.iter().enumerate() {
            o.validate()
                .map_err(|e| e.under(&format!("objectives.{i}")))?;
        }
        let mut names: Vec<String> = Vec::new();
        for (i, o) in self.objectives.iter().enumerate() {
            let n = o.name();
            if names.contains(&n) {
                return Err(MlmfError::config(
                    format!("objectives.{i}"),
                    format!("a second objective named `{n}`: give it another `name`"),
                ));
            }
            names.push(n);
        }
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(MlmfError::config(
                    field,
                    format!("{v} is not a positive finite number"),
                ))
            }
        };
        if self.epochs == 0 && self.stages.is_empty() {
            return Err(MlmfError::config("epochs", "must be at least 1"));
        }
        if self.batch_size < 2 {
            return Err(MlmfError::config(
                "batch_size",
                format!(
                    "{}: expected at least 2 (contrastive objectives need negatives)",
                    self.batch_size
                ),
            ));
        }
        positive("lr", self.lr)?;
        positive("eps", self.eps)?;
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(MlmfError::config(
                "warmup",
                format!(
                    "{} is outside [0, 1): a fraction of the steps (or set warmup_steps)",
                    self.warmup
                ),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(MlmfError::config(
                "weight_decay",
                format!("{} is not a non-negative number", self.weight_decay),
            ));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(MlmfError::config(
                    format!("betas.{i}"),
                    format!("{b} is outside [0, 1)"),
                ));
            }
        }
        if let Some(c) = self.clip_grad_norm {
            positive("clip_grad_norm", c)?;
        }
        if !(0.0..1.0).contains(&self.modality_dropout) {
            return Err(MlmfError::config(
                "modality_dropout",
                format!("{} is outside [0, 1)", self.modality_dropout),
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(MlmfError::config(
                "val_fraction",
                format!("{} is outside [0, 1)", self.val_fraction),
            ));
        }
        for (i, s) in self.stages.iter().enumerate() {
            if s.steps == 0 {
                return Err(MlmfError::config(
                    format!("stages.{i}.steps"),
                    "must be at least 1",
                ));
            }
            if s.modalities.is_empty() {
                return Err(MlmfError::config(
                    format!("stages.{i}.modalities"),
                    "a stage needs at least one modality",
                ));
            }
        }
        if let Some(es) = &self.early_stopping {
            if es.patience == 0 {
                return Err(MlmfError::config(
                    "early_stopping.patience",
                    "must be at least 1",
                ));
            }
            if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
                return Err(MlmfError::config(
                    "early_stopping.min_delta",
                    format!("{} is not a non-negative number", es.min_delta),
                ));
            }
        }
        if self.checkpoint_every == Some(0) {
            return Err(MlmfError::config("checkpoint_every", "must be at least 1"));
        }
        if self.encode_batch_size == 0 {
            return Err(MlmfError::config("encode_batch_size", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_parse_and_name_themselves() {
        let c: TrainConfig = toml::from_str(
            "objectives = [\n{ type = \"contrastive\", between = [\"text\", \"image\"] },\n\
             { type = \"contrastive\", pair = \"text->image\", loss = \"sigmoid\" },\n\
             { type = \"contrastive\", between = [\"fused\", \"audio\"] },\n\
             { type = \"classify\", num_classes = 10 },\n{ type = \"regress\", dim = 2 }]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let names: Vec<String> = c.objectives.iter().map(ObjectiveConfig::name).collect();
        assert_eq!(
            names,
            [
                "text-image",
                "text->image",
                "fused-audio",
                "classify",
                "regress"
            ]
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("objectives = []", "objectives"),
            ("objectives = [{ type = \"classify\", num_classes = 1 }]", "objectives.0.num_classes"),
            ("objectives = [{ type = \"contrastive\", between = [\"text\"] }]", "objectives.0.between"),
            (
                "objectives = [{ type = \"contrastive\", between = [\"text\", \"text\"] }]",
                "objectives.0.between",
            ),
            (
                "objectives = [{ type = \"regress\" }, { type = \"regress\" }]",
                "objectives.1",
            ),
            ("objectives = [{ type = \"regress\" }]\nlr = -1.0", "lr"),
            ("objectives = [{ type = \"regress\" }]\nwarmup = 1.5", "warmup"),
            ("objectives = [{ type = \"regress\" }]\nbatch_size = 1", "batch_size"),
            ("objectives = [{ type = \"regress\" }]\nmodality_dropout = 1.0", "modality_dropout"),
            (
                "objectives = [{ type = \"regress\" }]\nstages = [{ modalities = [\"text\"], steps = 0 }]",
                "stages.0.steps",
            ),
        ];
        for (text, field) in cases {
            let c: TrainConfig = toml::from_str(text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{text} -> {err}");
        }
        let err =
            toml::from_str::<TrainConfig>("objectives = [{ type = \"classify\", num_class = 3 }]")
                .unwrap_err()
                .to_string();
        assert!(err.contains("num_class"), "{err}");
    }
}
