//! Where a fusion layer's tensors come from: a safetensors file (every shape checked,
//! every tensor used) or a seeded initialisation. Either way the tensors are kept, by
//! name, for `save` and `tensor_names`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::attention::SplitMix;
use crate::encoders::layers::{ce, Linear};
use crate::error::{MlmfError, Result};

const WHAT: &str = "fusion weights";

/// How a tensor starts when there is no file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    Zeros,
    Ones,
    /// Uniform in `[-bound, bound)`.
    Uniform(f32),
}

enum Source {
    Loaded {
        tensors: HashMap<String, Tensor>,
        path: PathBuf,
    },
    Seeded(SplitMix),
}

/// A source of named tensors; see the module docs.
pub(crate) struct Params {
    source: Source,
    device: Device,
    /// Every tensor handed out, in order, in PyTorch's layout.
    pub(crate) taken: Vec<(String, Tensor)>,
}

impl Params {
    pub(crate) fn seeded(seed: u64, device: &Device) -> Self {
        Self {
            source: Source::Seeded(SplitMix(seed)),
            device: device.clone(),
            taken: Vec::new(),
        }
    }

    pub(crate) fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| MlmfError::model_load(WHAT, path, e.to_string()))?;
        Ok(Self {
            source: Source::Loaded {
                tensors,
                path: path.to_path_buf(),
            },
            device: device.clone(),
            taken: Vec::new(),
        })
    }

    pub(crate) fn is_seeded(&self) -> bool {
        matches!(self.source, Source::Seeded(_))
    }

    /// The tensor `name` of `shape` (float32).
    pub(crate) fn tensor(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match &mut self.source {
            Source::Loaded { tensors, path } => {
                let t = tensors.remove(name).ok_or_else(|| {
                    MlmfError::model_load(WHAT, &*path, format!("tensor `{name}` is missing"))
                })?;
                if t.dims() != shape {
                    return Err(MlmfError::model_load(
                        WHAT,
                        &*path,
                        format!(
                            "tensor `{name}` has shape {:?}, expected {shape:?}",
                            t.dims()
                        ),
                    ));
                }
                t.to_dtype(DType::F32)
                    .map_err(|e| MlmfError::model_load(WHAT, &*path, e.to_string()))?
            }
            Source::Seeded(rng) => {
                let n: usize = shape.iter().product();
                let f = ce("fusion init");
                match init {
                    Init::Zeros => Tensor::zeros(shape, DType::F32, &self.device).map_err(f)?,
                    Init::Ones => Tensor::ones(shape, DType::F32, &self.device).map_err(f)?,
                    Init::Uniform(bound) => {
                        Tensor::from_vec(rng.uniform(n, bound), shape, &self.device).map_err(f)?
                    }
                }
            }
        };
        self.taken.push((name.to_string(), t.clone()));
        Ok(t)
    }

    /// `[out, in]` weight and (optionally) bias of `name`, initialised as
    /// `torch.nn.Linear` (uniform in `±1/sqrt(in)`).
    pub(crate) fn linear_parts(
        &mut self,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let bound = Init::Uniform(1.0 / (in_dim as f32).sqrt());
        let w = self.tensor(&format!("{name}.weight"), &[out_dim, in_dim], bound)?;
        let b = if bias {
            Some(self.tensor(&format!("{name}.bias"), &[out_dim], bound)?)
        } else {
            None
        };
        Ok((w, b))
    }

    pub(crate) fn linear(
        &mut self,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let (w, b) = self.linear_parts(name, in_dim, out_dim, bias)?;
        Linear::from_parts(w, b)
    }

    /// Ends loading: a file holding tensors nothing asked for belongs to another layer.
    pub(crate) fn finish(self, what: &str) -> Result<Vec<(String, Tensor)>> {
        if let Source::Loaded { tensors, path } = &self.source {
            if !tensors.is_empty() {
                let mut extra: Vec<_> = tensors.keys().map(String::as_str).collect();
                extra.sort_unstable();
                extra.truncate(5);
                return Err(MlmfError::model_load(
                    WHAT,
                    path,
                    format!(
                        "{} tensor(s) that {what} does not have, e.g. `{}`: the file was \
                         saved from a different fusion configuration",
                        tensors.len(),
                        extra.join("`, `")
                    ),
                ));
            }
        }
        Ok(self.taken)
    }
}
