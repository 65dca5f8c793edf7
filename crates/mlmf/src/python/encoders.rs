//! `mlmf.Encoder`, `mlmf.EncoderOutput`, `mlmf.register_encoder` and
//! `mlmf.supported_model_types`.
//!
//! `Encoder.encode` takes raw inputs (run through the checkpoint's processor) or
//! preprocessed arrays (token-id dict, float32 pixels / log-mel features / frames) and
//! returns float32 NumPy arrays. A Python callable registered for a `model_type` becomes
//! a [`ModalityEncoder`] that calls back into Python with the GIL.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, Array3};
use numpy::{
    IntoPyArray, PyArray2, PyArray3, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::device::DeviceSpec;
use crate::encoders::layers::{ce, masked_mean};
use crate::encoders::{
    register_encoder, supported_model_types, Encoder, EncoderInfo, EncoderInput, EncoderOptions,
    EncoderOutput, LoadRequest, ModalityEncoder, Precision, ProcessorKind, VideoPooling,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::audio::AudioRef;
use crate::preprocess::image::ImageRef;
use crate::preprocess::text::TextBatch;
use crate::python::config::modality_arg;
use crate::python::detached;
use crate::python::preprocess::{audio_args, audio_refs, image_args, str_list, AudioArg, ImageArg};

/// What an encoder returned, as float32 NumPy arrays (`mask` int64).
#[pyclass(module = "mlmf._mlmf", name = "EncoderOutput", frozen)]
pub(crate) struct PyEncoderOutput {
    #[pyo3(get)]
    pooled: Py<PyArray2<f32>>,
    #[pyo3(get)]
    hidden_states: Py<PyArray3<f32>>,
    #[pyo3(get)]
    mask: Py<PyArray2<i64>>,
}

#[pymethods]
impl PyEncoderOutput {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "EncoderOutput(pooled={:?}, hidden_states={:?}, mask={:?})",
            self.pooled.bind(py).shape(),
            self.hidden_states.bind(py).shape(),
            self.mask.bind(py).shape()
        )
    }

    fn __getitem__<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        match key {
            "pooled" => Ok(self.pooled.bind(py).clone().into_any()),
            "hidden_states" => Ok(self.hidden_states.bind(py).clone().into_any()),
            "mask" => Ok(self.mask.bind(py).clone().into_any()),
            other => Err(pyo3::exceptions::PyKeyError::new_err(other.to_string())),
        }
    }
}

/// Host float32 / int64 arrays of an output (done without the GIL).
struct HostOutput {
    pooled: Array2<f32>,
    hidden: Array3<f32>,
    mask: Array2<i64>,
}

/// An output tensor as float32 on the CPU.
pub(super) fn to_host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(ce("copy to host"))
}

fn to_host(out: &EncoderOutput) -> Result<HostOutput> {
    let f = ce("copy to host");
    let pooled = to_host_f32(&out.pooled)?;
    let hidden = to_host_f32(&out.hidden_states)?;
    let mask = out
        .mask
        .to_device(&Device::Cpu)
        .and_then(|m| m.to_dtype(DType::I64))
        .map_err(&f)?;
    let (b, d) = pooled.dims2().map_err(&f)?;
    let (hb, t, hd) = hidden.dims3().map_err(&f)?;
    let (mb, mt) = mask.dims2().map_err(&f)?;
    let shape_err = |e: ndarray::ShapeError| MlmfError::Internal(format!("output shape: {e}"));
    Ok(HostOutput {
        pooled: Array2::from_shape_vec(
            (b, d),
            pooled.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?,
        )
        .map_err(shape_err)?,
        hidden: Array3::from_shape_vec(
            (hb, t, hd),
            hidden.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?,
        )
        .map_err(shape_err)?,
        mask: Array2::from_shape_vec(
            (mb, mt),
            mask.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?,
        )
        .map_err(shape_err)?,
    })
}

fn output_to_py(py: Python<'_>, h: HostOutput) -> PyEncoderOutput {
    PyEncoderOutput {
        pooled: h.pooled.into_pyarray(py).unbind(),
        hidden_states: h.hidden.into_pyarray(py).unbind(),
        mask: h.mask.into_pyarray(py).unbind(),
    }
}

/// A loaded encoder.
#[pyclass(module = "mlmf._mlmf", name = "Encoder", frozen)]
pub(crate) struct PyEncoder {
    inner: Encoder,
    path: PathBuf,
    modality: Option<String>,
    device: String,
    dtype: String,
    video_pooling: String,
    num_frames: usize,
    /// `mlmf.VideoProcessor` for raw videos (container decoding lives in the Python
    /// bindings), built on first use.
    video: OnceLock<Py<PyAny>>,
}

/// An int64 `[B, T]` array from a dict entry (any integer dtype accepted).
fn id_array(d: &Bound<'_, PyDict>, key: &str, required: bool) -> PyResult<Option<Array2<i64>>> {
    let Some(v) = d.get_item(key)? else {
        if required {
            return Err(MlmfError::input(
                Modality::Text,
                format!("expected a dict with `{key}`: int64 [B, T] token ids"),
            )
            .into());
        }
        return Ok(None);
    };
    let np = v.py().import("numpy")?;
    let arr = np.call_method1("asarray", (v, "int64"))?;
    let arr = arr.cast::<PyArrayDyn<i64>>().map_err(|_| {
        PyErr::from(MlmfError::input(
            Modality::Text,
            format!("`{key}` must be an integer array"),
        ))
    })?;
    let a = arr.readonly();
    let a = a.as_array();
    if a.ndim() != 2 {
        return Err(MlmfError::input(
            Modality::Text,
            format!("expected `{key}` shaped [B, T], got {:?}", a.shape()),
        )
        .into());
    }
    Ok(Some(
        a.to_owned()
            .into_dimensionality()
            .map_err(|e| MlmfError::Internal(e.to_string()))?,
    ))
}

/// A float32 array of rank `rank` for `modality`, copied (preprocessed inputs).
pub(crate) fn float_array(
    obj: &Bound<'_, PyAny>,
    modality: Modality,
    rank: usize,
    expected: &str,
) -> PyResult<ndarray::ArrayD<f32>> {
    let arr = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| PyErr::from(MlmfError::input(modality, format!("expected {expected}"))))?;
    let a = arr.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyErr::from(MlmfError::input(
            modality,
            format!(
                "got a {} array of shape {:?}: expected {expected}",
                arr.dtype(),
                arr.shape()
            ),
        ))
    })?;
    let ro: PyReadonlyArrayDyn<'_, f32> = a.readonly();
    let v = ro.as_array();
    if v.ndim() != rank {
        return Err(MlmfError::input(
            modality,
            format!(
                "got a float32 array of shape {:?}: expected {expected}",
                v.shape()
            ),
        )
        .into());
    }
    Ok(v.to_owned())
}

pub(crate) fn dims<D: ndarray::Dimension>(
    a: ndarray::ArrayD<f32>,
) -> PyResult<ndarray::Array<f32, D>> {
    a.into_dimensionality::<D>()
        .map_err(|e| MlmfError::Internal(e.to_string()).into())
}

/// Whether `obj` is a NumPy array of floating dtype (a preprocessed input).
fn is_float_array(obj: &Bound<'_, PyAny>) -> bool {
    obj.cast::<PyUntypedArray>()
        .map(|a| a.dtype().kind() == b'f')
        .unwrap_or(false)
}

impl PyEncoder {
    fn run(&self, py: Python<'_>, input: EncoderInput) -> PyResult<PyEncoderOutput> {
        let enc = &self.inner;
        let host = detached(py, || to_host(&enc.encode(&input)?))?;
        Ok(output_to_py(py, host))
    }

    fn video_frames<'py>(&self, videos: &Bound<'py, PyAny>) -> PyResult<ndarray::ArrayD<f32>> {
        let py = videos.py();
        let vp = match self.video.get() {
            Some(vp) => vp.bind(py).clone(),
            None => {
                let m = py.import("mlmf")?;
                let image = m
                    .getattr("ImageProcessor")?
                    .call_method1("from_pretrained", (self.path.clone(),))?;
                let kwargs = PyDict::new(py);
                kwargs.set_item("num_frames", self.num_frames)?;
                kwargs.set_item("image", image)?;
                let vp = m.getattr("VideoProcessor")?.call((), Some(&kwargs))?;
                let _ = self.video.set(vp.clone().unbind());
                vp
            }
        };
        let out = vp.call1((videos,))?;
        let px = out.get_item("pixel_values")?;
        float_array(&px, Modality::Video, 5, "video frames [B, T, 3, H, W]")
    }
}

#[pymethods]
impl PyEncoder {
    /// Loads a checkpoint directory (config.json + safetensors). `modality` picks the
    /// tower of a dual checkpoint ("text" or "image" for CLIP/SigLIP) or "video" to run
    /// an image checkpoint per frame; `device` is "cpu" or "cuda[:N]"; `dtype` is
    /// "float32", "bfloat16", "float16" or "int8" (16-bit and int8 weights run on the
    /// float32 CPU kernels; int8 is CPU-only); `video_pooling` is "mean" or "window:N";
    /// `num_frames` is how many frames raw videos are sampled to (default: a native
    /// video model's own clip length, else 8).
    #[staticmethod]
    #[pyo3(signature = (path, modality=None, device="cpu", dtype="float32", *, video_pooling="mean", num_frames=None))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        modality: Option<&Bound<'_, PyAny>>,
        device: &str,
        dtype: &str,
        video_pooling: &str,
        num_frames: Option<usize>,
    ) -> PyResult<Self> {
        let parsed = modality
            .filter(|m| !m.is_none())
            .map(modality_arg)
            .transpose()?;
        let options = EncoderOptions {
            modality: parsed,
            device: device.parse::<DeviceSpec>()?,
            precision: dtype.parse::<Precision>()?,
            video_pooling: video_pooling.parse::<VideoPooling>()?,
            video: num_frames.map(
                |num_frames| crate::preprocess::video::VideoProcessorConfig {
                    sampler: crate::preprocess::video::FrameSampler::Uniform { num_frames },
                    ..Default::default()
                },
            ),
            preprocessing: Default::default(),
        };
        let dir = path.clone();
        let inner = detached(py, move || Encoder::from_pretrained(&dir, &options))?;
        let precision = inner.precision().to_string();
        // The clip length the encoder's own processor settled on (a native video
        // model's num_frames, else the sampler's default).
        let num_frames = num_frames
            .or_else(|| match inner.video_processor()?.config().sampler {
                crate::preprocess::video::FrameSampler::Uniform { num_frames } => Some(num_frames),
                _ => None,
            })
            .unwrap_or(8);
        Ok(Self {
            inner,
            path,
            modality: parsed.map(|m| m.to_string()),
            device: device.to_string(),
            dtype: precision,
            video_pooling: video_pooling.to_string(),
            num_frames,
            video: OnceLock::new(),
        })
    }

    /// Encodes a batch. Raw inputs: `str` / list of `str` (text); paths, encoded bytes
    /// or uint8 arrays (image, audio, video; audio also float32 samples with
    /// `sampling_rate`). Preprocessed: a dict with `input_ids` (and `attention_mask`,
    /// `token_type_ids`); float32 pixels `[B, 3, H, W]`; log-mel features
    /// `[B, n_mels, frames]` (or a dict with `input_features` and `valid_frames`); frames
    /// `[B, T, 3, H, W]`.
    #[pyo3(signature = (inputs, sampling_rate=None))]
    fn encode(
        &self,
        py: Python<'_>,
        inputs: &Bound<'_, PyAny>,
        sampling_rate: Option<u32>,
    ) -> PyResult<PyEncoderOutput> {
        match self.inner.modality() {
            Modality::Text => {
                if let Ok(d) = inputs.cast::<PyDict>() {
                    let ids = id_array(d, "input_ids", true)?.unwrap_or_default();
                    let dim = ids.dim();
                    let mask =
                        id_array(d, "attention_mask", false)?.unwrap_or_else(|| Array2::ones(dim));
                    let types =
                        id_array(d, "token_type_ids", false)?.unwrap_or_else(|| Array2::zeros(dim));
                    for (name, a) in [("attention_mask", &mask), ("token_type_ids", &types)] {
                        if a.dim() != dim {
                            return Err(MlmfError::input(
                                Modality::Text,
                                format!(
                                    "expected `{name}` shaped like input_ids {:?}, got {:?}",
                                    ids.shape(),
                                    a.shape()
                                ),
                            )
                            .into());
                        }
                    }
                    return self.run(
                        py,
                        EncoderInput::Text(TextBatch {
                            input_ids: ids,
                            attention_mask: mask,
                            token_type_ids: types,
                        }),
                    );
                }
                let texts = str_list(inputs)?;
                let enc = &self.inner;
                let host = detached(py, || to_host(&enc.encode_texts(&texts)?))?;
                Ok(output_to_py(py, host))
            }
            Modality::Image => {
                if let Ok(d) = inputs.cast::<PyDict>() {
                    return self.run(py, super::patches::patches_from_dict(d)?);
                }
                if is_float_array(inputs) {
                    let px = float_array(
                        inputs,
                        Modality::Image,
                        4,
                        "float32 pixel values [B, 3, H, W]",
                    )?;
                    return self.run(py, EncoderInput::Image(dims::<ndarray::Ix4>(px)?));
                }
                let args = image_args(inputs)?;
                let refs: Vec<ImageRef<'_>> = args.iter().map(ImageArg::as_ref).collect();
                let enc = &self.inner;
                let host = detached(py, || to_host(&enc.encode_images(&refs)?))?;
                Ok(output_to_py(py, host))
            }
            Modality::Audio => {
                if let Ok(d) = inputs.cast::<PyDict>() {
                    let feats = d.get_item("input_features")?.ok_or_else(|| {
                        PyErr::from(MlmfError::input(
                            Modality::Audio,
                            "expected a dict with `input_features`: float32 [B, n_mels, frames]",
                        ))
                    })?;
                    let feats = float_array(
                        &feats,
                        Modality::Audio,
                        3,
                        "float32 log-mel features [B, n_mels, frames]",
                    )?;
                    let valid: Option<Vec<usize>> = match d.get_item("valid_frames")? {
                        Some(v) if !v.is_none() => Some(v.extract()?),
                        _ => None,
                    };
                    return self.run(
                        py,
                        EncoderInput::Audio {
                            features: dims::<ndarray::Ix3>(feats)?,
                            valid_frames: valid,
                        },
                    );
                }
                if is_float_array(inputs)
                    && inputs
                        .cast::<PyUntypedArray>()
                        .map(|a| a.ndim() == 3)
                        .unwrap_or(false)
                {
                    let feats = float_array(
                        inputs,
                        Modality::Audio,
                        3,
                        "float32 log-mel features [B, n_mels, frames]",
                    )?;
                    return self.run(
                        py,
                        EncoderInput::Audio {
                            features: dims::<ndarray::Ix3>(feats)?,
                            valid_frames: None,
                        },
                    );
                }
                let args: Vec<AudioArg<'_>> = audio_args(inputs)?;
                let refs: Vec<AudioRef<'_>> = audio_refs(&args, sampling_rate)?;
                let enc = &self.inner;
                let host = detached(py, || to_host(&enc.encode_audio(&refs)?))?;
                Ok(output_to_py(py, host))
            }
            Modality::Video => {
                let frames = if is_float_array(inputs) {
                    float_array(inputs, Modality::Video, 5, "float32 frames [B, T, 3, H, W]")?
                } else {
                    self.video_frames(inputs)?
                };
                self.run(py, EncoderInput::Video(dims::<ndarray::Ix5>(frames)?))
            }
            Modality::Custom(_) => {
                Err(MlmfError::Internal("custom modality encoder".into()).into())
            }
        }
    }

    /// The modality this encoder takes.
    #[getter]
    fn modality(&self) -> String {
        self.inner.modality().to_string()
    }

    /// config.json's `model_type`.
    #[getter]
    fn model_type(&self) -> String {
        self.inner.model().model_type().to_string()
    }

    /// Width of `hidden_states`.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.model().hidden_size()
    }

    /// Width of `pooled`.
    #[getter]
    fn output_dim(&self) -> usize {
        self.inner.model().output_dim()
    }

    #[getter]
    fn dtype(&self) -> String {
        self.dtype.clone()
    }

    /// Bytes the weights occupy in memory, in the format they are kept in.
    #[getter]
    fn weight_bytes(&self) -> u64 {
        self.inner.weight_bytes()
    }

    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Encoder(model_type={:?}, modality={:?}, output_dim={}, device={:?}, dtype={:?}, path={:?})",
            self.model_type(),
            self.modality(),
            self.output_dim(),
            self.device,
            self.dtype,
            self.path
        )
    }

    /// Pickles as the arguments to load it again (the checkpoint must exist where it is
    /// unpickled).
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let this = slf.get();
        let load = py
            .import("mlmf")?
            .getattr("Encoder")?
            .getattr("_from_pickle")?;
        let args = (
            this.path.clone(),
            this.modality.clone(),
            this.device.clone(),
            this.dtype.clone(),
            this.video_pooling.clone(),
            this.num_frames,
        );
        PyTuple::new(py, [load.into_any(), args.into_pyobject(py)?.into_any()])
    }

    #[staticmethod]
    fn _from_pickle(
        py: Python<'_>,
        path: PathBuf,
        modality: Option<String>,
        device: String,
        dtype: String,
        video_pooling: String,
        num_frames: usize,
    ) -> PyResult<Self> {
        let m = modality.map(|s| PyString::new(py, &s).into_any());
        Self::from_pretrained(
            py,
            path,
            m.as_ref(),
            &device,
            &dtype,
            &video_pooling,
            Some(num_frames),
        )
    }
}

/// A Python callable used as an encoder: it receives the preprocessed batch (a dict of
/// int64 arrays for text, a float32 array otherwise) and returns float32 `[B, D]`
/// (pooled) or `[B, T, D]` (token states, pooled by their masked mean).
struct CallableEncoder {
    func: Py<PyAny>,
    info: EncoderInfo,
}

impl CallableEncoder {
    fn call(&self, input: &EncoderInput) -> Result<(ndarray::ArrayD<f32>, Array2<u8>)> {
        Python::attach(|py| -> PyResult<(ndarray::ArrayD<f32>, Array2<u8>)> {
            let (arg, mask): (Bound<'_, PyAny>, Array2<u8>) = match input {
                EncoderInput::Text(t) => {
                    let d = PyDict::new(py);
                    d.set_item("input_ids", t.input_ids.clone().into_pyarray(py))?;
                    d.set_item("attention_mask", t.attention_mask.clone().into_pyarray(py))?;
                    d.set_item("token_type_ids", t.token_type_ids.clone().into_pyarray(py))?;
                    (d.into_any(), t.attention_mask.mapv(|v| u8::from(v != 0)))
                }
                EncoderInput::Image(x) => (
                    x.clone().into_pyarray(py).into_any(),
                    Array2::ones((x.shape()[0], 1)),
                ),
                EncoderInput::Audio { features, .. } => (
                    features.clone().into_pyarray(py).into_any(),
                    Array2::ones((features.shape()[0], 1)),
                ),
                EncoderInput::Video(x) => (
                    x.clone().into_pyarray(py).into_any(),
                    Array2::ones((x.shape()[0], x.shape()[1])),
                ),
                EncoderInput::Patches { patches, shapes } => {
                    let d = PyDict::new(py);
                    d.set_item("pixel_values", patches.clone().into_pyarray(py))?;
                    let grid: Vec<[i64; 2]> =
                        shapes.iter().map(|&(h, w)| [h as i64, w as i64]).collect();
                    d.set_item("spatial_shapes", grid)?;
                    (d.into_any(), Array2::ones((shapes.len(), 1)))
                }
            };
            let out = self.func.bind(py).call1((arg,))?;
            let np = py.import("numpy")?;
            let arr = np.call_method1("asarray", (out, "float32"))?;
            let arr = arr
                .cast::<PyArrayDyn<f32>>()
                .map_err(|_| PyErr::from(MlmfError::Internal("encoder callable output".into())))?;
            Ok((arr.readonly().as_array().to_owned(), mask))
        })
        .map_err(|e| {
            MlmfError::input(
                self.info.modality,
                format!(
                    "the registered encoder for {:?} failed: {e}",
                    self.info.model_type
                ),
            )
        })
    }
}

impl ModalityEncoder for CallableEncoder {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let b = input.len();
        let (out, mask) = self.call(input)?;
        let f = ce("registered encoder output");
        let bad = |shape: &[usize]| {
            MlmfError::input(
                self.info.modality,
                format!(
                    "the registered encoder for {:?} returned shape {shape:?}: expected \
                     [{b}, {d}] or [{b}, T, {d}]",
                    self.info.model_type,
                    d = self.info.output_dim
                ),
            )
        };
        let shape = out.shape().to_vec();
        let data: Vec<f32> = out.iter().copied().collect();
        match shape.as_slice() {
            [ob, d] if *ob == b && *d == self.info.output_dim => {
                let pooled = Tensor::from_vec(data, (b, *d), &Device::Cpu).map_err(&f)?;
                Ok(EncoderOutput {
                    hidden_states: pooled.unsqueeze(1).map_err(&f)?,
                    mask: Tensor::ones((b, 1), DType::U8, &Device::Cpu).map_err(&f)?,
                    pooled,
                })
            }
            [ob, t, d] if *ob == b && *d == self.info.output_dim => {
                let hidden = Tensor::from_vec(data, (b, *t, *d), &Device::Cpu).map_err(&f)?;
                let mask = if mask.dim() == (b, *t) {
                    Tensor::from_vec(mask.into_raw_vec_and_offset().0, (b, *t), &Device::Cpu)
                } else {
                    Tensor::ones((b, *t), DType::U8, &Device::Cpu)
                }
                .map_err(&f)?;
                let pooled = masked_mean(&hidden, &mask)?;
                Ok(EncoderOutput {
                    hidden_states: hidden,
                    mask,
                    pooled,
                })
            }
            other => Err(bad(other)),
        }
    }
}

/// Registers `factory` for checkpoints whose config.json has `model_type`.
/// `factory(path: str, config: dict)` returns a callable that maps the preprocessed
/// batch to float32 `[B, dim]` or `[B, T, dim]`. `modality` says what it encodes;
/// raw inputs go through the processor files in the checkpoint directory.
#[pyfunction]
#[pyo3(signature = (model_type, factory, *, modality, dim))]
fn register_encoder_py(
    model_type: String,
    factory: Py<PyAny>,
    modality: &Bound<'_, PyAny>,
    dim: usize,
) -> PyResult<()> {
    let modality = modality_arg(modality)?;
    if dim == 0 {
        return Err(MlmfError::config("dim", "must be at least 1").into());
    }
    let factory = Arc::new(factory);
    let name = model_type.clone();
    register_encoder(
        model_type,
        Arc::new(
            move |req: &LoadRequest<'_>| -> Result<Box<dyn ModalityEncoder>> {
                let processor = match modality {
                    Modality::Text => ProcessorKind::Text {
                        max_length: None,
                        pad_to_max_length: false,
                        max_tokens: None,
                    },
                    Modality::Image => ProcessorKind::Image {
                        height: 0,
                        width: 0,
                    },
                    Modality::Audio => ProcessorKind::Audio {
                        n_mels: 0,
                        frames: 0,
                    },
                    Modality::Video => ProcessorKind::Video {
                        height: 0,
                        width: 0,
                        frames: None,
                    },
                    Modality::Custom(_) => ProcessorKind::Image {
                        height: 0,
                        width: 0,
                    },
                };
                let dir = req.checkpoint.dir().to_path_buf();
                let config = req.checkpoint.config().to_string();
                let func = Python::attach(|py| -> PyResult<Py<PyAny>> {
                    let cfg = py.import("json")?.call_method1("loads", (config,))?;
                    let path = dir.to_string_lossy().into_owned();
                    Ok(factory.bind(py).call1((path, cfg))?.unbind())
                })
                .map_err(|e| {
                    MlmfError::model_load(
                        format!("registered encoder {name:?}"),
                        req.checkpoint.dir(),
                        e.to_string(),
                    )
                })?;
                Ok(Box::new(CallableEncoder {
                    func,
                    info: EncoderInfo {
                        modality,
                        model_type: name.clone(),
                        hidden_size: dim,
                        output_dim: dim,
                        processor,
                        device: Device::Cpu,
                        dtype: DType::F32,
                    },
                }))
            },
        ),
    );
    Ok(())
}

/// The `model_type`s `Encoder.from_pretrained` can load.
#[pyfunction]
#[pyo3(name = "supported_model_types")]
fn supported_model_types_py() -> Vec<String> {
    supported_model_types()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEncoder>()?;
    m.add_class::<PyEncoderOutput>()?;
    m.add_function(wrap_pyfunction!(supported_model_types_py, m)?)?;
    let f = wrap_pyfunction!(register_encoder_py, m)?;
    m.add("register_encoder", f)?;
    Ok(())
}
