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

use candle_core::{Tensor, Var};

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

    /// One update of `vars` with `grads` (host copies, `None` = no gradient this step)
    /// at learning rate `lr`; `decays[i]` says whether tensor `i` is decayed.
    pub(crate) fn step(
        &mut self,
        vars: &[&Var],
        grads: &[Option<Vec<f32>>],
        decays: &[bool],
        lr: f64,
    ) -> Result<()> {
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = grad else { continue };
            let st = &mut self.state[i];
            if st.m.is_empty() {
                st.m = vec![0.0; g.len()];
                st.v = vec![0.0; g.len()];
            }
            st.step += 1;
            let t = st.step as i32;
            let mut p: Vec<f32> = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(ce("optimiser"))?;
            if p.len() != g.len() {
                return Err(MlmfError::Internal(
                    "gradient and parameter sizes differ".into(),
                ));
            }
            let lr32 = lr as f32;
            if decays[i] && self.weight_decay != 0.0 {
                let keep = 1.0 - lr32 * self.weight_decay as f32;
                p.iter_mut().for_each(|x| *x *= keep);
            }
            let bc1 = 1.0 - (self.beta1).powi(t);
            let bc2 = 1.0 - (self.beta2).powi(t);
            let step_size = (lr / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let eps = self.eps as f32;
            for (((p, &g), m), v) in p
                .iter_mut()
                .zip(g)
                .zip(st.m.iter_mut())
                .zip(st.v.iter_mut())
            {
                // torch: exp_avg.lerp_(grad, 1 - beta1) = m + (1 - beta1) (g - m).
                *m += (1.0 - b1) * (g - *m);
                *v = *v * b2 + (1.0 - b2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            }
            let shape = var.as_tensor().dims().to_vec();
            let dev = var.as_tensor().device().clone();
            var.set(&Tensor::from_vec(p, shape, &dev).map_err(ce("optimiser"))?)
                .map_err(ce("optimiser"))?;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1); returns the
/// norm before clipping.
pub(crate) fn clip_grad_norm(grads: &mut [Option<Vec<f32>>], max_norm: Option<f64>) -> f64 {
    let norm = grads
        .iter()
        .flatten()
        .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            grads
                .iter_mut()
                .flatten()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
        }
    }
    norm
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
        let mut g = vec![Some(vec![3.0f32, 0.0]), None, Some(vec![0.0, 4.0])];
        let n = clip_grad_norm(&mut g, Some(1.0));
        assert!((n - 5.0).abs() < 1e-9);
        let after: f64 = g
            .iter()
            .flatten()
            .flat_map(|v| v.iter())
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((after - 1.0).abs() < 1e-5);
        let mut small = vec![Some(vec![0.3f32])];
        clip_grad_norm(&mut small, Some(1.0));
        assert_eq!(small[0].as_ref().unwrap()[0], 0.3);
    }
}
