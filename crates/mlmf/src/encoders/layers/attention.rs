//! The attention core on candle's ops (every device): padding and causal biases, head
//! split and merge, and `softmax(q k^T * scale + bias) v` in slices of bounded size.

use candle_core::{DType, Device, Tensor};

use super::{ce, matmul, MASKED};
use crate::error::Result;

/// An additive float32 attention bias broadcastable to `[B, H, Tq, Tk]`.
pub(crate) type AttnBias = Option<Tensor>;

/// Key-padding bias `[B, 1, 1, T]` from a `[B, T]` mask of 0/1 (u8 or integer).
pub(crate) fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    let f = ce("attention mask");
    let (b, t) = mask.dims2().map_err(&f)?;
    let m = mask.to_dtype(DType::F32).map_err(&f)?;
    // (1 - m) * MASKED
    let bias = m
        .affine(-f64::from(MASKED), f64::from(MASKED))
        .map_err(&f)?;
    bias.reshape((b, 1, 1, t)).map_err(f)
}

/// Causal bias `[1, 1, T, T]`: key `j > i` masked for query `i`.
pub(crate) fn causal_bias(t: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASKED } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, t, t), device).map_err(ce("causal mask"))
}

/// The most attention scores one step of [`attention`] materialises: 2^28 (1 GiB in
/// float32). Larger calls run in slices of batch rows, then of heads. This bounds the
/// memory of long sequences at large batches on a GPU (Whisper's 1500 frames at batch
/// 256 would be 4.6 billion scores, 18 GB), and keeps every slice inside the 32-bit
/// element indices of candle's CUDA softmax (`int i = row * ncols + col`), which such
/// a call would overflow.
const SCORES_PER_STEP: usize = 1 << 28;

/// Multi-head attention core: `softmax(q k^T * scale + bias) v` for `q` `[B, H, Tq, Dh]`,
/// `k`, `v` `[B, H, Tk, Dh]`, `bias` broadcast to `[B, H, Tq, Tk]`; softmax in float32;
/// in slices of at most [`SCORES_PER_STEP`] scores.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &AttnBias,
) -> Result<Tensor> {
    attention_in_steps(q, k, v, scale, bias, SCORES_PER_STEP)
}

/// [`attention`] with at most `limit` scores per step: batch rows, then heads, split
/// until a slice fits (one head of one row always runs whole).
fn attention_in_steps(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &AttnBias,
    limit: usize,
) -> Result<Tensor> {
    let f = ce("attention");
    let (b, h, tq, _) = q.dims4().map_err(&f)?;
    let tk = k.dim(2).map_err(&f)?;
    let per_head = tq * tk;
    if b * h * per_head <= limit || b * h == 1 {
        // One step: all the scores at once.
        let dtype = q.dtype();
        let scores = matmul(q, &k.t().map_err(&f)?)?;
        let scores = scores.to_dtype(DType::F32).map_err(&f)?;
        let scores = (scores * scale).map_err(&f)?;
        let scores = match bias {
            Some(b) => scores.broadcast_add(b).map_err(&f)?,
            None => scores,
        };
        let scores = scores.contiguous().map_err(&f)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores).map_err(&f)?;
        return matmul(&probs.to_dtype(dtype).map_err(&f)?, v);
    }
    // Slice dimension 0 (batch rows) while one row is within the limit, else dimension
    // 1 (heads) of each row; a bias of size 1 there is shared by every slice.
    let (dim, size, per) = if h * per_head <= limit || h == 1 {
        (0, b, h * per_head)
    } else {
        (1, h, per_head)
    };
    let step = (limit / per).max(1);
    let slice = |t: &Tensor, at: usize, len: usize| -> Result<Tensor> {
        if t.dim(dim).map_err(&f)? == 1 {
            Ok(t.clone())
        } else {
            t.narrow(dim, at, len).map_err(&f)
        }
    };
    let parts = (0..size)
        .step_by(step)
        .map(|at| {
            let len = step.min(size - at);
            let bias = bias.as_ref().map(|t| slice(t, at, len)).transpose()?;
            attention_in_steps(
                &slice(q, at, len)?,
                &slice(k, at, len)?,
                &slice(v, at, len)?,
                scale,
                &bias,
                limit,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, dim).map_err(f)
}

/// `[B, T, H*Dh]` -> `[B, H, T, Dh]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let f = ce("split heads");
    let (b, t, d) = x.dims3().map_err(&f)?;
    x.reshape((b, t, heads, d / heads))
        .and_then(|x| x.transpose(1, 2))
        .and_then(|x| x.contiguous())
        .map_err(f)
}

/// `[B, H, T, Dh]` -> `[B, T, H*Dh]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let f = ce("merge heads");
    let (b, h, t, dh) = x.dims4().map_err(&f)?;
    x.transpose(1, 2)
        .and_then(|x| x.contiguous())
        .and_then(|x| x.reshape((b, t, h * dh)))
        .map_err(f)
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;

    #[test]
    fn masked_rows_get_no_attention() {
        let q = Tensor::ones((1, 1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::from_vec(
            (0..12).map(|i| i as f32 * 0.1).collect::<Vec<_>>(),
            (1, 1, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let v = Tensor::from_vec(
            vec![1f32, 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.],
            (1, 1, 3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::from_vec(vec![1u8, 1, 0], (1, 3), &Device::Cpu).unwrap();
        let y = attention(&q, &k, &v, 0.5, &Some(padding_bias(&mask).unwrap())).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The third key is masked: no weight on the third value's coordinate.
        assert_eq!(y[2], 0.0);
        assert!((y[0] + y[1] - 1.0).abs() < 1e-6);
        let causal = causal_bias(3, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(causal[1], MASKED);
        assert_eq!(causal[3], 0.0);
    }

    /// Sliced attention equals the whole: by batch rows (a limit of two rows), by
    /// heads (a limit below one row), with a per-row bias, a per-head bias and a
    /// shared one, and ragged last slices.
    #[test]
    fn attention_in_steps_equals_the_whole() {
        let dev = Device::Cpu;
        let (b, h, tq, tk, dh) = (5, 3, 4, 6, 8);
        let x = |n: usize, seed: usize| crate::kernels::test_values(n, seed, 1.0);
        let q = Tensor::from_vec(x(b * h * tq * dh, 1), (b, h, tq, dh), &dev).unwrap();
        let k = Tensor::from_vec(x(b * h * tk * dh, 2), (b, h, tk, dh), &dev).unwrap();
        let v = Tensor::from_vec(x(b * h * tk * dh, 3), (b, h, tk, dh), &dev).unwrap();
        let mask: Vec<u8> = (0..b * tk).map(|i| u8::from(i % 5 != 4)).collect();
        let mask = Tensor::from_vec(mask, (b, tk), &dev).unwrap();
        let biases = [
            None,
            Some(padding_bias(&mask).unwrap()),
            Some(Tensor::from_vec(x(h * tq * tk, 4), (1, h, tq, tk), &dev).unwrap()),
            Some(Tensor::from_vec(x(b * h * tq * tk, 5), (b, h, tq, tk), &dev).unwrap()),
        ];
        for bias in &biases {
            let whole = attention_in_steps(&q, &k, &v, 0.3, bias, usize::MAX).unwrap();
            for limit in [2 * h * tq * tk, 2 * tq * tk, 1] {
                let got = attention_in_steps(&q, &k, &v, 0.3, bias, limit).unwrap();
                assert_eq!(got.dims(), whole.dims());
                assert!(max_abs_diff(&got, &whole) < 1e-6, "limit {limit}");
            }
        }
    }
}
