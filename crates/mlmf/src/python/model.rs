//! `mlmf.MultiModalLoader`, `mlmf.MultiModalModel` and `mlmf.MultiModalOutput`.

use std::path::PathBuf;
use std::sync::OnceLock;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::arrays::{batch, items, Item, RawItem};
use super::attention::host_array;
use super::config::{from_py, modality_arg, to_py, PyModality, PyMultiModalConfig};
use super::detached;
use super::fusion::modality_input;
use super::preprocess::{check_samples_shape, str_list, video_inputs, PyVideoProcessor};
use crate::config::MultiModalConfig;
use crate::encoders::RawInputs;
use crate::error::MlmfError;
use crate::loader::MultiModalLoader;
use crate::modality::Modality;
use crate::model::{MultiModalInput, MultiModalModel, MultiModalOutput};
use crate::preprocess::audio::AudioInput;
use crate::preprocess::image::ImageInput;

/// The one non-text modality a similarity or zero-shot call was given.
fn one_other<'a, 'py>(
    image: Option<&'a Bound<'py, PyAny>>,
    audio: Option<&'a Bound<'py, PyAny>>,
    video: Option<&'a Bound<'py, PyAny>>,
    call: &str,
) -> PyResult<(Modality, &'a Bound<'py, PyAny>)> {
    let given: Vec<(Modality, &Bound<'py, PyAny>)> = [
        (Modality::Image, image),
        (Modality::Audio, audio),
        (Modality::Video, video),
    ]
    .into_iter()
    .filter_map(|(m, o)| o.map(|o| (m, o)))
    .collect();
    match given.as_slice() {
        [one] => Ok(*one),
        [] => Err(MlmfError::MissingModality {
            modality: Modality::Image,
            message: format!(
                "{call} needs the inputs of one other modality: image=, audio= or video="
            ),
        }
        .into()),
        _ => Err(MlmfError::input(
            given[1].0,
            format!(
                "{call} compares texts with one modality at a time: given {} and {}",
                given[0].0, given[1].0
            ),
        )
        .into()),
    }
}

/// A byte count from an int or a string such as `"256 MiB"`.
fn byte_size(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(n) = obj.extract::<u64>() {
        return Ok(n);
    }
    let s: String = obj.extract().map_err(|_| {
        PyErr::from(MlmfError::config(
            "budget",
            "expected bytes as an int or a string like \"256 MiB\"",
        ))
    })?;
    let b: crate::config::ByteSize = s
        .parse()
        .map_err(|e: MlmfError| PyErr::from(MlmfError::config("budget", e.to_string())))?;
    Ok(b.0)
}

/// A config from a `MultiModalConfig`, a file path or a dict.
fn config_arg(obj: &Bound<'_, PyAny>) -> PyResult<MultiModalConfig> {
    if let Ok(c) = obj.extract::<PyMultiModalConfig>() {
        return Ok(c.0);
    }
    if obj.cast::<PyDict>().is_ok() {
        let c = MultiModalConfig::from_value(from_py(obj)?)?;
        c.validate()?;
        return Ok(c);
    }
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(MultiModalConfig::from_file(p)?);
    }
    Err(MlmfError::config(
        "",
        "expected a MultiModalConfig, a config file path or a dict",
    )
    .into())
}

/// Builds a model from a config plus checkpoint directories given in code.
#[pyclass(module = "mlmf._mlmf", name = "MultiModalLoader")]
pub(crate) struct PyMultiModalLoader {
    inner: MultiModalLoader,
}

#[pymethods]
impl PyMultiModalLoader {
    /// `config`: a `MultiModalConfig`, a config file path or a dict (default: empty).
    #[new]
    #[pyo3(signature = (config=None))]
    fn new(config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let config = config.map(config_arg).transpose()?.unwrap_or_default();
        Ok(Self {
            inner: MultiModalLoader::new(config),
        })
    }

    /// Sets the checkpoint directory of `modality`; returns the loader for chaining.
    fn with_modality_path<'py>(
        mut slf: PyRefMut<'py, Self>,
        modality: &Bound<'py, PyAny>,
        path: PathBuf,
    ) -> PyResult<PyRefMut<'py, Self>> {
        let m = modality_arg(modality)?;
        slf.inner = slf.inner.clone().with_modality_path(m, path);
        Ok(slf)
    }

    /// Adds a modality without a checkpoint whose embeddings (`dim` wide) the caller
    /// passes to `infer` (`custom_N=array` or `embeddings={...}`).
    fn with_given_modality<'py>(
        mut slf: PyRefMut<'py, Self>,
        modality: &Bound<'py, PyAny>,
        dim: usize,
    ) -> PyResult<PyRefMut<'py, Self>> {
        let m = modality_arg(modality)?;
        slf.inner = slf.inner.clone().with_given_modality(m, dim);
        Ok(slf)
    }

    /// Loads the encoders (concurrently), the fusion and the attention layers.
    fn load(&self, py: Python<'_>) -> PyResult<PyMultiModalModel> {
        let loader = self.inner.clone();
        let model = detached(py, move || loader.load())?;
        PyMultiModalModel::wrap(py, model)
    }

    fn __repr__(&self) -> String {
        format!("MultiModalLoader({})", self.inner.config().to_value())
    }
}

/// The whole pipeline: raw inputs in, embeddings, a fused embedding and attention out.
#[pyclass(module = "mlmf._mlmf", name = "MultiModalModel", frozen)]
pub(crate) struct PyMultiModalModel {
    pub(crate) inner: MultiModalModel,
    video: OnceLock<Py<PyVideoProcessor>>,
}

impl PyMultiModalModel {
    fn wrap(py: Python<'_>, inner: MultiModalModel) -> PyResult<Self> {
        let this = Self {
            inner,
            video: OnceLock::new(),
        };
        let untrained = this.untrained_parts();
        if !untrained.is_empty() {
            py.import("warnings")?.call_method1(
                "warn",
                (format!(
                    "MultiModalModel: {} initialised from a seed, untrained (train them with \
                     mlmf.Trainer / `mlmf train`, or give trained weights with fusion.weights / \
                     cross_modal_attention.weights / adapters.weights)",
                    untrained.join(" and ")
                ),),
            )?;
        }
        Ok(this)
    }

    fn untrained_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if self.inner.fusion().is_untrained() {
            parts.push(format!(
                "the `{}` fusion",
                self.inner.fusion().strategy().name()
            ));
        }
        for (pair, untrained) in self.inner.attention_pairs() {
            if untrained {
                parts.push(format!("the {pair} attention layer"));
            }
        }
        if self.inner.adapters().is_some_and(|a| a.is_untrained()) {
            parts.push("the adapters".to_string());
        }
        parts
    }

    fn video_processor<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyVideoProcessor>> {
        if let Some(v) = self.video.get() {
            return Ok(v.bind(py).clone());
        }
        let vp = self
            .inner
            .encoder(Modality::Video)?
            .video_processor()
            .ok_or_else(|| MlmfError::input(Modality::Video, "the video encoder has no processor"))?
            .clone();
        let obj = Py::new(py, PyVideoProcessor { inner: vp })?;
        let _ = self.video.set(obj.clone_ref(py));
        Ok(obj.into_bound(py))
    }

    /// One modality's Python inputs as owned raw inputs.
    pub(crate) fn raw_inputs(
        &self,
        m: Modality,
        obj: &Bound<'_, PyAny>,
        sampling_rate: Option<u32>,
        fps: Option<f64>,
    ) -> PyResult<RawInputs> {
        let py = obj.py();
        Ok(match m {
            Modality::Text => {
                let texts = str_list(obj)?;
                if texts.is_empty() {
                    return Err(
                        MlmfError::input(m, "empty batch: expected at least one text").into(),
                    );
                }
                RawInputs::Text(texts)
            }
            Modality::Image => {
                let expected = "a path, encoded image bytes or a uint8 array (HW or HWC)";
                let items = batch(obj, m, expected)?
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| match item.into_raw() {
                        RawItem::Source(s) => Ok(ImageInput::Source(s)),
                        RawItem::U8(a) => Ok(ImageInput::Array(a)),
                        RawItem::F32(a) => Err(PyErr::from(
                            MlmfError::input(
                                m,
                                format!(
                                    "got a float32 array of shape {:?}: expected {expected}",
                                    a.shape()
                                ),
                            )
                            .at_index(i),
                        )),
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                RawInputs::Image(items)
            }
            Modality::Audio => {
                let expected = "a path, encoded audio bytes or a float32 array [samples] or \
                                [channels, samples]";
                let items = batch(obj, m, expected)?
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| audio_item(item, i, sampling_rate, expected))
                    .collect::<PyResult<Vec<_>>>()?;
                RawInputs::Audio(items)
            }
            Modality::Video => {
                let vp = self.video_processor(py)?;
                if items(obj).is_empty() {
                    return Err(
                        MlmfError::input(m, "empty batch: expected at least one video").into(),
                    );
                }
                RawInputs::Video(video_inputs(&vp, obj, fps)?)
            }
            Modality::Custom(_) => {
                return Err(MlmfError::input(m, "custom modalities have no raw inputs").into())
            }
        })
    }
}

fn audio_item(
    item: Item<'_>,
    index: usize,
    sampling_rate: Option<u32>,
    expected: &str,
) -> PyResult<AudioInput> {
    let m = Modality::Audio;
    match item {
        Item::Source(s) => Ok(AudioInput::Source(s)),
        Item::F32(a) => samples(a, sampling_rate).map_err(|e| e.at_index(index).into()),
        Item::U8(a) => Err(MlmfError::input(
            m,
            format!(
                "got a uint8 array of shape {:?}: expected {expected}",
                a.shape()
            ),
        )
        .at_index(index)
        .into()),
    }
}

fn samples(
    a: PyReadonlyArrayDyn<'_, f32>,
    sampling_rate: Option<u32>,
) -> Result<AudioInput, MlmfError> {
    let a = a.as_array();
    check_samples_shape(a.shape())?;
    let data = match a.ndim() {
        1 => a
            .insert_axis(ndarray::Axis(0))
            .to_owned()
            .into_dimensionality(),
        _ => a.to_owned().into_dimensionality(),
    }
    .map_err(|e| MlmfError::Internal(e.to_string()))?;
    Ok(AudioInput::Samples {
        data,
        sampling_rate,
    })
}

#[pymethods]
impl PyMultiModalModel {
    /// Loads the model `config` describes: a `MultiModalConfig`, a config file path
    /// (`.toml`, `.yaml`, `.json`), a folder holding `mlmf.toml` (what training
    /// writes) or a dict.
    #[staticmethod]
    fn load(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let config = config_arg(config)?;
        let model = detached(py, move || MultiModalLoader::new(config).load())?;
        Self::wrap(py, model)
    }

    /// Runs the pipeline on any subset of the modalities, `B` items each (row `i` of
    /// every modality is one multimodal item). Text: `str` or a list of `str`; image,
    /// audio, video: paths, encoded bytes or arrays, as the processors take them.
    /// `ids`: `{modality: [id, ...]}` cache keys replacing the content.
    /// `return_attention`: compute the attention maps; `return_tokens`: include the
    /// token states.
    #[pyo3(signature = (text=None, image=None, audio=None, video=None, *, ids=None,
                        embeddings=None, return_attention=false, return_tokens=false,
                        sampling_rate=None, fps=None, **custom))]
    #[allow(clippy::too_many_arguments)]
    fn infer(
        &self,
        py: Python<'_>,
        text: Option<&Bound<'_, PyAny>>,
        image: Option<&Bound<'_, PyAny>>,
        audio: Option<&Bound<'_, PyAny>>,
        video: Option<&Bound<'_, PyAny>>,
        ids: Option<&Bound<'_, PyDict>>,
        embeddings: Option<&Bound<'_, PyDict>>,
        return_attention: bool,
        return_tokens: bool,
        sampling_rate: Option<u32>,
        fps: Option<f64>,
        custom: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyMultiModalOutput> {
        let mut input = MultiModalInput {
            return_attention,
            return_tokens,
            ..MultiModalInput::default()
        };
        for (m, obj) in [
            (Modality::Text, text),
            (Modality::Image, image),
            (Modality::Audio, audio),
            (Modality::Video, video),
        ] {
            if let Some(obj) = obj.filter(|o| !o.is_none()) {
                // A modality the model lacks is refused before any conversion.
                self.inner.encoder(m)?;
                let raw = self.raw_inputs(m, obj, sampling_rate, fps)?;
                input.inputs.insert(m, raw);
            }
        }
        let mut given: Vec<(Modality, Bound<'_, PyAny>)> = Vec::new();
        if let Some(e) = embeddings {
            for (k, v) in e.iter() {
                given.push((modality_arg(&k)?, v));
            }
        }
        if let Some(kw) = custom {
            for (k, v) in kw.iter() {
                let name: String = k.extract()?;
                let m = name
                    .strip_prefix("custom_")
                    .and_then(|n| n.parse::<u32>().ok())
                    .map(Modality::Custom)
                    .ok_or_else(|| {
                        PyErr::from(MlmfError::config(
                            name.clone(),
                            "unexpected keyword: infer takes text, image, audio, video, \
                             embeddings={modality: array}, and custom_N=array for a custom \
                             modality N",
                        ))
                    })?;
                given.push((m, v));
            }
        }
        for (m, v) in given {
            self.inner.widths(m)?;
            if input.embeddings.contains_key(&m) {
                return Err(MlmfError::input(m, "embeddings given twice").into());
            }
            input.embeddings.insert(m, modality_input(m, &v)?);
        }
        if let Some(ids) = ids {
            for (k, v) in ids.iter() {
                let m = modality_arg(&k)?;
                let v: Vec<String> = v.extract().map_err(|_| {
                    PyErr::from(MlmfError::input(
                        m,
                        "ids must be a list of str, one per item",
                    ))
                })?;
                input.ids.insert(m, v);
            }
        }
        let model = self.inner.clone();
        let out = detached(py, move || model.infer(input))?;
        PyMultiModalOutput::from_output(py, &self.inner, out, return_tokens)
    }

    /// `infer` for asyncio callers: runs in the loop's default executor (the work
    /// itself runs without the GIL) and returns an awaitable.
    #[pyo3(signature = (**kwargs))]
    fn ainfer<'py>(
        slf: &Bound<'py, Self>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let call = py
            .import("functools")?
            .getattr("partial")?
            .call((slf.getattr("infer")?,), kwargs)?;
        let aio = py.import("asyncio")?;
        let loop_ = aio.call_method0("get_running_loop")?;
        loop_.call_method1("run_in_executor", (py.None(), call))
    }

    /// Similarity logits of `text` against one other modality's inputs, from the
    /// heads of the aligned checkpoint both towers load (CLIP, SigLIP): the
    /// `logits_per_text` / `logits_per_image` of the checkpoint's own model.
    #[pyo3(signature = (text, image=None, audio=None, video=None, *, sampling_rate=None,
                        fps=None))]
    #[allow(clippy::too_many_arguments)]
    fn similarity(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        image: Option<&Bound<'_, PyAny>>,
        audio: Option<&Bound<'_, PyAny>>,
        video: Option<&Bound<'_, PyAny>>,
        sampling_rate: Option<u32>,
        fps: Option<f64>,
    ) -> PyResult<super::aligned::PySimilarity> {
        let (m, obj) = one_other(image, audio, video, "similarity")?;
        let texts = str_list(text)?;
        let others = self.raw_inputs(m, obj, sampling_rate, fps)?;
        let inner = detached(py, || self.inner.similarity(texts, others))?;
        Ok(super::aligned::PySimilarity { inner })
    }

    /// Classifies each input of one modality among `labels` (each put into
    /// `template`; by default "a photo of a {}." for images, "the sound of a {}." for
    /// audio, "a video of a {}." for video), with the probabilities the checkpoint's
    /// family uses: a softmax over the labels for CLIP and CLAP, a sigmoid per label
    /// for SigLIP.
    #[pyo3(signature = (image=None, audio=None, video=None, *, labels,
                        template=None, sampling_rate=None, fps=None))]
    #[allow(clippy::too_many_arguments)]
    fn zero_shot(
        &self,
        py: Python<'_>,
        image: Option<&Bound<'_, PyAny>>,
        audio: Option<&Bound<'_, PyAny>>,
        video: Option<&Bound<'_, PyAny>>,
        labels: &Bound<'_, PyAny>,
        template: Option<String>,
        sampling_rate: Option<u32>,
        fps: Option<f64>,
    ) -> PyResult<super::aligned::PyZeroShot> {
        let (m, obj) = one_other(image, audio, video, "zero_shot")?;
        let labels = str_list(labels)?;
        let inputs = self.raw_inputs(m, obj, sampling_rate, fps)?;
        let template = template.unwrap_or_else(|| crate::aligned::default_template(m).to_string());
        let inner = detached(py, || self.inner.zero_shot(inputs, &labels, &template))?;
        Ok(super::aligned::PyZeroShot { inner })
    }

    /// Switches a modality on or off without reloading; while off its inputs are
    /// ignored (and listed in the output's `skipped`).
    fn set_enabled(&self, modality: &Bound<'_, PyAny>, enabled: bool) -> PyResult<()> {
        Ok(self.inner.set_enabled(modality_arg(modality)?, enabled)?)
    }

    fn enable(&self, modality: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_enabled(modality, true)
    }

    fn disable(&self, modality: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_enabled(modality, false)
    }

    /// Every modality of the model.
    #[getter]
    fn modalities(&self) -> Vec<PyModality> {
        self.inner
            .modalities()
            .into_iter()
            .map(PyModality)
            .collect()
    }

    /// The modalities switched on.
    #[getter]
    fn enabled_modalities(&self) -> Vec<PyModality> {
        self.inner
            .enabled_modalities()
            .into_iter()
            .map(PyModality)
            .collect()
    }

    /// The configuration, with checkpoint paths filled in.
    #[getter]
    fn config(&self) -> PyMultiModalConfig {
        PyMultiModalConfig(self.inner.config().clone())
    }

    /// Width of the fused embedding.
    #[getter]
    fn out_dim(&self) -> usize {
        self.inner.fusion().out_dim()
    }

    /// `{modality: (model_type, hidden_size, output_dim)}`; a modality whose
    /// embeddings are given has model_type `"given"`.
    #[getter]
    fn encoders(&self) -> PyResult<std::collections::BTreeMap<String, (String, usize, usize)>> {
        self.inner
            .modalities()
            .into_iter()
            .map(|m| {
                let (pooled, tokens) = self.inner.widths(m)?;
                let kind = match self.inner.encoder(m) {
                    Ok(e) => e.model().model_type().to_string(),
                    Err(_) => "given".to_string(),
                };
                Ok((m.to_string(), (kind, tokens, pooled)))
            })
            .collect::<Result<_, MlmfError>>()
            .map_err(PyErr::from)
    }

    /// Whether any learned layer (fusion, attention pairs) runs on seeded weights.
    #[getter]
    fn untrained(&self) -> bool {
        !self.untrained_parts().is_empty()
    }

    /// Each text's token count after truncation, as the text encoder sees it.
    fn count_tokens(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<usize>> {
        let model = &self.inner;
        detached(py, || {
            let enc = model.encoder(crate::modality::Modality::Text)?;
            Ok(enc.count_tokens(&texts)?.unwrap_or_default())
        })
    }

    /// Counters, latency percentiles (ms) and cache statistics, as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = serde_json::to_value(self.inner.stats())
            .map_err(|e| MlmfError::Internal(e.to_string()))?;
        to_py(py, &v)
    }

    /// Zeroes the counters and latency windows (cached entries stay).
    fn reset_stats(&self) {
        self.inner.reset_stats();
    }

    /// Drops every cached entry in memory; with `disk=True` the on-disk tier's too.
    #[pyo3(signature = (*, disk=false))]
    fn clear_cache(&self, py: Python<'_>, disk: bool) -> PyResult<()> {
        self.inner.clear_cache();
        if disk {
            let model = self.inner.clone();
            detached(py, move || match model.disk_cache() {
                Some(d) => d.clear(),
                None => Ok(()),
            })?;
        }
        Ok(())
    }

    /// Changes the total memory of the in-memory caches (bytes, or `"256 MiB"`); when it
    /// shrinks, modalities of lower `cache.modalities.<m>.priority` give up memory
    /// first. Entries that no longer fit are dropped now.
    fn set_cache_budget(&self, total: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = byte_size(total)?;
        Ok(self.inner.set_cache_budget(bytes)?)
    }

    /// Sets one modality's cache budget (bytes or `"64 MiB"`).
    fn set_modality_budget(
        &self,
        modality: &Bound<'_, PyAny>,
        bytes: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let m = modality_arg(modality)?;
        Ok(self.inner.set_modality_budget(m, byte_size(bytes)?)?)
    }

    /// `{cache name: budget in bytes}` for every in-memory cache.
    fn cache_budgets(&self) -> std::collections::BTreeMap<String, u64> {
        self.inner.cache_budgets()
    }

    /// Reads every entry of the on-disk tier and checks it:
    /// `{"entries": n, "corrupt": n}` (`None` without a disk tier).
    fn check_disk_cache<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let model = self.inner.clone();
        let counts = detached(py, move || {
            model.disk_cache().map(|d| d.verify()).transpose()
        })?;
        counts
            .map(|(entries, corrupt)| {
                let d = PyDict::new(py);
                d.set_item("entries", entries)?;
                d.set_item("corrupt", corrupt)?;
                Ok(d)
            })
            .transpose()
    }

    fn __repr__(&self) -> String {
        let f = self.inner.fusion();
        format!(
            "MultiModalModel(modalities=[{}], fusion={:?}, out_dim={})",
            self.inner
                .modalities()
                .iter()
                .map(|m| format!("{m:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(", "),
            f.strategy().name(),
            f.out_dim()
        )
    }

    /// Pickles as its configuration: unpickling loads the checkpoints again (they must
    /// exist at the same paths); caches and statistics start empty.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let ctor = py.get_type::<Self>().getattr("_from_config")?;
        let this = slf.get();
        let mut config = this.inner.config().clone();
        for m in this.inner.modalities() {
            config.modalities.entry(m).or_default().enabled =
                this.inner.enabled_modalities().contains(&m);
        }
        let args = PyTuple::new(py, [to_py(py, &config.to_value())?])?;
        Ok((ctor, args))
    }

    #[staticmethod]
    fn _from_config(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let config = config_arg(config)?;
        let model = detached(py, move || MultiModalLoader::new(config).load())?;
        Ok(Self {
            inner: model,
            video: OnceLock::new(),
        })
    }
}

/// What `MultiModalModel.infer` returns.
#[pyclass(module = "mlmf._mlmf", name = "MultiModalOutput", frozen)]
pub(crate) struct PyMultiModalOutput {
    /// `{modality: float32 [B, D]}` pooled embeddings.
    #[pyo3(get)]
    embeddings: Py<PyDict>,
    /// `{modality: float32 [B, adapters.dim]}` the adapters' output per adapted
    /// modality (comparable across modalities once trained); empty without adapters.
    #[pyo3(get)]
    projected: Py<PyDict>,
    /// float32 `[B, out_dim]`.
    #[pyo3(get)]
    fused: Py<PyAny>,
    /// `{modality: weight [B]}` per-modality fusion weights, or None.
    #[pyo3(get)]
    gates: Py<PyAny>,
    /// `{name: float32 [B, H, Tq, Tk]}` (`"text->image"`, `"fusion/layers.0"`).
    #[pyo3(get)]
    attention: Py<PyDict>,
    /// `{modality: {"hidden_states": [B, T, D], "mask": uint8 [B, T]}}` with
    /// `return_tokens`, else empty.
    #[pyo3(get)]
    tokens: Py<PyDict>,
    /// Modalities whose inputs were ignored because they are disabled.
    #[pyo3(get)]
    skipped: Py<PyList>,
    /// What the call did: per modality items, cache hits, items encoded, stage times.
    #[pyo3(get)]
    stats: Py<PyAny>,
    /// With late `similarity` fusion and texts plus the aligned modality in the call:
    /// a `Similarity` of every text row against every row of that modality; else None.
    #[pyo3(get)]
    similarity: Py<PyAny>,
}

impl PyMultiModalOutput {
    fn from_output(
        py: Python<'_>,
        model: &MultiModalModel,
        out: MultiModalOutput,
        return_tokens: bool,
    ) -> PyResult<Self> {
        let embeddings = PyDict::new(py);
        for (m, t) in &out.embeddings {
            embeddings.set_item(m.to_string(), host_array(py, t)?)?;
        }
        let projected = PyDict::new(py);
        for (m, t) in &out.projected {
            projected.set_item(m.to_string(), host_array(py, t)?)?;
        }
        let gates = match &out.gates {
            Some(g) => {
                let d = PyDict::new(py);
                for (m, col) in model.gate_columns(g)? {
                    d.set_item(
                        m.to_string(),
                        numpy::IntoPyArray::into_pyarray(ndarray::Array1::from(col), py),
                    )?;
                }
                d.into_any().unbind()
            }
            None => py.None(),
        };
        let attention = PyDict::new(py);
        for (name, t) in &out.attention {
            attention.set_item(name, host_array(py, t)?)?;
        }
        let tokens = PyDict::new(py);
        if return_tokens {
            for (m, t) in &out.tokens {
                let d = PyDict::new(py);
                d.set_item("hidden_states", host_array(py, &t.hidden_states)?)?;
                let mask = t
                    .mask
                    .to_dtype(candle_core::DType::U8)
                    .and_then(|m| m.to_vec2::<u8>())
                    .map_err(|e| MlmfError::Internal(e.to_string()))?;
                let rows = mask.len();
                let cols = mask.first().map_or(0, Vec::len);
                let a = ndarray::Array2::from_shape_vec(
                    (rows, cols),
                    mask.into_iter().flatten().collect(),
                )
                .map_err(|e| MlmfError::Internal(e.to_string()))?;
                d.set_item("mask", numpy::IntoPyArray::into_pyarray(a, py))?;
                tokens.set_item(m.to_string(), d)?;
            }
        }
        let similarity = match out.similarity.clone() {
            Some(inner) => Py::new(py, super::aligned::PySimilarity { inner })?.into_any(),
            None => py.None(),
        };
        let skipped = PyList::new(py, out.skipped.iter().map(ToString::to_string))?;
        let stats =
            serde_json::to_value(&out.stats).map_err(|e| MlmfError::Internal(e.to_string()))?;
        Ok(Self {
            embeddings: embeddings.unbind(),
            projected: projected.unbind(),
            fused: host_array(py, &out.fused)?,
            gates,
            attention: attention.unbind(),
            tokens: tokens.unbind(),
            skipped: skipped.unbind(),
            stats: to_py(py, &stats)?.unbind(),
            similarity,
        })
    }
}

#[pymethods]
impl PyMultiModalOutput {
    fn __repr__(&self, py: Python<'_>) -> String {
        let shape = |o: &Bound<'_, PyAny>| {
            o.getattr("shape")
                .and_then(|s| s.extract::<Vec<usize>>())
                .map(|s| format!("{s:?}"))
                .unwrap_or_default()
        };
        let emb: Vec<String> = self
            .embeddings
            .bind(py)
            .iter()
            .map(|(k, v)| format!("{k}: {}", shape(&v)))
            .collect();
        format!(
            "MultiModalOutput(embeddings={{{}}}, fused={}, attention={:?})",
            emb.join(", "),
            shape(self.fused.bind(py)),
            self.attention
                .bind(py)
                .keys()
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMultiModalLoader>()?;
    m.add_class::<PyMultiModalModel>()?;
    m.add_class::<PyMultiModalOutput>()?;
    Ok(())
}
