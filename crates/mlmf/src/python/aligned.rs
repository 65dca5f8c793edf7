//! `mlmf.Similarity` and `mlmf.ZeroShot`: what `MultiModalModel.similarity` and
//! `MultiModalModel.zero_shot` return (the work is in `crate::model::aligned`).

use std::path::PathBuf;

use numpy::{IntoPyArray, PyArray2, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::exceptions::PyAttributeError;
use pyo3::prelude::*;

use super::config::PyModality;
use super::detached;
use crate::aligned::{AlignedHead, Similarity, ZeroShot};
use crate::error::MlmfError;

fn head_repr(h: &AlignedHead) -> String {
    match h.logit_bias {
        Some(b) => format!(
            "{}, logit_scale={}, logit_bias={}",
            h.family, h.logit_scale, b
        ),
        None => format!("{}, logit_scale={}", h.family, h.logit_scale),
    }
}

/// Similarity logits of texts against another modality's inputs, as the checkpoint's
/// own model computes them (`logits_per_text`, and its transpose).
#[pyclass(module = "mlmf._mlmf", name = "Similarity", frozen)]
pub(crate) struct PySimilarity {
    pub(crate) inner: Similarity,
}

#[pymethods]
impl PySimilarity {
    /// `[texts, others]` float32.
    #[getter]
    fn logits_per_text<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.inner.logits_per_text.clone().into_pyarray(py)
    }

    /// `[others, texts]` float32: the transpose.
    #[getter]
    fn logits_per_other<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.inner.logits_per_other().into_pyarray(py)
    }

    /// `logits_per_other` when the other modality is image (as transformers names it).
    #[getter]
    fn logits_per_image<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if self.inner.other != crate::modality::Modality::Image {
            return Err(PyAttributeError::new_err(format!(
                "these texts were compared with {}: use logits_per_other",
                self.inner.other
            )));
        }
        Ok(self.logits_per_other(py))
    }

    /// `logits_per_other` when the other modality is audio (CLAP, at its
    /// `logit_scale_a`).
    #[getter]
    fn logits_per_audio<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if self.inner.other != crate::modality::Modality::Audio {
            return Err(PyAttributeError::new_err(format!(
                "these texts were compared with {}: use logits_per_other",
                self.inner.other
            )));
        }
        Ok(self.logits_per_other(py))
    }

    /// `logits_per_other` when the other modality is video (X-CLIP's
    /// `logits_per_video`).
    #[getter]
    fn logits_per_video<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if self.inner.other != crate::modality::Modality::Video {
            return Err(PyAttributeError::new_err(format!(
                "these texts were compared with {}: use logits_per_other",
                self.inner.other
            )));
        }
        Ok(self.logits_per_other(py))
    }

    /// CLAP's temperature for `logits_per_audio` (`logit_scale_a`); `None` for
    /// families with one temperature.
    #[getter]
    fn logit_scale_other(&self) -> Option<f32> {
        self.inner.head.logit_scale_other
    }

    /// The modality the texts were compared with.
    #[getter]
    fn modality(&self) -> PyModality {
        PyModality(self.inner.other)
    }

    /// The checkpoint's `model_type` (`clip`, `siglip`).
    #[getter]
    fn family(&self) -> String {
        self.inner.head.family.clone()
    }

    #[getter]
    fn logit_scale(&self) -> f32 {
        self.inner.head.logit_scale
    }

    #[getter]
    fn logit_bias(&self) -> Option<f32> {
        self.inner.head.logit_bias
    }

    fn __repr__(&self) -> String {
        let (n, m) = self.inner.logits_per_text.dim();
        format!(
            "Similarity({n} texts x {m} {}; {})",
            self.inner.other,
            head_repr(&self.inner.head)
        )
    }
}

/// Zero-shot classification: each input's probabilities over the labels.
#[pyclass(module = "mlmf._mlmf", name = "ZeroShot", frozen)]
pub(crate) struct PyZeroShot {
    pub(crate) inner: ZeroShot,
}

#[pymethods]
impl PyZeroShot {
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.inner.labels.clone()
    }

    /// The texts encoded: each label put into the template.
    #[getter]
    fn prompts(&self) -> Vec<String> {
        self.inner.prompts.clone()
    }

    /// `[inputs, labels]` float32 (`logits_per_image`).
    #[getter]
    fn logits<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.inner.logits.clone().into_pyarray(py)
    }

    /// `[inputs, labels]` float32: softmax over the labels (CLIP) or sigmoid (SigLIP).
    #[getter]
    fn probs<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f32>> {
        self.inner.probs.clone().into_pyarray(py)
    }

    /// Per input, the label with the highest probability.
    #[getter]
    fn best(&self) -> Vec<String> {
        self.inner
            .best
            .iter()
            .map(|&i| self.inner.labels[i].clone())
            .collect()
    }

    /// Per input, the index of that label.
    #[getter]
    fn best_index(&self) -> Vec<usize> {
        self.inner.best.clone()
    }

    /// `"softmax"` or `"sigmoid"`.
    #[getter]
    fn probabilities(&self) -> &'static str {
        self.inner.head.probabilities.name()
    }

    #[getter]
    fn modality(&self) -> PyModality {
        PyModality(self.inner.other)
    }

    #[getter]
    fn family(&self) -> String {
        self.inner.head.family.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "ZeroShot({} {} x {} labels, {}; best: {:?})",
            self.inner.best.len(),
            self.inner.other,
            self.inner.labels.len(),
            head_repr(&self.inner.head),
            self.best()
        )
    }
}

/// The heads of an aligned checkpoint, read once, scoring vectors computed elsewhere
/// (the Ray Serve ingress): what `MultiModalModel.similarity` does after encoding.
#[pyclass(module = "mlmf._mlmf", name = "_AlignedHead", frozen)]
pub(crate) struct PyAlignedHead {
    inner: AlignedHead,
}

#[pymethods]
impl PyAlignedHead {
    #[new]
    fn new(py: Python<'_>, checkpoint: PathBuf) -> PyResult<Self> {
        let inner = detached(py, move || AlignedHead::from_checkpoint(&checkpoint))?;
        Ok(Self { inner })
    }

    /// Whether scoring needs the other tower's token states (X-CLIP's prompts).
    #[getter]
    fn needs_tokens(&self) -> bool {
        self.inner.needs_tokens()
    }

    /// The similarity of pooled text vectors `[T, D]` with the other tower's pooled
    /// vectors `[O, D]` (and its token states `[O, P, D]` when `needs_tokens`).
    #[pyo3(signature = (text, other, other_tokens=None))]
    fn similarity(
        &self,
        py: Python<'_>,
        text: PyReadonlyArray2<'_, f32>,
        other: PyReadonlyArray2<'_, f32>,
        other_tokens: Option<PyReadonlyArray3<'_, f32>>,
    ) -> PyResult<PySimilarity> {
        let (t, o) = (text.as_array().to_owned(), other.as_array().to_owned());
        let tokens = other_tokens.map(|a| {
            let a = a.as_array();
            (a.iter().copied().collect::<Vec<f32>>(), a.dim())
        });
        let head = &self.inner;
        let inner = detached(py, move || {
            let tokens = tokens
                .map(|(v, dims)| {
                    candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu)
                        .map_err(|e| MlmfError::Internal(e.to_string()))
                })
                .transpose()?;
            if head.needs_tokens() && tokens.is_none() {
                return Err(MlmfError::input(
                    head.other,
                    format!(
                        "{} similarity needs the {} token states",
                        head.family, head.other
                    ),
                ));
            }
            Ok(Similarity {
                other: head.other,
                logits_per_text: head.logits(&t, &o, tokens.as_ref())?,
                head: head.clone(),
            })
        })?;
        Ok(PySimilarity { inner })
    }
}

/// The zero-shot answer from the similarity of `prompts` (each label put into the
/// template) with the inputs.
#[pyfunction]
fn _zero_shot_from(
    similarity: &PySimilarity,
    labels: Vec<String>,
    prompts: Vec<String>,
) -> PyZeroShot {
    PyZeroShot {
        inner: crate::model::zero_shot_from(similarity.inner.clone(), &labels, prompts),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySimilarity>()?;
    m.add_class::<PyZeroShot>()?;
    m.add_class::<PyAlignedHead>()?;
    m.add_function(wrap_pyfunction!(_zero_shot_from, m)?)?;
    Ok(())
}
