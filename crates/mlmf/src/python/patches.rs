//! `mlmf.PatchImageProcessor`: variable-resolution (NaFlex) patches for SigLIP 2, and
//! the dict form of its output that `Encoder.encode` takes.

use std::path::PathBuf;

use ndarray::Array2;
use numpy::{IntoPyArray, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyDictMethods};

use super::detached;
use super::encoders::{dims, float_array};
use super::preprocess::{
    config_from_text, config_to_py, config_to_text, image_args, kwargs_json, ImageArg,
};
use crate::encoders::EncoderInput;
use crate::error::MlmfError;
use crate::modality::Modality;
use crate::preprocess::image::{ImageRef, PatchProcessor, PatchProcessorConfig};

/// Cuts images into patches at (about) their own aspect ratio, at most
/// `max_num_patches` each, as transformers' `Siglip2ImageProcessor`.
#[pyclass(name = "PatchImageProcessor", module = "mlmf._mlmf", frozen)]
pub(crate) struct PyPatchProcessor {
    inner: PatchProcessor,
}

#[pymethods]
impl PyPatchProcessor {
    /// Keyword settings use the Hugging Face names (`patch_size`, `max_num_patches`,
    /// `resample`, `image_mean`, ...); anything not given takes SigLIP 2's value.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut obj = kwargs_json(kwargs)?;
        obj.insert(
            "image_processor_type".into(),
            "Siglip2ImageProcessor".into(),
        );
        let cfg = PatchProcessorConfig::from_hf_json(&serde_json::Value::Object(obj))?;
        Ok(Self {
            inner: PatchProcessor::new(cfg)?,
        })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or the file).
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = detached(py, move || PatchProcessor::from_pretrained(&path))?;
        Ok(Self { inner })
    }

    #[staticmethod]
    fn _from_config_json(text: &str) -> PyResult<Self> {
        let cfg = config_from_text(text)?;
        Ok(Self {
            inner: PatchProcessor::new(cfg)?,
        })
    }

    /// Patches of a batch: `{"pixel_values": float32 [B, max_num_patches, P*P*3],
    /// "pixel_attention_mask": int64 [B, max_num_patches], "spatial_shapes": int64
    /// [B, 2]}`, the names transformers uses.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let args = image_args(images)?;
        let refs: Vec<ImageRef<'_>> = args.iter().map(ImageArg::as_ref).collect();
        let batch = detached(py, || self.inner.process_refs(&refs))?;
        let (b, n, _) = batch.patches.dim();
        let mask = Array2::from_shape_fn((b, n), |(i, j)| {
            let (h, w) = batch.shapes[i];
            i64::from(j < h * w)
        });
        let shapes = Array2::from_shape_fn((b, 2), |(i, k)| {
            let (h, w) = batch.shapes[i];
            (if k == 0 { h } else { w }) as i64
        });
        let out = PyDict::new(py);
        out.set_item("pixel_values", batch.patches.into_pyarray(py))?;
        out.set_item("pixel_attention_mask", mask.into_pyarray(py))?;
        out.set_item("spatial_shapes", shapes.into_pyarray(py))?;
        Ok(out)
    }

    /// The settings (`patch_size`, `max_num_patches` and the per-image `image` keys).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        config_to_py(py, self.inner.config())
    }

    fn __repr__(&self) -> String {
        format!("PatchImageProcessor({:?})", self.inner.config())
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let text = config_to_text(self.inner.config())?;
        Ok((py.get_type::<Self>().getattr("_from_config_json")?, (text,)))
    }
}

/// `{"pixel_values": [B, N, D], "spatial_shapes": [B, 2]}` as encoder input.
pub(crate) fn patches_from_dict(d: &Bound<'_, PyDict>) -> PyResult<EncoderInput> {
    let expected = "a dict with `pixel_values` float32 [B, N, P*P*3] and `spatial_shapes` \
                    int [B, 2] (PatchImageProcessor's output)";
    let missing = || {
        PyErr::from(MlmfError::input(
            Modality::Image,
            format!("expected {expected}"),
        ))
    };
    let px = d.get_item("pixel_values")?.ok_or_else(missing)?;
    let px = dims::<ndarray::Ix3>(float_array(&px, Modality::Image, 3, expected)?)?;
    let grid = d.get_item("spatial_shapes")?.ok_or_else(missing)?;
    let np = grid.py().import("numpy")?;
    let grid = np.call_method1("asarray", (grid, "int64"))?;
    let grid: PyReadonlyArray2<'_, i64> = grid.extract().map_err(|_| missing())?;
    let shapes = grid
        .as_array()
        .outer_iter()
        .map(|r| match r.as_slice() {
            Some(&[h, w]) if h >= 0 && w >= 0 => Ok((h as usize, w as usize)),
            _ => Err(missing()),
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(EncoderInput::Patches {
        patches: px,
        shapes,
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPatchProcessor>()
}
