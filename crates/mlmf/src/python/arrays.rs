//! Python inputs -> owned Rust values, and Rust arrays -> NumPy without copies.
//!
//! A list or tuple is a batch; anything else is a batch of one. Items are paths (`str`,
//! `os.PathLike`), encoded bytes (`bytes`, `bytearray`, `memoryview`) or NumPy arrays.
//! Type and dtype errors name the modality and the item's index.

use std::path::PathBuf;

use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyTuple};

use crate::error::MlmfError;
use crate::modality::Modality;
use crate::preprocess::Source;

/// One raw item of a batch, owned.
pub(crate) enum RawItem {
    Source(Source),
    U8(ndarray::ArrayD<u8>),
    F32(ndarray::ArrayD<f32>),
}

/// Splits `obj` into its items: a list/tuple is a batch, anything else one item.
pub(crate) fn items<'py>(obj: &Bound<'py, PyAny>) -> Vec<Bound<'py, PyAny>> {
    if let Ok(l) = obj.cast::<PyList>() {
        return l.iter().collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().collect();
    }
    vec![obj.clone()]
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Reads one item; `allow` says which array dtypes the modality takes.
pub(crate) fn raw_item(
    obj: &Bound<'_, PyAny>,
    modality: Modality,
    index: usize,
    expected: &str,
) -> PyResult<RawItem> {
    let bad = |msg: String| -> PyErr { MlmfError::input(modality, msg).at_index(index).into() };
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(RawItem::Source(Source::Bytes(b.as_bytes().to_vec())));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(RawItem::Source(Source::Bytes(b.to_vec())));
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        if let Ok(a) = arr.cast::<PyArrayDyn<u8>>() {
            return Ok(RawItem::U8(a.readonly().as_array().to_owned()));
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
            return Ok(RawItem::F32(a.readonly().as_array().to_owned()));
        }
        let dtype = arr.dtype().to_string();
        return Err(bad(format!(
            "unsupported array dtype {dtype} with shape {:?}: expected {expected}",
            arr.shape()
        )));
    }
    if obj.is_instance_of::<pyo3::types::PyMemoryView>() {
        let b: Vec<u8> = obj.call_method0("tobytes")?.extract()?;
        return Ok(RawItem::Source(Source::Bytes(b)));
    }
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(RawItem::Source(Source::Path(p)));
    }
    Err(bad(format!("got {}: expected {expected}", type_name(obj))))
}

/// Reads a whole batch (see [`items`]); an empty batch is an error.
pub(crate) fn raw_batch(
    obj: &Bound<'_, PyAny>,
    modality: Modality,
    expected: &str,
) -> PyResult<Vec<RawItem>> {
    let list = items(obj);
    if list.is_empty() {
        return Err(MlmfError::input(
            modality,
            format!("empty batch: expected at least one {expected}"),
        )
        .into());
    }
    list.iter()
        .enumerate()
        .map(|(i, o)| raw_item(o, modality, i, expected))
        .collect()
}
