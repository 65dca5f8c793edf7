//! Differentiable building blocks for the training forward: the same formulas as the
//! inference layers (docs/fusion.md), written only with candle ops that have a
//! backward pass (specs: `softmax_last_dim`, `ops::layer_norm` / `rms_norm` and `sdpa`
//! drop gradients, so none of them appears here).
//!
//! Masks are float32 0/1 tensors; `[B, T]` for tokens, `[B, 1]` for row presence.

use candle_core::{Tensor, D};

use crate::encoders::layers::{ce, MASKED};
use crate::error::Result;

/// A linear map `x W^T + b` over the last dimension of `x` (`W` `[out, in]`).
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Lin {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
}

pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let f = ce("linear");
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k)).map_err(&f)?;
    let y = match super::ops::linear(&x2, w, b).map_err(&f)? {
        Some(y) => y,
        None => {
            let y = x2.matmul(&w.t().map_err(&f)?).map_err(&f)?;
            match b {
                Some(b) => y.broadcast_add(b).map_err(&f)?,
                None => y,
            }
        }
    };
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0).map_err(&f)?;
    }
    y.reshape(out).map_err(f)
}

/// LayerNorm over the last dimension (biased variance, as torch).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let f = ce("layer norm");
    if let Some(y) = super::ops::layer_norm(x, w, b, eps).map_err(&f)? {
        return Ok(y);
    }
    let mean = x.mean_keepdim(D::Minus1).map_err(&f)?;
    let xc = x.broadcast_sub(&mean).map_err(&f)?;
    let var = xc
        .sqr()
        .and_then(|s| s.mean_keepdim(D::Minus1))
        .map_err(&f)?;
    let inv = (var + eps).and_then(|v| v.sqrt()).map_err(&f)?;
    xc.broadcast_div(&inv)
        .and_then(|y| y.broadcast_mul(w))
        .and_then(|y| y.broadcast_add(b))
        .map_err(f)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let f = ce("rms norm");
    if let Some(y) = super::ops::rms_norm(x, w, eps).map_err(&f)? {
        return Ok(y);
    }
    let ms = x
        .sqr()
        .and_then(|s| s.mean_keepdim(D::Minus1))
        .map_err(&f)?;
    let inv = (ms + eps).and_then(|v| v.sqrt()).map_err(&f)?;
    x.broadcast_div(&inv)
        .and_then(|y| y.broadcast_mul(w))
        .map_err(f)
}

/// The exact (erf) GELU.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    let f = ce("gelu");
    match super::ops::gelu(x).map_err(&f)? {
        Some(y) => Ok(y),
        None => x.gelu_erf().map_err(f),
    }
}

/// `sigmoid(x)` with its backward pass.
pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x).map_err(ce("sigmoid"))
}

/// Softmax over the last dimension where `allowed` (broadcastable, 0/1) is 1; other
/// entries get exactly 0 (a row with nothing allowed is all 0).
pub(crate) fn masked_softmax(logits: &Tensor, allowed: Option<&Tensor>) -> Result<Tensor> {
    let f = ce("softmax");
    let l = match allowed {
        Some(a) => {
            let bias = a
                .affine(-f64::from(MASKED), f64::from(MASKED))
                .map_err(&f)?;
            logits.broadcast_add(&bias).map_err(&f)?
        }
        None => logits.clone(),
    };
    let w = match super::ops::softmax(&l).map_err(&f)? {
        Some(w) => w,
        None => {
            // The maximum only keeps exp() in range: softmax does not depend on it.
            let max = l.max_keepdim(D::Minus1).map_err(&f)?.detach();
            let e = l.broadcast_sub(&max).and_then(|d| d.exp()).map_err(&f)?;
            e.sum_keepdim(D::Minus1)
                .and_then(|s| e.broadcast_div(&s))
                .map_err(&f)?
        }
    };
    match allowed {
        Some(a) => w.broadcast_mul(a).map_err(f),
        None => Ok(w),
    }
}

/// `sum_t mask_t x_t / max(1, sum_t mask_t)` over the tokens of `x` `[B, T, D]`.
pub(crate) fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let f = ce("masked mean");
    if let Some(y) = super::ops::masked_mean(x, mask).map_err(&f)? {
        return Ok(y);
    }
    let sum = mask
        .unsqueeze(2)
        .and_then(|m| x.broadcast_mul(&m))
        .and_then(|s| s.sum(1))
        .map_err(&f)?;
    let count = mask
        .sum_keepdim(1)
        .and_then(|c| c.maximum(1f32))
        .map_err(&f)?;
    sum.broadcast_div(&count).map_err(f)
}

/// Rows scaled to unit length: `x / sqrt(sum(x^2) + 1e-12)` (a zero row stays 0 and
/// has a finite gradient).
pub(crate) fn normalize(x: &Tensor) -> Result<Tensor> {
    let f = ce("normalize");
    if let Some(y) = super::ops::normalize(x).map_err(&f)? {
        return Ok(y);
    }
    let n = x
        .sqr()
        .and_then(|s| s.sum_keepdim(D::Minus1))
        .and_then(|s| s + 1e-12)
        .and_then(|s| s.sqrt())
        .map_err(&f)?;
    x.broadcast_div(&n).map_err(f)
}

/// `softplus(x) = relu(x) + ln(1 + exp(-|x|))`, finite for any `x`.
pub(crate) fn softplus(x: &Tensor) -> Result<Tensor> {
    let f = ce("softplus");
    let tail = x
        .abs()
        .and_then(|a| a.neg())
        .and_then(|a| a.exp())
        .and_then(|e| e + 1.0)
        .and_then(|e| e.log())
        .map_err(&f)?;
    x.relu().and_then(|r| r + tail).map_err(f)
}

/// Rows of `x` (dim 0) at `rows`.
pub(crate) fn select_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let f = ce("select rows");
    if rows.len() == x.dim(0).map_err(&f)? && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(x.clone());
    }
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, rows.len(), x.device()).map_err(&f)?;
    x.index_select(&idx, 0).map_err(f)
}
