//! Metrics of the trainable model on rows of a dataset (docs/training.md,
//! "Evaluation"):
//!
//! - `loss`, `loss/{objective}`: the objectives' losses over batches of the rows in
//!   order, averaged by rows (no modality dropped);
//! - for each contrastive objective between two sides `a`, `b`: `a->b R@1`, `R@5`,
//!   `R@10` (row `i` of `a` retrieving row `i` of `b` among all rows having both) and
//!   `b->a R@k`; for an attention pair `q->k`: `attention q->k R@k` and
//!   `attention k->q R@k`, over the pair scores; `mean R@k` over all of them;
//! - classification: `accuracy`, `macro_f1`; regression: `mse`.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::data::Dataset;
use super::metrics;
use super::nets::{check_label, check_target, Nets, ObjKind};
use super::nn::select_rows;
use crate::config::train::Side;
use crate::encoders::layers::ce;
use crate::error::Result;

const KS: [usize; 3] = [1, 5, 10];

/// Rows of query items per block of pair scores.
const PAIR_BLOCK: usize = 32;

impl Nets {
    /// Every metric of the module docs over `rows` of `data`.
    pub(crate) fn evaluate(
        &self,
        data: &Dataset,
        rows: &[usize],
        batch: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        // Losses, batch by batch.
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut total = (0.0, 0usize);
        for chunk in rows.chunks(batch.max(2)) {
            let Some(l) = self.batch_loss(data, chunk, &|_| true, &[])? else {
                continue;
            };
            let mut t = 0.0;
            for (name, value, n) in &l.parts {
                let e = sums.entry(name.clone()).or_insert((0.0, 0));
                e.0 += value * *n as f64;
                e.1 += n;
                let w = self
                    .objectives
                    .iter()
                    .find(|o| &o.name == name)
                    .map_or(1.0, |o| o.weight);
                t += w * value;
            }
            total.0 += t * chunk.len() as f64;
            total.1 += chunk.len();
        }
        if total.1 > 0 {
            out.insert("loss".to_string(), total.0 / total.1 as f64);
        }
        for (name, (s, n)) in &sums {
            out.insert(format!("loss/{name}"), s / (*n).max(1) as f64);
        }

        let emb = self.embed_rows(data, rows, batch.max(1))?;
        let mut recalls: Vec<(String, Vec<f64>)> = Vec::new();
        for (k, o) in self.objectives.iter().enumerate() {
            match &o.kind {
                ObjKind::Between { a, b } => {
                    let (Some(va), Some(vb)) = (emb.sides.get(&(k, 0)), emb.sides.get(&(k, 1)))
                    else {
                        continue;
                    };
                    let keep: Vec<usize> =
                        (0..rows.len()).filter(|&r| va.2[r] && vb.2[r]).collect();
                    if keep.len() < 2 {
                        continue;
                    }
                    let pick = |v: &(Vec<f32>, usize, Vec<bool>)| -> Result<Tensor> {
                        let w = v.1;
                        let mut x = Vec::with_capacity(keep.len() * w);
                        for &r in &keep {
                            x.extend_from_slice(&v.0[r * w..(r + 1) * w]);
                        }
                        Tensor::from_vec(x, (keep.len(), w), &self.device).map_err(ce("evaluation"))
                    };
                    let sim = super::objectives::cosine_matrix(&pick(va)?, &pick(vb)?)?;
                    let s: Vec<f32> = sim
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(ce("evaluation"))?;
                    let n = keep.len();
                    let label = |recalls: &[(String, Vec<f64>)], x: &Side, y: &Side| {
                        let key = format!("{x}->{y}");
                        if recalls.iter().any(|(k, _)| k == &key) {
                            format!("{}/{key}", o.name)
                        } else {
                            key
                        }
                    };
                    let ab = label(&recalls, a, b);
                    recalls.push((ab, metrics::recall(&s, n, &KS)));
                    let ba = label(&recalls, b, a);
                    recalls.push((ba, metrics::recall(&metrics::transpose(&s, n), n, &KS)));
                }
                ObjKind::Pair(i) => {
                    let p = &self.pairs[*i];
                    let keep: Vec<usize> = rows
                        .iter()
                        .copied()
                        .filter(|&r| data.has(p.pair.query, r) && data.has(p.pair.key, r))
                        .collect();
                    if keep.len() < 2 {
                        continue;
                    }
                    let s = self.pair_matrix(data, *i, &keep)?;
                    let n = keep.len();
                    let (q, kk) = (p.pair.query, p.pair.key);
                    recalls.push((format!("attention {q}->{kk}"), metrics::recall(&s, n, &KS)));
                    recalls.push((
                        format!("attention {kk}->{q}"),
                        metrics::recall(&metrics::transpose(&s, n), n, &KS),
                    ));
                }
                ObjKind::Classify { head, classes } => {
                    let keep: Vec<usize> = (0..rows.len())
                        .filter(|&r| emb.fused_rows[r] && data.examples()[rows[r]].label.is_some())
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let logits = head.forward(&self.fused_of(&emb, &keep)?)?;
                    let pred: Vec<u32> = logits
                        .argmax(1)
                        .and_then(|p| p.to_vec1())
                        .map_err(ce("evaluation"))?;
                    let truth: Vec<usize> = keep
                        .iter()
                        .map(|&r| check_label(data, rows[r], *classes).map(|l| l as usize))
                        .collect::<Result<_>>()?;
                    let pred: Vec<usize> = pred.into_iter().map(|p| p as usize).collect();
                    let (acc, f1) = metrics::accuracy_f1(&pred, &truth);
                    out.insert("accuracy".into(), acc);
                    out.insert("macro_f1".into(), f1);
                }
                ObjKind::Regress { head, dim } => {
                    let keep: Vec<usize> = (0..rows.len())
                        .filter(|&r| emb.fused_rows[r] && data.examples()[rows[r]].target.is_some())
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let pred: Vec<f32> = head
                        .forward(&self.fused_of(&emb, &keep)?)?
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(ce("evaluation"))?;
                    let mut truth = Vec::with_capacity(pred.len());
                    for &r in &keep {
                        truth.extend(check_target(data, rows[r], *dim)?);
                    }
                    out.insert("mse".into(), metrics::mse(&pred, &truth));
                }
            }
        }
        for (j, k) in KS.iter().enumerate() {
            for (name, r) in &recalls {
                out.insert(format!("{name} R@{k}"), r[j]);
            }
            if !recalls.is_empty() {
                let mean = recalls.iter().map(|(_, r)| r[j]).sum::<f64>() / recalls.len() as f64;
                out.insert(format!("mean R@{k}"), mean);
            }
        }
        Ok(out)
    }

    /// The fused vectors of the rows `keep` (positions in the evaluated rows).
    fn fused_of(&self, emb: &super::nets::Embedded, keep: &[usize]) -> Result<Tensor> {
        let d = self.out_dim();
        let mut x = Vec::with_capacity(keep.len() * d);
        for &r in keep {
            x.extend_from_slice(&emb.fused[r * d..(r + 1) * d]);
        }
        Tensor::from_vec(x, (keep.len(), d), &self.device).map_err(ce("evaluation"))
    }

    /// `S [n, n]` row-major: pair scores of every query item of `rows` against every
    /// key item, in blocks.
    fn pair_matrix(&self, data: &Dataset, pair: usize, rows: &[usize]) -> Result<Vec<f32>> {
        let p = &self.pairs[pair];
        let f = ce("evaluation");
        let n = rows.len();
        let k = data
            .tokens(p.pair.key, rows, &self.device)?
            .ok_or_else(|| crate::MlmfError::Internal("pair keys".into()))?;
        let km = k
            .mask
            .clone()
            .ok_or_else(|| crate::MlmfError::Internal("key mask".into()))?;
        let mut s = vec![0f32; n * n];
        for (bi, qrows) in rows.chunks(PAIR_BLOCK).enumerate() {
            let q = data
                .tokens(p.pair.query, qrows, &self.device)?
                .ok_or_else(|| crate::MlmfError::Internal("pair queries".into()))?;
            let qm = q
                .mask
                .clone()
                .ok_or_else(|| crate::MlmfError::Internal("query mask".into()))?;
            for (bj, kidx) in (0..n)
                .collect::<Vec<_>>()
                .chunks(PAIR_BLOCK * 2)
                .enumerate()
            {
                let block = p
                    .net
                    .pair_scores(
                        &q.x,
                        &qm,
                        &select_rows(&k.x, kidx)?,
                        &select_rows(&km, kidx)?,
                    )?
                    .detach();
                let v: Vec<f32> = block.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?;
                let c = kidx.len();
                for (i, row) in v.chunks(c).enumerate() {
                    let r = bi * PAIR_BLOCK + i;
                    let start = bj * PAIR_BLOCK * 2;
                    s[r * n + start..r * n + start + c].copy_from_slice(row);
                }
            }
        }
        Ok(s)
    }
}
