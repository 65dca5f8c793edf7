//! The one mapping from [`MlmfError`] to the Python exception hierarchy:
//!
//! ```text
//! MlmfError
//! ├── ConfigError          (+ ValueError)
//! ├── InputError           (+ ValueError)
//! │   ├── DecodeError
//! │   └── DataError        (a malformed dataset row)
//! ├── ModelLoadError       (+ OSError)
//! ├── MissingModalityError (+ KeyError)
//! ├── DeviceError          (+ RuntimeError)
//! ├── CacheError
//! ├── DistributedError
//! ├── TrainError           (+ RuntimeError)
//! └── InternalError        (+ RuntimeError; also what a Rust panic becomes)
//! ```
//!
//! The builtin second bases let `except ValueError` style code keep working.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{create_exception, PyErr};

use crate::error::MlmfError;

create_exception!(
    mlmf._mlmf,
    MlmfBaseError,
    PyException,
    "Base of every mlmf error."
);
create_exception!(mlmf._mlmf, CacheError, MlmfBaseError, "A cache failed.");
create_exception!(
    mlmf._mlmf,
    DistributedError,
    MlmfBaseError,
    "A distributed (Ray) operation failed."
);

/// Builds `class Name(base, builtin)` at module init, so the hierarchy can have two
/// bases where `create_exception!` allows one.
fn subclass<'py>(
    py: Python<'py>,
    name: &str,
    bases: &[Bound<'py, PyAny>],
    doc: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let builtins = py.import("builtins")?;
    let ns = pyo3::types::PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "mlmf")?;
    builtins
        .getattr("type")?
        .call1((name, PyTuple::new(py, bases)?, ns))
}

/// Creates the exception classes and adds them to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<MlmfBaseError>().into_any();
    base.setattr("__module__", "mlmf")?;
    base.setattr("__name__", "MlmfError")?;
    base.setattr("__qualname__", "MlmfError")?;
    m.add("MlmfError", &base)?;
    let builtin = |n: &str| -> PyResult<Bound<'_, PyAny>> { py.import("builtins")?.getattr(n) };
    let config = subclass(
        py,
        "ConfigError",
        &[base.clone(), builtin("ValueError")?],
        "An invalid configuration value; the message names the field path.",
    )?;
    let input = subclass(
        py,
        "InputError",
        &[base.clone(), builtin("ValueError")?],
        "A bad input; the message names the modality, the input index and what was expected.",
    )?;
    let decode = subclass(
        py,
        "DecodeError",
        std::slice::from_ref(&input),
        "Input bytes that cannot be decoded (corrupt, truncated or unsupported format).",
    )?;
    let data = subclass(
        py,
        "DataError",
        std::slice::from_ref(&input),
        "A malformed dataset row; the message names the row (and id) and the field.",
    )?;
    let train = subclass(
        py,
        "TrainError",
        &[base.clone(), builtin("RuntimeError")?],
        "Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept.",
    )?;
    let load = subclass(
        py,
        "ModelLoadError",
        &[base.clone(), builtin("OSError")?],
        "A checkpoint, tokenizer or processor could not be loaded.",
    )?;
    let missing = subclass(
        py,
        "MissingModalityError",
        &[base.clone(), builtin("KeyError")?],
        "A modality the call needs was not given.",
    )?;
    let device = subclass(
        py,
        "DeviceError",
        &[base.clone(), builtin("RuntimeError")?],
        "The requested device is unavailable in this build or on this machine.",
    )?;
    let internal = subclass(
        py,
        "InternalError",
        &[base.clone(), builtin("RuntimeError")?],
        "A bug in mlmf (an internal invariant failed or Rust code panicked).",
    )?;
    for (name, cls) in [
        ("ConfigError", config),
        ("InputError", input),
        ("DecodeError", decode),
        ("DataError", data),
        ("TrainError", train),
        ("ModelLoadError", load),
        ("MissingModalityError", missing),
        ("DeviceError", device),
        ("InternalError", internal),
    ] {
        m.add(name, cls)?;
    }
    let cache = py.get_type::<CacheError>();
    cache.setattr("__module__", "mlmf")?;
    m.add("CacheError", cache)?;
    let dist = py.get_type::<DistributedError>();
    dist.setattr("__module__", "mlmf")?;
    m.add("DistributedError", dist)?;
    Ok(())
}

fn class_for(err: &MlmfError) -> &'static str {
    match err {
        MlmfError::Config { .. } | MlmfError::ConfigFile { .. } => "ConfigError",
        MlmfError::Input { .. } | MlmfError::Io { .. } => "InputError",
        MlmfError::Decode { .. } => "DecodeError",
        MlmfError::ModelLoad { .. } => "ModelLoadError",
        MlmfError::MissingModality { .. } => "MissingModalityError",
        MlmfError::Device { .. } => "DeviceError",
        MlmfError::Cache { .. } => "CacheError",
        MlmfError::Data { .. } => "DataError",
        MlmfError::Train(_) => "TrainError",
        MlmfError::Internal(_) => "InternalError",
    }
}

impl From<MlmfError> for PyErr {
    fn from(err: MlmfError) -> PyErr {
        let name = class_for(&err);
        let message = err.to_string();
        Python::attach(|py| {
            let cls = py
                .import("mlmf._mlmf")
                .and_then(|m| m.getattr(name))
                .and_then(|c| c.cast_into::<pyo3::types::PyType>().map_err(PyErr::from));
            match cls {
                Ok(cls) => PyErr::from_type(cls, message),
                Err(_) => MlmfBaseError::new_err(message),
            }
        })
    }
}
