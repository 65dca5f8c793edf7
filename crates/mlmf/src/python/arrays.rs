//! Python inputs -> Rust values (NumPy arrays borrowed in place, or copied by
//! [`raw_item`]), and Rust arrays -> NumPy without copies.
//!
//! A list or tuple is a batch; anything else is a batch of one. Items are paths (`str`,
//! `os.PathLike`), encoded bytes (`bytes`, `bytearray`, `memoryview`) or NumPy arrays.
//! Type and dtype errors name the modality and the item's index.

use std::path::PathBuf;

use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
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

/// A batch item with its NumPy array (if any) borrowed read-only for the duration of a
/// call, so that Rust reads it in place. The array must not be written from another
/// thread meanwhile (the same rule as for NumPy's own GIL-free functions).
pub(crate) enum Item<'py> {
    Source(Source),
    U8(PyReadonlyArrayDyn<'py, u8>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

impl Item<'_> {
    /// The item with its array copied.
    pub(crate) fn into_raw(self) -> RawItem {
        match self {
            Self::Source(s) => RawItem::Source(s),
            Self::U8(a) => RawItem::U8(a.as_array().to_owned()),
            Self::F32(a) => RawItem::F32(a.as_array().to_owned()),
        }
    }
}

/// One Python object as a batch item; arrays are borrowed, not copied.
pub(crate) fn item<'py>(
    obj: &Bound<'py, PyAny>,
    modality: Modality,
    index: usize,
    expected: &str,
) -> PyResult<Item<'py>> {
    let bad = |msg: String| -> PyErr { MlmfError::input(modality, msg).at_index(index).into() };
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Item::Source(Source::Bytes(b.as_bytes().to_vec())));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Item::Source(Source::Bytes(b.to_vec())));
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let busy =
            || bad("the array is borrowed for writing elsewhere: expected a readable array".into());
        if let Ok(a) = arr.cast::<PyArrayDyn<u8>>() {
            return a.try_readonly().map(Item::U8).map_err(|_| busy());
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
            return a.try_readonly().map(Item::F32).map_err(|_| busy());
        }
        let dtype = arr.dtype().to_string();
        return Err(bad(format!(
            "unsupported array dtype {dtype} with shape {:?}: expected {expected}",
            arr.shape()
        )));
    }
    if obj.is_instance_of::<pyo3::types::PyMemoryView>() {
        let b: Vec<u8> = obj.call_method0("tobytes")?.extract()?;
        return Ok(Item::Source(Source::Bytes(b)));
    }
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(Item::Source(Source::Path(p)));
    }
    Err(bad(format!("got {}: expected {expected}", type_name(obj))))
}

/// A list/tuple (or single object) as a batch of [`Item`]s; empty batches are refused.
pub(crate) fn batch<'py>(
    obj: &Bound<'py, PyAny>,
    modality: Modality,
    expected: &str,
) -> PyResult<Vec<Item<'py>>> {
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
        .map(|(i, o)| item(o, modality, i, expected))
        .collect()
}

/// [`item`] with the array copied.
pub(crate) fn raw_item(
    obj: &Bound<'_, PyAny>,
    modality: Modality,
    index: usize,
    expected: &str,
) -> PyResult<RawItem> {
    item(obj, modality, index, expected).map(Item::into_raw)
}
