//! Multi-head attention rows on the CPU, and the additive bias they read.
//!
//! Attention runs one task per (batch row, head, block of up to 128 queries), so a long
//! sequence (Whisper's 1500 frames) is spread over both threads and its score block
//! stays in cache; softmax normalisation is applied to the small output block instead
//! of the score rows. Heads are read from side-by-side projections with strides, and
//! results written where the output projection reads them: no head split or merge
//! copies. Next to weights that multiply on the BF16 tile ([`bf16_products`]), each
//! head's keys and values are packed for that tile once per call ([`KvPanels`]) and
//! both products run on it; elsewhere they are the `gemm` crate's float32 kernels.

use candle_core::DType;
use rayon::prelude::*;

use super::btile::{self, BPanels};
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

/// One head's keys and values packed for the BF16 tile ([`super::btile`]): `K^T`
/// (`[dh, tk]`, its columns padded to whole panels) and `V` (`[tk, dh]`). Packed once
/// per head and call, then read by every block of queries.
pub(crate) struct KvPanels {
    kt: BPanels,
    v: BPanels,
    /// `tk` rounded up to whole panels: the score rows' stride.
    ld: usize,
}

impl KvPanels {
    /// Bytes that [`KvPanels::pack`] holds for `tk` keys and values `dh` wide: `K^T`
    /// with its columns padded to whole panels, and `V` in pairs of rows, two bytes a
    /// value.
    fn bytes(tk: usize, dh: usize) -> usize {
        (dh * tk.next_multiple_of(btile::NR) + tk.next_multiple_of(2) * dh) * 2
    }

    /// Packs `tk` keys and values (`dh` wide, row stride `kv_rs`); `None` when `dh`
    /// is not whole panels.
    ///
    /// # Safety
    /// `k` and `v` must address `tk` rows of `dh` values with row stride `kv_rs`.
    pub(crate) unsafe fn pack(
        k: *const f32,
        v: *const f32,
        kv_rs: usize,
        tk: usize,
        dh: usize,
    ) -> Option<Self> {
        if !dh.is_multiple_of(btile::NR) || dh == 0 || tk == 0 {
            return None;
        }
        let ld = tk.next_multiple_of(btile::NR);
        let kt = BPanels::pack_rows_as_columns(k, kv_rs, tk, dh, ld);
        let v = BPanels::pack_rows(v, kv_rs, tk, dh);
        Some(Self { kt, v, ld })
    }
}

/// Whether attention next to the weight `w` multiplies in bfloat16 (queries, keys,
/// values and probabilities rounded; sums, softmax and output float32): next to
/// bfloat16 weights packed for the BF16 tile, as the linear maps around it do, and next
/// to int8 weights loaded where the tile was [`btile::chosen`] (their own products are
/// coarser than bfloat16's).
pub(crate) fn bf16_products(w: super::WeightRef<'_>) -> bool {
    match w {
        super::WeightRef::Panel(p) => p.bf16_products(),
        super::WeightRef::Int8(m) => m.bf16_attention(),
        _ => false,
    }
}

/// `out = softmax(scale * q k^T + bias) v` for one task. `bias(i)` is query row `i`'s
/// additive bias; with `keys` (0/1 per key) masked keys get exactly 0 and a row with
/// no key gets 0. With `weights`, the probabilities are written there (`nq x tk`).
/// With `kv`, the two products run on the BF16 tile from the head's packed keys and
/// values (and `scores` holds rows `kv.ld` long).
///
/// # Safety
/// The views in `r` must be valid for their extents; `out` (and `weights`) must not be
/// written by another task at the same time; `kv` must be packed from `r`'s keys and
/// values on a CPU with the BF16 tile.
pub(crate) unsafe fn attend_rows<'b>(
    r: Rows,
    scale: f32,
    bias: impl Fn(usize) -> Option<&'b [f32]>,
    keys: Option<&[f32]>,
    scores: &mut [f32],
    weights: Option<*mut f32>,
    kv: Option<&KvPanels>,
) {
    let Rows { nq, tk, dh, .. } = r;
    let mut inv = [0f32; 128];
    let ld = kv.map_or(tk, |p| p.ld);
    match kv {
        // scores = q k^T, then scaled row by row below.
        Some(p) => btile::product(
            &p.kt,
            nq,
            (0, dh),
            0..ld,
            scores.as_mut_ptr(),
            ld,
            false,
            r.q,
            r.q_rs,
        ),
        // scores = scale * q k^T: rhs(kk, j) = k[j, kk].
        None => gemm_into(
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
        ),
    }
    // Unnormalised softmax numerators; each row's 1 / sum scales its output row.
    for (i, row) in scores[..nq * ld].chunks_exact_mut(ld).enumerate() {
        let row = &mut row[..tk];
        if kv.is_some() {
            row.iter_mut().for_each(|s| *s *= scale);
        }
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
    match kv {
        Some(p) => btile::product(
            &p.v,
            nq,
            (0, tk),
            0..dh,
            r.out,
            r.out_rs,
            false,
            scores.as_ptr(),
            ld,
        ),
        None => gemm_into(
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
        ),
    }
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
    kv: Option<&KvPanels>,
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
        attend_rows(rows, scale, row_bias, None, scores, None, kv);
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
                attend_rows(rows, scale, row_bias, key_row, &mut scores, w, None);
            }
        });
    });
}

/// The fewest keys for which attention runs on the BF16 tile. Below, packing each
/// head's keys and values, padding the keys to whole panels and the separate scaling
/// pass cost about what the faster products save: `cargo bench --bench attention`
/// measured 0.8-1.1x float32's speed at CLIP's 50 tokens, about 1x at 77, and
/// 1.1-1.7x from 100 keys up (docs/encoders.md, "Precision"); float32 is also the more
/// accurate there.
pub(crate) const MIN_TILE_KEYS: usize = 96;

/// The most packed keys and values one call of [`attention`] holds at once (in tests,
/// little enough that a batch row or two fills it, so the passes are tested).
#[cfg(not(test))]
const PACKED_BYTES: usize = 32 << 20;
#[cfg(test)]
const PACKED_BYTES: usize = 8 << 10;

/// Multi-head attention over the `[B*T, 3D]` projections `qkv` (queries, keys, values
/// side by side, heads contiguous inside each) into `ctx` `[B*T, D]`. With `bf16`
/// (the layer's weights multiply on the BF16 tile: [`bf16_products`]) and at least
/// [`MIN_TILE_KEYS`] keys, each head's keys and values are packed for that tile once,
/// and both products run on it.
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
    bf16: bool,
) {
    let tile = bf16 && t >= MIN_TILE_KEYS;
    attention_on(qkv, (b, t, d, heads), scale, bias, ctx, tile);
}

/// [`attention`], both products on the BF16 tile when `tile` (and the CPU has it),
/// whatever the key count.
pub(crate) fn attention_on(
    qkv: &[f32],
    (b, t, d, heads): (usize, usize, usize, usize),
    scale: f32,
    bias: Option<&Bias>,
    ctx: &mut [f32],
    tile: bool,
) {
    let dh = d / heads;
    let rs = 3 * d;
    assert!(qkv.len() >= b * t * rs && ctx.len() >= b * t * d);
    let tile = tile && btile::supported();
    // On the tile, batch rows go in passes that each pack their keys and values first,
    // holding at most PACKED_BYTES of them (Whisper at batch 256 would hold 0.8 GB).
    let packed_row = heads * KvPanels::bytes(t, dh);
    let pass = if tile {
        (PACKED_BYTES / packed_row.max(1)).max(1)
    } else {
        b.max(1)
    };
    // Queries per task: at most 128 (Whisper's 1500 frames: 12 blocks per head). Each
    // block repacks the head's keys and values, so smaller blocks cost more packing;
    // 32 and 64 measured slower than 128 on Whisper-base.
    let block = t.min(128);
    let blocks = t.div_ceil(block);
    let out = Dst(ctx.as_mut_ptr());
    for b0 in (0..b).step_by(pass) {
        let rows = pass.min(b - b0);
        let packed: Option<Vec<KvPanels>> = tile
            .then(|| {
                (0..rows * heads)
                    .into_par_iter()
                    .map(|bh| {
                        let (bi, h) = (b0 + bh / heads, bh % heads);
                        // SAFETY: batch row bi's keys and values, head h, inside `qkv`
                        // (asserted above).
                        unsafe {
                            let base = qkv.as_ptr().add(bi * t * rs + h * dh);
                            KvPanels::pack(base.add(d), base.add(2 * d), rs, t, dh)
                        }
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        let ld = packed.as_ref().map_or(t, |p| p[0].ld);
        (0..rows * heads * blocks).into_par_iter().for_each(|task| {
            let (bh, qblk) = (task / blocks, task % blocks);
            let (bi, h) = (b0 + bh / heads, bh % heads);
            let q0 = qblk * block;
            let nq = block.min(t - q0);
            SCRATCH.with(|cell| {
                let mut scores = cell.borrow_mut();
                if scores.len() < nq * ld {
                    scores.resize(nq * ld, 0.0);
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
                    &mut scores[..nq * ld],
                    packed.as_ref().map(|p| &p[bh]),
                );
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values as values;
    use super::*;
    use half::bf16;

    /// The BF16 path against the attention of the rounded queries, keys, values and
    /// probabilities worked out in float64 (softmax sums of the unrounded
    /// probabilities, as the kernel normalises); and against float32 within bfloat16's
    /// precision. Ragged key counts (padded score rows), two blocks of queries, a bias.
    #[test]
    fn bf16_attention_equals_the_attention_of_the_rounded_values() {
        if !btile::supported() {
            return;
        }
        let r = |v: f32| f64::from(bf16::from_f32(v).to_f32());
        for &(b, t, heads, dh) in &[
            (2, 37, 2, 16),
            (1, 150, 2, 32),
            (1, 16, 1, 64),
            (3, 100, 2, 16),
        ] {
            let d = heads * dh;
            let qkv = values(b * t * 3 * d, t, 1.5);
            let bias_data = values(heads * t * t, 7, 0.5);
            let bias = Bias::per_window(bias_data.clone(), 1, heads, t);
            let scale = 1.0 / (dh as f32).sqrt();
            let mut got = vec![0f32; b * t * d];
            attention_on(&qkv, (b, t, d, heads), scale, Some(&bias), &mut got, true);
            let mut f32_out = vec![0f32; b * t * d];
            attention(
                &qkv,
                b,
                t,
                d,
                heads,
                scale,
                Some(&bias),
                &mut f32_out,
                false,
            );
            // Below the key count the tile pays off at, bfloat16 layers run float32.
            let mut below = vec![0f32; b * t * d];
            attention(&qkv, b, t, d, heads, scale, Some(&bias), &mut below, true);
            assert_eq!(below == f32_out, t < MIN_TILE_KEYS, "{t} keys");
            let at = |bi: usize, row: usize, col: usize| qkv[(bi * t + row) * 3 * d + col];
            let mut worst_vs_f32 = 0f32;
            for bi in 0..b {
                for h in 0..heads {
                    for i in 0..t {
                        let s: Vec<f64> = (0..t)
                            .map(|j| {
                                let dot: f64 = (0..dh)
                                    .map(|c| {
                                        r(at(bi, i, h * dh + c)) * r(at(bi, j, d + h * dh + c))
                                    })
                                    .sum();
                                dot * f64::from(scale) + f64::from(bias_data[(h * t + i) * t + j])
                            })
                            .collect();
                        let m = s.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                        let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                        let total: f64 = p.iter().sum();
                        for c in 0..dh {
                            let num: f64 = (0..t)
                                .map(|j| r(p[j] as f32) * r(at(bi, j, 2 * d + h * dh + c)))
                                .sum();
                            let want = num / total;
                            let k = (bi * t + i) * d + h * dh + c;
                            let g = f64::from(got[k]);
                            assert!(
                                (g - want).abs() <= 2e-3,
                                "b{b} t{t} h{heads} dh{dh} ({bi}, {h}, {i}, {c}): {g} vs {want}"
                            );
                            worst_vs_f32 = worst_vs_f32.max((got[k] - f32_out[k]).abs());
                        }
                    }
                }
            }
            // Bfloat16 moves the outputs, by about its precision and no more.
            assert!(worst_vs_f32 > 1e-5 && worst_vs_f32 < 5e-2, "{worst_vs_f32}");
        }
    }
}
