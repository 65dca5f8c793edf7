//! Aligned dual encoders (docs/aligned.md): the heads that put a checkpoint's text and
//! image vectors in one space, and the scores computed from them exactly as
//! transformers computes them.
//!
//! - `clip` (`CLIPModel`): `logits_per_text = exp(logit_scale) * t̂ · îᵀ` over the
//!   L2-normalised projected embeddings; zero-shot probabilities are a softmax over
//!   the labels.
//! - `siglip` (`SiglipModel`) and `siglip2` (`Siglip2Model`): `logits_per_text =
//!   exp(logit_scale) * t̂ · îᵀ + logit_bias`; zero-shot probabilities are independent
//!   sigmoids.
//! - `clap` (`ClapModel`), text against audio: `logits_per_text =
//!   exp(logit_scale_t) * t̂ · âᵀ` and `logits_per_audio = exp(logit_scale_a) * â · t̂ᵀ`
//!   (two temperatures); zero-shot probabilities are a softmax over the labels.
//!
//! - `xclip` (`XCLIPModel`), text against video: each text vector is first moved
//!   towards the video it is compared with by the checkpoint's prompt generator
//!   ([`prompts`]), then `logits_per_video[b, k] = exp(logit_scale) * v̂_b · t̂_{b,k}`;
//!   zero-shot probabilities are a softmax over the labels.
//!
//! `logits_per_image` is the transpose of `logits_per_text` for CLIP and SigLIP. The embeddings
//! are the towers' pooled outputs, which mlmf's encoders already produce
//! (`get_text_features` / `get_image_features` for CLIP, the pooler outputs for
//! SigLIP); [`crate::MultiModalModel::similarity`] and
//! [`crate::MultiModalModel::zero_shot`] run the towers through the model's caches.

pub mod prompts;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use ndarray::Array2;

pub use prompts::PromptGenerator;

use crate::encoders::checkpoint::Checkpoint;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

const WHAT: &str = "aligned heads";

/// The `model_type`s whose checkpoints carry aligned heads, with the modality their
/// text tower is aligned with.
pub const FAMILIES: &[(&str, Modality)] = &[
    ("clip", Modality::Image),
    ("siglip", Modality::Image),
    ("siglip2", Modality::Image),
    ("clap", Modality::Audio),
    ("xclip", Modality::Video),
];

/// How a family turns logits into zero-shot probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probabilities {
    /// A softmax over the labels (CLIP).
    Softmax,
    /// An independent sigmoid per label (SigLIP).
    Sigmoid,
}

impl Probabilities {
    pub fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Sigmoid => "sigmoid",
        }
    }
}

/// A checkpoint's aligned heads.
#[derive(Debug, Clone)]
pub struct AlignedHead {
    /// The checkpoint's `model_type`.
    pub family: String,
    /// The modality the text tower is aligned with.
    pub other: Modality,
    pub probabilities: Probabilities,
    /// The stored (log) temperature; scores are multiplied by `exp(logit_scale)`.
    pub logit_scale: f32,
    /// Added to every score (SigLIP).
    pub logit_bias: Option<f32>,
    /// CLAP's own temperature for the other way round (`logit_scale_a`:
    /// `logits_per_audio = exp(logit_scale_a) * â · t̂ᵀ`); `None`: `logits_per_other`
    /// is the transpose of `logits_per_text`.
    pub logit_scale_other: Option<f32>,
    /// X-CLIP's prompt generator: texts are moved towards each video before scoring,
    /// which needs the video's patch features (its tower's `hidden_states`).
    pub prompts: Option<Arc<PromptGenerator>>,
    /// Where the heads were read.
    pub dir: PathBuf,
}

/// The value of a one-element float tensor.
fn scalar(ckpt: &Checkpoint, name: &str) -> Result<f32> {
    let t = ckpt.any_tensor(name)?;
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| MlmfError::model_load(WHAT, ckpt.dir(), format!("`{name}`: {e}")))?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(MlmfError::model_load(
            WHAT,
            ckpt.dir(),
            format!("`{name}` has {} values, expected one", v.len()),
        )),
    }
}

impl AlignedHead {
    /// The heads of the checkpoint in `dir`: `logit_scale` (and `logit_bias` for
    /// SigLIP) beside the two towers.
    pub fn from_checkpoint(dir: impl AsRef<Path>) -> Result<Self> {
        let ckpt = Checkpoint::open(dir.as_ref())?;
        Self::from_opened(&ckpt)
    }

    pub(crate) fn from_opened(ckpt: &Checkpoint) -> Result<Self> {
        let family = ckpt.model_type().unwrap_or("(none)").to_string();
        let Some(&(_, other)) = FAMILIES.iter().find(|(f, _)| *f == family) else {
            let known: Vec<&str> = FAMILIES.iter().map(|(f, _)| *f).collect();
            return Err(MlmfError::model_load(
                WHAT,
                ckpt.dir(),
                format!(
                    "model_type `{family}` has no aligned text tower; checkpoints with aligned \
                     heads: {} (the dual-tower checkpoints, not a single tower)",
                    known.join(", ")
                ),
            ));
        };
        let (logit_scale, logit_scale_other) = if family == "clap" {
            (
                scalar(ckpt, "logit_scale_t")?,
                Some(scalar(ckpt, "logit_scale_a")?),
            )
        } else {
            (scalar(ckpt, "logit_scale")?, None)
        };
        let (probabilities, logit_bias) = match family.as_str() {
            "siglip" | "siglip2" => (Probabilities::Sigmoid, Some(scalar(ckpt, "logit_bias")?)),
            _ => (Probabilities::Softmax, None),
        };
        let prompts = if family == "xclip" {
            Some(Arc::new(PromptGenerator::load(ckpt)?))
        } else {
            None
        };
        Ok(Self {
            family,
            other,
            probabilities,
            logit_scale,
            logit_bias,
            logit_scale_other,
            prompts,
            dir: ckpt.dir().to_path_buf(),
        })
    }

    /// Whether scoring needs the other modality's token states (X-CLIP).
    pub fn needs_tokens(&self) -> bool {
        self.prompts.is_some()
    }

    /// `logits_per_text` `[Nt, No]` of text embeddings `[Nt, D]` against the other
    /// modality's `[No, D]`, as the family's model computes it. `other_tokens`
    /// `[No, N, D]`: the other tower's `hidden_states`, which X-CLIP's prompts read
    /// (ignored by the other families).
    pub fn logits(
        &self,
        text: &Array2<f32>,
        other: &Array2<f32>,
        other_tokens: Option<&Tensor>,
    ) -> Result<Array2<f32>> {
        if text.ncols() != other.ncols() {
            return Err(MlmfError::input(
                self.other,
                format!(
                    "{} embeddings are {} wide and text embeddings {}: the towers of one \
                     aligned checkpoint give equal widths",
                    self.other,
                    other.ncols(),
                    text.ncols()
                ),
            ));
        }
        if let Some(gen) = &self.prompts {
            let Some(tokens) = other_tokens else {
                return Err(MlmfError::input(
                    self.other,
                    format!(
                        "a `{}` checkpoint scores each text against each video's own prompts: \
                         expected the {} tower's hidden_states with its embeddings",
                        self.family, self.other
                    ),
                ));
            };
            return self.prompted_logits(gen, text, other, tokens);
        }
        let (t, o) = (normalized(text), normalized(other));
        let scale = self.logit_scale.exp();
        let mut out = Array2::<f32>::zeros((t.nrows(), o.nrows()));
        for (i, tr) in t.rows().into_iter().enumerate() {
            for (j, or) in o.rows().into_iter().enumerate() {
                let v = dot(tr, or) as f32 * scale;
                out[(i, j)] = match self.logit_bias {
                    Some(b) => v + b,
                    None => v,
                };
            }
        }
        Ok(out)
    }

    /// X-CLIP: per video, the texts through the prompt generator, then scaled cosines.
    fn prompted_logits(
        &self,
        gen: &PromptGenerator,
        text: &Array2<f32>,
        other: &Array2<f32>,
        tokens: &Tensor,
    ) -> Result<Array2<f32>> {
        let f = crate::encoders::layers::ce("xclip logits");
        let rows = tokens.dim(0).map_err(&f)?;
        if rows != other.nrows() {
            return Err(MlmfError::input(
                self.other,
                format!(
                    "{} {} embeddings but token states for {rows}",
                    other.nrows(),
                    self.other
                ),
            ));
        }
        let (nt, d) = text.dim();
        let t = Tensor::from_slice(
            text.as_standard_layout().as_slice().unwrap_or(&[]),
            (nt, d),
            &candle_core::Device::Cpu,
        )
        .map_err(&f)?;
        // [No, Nt, D]: each video's own text vectors.
        let per_video: Vec<f32> = gen
            .prompted(&t, tokens)?
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(&f)?;
        let o = normalized(other);
        let scale = self.logit_scale.exp();
        let mut out = Array2::<f32>::zeros((nt, o.nrows()));
        for (j, (texts, v)) in per_video.chunks_exact(nt * d).zip(o.rows()).enumerate() {
            let texts = Array2::from_shape_vec((nt, d), texts.to_vec())
                .map_err(|e| MlmfError::Internal(e.to_string()))?;
            for (i, tv) in normalized(&texts).rows().into_iter().enumerate() {
                out[(i, j)] = dot(tv, v) as f32 * scale;
            }
        }
        Ok(out)
    }

    /// Probabilities over the columns of `logits` `[N, L]` (one row per input, one
    /// column per label).
    pub fn probabilities(&self, logits: &Array2<f32>) -> Array2<f32> {
        let mut p = logits.clone();
        match self.probabilities {
            Probabilities::Sigmoid => p.mapv_inplace(|v| 1.0 / (1.0 + (-v).exp())),
            Probabilities::Softmax => {
                for mut row in p.rows_mut() {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f64;
                    row.mapv_inplace(|v| {
                        let e = (v - m).exp();
                        sum += f64::from(e);
                        e
                    });
                    let inv = (1.0 / sum) as f32;
                    row.mapv_inplace(|v| v * inv);
                }
            }
        }
        p
    }
}

/// `a · b` accumulated in float64.
fn dot(a: ndarray::ArrayView1<'_, f32>, b: ndarray::ArrayView1<'_, f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

/// Rows divided by their L2 norm (`x / sqrt(sum x²)`, as transformers; a zero row
/// gives NaN there too).
fn normalized(x: &Array2<f32>) -> Array2<f32> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let n = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt() as f32;
        row.mapv_inplace(|v| v / n);
    }
    y
}

/// Text-to-other similarity logits.
#[derive(Debug, Clone)]
pub struct Similarity {
    /// The modality the texts were compared with.
    pub other: Modality,
    /// `[texts, others]`.
    pub logits_per_text: Array2<f32>,
    pub head: AlignedHead,
}

impl Similarity {
    /// `[others, texts]`: the transpose, at the other tower's own temperature where
    /// the family has one (CLAP's `logits_per_audio`).
    pub fn logits_per_other(&self) -> Array2<f32> {
        let t = self.logits_per_text.t().to_owned();
        match self.head.logit_scale_other {
            Some(a) => {
                let ratio = (f64::from(a).exp() / f64::from(self.head.logit_scale).exp()) as f32;
                t.mapv(|v| v * ratio)
            }
            None => t,
        }
    }
}

/// Zero-shot classification of inputs of one modality among text labels.
#[derive(Debug, Clone)]
pub struct ZeroShot {
    pub other: Modality,
    pub labels: Vec<String>,
    /// The texts encoded: each label put into the template.
    pub prompts: Vec<String>,
    /// `[inputs, labels]`: `logits_per_image` of the family's model.
    pub logits: Array2<f32>,
    /// `[inputs, labels]`: softmax over the labels (CLIP) or sigmoid (SigLIP).
    pub probs: Array2<f32>,
    /// Per input, the index of the label with the highest probability.
    pub best: Vec<usize>,
    pub head: AlignedHead,
}

/// The prompt template used when none is given: CLIP's "a photo of a {}." for
/// images, "the sound of a {}." for audio (as CLAP is prompted), "a video of a {}."
/// for video.
pub fn default_template(other: Modality) -> &'static str {
    match other {
        Modality::Audio => "the sound of a {}.",
        Modality::Video => "a video of a {}.",
        _ => "a photo of a {}.",
    }
}

/// The prompt for each label: `template` with `{}` replaced by the label.
pub fn prompts(labels: &[String], template: &str, other: Modality) -> Result<Vec<String>> {
    if labels.is_empty() {
        return Err(MlmfError::input(
            other,
            "zero-shot needs at least one label: expected a non-empty list of label texts",
        ));
    }
    if let Some(i) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err(MlmfError::input(
            Modality::Text,
            format!("label {i} is empty: expected a label text"),
        )
        .at_index(i));
    }
    if template.matches("{}").count() != 1 {
        return Err(MlmfError::config(
            "template",
            format!("{template:?} must contain `{{}}` exactly once (where the label goes)"),
        ));
    }
    Ok(labels
        .iter()
        .map(|l| template.replacen("{}", l, 1))
        .collect())
}

/// The index of each row's largest value (the first on ties).
pub(crate) fn argmax_rows(p: &Array2<f32>) -> Vec<usize> {
    p.rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn head(p: Probabilities, scale: f32, bias: Option<f32>) -> AlignedHead {
        AlignedHead {
            family: "test".into(),
            other: Modality::Image,
            probabilities: p,
            logit_scale: scale,
            logit_bias: bias,
            logit_scale_other: None,
            prompts: None,
            dir: PathBuf::new(),
        }
    }

    #[test]
    fn logits_are_scaled_cosines_plus_bias() {
        let t = array![[3.0f32, 4.0], [0.0, 2.0]];
        let o = array![[1.0f32, 0.0], [0.0, -5.0], [1.0, 1.0]];
        let h = head(Probabilities::Sigmoid, 2f32.ln(), Some(-1.0));
        let l = h.logits(&t, &o, None).unwrap();
        // cos(t0, o0) = 0.6, cos(t0, o1) = -0.8, cos(t1, o2) = 1/sqrt 2.
        assert!((l[(0, 0)] - (2.0 * 0.6 - 1.0)).abs() < 1e-6);
        assert!((l[(0, 1)] - (2.0 * -0.8 - 1.0)).abs() < 1e-6);
        assert!((l[(1, 2)] - (2.0 * std::f32::consts::FRAC_1_SQRT_2 - 1.0)).abs() < 1e-6);
        let p = h.probabilities(&l);
        assert!((p[(0, 0)] - 1.0 / (1.0 + (-0.2f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_argmax_picks_the_largest() {
        let h = head(Probabilities::Softmax, 0.0, None);
        let p = h.probabilities(&array![[1.0f32, 3.0, 2.0], [0.0, 0.0, 0.0]]);
        for r in p.rows() {
            assert!((r.sum() - 1.0).abs() < 1e-6);
        }
        assert!((p[(1, 0)] - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(argmax_rows(&p), vec![1, 0]);
    }

    #[test]
    fn prompts_need_labels_and_one_placeholder() {
        let labels = vec!["cat".to_string(), "dog".to_string()];
        assert_eq!(
            prompts(&labels, "a photo of a {}.", Modality::Image).unwrap(),
            vec!["a photo of a cat.", "a photo of a dog."]
        );
        assert!(matches!(
            prompts(&[], "{}", Modality::Image),
            Err(MlmfError::Input { .. })
        ));
        assert!(matches!(
            prompts(&labels, "no placeholder", Modality::Image),
            Err(MlmfError::Config { .. })
        ));
        let e = prompts(&["cat".into(), " ".into()], "{}", Modality::Image).unwrap_err();
        assert!(e.to_string().contains("label 1"), "{e}");
    }

    #[test]
    fn widths_must_match() {
        let h = head(Probabilities::Softmax, 0.0, None);
        let e = h
            .logits(&Array2::zeros((1, 3)), &Array2::zeros((1, 4)), None)
            .unwrap_err();
        assert!(e.to_string().contains("4 wide"), "{e}");
    }
}
