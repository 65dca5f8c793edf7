//! Multi-head attention rows on the CPU, and the additive bias they read.
//!
//! Attention runs one task per (batch row, head, block of up to 128 queries), so a long
//! sequence (Whisper's 1500 frames) is spread over both threads and its score block
//! stays in cache; softmax normalisation is applied to the small output block instead
//! of the score rows. Heads are read from side-by-side projections with strides, and
//! results written where the output projection reads them: no head split or merge
//! copies.

use candle_core::DType;
use rayon::prelude::*;

use super::{exp_sum, gemm_into, sum, Dst, MASKED};
use crate::error::{ce, MlmfError, Result};

/// An additive attention bias `[Bb, Hb, Qb, Tk]`, each of `Bb`, `Hb`, `Qb` either 1
/// (broadcast) or the full size; batch rows repeat every `period` rows (windows of
/// several images share one bias per window position).
pub(crate) struct Bias {
    data: Vec<f32>,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
    period: usize,
}

impl Bias {
    pub(crate) fn from_tensor(
        bias: &Option<candle_core::Tensor>,
        b: usize,
        heads: usize,
        t: usize,
    ) -> Result<Option<Self>> {
        let Some(bias) = bias else { return Ok(None) };
        let f = ce("attention bias");
        let dims = bias.dims().to_vec();
        let [bb, hb, qb, tk] = dims[..] else {
            return Err(MlmfError::Internal(format!(
                "attention bias: expected [B, H, Tq, Tk], got {dims:?}"
            )));
        };
        let fits = |n: usize, full: usize| n == 1 || n == full;
        if !fits(bb, b) || !fits(hb, heads) || !fits(qb, t) || tk != t {
            return Err(MlmfError::Internal(format!(
                "attention bias {dims:?} does not broadcast to [{b}, {heads}, {t}, {t}]"
            )));
        }
        let data = bias
            .to_dtype(DType::F32)
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(f)?;
        let stride = |n: usize, inner: usize| if n == 1 { 0 } else { inner };
        Ok(Some(Self {
            data,
            batch_stride: stride(bb, hb * qb * tk),
            head_stride: stride(hb, qb * tk),
            row_stride: stride(qb, tk),
            period: usize::MAX,
        }))
    }

    /// A per-window bias `[windows, heads, t, t]`, repeated for every image of a batch
    /// of `images x windows` rows.
    pub(crate) fn per_window(data: Vec<f32>, windows: usize, heads: usize, t: usize) -> Self {
        debug_assert_eq!(data.len(), windows * heads * t * t);
        Self {
            data,
            batch_stride: heads * t * t,
            head_stride: t * t,
            row_stride: t,
            period: windows.max(1),
        }
    }

    pub(crate) fn row(&self, batch: usize, head: usize, query: usize, t: usize) -> &[f32] {
        let batch = batch % self.period;
        let at = batch * self.batch_stride + head * self.head_stride + query * self.row_stride;
        &self.data[at..at + t]
    }
}

thread_local! {
    /// Score rows of the attention task running on this thread, kept between tasks so
    /// that long sequences do not fault in fresh pages for every block.
    pub(crate) static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One attention task's operands: `nq` query rows and `tk` key/value rows of one head,
/// each a `dh`-wide strided view, and where its output rows go.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub(crate) q: *const f32,
    pub(crate) q_rs: usize,
    pub(crate) k: *const f32,
    pub(crate) v: *const f32,
    pub(crate) kv_rs: usize,
    pub(crate) out: *mut f32,
    pub(crate) out_rs: usize,
    pub(crate) nq: usize,
    pub(crate) tk: usize,
    pub(crate) dh: usize,
}

/// `out = softmax(scale * q k^T + bias) v` for one task. `bias(i)` is query row `i`'s
/// additive bias; with `keys` (0/1 per key) masked keys get exactly 0 and a row with
/// no key gets 0. With `weights`, the probabilities are written there (`nq x tk`).
///
/// # Safety
/// The views in `r` must be valid for their extents; `out` (and `weights`) must not be
/// written by another task at the same time.
pub(crate) unsafe fn attend_rows<'b>(
    r: Rows,
    scale: f32,
    bias: impl Fn(usize) -> Option<&'b [f32]>,
    keys: Option<&[f32]>,
    scores: &mut [f32],
    weights: Option<*mut f32>,
) {
    let Rows { nq, tk, dh, .. } = r;
    let mut inv = [0f32; 128];
    // scores = scale * q k^T: rhs(kk, j) = k[j, kk].
    gemm_into(
        nq,
        tk,
        dh,
        scores.as_mut_ptr(),
        tk,
        false,
        r.q,
        r.q_rs,
        1,
        r.k,
        1,
        r.kv_rs,
        scale,
    );
    // Unnormalised softmax numerators; each row's 1 / sum scales its output row.
    for (i, row) in scores[..nq * tk].chunks_exact_mut(tk).enumerate() {
        if let Some(b) = bias(i) {
            for (s, b) in row.iter_mut().zip(b) {
                *s += b;
            }
        }
        let total = match keys {
            None => exp_sum(row),
            Some(keys) => {
                exp_sum(row);
                for (s, m) in row.iter_mut().zip(keys) {
                    *s *= m;
                }
                sum(row)
            }
        };
        inv[i] = if total > 0.0 { 1.0 / total } else { 0.0 };
        if let Some(w) = weights {
            let dst = std::slice::from_raw_parts_mut(w.add(i * tk), tk);
            for (d, s) in dst.iter_mut().zip(row.iter()) {
                *d = s * inv[i];
            }
        }
    }
    gemm_into(
        nq,
        dh,
        tk,
        r.out,
        r.out_rs,
        false,
        scores.as_ptr(),
        tk,
        1,
        r.v,
        r.kv_rs,
        1,
        1.0,
    );
    for (i, &f) in inv[..nq].iter().enumerate() {
        std::slice::from_raw_parts_mut(r.out.add(i * r.out_rs), dh)
            .iter_mut()
            .for_each(|x| *x *= f);
    }
}

/// One self-attention task: queries `q0..q0 + nq` of batch row `bi`, head `h`.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    qkv: &[f32],
    bi: usize,
    h: usize,
    q0: usize,
    nq: usize,
    t: usize,
    d: usize,
    dh: usize,
    scale: f32,
    bias: Option<&Bias>,
    out: Dst,
    scores: &mut [f32],
) {
    let rs = 3 * d;
    // SAFETY: q/k/v are read inside `qkv` ([B*T, 3D]); the task writes the rows
    // q0..q0+nq of batch row bi, columns of head h, of `ctx`: disjoint per task.
    unsafe {
        let base = qkv.as_ptr().add(bi * t * rs);
        let rows = Rows {
            q: base.add(q0 * rs + h * dh),
            q_rs: rs,
            k: base.add(d + h * dh),
            v: base.add(2 * d + h * dh),
            kv_rs: rs,
            out: out.ptr().add((bi * t + q0) * d + h * dh),
            out_rs: d,
            nq,
            tk: t,
            dh,
        };
        let row_bias = |i: usize| bias.map(|b| b.row(bi, h, q0 + i, t));
        attend_rows(rows, scale, row_bias, None, scores, None);
    }
}

/// Cross-attention of `q` `[B*Tq, H*dh]` over `kv` `[B*Tk, 2*Hkv*dh]` (keys, then
/// values; query head `h` reads kv head `h / (H / Hkv)`) into `ctx` `[B*Tq, H*dh]`;
/// `keys` `[B*Tk]` 0/1 masks keys; `weights` `[B, H, Tq, Tk]` receives the
/// probabilities when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_attention(
    q: &[f32],
    kv: &[f32],
    (b, tq, tk): (usize, usize, usize),
    (heads, kv_heads, dh): (usize, usize, usize),
    scale: f32,
    keys: Option<&[f32]>,
    ctx: &mut [f32],
    weights: Option<&mut [f32]>,
) {
    let (qw, kw) = (heads * dh, kv_heads * dh);
    let kv_rs = 2 * kw;
    let group = heads / kv_heads;
    assert!(q.len() >= b * tq * qw && kv.len() >= b * tk * kv_rs);
    assert!(ctx.len() >= b * tq * qw);
    assert!(weights
        .as_ref()
        .is_none_or(|w| w.len() >= b * heads * tq * tk));
    assert!(keys.is_none_or(|m| m.len() >= b * tk));
    // Key-padding bias per batch row, shared by every head and query.
    let bias: Option<Vec<f32>> = keys.map(|m| {
        m.iter()
            .map(|&x| if x != 0.0 { 0.0 } else { MASKED })
            .collect()
    });
    let block = tq.min(128);
    let blocks = tq.div_ceil(block);
    let out = Dst(ctx.as_mut_ptr());
    let wout = weights.map(|w| Dst(w.as_mut_ptr()));
    (0..b * heads * blocks).into_par_iter().for_each(|task| {
        let (bh, qblk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / heads, bh % heads);
        let (q0, kvh) = (qblk * block, h / group);
        let nq = block.min(tq - q0);
        SCRATCH.with(|cell| {
            let mut scores = cell.borrow_mut();
            if scores.len() < nq * tk {
                scores.resize(nq * tk, 0.0);
            }
            // SAFETY: reads stay inside q/k/v (asserted sizes); the task writes rows
            // q0..q0+nq of batch row bi, head h, of ctx and weights: disjoint per task.
            unsafe {
                let rows = Rows {
                    q: q.as_ptr().add((bi * tq + q0) * qw + h * dh),
                    q_rs: qw,
                    k: kv.as_ptr().add(bi * tk * kv_rs + kvh * dh),
                    v: kv.as_ptr().add(bi * tk * kv_rs + kw + kvh * dh),
                    kv_rs,
                    out: out.ptr().add((bi * tq + q0) * qw + h * dh),
                    out_rs: qw,
                    nq,
                    tk,
                    dh,
                };
                let row_bias = |_: usize| bias.as_deref().map(|m| &m[bi * tk..(bi + 1) * tk]);
                let key_row = keys.map(|m| &m[bi * tk..(bi + 1) * tk]);
                let w = wout.map(|w| w.ptr().add(((bi * heads + h) * tq + q0) * tk));
                attend_rows(rows, scale, row_bias, key_row, &mut scores, w);
            }
        });
    });
}

/// Multi-head attention over the `[B*T, 3D]` projections `qkv` (queries, keys, values
/// side by side, heads contiguous inside each) into `ctx` `[B*T, D]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    qkv: &[f32],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
    scale: f32,
    bias: Option<&Bias>,
    ctx: &mut [f32],
) {
    let dh = d / heads;
    // Queries per task: at most 128 (Whisper's 1500 frames: 12 blocks per head). Each
    // block repacks the head's keys and values, so smaller blocks cost more packing;
    // 32 and 64 measured slower than 128 on Whisper-base.
    let block = t.min(128);
    let blocks = t.div_ceil(block);
    let out = Dst(ctx.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each(|task| {
        let (bh, qblk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / heads, bh % heads);
        let q0 = qblk * block;
        let nq = block.min(t - q0);
        SCRATCH.with(|cell| {
            let mut scores = cell.borrow_mut();
            if scores.len() < nq * t {
                scores.resize(nq * t, 0.0);
            }
            attend_block(
                qkv,
                bi,
                h,
                q0,
                nq,
                t,
                d,
                dh,
                scale,
                bias,
                out,
                &mut scores[..nq * t],
            );
        });
    });
}
