//! `mlmf.TextProcessor`, `mlmf.ImageProcessor`, `mlmf.AudioProcessor`,
//! `mlmf.VideoProcessor` and the free preprocessing functions.

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::{Array1, Array3, ArrayD};
use numpy::PyUntypedArrayMethods;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4, PyArrayDyn, PyArrayMethods,
    PyReadonlyArray1, PyReadonlyArray4, PyReadonlyArrayDyn,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use serde_json::Value;

use super::arrays::{batch, items, raw_item, Item, RawItem};
use super::{detached, guarded};
use crate::config::PreprocessingConfig;
use crate::error::MlmfError;
use crate::modality::Modality;
use crate::preprocess::audio::{self as aud, AudioProcessor, AudioProcessorConfig, AudioRef};
use crate::preprocess::image::{
    self as img, ImageProcessor, ImageProcessorConfig, ImageRef, Resample,
};
use crate::preprocess::text::{
    Padding, TextProcessor, TextProcessorConfig, DEFAULT_MAX_INPUT_BYTES,
};
use crate::preprocess::video::{
    FrameSampler, ShortVideo, VideoInput, VideoProcessor, VideoProcessorConfig,
};
use crate::preprocess::Source;

/// Tokenises text with a checkpoint's tokenizer.json.
#[pyclass(name = "TextProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyTextProcessor {
    inner: TextProcessor,
    path: PathBuf,
}

/// A str or a list of str, each item checked.
pub(crate) fn str_list(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
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
    max_input_bytes: usize,
    prefix: String,
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
        max_input_bytes,
        prefix,
    })
}

// The literal default in `from_pretrained`'s signature (what Python shows) is this one.
const _: () = assert!(DEFAULT_MAX_INPUT_BYTES == 65536);

#[pymethods]
impl PyTextProcessor {
    /// Loads tokenizer.json (+ tokenizer_config.json) from a checkpoint directory or
    /// the tokenizer.json file itself.
    #[staticmethod]
    #[pyo3(signature = (path, max_length=None, padding=None, truncation=true, add_special_tokens=true, max_input_bytes=65536, prefix=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        max_length: Option<usize>,
        padding: Option<&Bound<'_, PyAny>>,
        truncation: bool,
        add_special_tokens: bool,
        max_input_bytes: usize,
        prefix: Option<String>,
    ) -> PyResult<Self> {
        let longest = "longest".into_pyobject(py)?.into_any();
        let config = text_config(
            max_length,
            padding.unwrap_or(&longest),
            truncation,
            add_special_tokens,
            max_input_bytes,
            prefix.unwrap_or_default(),
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
                Some(p) => {
                    text_config(None, p, true, true, base.max_input_bytes, String::new())?.padding
                }
                None => base.padding,
            },
            truncation: truncation.unwrap_or(base.truncation),
            add_special_tokens: add_special_tokens.unwrap_or(base.add_special_tokens),
            max_input_bytes: base.max_input_bytes,
            prefix: base.prefix.clone(),
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
            ("max_input_bytes", Some(c.max_input_bytes.to_string())),
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
            c.max_input_bytes,
            c.prefix.clone(),
        )
            .into_pyobject(py)?;
        Ok((ctor, args))
    }
}

// ---------------------------------------------------------------- image

/// Python kwargs -> a JSON object (via the json module, so nested dicts/lists work).
pub(crate) fn kwargs_json(
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<serde_json::Map<String, Value>> {
    let Some(kw) = kwargs else {
        return Ok(serde_json::Map::new());
    };
    let py = kw.py();
    let text: String = py
        .import("json")?
        .call_method1("dumps", (kw,))?
        .extract()
        .map_err(|e: PyErr| MlmfError::config("", format!("settings must be JSON-like: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(MlmfError::config("", "expected keyword settings").into()),
    }
}

/// A processor config as Python data (its Hugging Face keys).
pub(crate) fn config_to_py<'py, T: serde::Serialize>(
    py: Python<'py>,
    cfg: &T,
) -> PyResult<Bound<'py, PyAny>> {
    let v = serde_json::to_value(cfg).map_err(|e| MlmfError::Internal(e.to_string()))?;
    super::config::to_py(py, &v)
}

/// A processor config as JSON text, for pickling.
pub(crate) fn config_to_text<T: serde::Serialize>(cfg: &T) -> PyResult<String> {
    Ok(serde_json::to_string(cfg).map_err(|e| MlmfError::Internal(e.to_string()))?)
}

/// A processor config back from [`config_to_text`].
pub(crate) fn config_from_text<T: serde::de::DeserializeOwned>(text: &str) -> PyResult<T> {
    Ok(serde_json::from_str(text)
        .map_err(|e| MlmfError::config("", format!("bad serialised processor: {e}")))?)
}

const IMAGE_EXPECTED: &str = "a path, encoded image bytes or a uint8 array (HW or HWC)";

/// One image argument: an encoded source, or pixels borrowed from a NumPy array.
pub(crate) enum ImageArg<'py> {
    Source(Source),
    Pixels(PyReadonlyArrayDyn<'py, u8>),
}

impl ImageArg<'_> {
    pub(crate) fn as_ref(&self) -> ImageRef<'_> {
        match self {
            Self::Source(s) => ImageRef::Source(s),
            Self::Pixels(a) => ImageRef::Pixels(a.as_array()),
        }
    }
}

/// A batch of image arguments; uint8 arrays are read in place, not copied.
pub(crate) fn image_args<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<ImageArg<'py>>> {
    batch(obj, Modality::Image, IMAGE_EXPECTED)?
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Item::Source(s) => Ok(ImageArg::Source(s)),
            Item::U8(a) => Ok(ImageArg::Pixels(a)),
            Item::F32(a) => Err(float_image(a.shape(), i)),
        })
        .collect()
}

/// An array of a dtype the modality does not take.
fn wrong_dtype(
    modality: Modality,
    dtype: &str,
    shape: &[usize],
    expected: &str,
    index: usize,
) -> PyErr {
    MlmfError::input(
        modality,
        format!("got a {dtype} array of shape {shape:?}: expected {expected}"),
    )
    .at_index(index)
    .into()
}

fn float_image(shape: &[usize], index: usize) -> PyErr {
    wrong_dtype(Modality::Image, "float32", shape, IMAGE_EXPECTED, index)
}

/// Decodes, resizes, crops and normalises images (CLIP, SigLIP and alike).
#[pyclass(name = "ImageProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyImageProcessor {
    pub(crate) inner: ImageProcessor,
}

#[pymethods]
impl PyImageProcessor {
    /// Keyword settings use the Hugging Face preprocessor_config.json names; anything
    /// not given takes CLIP's value (shortest edge 224, center crop 224, bicubic, CLIP
    /// mean/std).
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut obj = kwargs_json(kwargs)?;
        // The processor type picks the defaults (CLIP unless told otherwise); every
        // other key must be a setting the processor has.
        let kind = obj
            .remove("image_processor_type")
            .unwrap_or_else(|| "CLIPImageProcessor".into());
        let base = serde_json::json!({ "image_processor_type": kind });
        let cfg = PreprocessingConfig(obj).image(Some(&base))?;
        Ok(Self {
            inner: ImageProcessor::new(cfg)?,
        })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or the file).
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = detached(py, move || ImageProcessor::from_pretrained(&path))?;
        Ok(Self { inner })
    }

    #[staticmethod]
    fn _from_config_json(text: &str) -> PyResult<Self> {
        let cfg = config_from_text(text)?;
        Ok(Self {
            inner: ImageProcessor::new(cfg)?,
        })
    }

    /// Preprocesses a batch: float32 `[B, 3, H, W]`.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        let args = image_args(images)?;
        let refs: Vec<ImageRef<'_>> = args.iter().map(ImageArg::as_ref).collect();
        let out = detached(py, || self.inner.process_refs(&refs))?;
        Ok(out.into_pyarray(py))
    }

    /// Decodes one image and converts it to RGB: uint8 `[H, W, 3]`.
    fn load<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray3<u8>>> {
        let args = image_args(image)?;
        let [arg] = args.as_slice() else {
            return Err(MlmfError::input(Modality::Image, "load takes one image").into());
        };
        let input = arg.as_ref();
        let rgb = detached(py, || self.inner.load(input).map_err(|e| e.at_index(0)))?;
        Ok(rgb_to_array(rgb).into_pyarray(py))
    }

    /// The settings, with Hugging Face key names.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        config_to_py(py, self.inner.config())
    }

    fn __repr__(&self) -> String {
        format!("ImageProcessor({:?})", self.inner.config())
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let text = config_to_text(self.inner.config())?;
        Ok((py.get_type::<Self>().getattr("_from_config_json")?, (text,)))
    }
}

fn rgb_to_array(rgb: image::RgbImage) -> Array3<u8> {
    let (w, h) = rgb.dimensions();
    Array3::from_shape_vec((h as usize, w as usize, 3), rgb.into_raw())
        .unwrap_or_else(|_| Array3::zeros((0, 0, 3)))
}

/// Decodes an image file or bytes and converts it to RGB: uint8 `[H, W, 3]`.
#[pyfunction]
#[pyo3(signature = (image, max_pixels=None))]
fn decode_image<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    max_pixels: Option<u64>,
) -> PyResult<Bound<'py, PyArray3<u8>>> {
    let source = match raw_item(image, Modality::Image, 0, "a path or encoded image bytes")? {
        RawItem::Source(s) => s,
        _ => {
            return Err(MlmfError::input(
                Modality::Image,
                "decode_image takes a path or encoded bytes, not an array",
            )
            .at_index(0)
            .into())
        }
    };
    let limit = max_pixels.unwrap_or(crate::preprocess::image::DEFAULT_MAX_IMAGE_PIXELS);
    let rgb = detached(py, || {
        let bytes = source.bytes(Modality::Image)?;
        img::decode_image(&bytes, limit).map_err(|e| e.at_index(0))
    })?;
    Ok(rgb_to_array(rgb).into_pyarray(py))
}

fn parse_resample(obj: &Bound<'_, PyAny>) -> PyResult<Resample> {
    let text = match obj.extract::<i64>() {
        Ok(i) => i.to_string(),
        Err(_) => obj.str()?.to_string(),
    };
    Ok(text.parse::<Resample>()?)
}

/// Resizes a uint8 `[H, W, 3]` (or `[H, W]`) image exactly as Pillow's
/// `Image.resize(size, resample, reducing_gap=None)` does. `size` is `(height, width)`.
#[pyfunction]
#[pyo3(signature = (image, size, resample=None))]
fn resize_image<'py>(
    py: Python<'py>,
    image: PyReadonlyArrayDyn<'py, u8>,
    size: (u32, u32),
    resample: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let filter = match resample {
        Some(r) => parse_resample(r)?,
        None => Resample::Bicubic,
    };
    let arr = image.as_array();
    let shape = arr.shape().to_vec();
    let grey = match shape.as_slice() {
        [_, _] | [_, _, 1] => true,
        [_, _, 3] => false,
        _ => {
            return Err(MlmfError::input(
                Modality::Image,
                format!("expected a uint8 array [H, W] or [H, W, 3], got shape {shape:?}"),
            )
            .into())
        }
    };
    let (h, w) = (shape[0], shape[1]);
    if h == 0 || w == 0 || size.0 == 0 || size.1 == 0 {
        return Err(MlmfError::input(
            Modality::Image,
            format!("cannot resize {shape:?} to {size:?}: expected non-zero sizes"),
        )
        .into());
    }
    // Greyscale runs through the RGB kernel with three equal channels: every channel is
    // filtered independently, so the result is the single-channel resize. Contiguous
    // RGB is read in place.
    let owned: Vec<u8>;
    let data: &[u8] = match arr.as_slice() {
        Some(s) if !grey => s,
        _ => {
            owned = if grey {
                arr.iter().flat_map(|&v| [v, v, v]).collect()
            } else {
                arr.iter().copied().collect()
            };
            &owned
        }
    };
    let (oh, ow) = size;
    let out = detached(py, move || Ok(img::resize_rgb(data, w, h, ow, oh, filter)))?;
    let result = if grey {
        let v: Vec<u8> = out.chunks_exact(3).map(|p| p[0]).collect();
        let mut dims = vec![oh as usize, ow as usize];
        if shape.len() == 3 {
            dims.push(1);
        }
        ArrayD::from_shape_vec(dims, v)
    } else {
        ArrayD::from_shape_vec(vec![oh as usize, ow as usize, 3], out)
    }
    .map_err(|e| MlmfError::Internal(e.to_string()))?;
    Ok(result.into_pyarray(py))
}

/// Cuts `[B, C, H, W]` pixels into `P x P` patches: float32 `[B, (H/P)(W/P), C*P*P]`,
/// patches row-major, each flattened in (channel, row, column) order.
#[pyfunction]
fn extract_patches<'py>(
    py: Python<'py>,
    pixel_values: PyReadonlyArray4<'py, f32>,
    patch_size: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let view = pixel_values.as_array();
    let out = guarded(|| img::extract_patches(view, patch_size)).map_err(PyErr::from)?;
    Ok(out.into_pyarray(py))
}

/// Patches and their `(t, h, w)` grid.
type Patches<'py> = (Bound<'py, PyArray2<f32>>, (usize, usize, usize));

/// Qwen2-VL's patch layout of `[T, C, H, W]` frames: float32 `[N, C*tp*P*P]` and the
/// grid `(t, h, w)`; the last frame is repeated to make `T` a multiple of `tp`.
#[pyfunction]
#[pyo3(signature = (frames, patch_size=14, temporal_patch_size=2, merge_size=2))]
fn qwen2vl_patches<'py>(
    py: Python<'py>,
    frames: PyReadonlyArray4<'py, f32>,
    patch_size: usize,
    temporal_patch_size: usize,
    merge_size: usize,
) -> PyResult<Patches<'py>> {
    let view = frames.as_array();
    let (out, grid) =
        guarded(|| img::qwen2vl_patches(view, patch_size, temporal_patch_size, merge_size))
            .map_err(PyErr::from)?;
    Ok((out.into_pyarray(py), (grid[0], grid[1], grid[2])))
}

// ---------------------------------------------------------------- audio

const AUDIO_EXPECTED: &str =
    "a path, encoded audio bytes or a float32 array [samples] or [channels, samples]";

/// One audio argument: an encoded source, or samples borrowed from a NumPy array.
pub(crate) enum AudioArg<'py> {
    Source(Source),
    Samples(PyReadonlyArrayDyn<'py, f32>),
}

/// A batch of audio arguments; float32 arrays are read in place, not copied.
pub(crate) fn audio_args<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<AudioArg<'py>>> {
    batch(obj, Modality::Audio, AUDIO_EXPECTED)?
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Item::Source(s) => Ok(AudioArg::Source(s)),
            Item::F32(a) => Ok(AudioArg::Samples(a)),
            Item::U8(a) => Err(uint8_audio(a.shape(), i)),
        })
        .collect()
}

fn uint8_audio(shape: &[usize], index: usize) -> PyErr {
    wrong_dtype(Modality::Audio, "uint8", shape, AUDIO_EXPECTED, index)
}

/// The inputs as references; arrays become `[channels, samples]` views (after a shape
/// check) carrying `rate`.
pub(crate) fn audio_refs<'a>(
    args: &'a [AudioArg<'_>],
    rate: Option<u32>,
) -> PyResult<Vec<AudioRef<'a>>> {
    args.iter()
        .enumerate()
        .map(|(i, arg)| match arg {
            AudioArg::Source(s) => Ok(AudioRef::Source(s)),
            AudioArg::Samples(a) => {
                let a = a.as_array();
                check_samples_shape(a.shape()).map_err(|e| e.at_index(i))?;
                let data = match a.ndim() {
                    1 => a.insert_axis(ndarray::Axis(0)).into_dimensionality(),
                    _ => a.into_dimensionality(),
                }
                .map_err(|e| MlmfError::Internal(e.to_string()))?;
                Ok(AudioRef::Samples {
                    data,
                    sampling_rate: rate,
                })
            }
        })
        .collect()
}

/// Channel-count guard for `[channels, samples]` arrays: more channels than this is
/// almost surely a `[samples, channels]` array the wrong way round.
const MAX_CHANNELS: usize = 64;

/// Refuses shapes other than `[samples]` and `[channels, samples]` (at most
/// `MAX_CHANNELS` channels).
pub(crate) fn check_samples_shape(shape: &[usize]) -> Result<(), MlmfError> {
    match shape.len() {
        1 => Ok(()),
        2 if shape[0] <= MAX_CHANNELS => Ok(()),
        2 => Err(MlmfError::input(
            Modality::Audio,
            format!(
                "array of shape {shape:?} has {} channels: expected [channels, samples] with at \
                 most {MAX_CHANNELS} channels (transpose a [samples, channels] array, e.g. \
                 soundfile's output, with .T)",
                shape[0]
            ),
        )),
        n => Err(MlmfError::input(
            Modality::Audio,
            format!("array of shape {shape:?} has {n} dimensions: expected [samples] or [channels, samples]"),
        )),
    }
}

/// Audio feature extraction from raw audio: Whisper log-mel chunks, or what the
/// checkpoint's `feature_extractor_type` names (normalised waveforms for wav2vec 2.0 /
/// HuBERT, Kaldi filter banks for AST).
#[pyclass(name = "AudioProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyAudioProcessor {
    inner: AudioProcessor,
}

#[pymethods]
impl PyAudioProcessor {
    /// Keyword settings use WhisperFeatureExtractor's names (feature_size,
    /// sampling_rate, n_fft, hop_length, chunk_length, padding_value) plus
    /// stride_length_s and max_duration_s; anything not given takes Whisper's value.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let cfg = PreprocessingConfig(kwargs_json(kwargs)?).audio(None)?;
        Ok(Self {
            inner: AudioProcessor::new(cfg)?,
        })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or the file).
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = detached(py, move || AudioProcessor::from_pretrained(&path))?;
        Ok(Self { inner })
    }

    #[staticmethod]
    fn _from_config_json(text: &str) -> PyResult<Self> {
        let cfg = config_from_text(text)?;
        Ok(Self {
            inner: AudioProcessor::new(cfg)?,
        })
    }

    /// Features of a batch: `{"input_features": float32 [N, n_mels, frames],
    /// "num_chunks": int64 [B], "valid_frames": int64 [N]}` (log-mel or filter-bank
    /// frames, or waveform samples `[N, 1, samples]`, that hold real audio per chunk).
    /// `sampling_rate` is the rate of array inputs.
    #[pyo3(signature = (audios, sampling_rate=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        audios: &Bound<'py, PyAny>,
        sampling_rate: Option<u32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let args = audio_args(audios)?;
        let refs = audio_refs(&args, sampling_rate)?;
        let feats = detached(py, || self.inner.process_refs(&refs))?;
        let out = PyDict::new(py);
        out.set_item("input_features", feats.input_features.into_pyarray(py))?;
        let chunks: Vec<i64> = feats.num_chunks.iter().map(|&n| n as i64).collect();
        out.set_item("num_chunks", Array1::from(chunks).into_pyarray(py))?;
        let valid: Vec<i64> = feats.valid_frames.iter().map(|&n| n as i64).collect();
        out.set_item("valid_frames", Array1::from(valid).into_pyarray(py))?;
        Ok(out)
    }

    /// One input as mono float32 samples at the processor's rate.
    #[pyo3(signature = (audio, sampling_rate=None))]
    fn load<'py>(
        &self,
        py: Python<'py>,
        audio: &Bound<'py, PyAny>,
        sampling_rate: Option<u32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let args = audio_args(audio)?;
        let refs = audio_refs(&args, None)?;
        let [input] = refs.as_slice() else {
            return Err(MlmfError::input(Modality::Audio, "load takes one input").into());
        };
        let v = detached(py, || {
            self.inner
                .load(input.clone(), sampling_rate)
                .map_err(|e| e.at_index(0))
        })?;
        Ok(v.into_pyarray(py))
    }

    /// The settings, with Hugging Face key names.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        config_to_py(py, self.inner.config())
    }

    fn __repr__(&self) -> String {
        format!("AudioProcessor({:?})", self.inner.config())
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let text = config_to_text(self.inner.config())?;
        Ok((py.get_type::<Self>().getattr("_from_config_json")?, (text,)))
    }
}

/// Decodes an audio file or bytes: (float32 `[channels, samples]`, sampling rate).
#[pyfunction]
fn load_audio<'py>(
    py: Python<'py>,
    audio: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArray2<f32>>, u32)> {
    let source = match raw_item(audio, Modality::Audio, 0, "a path or encoded audio bytes")? {
        RawItem::Source(s) => s,
        _ => {
            return Err(MlmfError::input(
                Modality::Audio,
                "load_audio takes a path or encoded bytes, not an array",
            )
            .at_index(0)
            .into())
        }
    };
    let (data, rate) = detached(py, || {
        let bytes = source.bytes(Modality::Audio)?;
        aud::decode_audio(&bytes).map_err(|e| e.at_index(0))
    })?;
    Ok((data.into_pyarray(py), rate))
}

/// Resamples mono float32 samples from `orig_sr` to `target_sr`.
#[pyfunction]
fn resample_audio<'py>(
    py: Python<'py>,
    samples: PyReadonlyArray1<'py, f32>,
    orig_sr: u32,
    target_sr: u32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let x = samples.as_array().to_vec();
    let y = detached(py, move || aud::resample(&x, orig_sr, target_sr))?;
    Ok(y.into_pyarray(py))
}

/// Whisper log-mel spectrogram of one chunk of mono samples at `sampling_rate`
/// (padded or cut to `chunk_length` seconds): float32 `[n_mels, frames]`.
#[pyfunction]
#[pyo3(signature = (samples, n_mels=80, sampling_rate=16000))]
fn log_mel_spectrogram<'py>(
    py: Python<'py>,
    samples: PyReadonlyArray1<'py, f32>,
    n_mels: usize,
    sampling_rate: u32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let x = samples.as_array().to_vec();
    let cfg = AudioProcessorConfig {
        feature_size: n_mels,
        sampling_rate,
        ..AudioProcessorConfig::whisper()
    };
    let y = detached(py, move || AudioProcessor::new(cfg)?.log_mel(&x))?;
    Ok(y.into_pyarray(py))
}

/// The Slaney mel filter bank Whisper uses: float32 `[n_freqs, n_mels]`.
#[pyfunction]
#[pyo3(signature = (n_freqs=201, n_mels=80, sampling_rate=16000, f_min=0.0, f_max=8000.0))]
fn mel_filter_bank<'py>(
    py: Python<'py>,
    n_freqs: usize,
    n_mels: usize,
    sampling_rate: u32,
    f_min: f64,
    f_max: f64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let fb = guarded(|| {
        if n_freqs < 2
            || n_mels == 0
            || sampling_rate == 0
            || f_min >= f_max
            || f_min.is_nan()
            || f_min < 0.0
        {
            return Err(MlmfError::config(
                "mel_filter_bank",
                "expected n_freqs >= 2, n_mels >= 1, sampling_rate > 0 and 0 <= f_min < f_max",
            ));
        }
        Ok(aud::mel_filter_bank(
            n_freqs,
            n_mels,
            sampling_rate,
            f_min,
            f_max,
        ))
    })?;
    Ok(fb.into_pyarray(py))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTextProcessor>()?;
    m.add_class::<PyImageProcessor>()?;
    m.add_class::<PyAudioProcessor>()?;
    m.add_class::<PyVideoProcessor>()?;
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(resize_image, m)?)?;
    m.add_function(wrap_pyfunction!(extract_patches, m)?)?;
    m.add_function(wrap_pyfunction!(qwen2vl_patches, m)?)?;
    m.add_function(wrap_pyfunction!(load_audio, m)?)?;
    m.add_function(wrap_pyfunction!(resample_audio, m)?)?;
    m.add_function(wrap_pyfunction!(log_mel_spectrogram, m)?)?;
    m.add_function(wrap_pyfunction!(mel_filter_bank, m)?)?;
    Ok(())
}

// ---------------------------------------------------------------- video

/// Samples frames from videos and runs each through an image processor.
#[pyclass(name = "VideoProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyVideoProcessor {
    pub(crate) inner: VideoProcessor,
}

/// Whether encoded bytes are something the core decodes itself (GIF, WebP).
fn core_decodes(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GIF8") || (bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP"))
}

#[pymethods]
impl PyVideoProcessor {
    /// `sampler`: `"uniform"` (`num_frames` spread evenly, the default), `"fps"` (a
    /// target rate `fps`), `"windows"` (temporal windows) or `"all"`. Left out, it is
    /// `windows` when a window key is given, else `fps` when `fps` is, else `all` when
    /// `num_frames` is None, else `uniform`. `image` preprocesses every frame (default:
    /// `ImageProcessor()`, CLIP's settings).
    #[new]
    #[pyo3(signature = (num_frames=Some(8), fps=None, image=None, *, sampler=None, window_frames=None, window_seconds=None, stride_frames=None, stride_seconds=None, frames_per_window=None, max_windows=None, default_fps=None, max_frames=512, short_video="error"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_frames: Option<usize>,
        fps: Option<f64>,
        image: Option<&PyImageProcessor>,
        sampler: Option<&str>,
        window_frames: Option<usize>,
        window_seconds: Option<f64>,
        stride_frames: Option<usize>,
        stride_seconds: Option<f64>,
        frames_per_window: Option<usize>,
        max_windows: Option<usize>,
        default_fps: Option<f64>,
        max_frames: usize,
        short_video: &str,
    ) -> PyResult<Self> {
        let windowed = window_frames.is_some()
            || window_seconds.is_some()
            || stride_frames.is_some()
            || stride_seconds.is_some()
            || frames_per_window.is_some()
            || max_windows.is_some();
        let kind = sampler.unwrap_or(if windowed {
            "windows"
        } else if fps.is_some() {
            "fps"
        } else if num_frames.is_none() {
            "all"
        } else {
            "uniform"
        });
        let need = |what: &str| {
            MlmfError::config(
                format!("sampler.{what}"),
                format!("the {kind} sampler needs {what}"),
            )
        };
        let sampler = match kind {
            "uniform" => FrameSampler::Uniform {
                num_frames: num_frames.ok_or_else(|| need("num_frames"))?,
            },
            "fps" => FrameSampler::Fps {
                fps: fps.ok_or_else(|| need("fps"))?,
            },
            "windows" => FrameSampler::Windows {
                window_frames,
                window_seconds,
                stride_frames,
                stride_seconds,
                frames_per_window: frames_per_window.ok_or_else(|| need("frames_per_window"))?,
                max_windows,
            },
            "all" => FrameSampler::All,
            other => {
                return Err(MlmfError::config(
                    "sampler",
                    format!("unknown sampler {other:?}: expected uniform, fps, windows or all"),
                )
                .into())
            }
        };
        let short_video: ShortVideo =
            serde_json::from_value(Value::from(short_video)).map_err(|_| {
                MlmfError::config(
                    "short_video",
                    format!("unknown value {short_video:?}: expected error, repeat or pad_last"),
                )
            })?;
        let cfg = VideoProcessorConfig {
            sampler,
            default_fps,
            max_frames,
            short_video,
        };
        let image = match image {
            Some(p) => p.inner.clone(),
            None => ImageProcessor::new(ImageProcessorConfig::clip())?,
        };
        Ok(Self {
            inner: VideoProcessor::new(cfg, image)?,
        })
    }

    #[staticmethod]
    fn _from_config_json(video: &str, image: &str) -> PyResult<Self> {
        let bad =
            |e: serde_json::Error| MlmfError::config("", format!("bad serialised processor: {e}"));
        let cfg: VideoProcessorConfig = serde_json::from_str(video).map_err(bad)?;
        let img: ImageProcessorConfig = serde_json::from_str(image).map_err(bad)?;
        Ok(Self {
            inner: VideoProcessor::new(cfg, ImageProcessor::new(img)?)?,
        })
    }

    /// The frame indices the sampler takes from a video of `total` frames at `fps` (the
    /// video's rate; the processor's `default_fps` when None): a list, or a list per
    /// window for the windows sampler.
    #[pyo3(signature = (total, fps=None))]
    fn sample_indices<'py>(
        &self,
        py: Python<'py>,
        total: usize,
        fps: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let fps = fps.or(self.inner.config().default_fps);
        let plan = self.inner.sample_indices(total, fps)?;
        if self.inner.config().sampler.is_windowed() {
            Ok(plan.into_pyobject(py)?.into_any())
        } else {
            Ok(plan
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .into_pyobject(py)?
                .into_any())
        }
    }

    /// Preprocesses a batch of videos: `{"pixel_values": float32 [B, T, 3, H, W] (windows:
    /// [B, W, K, 3, H, W]), "indices": sampled frame numbers per video, "meta": per video
    /// total_frames, fps, width, height}`. `fps` is the frame rate of array inputs.
    #[pyo3(signature = (videos, fps=None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        videos: &Bound<'py, PyAny>,
        fps: Option<f64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let py = slf.py();
        let this = slf.get();
        let inputs = video_inputs(slf, videos, fps)?;
        let batch = detached(py, || this.inner.process(&inputs))?;
        let out = PyDict::new(py);
        out.set_item("pixel_values", batch.pixel_values.into_pyarray(py))?;
        out.set_item("indices", batch.indices)?;
        let meta = PyList::empty(py);
        for m in &batch.meta {
            let d = PyDict::new(py);
            d.set_item("total_frames", m.total_frames)?;
            d.set_item("fps", m.fps)?;
            d.set_item("width", m.width)?;
            d.set_item("height", m.height)?;
            meta.append(d)?;
        }
        out.set_item("meta", meta)?;
        Ok(out)
    }

    /// The image processor every frame goes through.
    #[getter]
    fn image(&self) -> PyImageProcessor {
        PyImageProcessor {
            inner: self.inner.image().clone(),
        }
    }

    /// The sampler settings.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        config_to_py(py, self.inner.config())
    }

    fn __repr__(&self) -> String {
        format!("VideoProcessor({:?})", self.inner.config())
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String, String))> {
        let video = config_to_text(self.inner.config())?;
        let image = config_to_text(self.inner.image().config())?;
        Ok((
            py.get_type::<Self>().getattr("_from_config_json")?,
            (video, image),
        ))
    }
}

/// Videos of a call as owned inputs: GIF/WebP files and bytes, frame directories and
/// uint8 arrays for the core; container files and bytes through PyAV
/// (`mlmf.video.read_sampled`), decoding only the frames `slf`'s sampler picks. Arrays
/// are sampled before they are copied.
pub(crate) fn video_inputs<'py>(
    slf: &Bound<'py, PyVideoProcessor>,
    videos: &Bound<'py, PyAny>,
    fps: Option<f64>,
) -> PyResult<Vec<VideoInput>> {
    let py = slf.py();
    let this = slf.get();
    let list = items(videos);
    if list.is_empty() {
        return Err(
            MlmfError::input(Modality::Video, "empty batch: expected at least one video").into(),
        );
    }
    let expected = "a path (GIF, WebP, frame directory or container file), GIF/WebP bytes or a uint8 array [T, H, W, C]";
    let mut inputs = Vec::with_capacity(list.len());
    for (i, obj) in list.iter().enumerate() {
        let container = |src: &Bound<'py, PyAny>| -> PyResult<VideoInput> {
            let read = py.import("mlmf.video")?.getattr("read_sampled")?;
            let (frames, indices, total, vfps): (
                PyReadonlyArrayDyn<'py, u8>,
                Vec<usize>,
                usize,
                Option<f64>,
            ) = read.call1((src, slf, i))?.extract()?;
            let data = frames
                .as_array()
                .to_owned()
                .into_dimensionality()
                .map_err(|e| MlmfError::Internal(e.to_string()))?;
            Ok(VideoInput::Sparse {
                data,
                indices,
                total,
                fps: vfps,
            })
        };
        // A decoded video array: sample first and copy only the sampled frames (a
        // minute of 640x480 frames is gigabytes; eight of them are 7 MB).
        // (Empty or odd-channel arrays take the general path, which explains the
        // shape problem.)
        let usable = |a: &Bound<'py, PyArray4<u8>>| {
            let s = a.shape();
            s[..3].iter().all(|&n| n > 0) && matches!(s[3], 1 | 3 | 4)
        };
        if let Some(arr) = obj.cast::<PyArray4<u8>>().ok().filter(|a| usable(a)) {
            let ro = arr.readonly();
            let view = ro.as_array();
            let total = view.dim().0;
            let plan = this
                .inner
                .sample_indices(total, fps.or(this.inner.config().default_fps))
                .map_err(|e| e.at_index(i))?;
            let mut wanted: Vec<usize> = plan.into_iter().flatten().collect();
            wanted.sort_unstable();
            wanted.dedup();
            let data = view.select(ndarray::Axis(0), &wanted);
            inputs.push(VideoInput::Sparse {
                data,
                indices: wanted,
                total,
                fps,
            });
            continue;
        }
        let input = match raw_item(obj, Modality::Video, i, expected)? {
            RawItem::U8(a) => VideoInput::from_array(a, fps).map_err(|e| e.at_index(i))?,
            RawItem::F32(a) => {
                return Err(MlmfError::input(
                    Modality::Video,
                    format!(
                        "got a float32 array of shape {:?}: expected {expected}",
                        a.shape()
                    ),
                )
                .at_index(i)
                .into())
            }
            RawItem::Source(Source::Bytes(b)) if !core_decodes(&b) => {
                container(&PyBytes::new(py, &b).into_any())?
            }
            RawItem::Source(Source::Path(p))
                if !p.is_dir()
                    && !matches!(
                        p.extension()
                            .and_then(|e| e.to_str())
                            .map(str::to_ascii_lowercase)
                            .as_deref(),
                        Some("gif" | "webp")
                    ) =>
            {
                container(obj)?
            }
            RawItem::Source(s) => VideoInput::Source(s),
        };
        inputs.push(input);
    }
    Ok(inputs)
}

/// The processors a config describes, as `{modality name: processor}`.
pub(crate) fn processors_to_py<'py>(
    py: Python<'py>,
    p: crate::preprocess::Preprocessors,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    if let Some(inner) = p.text {
        let path = inner.source().to_path_buf();
        out.set_item("text", PyTextProcessor { inner, path })?;
    }
    if let Some(inner) = p.image {
        out.set_item("image", PyImageProcessor { inner })?;
    }
    if let Some(inner) = p.audio {
        out.set_item("audio", PyAudioProcessor { inner })?;
    }
    if let Some(inner) = p.video {
        out.set_item("video", PyVideoProcessor { inner })?;
    }
    Ok(out)
}
