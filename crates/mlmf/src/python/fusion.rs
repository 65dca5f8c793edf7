//! `mlmf.Fusion`, `mlmf.FusionOutput` and `mlmf.register_fusion`.
//!
//! Options arrive as keyword arguments and are read through the same serde structs as
//! a config file's `[fusion]` table, so an unknown option is a `ConfigError` naming it.
//! A Python callable becomes a [`FusionComponent`] that calls back with the GIL.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::config::FusionStrategy;
use crate::error::{MlmfError, Result};
use crate::fusion::{
    register_component, Fusion, FusionComponent, FusionInputs, FusionOutput, FusionSettings,
    ModalityInput,
};
use crate::modality::Modality;
use crate::python::attention::{float_tensor, host_array};
use crate::python::config::modality_arg;
use crate::python::detached;

/// A Python callable as a fusion component: called with `{name: array}` of the present
/// modalities (token inputs add `{name}_mask`), returns `[B, out_dim]`.
struct CallableFusion {
    func: Py<PyAny>,
}

impl FusionComponent for CallableFusion {
    fn fuse(&self, inputs: &FusionInputs, _return_attention: bool) -> Result<FusionOutput> {
        let first = inputs
            .present()
            .next()
            .map(|(_, m, _)| m)
            .ok_or_else(|| MlmfError::Internal("custom fusion without inputs".into()))?;
        let fused = Python::attach(|py| -> PyResult<Tensor> {
            let d = PyDict::new(py);
            for (_, m, x) in inputs.present() {
                let states = if x.pooled_form {
                    x.pooled()?
                } else {
                    x.tokens.clone()
                };
                d.set_item(m.to_string(), host_array(py, &states)?)?;
                if let Some(mask) = &x.mask {
                    d.set_item(format!("{m}_mask"), host_array(py, mask)?)?;
                }
            }
            let out = self.func.bind(py).call1((d,))?;
            let rank = out.cast::<PyUntypedArray>().map(|a| a.ndim()).unwrap_or(0);
            float_tensor(&out, first, rank.max(1), "custom fusion result")
        })
        .map_err(|e| MlmfError::input(first, format!("the custom fusion callable failed: {e}")))?;
        Ok(FusionOutput {
            fused,
            gates: None,
            attention: Vec::new(),
        })
    }
}

/// The result of a fusion call.
#[pyclass(module = "mlmf._mlmf", name = "FusionOutput", frozen, get_all)]
pub struct PyFusionOutput {
    /// `[B, out_dim]` float32.
    fused: Py<PyAny>,
    /// `[B, M]` per-modality weights or gate values, or None.
    gates: Option<Py<PyAny>>,
    /// `{name: [B, H, Tq, Tk]}` attention weights (with `return_attention=True`).
    attention: Py<PyDict>,
}

#[pymethods]
impl PyFusionOutput {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let shape = |o: &Py<PyAny>| -> PyResult<String> {
            Ok(o.bind(py).getattr("shape")?.repr()?.to_string())
        };
        Ok(format!(
            "FusionOutput(fused={}, gates={}, attention={:?})",
            shape(&self.fused)?,
            match &self.gates {
                Some(g) => shape(g)?,
                None => "None".into(),
            },
            self.attention
                .bind(py)
                .keys()
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        ))
    }
}

/// `dims` as `[(modality, width)]`, from a dict (its order) or a list of pairs.
/// One modality's embeddings from Python: an array `[B, D]` / `[B, T, D]`, or a
/// `(tokens, mask)` pair.
pub(crate) fn modality_input(m: Modality, v: &Bound<'_, PyAny>) -> PyResult<ModalityInput> {
    let (states, mask) = match v.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => (t.get_item(0)?, Some(t.get_item(1)?)),
        Ok(_) => {
            return Err(MlmfError::input(m, "expected an array or a (tokens, mask) pair").into())
        }
        Err(_) => (v.clone(), None),
    };
    let rank = states
        .cast::<PyUntypedArray>()
        .map(|a| a.ndim())
        .unwrap_or(0);
    if !matches!(rank, 2 | 3) {
        return Err(MlmfError::input(
            m,
            "expected a NumPy array [batch, width] or [batch, tokens, width]",
        )
        .into());
    }
    let states = float_tensor(&states, m, rank, "states")?;
    let mask = mask
        .filter(|m| !m.is_none())
        .map(|mk| float_tensor(&mk, m, 2, "mask"))
        .transpose()?;
    Ok(ModalityInput { states, mask })
}

fn dims_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(Modality, usize)>> {
    let bad = || {
        PyErr::from(MlmfError::config(
            "dims",
            "expected a dict {modality: width}, e.g. {\"text\": 384, \"image\": 512}",
        ))
    };
    let items: Vec<Bound<'_, PyAny>> = if let Ok(d) = obj.cast::<PyDict>() {
        d.items().iter().collect()
    } else if let Ok(l) = obj.cast::<PyList>() {
        l.iter().collect()
    } else {
        return Err(bad());
    };
    items
        .iter()
        .map(|it| {
            let (m, w): (Bound<'_, PyAny>, usize) = it.extract().map_err(|_| bad())?;
            Ok((modality_arg(&m)?, w))
        })
        .collect()
}

/// A fusion layer over several modalities (docs/fusion.md).
#[pyclass(module = "mlmf._mlmf", name = "Fusion", frozen)]
pub struct PyFusion {
    inner: Fusion,
    options: String,
}

#[pymethods]
impl PyFusion {
    #[new]
    #[pyo3(signature = (strategy, dims, out_dim, *, weights=None, seed=0, required=None,
                        r#fn=None, **options))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        strategy: &str,
        dims: &Bound<'_, PyAny>,
        out_dim: usize,
        weights: Option<PathBuf>,
        seed: u64,
        required: Option<Vec<Bound<'_, PyAny>>>,
        r#fn: Option<Py<PyAny>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let dims = dims_arg(dims)?;
        let required: Vec<Modality> = required
            .unwrap_or_default()
            .iter()
            .map(modality_arg)
            .collect::<PyResult<_>>()?;
        let opts = PyDict::new(py);
        if let Some(o) = options {
            opts.update(o.as_mapping())?;
        }
        opts.set_item("strategy", strategy)?;
        let options: String = py
            .import("json")?
            .call_method1("dumps", (&opts,))?
            .extract()?;
        if let Some(func) = r#fn {
            if strategy != "custom" || opts.len() > 1 {
                return Err(MlmfError::config(
                    "fn",
                    "a callable goes with strategy \"custom\" and no other options",
                )
                .into());
            }
            if weights.is_some() {
                return Err(MlmfError::config(
                    "weights",
                    "a custom fusion callable holds its own weights",
                )
                .into());
            }
            let inner = Fusion::with_component(
                &dims,
                out_dim,
                Arc::new(CallableFusion { func }),
                &required,
            )?;
            return Ok(Self { inner, options });
        }
        let parsed: FusionStrategy = serde_json::from_str(&options)
            .map_err(|e| MlmfError::config("fusion", e.to_string()))?;
        let settings = FusionSettings {
            weights,
            seed,
            required,
        };
        let inner = detached(py, || {
            Fusion::new(
                &parsed,
                &dims,
                out_dim,
                &settings,
                &candle_core::Device::Cpu,
            )
        })?;
        if inner.is_untrained() {
            py.import("warnings")?.call_method1(
                "warn",
                (format!(
                    "Fusion({strategy:?}) has no weights: initialised from seed {seed}, untrained"
                ),),
            )?;
        }
        Ok(Self { inner, options })
    }

    /// Fuses `inputs` `{modality: array | (tokens, mask)}` (any subset of the
    /// modalities); arrays are `[B, D]` pooled or `[B, T, D]` tokens.
    #[pyo3(signature = (inputs, return_attention=false))]
    fn __call__(
        &self,
        py: Python<'_>,
        inputs: &Bound<'_, PyDict>,
        return_attention: bool,
    ) -> PyResult<PyFusionOutput> {
        let mut items = Vec::with_capacity(inputs.len());
        for (k, v) in inputs.iter() {
            let m = modality_arg(&k)?;
            items.push((m, modality_input(m, &v)?));
        }
        let custom = matches!(self.inner.strategy(), FusionStrategy::Custom(_));
        let out = if custom {
            // A callable needs the GIL anyway.
            crate::python::guarded(|| self.inner.forward(&items, return_attention))?
        } else {
            detached(py, || self.inner.forward(&items, return_attention))?
        };
        let attention = PyDict::new(py);
        for (name, w) in &out.attention {
            attention.set_item(name, host_array(py, w)?)?;
        }
        Ok(PyFusionOutput {
            fused: host_array(py, &out.fused)?,
            gates: out.gates.as_ref().map(|g| host_array(py, g)).transpose()?,
            attention: attention.unbind(),
        })
    }

    /// Writes the learned tensors to a safetensors file.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || self.inner.save(&path))
    }

    /// The learned tensors' names, in creation order.
    fn tensor_names(&self) -> Vec<String> {
        self.inner
            .tensor_names()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// `{name: shape}` of the learned tensors.
    fn tensor_shapes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (n, s) in self.inner.tensor_names() {
            d.set_item(n, PyTuple::new(py, s)?)?;
        }
        Ok(d)
    }

    #[getter]
    fn untrained(&self) -> bool {
        self.inner.is_untrained()
    }

    #[getter]
    fn strategy(&self) -> &'static str {
        self.inner.strategy().name()
    }

    /// The strategy and its options as given (JSON object text parsed to a dict).
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?.call_method1("loads", (&self.options,))
    }

    #[getter]
    fn dims<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (m, w) in self.inner.modalities() {
            d.set_item(m.to_string(), w)?;
        }
        Ok(d)
    }

    #[getter]
    fn out_dim(&self) -> usize {
        self.inner.out_dim()
    }

    #[getter]
    fn required(&self) -> Vec<String> {
        self.inner
            .required()
            .iter()
            .map(|m| m.to_string())
            .collect()
    }

    fn __repr__(&self) -> String {
        let dims: Vec<String> = self
            .inner
            .modalities()
            .iter()
            .map(|(m, w)| format!("'{m}': {w}"))
            .collect();
        format!(
            "Fusion({:?}, dims={{{}}}, out_dim={}{})",
            self.inner.strategy().name(),
            dims.join(", "),
            self.inner.out_dim(),
            if self.inner.is_untrained() {
                ", untrained"
            } else {
                ""
            }
        )
    }
}

/// Registers a Python callable as the custom fusion component `name` (what a config's
/// `{ strategy = "custom", name = ... }` finds).
#[pyfunction]
#[pyo3(name = "register_fusion")]
fn register_fusion_py(name: &str, func: Py<PyAny>) -> PyResult<()> {
    if name.trim().is_empty() {
        return Err(MlmfError::config("name", "must not be empty").into());
    }
    register_component(name, Arc::new(CallableFusion { func }));
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFusion>()?;
    m.add_class::<PyFusionOutput>()?;
    m.add_function(wrap_pyfunction!(register_fusion_py, m)?)?;
    Ok(())
}
