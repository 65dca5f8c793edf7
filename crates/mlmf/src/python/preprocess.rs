//! `mlmf.TextProcessor`, `mlmf.ImageProcessor`, `mlmf.AudioProcessor`,
//! `mlmf.VideoProcessor` and the free preprocessing functions.

use std::collections::HashMap;
use std::path::PathBuf;

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::arrays::items;
use super::detached;
use crate::error::MlmfError;
use crate::modality::Modality;
use crate::preprocess::text::{Padding, TextProcessor, TextProcessorConfig};

/// Tokenises text with a checkpoint's tokenizer.json.
#[pyclass(name = "TextProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyTextProcessor {
    inner: TextProcessor,
    path: PathBuf,
}

/// A str or a list of str, each item checked.
fn str_list(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    items(obj)
        .iter()
        .enumerate()
        .map(|(i, o)| {
            o.extract::<String>().map_err(|_| {
                let got = o
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                MlmfError::input(Modality::Text, format!("got {got}: expected a str"))
                    .at_index(i)
                    .into()
            })
        })
        .collect()
}

fn text_config(
    max_length: Option<usize>,
    padding: &Bound<'_, PyAny>,
    truncation: bool,
    add_special_tokens: bool,
) -> PyResult<TextProcessorConfig> {
    let padding = if let Ok(b) = padding.extract::<bool>() {
        if b {
            Padding::Longest
        } else {
            Padding::DoNotPad
        }
    } else {
        padding.extract::<String>()?.parse()?
    };
    Ok(TextProcessorConfig {
        max_length,
        padding,
        truncation,
        add_special_tokens,
    })
}

#[pymethods]
impl PyTextProcessor {
    /// Loads tokenizer.json (+ tokenizer_config.json) from a checkpoint directory or
    /// the tokenizer.json file itself.
    #[staticmethod]
    #[pyo3(signature = (path, max_length=None, padding=None, truncation=true, add_special_tokens=true))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        max_length: Option<usize>,
        padding: Option<&Bound<'_, PyAny>>,
        truncation: bool,
        add_special_tokens: bool,
    ) -> PyResult<Self> {
        let longest = "longest".into_pyobject(py)?.into_any();
        let config = text_config(
            max_length,
            padding.unwrap_or(&longest),
            truncation,
            add_special_tokens,
        )?;
        let p = path.clone();
        let inner = detached(py, move || TextProcessor::from_pretrained(&p, config))?;
        Ok(Self { inner, path })
    }

    /// Tokenises a string or a list of strings. Keyword arguments override the
    /// processor's settings for this call.
    #[pyo3(signature = (texts, text_pair=None, *, max_length=None, padding=None, truncation=None, add_special_tokens=None))]
    #[allow(clippy::too_many_arguments)]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        text_pair: Option<&Bound<'py, PyAny>>,
        max_length: Option<usize>,
        padding: Option<&Bound<'py, PyAny>>,
        truncation: Option<bool>,
        add_special_tokens: Option<bool>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let strings = str_list(texts)?;
        let pairs = text_pair.map(str_list).transpose()?;
        let base = self.inner.config();
        let cfg = TextProcessorConfig {
            max_length: max_length.or(base.max_length),
            padding: match padding {
                Some(p) => text_config(None, p, true, true)?.padding,
                None => base.padding,
            },
            truncation: truncation.unwrap_or(base.truncation),
            add_special_tokens: add_special_tokens.unwrap_or(base.add_special_tokens),
        };
        let proc = if &cfg == base {
            None
        } else {
            Some(self.inner.with_config(cfg)?)
        };
        let inner = proc.as_ref().unwrap_or(&self.inner);
        let batch = detached(py, || match &pairs {
            Some(p) => inner.encode_pairs(&strings, p),
            None => inner.encode(&strings),
        })?;
        let out = PyDict::new(py);
        out.set_item("input_ids", batch.input_ids.into_pyarray(py))?;
        out.set_item("attention_mask", batch.attention_mask.into_pyarray(py))?;
        out.set_item("token_type_ids", batch.token_type_ids.into_pyarray(py))?;
        Ok(out)
    }

    /// Turns ids back into text.
    #[pyo3(signature = (ids, skip_special_tokens=true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        Ok(self.inner.decode(&ids, skip_special_tokens)?)
    }

    /// The settings in use.
    #[getter]
    fn config(&self) -> HashMap<&'static str, Option<String>> {
        let c = self.inner.config();
        HashMap::from([
            ("max_length", c.max_length.map(|n| n.to_string())),
            ("padding", Some(format!("{:?}", c.padding).to_lowercase())),
            ("truncation", Some(c.truncation.to_string())),
            ("add_special_tokens", Some(c.add_special_tokens.to_string())),
        ])
    }

    #[getter]
    fn model_max_length(&self) -> Option<usize> {
        self.inner.model_max_length()
    }

    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token().map(|(id, _)| id)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!("TextProcessor({:?})", self.path)
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let c = self.inner.config();
        let ctor = py.get_type::<Self>().getattr("from_pretrained")?;
        let padding = match c.padding {
            Padding::Longest => "longest",
            Padding::MaxLength => "max_length",
            Padding::DoNotPad => "do_not_pad",
        };
        let args = (
            self.path.clone(),
            c.max_length,
            padding,
            c.truncation,
            c.add_special_tokens,
        )
            .into_pyobject(py)?;
        Ok((ctor, args))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTextProcessor>()?;
    Ok(())
}
