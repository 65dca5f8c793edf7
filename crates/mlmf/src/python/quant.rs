//! `mlmf.quantize`: writing a pre-quantised int8 checkpoint ([`crate::quant`]).

use std::path::PathBuf;

use pyo3::prelude::*;

use super::config::to_py;
use super::detached;
use crate::error::MlmfError;

/// Writes `dst`, a copy of the checkpoint folder `src` whose linear weights are int8
/// codes with per-channel scales; returns what was written (`path`, `quantized`,
/// `bytes_before`, `bytes_after`).
#[pyfunction]
fn quantize(py: Python<'_>, src: PathBuf, dst: PathBuf) -> PyResult<Bound<'_, PyAny>> {
    let report = detached(py, move || crate::quant::quantize_checkpoint(&src, &dst))?;
    let v = serde_json::to_value(report).map_err(|e| MlmfError::Internal(e.to_string()))?;
    to_py(py, &v)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    Ok(())
}
