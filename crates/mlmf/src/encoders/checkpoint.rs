//! A checkpoint directory in the Hugging Face layout: `config.json` plus safetensors
//! weights (one `model.safetensors`, or shards listed by `model.safetensors.index.json`),
//! memory-mapped.
//!
//! `pytorch_model.bin` is never read: unpickling runs arbitrary code, so a directory with
//! only that file is refused with instructions to convert it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{MlmfError, Result};

/// What `ModelLoad` errors say was being loaded.
const WHAT: &str = "encoder checkpoint";

/// An opened checkpoint: its config and its memory-mapped weights.
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    weights: MmapedSafetensors,
    names: BTreeSet<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Reads `dir/config.json` and maps the weights.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(MlmfError::model_load(
                WHAT,
                &dir,
                "not a directory (expected a checkpoint directory with config.json and \
                 safetensors weights)",
            ));
        }
        let config = read_config(&dir)?;
        let files = weight_files(&dir)?;
        // SAFETY: the files are mapped read-only; like every memory-mapped reader we rely
        // on nobody truncating them while the model is loaded (documented in the guide).
        let weights = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| MlmfError::model_load(WHAT, &dir, format!("invalid safetensors: {e}")))?;
        let names = weights.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            dir,
            config,
            weights,
            names,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// `config.json`'s `model_type`, if any.
    pub fn model_type(&self) -> Option<&str> {
        self.config.get("model_type").and_then(|v| v.as_str())
    }

    /// `config.json`'s `architectures` (empty when absent).
    pub fn architectures(&self) -> Vec<String> {
        self.config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every tensor name in the weights.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The prefix under which `probe` (a name relative to a model's root, such as
    /// `embeddings.word_embeddings.weight`) is stored: `""`, `"bert."`, `"model."` ...
    /// Checkpoints saved from a task head (`BertForMaskedLM`, `WhisperForConditional-
    /// Generation`) nest the base model under such a prefix. The shortest match wins.
    pub fn find_prefix(&self, probe: &str) -> Option<String> {
        self.names
            .iter()
            .filter_map(|n| n.strip_suffix(probe))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .min_by_key(|p| p.len())
            .map(String::from)
    }

    /// Loads tensor `name` as stored (any shape and dtype) on the CPU.
    pub fn any_tensor(&self, name: &str) -> Result<Tensor> {
        if !self.names.contains(name) {
            return Err(MlmfError::model_load(
                WHAT,
                &self.dir,
                format!("weight `{name}` is missing"),
            ));
        }
        self.weights
            .load(name, &Device::Cpu)
            .map_err(|e| MlmfError::model_load(WHAT, &self.dir, format!("weight `{name}`: {e}")))
    }

    /// Loads tensor `name`, checking its shape, converted to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.any_tensor(name)?;
        if t.dims() != shape {
            return Err(MlmfError::model_load(
                WHAT,
                &self.dir,
                format!(
                    "weight `{name}` has shape {:?}, expected {shape:?} from config.json",
                    t.dims()
                ),
            ));
        }
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(|e| MlmfError::model_load(WHAT, &self.dir, format!("weight `{name}`: {e}")))
    }

    /// The transpose `[c, r]` of the float32 matrix `name` stored `[r, c]` = `shape`,
    /// as a contiguous float32 CPU tensor built in one pass over the mapped file;
    /// `None` when it is stored in another dtype (the caller converts then).
    pub(crate) fn tensor_transposed(
        &self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<Tensor>> {
        let err = |m: String| MlmfError::model_load(WHAT, &self.dir, m);
        let view = match self.weights.get(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        if view.dtype() != safetensors::Dtype::F32 {
            return Ok(None);
        }
        let bytes = self.matrix_bytes(name, &view, shape, 4)?;
        let [r, c] = shape;
        let out = crate::kernels::transpose_le_bytes(bytes, r, c);
        Tensor::from_vec(out, (c, r), &Device::Cpu)
            .map(Some)
            .map_err(|e| err(format!("weight `{name}`: {e}")))
    }

    /// Every stored tensor, as views of the mapped files.
    pub(crate) fn tensor_views(&self) -> Vec<(String, safetensors::tensor::TensorView<'_>)> {
        self.weights.tensors()
    }

    /// The dtype `name` is stored in, when it exists.
    pub(crate) fn stored_dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        self.weights.get(name).ok().map(|v| v.dtype())
    }

    /// The int8 codes of a pre-quantised linear weight `name` stored `[out, in]` =
    /// `shape`, transposed to `[in, out]`.
    pub(crate) fn int8_transposed(&self, name: &str, shape: [usize; 2]) -> Result<Vec<i8>> {
        let err = |m: String| MlmfError::model_load(WHAT, &self.dir, m);
        let view = self
            .weights
            .get(name)
            .map_err(|_| err(format!("weight `{name}` is missing")))?;
        if view.dtype() != safetensors::Dtype::I8 {
            return Err(err(format!(
                "weight `{name}` is {:?}, expected int8 codes",
                view.dtype()
            )));
        }
        let bytes = self.matrix_bytes(name, &view, shape, 1)?;
        let [r, c] = shape;
        let mut out = vec![0i8; r * c];
        for (i, row) in bytes.chunks_exact(c).enumerate() {
            for (j, &b) in row.iter().enumerate() {
                out[j * r + i] = b as i8;
            }
        }
        Ok(out)
    }

    /// The data of the matrix `view` (`name`), checked to be `shape` with `elem` bytes
    /// per value.
    fn matrix_bytes<'v>(
        &self,
        name: &str,
        view: &'v safetensors::tensor::TensorView<'_>,
        shape: [usize; 2],
        elem: usize,
    ) -> Result<&'v [u8]> {
        if view.shape() != shape {
            return Err(self.error(format!(
                "weight `{name}` has shape {:?}, expected {shape:?} from config.json",
                view.shape()
            )));
        }
        let bytes = view.data();
        if bytes.len() != shape[0] * shape[1] * elem {
            return Err(self.error(format!("weight `{name}`: truncated data")));
        }
        Ok(bytes)
    }

    /// A [`ModelLoad`](MlmfError::ModelLoad) error about this checkpoint.
    pub fn error(&self, message: impl Into<String>) -> MlmfError {
        MlmfError::model_load(WHAT, &self.dir, message)
    }
}

fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        MlmfError::model_load(
            WHAT,
            dir,
            format!("cannot read config.json ({e}); a Hugging Face checkpoint directory has one"),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| MlmfError::model_load(WHAT, &path, format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(MlmfError::model_load(WHAT, &path, "expected a JSON object"));
    }
    Ok(value)
}

/// The safetensors files of a checkpoint, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| MlmfError::model_load(WHAT, &index, e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| MlmfError::model_load(WHAT, &index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| MlmfError::model_load(WHAT, &index, "no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if files.is_empty() {
            return Err(MlmfError::model_load(WHAT, &index, "`weight_map` is empty"));
        }
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(f);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(MlmfError::model_load(
                        WHAT,
                        &index,
                        format!("shard {f} listed in weight_map is missing"),
                    ))
                }
            })
            .collect();
    }
    let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| MlmfError::model_load(WHAT, dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    others.sort();
    if !others.is_empty() {
        return Ok(others);
    }
    let pickled = [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.pt",
        "model.pth",
    ]
    .into_iter()
    .find(|f| dir.join(f).is_file());
    Err(MlmfError::model_load(
        WHAT,
        dir,
        match pickled {
            Some(f) => format!(
                "only {f} is present; mlmf reads safetensors only and never unpickles \
                 weights. Convert once with transformers: `AutoModel.from_pretrained(dir)\
                 .save_pretrained(dir, safe_serialization=True)`, which writes \
                 model.safetensors"
            ),
            None => "no weights: expected model.safetensors or model.safetensors.index.json \
                     with its shards"
                .to_string(),
        },
    ))
}
