//! Dynamically quantised int8 linear maps.
//!
//! Weights are int8 per output channel (symmetric: `w ≈ scale_j * q`, `q` in
//! `-63..=63`), quantised once at load; activations are quantised per row at run time
//! (asymmetric: `x ≈ scale_i * (q - zero_i)`, `q` in `0..=255`); the product adds up in
//! 32-bit integers and turns back into float32 with the two scales in the same pass
//! that adds the bias, applies the activation or accumulates the residual.
//!
//! The products are `rten-gemm`'s `u8 x i8 -> i32` kernels on weights packed once at
//! load. The kernel is chosen at run time: AVX-512 VNNI (`vpdpbusd`), AVX-512, AVX2
//! (`vpmaddubsw` + `vpmaddwd`), Arm dot-product or i8mm, or a generic one. The AVX2
//! instruction adds two `u8 x i8` products in 16 bits and saturates past 32767, which
//! is why weights use 7 bits (`63 * 255 * 2 = 32130`): the same codes then give the
//! same results on every kernel, and a pre-quantised file travels between machines.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix, QuantParams};
use rten_tensor::NdTensorView;

use super::Activation;

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
    scales: Vec<f32>,
    zeros: Vec<i8>,
    packed: Arc<PackedBMatrix<i8>>,
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
        let packed = Arc::new(executor().prepack_b(NdTensorView::from_data([k, n], codes)));
        Ok(Self {
            k,
            n,
            scales,
            zeros: vec![0; n],
            packed,
        })
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

    pub(crate) fn cols(&self) -> usize {
        self.n
    }

    /// The same map times `s`: the packed codes are shared, the scales multiplied.
    pub(crate) fn scaled(&self, s: f32) -> Self {
        Self {
            k: self.k,
            n: self.n,
            scales: self.scales.iter().map(|v| v * s).collect(),
            zeros: self.zeros.clone(),
            packed: self.packed.clone(),
        }
    }

    /// Bytes the weight occupies (packed codes and scales).
    pub(crate) fn bytes(&self) -> usize {
        self.k * self.n + 4 * self.n
    }
}

/// Quantises each `k`-wide row of `x` (`m` rows) to `u8` with its scale, symmetric
/// around the zero point 128: `x ≈ scale_i * (q - 128)`, `scale_i = max |x_i| / 127`.
///
/// The zero point is the same for every row: rten-gemm 0.27 applies per-row zero
/// points correctly only to the first tile of six rows (measured against an exact
/// integer product), and a shared one sidesteps that.
fn quantize_rows(
    x: &[f32],
    m: usize,
    k: usize,
    q: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
) {
    type Row<'a> = (((&'a [f32], &'a mut [u8]), &'a mut f32), &'a mut u8);
    let one = |(((xr, qr), s), z): Row<'_>| {
        let amax = super::max_abs(xr);
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / 127.0
        } else {
            1.0
        };
        let inv = 1.0 / scale;
        // Ties to even (`vroundps`, vectorised; `round` is not).
        for (d, &v) in qr.iter_mut().zip(xr) {
            *d = (v.mul_add(inv, 128.0)).round_ties_even().clamp(1.0, 255.0) as u8;
        }
        *s = scale;
        *z = 128;
    };
    let it = x[..m * k]
        .chunks_exact(k)
        .zip(q[..m * k].chunks_exact_mut(k))
        .zip(scales.iter_mut())
        .zip(zeros.iter_mut());
    if m * k >= 1 << 16 {
        x[..m * k]
            .par_chunks_exact(k)
            .zip(q[..m * k].par_chunks_exact_mut(k))
            .zip(scales.par_iter_mut())
            .zip(zeros.par_iter_mut())
            .for_each(one);
    } else {
        it.for_each(one);
    }
}

thread_local! {
    static BUFS: std::cell::RefCell<(Vec<u8>, Vec<i32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
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
    let mut xs = vec![0f32; m];
    let mut xz = vec![0u8; m];
    BUFS.with(|cell| {
        let mut bufs = cell.borrow_mut();
        let (xq, acc) = &mut *bufs;
        xq.resize(m * k, 0);
        quantize_rows(x, m, k, xq, &mut xs, &mut xz);
        let a = NdTensorView::from_data([m, k], &xq[..]);
        let mut col = 0;
        for (w, bias) in parts {
            debug_assert_eq!(w.k, k);
            let n = w.n;
            acc.resize(m * n, 0);
            let opts = GemmOptions {
                a_quant: Some(QuantParams { zero_point: &xz }),
                b_quant: Some(QuantParams {
                    zero_point: &w.zeros,
                }),
                ..Default::default()
            };
            executor()
                .gemm(
                    &mut acc[..m * n],
                    GemmInputA::Unpacked(a),
                    GemmInputB::Packed(&w.packed),
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
        let (mut xq, mut xs, mut xz) = (vec![0u8; m * k], vec![0f32; m], vec![0u8; m]);
        quantize_rows(&x, m, k, &mut xq, &mut xs, &mut xz);
        for i in 0..m {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|l| {
                        (i32::from(xq[i * k + l]) - i32::from(xz[i])) * i32::from(codes[l * n + j])
                    })
                    .sum();
                let want = acc as f32 * xs[i] * scales[j];
                assert!(
                    (got[i * n + j] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "({i}, {j})"
                );
            }
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
