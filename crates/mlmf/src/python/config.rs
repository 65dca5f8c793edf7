//! `mlmf.Modality` and `mlmf.MultiModalConfig`.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::config::{ConfigFormat, MultiModalConfig};
use crate::error::MlmfError;
use crate::modality::Modality;

/// A kind of input: `Modality.TEXT`, `IMAGE`, `AUDIO`, `VIDEO`, or `Modality.custom(n)`.
#[pyclass(
    name = "Modality",
    module = "mlmf._mlmf",
    frozen,
    eq,
    hash,
    ord,
    from_py_object
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PyModality(pub(crate) Modality);

/// A modality argument: an `mlmf.Modality` or its name (`"text"`, `"custom:7"`).
pub(crate) fn modality_arg(obj: &Bound<'_, PyAny>) -> PyResult<Modality> {
    if let Ok(m) = obj.extract::<PyModality>() {
        return Ok(m.0);
    }
    let name: String = obj.extract().map_err(|_| {
        PyErr::from(MlmfError::config(
            "modality",
            "expected an mlmf.Modality or a modality name such as \"image\"",
        ))
    })?;
    Ok(name.parse()?)
}

#[pymethods]
impl PyModality {
    #[classattr]
    const TEXT: PyModality = PyModality(Modality::Text);
    #[classattr]
    const IMAGE: PyModality = PyModality(Modality::Image);
    #[classattr]
    const AUDIO: PyModality = PyModality(Modality::Audio);
    #[classattr]
    const VIDEO: PyModality = PyModality(Modality::Video);

    /// A user-defined modality with a numeric id.
    #[staticmethod]
    fn custom(id: u32) -> Self {
        Self(Modality::Custom(id))
    }

    /// Parses a name: `"text"`, `"image"`, `"audio"`, `"video"`, `"custom:7"`.
    #[staticmethod]
    fn parse(name: &str) -> PyResult<Self> {
        Ok(Self(name.parse()?))
    }

    /// The canonical name.
    #[getter]
    fn name(&self) -> String {
        self.0.to_string()
    }

    /// The id of a custom modality, `None` for built-in ones.
    #[getter]
    fn custom_id(&self) -> Option<u32> {
        match self.0 {
            Modality::Custom(id) => Some(id),
            _ => None,
        }
    }

    fn __str__(&self) -> String {
        self.0.to_string()
    }

    fn __repr__(&self) -> String {
        match self.0 {
            Modality::Custom(id) => format!("Modality.custom({id})"),
            m => format!("Modality.{}", m.to_string().to_uppercase()),
        }
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let parse = py.get_type::<Self>().getattr("parse")?;
        Ok((parse, (self.0.to_string(),)))
    }
}

/// The configuration of a multimodal model (see the config reference in the docs).
#[pyclass(name = "MultiModalConfig", module = "mlmf._mlmf", from_py_object)]
#[derive(Clone)]
pub(crate) struct PyMultiModalConfig(pub(crate) MultiModalConfig);

pub(crate) fn to_py<'py>(
    py: Python<'py>,
    value: &serde_json::Value,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?
        .call_method1("loads", (value.to_string(),))
}

pub(crate) fn from_py(obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let py = obj.py();
    // Paths (pathlib.Path, os.PathLike) become strings.
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("default", py.import("os")?.getattr("fspath")?)?;
    let text: String = py
        .import("json")?
        .call_method("dumps", (obj,), Some(&kwargs))
        .map_err(|e| MlmfError::config("", format!("not a config: {e}")))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| MlmfError::config("", e.to_string()).into())
}

#[pymethods]
impl PyMultiModalConfig {
    /// An empty config (defaults everywhere), or one built from keyword arguments
    /// with the same structure as a config file.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        match kwargs {
            Some(kw) => Self::from_dict(kw.as_any()),
            None => Ok(Self(MultiModalConfig::default())),
        }
    }

    /// Reads a `.toml`, `.yaml`/`.yml` or `.json` file and validates it.
    #[staticmethod]
    fn from_file(path: std::path::PathBuf) -> PyResult<Self> {
        Ok(Self(MultiModalConfig::from_file(path)?))
    }

    /// Builds from a dict with the structure of a config file, and validates it.
    #[staticmethod]
    fn from_dict(d: &Bound<'_, PyAny>) -> PyResult<Self> {
        let c = MultiModalConfig::from_value(from_py(d)?)?;
        c.validate()?;
        Ok(Self(c))
    }

    /// Parses a string in the given format (`"toml"`, `"yaml"`, `"json"`).
    #[staticmethod]
    #[pyo3(signature = (text, format = "toml"))]
    fn from_str(text: &str, format: &str) -> PyResult<Self> {
        let f = match format {
            "toml" => ConfigFormat::Toml,
            "yaml" | "yml" => ConfigFormat::Yaml,
            "json" => ConfigFormat::Json,
            other => {
                return Err(MlmfError::config(
                    "format",
                    format!("unknown format {other:?}: expected toml, yaml or json"),
                )
                .into())
            }
        };
        Ok(Self(MultiModalConfig::from_str_as(text, f)?))
    }

    /// Writes the config; the format follows the extension.
    fn to_file(&self, path: std::path::PathBuf) -> PyResult<()> {
        Ok(self.0.to_file(path)?)
    }

    /// The config as plain Python data.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.0.to_value())
    }

    /// Checks every value; raises `ConfigError` naming the field path.
    fn validate(&self) -> PyResult<()> {
        Ok(self.0.validate()?)
    }

    /// The processor of every enabled modality, `{"text": TextProcessor, ...}`: each
    /// checkpoint's own settings with the config's `preprocessing` keys laid over them.
    fn processors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let cfg = self.0.clone();
        let procs = super::detached(py, move || {
            crate::preprocess::Preprocessors::from_config(&cfg)
        })?;
        super::preprocess::processors_to_py(py, procs)
    }

    /// Names of the enabled modalities.
    #[getter]
    fn modalities(&self) -> Vec<PyModality> {
        self.0
            .enabled_modalities()
            .into_iter()
            .map(PyModality)
            .collect()
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.0 == other.0
    }

    fn __repr__(&self) -> String {
        format!("MultiModalConfig({})", self.0.to_value())
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let ctor = py.get_type::<Self>().getattr("from_dict")?;
        let args = PyTuple::new(py, [to_py(py, &self.0.to_value())?])?;
        Ok((ctor, args))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModality>()?;
    m.add_class::<PyMultiModalConfig>()?;
    Ok(())
}
