//! [`Trainer`]: the training loop (docs/training.md).
//!
//! Per step: the batch's rows (a seeded shuffle per epoch), the curriculum stage's
//! modalities, modality dropout on the fusion's inputs, the weighted objectives' loss,
//! gradients (checked finite), global-norm clipping, the scheduled learning rate,
//! AdamW. After each epoch: validation metrics, early stopping, the best weights
//! written to the output folder as a model `MultiModalModel::load` takes, and a
//! checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, RunState};
use super::data::{Dataset, DatasetBuilder, Layout};
use super::nets::{check_label, check_target, BatchLoss, Nets, ObjKind};
use super::optim::{clip_factor, grad_norm, learning_rate, AdamW};
use super::rng::{Rng, Stream};
use crate::config::train::metric_maximised;
use crate::config::{MultiModalConfig, TrainConfig};
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::model::MultiModalModel;

/// One epoch of a run, as the history records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Optimiser steps done at the end of the epoch.
    pub step: usize,
    /// Mean training loss over the epoch's steps, and per objective.
    pub train_loss: f64,
    pub train_losses: BTreeMap<String, f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Validation metrics (empty without validation data).
    pub val: BTreeMap<String, f64>,
    /// Whether these weights are the best so far (and were written out).
    pub best: bool,
    pub seconds: f64,
    pub items_per_second: f64,
}

/// Progress of one optimiser step.
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub items_per_second: f64,
    pub stage: Option<String>,
}

/// What [`Trainer::fit`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    Step(&'a StepInfo),
    Epoch(&'a EpochRecord),
}

/// Trains a model's fusion, attention pairs, adapters and objective heads.
pub struct Trainer {
    model: MultiModalModel,
    config: TrainConfig,
    pub(crate) nets: Nets,
    opt: AdamW,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model)
            .field("tensors", &self.nets.vs.len())
            .finish_non_exhaustive()
    }
}

/// The file names of a trained model's folder.
pub const CONFIG_FILE: &str = "mlmf.toml";
pub const HEADS_FILE: &str = "heads.safetensors";

impl Trainer {
    /// A trainer for `model`, starting from its current weights. Refuses a custom
    /// fusion and objectives the model cannot serve (a modality it lacks, a pair it
    /// does not configure, a contrastive side without an adapter).
    pub fn new(model: MultiModalModel, config: TrainConfig) -> Result<Self> {
        config.validate().map_err(|e| e.under("train"))?;
        let nets = Nets::new(&model, &config)?;
        let opt = AdamW::new(nets.vs.len(), config.betas, config.eps, config.weight_decay);
        Ok(Self {
            model,
            config,
            nets,
            opt,
        })
    }

    pub fn model(&self) -> &MultiModalModel {
        &self.model
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// What datasets for this trainer keep of each modality.
    pub fn layout(&self) -> Vec<Layout> {
        self.nets.layout()
    }

    /// A builder for a dataset this trainer takes (token files under `dir`, or a
    /// temporary folder).
    pub fn dataset_builder(&self, origin: &str, dir: Option<&Path>) -> Result<DatasetBuilder> {
        DatasetBuilder::new(origin, &self.layout(), dir)
    }

    /// Names and shapes of the tensors, and whether each is trained.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, bool)> {
        self.nets
            .vs
            .iter()
            .enumerate()
            .map(|(i, (n, v))| (n.clone(), v.dims().to_vec(), self.nets.vs.is_trainable(i)))
            .collect()
    }

    /// Attention pairs no objective trains (they keep their weights).
    pub fn untrained_pairs(&self) -> Vec<String> {
        self.nets
            .pairs
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                !self
                    .nets
                    .objectives
                    .iter()
                    .any(|o| matches!(o.kind, ObjKind::Pair(j) if j == *i))
            })
            .map(|(_, p)| p.pair.to_string())
            .collect()
    }

    /// Loads objective heads and temperatures saved with a trained model.
    pub fn load_heads(&mut self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &self.nets.device)
            .map_err(|e| MlmfError::model_load("objective heads", path, e.to_string()))?;
        for (name, v) in self.nets.vs.iter() {
            if !(name.starts_with("heads.") || name.starts_with("objectives.")) {
                continue;
            }
            let t = tensors.get(name).ok_or_else(|| {
                MlmfError::model_load(
                    "objective heads",
                    path,
                    format!("tensor `{name}` is missing (trained with other objectives?)"),
                )
            })?;
            if t.dims() != v.dims() {
                return Err(MlmfError::model_load(
                    "objective heads",
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        v.dims()
                    ),
                ));
            }
            v.set(t).map_err(ce("objective heads"))?;
        }
        Ok(())
    }

    /// Every metric (docs/training.md) on all rows of `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<BTreeMap<String, f64>> {
        if data.is_empty() {
            return Err(MlmfError::data(
                data.origin(),
                None,
                None,
                "no rows to evaluate",
            ));
        }
        let rows: Vec<usize> = (0..data.len()).collect();
        self.nets.evaluate(data, &rows, self.config.batch_size)
    }

    /// Row checks before any step: labels and targets in range, and rows for every
    /// objective.
    fn check_rows(&self, data: &Dataset, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            return Err(MlmfError::data(
                data.origin(),
                None,
                None,
                "no training rows",
            ));
        }
        for o in &self.nets.objectives {
            let usable = match &o.kind {
                ObjKind::Classify { classes, .. } => {
                    let mut n = 0;
                    for &r in rows {
                        if data.examples()[r].label.is_some() {
                            check_label(data, r, *classes)?;
                            n += 1;
                        }
                    }
                    n
                }
                ObjKind::Regress { dim, .. } => {
                    let mut n = 0;
                    for &r in rows {
                        if data.examples()[r].target.is_some() {
                            check_target(data, r, *dim)?;
                            n += 1;
                        }
                    }
                    n
                }
                _ => {
                    let needs = self.nets.needs(o);
                    rows.iter()
                        .filter(|&&r| needs.iter().all(|m| data.has(*m, r)))
                        .count()
                }
            };
            let enough = if matches!(o.kind, ObjKind::Classify { .. } | ObjKind::Regress { .. }) {
                1
            } else {
                2
            };
            if usable < enough {
                let what = match &o.kind {
                    ObjKind::Classify { .. } => "a `label`".to_string(),
                    ObjKind::Regress { .. } => "a `target`".to_string(),
                    _ => self
                        .nets
                        .needs(o)
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" and "),
                };
                return Err(MlmfError::data(
                    data.origin(),
                    None,
                    None,
                    format!("objective `{}` has {usable} row(s) with {what}: it needs at least {enough}", o.name),
                ));
            }
        }
        Ok(())
    }

    /// The curriculum stage of step `t`: its name and modalities (`None`: all).
    fn stage(&self, t: usize) -> (Option<String>, Option<Vec<Modality>>) {
        let mut end = 0;
        for (i, s) in self.config.stages.iter().enumerate() {
            end += s.steps;
            if t < end {
                return (
                    Some(s.name.clone().unwrap_or_else(|| format!("stage {i}"))),
                    Some(s.modalities.clone()),
                );
            }
        }
        (None, None)
    }

    /// The fusion modalities a step drops (never all of those present).
    fn dropped(&self, t: usize, present: &[Modality]) -> Vec<Modality> {
        let p = self.config.modality_dropout;
        if p <= 0.0 || present.len() < 2 {
            return Vec::new();
        }
        let mut rng = Rng::new(self.config.seed, Stream::Dropout, t as u64);
        let mut dropped: Vec<Modality> = present
            .iter()
            .copied()
            .filter(|_| rng.next_f64() < p)
            .collect();
        if dropped.len() == present.len() {
            let keep = rng.below(present.len());
            dropped.retain(|m| *m != present[keep]);
        }
        dropped
    }

    /// A string that changes with the settings and the data, checked on resume.
    fn fingerprint(
        &self,
        train: &Dataset,
        rows: &[usize],
        val: Option<(&Dataset, &[usize])>,
    ) -> Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(
            serde_json::to_string(&self.config)
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(
            serde_json::to_string(&self.model.config().fusion)
                .unwrap_or_default()
                .as_bytes(),
        );
        for (n, v) in self.nets.vs.iter() {
            h.update(n.as_bytes());
            h.update(format!("{:?}", v.dims()).as_bytes());
        }
        for (d, r) in [(train, rows)].into_iter().chain(val) {
            h.update(d.origin().as_bytes());
            h.update(&(r.len() as u64).to_le_bytes());
            for &i in r {
                h.update(format!("{:?}", d.examples()[i]).as_bytes());
            }
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// Trains on `train` (and validates on `val`, or on `val_fraction` of the rows),
    /// writing the model, history and checkpoints to `out`; `resume` continues the run
    /// in `out`. `on_event` sees every step and epoch; an error from it stops the run
    /// (its last checkpoint stays).
    pub fn fit(
        &mut self,
        train: &Dataset,
        val: Option<&Dataset>,
        out: &Path,
        resume: bool,
        on_event: &mut dyn FnMut(Event<'_>) -> Result<()>,
    ) -> Result<Vec<EpochRecord>> {
        let cfg = self.config.clone();
        std::fs::create_dir_all(out)
            .map_err(|e| MlmfError::Train(format!("cannot create {}: {e}", out.display())))?;
        // Rows: all, or all but a seeded validation share.
        let mut train_rows: Vec<usize> = (0..train.len()).collect();
        let mut split_rows: Vec<usize> = Vec::new();
        if val.is_none() && cfg.val_fraction > 0.0 {
            Rng::new(cfg.seed, Stream::Split, 0).shuffle(&mut train_rows);
            let k = ((train.len() as f64) * cfg.val_fraction).round() as usize;
            split_rows = train_rows.split_off(train.len() - k.min(train.len().saturating_sub(2)));
            train_rows.sort_unstable();
            split_rows.sort_unstable();
        }
        let val_rows: Vec<usize> = match val {
            Some(v) => (0..v.len()).collect(),
            None => split_rows,
        };
        let val_set: Option<(&Dataset, &[usize])> = match val {
            Some(v) => Some((v, &val_rows)),
            None if !val_rows.is_empty() => Some((train, &val_rows)),
            None => None,
        };
        self.check_rows(train, &train_rows)?;
        if cfg.early_stopping.is_some() && val_set.is_none() {
            return Err(MlmfError::config(
                "train.early_stopping",
                "needs validation data: pass val= (--val) or set val_fraction",
            ));
        }
        for (i, s) in cfg.stages.iter().enumerate() {
            let runs = self.nets.objectives.iter().any(|o| {
                let needs = self.nets.needs(o);
                needs.iter().all(|m| s.modalities.contains(m))
                    && (!needs.is_empty()
                        || self
                            .nets
                            .fusion_modalities()
                            .iter()
                            .any(|m| s.modalities.contains(m)))
            });
            if !runs {
                return Err(MlmfError::config(
                    format!("train.stages.{i}"),
                    "no objective can run with this stage's modalities",
                ));
            }
        }

        let bs = cfg.batch_size;
        let per_epoch = train_rows.len().div_ceil(bs);
        let total = if cfg.stages.is_empty() {
            cfg.epochs * per_epoch
        } else {
            cfg.stages.iter().map(|s| s.steps).sum()
        };
        let epochs = total.div_ceil(per_epoch);
        let warmup = cfg
            .warmup_steps
            .unwrap_or_else(|| (cfg.warmup * total as f64).round() as usize);
        let fingerprint = self.fingerprint(train, &train_rows, val_set)?;

        let (mut state, mut best_weights) = if resume && checkpoint::exists(out) {
            let (s, best) = checkpoint::load(out, &self.nets.vs, &mut self.opt)?;
            if s.fingerprint != fingerprint {
                return Err(MlmfError::Train(format!(
                    "{} holds a run with other settings or data: resume it with the same ones, or train into another folder",
                    out.display()
                )));
            }
            (s, best)
        } else {
            if checkpoint::exists(out) {
                return Err(MlmfError::Train(format!(
                    "{} already holds a run (a checkpoint): resume it (resume=True, --resume) or train into another folder",
                    out.display()
                )));
            }
            // A fresh run starts its optimiser afresh (the weights stay where they are).
            self.opt = AdamW::new(self.nets.vs.len(), cfg.betas, cfg.eps, cfg.weight_decay);
            (
                RunState {
                    fingerprint: fingerprint.clone(),
                    ..RunState::default()
                },
                None,
            )
        };
        let trainable: Vec<usize> = (0..self.nets.vs.len())
            .filter(|&i| self.nets.vs.is_trainable(i))
            .collect();
        let decays: Vec<bool> = (0..self.nets.vs.len())
            .map(|i| self.nets.vs.decays(i))
            .collect();
        let fusion_mods = self.nets.fusion_modalities();

        while !state.stopped && state.epoch < epochs && state.step < total {
            let mut order = train_rows.clone();
            if cfg.shuffle {
                Rng::new(cfg.seed, Stream::Shuffle, state.epoch as u64).shuffle(&mut order);
            }
            let batches: Vec<&[usize]> = order.chunks(bs).collect();
            let mut started = Instant::now();
            let mut last_lr = 0.0;
            while state.in_epoch < batches.len() && state.step < total {
                let rows = batches[state.in_epoch];
                let t = state.step;
                let (stage_name, stage_mods) = self.stage(t);
                let allowed = |m: Modality| stage_mods.as_ref().is_none_or(|s| s.contains(&m));
                let allowed: &(dyn Fn(Modality) -> bool + Sync) = &allowed;
                let present: Vec<Modality> = fusion_mods
                    .iter()
                    .copied()
                    .filter(|m| allowed(*m) && rows.iter().any(|&r| train.has(*m, r)))
                    .collect();
                let dropped = self.dropped(t, &present);
                let lr = learning_rate(cfg.lr, t, warmup, total, cfg.schedule);
                last_lr = lr;
                let epoch = state.epoch;
                let last_good = state.history.last().map_or(0, |h| h.step);
                let nets = &self.nets;
                let opt = &mut self.opt;
                let (trainable, decays) = (&trainable, &decays);
                let mut work = || -> Result<Option<BatchLoss>> {
                    let Some(loss) = nets.batch_loss(train, rows, &allowed, &dropped)? else {
                        return Ok(None);
                    };
                    let value = f64::from(loss.total.to_scalar::<f32>().map_err(ce("loss"))?);
                    if !value.is_finite() {
                        let parts: Vec<String> = loss
                            .parts
                            .iter()
                            .map(|(n, v, _)| format!("{n} = {v}"))
                            .collect();
                        return Err(MlmfError::Train(format!(
                            "the loss is {value} at epoch {epoch}, step {t} ({}); rows {}; the last checkpoint (step {last_good}) is kept",
                            parts.join(", "),
                            describe_rows(train, rows),
                        )));
                    }
                    let grads = super::ops_layer::backward(&loss.total).map_err(ce("backward"))?;
                    let mut found: Vec<Option<Tensor>> = vec![None; nets.vs.len()];
                    for &i in trainable {
                        let (_, v) = nets
                            .vs
                            .iter()
                            .nth(i)
                            .ok_or_else(|| MlmfError::Internal("var".into()))?;
                        found[i] = grads
                            .get(v.as_tensor())
                            .map(|g| g.contiguous())
                            .transpose()
                            .map_err(ce("gradient"))?;
                    }
                    let (norm, bad) = grad_norm(&found)?;
                    if let Some((i, bad)) = bad {
                        let name = nets
                            .vs
                            .iter()
                            .nth(i)
                            .map(|(n, _)| n.clone())
                            .unwrap_or_default();
                        return Err(MlmfError::Train(format!(
                            "the gradient of `{name}` holds {bad} at epoch {epoch}, step {t}; rows {}; the last checkpoint (step {last_good}) is kept",
                            describe_rows(train, rows)
                        )));
                    }
                    let scale = clip_factor(norm, cfg.clip_grad_norm);
                    let vars: Vec<&Var> = nets.vs.iter().map(|(_, v)| v).collect();
                    opt.step(&vars, &found, scale, decays, lr)?;
                    Ok(Some(loss))
                };
                let done = work()?;
                if let Some(loss) = done {
                    let value = f64::from(loss.total.to_scalar::<f32>().map_err(ce("loss"))?);
                    state.loss_sum += value;
                    state.loss_count += 1;
                    for (n, v, _) in &loss.parts {
                        let e = state.part_sums.entry(n.clone()).or_insert((0.0, 0));
                        e.0 += v;
                        e.1 += 1;
                    }
                    state.rows_done += rows.len();
                    state.seconds += started.elapsed().as_secs_f64();
                    started = Instant::now();
                    let info = StepInfo {
                        epoch: state.epoch,
                        epochs,
                        step: t + 1,
                        total_steps: total,
                        loss: value,
                        lr,
                        items_per_second: state.rows_done as f64 / state.seconds.max(1e-9),
                        stage: stage_name,
                    };
                    state.step += 1;
                    state.in_epoch += 1;
                    on_event(Event::Step(&info))?;
                } else {
                    state.step += 1;
                    state.in_epoch += 1;
                }
                if cfg.checkpoint_every.is_some_and(|k| state.step % k == 0)
                    && state.in_epoch < batches.len()
                {
                    state.best_is_current = false;
                    checkpoint::save(
                        out,
                        &self.nets.vs,
                        &self.opt,
                        best_weights.as_deref(),
                        &state,
                    )?;
                }
            }
            // End of the epoch: validate, keep the best, checkpoint.
            let val_metrics = match val_set {
                Some((d, r)) => self.nets.evaluate(d, r, bs)?,
                None => BTreeMap::new(),
            };
            let improved = match (&cfg.early_stopping, val_set) {
                (_, None) => true,
                (es, Some(_)) => {
                    let metric = es.as_ref().map_or("loss", |e| e.metric.as_str());
                    let min_delta = es.as_ref().map_or(0.0, |e| e.min_delta);
                    let v = *val_metrics.get(metric).ok_or_else(|| {
                        MlmfError::config(
                            "train.early_stopping.metric",
                            format!(
                                "`{metric}` is not a metric of this run (it has: {})",
                                val_metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?;
                    let better = match state.best {
                        None => true,
                        Some(b) if metric_maximised(metric) => v > b + min_delta,
                        Some(b) => v < b - min_delta,
                    };
                    if better {
                        state.best = Some(v);
                    }
                    better
                }
            };
            if improved {
                state.bad_epochs = 0;
                best_weights = Some(self.nets.vs.snapshot()?);
            } else {
                state.bad_epochs += 1;
                if let Some(es) = &cfg.early_stopping {
                    if state.bad_epochs >= es.patience {
                        state.stopped = true;
                    }
                }
            }
            let record = EpochRecord {
                epoch: state.epoch,
                step: state.step,
                train_loss: state.loss_sum / state.loss_count.max(1) as f64,
                train_losses: state
                    .part_sums
                    .iter()
                    .map(|(k, (s, n))| (k.clone(), s / (*n).max(1) as f64))
                    .collect(),
                lr: last_lr,
                val: val_metrics,
                best: improved,
                seconds: state.seconds,
                items_per_second: state.rows_done as f64 / state.seconds.max(1e-9),
            };
            state.history.push(record.clone());
            state.epoch += 1;
            state.in_epoch = 0;
            state.loss_sum = 0.0;
            state.loss_count = 0;
            state.part_sums.clear();
            state.rows_done = 0;
            state.seconds = 0.0;
            if improved {
                self.write_model(out)?;
            }
            write_history(out, &state.history)?;
            state.best_is_current = improved;
            checkpoint::save(
                out,
                &self.nets.vs,
                &self.opt,
                if improved {
                    None
                } else {
                    best_weights.as_deref()
                },
                &state,
            )?;
            on_event(Event::Epoch(&record))?;
        }
        // The trainer ends holding the best weights (those written out).
        if let Some(best) = &best_weights {
            let map = best.iter().cloned().collect();
            self.nets.vs.set_all(&map, out)?;
        }
        Ok(state.history)
    }

    /// Writes the current weights and a config that loads them to `out`.
    pub fn write_model(&self, out: &Path) -> Result<()> {
        let vs = &self.nets.vs;
        checkpoint::save_tensors(&vs.group("fusion.")?, &out.join("fusion.safetensors"))?;
        let mut config: MultiModalConfig = self.model.config().clone();
        config.fusion.weights = Some(PathBuf::from("fusion.safetensors"));
        if let Some(a) = config.adapters.as_mut() {
            checkpoint::save_tensors(&vs.group("adapters.")?, &out.join("adapters.safetensors"))?;
            a.weights = Some(PathBuf::from("adapters.safetensors"));
        }
        if !self.nets.pairs.is_empty() {
            let dir = out.join("attention");
            std::fs::create_dir_all(&dir)
                .map_err(|e| MlmfError::Train(format!("cannot create {}: {e}", dir.display())))?;
            for p in &self.nets.pairs {
                let (q, k) = (p.pair.query, p.pair.key);
                checkpoint::save_tensors(
                    &vs.group(&format!("attention.{q}-{k}."))?,
                    &dir.join(format!("{q}-{k}.safetensors")),
                )?;
            }
            config.cross_modal_attention.weights = Some(PathBuf::from("attention"));
        }
        let mut heads = vs.group("heads.")?;
        heads
            .iter_mut()
            .for_each(|(n, _)| *n = format!("heads.{n}"));
        let mut objs = vs.group("objectives.")?;
        objs.iter_mut()
            .for_each(|(n, _)| *n = format!("objectives.{n}"));
        heads.extend(objs);
        if !heads.is_empty() {
            checkpoint::save_tensors(&heads, &out.join(HEADS_FILE))?;
        }
        for m in config.modalities.values_mut() {
            if let Some(p) = m.model.as_mut() {
                if let Ok(abs) = std::path::absolute(&*p) {
                    *p = abs;
                }
            }
        }
        if let Some(d) = config.cache.disk.as_mut() {
            if let Ok(abs) = std::path::absolute(&d.path) {
                d.path = abs;
            }
        }
        config.train = Some(self.config.clone());
        let text = toml::to_string_pretty(&config)
            .map_err(|e| MlmfError::Train(format!("cannot write the config: {e}")))?;
        checkpoint::write_atomic(&out.join(CONFIG_FILE), text.as_bytes())
    }
}

fn write_history(out: &Path, history: &[EpochRecord]) -> Result<()> {
    let json = serde_json::to_vec_pretty(history).map_err(|e| MlmfError::Train(e.to_string()))?;
    checkpoint::write_atomic(&out.join("history.json"), &json)
}

/// Rows of a batch for an error message: ids where the data has them.
fn describe_rows(data: &Dataset, rows: &[usize]) -> String {
    let shown: Vec<String> = rows
        .iter()
        .take(8)
        .map(|&r| match &data.examples()[r].id {
            Some(id) => format!("{r} ({id:?})"),
            None => r.to_string(),
        })
        .collect();
    let more = if rows.len() > 8 {
        format!(" and {} more", rows.len() - 8)
    } else {
        String::new()
    };
    format!("{} of {}{more}", shown.join(", "), data.origin())
}
