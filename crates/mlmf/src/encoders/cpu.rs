//! The float32 CPU path of the encoder stack.
//!
//! On the CPU in float32 a stack of [`EncoderLayer`]s runs here instead of as a chain
//! of candle ops. The arithmetic is the same; what changes is how much memory it
//! touches and how the two threads are used:
//!
//! - every matrix product is split into one block of output columns per thread, and
//!   its bias, activation or residual is applied to that block right after it is
//!   computed, while it is still in cache (one pass over the output instead of three);
//!   a product of a few long rows is split along its inner dimension instead;
//! - residual connections accumulate straight into the hidden state (`x += h W^T + b`);
//! - the query, key and value projections write side by side into one `[M, 3D]`
//!   buffer, and attention reads its heads from there with strides and writes its
//!   result where the output projection reads it: no head split or merge copies;
//! - attention runs one task per (batch row, head, block of up to 128 queries), so a
//!   long sequence (Whisper's 1500 frames) is spread over both threads and its score
//!   block stays in cache; softmax normalisation is applied to the small output block
//!   instead of the score rows;
//! - float32 weights are stored transposed (`W^T`), read once from the mapped file,
//!   so the kernels consume them in memory order without repacking them per call;
//! - exp, erf and tanh are branch-free polynomials the compiler vectorises.
//!
//! Matrix products use the `gemm` crate's kernels (the ones candle's CPU backend calls)
//! single-threaded inside each task. Buffers are allocated once per stack, not per op,
//! and kept for the next stack run.
//!
//! Layers that are not a plain [`EncoderLayer`] have their own stacks on the same
//! kernels: Qwen3's decoder layers ([`decoder`]), HTSAT's shifted-window blocks
//! ([`window`]), wav2vec 2.0's per-channel norm ([`channel_norm`]), and the packed
//! token-level fusion stacks ([`packed`]).

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::encoders::layers::{ce, Activation, AttnBias, EncoderLayer, LayerNorm, Linear, MASKED};
use crate::error::{MlmfError, Result};

pub(crate) mod channel_norm;
pub(crate) mod decoder;
pub(crate) mod packed;
pub(crate) mod window;

/// A destination shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: every use splits the destination into disjoint regions, one per task.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer (a method, so that closures capture the whole `Dst`, which is
    /// `Send`, rather than its raw-pointer field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `dst = (accumulate ? dst : 0) + scale * lhs · rhs` for an `m x n` destination, with
/// row and column strides (in elements) for each operand.
///
/// # Safety
/// Every pointer must address the whole strided extent of its matrix, and `dst` must
/// not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

// ---------------------------------------------------------------------------------
// Vectorisable elementwise math.

/// `e^x` to about 2 ulp (Cephes' single-precision polynomial); inputs are clamped to
/// the normal range, so very negative arguments give ~1e-38 instead of 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    e * pow2(n)
}

/// `2^n` for a whole `n` in `-126..=128` (what `exp`'s clamp allows), built in the
/// exponent bits. `n` becomes an integer by adding it to `1.5 * 2^23` (whose low
/// mantissa bits then hold `n + 127`) rather than by `as i32`: Rust's saturating
/// float-to-int cast compiles to eight scalar conversions per vector, which made
/// `exp` several times slower than its arithmetic.
#[inline(always)]
fn pow2(n: f32) -> f32 {
    f32::from_bits((n + (12_582_912.0 + 127.0)).to_bits() << 23)
}

/// `erf(x)` as a rational minimax approximation `x P(x^2) / Q(x^2)` on [-4, 4] (erf is
/// 1 to float precision beyond): no exp, one division.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_600_2e-3);
    p = p.mul_add(x2, -1.609_603_4e-2);
    let mut q = -1.456_607_2e-5f32;
    q = q.mul_add(x2, -2.133_740_5e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_473_9e-2);
    x * p / q
}

/// `tanh(x)` through `exp`, to about 1e-7 absolute.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.abs());
    (1.0 - 2.0 / (e + 1.0)).copysign(x)
}

impl Activation {
    /// The activation of one value, as [`Activation::forward`] computes it.
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            Self::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Self::GeluTanh => {
                let inner = 0.797_884_6 * x.mul_add(0.044_715 * x * x, x);
                0.5 * x * (1.0 + tanh(inner))
            }
            Self::QuickGelu => x / (1.0 + exp(-1.702 * x)),
            Self::Relu => x.max(0.0),
            Self::Silu => x / (1.0 + exp(-x)),
        }
    }

    /// The activation over a slice, one monomorphised loop per activation so that each
    /// vectorises.
    fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Self::Gelu => xs.iter_mut().for_each(|v| *v = Self::Gelu.apply(*v)),
            Self::GeluTanh => xs.iter_mut().for_each(|v| *v = Self::GeluTanh.apply(*v)),
            Self::QuickGelu => xs.iter_mut().for_each(|v| *v = Self::QuickGelu.apply(*v)),
            Self::Relu => xs.iter_mut().for_each(|v| *v = Self::Relu.apply(*v)),
            Self::Silu => xs.iter_mut().for_each(|v| *v = Self::Silu.apply(*v)),
        }
    }
}

/// Sum with eight independent accumulators (vectorises; order differs from a serial
/// sum only in rounding).
#[inline]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum((x - c)^2)`, with eight independent accumulators.
#[inline]
pub(crate) fn sum_sq_dev(xs: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - c) * (v - c)).sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += (v - c) * (v - c);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b)` over the shorter of the two, with eight independent accumulators.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `row = exp(row - max(row))` in place; returns the sum of the new values. (Separate
/// passes: each vectorises, a fused loop with eight accumulators did not.)
#[inline]
fn exp_sum(row: &mut [f32]) -> f32 {
    let m = max(row);
    row.iter_mut().for_each(|s| *s = exp(*s - m));
    sum(row)
}

// ---------------------------------------------------------------------------------
// Weights borrowed from candle tensors.

/// The float32 CPU slice of a tensor's storage, when it is one, contiguous.
fn slice<'g>(storage: &'g Storage, layout: &Layout) -> Option<&'g [f32]> {
    if !layout.is_contiguous() {
        return None;
    }
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            v.get(start..start + layout.shape().elem_count())
        }
        _ => None,
    }
}

/// Runs `f` on the float32 CPU data of `tensors` (`None` for a missing tensor or one
/// that is not plain float32 CPU memory), borrowed for the call.
fn with_slices<R>(tensors: &[Option<&Tensor>], f: impl FnOnce(&[Option<&[f32]>]) -> R) -> R {
    let guards: Vec<Option<_>> = tensors
        .iter()
        .map(|t| t.map(|t| t.storage_and_layout()))
        .collect();
    let slices: Vec<Option<&[f32]>> = guards
        .iter()
        .map(|g| g.as_ref().and_then(|(s, l)| slice(s, l)))
        .collect();
    f(&slices)
}

fn is_plain_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && {
        let (storage, layout) = t.storage_and_layout();
        slice(&storage, layout).is_some()
    }
}

impl Linear {
    fn tensors(&self) -> [Option<&Tensor>; 2] {
        [Some(&self.weight), self.bias.as_ref()]
    }

    /// Whether this map runs here: `W^T` stored, float32 CPU tensors.
    fn runs_here(&self) -> bool {
        self.transposed && self.tensors().iter().flatten().all(|t| is_plain_f32(t))
    }
}

impl LayerNorm {
    fn tensors(&self) -> [Option<&Tensor>; 2] {
        [Some(&self.weight), Some(&self.bias)]
    }
}

impl EncoderLayer {
    /// Every weight of the layer in a fixed order: q, k, v, o (weight, bias), norm1,
    /// norm2, fc1, fc2.
    fn tensors(&self) -> [Option<&Tensor>; 16] {
        let a = &self.attn;
        let [qw, qb] = a.q.tensors();
        let [kw, kb] = a.k.tensors();
        let [vw, vb] = a.v.tensors();
        let [ow, ob] = a.o.tensors();
        let [n1w, n1b] = self.norm1.tensors();
        let [n2w, n2b] = self.norm2.tensors();
        let [f1w, f1b] = self.fc1.tensors();
        let [f2w, f2b] = self.fc2.tensors();
        [
            qw, qb, kw, kb, vw, vb, ow, ob, n1w, n1b, n2w, n2b, f1w, f1b, f2w, f2b,
        ]
    }
}

/// One linear map's transposed weight `W^T` (`[k, n]`, row-major) and bias `[n]`.
#[derive(Clone, Copy)]
struct Lin<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
}

/// One layer's weights as slices.
struct LayerView<'a> {
    q: Lin<'a>,
    k: Lin<'a>,
    v: Lin<'a>,
    o: Lin<'a>,
    norm1: (&'a [f32], &'a [f32]),
    norm2: (&'a [f32], &'a [f32]),
    fc1: Lin<'a>,
    fc2: Lin<'a>,
}

fn view<'g>(s: &[Option<&'g [f32]>]) -> Option<LayerView<'g>> {
    let lin = |i: usize| {
        Some(Lin {
            w: s[i]?,
            b: s[i + 1],
        })
    };
    Some(LayerView {
        q: lin(0)?,
        k: lin(2)?,
        v: lin(4)?,
        o: lin(6)?,
        norm1: (s[8]?, s[9]?),
        norm2: (s[10]?, s[11]?),
        fc1: lin(12)?,
        fc2: lin(14)?,
    })
}

// ---------------------------------------------------------------------------------
// Kernels.

/// `dst[:, col..col + n] (+)= act(x W^T + b)` for `x` `[m, k]` and each part's `W^T`
/// `[k, n_i]`; the parts' outputs lie side by side from column 0 of `dst` (row stride
/// `dst_rs`). With `accumulate` the product is added to `dst` (no activation then).
/// No rows (a packed modality with no real token) is nothing to do.
#[allow(clippy::too_many_arguments)]
fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[Lin<'_>],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
) {
    debug_assert!(!(accumulate && act.is_some()));
    if m == 0 {
        return;
    }
    let widths: Vec<usize> = parts.iter().map(|p| p.w.len() / k).collect();
    let total: usize = widths.iter().sum();
    debug_assert!(x.len() >= m * k && dst.len() >= (m.max(1) - 1) * dst_rs + total);
    // One column block per thread (at least 64 columns each); a product with few
    // columns and many rows is split by rows as well.
    let threads = if m * k * total < PARALLEL_MIN_MACS {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    if threads > 1 && m <= SPLIT_K_MAX_ROWS && k >= total {
        let split = SplitK {
            widths: &widths,
            threads,
        };
        linear_split_k(x, m, k, parts, dst, dst_rs, accumulate, act, split);
        return;
    }
    let col_blocks = threads.min(total.div_ceil(64)).max(1);
    let width = total.div_ceil(col_blocks).next_multiple_of(16);
    let row_blocks = if col_blocks < threads && m >= 64 {
        (threads / col_blocks).min(m / 32).max(1)
    } else {
        1
    };
    let height = m.div_ceil(row_blocks);
    // Tasks: (rows, part, columns within the part, destination column).
    let mut tasks = Vec::new();
    for r0 in (0..m).step_by(height.max(1)) {
        let rows = r0..(r0 + height).min(m);
        let mut start = 0;
        while start < total {
            let end = (start + width).min(total);
            // Cut [start, end) at part boundaries.
            let mut col0 = 0;
            for (p, &w) in widths.iter().enumerate() {
                let (a, b) = (start.max(col0), end.min(col0 + w));
                if a < b {
                    tasks.push((rows.clone(), p, (a - col0)..(b - col0), a));
                }
                col0 += w;
            }
            start = end;
        }
    }
    let out = Dst(dst.as_mut_ptr());
    let run =
        |(rows, p, cols, at): &(std::ops::Range<usize>, usize, std::ops::Range<usize>, usize)| {
            let part = parts[*p];
            let (mr, nc) = (rows.len(), cols.len());
            // SAFETY: tasks cover disjoint (row, column) rectangles of `dst`, inside it by
            // the debug assertion above; `x` and the weights are read only.
            unsafe {
                let d = out.ptr().add(rows.start * dst_rs + at);
                gemm_into(
                    mr,
                    nc,
                    k,
                    d,
                    dst_rs,
                    accumulate,
                    x.as_ptr().add(rows.start * k),
                    k,
                    1,
                    part.w.as_ptr().add(cols.start),
                    widths[*p],
                    1,
                    1.0,
                );
                for i in 0..mr {
                    let row = std::slice::from_raw_parts_mut(d.add(i * dst_rs), nc);
                    if let Some(b) = part.b {
                        for (v, b) in row.iter_mut().zip(&b[cols.clone()]) {
                            *v += b;
                        }
                    }
                    if let Some(act) = act {
                        act.apply_slice(row);
                    }
                }
            }
        };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// Below about a million multiply-adds, waking the pool costs more than it saves: a
/// matrix product this small runs on the calling thread.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 20;

/// At most this many rows take [`linear_split_k`] (when the inner dimension is at
/// least the output width): pooled embeddings through a wide projection.
const SPLIT_K_MAX_ROWS: usize = 128;

/// What [`linear`] has worked out for [`linear_split_k`]: each part's output width and
/// the number of tasks.
struct SplitK<'a> {
    widths: &'a [usize],
    threads: usize,
}

/// [`linear`] with the inner dimension split between `split.threads` tasks. A column split
/// makes every task pack the whole of `x`, which for a few long rows (64 x 1664 into
/// 512 columns) costs more than adding up the partial products: here each task packs
/// only its share of `x` and reads only its rows of the weights. The first task
/// writes (or accumulates) into `dst`, the others into zeroed buffers that are then
/// added, followed by the bias and activation.
#[allow(clippy::too_many_arguments)]
fn linear_split_k(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[Lin<'_>],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
    SplitK { widths, threads }: SplitK<'_>,
) {
    let total: usize = widths.iter().sum();
    let chunk = k.div_ceil(threads.max(1));
    let spans: Vec<std::ops::Range<usize>> = (0..k)
        .step_by(chunk.max(1))
        .map(|k0| k0..(k0 + chunk).min(k))
        .collect();
    let mut partial = vec![0f32; spans.len().saturating_sub(1) * m * total];
    let out = Dst(dst.as_mut_ptr());
    let mut bufs = partial.chunks_exact_mut(m * total);
    // (inner span, destination, its row stride, accumulate).
    let jobs: Vec<(std::ops::Range<usize>, Dst, usize, bool)> = spans
        .iter()
        .enumerate()
        .filter_map(|(i, span)| match i {
            0 => Some((span.clone(), out, dst_rs, accumulate)),
            _ => bufs
                .next()
                .map(|b| (span.clone(), Dst(b.as_mut_ptr()), total, false)),
        })
        .collect();
    jobs.par_iter().for_each(|(span, d, rs, acc)| {
        let mut col = 0;
        for (part, &w) in parts.iter().zip(widths) {
            // SAFETY: each job writes its own matrix (`dst` or one `partial` slice),
            // `m x total` with row stride `rs`, in bounds by `linear`'s assertion and
            // the size of `partial`; `x` and the weights are read only, at rows and
            // columns `span` of `x` and rows `span` of `W^T`.
            unsafe {
                gemm_into(
                    m,
                    w,
                    span.len(),
                    d.ptr().add(col),
                    *rs,
                    *acc,
                    x.as_ptr().add(span.start),
                    k,
                    1,
                    part.w.as_ptr().add(span.start * w),
                    w,
                    1,
                    1.0,
                );
            }
            col += w;
        }
    });
    for i in 0..m {
        let row = &mut dst[i * dst_rs..i * dst_rs + total];
        for p in partial.chunks_exact(m * total) {
            for (v, q) in row.iter_mut().zip(&p[i * total..(i + 1) * total]) {
                *v += q;
            }
        }
        let mut col = 0;
        for (part, &w) in parts.iter().zip(widths) {
            if let Some(b) = part.b {
                for (v, b) in row[col..col + w].iter_mut().zip(b) {
                    *v += b;
                }
            }
            col += w;
        }
        if let Some(act) = act {
            act.apply_slice(row);
        }
    }
}

/// Layer norm of each `d`-wide row of `x` into `out`.
fn layer_norm(x: &[f32], d: usize, (w, b): (&[f32], &[f32]), eps: f32, out: &mut [f32]) {
    let rows_per_task = (16384 / d).max(1);
    let rows = |out: &mut [f32], x: &[f32]| {
        for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let mean = sum(r) / d as f32;
            let var = sum_sq_dev(r, mean) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(r).zip(w).zip(b) {
                *o = ((v - mean) * rstd).mul_add(*w, *b);
            }
        }
    };
    // A few rows (pooled embeddings) cost less than waking the pool.
    if x.len() <= 4 * rows_per_task * d {
        rows(out, x);
    } else {
        out.par_chunks_mut(rows_per_task * d)
            .zip(x.par_chunks(rows_per_task * d))
            .for_each(|(out, x)| rows(out, x));
    }
}

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
    fn from_tensor(bias: &AttnBias, b: usize, heads: usize, t: usize) -> Result<Option<Self>> {
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

    fn row(&self, batch: usize, head: usize, query: usize, t: usize) -> &[f32] {
        let batch = batch % self.period;
        let at = batch * self.batch_stride + head * self.head_stride + query * self.row_stride;
        &self.data[at..at + t]
    }
}

thread_local! {
    /// Score rows of the attention task running on this thread, kept between tasks so
    /// that long sequences do not fault in fresh pages for every block.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One attention task's operands: `nq` query rows and `tk` key/value rows of one head,
/// each a `dh`-wide strided view, and where its output rows go.
#[derive(Clone, Copy)]
struct Rows {
    q: *const f32,
    q_rs: usize,
    k: *const f32,
    v: *const f32,
    kv_rs: usize,
    out: *mut f32,
    out_rs: usize,
    nq: usize,
    tk: usize,
    dh: usize,
}

/// `out = softmax(scale * q k^T + bias) v` for one task. `bias(i)` is query row `i`'s
/// additive bias; with `keys` (0/1 per key) masked keys get exactly 0 and a row with
/// no key gets 0. With `weights`, the probabilities are written there (`nq x tk`).
///
/// # Safety
/// The views in `r` must be valid for their extents; `out` (and `weights`) must not be
/// written by another task at the same time.
unsafe fn attend_rows<'b>(
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
fn attention(
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

// ---------------------------------------------------------------------------------
// The stack.

/// Runs `layers` on `x` `[B, T, D]` when it and every weight are float32 CPU tensors;
/// `None` when the model lives elsewhere (the candle path runs then).
pub(crate) fn run_layers(
    layers: &[EncoderLayer],
    x: &Tensor,
    bias: &AttnBias,
) -> Result<Option<Tensor>> {
    if layers.is_empty()
        || !is_plain_f32(x)
        || !layers.iter().all(|l| {
            let a = &l.attn;
            [&a.q, &a.k, &a.v, &a.o, &l.fc1, &l.fc2]
                .iter()
                .all(|lin| lin.runs_here())
                && l.tensors().iter().flatten().all(|t| is_plain_f32(t))
        })
    {
        return Ok(None);
    }
    let f = ce("encoder layers");
    let (b, t, d) = x.dims3().map_err(&f)?;
    let m = b * t;
    let inter = layers[0].fc1.out_dim()?;
    let bias = Bias::from_tensor(bias, b, layers[0].attn.heads, t)?;
    let mut x: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let [mut h, mut qkv, mut ctx, mut u] = stack_buffers([m * d, m * 3 * d, m * d, m * inter]);
    for layer in layers {
        with_slices(&layer.tensors(), |slices| -> Result<()> {
            let w =
                view(slices).ok_or_else(|| MlmfError::Internal("encoder layer weights".into()))?;
            let li = layer.fc1.out_dim()?;
            if li != inter {
                u.resize(m * li, 0.0);
            }
            let heads = layer.attn.heads;
            let scale = layer.attn.scale as f32;
            let (eps1, eps2) = (layer.norm1.eps, layer.norm2.eps);
            let qkv_parts = [w.q, w.k, w.v];
            if layer.pre_norm {
                // x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))
                layer_norm(&x, d, w.norm1, eps1, &mut h);
                linear(&h, m, d, &qkv_parts, &mut qkv, 3 * d, false, None);
                attention(&qkv, b, t, d, heads, scale, bias.as_ref(), &mut ctx);
                linear(&ctx, m, d, &[w.o], &mut x, d, true, None);
                layer_norm(&x, d, w.norm2, eps2, &mut h);
                linear(&h, m, d, &[w.fc1], &mut u, li, false, Some(layer.act));
                linear(&u, m, li, &[w.fc2], &mut x, d, true, None);
            } else {
                // x = ln1(x + attn(x)); x = ln2(x + fc2(act(fc1(x))))
                linear(&x, m, d, &qkv_parts, &mut qkv, 3 * d, false, None);
                attention(&qkv, b, t, d, heads, scale, bias.as_ref(), &mut ctx);
                h.copy_from_slice(&x);
                linear(&ctx, m, d, &[w.o], &mut h, d, true, None);
                layer_norm(&h, d, w.norm1, eps1, &mut x);
                linear(&x, m, d, &[w.fc1], &mut u, li, false, Some(layer.act));
                h.copy_from_slice(&x);
                linear(&u, m, li, &[w.fc2], &mut h, d, true, None);
                layer_norm(&h, d, w.norm2, eps2, &mut x);
            }
            Ok(())
        })?;
    }
    keep_stack_buffers([h, qkv, ctx, u]);
    Tensor::from_vec(x, (b, t, d), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// The work buffers of the last layer stack run, kept for the next (process-wide:
/// calls from Python may run each on a thread of its own).
static STACK: std::sync::Mutex<Option<[Vec<f32>; 4]>> = std::sync::Mutex::new(None);

/// A layer stack's four work buffers (`h`, `qkv`, `ctx`, the MLP's `u`) of `lens`,
/// reused from the previous stack run (the stack puts them back when it is done, up
/// to [`KEEP_BYTES`]; a stack running beside another gets fresh ones). Long inputs need tens of MB (VideoMAE-base: 1568 tokens, 45 MB);
/// fresh allocations that large come from the OS page by page on every call, and the
/// kernel's zeroing of those pages took about 3% of a VideoMAE-base call. Every kernel
/// writes all of a buffer before reading it, so the previous call's values do no harm.
fn stack_buffers(lens: [usize; 4]) -> [Vec<f32>; 4] {
    let mut bufs = STACK
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_else(|| std::array::from_fn(|_| Vec::new()));
    for (buf, n) in bufs.iter_mut().zip(lens) {
        // Shrinking keeps the allocation; growing zero-fills only the new part.
        buf.resize(n, 0.0);
    }
    bufs
}

/// The most buffer memory kept between stack runs (a larger batch frees its buffers
/// as before).
const KEEP_BYTES: usize = 256 << 20;

/// Puts a stack's buffers back for the next run, unless they are large.
fn keep_stack_buffers(bufs: [Vec<f32>; 4]) {
    let bytes: usize = bufs.iter().map(|b| b.capacity() * 4).sum();
    if bytes <= KEEP_BYTES {
        if let Ok(mut s) = STACK.lock() {
            *s = Some(bufs);
        }
    }
}

/// LayerNorm of a float32 CPU `x` `[.., D]` over its last dimension (rows in parallel);
/// `None` when something lives elsewhere.
pub(crate) fn layer_norm_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x) || !is_plain_f32(w) || !is_plain_f32(b) {
        return Ok(None);
    }
    let Some(&d) = x.dims().last() else {
        return Ok(None);
    };
    let mut out = vec![0f32; x.elem_count()];
    {
        let (xg, wg, bg) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            b.storage_and_layout(),
        );
        let (Some(xs), Some(ws), Some(bs)) =
            (slice(&xg.0, xg.1), slice(&wg.0, wg.1), slice(&bg.0, bg.1))
        else {
            return Ok(None);
        };
        if ws.len() != d || bs.len() != d {
            return Ok(None);
        }
        layer_norm(xs, d, (ws, bs), eps, &mut out);
    }
    Tensor::from_vec(out, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("layer norm"))
}

/// `x + fc2(act(fc1(layer_norm(x))))` for float32 CPU tensors (`x` `[.., D]`, the
/// LayerNorm's `(weight, bias, eps)`), with the bias, activation and residual fused into
/// the matrix products; `None` when something lives elsewhere.
pub(crate) fn mlp_residual(
    x: &Tensor,
    (nw, nb, eps): (&Tensor, &Tensor, f32),
    fc1: &Linear,
    fc2: &Linear,
    act: Activation,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x)
        || !is_plain_f32(nw)
        || !is_plain_f32(nb)
        || !fc1.runs_here()
        || !fc2.runs_here()
    {
        return Ok(None);
    }
    let f = ce("mlp");
    let Some(&d) = x.dims().last() else {
        return Ok(None);
    };
    let m = x.elem_count() / d.max(1);
    let hidden = fc1.out_dim()?;
    let mut y: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let mut h = vec![0f32; m * d];
    let mut u = vec![0f32; m * hidden];
    {
        let tensors = [nw, nb];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let (Some(w), Some(b)) = (
            slice(&guards[0].0, guards[0].1),
            slice(&guards[1].0, guards[1].1),
        ) else {
            return Ok(None);
        };
        layer_norm(&y, d, (w, b), eps, &mut h);
        let lins = [fc1, fc2];
        let lg: Vec<_> = lins
            .iter()
            .map(|l| {
                (
                    l.weight.storage_and_layout(),
                    l.bias.as_ref().map(|b| b.storage_and_layout()),
                )
            })
            .collect();
        let mut parts = Vec::with_capacity(2);
        for (wg, bg) in &lg {
            let Some(w) = slice(&wg.0, wg.1) else {
                return Ok(None);
            };
            parts.push(Lin {
                w,
                b: bg.as_ref().and_then(|(s, l)| slice(s, l)),
            });
        }
        linear(&h, m, d, &parts[..1], &mut u, hidden, false, Some(act));
        linear(&u, m, hidden, &parts[1..], &mut y, d, true, None);
    }
    Tensor::from_vec(y, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// `x W^T + b` for a float32 CPU `x` `[.., K]` and linear map; `None` elsewhere.
pub(crate) fn linear_forward(lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
    let Some((out, n)) = project(x, &[lin])? else {
        return Ok(None);
    };
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("linear"))
}

/// Multi-head self-attention of float32 CPU `x` `[B, T, D]` through `q`, `k`, `v`
/// (one product into a side-by-side buffer) with an additive `bias`, before the
/// output projection: `[B, T, D]`. `None` when `x` or a map
/// lives elsewhere (the caller runs the candle ops then). Used by layers that are not
/// a plain [`EncoderLayer`] (windowed attention).
pub(crate) fn self_attention(
    x: &Tensor,
    (q, k, v): (&Linear, &Linear, &Linear),
    heads: usize,
    scale: f64,
    bias: Option<&Bias>,
) -> Result<Option<Tensor>> {
    let Ok((b, t, d)) = x.dims3() else {
        return Ok(None);
    };
    let Some((qkv, n)) = project(x, &[q, k, v])? else {
        return Ok(None);
    };
    if n != 3 * d || heads == 0 || !d.is_multiple_of(heads) {
        return Ok(None);
    }
    let mut ctx = vec![0f32; b * t * d];
    attention(&qkv, b, t, d, heads, scale as f32, bias, &mut ctx);
    Tensor::from_vec(ctx, (b, t, d), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("attention"))
}

/// `x W_i^T + b_i` of a float32 CPU `x` `[.., K]` for several maps at once, side by
/// side in one `[rows, sum of widths]` buffer (one pass of tasks for all of them);
/// returns the buffer and its width, or `None` when `x` or a map lives elsewhere.
pub(crate) fn project(x: &Tensor, lins: &[&Linear]) -> Result<Option<(Vec<f32>, usize)>> {
    if !is_plain_f32(x) || !lins.iter().all(|l| l.runs_here()) {
        return Ok(None);
    }
    let Some(&k) = x.dims().last() else {
        return Ok(None);
    };
    let m = x.elem_count() / k.max(1);
    let n: usize = lins.iter().map(|l| l.out_dim()).sum::<Result<usize>>()?;
    let guards: Vec<_> = lins
        .iter()
        .map(|l| {
            (
                l.weight.storage_and_layout(),
                l.bias.as_ref().map(|b| b.storage_and_layout()),
            )
        })
        .collect();
    let mut parts = Vec::with_capacity(lins.len());
    for (wg, bg) in &guards {
        let Some(w) = slice(&wg.0, wg.1) else {
            return Ok(None);
        };
        parts.push(Lin {
            w,
            b: bg.as_ref().and_then(|(s, l)| slice(s, l)),
        });
    }
    let xg = x.storage_and_layout();
    let Some(xs) = slice(&xg.0, xg.1) else {
        return Ok(None);
    };
    let mut out = vec![0f32; m * n];
    linear(xs, m, k, &parts, &mut out, n, false, None);
    Ok(Some((out, n)))
}

/// How the bias enters [`stacked_linear`].
pub(crate) enum StackBias<'a> {
    None,
    /// `[N]`, added once to every row.
    Shared(&'a Tensor),
    /// `[M, N]`: modality `m`'s bias, scaled like its product.
    PerModality(&'a Tensor),
}

/// `y[b] = sum_m s[b, m] (x_m[b] W_m^T) + bias` as one matrix product: the inputs,
/// each row scaled by `s[b, m]`, side by side (a missing modality's slot is zero) times
/// `lin`, the modalities' `W_m^T` stacked along the input dimension (`[sum D_m, N]`,
/// no bias of its own). `scale` is `[B, M]` row-major (1 everywhere when `None`); a
/// missing modality contributes nothing, its bias included.
/// Returns `[B, N]`; `None` when an input or the map is not a float32 CPU tensor.
pub(crate) fn stacked_linear(
    lin: &Linear,
    x: &[Option<&Tensor>],
    widths: &[usize],
    batch: usize,
    scale: Option<&[f32]>,
    bias: StackBias<'_>,
) -> Result<Option<Tensor>> {
    let bias_t = match bias {
        StackBias::None => None,
        StackBias::Shared(t) | StackBias::PerModality(t) => Some(t),
    };
    if !lin.runs_here()
        || !x.iter().flatten().all(|t| is_plain_f32(t))
        || bias_t.is_some_and(|t| !is_plain_f32(t))
    {
        return Ok(None);
    }
    let k: usize = widths.iter().sum();
    let n = lin.out_dim()?;
    let mods = widths.len();
    if x.len() != mods || scale.is_some_and(|s| s.len() != batch * mods) {
        return Err(MlmfError::Internal("stacked linear: shapes".into()));
    }
    let s = |b: usize, m: usize| scale.map_or(1.0, |s| s[b * mods + m]);
    // The scaled inputs side by side.
    let mut z = vec![0f32; batch * k];
    let mut off = 0;
    for (m, (xm, &d)) in x.iter().zip(widths).enumerate() {
        if let Some(t) = xm {
            let g = t.storage_and_layout();
            let xs = slice(&g.0, g.1)
                .filter(|v| v.len() == batch * d)
                .ok_or_else(|| MlmfError::Internal("stacked linear: input".into()))?;
            for (b, (zr, xr)) in z.chunks_exact_mut(k).zip(xs.chunks_exact(d)).enumerate() {
                let f = s(b, m);
                for (zv, xv) in zr[off..off + d].iter_mut().zip(xr) {
                    *zv = f * xv;
                }
            }
        }
        off += d;
    }
    // The bias term first, then the product accumulates onto it.
    let mut y = vec![0f32; batch * n];
    if let Some(t) = bias_t {
        let g = t.storage_and_layout();
        let bv = slice(&g.0, g.1).ok_or_else(|| MlmfError::Internal("stacked bias".into()))?;
        for (b, row) in y.chunks_exact_mut(n).enumerate() {
            match bias {
                StackBias::PerModality(_) => {
                    for (m, bm) in bv.chunks_exact(n).enumerate() {
                        let f = s(b, m);
                        if x[m].is_some() && f != 0.0 {
                            row.iter_mut().zip(bm).for_each(|(r, v)| *r += f * v);
                        }
                    }
                }
                _ => row.copy_from_slice(&bv[..n]),
            }
        }
    }
    {
        let g = lin.weight.storage_and_layout();
        let w = slice(&g.0, g.1).ok_or_else(|| MlmfError::Internal("stacked weight".into()))?;
        linear(&z, batch, k, &[Lin { w, b: None }], &mut y, n, true, None);
    }
    Tensor::from_vec(y, (batch, n), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("stacked linear"))
}

/// `f` applied in place to chunks of a copy of a float32 CPU tensor, in parallel;
/// `None` elsewhere.
fn elementwise(
    x: &Tensor,
    what: &'static str,
    f: impl Fn(&mut [f32]) + Send + Sync,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x) {
        return Ok(None);
    }
    let err = ce(what);
    let mut v: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&err)?;
    v.par_chunks_mut(16384).for_each(f);
    Tensor::from_vec(v, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(err)
}

/// `tanh(x)` for a float32 CPU tensor (to about 1e-7); `None` elsewhere.
pub(crate) fn tanh_forward(x: &Tensor) -> Result<Option<Tensor>> {
    elementwise(x, "tanh", |c| c.iter_mut().for_each(|v| *v = tanh(*v)))
}

/// `act(x)` for a float32 CPU tensor; `None` elsewhere.
pub(crate) fn activation_forward(act: Activation, x: &Tensor) -> Result<Option<Tensor>> {
    elementwise(x, "activation", |c| act.apply_slice(c))
}

/// `W^T` of a float32 CPU matrix `W` `[r, c]`, contiguous `[c, r]`; `None` for other
/// tensors.
pub(crate) fn transpose(w: &Tensor) -> Result<Option<Tensor>> {
    if !is_plain_f32(w) {
        return Ok(None);
    }
    let f = ce("transpose");
    let (r, c) = w.dims2().map_err(&f)?;
    let (guard, layout) = w.storage_and_layout();
    let Some(src) = slice(&guard, layout) else {
        return Ok(None);
    };
    let out = transpose_with(r, c, |i| src[i]);
    drop(guard);
    Tensor::from_vec(out, (c, r), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// The transpose `[c, r]` of a little-endian float32 matrix `[r, c]` given as bytes
/// (a memory-mapped safetensors view, not necessarily aligned).
pub(crate) fn transpose_le_bytes(bytes: &[u8], r: usize, c: usize) -> Vec<f32> {
    transpose_with(r, c, |i| {
        let b = &bytes[4 * i..4 * i + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    })
}

/// `out[j * r + i] = at(i * c + j)`, tiled, in parallel over output rows.
fn transpose_with(r: usize, c: usize, at: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = Vec::with_capacity(r * c);
    // SAFETY: every element is written below before the vector is read: the chunks
    // cover the whole buffer and each fills its TILE x r block completely.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(r * c)
    };
    if r == 0 || c == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(blk, rows)| {
            let c0 = blk * TILE;
            let nc = rows.len() / r;
            for r0 in (0..r).step_by(TILE) {
                for i in r0..(r0 + TILE).min(r) {
                    for j in 0..nc {
                        rows[j * r + i] = at(i * c + c0 + j);
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_equals_the_integer_exponent() {
        for n in -126..=128i32 {
            let want = f32::from_bits(((n + 127) as u32) << 23);
            assert_eq!(pow2(n as f32).to_bits(), want.to_bits(), "2^{n}");
            assert_eq!(pow2(n as f32), 2f32.powi(n), "2^{n}");
        }
    }

    #[test]
    fn polynomial_math_matches_std() {
        let mut worst = [0f32; 3];
        for i in -4000..=4000 {
            let x = i as f32 * 0.01;
            let e = exp(x);
            worst[0] = worst[0].max(((e - x.exp()) / x.exp()).abs());
            worst[1] = worst[1].max((tanh(x) - x.tanh()).abs());
            // erf against its series / asymptotic value through f64.
            let want = erf_f64(f64::from(x)) as f32;
            worst[2] = worst[2].max((erf(x) - want).abs());
        }
        assert!(worst[0] < 4e-7, "exp relative error {}", worst[0]);
        assert!(worst[1] < 3e-7, "tanh error {}", worst[1]);
        assert!(worst[2] < 3e-7, "erf error {}", worst[2]);
        assert!(exp(-1e30) < 1e-37 && exp(-1e30) >= 0.0);
        assert!(exp(1e30).is_finite());
    }

    /// erf by its Taylor series (|x| < 3) or continued fraction, in f64.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut term, mut total, mut n) = (a, a, 0.0);
            loop {
                n += 1.0;
                term *= -a * a / n;
                let add = term / (2.0 * n + 1.0);
                total += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // Lentz-free continued fraction for erfc, 60 terms.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * (a + f))
        };
        v.copysign(x)
    }

    #[test]
    fn linear_splits_cover_every_column_and_row() {
        // Parts of widths 5 and 70, m = 100 (row split kicks in with few columns).
        let (m, k) = (100, 7);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let w1: Vec<f32> = (0..5 * k).map(|i| (i % 5) as f32 * 0.2 - 0.3).collect();
        let w2: Vec<f32> = (0..70 * k).map(|i| ((i * 7) % 13) as f32 * 0.05).collect();
        let b2: Vec<f32> = (0..70).map(|i| i as f32 * 0.01).collect();
        // The kernels take W^T ([k, n]).
        let transpose = |w: &[f32], n: usize| -> Vec<f32> {
            (0..k * n).map(|i| w[(i % n) * k + i / n]).collect()
        };
        let (w1t, w2t) = (transpose(&w1, 5), transpose(&w2, 70));
        let parts = [
            Lin { w: &w1t, b: None },
            Lin {
                w: &w2t,
                b: Some(&b2),
            },
        ];
        let rs = 80;
        let mut dst = vec![1f32; m * rs];
        linear(&x, m, k, &parts, &mut dst, rs, true, None);
        for i in 0..m {
            for j in 0..75 {
                let (w, b, jj) = if j < 5 {
                    (&w1, 0.0, j)
                } else {
                    (&w2, b2[j - 5], j - 5)
                };
                let want: f32 =
                    1.0 + b + (0..k).map(|kk| x[i * k + kk] * w[jj * k + kk]).sum::<f32>();
                assert!((dst[i * rs + j] - want).abs() < 1e-5, "({i}, {j})");
            }
            // Columns past the parts are untouched.
            assert!(dst[i * rs + 75..(i + 1) * rs].iter().all(|&v| v == 1.0));
        }
    }

    /// Few rows and a long inner dimension take the inner-dimension split: the partial
    /// products, bias, activation and accumulation must add up as in one product.
    #[test]
    fn linear_split_k_equals_the_direct_product() {
        let (m, k, widths) = (16, 515, [100usize, 157]);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let ws: Vec<Vec<f32>> = widths
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                (0..k * n)
                    .map(|i| (((i + p) * 7 % 13) as f32 - 6.0) * 0.01)
                    .collect()
            })
            .collect();
        let bs: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| (0..n).map(|j| j as f32 * 0.01 - 0.5).collect())
            .collect();
        let parts: Vec<Lin<'_>> = ws
            .iter()
            .zip(&bs)
            .map(|(w, b)| Lin { w, b: Some(b) })
            .collect();
        let total: usize = widths.iter().sum();
        assert!(m <= SPLIT_K_MAX_ROWS && k >= total && m * k * total >= 1 << 20);
        // W^T is [k, n]: element (kk, j) at kk * n + j.
        let want = |i: usize, col: usize| -> f32 {
            let (p, j) = if col < widths[0] {
                (0, col)
            } else {
                (1, col - widths[0])
            };
            let n = widths[p];
            bs[p][j]
                + (0..k)
                    .map(|kk| x[i * k + kk] * ws[p][kk * n + j])
                    .sum::<f32>()
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let rs = total + 3;
            let mut dst = vec![2f32; m * rs];
            linear(&x, m, k, &parts, &mut dst, rs, true, None);
            let mut act = vec![0f32; m * total];
            linear(
                &x,
                m,
                k,
                &parts,
                &mut act,
                total,
                false,
                Some(Activation::Relu),
            );
            for i in 0..m {
                for c in 0..total {
                    let y = want(i, c);
                    assert!((dst[i * rs + c] - (2.0 + y)).abs() < 1e-4, "({i}, {c})");
                    assert!((act[i * total + c] - y.max(0.0)).abs() < 1e-4, "({i}, {c})");
                }
                assert!(dst[i * rs + total..(i + 1) * rs].iter().all(|&v| v == 2.0));
            }
        });
    }

    /// A layer of seeded pseudo-random weights (`d` wide, `inter` hidden units).
    fn random_layer(
        seed: u64,
        d: usize,
        heads: usize,
        inter: usize,
        pre_norm: bool,
    ) -> EncoderLayer {
        use crate::encoders::layers::SelfAttention;
        use candle_core::Device;
        let mut state = seed;
        let mut next = |n: usize, scale: f32| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect();
            v
        };
        let mut t = |shape: &[usize], scale: f32| {
            Tensor::from_vec(next(shape.iter().product(), scale), shape, &Device::Cpu).unwrap()
        };
        let mut lin = |o: usize, i: usize| {
            let w = t(&[o, i], 2.0 / (i as f32).sqrt());
            Linear::from_parts(w, Some(t(&[o], 0.2))).unwrap()
        };
        let attn = SelfAttention::from_parts(lin(d, d), lin(d, d), lin(d, d), lin(d, d), d, heads);
        let (fc1, fc2) = (lin(inter, d), lin(d, inter));
        let mut norm = || LayerNorm {
            weight: (t(&[d], 0.5) + 1.0).unwrap(),
            bias: t(&[d], 0.2),
            eps: 1e-5,
        };
        let (norm1, norm2) = (norm(), norm());
        EncoderLayer {
            attn,
            norm1,
            norm2,
            fc1,
            fc2,
            act: Activation::Gelu,
            pre_norm,
        }
    }

    #[test]
    fn fast_path_equals_the_candle_ops() {
        use candle_core::Device;
        // T = 150 > 128 exercises query blocks; a per-head bias and a padding bias.
        let (b, t, d, heads, inter) = (2, 150, 48, 4, 70);
        for pre_norm in [true, false] {
            let layers: Vec<EncoderLayer> = (0..2)
                .map(|i| random_layer(7 + i, d, heads, inter, pre_norm))
                .collect();
            let x = Tensor::from_vec(
                (0..b * t * d)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                    .collect::<Vec<_>>(),
                (b, t, d),
                &Device::Cpu,
            )
            .unwrap();
            let mut mask = vec![1u8; b * t];
            mask[t + 100..].iter_mut().for_each(|m| *m = 0);
            let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
            let per_head = Tensor::from_vec(
                (0..heads * t * t)
                    .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
                    .collect::<Vec<_>>(),
                (1, heads, t, t),
                &Device::Cpu,
            )
            .unwrap();
            let bias = crate::encoders::layers::padding_bias(&mask)
                .unwrap()
                .broadcast_add(&per_head)
                .unwrap();
            let bias = Some(bias);
            let fast = run_layers(&layers, &x, &bias)
                .unwrap()
                .expect("float32 CPU path");
            let slow = layers
                .iter()
                .try_fold(x.clone(), |x, l| l.forward(&x, &bias))
                .unwrap();
            let diff = crate::encoders::layers::max_abs_diff(&fast, &slow);
            assert!(diff < 2e-5, "pre_norm={pre_norm}: max difference {diff}");
        }
    }

    #[test]
    fn transpose_matches_candle() {
        let w = Tensor::from_vec(
            (0..70 * 45).map(|i| i as f32).collect::<Vec<_>>(),
            (70, 45),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mine = transpose(&w).unwrap().unwrap().to_vec2::<f32>().unwrap();
        let want = w.t().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(mine, want);
    }

    #[test]
    fn other_dtypes_are_left_to_candle() {
        let layer = random_layer(1, 8, 2, 8, true);
        let x = Tensor::zeros((1, 3, 8), DType::F16, &candle_core::Device::Cpu).unwrap();
        assert!(run_layers(&[layer], &x, &None).unwrap().is_none());
    }
}
