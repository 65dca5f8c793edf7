//! Per-channel normalisation over time (wav2vec 2.0's first feature-encoder
//! convolution: a GroupNorm with one group per channel) on the float32 CPU path.
//!
//! `x` is channels-last `[T, C]`, so candle's reductions over the time axis read it
//! with a stride of `C` on one thread; here row blocks are summed in parallel (in
//! float64), then normalised, scaled and passed through the activation in one pass.

use candle_core::Tensor;
use rayon::prelude::*;

use super::{is_plain_f32, slice};
use crate::encoders::layers::{ce, Activation};
use crate::error::Result;

/// Rows per task of the reductions.
const ROWS: usize = 256;

/// Per-channel sums of `f(x)` over the rows of `x` `[T, C]`.
fn column_sums(x: &[f32], c: usize, f: impl Fn(usize, f32) -> f64 + Sync) -> Vec<f64> {
    x.par_chunks(ROWS * c)
        .map(|block| {
            let mut acc = vec![0f64; c];
            for row in block.chunks_exact(c) {
                for (j, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
                    *a += f(j, v);
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// `act((x - mean_t) / sqrt(var_t + eps) * w + b)` per channel of a float32 CPU `x`
/// `[T, C]` (population variance, as GroupNorm); `None` when something lives
/// elsewhere.
pub(crate) fn channel_norm(
    x: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    eps: f64,
    act: Activation,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x) || !is_plain_f32(weight) || !is_plain_f32(bias) {
        return Ok(None);
    }
    let f = ce("channel norm");
    let (t, c) = x.dims2().map_err(&f)?;
    let mut y: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    {
        let (wg, bg) = (weight.storage_and_layout(), bias.storage_and_layout());
        let (Some(w), Some(b)) = (slice(&wg.0, wg.1), slice(&bg.0, bg.1)) else {
            return Ok(None);
        };
        if w.len() != c || b.len() != c || t == 0 {
            return Ok(None);
        }
        let n = t as f64;
        let mean: Vec<f64> = column_sums(&y, c, |_, v| f64::from(v))
            .into_iter()
            .map(|s| s / n)
            .collect();
        let var = column_sums(&y, c, |j, v| {
            let d = f64::from(v) - mean[j];
            d * d
        });
        // y = x * scale + shift, with scale = w / std and shift = b - mean * scale.
        let scale: Vec<f32> = var
            .iter()
            .zip(w)
            .map(|(v, &w)| (f64::from(w) / (v / n + eps).sqrt()) as f32)
            .collect();
        let shift: Vec<f32> = mean
            .iter()
            .zip(&scale)
            .zip(b)
            .map(|((m, &s), &b)| (f64::from(b) - m * f64::from(s)) as f32)
            .collect();
        y.par_chunks_mut(ROWS * c).for_each(|block| {
            for row in block.chunks_exact_mut(c) {
                for ((v, s), h) in row.iter_mut().zip(&scale).zip(&shift) {
                    *v = v.mul_add(*s, *h);
                }
                act.apply_slice(row);
            }
        });
    }
    Tensor::from_vec(y, (t, c), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn equals_the_candle_ops() {
        let dev = Device::Cpu;
        // More rows than one task takes, and an offset so the variance is not trivial.
        let x = (Tensor::randn(0f32, 2.0, (700, 5), &dev).unwrap() + 3.0).unwrap();
        let w = Tensor::new(&[1.0f32, 0.5, -2.0, 1.5, 0.1], &dev).unwrap();
        let b = Tensor::new(&[0.0f32, 1.0, -1.0, 0.25, 2.0], &dev).unwrap();
        let got = channel_norm(&x, (&w, &b), 1e-5, Activation::Gelu)
            .unwrap()
            .unwrap();
        let mean = x.mean_keepdim(0).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(0).unwrap();
        let want = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .and_then(|y| y.broadcast_mul(&w))
            .and_then(|y| y.broadcast_add(&b))
            .and_then(|y| y.gelu_erf())
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
