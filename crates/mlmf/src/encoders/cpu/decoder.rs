//! Qwen3's decoder layers on the float32 CPU path ([`crate::encoders::qwen3`]).
//!
//! The same arithmetic as the candle ops of `Qwen3::layer`, with the habits of the
//! encoder stack above: one `[M, Hq + 2 Hkv]`-wide projection for queries, keys and
//! values, QK-norm and rotary positions applied in place there, attention reading
//! its heads with strides (a key/value head is shared by its group of query heads,
//! never copied), residuals accumulated straight into the hidden state, the gate and
//! up projections as one product followed by SwiGLU in one pass.
//!
//! Attention is causal: a block of queries `q0..q0 + n` reads keys `0..q0 + n` only,
//! so half of the score products are never computed; inside the block later keys and
//! padding keys get the usual additive mask. Rows whose keys are all masked (query
//! positions inside left padding) average their keys uniformly, as the candle path
//! does; no real row depends on them.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::encoders::layers::{ce, Activation, Linear, MASKED};
use crate::error::{MlmfError, Result};
use crate::kernels::{
    attend_rows, is_plain_f32, linear, sum_sq_dev, with_slices, Dst, Lin, Rows, WeightRef, SCRATCH,
};

/// One decoder layer's tensors: the three RMSNorm weights, QK-norm weights and the
/// linear maps.
pub(crate) struct DecoderLayer<'a> {
    pub input_norm: &'a Tensor,
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub o: &'a Linear,
    pub q_norm: &'a Tensor,
    pub k_norm: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub gate: &'a Linear,
    pub up: &'a Linear,
    pub down: &'a Linear,
}

/// The attention geometry and the norms' epsilon.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecoderShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
}

/// A layer's weights as slices.
struct View<'a> {
    input_norm: &'a [f32],
    qkv: [Lin<'a>; 3],
    o: Lin<'a>,
    q_norm: &'a [f32],
    k_norm: &'a [f32],
    post_norm: &'a [f32],
    gate_up: [Lin<'a>; 2],
    down: Lin<'a>,
}

/// `x / sqrt(mean(x²) + eps) * w` of each `d`-wide row of `x` into `out`.
fn rms_norm(x: &[f32], d: usize, w: &[f32], eps: f32, out: &mut [f32]) {
    let rows = |out: &mut [f32], x: &[f32]| {
        for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let rstd = 1.0 / (sum_sq_dev(r, 0.0) / d as f32 + eps).sqrt();
            for ((o, v), w) in o.iter_mut().zip(r).zip(w) {
                *o = w * (v * rstd);
            }
        }
    };
    let per_task = (16384 / d).max(1) * d;
    out.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .for_each(|(out, x)| rows(out, x));
}

/// RMSNorm over one head `x` (`hd` wide) in place, then the rotary rotation of
/// position `pos` (rotate-half layout: `x_i cos - x_{i+h} sin`, `x_{i+h} cos + x_i
/// sin`, with `cos`/`sin` `[T, hd / 2]`).
#[inline]
fn norm_rope(x: &mut [f32], w: &[f32], eps: f32, cos: &[f32], sin: &[f32]) {
    let hd = x.len();
    let rstd = 1.0 / (sum_sq_dev(x, 0.0) / hd as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(w) {
        *v = w * (*v * rstd);
    }
    let half = hd / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

impl<'a> DecoderLayer<'a> {
    fn linears(&self) -> [&'a Linear; 7] {
        [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ]
    }

    fn norms(&self) -> [&'a Tensor; 4] {
        [self.input_norm, self.q_norm, self.k_norm, self.post_norm]
    }
}

/// Runs Qwen3 decoder `layers` on `x` `[B, T, D]` when it and every weight are
/// float32 CPU tensors (`None` otherwise: the candle path runs then). `keys` `[B * T]`
/// is 1 for real tokens and 0 for padding; `cos` and `sin` are `[T, head_dim / 2]`.
pub(crate) fn run(
    x: &Tensor,
    layers: &[DecoderLayer<'_>],
    s: DecoderShape,
    keys: &[u8],
    (cos, sin): (&[f32], &[f32]),
) -> Result<Option<Tensor>> {
    if layers.is_empty()
        || !is_plain_f32(x)
        || !layers.iter().all(|l| {
            l.linears().iter().all(|lin| lin.runs_here())
                && l.norms().iter().all(|t| is_plain_f32(t))
        })
    {
        return Ok(None);
    }
    let f = ce("qwen3 layers");
    let (b, t, d) = x.dims3().map_err(&f)?;
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
    let width = qw + 2 * kw;
    let m = b * t;
    if keys.len() != m || cos.len() != t * half || sin.len() != t * half {
        return Err(MlmfError::Internal(
            "qwen3 layers: mask or rotary table size".into(),
        ));
    }
    let inter = layers[0].gate.out_dim()?;
    let mut x: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let mut h = vec![0f32; m * d];
    let mut qkv = vec![0f32; m * width];
    let mut ctx = vec![0f32; m * qw];
    let mut gu = vec![0f32; m * 2 * inter];
    let mut u = vec![0f32; m * inter];
    // Key-padding bias per token.
    let pad: Vec<f32> = keys
        .iter()
        .map(|&k| if k != 0 { 0.0 } else { MASKED })
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    for layer in layers {
        let tensors: Vec<Option<&Tensor>> = layer
            .linears()
            .iter()
            .flat_map(|l| l.tensors())
            .chain(layer.norms().into_iter().map(Some))
            .collect();
        with_slices(&tensors, |slices| -> Result<()> {
            let v = view(layer.linears(), slices)
                .ok_or_else(|| MlmfError::Internal("qwen3 layer weights".into()))?;
            let li = v.down.w.len() / d;
            if li != inter {
                return Err(MlmfError::Internal(
                    "qwen3 layers: intermediate sizes differ".into(),
                ));
            }
            // h = rms(x); [q | k | v] = h [Wq | Wk | Wv]
            rms_norm(&x, d, v.input_norm, s.eps, &mut h);
            linear(&h, m, d, &v.qkv, &mut qkv, width, false, None);
            // QK-norm and rotary positions, per row and head, in place.
            qkv.par_chunks_mut(width).enumerate().for_each(|(row, r)| {
                let pos = row % t;
                let (c, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (q, k) = r.split_at_mut(qw);
                for head in q.chunks_exact_mut(hd) {
                    norm_rope(head, v.q_norm, s.eps, c, sn);
                }
                for head in k[..kw].chunks_exact_mut(hd) {
                    norm_rope(head, v.k_norm, s.eps, c, sn);
                }
            });
            causal_attention(&qkv, (b, t), s, scale, &pad, &mut ctx);
            // x += ctx Wo; h = rms(x); x += down(silu(h Wg) * (h Wu))
            linear(&ctx, m, qw, &[v.o], &mut x, d, true, None);
            rms_norm(&x, d, v.post_norm, s.eps, &mut h);
            linear(&h, m, d, &v.gate_up, &mut gu, 2 * inter, false, None);
            u.par_chunks_mut(inter)
                .zip(gu.par_chunks(2 * inter))
                .for_each(|(u, gu)| {
                    let (g, up) = gu.split_at(inter);
                    for ((u, g), up) in u.iter_mut().zip(g).zip(up) {
                        *u = Activation::Silu.apply(*g) * up;
                    }
                });
            linear(&u, m, inter, &[v.down], &mut x, d, true, None);
            Ok(())
        })?;
    }
    Tensor::from_vec(x, (b, t, d), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// The slices of [`run`]'s per-layer tensor list: q, k, v, o, gate, up, down (weight,
/// bias each), then the input, q, k and post norms.
fn view<'g>(lins: [&'g Linear; 7], s: &[Option<WeightRef<'g>>]) -> Option<View<'g>> {
    let lin = |i: usize| lins[i].lin(s[2 * i], s[2 * i + 1]);
    Some(View {
        qkv: [lin(0)?, lin(1)?, lin(2)?],
        o: lin(3)?,
        gate_up: [lin(4)?, lin(5)?],
        down: lin(6)?,
        input_norm: s[14]?.f32()?,
        q_norm: s[15]?.f32()?,
        k_norm: s[16]?.f32()?,
        post_norm: s[17]?.f32()?,
    })
}

/// Causal grouped-query attention over `qkv` `[B*T, Hq*hd + 2*Hkv*hd]` into `ctx`
/// `[B*T, Hq*hd]`: one task per (batch row, query head, block of up to 128 queries).
fn causal_attention(
    qkv: &[f32],
    (b, t): (usize, usize),
    s: DecoderShape,
    scale: f32,
    pad: &[f32],
    ctx: &mut [f32],
) {
    let hd = s.head_dim;
    let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
    let width = qw + 2 * kw;
    let group = s.heads / s.kv_heads;
    assert!(qkv.len() >= b * t * width && ctx.len() >= b * t * qw && pad.len() >= b * t);
    let block = t.min(128);
    let blocks = t.div_ceil(block);
    let out = Dst(ctx.as_mut_ptr());
    (0..b * s.heads * blocks).into_par_iter().for_each(|task| {
        let (bh, qblk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / s.heads, bh % s.heads);
        let q0 = qblk * block;
        let nq = block.min(t - q0);
        // Keys after the block's last query are masked for all of its rows.
        let tk = q0 + nq;
        let keys = &pad[bi * t..bi * t + tk];
        let bias: Vec<f32> = (0..nq)
            .flat_map(|i| {
                keys.iter()
                    .enumerate()
                    .map(move |(j, &p)| if j > q0 + i { p + MASKED } else { p })
            })
            .collect();
        let kvh = h / group;
        SCRATCH.with(|cell| {
            let mut scores = cell.borrow_mut();
            if scores.len() < nq * tk {
                scores.resize(nq * tk, 0.0);
            }
            // SAFETY: reads stay inside `qkv` (asserted size); the task writes rows
            // q0..q0+nq of batch row bi, columns of head h, of ctx: disjoint per task.
            unsafe {
                let base = qkv.as_ptr().add(bi * t * width);
                let rows = Rows {
                    q: base.add(q0 * width + h * hd),
                    q_rs: width,
                    k: base.add(qw + kvh * hd),
                    v: base.add(qw + kw + kvh * hd),
                    kv_rs: width,
                    out: out.ptr().add((bi * t + q0) * qw + h * hd),
                    out_rs: qw,
                    nq,
                    tk,
                    dh: hd,
                };
                let row_bias = |i: usize| Some(&bias[i * tk..(i + 1) * tk]);
                attend_rows(rows, scale, row_bias, None, &mut scores, None, None);
            }
        });
    });
}
