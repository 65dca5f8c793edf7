//! Helpers the integration tests share: the encoder fixtures and their expected outputs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/encoders")
}

/// Arrays of expected.npz by key, as float32 or int64 tensors.
pub fn expected() -> HashMap<String, Tensor> {
    let file = std::fs::File::open(fixtures().join("expected.npz")).unwrap();
    let mut npz = ndarray_npy::NpzReader::new(file).unwrap();
    let mut out = HashMap::new();
    for name in npz.names().unwrap() {
        let key = name.trim_end_matches(".npy").to_string();
        let t = if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&name) {
            let shape = a.shape().to_vec();
            Tensor::from_vec(a.iter().copied().collect::<Vec<_>>(), shape, &Device::Cpu)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i64>, ndarray::IxDyn>(&name) {
            let shape = a.shape().to_vec();
            Tensor::from_vec(a.iter().copied().collect::<Vec<_>>(), shape, &Device::Cpu)
        } else {
            continue;
        };
        out.insert(key, t.unwrap());
    }
    out
}

pub fn manifest_case(id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap()
}

pub fn array(npz: &HashMap<String, Tensor>, entry: &serde_json::Value) -> Tensor {
    npz[entry["key"].as_str().unwrap()].clone()
}

pub fn ids(t: &Tensor) -> Array2<i64> {
    let (b, n) = t.dims2().unwrap();
    Array2::from_shape_vec((b, n), t.flatten_all().unwrap().to_vec1::<i64>().unwrap()).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
