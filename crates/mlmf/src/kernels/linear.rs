//! `x W^T + b` on the CPU, with the bias, activation or residual fused into the
//! product's output blocks.
//!
//! Every product is split into one block of output columns per thread, and its bias,
//! activation or residual is applied to that block right after it is computed, while
//! it is still in cache (one pass over the output instead of three); residual
//! connections accumulate straight into the hidden state (`x += h W^T + b`); a
//! product of a few long rows is split along its inner dimension instead. Weights are
//! `W^T` (`[k, n]`, row-major), so the kernels read them in memory order.
//!
//! A weight is float32, 16-bit ([`super::half`]: widened block by block inside each
//! task) or int8 ([`super::int8`]: its own product, with the same epilogue).

use half::{bf16, f16};
use std::ops::Range;

use rayon::prelude::*;

use super::half::gemm_half;
use super::int8::Int8Matrix;
use super::panel::{self, Panels};
use super::small;
use super::{gemm_into, Activation, Dst};

/// A linear map's transposed weight `W^T` (`[k, n]`, row-major) in one of the formats
/// the kernels read.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// Stored as 16-column panels ([`super::panel`]).
    Panel(&'a Panels),
    Int8(&'a Int8Matrix),
}

impl<'a> WeightRef<'a> {
    /// The float32 data, when it is float32 (norm weights, biases).
    pub(crate) fn f32(self) -> Option<&'a [f32]> {
        match self {
            Self::F32(w) => Some(w),
            _ => None,
        }
    }

    /// Number of weights (`k * n`).
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
            Self::Panel(w) => w.rows() * w.cols(),
            Self::Int8(w) => w.rows() * w.cols(),
        }
    }

    /// `dst (+)= lhs · W^T[k0..k0 + kn, cols]` for `m` rows of `lhs` (row stride
    /// `lhs_rs`, starting at inner index `k0`), `W^T` `ld` wide. Not for int8.
    ///
    /// # Safety
    /// As [`gemm_into`], for these extents.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        self,
        m: usize,
        (k0, kn): (usize, usize),
        cols: std::ops::Range<usize>,
        ld: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_rs: usize,
    ) {
        if let Self::Panel(p) = self {
            panel_product(p, m, (k0, kn), cols, dst, dst_rs, accumulate, lhs, lhs_rs);
            return;
        }
        // A few rows over whole 16-column panels: the tile reads the weight in place.
        let nc = cols.len();
        let rows = match self {
            Self::F32(_) => small::MAX_ROWS_F32,
            Self::Bf16(_) | Self::F16(_) => small::MAX_ROWS_HALF,
            Self::Int8(_) | Self::Panel(_) => 0,
        };
        let small = small::available() && m <= rows && nc.is_multiple_of(16) && nc > 0;
        if small {
            let at = k0 * ld + cols.start;
            macro_rules! tile {
                ($w:expr) => {
                    small::product(
                        m,
                        kn,
                        nc,
                        $w[at..].as_ptr(),
                        ld,
                        dst,
                        dst_rs,
                        accumulate,
                        lhs,
                        lhs_rs,
                    )
                };
            }
            match self {
                Self::F32(w) => tile!(w),
                Self::Bf16(w) => tile!(w),
                Self::F16(w) => tile!(w),
                Self::Int8(_) | Self::Panel(_) => unreachable!(),
            }
            return;
        }
        macro_rules! widened {
            ($w:expr) => {
                gemm_half(
                    m,
                    kn,
                    cols,
                    &$w[k0 * ld..],
                    ld,
                    dst,
                    dst_rs,
                    accumulate,
                    lhs,
                    lhs_rs,
                )
            };
        }
        match self {
            Self::F32(w) => gemm_into(
                m,
                cols.len(),
                kn,
                dst,
                dst_rs,
                accumulate,
                lhs,
                lhs_rs,
                1,
                w.as_ptr().add(k0 * ld + cols.start),
                ld,
                1,
                1.0,
            ),
            Self::Bf16(w) => widened!(w),
            Self::F16(w) => widened!(w),
            Self::Int8(_) => unreachable!("int8 maps run in kernels::int8"),
            Self::Panel(_) => unreachable!("panels return above"),
        }
    }
}

/// [`Panels::product`] for any column range: one that does not start and end on panel
/// boundaries (a part after one whose width is not a multiple of 16) is computed over
/// the panels covering it and copied.
///
/// # Safety
/// As [`WeightRef::product`].
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    p: &Panels,
    m: usize,
    span: (usize, usize),
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    let w = panel::WIDTH;
    if cols.start.is_multiple_of(w) && cols.end.is_multiple_of(w) {
        p.product(m, span, cols, dst, dst_rs, accumulate, lhs, lhs_rs);
        return;
    }
    let (a, b) = (cols.start / w * w, cols.end.next_multiple_of(w));
    let mut tmp = vec![0f32; m * (b - a)];
    p.product(m, span, a..b, tmp.as_mut_ptr(), b - a, false, lhs, lhs_rs);
    for (i, t) in tmp.chunks_exact(b - a).enumerate() {
        let row = std::slice::from_raw_parts_mut(dst.add(i * dst_rs), cols.len());
        let t = &t[cols.start - a..cols.end - a];
        if accumulate {
            row.iter_mut().zip(t).for_each(|(d, v)| *d += v);
        } else {
            row.copy_from_slice(t);
        }
    }
}

/// One linear map's transposed weight `W^T` (`[k, n]`) and bias `[n]`.
#[derive(Clone, Copy)]
pub(crate) struct Lin<'a> {
    pub(crate) w: WeightRef<'a>,
    pub(crate) b: Option<&'a [f32]>,
}

impl<'a> Lin<'a> {
    /// A float32 map.
    #[cfg(test)]
    pub(crate) fn f32(w: &'a [f32], b: Option<&'a [f32]>) -> Self {
        Self {
            w: WeightRef::F32(w),
            b,
        }
    }
}

// ---------------------------------------------------------------------------------
// Kernels.

/// `dst[:, col..col + n] (+)= act(x W^T + b)` for `x` `[m, k]` and each part's `W^T`
/// `[k, n_i]`; the parts' outputs lie side by side from column 0 of `dst` (row stride
/// `dst_rs`). With `accumulate` the product is added to `dst` (no activation then).
/// No rows (a packed modality with no real token) is nothing to do.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
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
    if parts.iter().any(|p| matches!(p.w, WeightRef::Int8(_))) {
        linear_int8(x, m, k, parts, dst, dst_rs, accumulate, act);
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
    let tasks = cut_tasks(m, &widths, threads, 16);
    let out = Dst(dst.as_mut_ptr());
    let run = |(rows, p, cols, at): &Task| {
        let part = parts[*p];
        let (mr, nc) = (rows.len(), cols.len());
        // SAFETY: tasks cover disjoint (row, column) rectangles of `dst`, inside it by
        // the debug assertion above; `x` and the weights are read only.
        unsafe {
            let d = out.ptr().add(rows.start * dst_rs + at);
            part.w.product(
                mr,
                (0, k),
                cols.clone(),
                widths[*p],
                d,
                dst_rs,
                accumulate,
                x.as_ptr().add(rows.start * k),
                k,
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

/// One task of a split product: its rows, its part, the part's columns it computes,
/// and the destination column of the first of them.
pub(crate) type Task = (Range<usize>, usize, Range<usize>, usize);

/// Cuts a product of `m` rows by parts `widths` columns wide (side by side) into tasks
/// for `threads` threads: one block of columns per thread (at least 64 columns, a
/// multiple of `align` wide), split at part boundaries, and rows as well when there
/// are fewer column blocks than threads and many rows. Inside a part, every task
/// starts a multiple of `align` columns from the part's first (a block boundary that
/// falls elsewhere moves to the nearest such column below it, or above when that
/// would leave the task empty), so that tasks start on whole panels.
pub(crate) fn cut_tasks(m: usize, widths: &[usize], threads: usize, align: usize) -> Vec<Task> {
    let total: usize = widths.iter().sum();
    let col_blocks = threads.min(total.div_ceil(64)).max(1);
    let width = total
        .div_ceil(col_blocks)
        .next_multiple_of(align)
        .max(align);
    let row_blocks = if col_blocks < threads && m >= 64 {
        (threads / col_blocks).min(m / 32).max(1)
    } else {
        1
    };
    let height = m.div_ceil(row_blocks).max(1);
    let mut tasks = Vec::new();
    for r0 in (0..m).step_by(height) {
        let rows = r0..(r0 + height).min(m);
        let mut col0 = 0;
        for (p, &w) in widths.iter().enumerate() {
            let mut a = 0;
            while a < w {
                // The next block boundary after column `col0 + a`, in the part.
                let cut = ((col0 + a) / width + 1) * width - col0;
                let b = if cut >= w {
                    w
                } else if cut / align * align > a {
                    cut / align * align
                } else {
                    (a + align).min(w)
                };
                tasks.push((rows.clone(), p, a..b, col0 + a));
                a = b;
            }
            col0 += w;
        }
    }
    tasks
}

/// [`linear`] for parts of which at least one is int8: runs of int8 parts go through
/// [`super::int8::linear`] (which quantises `x` once for the run), other parts one by
/// one through [`linear`], each into its columns of `dst`.
#[allow(clippy::too_many_arguments)]
fn linear_int8(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[Lin<'_>],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
) {
    let mut col = 0;
    let mut i = 0;
    while i < parts.len() {
        let run: Vec<(&Int8Matrix, Option<&[f32]>)> = parts[i..]
            .iter()
            .map_while(|p| match p.w {
                WeightRef::Int8(w) => Some((w, p.b)),
                _ => None,
            })
            .collect();
        if run.is_empty() {
            let n = parts[i].w.len() / k;
            linear(
                x,
                m,
                k,
                &parts[i..=i],
                &mut dst[col..],
                dst_rs,
                accumulate,
                act,
            );
            col += n;
            i += 1;
        } else {
            super::int8::linear(x, m, k, &run, &mut dst[col..], dst_rs, accumulate, act);
            col += run.iter().map(|(w, _)| w.cols()).sum::<usize>();
            i += run.len();
        }
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
                part.w.product(
                    m,
                    (span.start, span.len()),
                    0..w,
                    w,
                    d.ptr().add(col),
                    *rs,
                    *acc,
                    x.as_ptr().add(span.start),
                    k,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_output_once_and_start_on_whole_panels() {
        for widths in [
            &[768usize, 768, 768][..],
            &[40, 200],
            &[100, 45, 9],
            &[3072],
            &[16],
        ] {
            for threads in 1..=5 {
                for m in [1usize, 70, 300] {
                    for align in [16, 32] {
                        let tasks = cut_tasks(m, widths, threads, align);
                        let total: usize = widths.iter().sum();
                        let mut seen = vec![0u8; m * total];
                        for (rows, p, cols, at) in &tasks {
                            let col0: usize = widths[..*p].iter().sum();
                            assert!(!rows.is_empty() && !cols.is_empty());
                            assert_eq!(cols.start % align, 0, "{widths:?} {threads} {m}");
                            assert_eq!(*at, col0 + cols.start);
                            assert!(cols.end <= widths[*p]);
                            for r in rows.clone() {
                                for c in cols.clone() {
                                    seen[r * total + col0 + c] += 1;
                                }
                            }
                        }
                        assert!(seen.iter().all(|&v| v == 1), "{widths:?} {threads} {m}");
                        if threads == 1 {
                            assert_eq!(tasks.len(), widths.len());
                        }
                    }
                }
            }
        }
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
        let parts = [Lin::f32(&w1t, None), Lin::f32(&w2t, Some(&b2))];
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
            .map(|(w, b)| Lin::f32(w, Some(b)))
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

    /// Panel weights beside a dense part whose width is not a multiple of 16 (so the
    /// next panel part starts off a panel boundary), at row counts that take one tile,
    /// several, and the column, row and inner-dimension splits, on three threads.
    #[test]
    fn panel_parts_equal_the_direct_product() {
        let k = 530;
        let widths = [48usize, 20, 32];
        let ws: Vec<Vec<f32>> = widths
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                (0..k * n)
                    .map(|i| (((i + 3 * p) * 7 % 13) as f32 - 6.0) * 0.01)
                    .collect()
            })
            .collect();
        let bs: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| (0..n).map(|j| j as f32 * 0.01 - 0.2).collect())
            .collect();
        let panels = [
            Panels::from_wt(&ws[0], k, widths[0], candle_core::DType::F32),
            Panels::from_wt(&ws[2], k, widths[2], candle_core::DType::BF16),
        ];
        let parts = [
            Lin {
                w: WeightRef::Panel(&panels[0]),
                b: Some(&bs[0]),
            },
            Lin::f32(&ws[1], Some(&bs[1])),
            Lin {
                w: WeightRef::Panel(&panels[1]),
                b: Some(&bs[2]),
            },
        ];
        // The bfloat16 part's weights as the kernel sees them.
        let w2: Vec<f32> = ws[2]
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let total: usize = widths.iter().sum();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for m in [1, 5, 50, 130] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let want = |i: usize, col: usize| -> f32 {
                let (p, j) = match col {
                    c if c < 48 => (0, c),
                    c if c < 68 => (1, c - 48),
                    c => (2, c - 68),
                };
                let w = if p == 2 { &w2 } else { &ws[p] };
                // The BF16 tile multiplies bfloat16 activations too.
                let seen = |v: f32| match p == 2 && super::super::btile::chosen() {
                    true => half::bf16::from_f32(v).to_f32(),
                    false => v,
                };
                bs[p][j]
                    + (0..k)
                        .map(|kk| seen(x[i * k + kk]) * w[kk * widths[p] + j])
                        .sum::<f32>()
            };
            pool.install(|| {
                let rs = total + 5;
                let mut dst = vec![1f32; m * rs];
                linear(&x, m, k, &parts, &mut dst, rs, true, None);
                let mut act = vec![0f32; m * total];
                let relu = Some(Activation::Relu);
                linear(&x, m, k, &parts, &mut act, total, false, relu);
                for i in 0..m {
                    for c in 0..total {
                        let y = want(i, c);
                        let got = dst[i * rs + c];
                        assert!((got - 1.0 - y).abs() < 1e-4, "m {m} ({i}, {c})");
                        assert!((act[i * total + c] - y.max(0.0)).abs() < 1e-4);
                    }
                    assert!(dst[i * rs + total..(i + 1) * rs].iter().all(|&v| v == 1.0));
                }
            });
        }
    }
}
