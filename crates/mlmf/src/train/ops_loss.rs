//! Fused float32 CPU losses with their backward passes: the mean cross-entropy of
//! labelled logits, symmetric InfoNCE over a similarity matrix and SigLIP's sigmoid
//! loss. Composed from candle's ops (objectives.rs) each builds a dozen `[N, N]`
//! intermediates whose gradients the autograd then allocates and sums one by one;
//! here the forward is one pass over the logits and the backward another. The math is
//! the composed losses'; the objective tests run both and hold them to PyTorch.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::ops::{serves, slice};
use super::par;
use crate::kernels::exp;

/// `ln(sum_j exp(row_j))`, stable, accumulated in float64.
fn log_sum_exp(row: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = row.clone().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.map(|v| exp(v - m) as f64).sum();
    m + s.ln() as f32
}

/// The 0-d float32 value of a scalar input.
fn scalar_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<f32> {
    match slice(s, l)? {
        [v] => Ok(*v),
        v => candle_core::bail!("fused loss: expected a scalar, got {} values", v.len()),
    }
}

fn scalar_tensor(v: f32, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(v, like.device())
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn upstream(g: &Tensor) -> candle_core::Result<f32> {
    g.flatten_all()?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("fused loss: empty upstream gradient".into()))
}

/// Mean cross-entropy of logits `[N, C]` against `u32` labels `[N]`.
struct CrossEntropy;

impl CrossEntropy {
    fn labels(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<usize>> {
        let all = s.as_slice::<u32>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(all[a..b].iter().map(|&v| v as usize).collect()),
            None => candle_core::bail!("fused loss: non-contiguous labels"),
        }
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "mlmf-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let (n, c) = l1.shape().dims2()?;
        let labels = Self::labels(s2, l2)?;
        if labels.len() != n || labels.iter().any(|&y| y >= c) {
            candle_core::bail!("cross-entropy: labels must be {n} values below {c}");
        }
        let total: f64 = x
            .chunks_exact(c.max(1))
            .zip(&labels)
            .map(|(row, &y)| (log_sum_exp(row.iter().copied()) - row[y]) as f64)
            .sum();
        let mean = if n == 0 { 0.0 } else { total / n as f64 };
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c) = logits.dims2()?;
        let x = host(logits)?;
        let y = labels.to_vec1::<u32>()?;
        let k = upstream(g)? / n.max(1) as f32;
        let mut dx = vec![0f32; n * c];
        for ((row, out), &yi) in x.chunks_exact(c).zip(dx.chunks_exact_mut(c)).zip(&y) {
            let lse = log_sum_exp(row.iter().copied());
            for (o, &v) in out.iter_mut().zip(row) {
                *o = k * exp(v - lse);
            }
            out[yi as usize] -= k;
        }
        let dx = Tensor::from_vec(dx, (n, c), logits.device())?;
        Ok((Some(dx), None))
    }
}

/// Symmetric InfoNCE of `scale * sim` (`sim` `[N, N]`, positives on the diagonal,
/// `scale` 0-d): the mean of the row-wise and the column-wise cross-entropies.
struct InfoNce;

impl InfoNce {
    /// Rows of `[N, N]` per parallel task.
    fn rows_per_task(n: usize) -> usize {
        (16_384 / n.max(1)).max(1)
    }

    /// Row and column log-sum-exps of `scale * sim` (sums in float64; the split into
    /// tasks is fixed by `n`, so the result does not depend on the thread count).
    fn lse(sim: &[f32], n: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
        if n == 0 {
            return (Vec::new(), Vec::new());
        }
        let per = Self::rows_per_task(n) * n;
        let tasks = sim.len().div_ceil(per);
        // Per task: its rows' log-sum-exps and its partial column maxima.
        let parts: Vec<(Vec<f32>, Vec<f32>)> = par::map(tasks, |i| {
            let c = &sim[i * per..sim.len().min((i + 1) * per)];
            let rows = c
                .chunks_exact(n)
                .map(|r| log_sum_exp(r.iter().map(|&v| scale * v)))
                .collect();
            let mut max = vec![f32::NEG_INFINITY; n];
            for r in c.chunks_exact(n) {
                max.iter_mut()
                    .zip(r)
                    .for_each(|(m, &v)| *m = m.max(scale * v));
            }
            (rows, max)
        });
        let mut rows = Vec::with_capacity(n);
        let mut max = vec![f32::NEG_INFINITY; n];
        for (r, m) in &parts {
            rows.extend_from_slice(r);
            max.iter_mut().zip(m).for_each(|(a, &b)| *a = a.max(b));
        }
        let sums: Vec<Vec<f64>> = par::map(tasks, |i| {
            let c = &sim[i * per..sim.len().min((i + 1) * per)];
            let mut sum = vec![0f64; n];
            let mut e = vec![0f32; n];
            for r in c.chunks_exact(n) {
                for ((o, &m), &v) in e.iter_mut().zip(&max).zip(r) {
                    *o = exp(scale * v - m);
                }
                sum.iter_mut()
                    .zip(&e)
                    .for_each(|(s, &v)| *s += f64::from(v));
            }
            sum
        });
        let mut sum = vec![0f64; n];
        for p in sums {
            sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        let cols = max
            .iter()
            .zip(&sum)
            .map(|(&m, &s)| m + s.ln() as f32)
            .collect();
        (rows, cols)
    }
}

impl CustomOp2 for InfoNce {
    fn name(&self) -> &'static str {
        "mlmf-infonce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sim = slice(s1, l1)?;
        let (n, m) = l1.shape().dims2()?;
        if n != m {
            candle_core::bail!("InfoNCE: the similarity matrix must be square, got {n}x{m}");
        }
        let scale = scalar_of(s2, l2)?;
        let (rows, cols) = Self::lse(sim, n, scale);
        let total: f64 = (0..n)
            .map(|i| (rows[i] + cols[i] - 2.0 * scale * sim[i * n + i]) as f64)
            .sum();
        let loss = if n == 0 { 0.0 } else { 0.5 * total / n as f64 };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        sim: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = sim.dim(0)?;
        let s = host(sim)?;
        let t = upstream(&scale.flatten_all()?)?;
        let (rows, cols) = Self::lse(&s, n, t);
        let k = 0.5 * upstream(g)? / n.max(1) as f32;
        // dL/dz with z = t * sim; dL/dsim = t dz, dL/dt = sum dz * sim. The diagonal's
        // -2 is applied after each row's (vectorised) pass.
        let mut dsim = vec![0f32; n * n];
        let per = Self::rows_per_task(n);
        let dts = par::chunks_mut(&mut dsim, per * n.max(1), |c, out| {
            let mut dt = 0f64;
            for (r, o) in out.chunks_exact_mut(n).enumerate() {
                let i = c * per + r;
                let (row, lr) = (&s[i * n..(i + 1) * n], rows[i]);
                let mut acc = 0f32;
                for ((o, &v), &lc) in o.iter_mut().zip(row).zip(&cols) {
                    let z = t * v;
                    let dz = k * (exp(z - lr) + exp(z - lc));
                    acc += dz * v;
                    *o = t * dz;
                }
                let diag = 2.0 * k;
                acc -= diag * row[i];
                o[i] -= t * diag;
                dt += f64::from(acc);
            }
            dt
        });
        let dt: f64 = dts.iter().sum();
        let dsim = sim
            .track_op()
            .then(|| Tensor::from_vec(dsim, (n, n), sim.device()));
        let dscale = scale.track_op().then(|| scalar_tensor(dt as f32, scale));
        Ok((dsim.transpose()?, dscale.transpose()?))
    }
}

/// SigLIP's sigmoid loss `sum softplus(-z (t sim + b)) / N` (`z` = +1 on the diagonal,
/// -1 elsewhere; `t`, `b` 0-d).
struct Sigmoid;

/// `softplus(x) = max(x, 0) + ln(1 + exp(-|x|))`.
fn softplus(x: f32) -> f32 {
    x.max(0.0) + exp(-x.abs()).ln_1p()
}

impl CustomOp3 for Sigmoid {
    fn name(&self) -> &'static str {
        "mlmf-sigmoid-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sim = slice(s1, l1)?;
        let (n, _) = l1.shape().dims2()?;
        let (t, b) = (scalar_of(s2, l2)?, scalar_of(s3, l3)?);
        let mut total = 0f64;
        for (i, r) in sim.chunks_exact(n.max(1)).enumerate() {
            for (j, &v) in r.iter().enumerate() {
                let logit = t * v + b;
                total += softplus(if i == j { -logit } else { logit }) as f64;
            }
        }
        let loss = if n == 0 { 0.0 } else { total / n as f64 };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        sim: &Tensor,
        t: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, m) = sim.dims2()?;
        let s = host(sim)?;
        let (tv, bv) = (upstream(&t.flatten_all()?)?, upstream(&b.flatten_all()?)?);
        let k = upstream(g)? / n.max(1) as f32;
        // d softplus(-z l) / dl = -z sigmoid(-z l).
        let mut dsim = vec![0f32; n * m];
        let (mut dt, mut db) = (0f64, 0f64);
        for (i, (r, out)) in s
            .chunks_exact(m.max(1))
            .zip(dsim.chunks_exact_mut(m.max(1)))
            .enumerate()
        {
            for (j, (o, &v)) in out.iter_mut().zip(r).enumerate() {
                let l = tv * v + bv;
                let dl = if i == j {
                    -1.0 / (1.0 + exp(l))
                } else {
                    1.0 / (1.0 + exp(-l))
                } * k;
                dt += (dl * v) as f64;
                db += dl as f64;
                *o = tv * dl;
            }
        }
        let dsim = sim
            .track_op()
            .then(|| Tensor::from_vec(dsim, (n, m), sim.device()));
        let dt = t.track_op().then(|| scalar_tensor(dt as f32, t));
        let db = b.track_op().then(|| scalar_tensor(db as f32, b));
        Ok((dsim.transpose()?, dt.transpose()?, db.transpose()?))
    }
}

/// Mean cross-entropy of `logits` `[N, C]` against `labels` (`u32` `[N]`), on the
/// fused op when it serves.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !serves(logits) || logits.rank() != 2 || labels.dtype() != candle_core::DType::U32 {
        return Ok(None);
    }
    logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, CrossEntropy)
        .map(Some)
}

/// Symmetric InfoNCE of `scale * sim` (`scale` 0-d), on the fused op when it serves.
pub(crate) fn infonce(sim: &Tensor, scale: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !serves(sim) || sim.rank() != 2 || scale.rank() != 0 {
        return Ok(None);
    }
    sim.contiguous()?.apply_op2(scale, InfoNce).map(Some)
}

/// The sigmoid loss of `t * sim + b` (`t`, `b` 0-d; no bias when `b` is `None`), on
/// the fused op when it serves.
pub(crate) fn sigmoid_loss(
    sim: &Tensor,
    t: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !serves(sim) || sim.rank() != 2 || t.rank() != 0 || b.is_some_and(|b| b.rank() != 0) {
        return Ok(None);
    }
    let b = match b {
        Some(b) => b.clone(),
        None => t.zeros_like()?.detach(),
    };
    sim.contiguous()?.apply_op3(t, &b, Sigmoid).map(Some)
}
