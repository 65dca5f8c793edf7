//! `mlmf.CrossModalAttention`: the cross-modal attention layer on NumPy arrays.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::attention::{average_heads, CrossModalAttention};
use crate::config::CrossModalAttentionConfig;
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::python::config::modality_arg;
use crate::python::detached;

/// A float32 tensor from a NumPy float array of rank `rank` (other float dtypes are
/// converted); `what` names the argument in errors.
pub(crate) fn float_tensor(
    obj: &Bound<'_, PyAny>,
    modality: Modality,
    rank: usize,
    what: &str,
) -> PyResult<Tensor> {
    let np = obj.py().import("numpy")?;
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyErr::from(MlmfError::input(
            modality,
            format!("{what}: expected a NumPy array"),
        ))
    })?;
    let kind: String = arr.dtype().getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "f" | "i" | "u" | "b") {
        return Err(MlmfError::input(
            modality,
            format!(
                "{what}: expected a numeric array, got dtype {}",
                arr.dtype()
            ),
        )
        .into());
    }
    if arr.ndim() != rank {
        return Err(MlmfError::input(
            modality,
            format!(
                "{what}: expected {rank} dimensions, got shape {:?}",
                arr.shape()
            ),
        )
        .into());
    }
    let conv = np.call_method1("ascontiguousarray", (obj, "float32"))?;
    let a = conv.cast::<PyArrayDyn<f32>>()?.readonly();
    let v = a.as_array();
    let shape = v.shape().to_vec();
    // ascontiguousarray made it C-contiguous: one memcpy.
    let data: Vec<f32> = match v.as_slice() {
        Some(s) => s.to_vec(),
        None => v.iter().copied().collect(),
    };
    Tensor::from_vec(data, shape, &Device::Cpu)
        .map_err(|e| MlmfError::Internal(format!("{what}: {e}")).into())
}

pub(crate) fn host_array(py: Python<'_>, t: &Tensor) -> Result<Py<PyAny>> {
    let f = ce("copy to host");
    let dims = t.dims().to_vec();
    // States of a 16-bit model (on a GPU) come back as float32 arrays.
    let v: Vec<f32> = super::encoders::to_host_f32(t)?
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(f)?;
    let a = ndarray::ArrayD::from_shape_vec(dims, v)
        .map_err(|e| MlmfError::Internal(format!("output shape: {e}")))?;
    Ok(a.into_pyarray(py).into_any().unbind())
}

/// Multi-head cross-modal attention (see the Rust `mlmf::attention` docs).
#[pyclass(module = "mlmf._mlmf", name = "CrossModalAttention", frozen)]
pub struct PyCrossModalAttention {
    inner: CrossModalAttention,
    cfg: CrossModalAttentionConfig,
}

#[pymethods]
impl PyCrossModalAttention {
    #[new]
    #[pyo3(signature = (dim, num_heads=8, kv_dim=None, *, head_dim=None, num_kv_heads=None,
                        temperature=1.0, dropout=0.0, qk_norm=false, qk_norm_eps=1e-6,
                        softcap=None, sliding_window=None, top_k=None, sparsity_ratio=None,
                        rope_base=None, rope_scale=1.0, adaptive=false,
                        adaptive_target_std=1.0, adaptive_min_temperature=0.5,
                        adaptive_max_temperature=2.0, adaptive_max_sparsity=0.5,
                        weights=None, seed=0,
                        query_modality=None, kv_modality=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dim: usize,
        num_heads: usize,
        kv_dim: Option<usize>,
        head_dim: Option<usize>,
        num_kv_heads: Option<usize>,
        temperature: f32,
        dropout: f32,
        qk_norm: bool,
        qk_norm_eps: f32,
        softcap: Option<f32>,
        sliding_window: Option<usize>,
        top_k: Option<usize>,
        sparsity_ratio: Option<f64>,
        rope_base: Option<f64>,
        rope_scale: f64,
        adaptive: bool,
        adaptive_target_std: f32,
        adaptive_min_temperature: f32,
        adaptive_max_temperature: f32,
        adaptive_max_sparsity: f64,
        weights: Option<PathBuf>,
        seed: u64,
        query_modality: Option<&Bound<'_, PyAny>>,
        kv_modality: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cfg = CrossModalAttentionConfig {
            num_heads,
            head_dim,
            num_kv_heads,
            dropout,
            temperature,
            qk_norm,
            qk_norm_eps,
            softcap,
            sliding_window,
            top_k,
            sparsity_ratio,
            rope_base,
            rope_scale,
            adaptive,
            adaptive_target_std,
            adaptive_min_temperature,
            adaptive_max_temperature,
            adaptive_max_sparsity,
            ..CrossModalAttentionConfig::default()
        };
        let kv_dim = kv_dim.unwrap_or(dim);
        let mut inner = match &weights {
            Some(path) => CrossModalAttention::load(path, dim, kv_dim, &cfg, &Device::Cpu)?,
            None => {
                let layer = CrossModalAttention::new(dim, kv_dim, &cfg, seed, &Device::Cpu)?;
                let warnings = py.import("warnings")?;
                warnings.call_method1(
                    "warn",
                    (format!(
                        "CrossModalAttention(dim={dim}, kv_dim={kv_dim}) has no weights: \
                         initialised from seed {seed}, untrained"
                    ),),
                )?;
                layer
            }
        };
        if let Some(m) = query_modality {
            inner.query_modality = modality_arg(m)?;
        }
        if let Some(m) = kv_modality {
            inner.kv_modality = modality_arg(m)?;
        }
        Ok(Self { inner, cfg })
    }

    /// `query` `[B, Tq, dim]` attends over `key_value` `[B, Tk, kv_dim]`; masks `[B, T]`
    /// of 0/1. Returns the output `[B, Tq, dim]`, or `(output, weights)` with
    /// `return_weights` (per head `[B, H, Tq, Tk]`, or `[B, Tq, Tk]` averaged over heads
    /// with `average_weights=True`).
    #[pyo3(signature = (query, key_value, query_mask=None, kv_mask=None, return_weights=false,
                        average_weights=false))]
    #[allow(clippy::too_many_arguments)]
    fn __call__(
        &self,
        py: Python<'_>,
        query: &Bound<'_, PyAny>,
        key_value: &Bound<'_, PyAny>,
        query_mask: Option<&Bound<'_, PyAny>>,
        kv_mask: Option<&Bound<'_, PyAny>>,
        return_weights: bool,
        average_weights: bool,
    ) -> PyResult<Py<PyAny>> {
        let (qm, km) = (self.inner.query_modality, self.inner.kv_modality);
        let q = float_tensor(query, qm, 3, "query")?;
        let kv = float_tensor(key_value, km, 3, "key_value")?;
        let qmask = query_mask
            .map(|m| float_tensor(m, qm, 2, "query_mask"))
            .transpose()?;
        let kmask = kv_mask
            .map(|m| float_tensor(m, km, 2, "kv_mask"))
            .transpose()?;
        let out = detached(py, || {
            let out =
                self.inner
                    .forward(&q, &kv, qmask.as_ref(), kmask.as_ref(), return_weights)?;
            let weights = match (&out.weights, average_weights) {
                (Some(w), true) => Some(average_heads(w)?),
                (w, _) => w.clone(),
            };
            Ok((out.output, weights))
        })?;
        let output = host_array(py, &out.0)?;
        match out.1 {
            Some(w) => Ok(PyTuple::new(py, [output, host_array(py, &w)?])?
                .into_any()
                .unbind()),
            None => Ok(output),
        }
    }

    /// Writes the weights to a safetensors file (`q_proj.weight`, ... `out_proj.bias`).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || self.inner.save(&path))
    }

    /// True when the weights come from the seeded initialisation, not a file.
    #[getter]
    fn untrained(&self) -> bool {
        self.inner.is_untrained()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dims().0
    }

    #[getter]
    fn kv_dim(&self) -> usize {
        self.inner.dims().1
    }

    #[getter]
    fn num_heads(&self) -> usize {
        self.inner.heads().0
    }

    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.heads().1
    }

    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.heads().2
    }

    #[getter]
    fn temperature(&self) -> f32 {
        self.cfg.temperature
    }

    /// The constructor's keyword arguments as a dict (`dim`, `num_heads`, `kv_dim`,
    /// `head_dim`, ... `adaptive_max_sparsity`): `CrossModalAttention(**config)` builds
    /// the same layer.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut v =
            serde_json::to_value(&self.cfg).map_err(|e| MlmfError::Internal(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            for k in ["pairs", "weights", "seed"] {
                o.remove(k);
            }
            let (dim, kv_dim) = self.inner.dims();
            o.insert("dim".into(), dim.into());
            o.insert("kv_dim".into(), kv_dim.into());
        }
        super::config::to_py(py, &v)
    }

    fn __repr__(&self) -> String {
        let (h, kvh, hd) = self.inner.heads();
        let (d, kvd) = self.inner.dims();
        format!(
            "CrossModalAttention(dim={d}, kv_dim={kvd}, num_heads={h}, num_kv_heads={kvh}, \
             head_dim={hd}, temperature={}{})",
            self.cfg.temperature,
            if self.inner.is_untrained() {
                ", untrained"
            } else {
                ""
            }
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCrossModalAttention>()
}
