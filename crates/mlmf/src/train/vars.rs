//! The trainable tensors of a run, by name: one [`Var`] per tensor, in creation order.
//!
//! Names carry the part they belong to as a prefix (`fusion.`, `adapters.`,
//! `attention.text-image.`, `heads.`, `objectives.`); below the prefix they are the
//! names inference reads (docs/fusion.md, docs/attention.md), so a part's tensors
//! saved without the prefix load as they are.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};

/// Named trainable tensors; see the module docs.
#[derive(Default)]
pub(crate) struct VarStore {
    vars: Vec<(String, Var)>,
    trainable: Vec<bool>,
    index: HashMap<String, usize>,
}

impl VarStore {
    /// Adds `name` with the values of `t` (copied to float32), trained or frozen;
    /// returns the tensor that layers read (the same storage as the variable).
    pub(crate) fn add(&mut self, name: &str, t: &Tensor, trainable: bool) -> Result<Tensor> {
        if self.index.contains_key(name) {
            return Err(MlmfError::Internal(format!(
                "trainable tensor `{name}` added twice"
            )));
        }
        let v = Var::from_tensor(
            &t.to_dtype(DType::F32)
                .and_then(|t| t.contiguous())
                .map_err(ce("trainable tensor"))?,
        )
        .map_err(ce("trainable tensor"))?;
        let handle = v.as_tensor().clone();
        self.index.insert(name.to_string(), self.vars.len());
        self.vars.push((name.to_string(), v));
        self.trainable.push(trainable);
        Ok(handle)
    }

    /// The tensor `name`.
    pub(crate) fn get(&self, name: &str) -> Result<Tensor> {
        self.index
            .get(name)
            .map(|&i| self.vars[i].1.as_tensor().clone())
            .ok_or_else(|| MlmfError::Internal(format!("no trainable tensor `{name}`")))
    }

    pub(crate) fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether tensor `i` is trained (frozen ones keep their values).
    pub(crate) fn is_trainable(&self, i: usize) -> bool {
        self.trainable[i]
    }

    /// `(name, variable)` in creation order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(String, Var)> {
        self.vars.iter()
    }

    /// Whether AdamW's weight decay applies: weight matrices (rank 2 or more, named
    /// `*weight`), not biases, norms, gates, embeddings or temperatures.
    pub(crate) fn decays(&self, i: usize) -> bool {
        let (name, v) = &self.vars[i];
        v.rank() >= 2 && name.ends_with("weight")
    }

    /// Overwrites every variable with the tensor of the same name in `tensors`
    /// (all must be there, with the same shapes).
    pub(crate) fn set_all(&self, tensors: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        for (name, v) in &self.vars {
            let t = tensors.get(name).ok_or_else(|| {
                MlmfError::model_load(
                    "training state",
                    origin,
                    format!("tensor `{name}` is missing"),
                )
            })?;
            if t.dims() != v.dims() {
                return Err(MlmfError::model_load(
                    "training state",
                    origin,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        v.dims()
                    ),
                ));
            }
            v.set(&t.to_dtype(DType::F32).map_err(ce("restore"))?)
                .map_err(ce("restore"))?;
        }
        Ok(())
    }

    /// The tensors whose names start with `prefix`, the prefix removed (copies).
    pub(crate) fn group(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.vars
            .iter()
            .filter_map(|(n, v)| n.strip_prefix(prefix).map(|rest| (rest.to_string(), v)))
            .map(|(n, v)| Ok((n, v.as_tensor().copy().map_err(ce("saving weights"))?)))
            .collect()
    }

    /// Every tensor by its full name (copies).
    pub(crate) fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.group("")
    }
}
