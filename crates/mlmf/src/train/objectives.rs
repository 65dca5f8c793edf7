//! Losses and the trainable heads of the objectives (docs/training.md):
//!
//! - contrastive, over a similarity matrix `S [N, N]` whose diagonal pairs are the
//!   positives: symmetric InfoNCE (CLIP: `logits = exp(min(s, ln 100)) S`, the mean of
//!   the row-wise and column-wise cross-entropies) or the sigmoid loss (SigLIP:
//!   `logits = exp(s) S + b`, `sum softplus(-z logits) / N` with `z` = +1 on the
//!   diagonal and -1 elsewhere), `s` and `b` learnable;
//! - classification: a linear head on the fused vector, mean cross-entropy;
//! - regression: a linear head on the fused vector, mean squared error.
//!
//! On float32 CPU tensors the three losses are fused ops (ops_loss.rs). Elsewhere,
//! cross-entropy and the squared error are candle-nn's losses (`loss::cross_entropy`,
//! `loss::mse`; InfoNCE is two cross-entropies). The sigmoid loss is written here with
//! a stable softplus: candle-nn's `binary_cross_entropy_with_logit` takes
//! `log(sigmoid(x))`, which overflows at the logits SigLIP starts from.

use candle_core::{DType, Device, Tensor};

use super::nn::{normalize, softplus, Lin};
use super::ops_loss;
use crate::config::train::ContrastiveLoss;
use crate::encoders::layers::ce;
use crate::error::Result;

/// `ln(100)`: InfoNCE's logit scale is clamped here, as CLIP does.
pub(crate) const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// Cosine similarities `[N, M]` between the rows of `a` and of `b`.
pub(crate) fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let f = ce("similarity");
    let (a, b) = (normalize(a)?, normalize(b)?);
    if let Some(s) = super::ops::linear(&a, &b, None).map_err(&f)? {
        return Ok(s);
    }
    a.matmul(&b.t().map_err(&f)?).map_err(f)
}

fn eye(n: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    Tensor::from_vec(v, (n, n), dev).map_err(ce("identity"))
}

/// The contrastive loss of a square similarity matrix `sim` (positives on the
/// diagonal), with the objective's logit scale `s` (and bias `b` for the sigmoid loss).
pub(crate) fn contrastive(
    sim: &Tensor,
    kind: ContrastiveLoss,
    s: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let f = ce("contrastive loss");
    let n = sim.dim(0).map_err(&f)?;
    match kind {
        ContrastiveLoss::Infonce => {
            let scale = s
                .minimum(MAX_LOGIT_SCALE)
                .and_then(|s| s.exp())
                .map_err(&f)?;
            if let Some(l) = ops_loss::infonce(sim, &scale).map_err(&f)? {
                return Ok(l);
            }
            let logits = sim.broadcast_mul(&scale).map_err(&f)?;
            let diag = Tensor::arange(0u32, n as u32, sim.device()).map_err(&f)?;
            let rows = candle_nn::loss::cross_entropy(&logits, &diag).map_err(&f)?;
            let cols = logits
                .t()
                .and_then(|l| l.contiguous())
                .and_then(|l| candle_nn::loss::cross_entropy(&l, &diag))
                .map_err(&f)?;
            ((rows + cols).map_err(&f)? * 0.5).map_err(f)
        }
        ContrastiveLoss::Sigmoid => {
            let t = s.exp().map_err(&f)?;
            if let Some(l) = ops_loss::sigmoid_loss(sim, &t, b).map_err(&f)? {
                return Ok(l);
            }
            let id = eye(n, sim.device())?;
            let mut logits = sim.broadcast_mul(&t).map_err(&f)?;
            if let Some(b) = b {
                logits = logits.broadcast_add(b).map_err(&f)?;
            }
            // -z = 1 - 2 * eye.
            let minus_z = id.affine(-2.0, 1.0).map_err(&f)?;
            softplus(&(logits * minus_z).map_err(&f)?)?
                .sum_all()
                .and_then(|t| t.affine(1.0 / n as f64, 0.0))
                .map_err(f)
        }
    }
}

/// Mean cross-entropy of `head(x)` against `labels` (`u32`, `[N]`).
pub(crate) fn classify(x: &Tensor, head: &Lin, labels: &Tensor) -> Result<Tensor> {
    let f = ce("classification loss");
    let logits = head.forward(x)?;
    if let Some(l) = ops_loss::cross_entropy(&logits, labels).map_err(&f)? {
        return Ok(l);
    }
    candle_nn::loss::cross_entropy(&logits, labels).map_err(f)
}

/// Mean squared error of `head(x)` against `targets` `[N, K]`.
pub(crate) fn regress(x: &Tensor, head: &Lin, targets: &Tensor) -> Result<Tensor> {
    candle_nn::loss::mse(&head.forward(x)?, targets).map_err(ce("regression loss"))
}

/// A labels tensor from host values.
pub(crate) fn labels_tensor(labels: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(labels.to_vec(), labels.len(), dev).map_err(ce("labels"))
}

/// A 0-d float32 scalar.
pub(crate) fn scalar(v: f64, dev: &Device) -> Result<Tensor> {
    Tensor::new(v as f32, dev)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(ce("scalar"))
}
