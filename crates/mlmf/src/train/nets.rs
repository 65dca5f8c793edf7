//! Everything a run trains, over one [`VarStore`]: the model's fusion, adapters and
//! attention pairs (their current weights as the starting point), the objectives'
//! heads and temperatures; the loss of a batch.
//!
//! Tensor names: `fusion.*`, `adapters.*`, `attention.{q}-{k}.*` (the names inference
//! reads, prefixed), `heads.classify.*`, `heads.regress.*`,
//! `objectives.{name}.logit_scale` / `.logit_bias`. Attention pairs that no objective
//! trains, and temperatures with `learn_temperature = false`, are kept but frozen.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::attention::AttnNet;
use super::data::{Dataset, Layout};
use super::fusion::{FusionNet, ModIn};
use super::nn::{select_rows, Lin};
use super::objectives::{self, cosine_matrix, scalar};
use super::rng::{Rng, Stream};
use super::vars::VarStore;
use crate::config::train::{ContrastiveLoss, ObjectiveConfig, Side};
use crate::config::{AttentionPair, FusionLevel, FusionStrategy, TrainConfig};
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::model::MultiModalModel;

/// What an objective compares or predicts.
pub(crate) enum ObjKind {
    /// Two sides' vectors, cosine similarity.
    Between {
        a: Side,
        b: Side,
    },
    /// Query items against key items through an attention pair (index into `pairs`).
    Pair(usize),
    Classify {
        head: Lin,
        classes: usize,
    },
    Regress {
        head: Lin,
        dim: usize,
    },
}

pub(crate) struct ObjNet {
    pub(crate) name: String,
    pub(crate) weight: f64,
    pub(crate) kind: ObjKind,
    pub(crate) loss: ContrastiveLoss,
    pub(crate) scale: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
}

struct AdapterNet {
    maps: Vec<(Modality, Lin, Option<Lin>)>,
}

impl AdapterNet {
    fn forward(&self, m: Modality, x: &Tensor) -> Result<Tensor> {
        match self.maps.iter().find(|(n, _, _)| *n == m) {
            None => Ok(x.clone()),
            Some((_, a, None)) => a.forward(x),
            Some((_, a, Some(b))) => b.forward(&super::nn::gelu(&a.forward(x)?)?),
        }
    }

    fn covers(&self, m: Modality) -> bool {
        self.maps.iter().any(|(n, _, _)| *n == m)
    }
}

pub(crate) struct PairNet {
    pub(crate) pair: AttentionPair,
    pub(crate) net: AttnNet,
}

/// The fused vector `[B, out]`, the gates `[B, M]` (strategies with gates) and which
/// rows have any input.
pub(crate) type Fused = (Tensor, Option<Tensor>, Vec<bool>);

/// One side's vectors per row: row-major values, width, which rows have one.
pub(crate) type SideRows = (Vec<f32>, usize, Vec<bool>);

/// A batch's loss and its parts.
pub(crate) struct BatchLoss {
    pub(crate) total: Tensor,
    /// `(objective name, loss value, rows used)`.
    pub(crate) parts: Vec<(String, f64, usize)>,
}

/// The trainable model; see the module docs.
pub(crate) struct Nets {
    pub(crate) vs: VarStore,
    fusion: FusionNet,
    /// The fusion's modalities and input widths (after the adapters).
    fusion_dims: Vec<(Modality, usize)>,
    out_dim: usize,
    level: FusionLevel,
    adapters: Option<AdapterNet>,
    pub(crate) pairs: Vec<PairNet>,
    pub(crate) objectives: Vec<ObjNet>,
    pub(crate) device: Device,
    /// Per modality: `(pooled width, token width)` as the encoders give them.
    widths: BTreeMap<Modality, (usize, usize)>,
}

/// `[out, in]` weight and bias drawn as `torch.nn.Linear` initialises them.
fn seeded_linear(
    seed: u64,
    salt: u64,
    out: usize,
    inp: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut rng = Rng::new(seed, Stream::Init, salt);
    let bound = 1.0 / (inp as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let w = Tensor::from_vec(draw(out * inp), (out, inp), dev).map_err(ce("head init"))?;
    let b = Tensor::from_vec(draw(out), out, dev).map_err(ce("head init"))?;
    Ok((w, b))
}

impl Nets {
    pub(crate) fn new(model: &MultiModalModel, cfg: &TrainConfig) -> Result<Self> {
        let fusion = model.fusion();
        if matches!(fusion.strategy(), FusionStrategy::Custom(_)) {
            return Err(MlmfError::config(
                "fusion.strategy",
                "a custom fusion (a Python callable or a registered component) holds its own \
                 weights: mlmf trains the built-in strategies (early, middle, late, attention, gated)",
            ));
        }
        let device = fusion
            .named_tensors()
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu);
        // The optimiser's update and the loss kernels are CPU custom ops: refuse before
        // a forward and backward pass are spent.
        if !device.is_cpu() {
            return Err(MlmfError::config(
                "device",
                "training runs on the CPU only, not on a GPU: load the model with device \
                 \"cpu\" to train; the trained weights then load on any device",
            ));
        }
        let mut vs = VarStore::default();
        for (n, t) in fusion.named_tensors() {
            vs.add(&format!("fusion.{n}"), t, true)?;
        }
        let fusion_dims = fusion.modalities().to_vec();
        let fusion_net = FusionNet::new(&vs, "fusion.", fusion.strategy(), &fusion_dims)?;
        let widths: BTreeMap<Modality, (usize, usize)> = model
            .modalities()
            .into_iter()
            .map(|m| Ok((m, model.widths(m)?)))
            .collect::<Result<_>>()?;

        let adapters = match model.adapters() {
            None => None,
            Some(a) => {
                for (n, t) in a.named_tensors() {
                    vs.add(&format!("adapters.{n}"), t, true)?;
                }
                let hidden = model
                    .config()
                    .adapters
                    .as_ref()
                    .and_then(|c| c.hidden)
                    .is_some();
                let lin = |n: &str| -> Result<Lin> {
                    Ok(Lin {
                        w: vs.get(&format!("adapters.{n}.weight"))?,
                        b: Some(vs.get(&format!("adapters.{n}.bias"))?),
                    })
                };
                let maps = a
                    .modalities()
                    .into_iter()
                    .map(|m| {
                        Ok(if hidden {
                            (
                                m,
                                lin(&format!("{m}.fc1"))?,
                                Some(lin(&format!("{m}.fc2"))?),
                            )
                        } else {
                            (m, lin(&m.to_string())?, None)
                        })
                    })
                    .collect::<Result<_>>()?;
                Some(AdapterNet { maps })
            }
        };

        let trained_pairs: Vec<AttentionPair> = cfg
            .objectives
            .iter()
            .filter_map(|o| match o {
                ObjectiveConfig::Contrastive(c) => c.pair,
                _ => None,
            })
            .collect();
        let mut pairs = Vec::new();
        for (pair, layer) in model.attention_layers() {
            let prefix = format!("attention.{}-{}.", pair.query, pair.key);
            let trained = trained_pairs.contains(&pair);
            for (n, t) in layer.named_tensors()? {
                vs.add(&format!("{prefix}{n}"), &t, trained)?;
            }
            pairs.push(PairNet {
                pair,
                net: AttnNet::from_store(&vs, &prefix, layer.heads(), layer.config())?,
            });
        }

        let out_dim = fusion.out_dim();
        let mut s = Self {
            vs,
            fusion: fusion_net,
            fusion_dims,
            out_dim,
            level: model.fusion_level(),
            adapters,
            pairs,
            objectives: Vec::new(),
            device,
            widths,
        };
        for (i, o) in cfg.objectives.iter().enumerate() {
            let net = s
                .objective(o, cfg.seed, i)
                .map_err(|e| e.under(&format!("train.objectives.{i}")))?;
            s.objectives.push(net);
        }
        Ok(s)
    }

    fn objective(&mut self, o: &ObjectiveConfig, seed: u64, i: usize) -> Result<ObjNet> {
        let name = o.name();
        let dev = self.device.clone();
        let mut net = ObjNet {
            name: name.clone(),
            weight: o.weight(),
            kind: ObjKind::Pair(0),
            loss: ContrastiveLoss::Infonce,
            scale: None,
            bias: None,
        };
        match o {
            ObjectiveConfig::Contrastive(c) => {
                net.kind = match (&c.pair, &c.between[..]) {
                    (Some(p), _) => {
                        let idx = self.pairs.iter().position(|x| x.pair == *p).ok_or_else(|| {
                            MlmfError::config(
                                "pair",
                                format!("`{p}` is not one of the model's attention pairs (cross_modal_attention.pairs)"),
                            )
                        })?;
                        ObjKind::Pair(idx)
                    }
                    (None, [a, b]) => {
                        self.check_sides(*a, *b)?;
                        ObjKind::Between { a: *a, b: *b }
                    }
                    _ => return Err(MlmfError::config("between", "expected two sides")),
                };
                net.loss = c.loss;
                let default_t = match c.loss {
                    ContrastiveLoss::Infonce => 0.07,
                    ContrastiveLoss::Sigmoid => 0.1,
                };
                let s = scalar((1.0 / c.temperature.unwrap_or(default_t)).ln(), &dev)?;
                let learn = c.learn_temperature;
                net.scale = Some(self.vs.add(
                    &format!("objectives.{name}.logit_scale"),
                    &s,
                    learn,
                )?);
                if c.loss == ContrastiveLoss::Sigmoid {
                    let b = scalar(c.bias.unwrap_or(-10.0), &dev)?;
                    net.bias = Some(self.vs.add(
                        &format!("objectives.{name}.logit_bias"),
                        &b,
                        learn,
                    )?);
                }
            }
            ObjectiveConfig::Classify(c) => {
                let (w, b) =
                    seeded_linear(seed, 1000 + i as u64, c.num_classes, self.out_dim, &dev)?;
                net.kind = ObjKind::Classify {
                    head: Lin {
                        w: self.vs.add("heads.classify.weight", &w, true)?,
                        b: Some(self.vs.add("heads.classify.bias", &b, true)?),
                    },
                    classes: c.num_classes,
                };
            }
            ObjectiveConfig::Regress(r) => {
                let (w, b) = seeded_linear(seed, 1000 + i as u64, r.dim, self.out_dim, &dev)?;
                net.kind = ObjKind::Regress {
                    head: Lin {
                        w: self.vs.add("heads.regress.weight", &w, true)?,
                        b: Some(self.vs.add("heads.regress.bias", &b, true)?),
                    },
                    dim: r.dim,
                };
            }
        }
        Ok(net)
    }

    /// Checks that two sides of a contrastive objective can be compared.
    fn check_sides(&self, a: Side, b: Side) -> Result<()> {
        for s in [a, b] {
            if let Side::Modality(m) = s {
                if !self.widths.contains_key(&m) {
                    return Err(MlmfError::config(
                        "between",
                        format!("the model has no `{m}` modality"),
                    ));
                }
                if !self.adapters.as_ref().is_some_and(|ad| ad.covers(m)) {
                    return Err(MlmfError::config(
                        "between",
                        format!(
                            "`{m}` has no adapter: aligning modalities trains their adapters; \
                             configure [adapters] (e.g. dim = 256) covering `{m}`"
                        ),
                    ));
                }
            }
        }
        let width = |s: Side| self.side_width(s);
        match (a, b) {
            (Side::Fused, Side::Fused) => Err(MlmfError::config(
                "between",
                "compares the fused vector with itself",
            )),
            (Side::Fused, Side::Modality(m)) | (Side::Modality(m), Side::Fused) => {
                if self.fusion_dims.len() < 2 {
                    return Err(MlmfError::config(
                        "between",
                        format!("the fused vector without `{m}` needs a fusion over at least two modalities"),
                    ));
                }
                if width(Side::Modality(m)) != self.out_dim {
                    return Err(MlmfError::config(
                        "between",
                        format!(
                            "the fused vector is {} wide but `{m}`'s adapter gives {}: set adapters.dim = fusion.out_dim",
                            self.out_dim,
                            width(Side::Modality(m))
                        ),
                    ));
                }
                Ok(())
            }
            _ if width(a) != width(b) => Err(MlmfError::config(
                "between",
                format!("`{a}` is {} wide and `{b}` {}", width(a), width(b)),
            )),
            _ => Ok(()),
        }
    }

    /// The width of a contrastive side's vectors.
    fn side_width(&self, s: Side) -> usize {
        match s {
            Side::Fused => self.out_dim,
            Side::Modality(m) => self
                .fusion_dims
                .iter()
                .find(|(n, _)| *n == m)
                .map_or(0, |d| d.1),
        }
    }

    /// What a dataset must keep of each modality.
    pub(crate) fn layout(&self) -> Vec<Layout> {
        let pair_mods: Vec<Modality> = self
            .objectives
            .iter()
            .filter_map(|o| match o.kind {
                ObjKind::Pair(i) => Some([self.pairs[i].pair.query, self.pairs[i].pair.key]),
                _ => None,
            })
            .flatten()
            .collect();
        self.widths
            .iter()
            .map(|(&m, &(pooled_width, token_width))| Layout {
                modality: m,
                pooled_width,
                token_width,
                tokens: self.level == FusionLevel::Tokens || pair_mods.contains(&m),
            })
            .collect()
    }

    /// The modalities an objective needs.
    pub(crate) fn needs(&self, o: &ObjNet) -> Vec<Modality> {
        match &o.kind {
            ObjKind::Between { a, b } => [a, b]
                .iter()
                .filter_map(|s| match s {
                    Side::Modality(m) => Some(*m),
                    Side::Fused => None,
                })
                .collect(),
            ObjKind::Pair(i) => vec![self.pairs[*i].pair.query, self.pairs[*i].pair.key],
            _ => Vec::new(),
        }
    }

    /// The fusion's inputs for `rows`: every fusion modality in `allowed`, through its
    /// adapter.
    pub(crate) fn fusion_inputs(
        &self,
        data: &Dataset,
        rows: &[usize],
        allowed: &(dyn Fn(Modality) -> bool + Sync),
    ) -> Result<Vec<Option<ModIn>>> {
        self.fusion_dims
            .iter()
            .map(|&(m, _)| {
                if !allowed(m) {
                    return Ok(None);
                }
                let input = match self.level {
                    FusionLevel::Pooled => data.pooled(m, rows, &self.device)?,
                    FusionLevel::Tokens => data.tokens(m, rows, &self.device)?,
                };
                input
                    .map(|i| {
                        Ok(match &self.adapters {
                            Some(a) if a.covers(m) => i.with_x(a.forward(m, &i.x)?),
                            _ => i,
                        })
                    })
                    .transpose()
            })
            .collect()
    }

    pub(crate) fn fusion_modalities(&self) -> Vec<Modality> {
        self.fusion_dims.iter().map(|(m, _)| *m).collect()
    }

    /// The fused vector `[B, out]` of `inputs` without the modalities in `drop`, and
    /// which rows have any input left.
    pub(crate) fn fused(
        &self,
        inputs: &[Option<ModIn>],
        drop: &[Modality],
    ) -> Result<Option<Fused>> {
        let kept: Vec<Option<ModIn>> = inputs
            .iter()
            .zip(&self.fusion_dims)
            .map(|(i, (m, _))| if drop.contains(m) { None } else { i.clone() })
            .collect();
        let Some(first) = kept.iter().flatten().next() else {
            return Ok(None);
        };
        let b = first.rows.len();
        let rows: Vec<bool> = (0..b)
            .map(|r| kept.iter().flatten().any(|i| i.rows[r]))
            .collect();
        let out = self.fusion.forward(&kept)?;
        Ok(Some((out.fused, out.gates, rows)))
    }

    /// One side of a contrastive objective for `rows`: `[B, D]` and which rows have it.
    fn side(
        &self,
        s: Side,
        other: Side,
        inputs: &[Option<ModIn>],
        dropped: &[Modality],
    ) -> Result<Option<(Tensor, Vec<bool>)>> {
        match s {
            Side::Modality(m) => {
                let Some(i) = self.fusion_dims.iter().position(|(n, _)| *n == m) else {
                    return Ok(None);
                };
                Ok(inputs[i]
                    .as_ref()
                    .map(|i| Ok::<_, MlmfError>((i.pooled()?, i.rows.clone())))
                    .transpose()?)
            }
            Side::Fused => {
                let mut drop = dropped.to_vec();
                if let Side::Modality(m) = other {
                    drop.push(m);
                }
                Ok(self.fused(inputs, &drop)?.map(|(f, _, rows)| (f, rows)))
            }
        }
    }

    /// The loss of the batch `rows` using only `allowed` modalities, with `dropped`
    /// removed from the fusion's inputs; `None` when no objective has rows to use.
    pub(crate) fn batch_loss(
        &self,
        data: &Dataset,
        rows: &[usize],
        allowed: &(dyn Fn(Modality) -> bool + Sync),
        dropped: &[Modality],
    ) -> Result<Option<BatchLoss>> {
        let f = ce("training loss");
        let inputs = self.fusion_inputs(data, rows, allowed)?;
        let mut fused_all: Option<Option<Fused>> = None;
        let mut total: Option<Tensor> = None;
        let mut parts = Vec::new();
        for o in &self.objectives {
            if self.needs(o).iter().any(|m| !allowed(*m)) {
                continue;
            }
            let loss = match &o.kind {
                ObjKind::Between { a, b } => {
                    let (Some((va, ra)), Some((vb, rb))) = (
                        self.side(*a, *b, &inputs, dropped)?,
                        self.side(*b, *a, &inputs, dropped)?,
                    ) else {
                        continue;
                    };
                    let keep: Vec<usize> = (0..rows.len()).filter(|&r| ra[r] && rb[r]).collect();
                    if keep.len() < 2 {
                        continue;
                    }
                    let sim = cosine_matrix(&select_rows(&va, &keep)?, &select_rows(&vb, &keep)?)?;
                    Some((self.contrastive(o, &sim)?, keep.len()))
                }
                ObjKind::Pair(i) => {
                    let p = &self.pairs[*i];
                    let (Some(q), Some(k)) = (
                        data.tokens(p.pair.query, rows, &self.device)?,
                        data.tokens(p.pair.key, rows, &self.device)?,
                    ) else {
                        continue;
                    };
                    let keep: Vec<usize> = (0..rows.len())
                        .filter(|&r| q.rows[r] && k.rows[r])
                        .collect();
                    if keep.len() < 2 {
                        continue;
                    }
                    let qm = q
                        .mask
                        .as_ref()
                        .ok_or_else(|| MlmfError::Internal("query mask".into()))?;
                    let km = k
                        .mask
                        .as_ref()
                        .ok_or_else(|| MlmfError::Internal("key mask".into()))?;
                    let s = p.net.pair_scores(
                        &select_rows(&q.x, &keep)?,
                        &select_rows(qm, &keep)?,
                        &select_rows(&k.x, &keep)?,
                        &select_rows(km, &keep)?,
                    )?;
                    Some((self.contrastive(o, &s)?, keep.len()))
                }
                ObjKind::Classify { head, classes } => {
                    let fa = match &fused_all {
                        Some(v) => v,
                        None => fused_all.insert(self.fused(&inputs, dropped)?),
                    };
                    let Some((fused, _, have)) = fa else { continue };
                    let ex = data.examples();
                    let keep: Vec<usize> = (0..rows.len())
                        .filter(|&r| have[r] && ex[rows[r]].label.is_some())
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let labels: Vec<u32> = keep
                        .iter()
                        .map(|&r| check_label(data, rows[r], *classes))
                        .collect::<Result<_>>()?;
                    let labels = objectives::labels_tensor(&labels, &self.device)?;
                    Some((
                        objectives::classify(&select_rows(fused, &keep)?, head, &labels)?,
                        keep.len(),
                    ))
                }
                ObjKind::Regress { head, dim } => {
                    let fa = match &fused_all {
                        Some(v) => v,
                        None => fused_all.insert(self.fused(&inputs, dropped)?),
                    };
                    let Some((fused, _, have)) = fa else { continue };
                    let ex = data.examples();
                    let keep: Vec<usize> = (0..rows.len())
                        .filter(|&r| have[r] && ex[rows[r]].target.is_some())
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let mut t = Vec::with_capacity(keep.len() * dim);
                    for &r in &keep {
                        t.extend(check_target(data, rows[r], *dim)?);
                    }
                    let t = Tensor::from_vec(t, (keep.len(), *dim), &self.device).map_err(&f)?;
                    Some((
                        objectives::regress(&select_rows(fused, &keep)?, head, &t)?,
                        keep.len(),
                    ))
                }
            };
            let Some((loss, n)) = loss else { continue };
            let value = f64::from(loss.to_scalar::<f32>().map_err(&f)?);
            parts.push((o.name.clone(), value, n));
            let weighted = (loss * o.weight).map_err(&f)?;
            total = Some(match total {
                None => weighted,
                Some(t) => (t + weighted).map_err(&f)?,
            });
        }
        Ok(total.map(|total| BatchLoss { total, parts }))
    }

    fn contrastive(&self, o: &ObjNet, sim: &Tensor) -> Result<Tensor> {
        let s = o
            .scale
            .as_ref()
            .ok_or_else(|| MlmfError::Internal("contrastive objective without a scale".into()))?;
        objectives::contrastive(sim, o.loss, s, o.bias.as_ref())
    }

    /// The fused vectors and the contrastive sides' vectors of `rows` of `data`
    /// (evaluation; no modality dropped).
    pub(crate) fn embed_rows(
        &self,
        data: &Dataset,
        all: &[usize],
        batch: usize,
    ) -> Result<Embedded> {
        let mut out = Embedded::default();
        for rows in all.chunks(batch.max(1)) {
            let inputs = self.fusion_inputs(data, rows, &|_| true)?;
            if let Some((f, _, have)) = self.fused(&inputs, &[])? {
                out.push_fused(&f, &have)?;
            } else {
                out.push_none(rows.len(), self.out_dim);
            }
            for (k, o) in self.objectives.iter().enumerate() {
                if let ObjKind::Between { a, b } = o.kind {
                    for (j, (s, other)) in [(a, b), (b, a)].into_iter().enumerate() {
                        let v = self.side(s, other, &inputs, &[])?;
                        out.push_side(k, j, v, rows.len(), self.side_width(s))?;
                    }
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }
}

/// Host copies of what evaluation compares.
#[derive(Default)]
pub(crate) struct Embedded {
    /// `[n, out]` row-major and which rows have a fused vector.
    pub(crate) fused: Vec<f32>,
    pub(crate) fused_rows: Vec<bool>,
    /// `(objective, side) -> (row-major vectors, width, present rows)`.
    pub(crate) sides: BTreeMap<(usize, usize), SideRows>,
}

impl Embedded {
    fn push_fused(&mut self, f: &Tensor, have: &[bool]) -> Result<()> {
        let v: Vec<f32> = f
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(ce("evaluation"))?;
        self.fused.extend(v);
        self.fused_rows.extend_from_slice(have);
        Ok(())
    }

    fn push_none(&mut self, n: usize, width: usize) {
        self.fused.extend(std::iter::repeat_n(0.0, n * width));
        self.fused_rows.extend(std::iter::repeat_n(false, n));
    }

    fn push_side(
        &mut self,
        k: usize,
        j: usize,
        v: Option<(Tensor, Vec<bool>)>,
        n: usize,
        width: usize,
    ) -> Result<()> {
        let e = self
            .sides
            .entry((k, j))
            .or_insert_with(|| (Vec::new(), width, Vec::new()));
        match v {
            Some((t, rows)) => {
                e.0.extend(
                    t.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(ce("evaluation"))?,
                );
                e.2.extend(rows);
            }
            None => {
                e.0.extend(std::iter::repeat_n(0.0, n * width));
                e.2.extend(std::iter::repeat_n(false, n));
            }
        }
        Ok(())
    }
}

/// Row `r`'s label, checked against the number of classes.
pub(crate) fn check_label(data: &Dataset, r: usize, classes: usize) -> Result<u32> {
    let ex = &data.examples()[r];
    let l = ex.label.unwrap_or(-1);
    if l < 0 || l as u64 >= classes as u64 {
        let mut e = MlmfError::data(
            data.origin(),
            Some(r),
            Some("label"),
            format!("{l} is out of range: expected 0..{classes} (num_classes = {classes})"),
        );
        if let MlmfError::Data { id, .. } = &mut e {
            id.clone_from(&ex.id);
        }
        return Err(e);
    }
    Ok(l as u32)
}

/// Row `r`'s target, checked against the regression width.
pub(crate) fn check_target(data: &Dataset, r: usize, dim: usize) -> Result<Vec<f32>> {
    let ex = &data.examples()[r];
    let t = ex.target.clone().unwrap_or_default();
    if t.len() != dim || t.iter().any(|v| !v.is_finite()) {
        let mut e = MlmfError::data(
            data.origin(),
            Some(r),
            Some("target"),
            format!(
                "{} finite value(s) expected (regress dim = {dim}), got {t:?}",
                dim
            ),
        );
        if let MlmfError::Data { id, .. } = &mut e {
            id.clone_from(&ex.id);
        }
        return Err(e);
    }
    Ok(t)
}
