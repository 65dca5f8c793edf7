//! Dynamically quantised int8 linear maps.
//!
//! Weights are int8 per output channel (symmetric: `w ≈ scale_j * q`, `q` in
//! `-63..=63`), quantised once at load; activations are quantised per row at run time
//! (asymmetric: `x ≈ scale_i * (q - zero_i)`, `q` in `0..=255`); the product adds up in
//! 32-bit integers and turns back into float32 with the two scales in the same pass
//! that adds the bias, applies the activation or accumulates the residual.
//!
//! On x86-64 the products are the register tiles of [`super::qtile`] (AVX-512 VNNI or
//! AVX2, chosen at run time), which read the quantised activations in place and apply
//! the scales, bias, activation or residual as they store; elsewhere they are
//! `rten-gemm`'s `u8 x i8 -> i32` kernels (Arm dot-product or i8mm, or a generic one)
//! followed by a float32 pass. The AVX2 instruction adds two `u8 x i8` products in 16
//! bits and saturates past 32767, which is why weights use 7 bits
//! (`63 * 255 * 2 = 32130`): the same codes then give the same results on every
//! kernel, and a pre-quantised file travels between machines.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix, QuantParams};
use rten_tensor::NdTensorView;

use super::qtile::{self, Epilogue, Isa, QPanels};
use super::{Activation, Dst};

/// The largest weight code: 7 bits, so that the AVX2 kernel's 16-bit pair sums cannot
/// saturate (see the module docs).
pub(crate) const MAX_CODE: i8 = 63;

/// The executor, chosen once per process for this CPU.
struct Exec(GemmExecutor<u8, i8, i32>);
// SAFETY: the executor holds a kernel description chosen at construction and never
// mutated; rten-gemm itself shares one executor between its rayon tasks.
unsafe impl Send for Exec {}
unsafe impl Sync for Exec {}

fn executor() -> &'static GemmExecutor<u8, i8, i32> {
    static EXEC: OnceLock<Exec> = OnceLock::new();
    &EXEC.get_or_init(|| Exec(GemmExecutor::default())).0
}

/// An int8 weight `W^T` (`[k, n]`) packed for the kernel, with one scale per output
/// column.
pub(crate) struct Int8Matrix {
    k: usize,
    n: usize,
    /// One per column, then 1.0 to the end of the last panel (the tiles read whole
    /// panels).
    scales: Vec<f32>,
    packed: Packed,
    /// Whether the attention next to this map multiplies on the BF16 tile (decided at
    /// load: [`super::btile::chosen`]).
    bf16_attention: bool,
}

/// The codes, packed for the kernel this CPU runs.
#[derive(Clone)]
enum Packed {
    /// Panels for [`super::qtile`].
    Tiles(Arc<QPanels>),
    /// `rten-gemm`'s layout, with its per-column zero points (all zero).
    Rten(Arc<PackedBMatrix<i8>>, Vec<i8>),
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Matrix[{}, {}]", self.k, self.n)
    }
}

/// Per-column symmetric codes of `W^T` `[k, n]` (row-major) and their scales: the
/// codes `[k, n]` in `-63..=63`, `scale_j = max_i |w_ij| / 63` (1 for a zero column).
pub(crate) fn quantize_columns(wt: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(wt.len(), k * n);
    let mut amax = vec![0f32; n];
    for row in wt.chunks_exact(n.max(1)) {
        for (m, v) in amax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&m| {
            if m > 0.0 && m.is_finite() {
                m / f32::from(MAX_CODE)
            } else {
                1.0
            }
        })
        .collect();
    let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    let mut codes = vec![0i8; k * n];
    codes
        .par_chunks_mut(n.max(1) * 64)
        .zip(wt.par_chunks(n.max(1) * 64))
        .for_each(|(c, w)| {
            for (crow, wrow) in c.chunks_exact_mut(n).zip(w.chunks_exact(n)) {
                for ((q, v), i) in crow.iter_mut().zip(wrow).zip(&inv) {
                    *q = (v * i)
                        .round()
                        .clamp(-f32::from(MAX_CODE), f32::from(MAX_CODE))
                        as i8;
                }
            }
        });
    (codes, scales)
}

/// Per-row symmetric codes of a PyTorch-layout weight `W` `[out, in]` and their
/// scales, by the rule of [`quantize_columns`] (the codes are its transpose).
pub(crate) fn quantize_out_in(w: &[f32], out: usize, inn: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(w.len(), out * inn);
    let mut codes = vec![0i8; out * inn];
    let mut scales = vec![1f32; out];
    for ((row, c), s) in w
        .chunks_exact(inn.max(1))
        .zip(codes.chunks_exact_mut(inn.max(1)))
        .zip(scales.iter_mut())
    {
        let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if m > 0.0 && m.is_finite() {
            *s = m / f32::from(MAX_CODE);
        }
        let inv = 1.0 / *s;
        for (q, v) in c.iter_mut().zip(row) {
            *q = (v * inv)
                .round()
                .clamp(-f32::from(MAX_CODE), f32::from(MAX_CODE)) as i8;
        }
    }
    (codes, scales)
}

impl Int8Matrix {
    /// Packs codes `[k, n]` (row-major `W^T`, each in `-63..=63`) with their `n` scales.
    /// `Err` names what does not fit.
    pub(crate) fn from_codes(
        codes: &[i8],
        scales: Vec<f32>,
        k: usize,
        n: usize,
    ) -> Result<Self, String> {
        if codes.len() != k * n {
            return Err(format!(
                "{} codes for a [{k}, {n}] weight: expected {}",
                codes.len(),
                k * n
            ));
        }
        if scales.len() != n {
            return Err(format!(
                "{} scales for {n} output channels: expected one per channel",
                scales.len()
            ));
        }
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!("scale {s}: expected positive finite scales"));
        }
        if let Some(q) = codes.iter().find(|q| q.unsigned_abs() > MAX_CODE as u8) {
            return Err(format!(
                "code {q} outside -{MAX_CODE}..={MAX_CODE} (7-bit weights)"
            ));
        }
        Ok(Self::pack(codes, scales, k, n, qtile::isa().is_some()))
    }

    /// Packs checked codes for the tiles or for `rten-gemm`.
    fn pack(codes: &[i8], mut scales: Vec<f32>, k: usize, n: usize, tiles: bool) -> Self {
        let packed = if tiles {
            scales.resize(n.next_multiple_of(qtile::NR), 1.0);
            Packed::Tiles(Arc::new(QPanels::pack(codes, k, n)))
        } else {
            let b = executor().prepack_b(NdTensorView::from_data([k, n], codes));
            Packed::Rten(Arc::new(b), vec![0; n])
        };
        Self {
            k,
            n,
            scales,
            packed,
            bf16_attention: super::btile::chosen(),
        }
    }

    /// [`Self::quantize`] packed for `rten-gemm` (the path of CPUs without a tile).
    #[cfg(test)]
    pub(crate) fn quantize_rten(wt: &[f32], k: usize, n: usize) -> Self {
        let (codes, scales) = quantize_columns(wt, k, n);
        Self::pack(&codes, scales, k, n, false)
    }

    /// Quantises and packs a float32 `W^T` `[k, n]`.
    #[cfg(test)]
    pub(crate) fn quantize(wt: &[f32], k: usize, n: usize) -> Self {
        let (codes, scales) = quantize_columns(wt, k, n);
        Self::from_codes(&codes, scales, k, n).expect("codes from quantize_columns fit")
    }

    pub(crate) fn rows(&self) -> usize {
        self.k
    }

    /// Whether the attention next to this map multiplies on the BF16 tile.
    pub(crate) fn bf16_attention(&self) -> bool {
        self.bf16_attention
    }

    pub(crate) fn cols(&self) -> usize {
        self.n
    }

    /// The same map times `s`: the packed codes are shared, the scales multiplied.
    pub(crate) fn scaled(&self, s: f32) -> Self {
        Self {
            k: self.k,
            n: self.n,
            scales: self.scales.iter().map(|v| v * s).collect(),
            packed: self.packed.clone(),
            bf16_attention: self.bf16_attention,
        }
    }

    /// Bytes the weight occupies (packed codes, column sums and scales).
    pub(crate) fn bytes(&self) -> usize {
        4 * self.scales.len()
            + match &self.packed {
                Packed::Tiles(p) => p.bytes(),
                Packed::Rten(..) => self.k * self.n,
            }
    }
}

/// Quantises each `k`-wide row of `x` (`m` rows) to `u8` (row stride `q_rs >= k`) with
/// its scale, symmetric around the zero point 128: `x ≈ scale_i * (q - 128)`,
/// `scale_i = max |x_i| / 127`.
///
/// The zero point is the same for every row: rten-gemm 0.27 applies per-row zero
/// points correctly only to the first tile of six rows (measured against an exact
/// integer product), and a shared one sidesteps that (the tiles of [`super::qtile`]
/// fold it into each column's code sum).
fn quantize_rows(x: &[f32], m: usize, k: usize, q: &mut [u8], q_rs: usize, scales: &mut [f32]) {
    debug_assert!(q_rs >= k && q.len() >= m * q_rs);
    let one = |((xr, qr), s): ((&[f32], &mut [u8]), &mut f32)| {
        let amax = super::max_abs(xr);
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / 127.0
        } else {
            1.0
        };
        quantize_row(xr, 1.0 / scale, qr);
        *s = scale;
    };
    if m * k >= 1 << 16 {
        x[..m * k]
            .par_chunks_exact(k)
            .zip(q[..m * q_rs].par_chunks_exact_mut(q_rs))
            .zip(scales[..m].par_iter_mut())
            .for_each(one);
    } else {
        x[..m * k]
            .chunks_exact(k)
            .zip(q[..m * q_rs].chunks_exact_mut(q_rs))
            .zip(scales[..m].iter_mut())
            .for_each(one);
    }
}

/// `q = clamp(round(x * inv + 128), 1, 255)`, rounding ties to even (NaN: 1).
#[inline]
fn quantize_row(x: &[f32], inv: f32, q: &mut [u8]) {
    let one = |d: &mut u8, v: f32| *d = scalar_code(v, inv);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // The float-to-u8 cast does not vectorise (Rust's saturating cast is scalar):
        // 32 values at a time, converted with the current rounding mode (ties to
        // even, as above) and narrowed with unsigned saturation.
        use std::arch::x86_64::*;
        let whole = x.len().min(q.len()) / 32 * 32;
        // SAFETY: AVX2 and FMA are compiled in; every load and store is inside
        // `x[..whole]` and `q[..whole]`.
        unsafe {
            let (vinv, zp) = (_mm256_set1_ps(inv), _mm256_set1_ps(128.0));
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let ones = _mm256_set1_epi8(1);
            for i in (0..whole).step_by(32) {
                let p = x.as_ptr().add(i);
                let v = |o: usize| {
                    _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_loadu_ps(p.add(o)), vinv, zp))
                };
                let ab = _mm256_packus_epi32(v(0), v(8));
                let cd = _mm256_packus_epi32(v(16), v(24));
                let bytes = _mm256_packus_epi16(ab, cd);
                let bytes = _mm256_max_epu8(_mm256_permutevar8x32_epi32(bytes, order), ones);
                _mm256_storeu_si256(q.as_mut_ptr().add(i).cast(), bytes);
            }
        }
        q[whole..]
            .iter_mut()
            .zip(&x[whole..])
            .for_each(|(d, &v)| one(d, v));
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    q.iter_mut().zip(x).for_each(|(d, &v)| one(d, v));
}

/// One activation's code (`max` before `min`, so that NaN gives 1, as the vector
/// loop does; `clamp` would keep NaN).
#[inline(always)]
#[allow(clippy::manual_clamp)]
fn scalar_code(v: f32, inv: f32) -> u8 {
    (v.mul_add(inv, 128.0))
        .round_ties_even()
        .max(1.0)
        .min(255.0) as u8
}

thread_local! {
    static BUFS: std::cell::RefCell<(Vec<u8>, Vec<i32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's scratch buffers, or fresh ones when they are in use (a
/// thread waiting in a parallel region may pick up another product).
fn with_bufs<R>(f: impl FnOnce(&mut (Vec<u8>, Vec<i32>)) -> R) -> R {
    BUFS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => f(&mut bufs),
        Err(_) => f(&mut (Vec::new(), Vec::new())),
    })
}

/// `dst[:, col..] (+)= act(x W^T + b)` for int8 parts side by side from column 0 of
/// `dst` (row stride `dst_rs`), as [`super::linear`] does for float32: `x` is
/// quantised once for every part.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[(&Int8Matrix, Option<&[f32]>)],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
) {
    if m == 0 {
        return;
    }
    let tiles = qtile::isa().filter(|_| {
        parts
            .iter()
            .all(|(w, _)| matches!(w.packed, Packed::Tiles(_)))
    });
    match tiles {
        Some(isa) => linear_tiles(isa, x, m, k, parts, dst, dst_rs, accumulate, act),
        None => linear_rten(x, m, k, parts, dst, dst_rs, accumulate, act),
    }
}

/// [`linear`] on the tiles of [`super::qtile`]: the rows quantised once, then one
/// parallel region in which each task multiplies a block of rows by a block of one
/// part's columns and finishes its outputs. Tasks are cut as [`super::linear`] cuts
/// them (a column block per thread; rows too when there are few columns).
#[allow(clippy::too_many_arguments)]
fn linear_tiles(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[(&Int8Matrix, Option<&[f32]>)],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
) {
    let panels: Vec<&QPanels> = parts
        .iter()
        .map(|(w, _)| match &w.packed {
            Packed::Tiles(p) => &**p,
            Packed::Rten(..) => unreachable!("checked by the caller"),
        })
        .collect();
    let kp = k.next_multiple_of(qtile::GROUP);
    debug_assert!(panels.iter().all(|p| p.padded_k() == kp));
    let widths: Vec<usize> = parts.iter().map(|(w, _)| w.n).collect();
    let total: usize = widths.iter().sum();
    assert!(x.len() >= m * k && dst.len() >= (m - 1) * dst_rs + total);
    let threads = if m * k * total < super::PARALLEL_MIN_MACS {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    // Tasks start on whole pairs of panels (the VNNI tile's width) within each part.
    let tasks = super::linear::cut_tasks(m, &widths, threads, 2 * qtile::NR);
    let mut scales = vec![0f32; m];
    with_bufs(|(xq, _)| {
        xq.resize(m * kp, 128);
        quantize_rows(x, m, k, xq, kp, &mut scales);
        let (xq, scales) = (&xq[..], &scales[..]);
        let out = Dst(dst.as_mut_ptr());
        let run = |(rows, p, cols, at): &(
            std::ops::Range<usize>,
            usize,
            std::ops::Range<usize>,
            usize,
        )| {
            let (w, bias) = parts[*p];
            let epi = Epilogue {
                row_scales: &scales[rows.start..],
                col_scales: &w.scales,
                bias,
                accumulate,
                act,
            };
            // SAFETY: tasks cover disjoint (row, column) rectangles of `dst`,
            // inside it by the assertion above; `qtile::isa` checked the CPU.
            unsafe {
                qtile::product(
                    isa,
                    panels[*p],
                    cols.clone(),
                    &xq[rows.start * kp..],
                    kp,
                    rows.len(),
                    epi,
                    out.ptr().add(rows.start * dst_rs + at),
                    dst_rs,
                );
            }
        };
        if tasks.len() == 1 {
            run(&tasks[0]);
        } else {
            tasks.par_iter().for_each(run);
        }
    });
}

/// [`linear`] on `rten-gemm`: each part's product into a 32-bit buffer, then a float32
/// pass that applies the scales, bias, activation or residual.
#[allow(clippy::too_many_arguments)]
fn linear_rten(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[(&Int8Matrix, Option<&[f32]>)],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    act: Option<Activation>,
) {
    let mut xs = vec![0f32; m];
    let xz = vec![qtile::ZERO_POINT as u8; m];
    with_bufs(|(xq, acc)| {
        xq.resize(m * k, 0);
        quantize_rows(x, m, k, xq, k, &mut xs);
        let a = NdTensorView::from_data([m, k], &xq[..]);
        let mut col = 0;
        for (w, bias) in parts {
            debug_assert_eq!(w.k, k);
            let n = w.n;
            let (packed, zeros) = match &w.packed {
                Packed::Rten(p, z) => (p, z),
                Packed::Tiles(_) => unreachable!("a tile-packed weight with no tile"),
            };
            acc.resize(m * n, 0);
            let opts = GemmOptions {
                a_quant: Some(QuantParams { zero_point: &xz }),
                b_quant: Some(QuantParams { zero_point: zeros }),
                ..Default::default()
            };
            executor()
                .gemm(
                    &mut acc[..m * n],
                    GemmInputA::Unpacked(a),
                    GemmInputB::Packed(packed),
                    opts,
                )
                .expect("int8 product shapes checked at load");
            let epilogue = |(i, row): (usize, &mut [f32])| {
                let out = &mut row[col..col + n];
                let sa = xs[i];
                let acc_row = &acc[i * n..(i + 1) * n];
                match (accumulate, bias) {
                    (true, Some(b)) => {
                        for (((o, &a), s), b) in out.iter_mut().zip(acc_row).zip(&w.scales).zip(*b)
                        {
                            *o += (a as f32 * sa).mul_add(*s, *b);
                        }
                    }
                    (true, None) => {
                        for ((o, &a), s) in out.iter_mut().zip(acc_row).zip(&w.scales) {
                            *o += a as f32 * sa * s;
                        }
                    }
                    (false, Some(b)) => {
                        for (((o, &a), s), b) in out.iter_mut().zip(acc_row).zip(&w.scales).zip(*b)
                        {
                            *o = (a as f32 * sa).mul_add(*s, *b);
                        }
                    }
                    (false, None) => {
                        for ((o, &a), s) in out.iter_mut().zip(acc_row).zip(&w.scales) {
                            *o = a as f32 * sa * s;
                        }
                    }
                }
                if let Some(act) = act {
                    act.apply_slice(out);
                }
            };
            // Rows of `dst` start every `dst_rs` elements; the last one may be short.
            let rows = dst[..(m - 1) * dst_rs + col + n].chunks_mut(dst_rs);
            if m * n >= 1 << 15 {
                let rows: Vec<&mut [f32]> = rows.collect();
                rows.into_par_iter().enumerate().for_each(epilogue);
            } else {
                rows.enumerate().for_each(epilogue);
            }
            col += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn rows_quantise_like_the_scalar_rule() {
        // Long enough for the vector loop and its tail; ties, the extremes, NaN.
        let mut x = pseudo(103, 8, 2.0);
        x[0] = 2.0;
        x[1] = -2.0;
        x[2] = 0.5 * 2.0 / 127.0; // a tie: 128.5 rounds to 128
        x[3] = 1.5 * 2.0 / 127.0; // 129.5 rounds to 130
        x[40] = f32::NAN;
        let inv = 127.0 / 2.0;
        let mut q = vec![0u8; x.len()];
        quantize_row(&x, inv, &mut q);
        for (i, (&v, &got)) in x.iter().zip(&q).enumerate() {
            let want = if v.is_nan() {
                1
            } else {
                (v.mul_add(inv, 128.0)).round_ties_even().clamp(1.0, 255.0) as u8
            };
            assert_eq!(got, want, "{i}: {v}");
        }
        assert_eq!(&q[..4], &[255, 1, 128, 130]);
    }

    #[test]
    fn weight_codes_are_seven_bit_and_reconstruct_each_column() {
        let (k, n) = (37, 21);
        let mut wt = pseudo(k * n, 3, 0.2);
        wt[5] = 3.0; // an outlier in column 5 widens only that column's scale
        let (codes, scales) = quantize_columns(&wt, k, n);
        assert!(codes.iter().all(|q| q.unsigned_abs() <= 63));
        for j in 0..n {
            let amax = (0..k).map(|i| wt[i * n + j].abs()).fold(0f32, f32::max);
            assert!((scales[j] - amax / 63.0).abs() < 1e-7);
            for i in 0..k {
                let err = (f32::from(codes[i * n + j]) * scales[j] - wt[i * n + j]).abs();
                assert!(err <= scales[j] / 2.0 + 1e-7, "({i}, {j}): {err}");
            }
        }
        assert!(scales[5] > 10.0 * scales[4]);
    }

    #[test]
    fn product_matches_float32_within_the_quantisation_error() {
        // Shapes that cover the kernel's edges (not multiples of its tiles).
        for &(m, k, n) in &[
            (1, 17, 9),
            (7, 64, 33),
            (70, 128, 100),
            (7, 129, 100),
            (70, 64, 100),
            (70, 129, 100),
        ] {
            let x = pseudo(m * k, 1, 1.5);
            let wt = pseudo(k * n, 2, 0.1);
            let b = pseudo(n, 3, 0.5);
            let w = Int8Matrix::quantize(&wt, k, n);
            let mut got = vec![0f32; m * n];
            linear(&x, m, k, &[(&w, Some(&b))], &mut got, n, false, None);
            // Reference: the dequantised product in float64.
            let mut worst = 0f64;
            let mut norm = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| f64::from(x[i * k + l]) * f64::from(wt[l * n + j]))
                        .sum::<f64>()
                        + f64::from(b[j]);
                    worst = worst.max((f64::from(got[i * n + j]) - want).abs());
                    norm = norm.max(want.abs());
                }
            }
            // Row scale 3/255 and column scale 0.1/63: the error of a k-term sum of
            // independent rounding errors stays well under 2% of the largest output.
            assert!(worst < 0.02 * norm, "{m}x{k}x{n}: {worst} vs {norm}");
        }
    }

    #[test]
    fn accumulates_and_activates_like_the_float32_kernel() {
        let (m, k, n) = (5, 40, 24);
        let x = pseudo(m * k, 4, 1.0);
        let wt = pseudo(k * n, 5, 0.3);
        let w = Int8Matrix::quantize(&wt, k, n);
        let mut plain = vec![0f32; m * n];
        linear(&x, m, k, &[(&w, None)], &mut plain, n, false, None);
        let mut acc = vec![1.0f32; m * n];
        linear(&x, m, k, &[(&w, None)], &mut acc, n, true, None);
        for (a, p) in acc.iter().zip(&plain) {
            assert!((a - (p + 1.0)).abs() < 1e-5);
        }
        let mut act = vec![0f32; m * n];
        linear(
            &x,
            m,
            k,
            &[(&w, None)],
            &mut act,
            n,
            false,
            Some(Activation::Relu),
        );
        for (a, p) in act.iter().zip(&plain) {
            assert_eq!(*a, p.max(0.0));
        }
        // Two parts side by side in a wider destination.
        let mut two = vec![0f32; m * (2 * n + 3)];
        linear(
            &x,
            m,
            k,
            &[(&w, None), (&w, None)],
            &mut two,
            2 * n + 3,
            false,
            None,
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(two[i * (2 * n + 3) + j], plain[i * n + j]);
                assert_eq!(two[i * (2 * n + 3) + n + j], plain[i * n + j]);
            }
        }
    }

    #[test]
    fn every_row_tile_equals_the_exact_integer_product_of_the_codes() {
        // 70 rows span a dozen of the kernel's row tiles.
        let (m, k, n) = (70, 131, 45);
        let x = pseudo(m * k, 6, 2.0);
        let wt = pseudo(k * n, 7, 0.2);
        let (codes, scales) = quantize_columns(&wt, k, n);
        let w = Int8Matrix::from_codes(&codes, scales.clone(), k, n).unwrap();
        let mut got = vec![0f32; m * n];
        linear(&x, m, k, &[(&w, None)], &mut got, n, false, None);
        let (mut xq, mut xs) = (vec![0u8; m * k], vec![0f32; m]);
        quantize_rows(&x, m, k, &mut xq, k, &mut xs);
        let rten = Int8Matrix::quantize_rten(&wt, k, n);
        let mut via_rten = vec![0f32; m * n];
        linear(&x, m, k, &[(&rten, None)], &mut via_rten, n, false, None);
        for i in 0..m {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|l| {
                        (i32::from(xq[i * k + l]) - qtile::ZERO_POINT) * i32::from(codes[l * n + j])
                    })
                    .sum();
                let want = acc as f32 * xs[i] * scales[j];
                for (path, got) in [("tiles", &got), ("rten", &via_rten)] {
                    assert!(
                        (got[i * n + j] - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{path} ({i}, {j})"
                    );
                }
            }
        }
    }

    #[test]
    fn parts_whose_widths_are_not_whole_panels_split_between_threads() {
        // Enough work to split between the pool's threads (two: 240 columns in blocks
        // of 128), and the second part's columns cut 88 columns in, inside a panel.
        let (m, k, na, nb) = (70, 129, 40, 200);
        assert!(m * k * (na + nb) >= super::super::PARALLEL_MIN_MACS);
        let x = pseudo(m * k, 10, 1.0);
        let (wa, wb) = (pseudo(k * na, 11, 0.2), pseudo(k * nb, 12, 0.2));
        let (a, b) = (
            Int8Matrix::quantize(&wa, k, na),
            Int8Matrix::quantize(&wb, k, nb),
        );
        let bias = pseudo(na, 13, 0.5);
        let rs = na + nb + 7;
        let mut both = vec![0f32; m * rs];
        linear(
            &x,
            m,
            k,
            &[(&a, Some(&bias)), (&b, None)],
            &mut both,
            rs,
            false,
            None,
        );
        let (mut one_a, mut one_b) = (vec![0f32; m * na], vec![0f32; m * nb]);
        linear(&x, m, k, &[(&a, Some(&bias))], &mut one_a, na, false, None);
        linear(&x, m, k, &[(&b, None)], &mut one_b, nb, false, None);
        for i in 0..m {
            let row = &both[i * rs..];
            assert_eq!(&row[..na], &one_a[i * na..(i + 1) * na], "row {i}");
            assert_eq!(&row[na..na + nb], &one_b[i * nb..(i + 1) * nb], "row {i}");
        }
    }

    #[test]
    fn both_layouts_quantise_alike() {
        let (k, n) = (19, 11);
        let wt = pseudo(k * n, 9, 0.3);
        let w: Vec<f32> = (0..n * k).map(|i| wt[(i % k) * n + i / k]).collect();
        let (ct, st) = quantize_columns(&wt, k, n);
        let (c, s) = quantize_out_in(&w, n, k);
        assert_eq!(st, s);
        for j in 0..n {
            for i in 0..k {
                assert_eq!(c[j * k + i], ct[i * n + j]);
            }
        }
    }

    #[test]
    fn bad_codes_and_scales_are_refused() {
        let codes = vec![0i8; 6];
        assert!(Int8Matrix::from_codes(&codes, vec![1.0; 3], 2, 3).is_ok());
        let e = Int8Matrix::from_codes(&codes, vec![1.0; 2], 2, 3).unwrap_err();
        assert!(e.contains("2 scales for 3 output channels"), "{e}");
        let e = Int8Matrix::from_codes(&codes, vec![1.0, 0.0, 1.0], 2, 3).unwrap_err();
        assert!(e.contains("positive finite"), "{e}");
        let mut wide = codes.clone();
        wide[1] = 100;
        let e = Int8Matrix::from_codes(&wide, vec![1.0; 3], 2, 3).unwrap_err();
        assert!(e.contains("7-bit"), "{e}");
        let e = Int8Matrix::from_codes(&codes, vec![1.0; 3], 3, 3).unwrap_err();
        assert!(e.contains("6 codes for a [3, 3] weight"), "{e}");
    }
}
