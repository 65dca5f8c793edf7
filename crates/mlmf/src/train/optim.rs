//! AdamW with state that can be saved, the learning-rate schedule and gradient
//! clipping.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay), step for
//! step and in the same float32 order of operations, per tensor:
//!
//! ```text
//! p *= 1 - lr * wd                       (weight matrices only; see VarStore::decays)
//! m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//! p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! `t` counts the steps in which the tensor had a gradient; a tensor without one in a
//! step (a modality dropped, an objective with no rows) is left alone, as PyTorch does.
//! candle-nn's AdamW keeps its moments private, which would make an exact resume
//! impossible: these moments are checkpointed with the weights.

use super::par;
use candle_core::{CpuStorage, Layout, Tensor, Var};

use super::ops::{slice, with_slice};

use crate::config::train::ScheduleKind;
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};

/// One tensor's optimiser state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Moments {
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) step: u64,
}

/// AdamW over a list of variables (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct AdamW {
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) eps: f64,
    pub(crate) weight_decay: f64,
    pub(crate) state: Vec<Moments>,
}

impl AdamW {
    pub(crate) fn new(n: usize, betas: [f64; 2], eps: f64, weight_decay: f64) -> Self {
        Self {
            beta1: betas[0],
            beta2: betas[1],
            eps,
            weight_decay,
            state: vec![Moments::default(); n],
        }
    }

    /// One update of `vars` with `grads` (`None` = no gradient this step), the
    /// gradients scaled by `scale` first (clipping), at learning rate `lr`;
    /// `decays[i]` says whether tensor `i` is decayed. Large tensors are split between
    /// threads.
    pub(crate) fn step(
        &mut self,
        vars: &[&Var],
        grads: &[Option<Tensor>],
        scale: f32,
        decays: &[bool],
        lr: f64,
    ) -> Result<()> {
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = grad else { continue };
            let st = &mut self.state[i];
            let n = g.elem_count();
            if st.m.is_empty() {
                st.m = vec![0.0; n];
                st.v = vec![0.0; n];
            }
            st.step += 1;
            let t = st.step as i32;
            let lr32 = lr as f32;
            let keep = if decays[i] && self.weight_decay != 0.0 {
                Some(1.0 - lr32 * self.weight_decay as f32)
            } else {
                None
            };
            let step_size = (lr / (1.0 - self.beta1.powi(t))) as f32;
            let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt() as f32;
            let eps = self.eps as f32;
            let (m, v) = (&mut st.m, &mut st.v);
            if m.len() != n {
                return Err(MlmfError::Internal(
                    "gradient and moment sizes differ".into(),
                ));
            }
            let update = Update {
                m: par::Shared(m.as_mut_ptr()),
                v: par::Shared(v.as_mut_ptr()),
                n,
                scale,
                keep,
                b1,
                b2,
                step_size,
                bc2_sqrt,
                eps,
            };
            var.as_tensor()
                .inplace_op2(g, &update)
                .map_err(ce("optimiser"))?;
        }
        Ok(())
    }
}

/// One tensor's AdamW update, in place on the weights (a candle in-place op, so the
/// variable's storage is written once, with no copy of the weights per step).
struct Update {
    m: par::Shared,
    v: par::Shared,
    n: usize,
    scale: f32,
    keep: Option<f32>,
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl candle_core::InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "mlmf-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(all), Some((a, b))) = (s1, l1.contiguous_offsets()) else {
            candle_core::bail!("optimiser: weights must be contiguous float32")
        };
        let (p, g) = (&mut all[a..b], slice(s2, l2)?);
        if p.len() != self.n || g.len() != self.n {
            candle_core::bail!("optimiser: weight, gradient and moment sizes differ")
        }
        let (b1, b2, scale) = (self.b1, self.b2, self.scale);
        let (step_size, bc2_sqrt, eps) = (self.step_size, self.bc2_sqrt, self.eps);
        let (mp, vp) = (self.m, self.v);
        par::chunks_mut(p, CHUNK, |i, pc| {
            let gc = &g[i * CHUNK..][..pc.len()];
            // SAFETY: chunk i of the moments (`n` long, as the weights); disjoint per task.
            let (mc, vc) = unsafe {
                (
                    std::slice::from_raw_parts_mut(mp.get().add(i * CHUNK), pc.len()),
                    std::slice::from_raw_parts_mut(vp.get().add(i * CHUNK), pc.len()),
                )
            };
            if let Some(k) = self.keep {
                pc.iter_mut().for_each(|p| *p *= k);
            }
            for (((p, &g), m), v) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut()) {
                // torch: clip_grad_norm_ scales the gradient in place.
                let g = g * scale;
                // torch: exp_avg.lerp_(grad, 1 - beta1) = m + (1 - beta1) (g - m).
                *m += (1.0 - b1) * (g - *m);
                *v = *v * b2 + (1.0 - b2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            }
        });
        Ok(())
    }
}

/// Values per parallel task of the optimiser and the norm.
const CHUNK: usize = 1 << 15;

/// The global L2 norm of `grads`, and the first non-finite value with its tensor's
/// index, if any.
pub(crate) fn grad_norm(grads: &[Option<Tensor>]) -> Result<(f64, Option<(usize, f32)>)> {
    let mut total = 0f64;
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let (sq, bad) = with_slice(g, |g| {
            par::map(g.len().div_ceil(CHUNK), |i| {
                let c = &g[i * CHUNK..g.len().min((i + 1) * CHUNK)];
                let sq = sum_of_squares(c);
                // A non-finite value makes the sum non-finite: only then look for it.
                let bad = if sq.is_finite() {
                    None
                } else {
                    c.iter().copied().find(|x| !x.is_finite())
                };
                (sq, bad)
            })
            .into_iter()
            .fold((0.0, None), |a, b| (a.0 + b.0, a.1.or(b.1)))
        })
        .map_err(ce("gradient norm"))?;
        if let Some(b) = bad {
            return Ok((f64::NAN, Some((i, b))));
        }
        total += sq;
    }
    Ok((total.sqrt(), None))
}

/// The sum of the squares of `c` in float64, over eight interleaved partial sums
/// (a fixed order, so the same for any thread count, and one the compiler vectorises).
fn sum_of_squares(c: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut it = c.chunks_exact(8);
    for piece in &mut it {
        for (l, &x) in lanes.iter_mut().zip(piece) {
            *l += f64::from(x) * f64::from(x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(it.remainder()) {
        *l += f64::from(x) * f64::from(x);
    }
    lanes.iter().sum()
}

/// PyTorch's `clip_grad_norm_` factor for a global norm: `max_norm / (norm + 1e-6)`
/// when that is below 1, else 1.
pub(crate) fn clip_factor(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(max) if max / (norm + 1e-6) < 1.0 => (max / (norm + 1e-6)) as f32,
        _ => 1.0,
    }
}

/// The learning rate of step `t` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then the schedule down to 0 at `total` (the Hugging Face schedules:
/// the first step has `lr` 0).
pub(crate) fn learning_rate(
    lr: f64,
    t: usize,
    warmup: usize,
    total: usize,
    kind: ScheduleKind,
) -> f64 {
    if t < warmup {
        return lr * t as f64 / warmup.max(1) as f64;
    }
    let progress = (t - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = match kind {
        ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        ScheduleKind::Linear => (1.0 - progress).max(0.0),
        ScheduleKind::Constant => 1.0,
    };
    lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lr = |t| learning_rate(1.0, t, 5, 50, ScheduleKind::Cosine);
        assert_eq!(lr(0), 0.0);
        assert!((lr(4) - 0.8).abs() < 1e-12);
        assert!((lr(5) - 1.0).abs() < 1e-12);
        assert!((lr(50) - 0.0).abs() < 1e-12);
        assert!(lr(27) < lr(26));
        assert_eq!(learning_rate(2.0, 30, 5, 50, ScheduleKind::Constant), 2.0);
        assert!((learning_rate(1.0, 30, 10, 50, ScheduleKind::Linear) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let t = |v: Vec<f32>| {
            Some(Tensor::from_vec(v.clone(), v.len(), &candle_core::Device::Cpu).unwrap())
        };
        let g = vec![t(vec![3.0, 0.0]), None, t(vec![0.0, 4.0])];
        let (n, bad) = grad_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9 && bad.is_none());
        assert!((clip_factor(n, Some(1.0)) - 0.2).abs() < 1e-6);
        assert_eq!(clip_factor(0.3, Some(1.0)), 1.0);
        assert_eq!(clip_factor(10.0, None), 1.0);
        let (_, bad) = grad_norm(&[t(vec![1.0, f32::NAN])]).unwrap();
        assert_eq!(bad.map(|b| b.0), Some(0));
    }
}
