//! The state of a run on disk, so that a run killed at any moment resumes from its
//! last checkpoint and ends with the same weights as an uninterrupted run.
//!
//! `out/checkpoint/` holds `state.safetensors` (every tensor as `var.{name}`, the
//! AdamW moments as `adam.m.{name}` / `adam.v.{name}`, the best weights so far as
//! `best.{name}`) and `state.json` (counters, history, the run's fingerprint). A new
//! checkpoint is written to `checkpoint.tmp/`, then swapped in with renames; a crash
//! between the renames leaves `checkpoint.old/`, which loading falls back to. Files
//! are not synced to the disk: a killed process loses nothing the page cache holds (a
//! power cut may cost the last checkpoint).
//! Other files of the output folder are written to a temporary name and renamed, so
//! none is ever half written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Moments};
use super::vars::VarStore;
use super::EpochRecord;
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};

const VERSION: u32 = 1;

/// Counters and history of a run (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct RunState {
    pub(crate) version: u32,
    /// Settings and data the run was started with; a resume must match.
    pub(crate) fingerprint: String,
    /// Optimiser steps done.
    pub(crate) step: usize,
    /// The epoch in progress, and the batches of it done.
    pub(crate) epoch: usize,
    pub(crate) in_epoch: usize,
    /// Running sums of the epoch in progress: total loss and per objective.
    pub(crate) loss_sum: f64,
    pub(crate) loss_count: usize,
    pub(crate) part_sums: BTreeMap<String, (f64, usize)>,
    pub(crate) rows_done: usize,
    pub(crate) seconds: f64,
    /// Early stopping.
    pub(crate) best: Option<f64>,
    pub(crate) bad_epochs: usize,
    pub(crate) stopped: bool,
    /// The best weights are the current ones (then not stored twice).
    #[serde(default)]
    pub(crate) best_is_current: bool,
    pub(crate) history: Vec<EpochRecord>,
    /// Per tensor, the AdamW steps it has taken.
    pub(crate) adam_steps: Vec<u64>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> MlmfError {
    MlmfError::Train(format!("cannot write {}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Saves named tensors to `path` (safetensors) through a temporary file.
pub(crate) fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn dir(out: &Path, name: &str) -> PathBuf {
    out.join(name)
}

/// Writes the checkpoint of `state` (see the module docs).
pub(crate) fn save(
    out: &Path,
    vs: &VarStore,
    opt: &AdamW,
    best: Option<&[(String, Tensor)]>,
    state: &RunState,
) -> Result<()> {
    let tmp = dir(out, "checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, (name, v)) in vs.iter().enumerate() {
        tensors.push((
            format!("var.{name}"),
            v.as_tensor().copy().map_err(ce("checkpoint"))?,
        ));
        let m = &opt.state[i];
        if !m.m.is_empty() {
            let shape = v.as_tensor().dims().to_vec();
            let dev = Device::Cpu;
            tensors.push((
                format!("adam.m.{name}"),
                Tensor::from_vec(m.m.clone(), shape.clone(), &dev).map_err(ce("checkpoint"))?,
            ));
            tensors.push((
                format!("adam.v.{name}"),
                Tensor::from_vec(m.v.clone(), shape, &dev).map_err(ce("checkpoint"))?,
            ));
        }
    }
    for (name, t) in best.unwrap_or(&[]) {
        tensors.push((format!("best.{name}"), t.clone()));
    }
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let st = tmp.join("state.safetensors");
    candle_core::safetensors::save(&map, &st).map_err(|e| io(&st, e))?;
    let mut state = state.clone();
    state.version = VERSION;
    state.adam_steps = opt.state.iter().map(|m| m.step).collect();
    let json = serde_json::to_vec_pretty(&state).map_err(|e| io(&tmp, e))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| io(&tmp, e))?;
    let cur = dir(out, "checkpoint");
    let old = dir(out, "checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(|e| io(&cur, e))?;
    }
    std::fs::rename(&tmp, &cur).map_err(|e| io(&cur, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Whether `out` holds a checkpoint.
pub(crate) fn exists(out: &Path) -> bool {
    ["checkpoint", "checkpoint.old"]
        .iter()
        .any(|d| dir(out, d).join("state.json").is_file())
}

/// Named tensors (the best weights of a run).
pub(crate) type Named = Vec<(String, Tensor)>;

/// Loads the checkpoint into `vs` and `opt`; returns the state and the best weights.
pub(crate) fn load(
    out: &Path,
    vs: &VarStore,
    opt: &mut AdamW,
) -> Result<(RunState, Option<Named>)> {
    let d = ["checkpoint", "checkpoint.old"]
        .iter()
        .map(|n| dir(out, n))
        .find(|d| d.join("state.json").is_file() && d.join("state.safetensors").is_file())
        .ok_or_else(|| {
            MlmfError::Train(format!("{} holds no checkpoint to resume", out.display()))
        })?;
    let bad = |m: String| MlmfError::model_load("training checkpoint", &d, m);
    let text = std::fs::read(d.join("state.json")).map_err(|e| bad(e.to_string()))?;
    let state: RunState = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if state.version != VERSION {
        return Err(bad(format!(
            "version {} (expected {VERSION})",
            state.version
        )));
    }
    let tensors = candle_core::safetensors::load(d.join("state.safetensors"), &Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let mut vars = HashMap::new();
    let mut best = Vec::new();
    for (name, t) in &tensors {
        if let Some(n) = name.strip_prefix("var.") {
            vars.insert(n.to_string(), t.clone());
        } else if let Some(n) = name.strip_prefix("best.") {
            best.push((n.to_string(), t.clone()));
        }
    }
    vs.set_all(&vars, &d)?;
    for (i, (name, _)) in vs.iter().enumerate() {
        let host = |k: &str| -> Result<Vec<f32>> {
            match tensors.get(&format!("adam.{k}.{name}")) {
                Some(t) => t
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(ce("checkpoint")),
                None => Ok(Vec::new()),
            }
        };
        opt.state[i] = Moments {
            m: host("m")?,
            v: host("v")?,
            step: state.adam_steps.get(i).copied().unwrap_or(0),
        };
    }
    if state.best_is_current {
        best = vs.snapshot()?;
    }
    best.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((state, if best.is_empty() { None } else { Some(best) }))
}
