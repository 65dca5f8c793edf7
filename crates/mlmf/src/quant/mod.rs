//! Weight formats on disk: writing a pre-quantised int8 checkpoint.
//!
//! [`quantize_checkpoint`] writes a copy of a checkpoint folder whose linear weights
//! are int8 codes (`{name}.weight`, `[out, in]`, 7 bits) with one float32 scale per
//! output channel (`{name}.weight_scale`), by the same rule as quantising at load
//! ([`crate::kernels::int8`]). Loading the copy does no quantisation work: the codes
//! are only re-laid into the kernel's panels. Which weights are linear maps is what
//! the encoders say when they load the checkpoint in int8, every tower of it.
//!
//! This module holds no kernels; the quantisation rule is the kernels'.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Serialize;

use crate::encoders::{registry, Checkpoint, LoadRequest, Precision};
use crate::error::{MlmfError, Result};
use crate::kernels::int8::quantize_out_in;
use crate::modality::Modality;

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    /// The folder written.
    pub path: PathBuf,
    /// The weights stored as int8 codes, sorted.
    pub quantized: Vec<String>,
    /// Bytes of the source's weight files, and of the written one.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

const WHAT: &str = "quantize";

fn err(path: &Path, message: impl Into<String>) -> MlmfError {
    MlmfError::model_load(WHAT, path, message)
}

/// The linear weights the encoders of `ckpt` quantise when loaded in int8, learnt from
/// a float32 load (every
/// tower: the natural one, then text, image and audio where the checkpoint has them).
fn linear_weights(ckpt: &Checkpoint) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut first_error = None;
    for modality in [
        None,
        Some(Modality::Text),
        Some(Modality::Image),
        Some(Modality::Audio),
    ] {
        let record = Arc::new(Mutex::new(Vec::new()));
        let request = LoadRequest {
            checkpoint: ckpt,
            modality,
            device: Device::Cpu,
            // float32: the names are the same, without quantising every weight.
            precision: Precision::F32,
            bytes: Default::default(),
            record: Some(record.clone()),
        };
        match registry::load(&request) {
            Ok(_) => {
                if let Ok(r) = record.lock() {
                    names.extend(r.iter().cloned());
                }
            }
            Err(e) if modality.is_none() => first_error = Some(e),
            Err(_) => {}
        }
    }
    match first_error {
        Some(e) if names.is_empty() => Err(e),
        _ => Ok(names),
    }
}

/// The float32 values of a float32, bfloat16 or float16 view.
fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Writes `dst`: a copy of the checkpoint folder `src` whose linear weights are
/// pre-quantised int8 (see the module docs). `dst` must not exist or be empty.
pub fn quantize_checkpoint(src: &Path, dst: &Path) -> Result<QuantizeReport> {
    if dst.exists() && std::fs::read_dir(dst).map_or(true, |mut d| d.next().is_some()) {
        return Err(err(
            dst,
            "the destination exists and is not empty: give a new folder",
        ));
    }
    let ckpt = Checkpoint::open(src)?;
    let names = linear_weights(&ckpt)?;
    if names.is_empty() {
        return Err(ckpt.error("no linear weight to quantise in this checkpoint"));
    }
    let views = ckpt.tensor_views();
    let bytes_before: u64 = views.iter().map(|(_, v)| v.data().len() as u64).sum();
    // Owned bytes of the new tensors, then views over them and the untouched ones.
    let mut new: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in &views {
        if !names.contains(name) {
            continue;
        }
        let (&[out, inn], Some(w)) = (view.shape(), to_f32(view)) else {
            return Err(ckpt.error(format!(
                "weight `{name}` ({:?} {:?}) is not a float matrix",
                view.dtype(),
                view.shape()
            )));
        };
        let (codes, scales) = quantize_out_in(&w, out, inn);
        new.push((
            name.clone(),
            Dtype::I8,
            vec![out, inn],
            codes.iter().map(|&q| q as u8).collect(),
        ));
        new.push((
            format!("{name}_scale"),
            Dtype::F32,
            vec![out],
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ));
    }
    let mut out_views: Vec<(String, TensorView<'_>)> = views
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    for (name, dtype, shape, bytes) in &new {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| ckpt.error(format!("weight `{name}`: {e}")))?;
        out_views.push((name.clone(), view));
    }
    std::fs::create_dir_all(dst).map_err(|e| err(dst, e.to_string()))?;
    copy_other_files(src, dst)?;
    let file = dst.join("model.safetensors");
    let metadata = HashMap::from([(
        "mlmf.quantization".to_string(),
        "int8 per output channel, 7-bit codes, float32 scales ({name}.weight_scale)".to_string(),
    )]);
    safetensors::serialize_to_file(out_views, Some(metadata), &file)
        .map_err(|e| err(&file, e.to_string()))?;
    let bytes_after = std::fs::metadata(&file).map_or(0, |m| m.len());
    Ok(QuantizeReport {
        path: dst.to_path_buf(),
        quantized: names.into_iter().collect(),
        bytes_before,
        bytes_after,
    })
}

/// Copies everything in `src` but the weight files (config, tokenizer, processor and
/// sentence-transformers files, folders included) to `dst`.
fn copy_other_files(src: &Path, dst: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| err(src, e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| err(src, e.to_string()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if name_s.ends_with(".safetensors") || name_s.ends_with(".safetensors.index.json") {
            continue;
        }
        let to = dst.join(&name);
        if path.is_dir() {
            std::fs::create_dir_all(&to).map_err(|e| err(&to, e.to_string()))?;
            copy_other_files(&path, &to)?;
        } else {
            std::fs::copy(&path, &to).map_err(|e| err(&to, e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/encoders/models")
            .join(name)
    }

    #[test]
    fn every_tower_linear_map_is_quantised_and_the_rest_copied() {
        let dir = tempdir();
        let dst = dir.join("clip_int8");
        let report = quantize_checkpoint(&fixture("clip_tiny"), &dst).unwrap();
        // Both towers: the text and the vision encoder layers.
        assert!(report
            .quantized
            .iter()
            .any(|n| n.starts_with("text_model.encoder.")));
        assert!(report
            .quantized
            .iter()
            .any(|n| n.starts_with("vision_model.encoder.")));
        assert!(report.bytes_after < report.bytes_before);
        let out = Checkpoint::open(&dst).unwrap();
        for n in &report.quantized {
            assert_eq!(out.stored_dtype(n), Some(Dtype::I8), "{n}");
            assert_eq!(
                out.stored_dtype(&format!("{n}_scale")),
                Some(Dtype::F32),
                "{n}"
            );
        }
        // Embeddings and norms stay as they were.
        let src = Checkpoint::open(fixture("clip_tiny")).unwrap();
        for n in src
            .names()
            .filter(|n| !report.quantized.iter().any(|q| q == n))
        {
            assert_eq!(out.stored_dtype(n), src.stored_dtype(n), "{n}");
        }
        assert!(dst.join("config.json").is_file());
        assert!(
            dst.join("tokenizer.json").is_file()
                == fixture("clip_tiny").join("tokenizer.json").is_file()
        );
        // A second run into the same folder is refused.
        let e = quantize_checkpoint(&fixture("clip_tiny"), &dst).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mlmf-quant-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
