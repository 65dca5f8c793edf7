//! Weights stored as 16-column panels, the layout the matrix kernels read.
//!
//! `W^T` (`[k, n]`) is cut into `n / 16` panels of 16 columns, each stored as its own
//! `[k, 16]` block, one after another: a kernel pass over a panel reads one contiguous
//! stretch of memory. Read in place from a row-major `W^T`, the same 16 columns lie one
//! row stride apart, and with the strides of real models (768 or 3072 floats: 3 or 12
//! KB) every row of a pass falls into the same few cache sets, so a pass does not stay
//! in the L1 cache; a general kernel instead copies ("packs") the block on every call,
//! which at batch 1 was more than a quarter of a CLIP ViT-B/32 forward. Packing once at
//! load removes both. Measured single-threaded on a 50-row product (768 x 3072): about
//! 100 GFLOP/s from panels, against 75 for the `gemm` crate and 50 for the tile reading
//! `W^T` in place.
//!
//! Panels hold float32, bfloat16 or float16; the 16-bit ones are widened in registers
//! by the tile ([`super::small`]). Without the AVX2 tile, each panel block is widened
//! when needed and handed to the `gemm` crate.

use half::{bf16, f16};

use super::btile::{self, BPanels};
use super::gemm_into;
use super::half::Half as Widen;
use super::small;

/// Inner rows and panels per widened block of [`Panels::widened`] (512 x 64 float32
/// values: 128 KB, in L2 beside the block of rows it multiplies).
const PASS: usize = 512;
const GROUP: usize = 4;

thread_local! {
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Columns per panel.
pub(crate) const WIDTH: usize = 16;

/// A panel-major `W^T` in one of the float formats.
#[derive(Debug, Clone)]
pub(crate) enum PanelData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    /// bfloat16 in pairs, for the BF16 dot-product tile ([`super::btile`]), on CPUs
    /// that have it.
    Bf16Pairs(BPanels),
}

/// A linear map's `W^T` (`[k, n]`, `n` a multiple of [`WIDTH`]) as panels.
#[derive(Debug, Clone)]
pub(crate) struct Panels {
    data: PanelData,
    k: usize,
    n: usize,
}

/// Panels of `W^T` (`[k, n]`) whose element `(kk, c)` is `conv(at(kk, c))`, in
/// panel order: one pass, whatever layout `at` reads.
fn pack<T>(
    k: usize,
    n: usize,
    at: impl Fn(usize, usize) -> f32,
    conv: impl Fn(f32) -> T,
) -> Vec<T> {
    debug_assert!(n.is_multiple_of(WIDTH));
    let mut out = Vec::with_capacity(k * n);
    for c0 in (0..n).step_by(WIDTH) {
        for kk in 0..k {
            out.extend((c0..c0 + WIDTH).map(|c| conv(at(kk, c))));
        }
    }
    out
}

/// The inverse of [`pack`].
fn unpack<T: Copy>(p: &[T], k: usize, n: usize, to: impl Fn(T) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; k * n];
    for (j, panel) in p.chunks_exact(k * WIDTH).enumerate() {
        for (r, vals) in panel.chunks_exact(WIDTH).enumerate() {
            for (c, &v) in vals.iter().enumerate() {
                out[r * n + j * WIDTH + c] = to(v);
            }
        }
    }
    out
}

impl Panels {
    /// Whether a `[k, n]` `W^T` can be stored as panels.
    pub(crate) fn fits(n: usize) -> bool {
        n > 0 && n.is_multiple_of(WIDTH)
    }

    /// Panels of `W^T` from `W` as PyTorch stores it (`[n, k]`, row-major), in `dtype`
    /// (float32, bfloat16 or float16): read once, without a transposed copy first.
    pub(crate) fn from_out_in(w: &[f32], k: usize, n: usize, dtype: candle_core::DType) -> Self {
        debug_assert_eq!(w.len(), k * n);
        let at = |kk: usize, c: usize| w[c * k + kk];
        Self::build(k, n, dtype, at)
    }

    /// Panels of a row-major `W^T` (`[k, n]`) in `dtype`.
    #[cfg(test)]
    pub(crate) fn from_wt(wt: &[f32], k: usize, n: usize, dtype: candle_core::DType) -> Self {
        Self::build(k, n, dtype, |kk, c| wt[kk * n + c])
    }

    fn build(
        k: usize,
        n: usize,
        dtype: candle_core::DType,
        at: impl Fn(usize, usize) -> f32,
    ) -> Self {
        use candle_core::DType;
        let data = match dtype {
            DType::BF16 if btile::chosen() => {
                PanelData::Bf16Pairs(BPanels::pack(k, n, |kk, c| bf16::from_f32(at(kk, c))))
            }
            DType::BF16 => PanelData::Bf16(pack(k, n, at, bf16::from_f32)),
            DType::F16 => PanelData::F16(pack(k, n, at, f16::from_f32)),
            _ => PanelData::F32(pack(k, n, at, |v| v)),
        };
        Self { data, k, n }
    }

    /// Inner dimension.
    pub(crate) fn rows(&self) -> usize {
        self.k
    }

    /// Output width.
    pub(crate) fn cols(&self) -> usize {
        self.n
    }

    /// Whether the products run on the BF16 tile (bfloat16 activations).
    pub(crate) fn bf16_products(&self) -> bool {
        matches!(self.data, PanelData::Bf16Pairs(_))
    }

    /// The dtype the values are stored in.
    pub(crate) fn dtype(&self) -> candle_core::DType {
        match self.data {
            PanelData::F32(_) => candle_core::DType::F32,
            PanelData::Bf16(_) | PanelData::Bf16Pairs(_) => candle_core::DType::BF16,
            PanelData::F16(_) => candle_core::DType::F16,
        }
    }

    /// Resident bytes.
    pub(crate) fn bytes(&self) -> usize {
        match &self.data {
            PanelData::Bf16Pairs(p) => p.bytes(),
            _ => self.k * self.n * self.dtype().size_in_bytes(),
        }
    }

    /// `W^T` as row-major float32 `[k, n]`.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        match &self.data {
            PanelData::F32(p) => unpack(p, k, n, |v| v),
            PanelData::Bf16(p) => unpack(p, k, n, bf16::to_f32),
            PanelData::F16(p) => unpack(p, k, n, f16::to_f32),
            PanelData::Bf16Pairs(p) => (0..k * n).map(|i| p.get(i / n, i % n).to_f32()).collect(),
        }
    }

    /// Every weight multiplied by `s` (rounded back to the stored format).
    pub(crate) fn scaled(&self, s: f32) -> Self {
        let data = match &self.data {
            PanelData::F32(p) => PanelData::F32(p.iter().map(|v| v * s).collect()),
            PanelData::Bf16(p) => {
                PanelData::Bf16(p.iter().map(|v| bf16::from_f32(v.to_f32() * s)).collect())
            }
            PanelData::F16(p) => {
                PanelData::F16(p.iter().map(|v| f16::from_f32(v.to_f32() * s)).collect())
            }
            PanelData::Bf16Pairs(p) => {
                PanelData::Bf16Pairs(p.map(|v| bf16::from_f32(v.to_f32() * s)))
            }
        };
        Self { data, ..*self }
    }

    /// `dst (+)= lhs · W^T[k0..k0 + kn, cols]` for `m` rows of `lhs` (row stride
    /// `lhs_rs`, starting at inner index `k0`); `cols` whole panels.
    ///
    /// # Safety
    /// `lhs` must address `m` rows of `kn` values, `dst` `m` rows of `cols.len()`
    /// values (row stride `dst_rs`), not overlapping `lhs`; `k0 + kn <= k`, `cols`
    /// inside `0..n` with both ends multiples of [`WIDTH`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn product(
        &self,
        m: usize,
        (k0, kn): (usize, usize),
        cols: std::ops::Range<usize>,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_rs: usize,
    ) {
        debug_assert!(k0 + kn <= self.k && cols.end <= self.n);
        debug_assert!(cols.start.is_multiple_of(WIDTH) && cols.end.is_multiple_of(WIDTH));
        if let PanelData::Bf16Pairs(p) = &self.data {
            // Packed so only where the CPU has the tile.
            btile::product(p, m, (k0, kn), cols, dst, dst_rs, accumulate, lhs, lhs_rs);
            return;
        }
        let span = (cols.start, cols.len());
        if small::available() && m > small::MAX_ROWS_HALF {
            match &self.data {
                PanelData::Bf16(p) => {
                    return self.widened(p, m, (k0, kn), cols, dst, dst_rs, accumulate, lhs, lhs_rs)
                }
                PanelData::F16(p) => {
                    return self.widened(p, m, (k0, kn), cols, dst, dst_rs, accumulate, lhs, lhs_rs)
                }
                PanelData::F32(_) | PanelData::Bf16Pairs(_) => {}
            }
        }
        if small::available() {
            macro_rules! tile {
                ($p:expr) => {
                    small::product_panels(
                        m,
                        (k0, kn),
                        span,
                        $p.as_ptr(),
                        self.k,
                        dst,
                        dst_rs,
                        accumulate,
                        lhs,
                        lhs_rs,
                    )
                };
            }
            match &self.data {
                PanelData::F32(p) => tile!(p),
                PanelData::Bf16(p) => tile!(p),
                PanelData::F16(p) => tile!(p),
                PanelData::Bf16Pairs(_) => unreachable!("multiplied by the BF16 tile"),
            }
            return;
        }
        // Without the tile: each panel block through the general kernel.
        self.general(m, (k0, kn), cols, dst, dst_rs, accumulate, lhs, lhs_rs);
    }

    /// [`Panels::product`] for 16-bit panels and many rows: each pass of [`PASS`] inner
    /// rows over up to [`GROUP`] panels is widened to float32 once, then every row tile
    /// reads the float32 copy. Widening in the tile's registers instead costs about two
    /// instructions per 8 weights on every row tile: nothing at a few rows, about 5% of
    /// the product at a few hundred.
    ///
    /// # Safety
    /// As [`Panels::product`], with the AVX2 tile [`small::available`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn widened<T: small::Elem + Widen>(
        &self,
        p: &[T],
        m: usize,
        (k0, kn): (usize, usize),
        cols: std::ops::Range<usize>,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_rs: usize,
    ) {
        WIDE.with(|wide| {
            let mut wide = wide.borrow_mut();
            wide.resize(PASS * GROUP * WIDTH, 0.0);
            for c0 in cols.clone().step_by(GROUP * WIDTH) {
                let nc = (GROUP * WIDTH).min(cols.end - c0);
                for kk in (0..kn).step_by(PASS) {
                    let kc = PASS.min(kn - kk);
                    // The group's panels for inner rows k0 + kk.., as panels `kc` deep.
                    for j in 0..nc / WIDTH {
                        let at = (c0 + j * WIDTH) * self.k + (k0 + kk) * WIDTH;
                        let out = &mut wide[j * kc * WIDTH..(j + 1) * kc * WIDTH];
                        T::widen(&p[at..at + kc * WIDTH], out);
                    }
                    small::product_panels(
                        m,
                        (0, kc),
                        (0, nc),
                        wide.as_ptr(),
                        kc,
                        dst.add(c0 - cols.start),
                        dst_rs,
                        accumulate || kk > 0,
                        lhs.add(kk),
                        lhs_rs,
                    );
                }
            }
        });
    }

    /// [`Panels::product`] through the general kernel, one panel block at a time.
    ///
    /// # Safety
    /// As [`Panels::product`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn general(
        &self,
        m: usize,
        (k0, kn): (usize, usize),
        cols: std::ops::Range<usize>,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        lhs: *const f32,
        lhs_rs: usize,
    ) {
        let mut wide = Vec::new();
        for (j, c0) in cols.step_by(WIDTH).enumerate() {
            let at = c0 * self.k + k0 * WIDTH;
            let block: &[f32] = match &self.data {
                PanelData::F32(p) => &p[at..at + kn * WIDTH],
                PanelData::Bf16(p) => {
                    wide.clear();
                    wide.extend(p[at..at + kn * WIDTH].iter().map(|v| v.to_f32()));
                    &wide
                }
                PanelData::F16(p) => {
                    wide.clear();
                    wide.extend(p[at..at + kn * WIDTH].iter().map(|v| v.to_f32()));
                    &wide
                }
                PanelData::Bf16Pairs(_) => unreachable!("multiplied by the BF16 tile"),
            };
            gemm_into(
                m,
                WIDTH,
                kn,
                dst.add(j * WIDTH),
                dst_rs,
                accumulate,
                lhs,
                lhs_rs,
                1,
                block.as_ptr(),
                WIDTH,
                1,
                1.0,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn packing_round_trips_and_products_equal_the_row_major_weight() {
        let (k, n) = (600, 48);
        let wt: Vec<f32> = (0..k * n)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01)
            .collect();
        let p = Panels::from_wt(&wt, k, n, DType::F32);
        assert_eq!(p.to_f32(), wt);
        assert_eq!(p.bytes(), k * n * 4);
        // Rows across two row blocks (MC = 120), a tail tile, a column range that is
        // not the first panel, an inner range that is not the start, two passes over it.
        for m in [1, 7, 50, 131] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.1)
                .collect();
            let (k0, kn, cols) = (40, 540, 16..48);
            for accumulate in [false, true] {
                let mut got = vec![0.5f32; m * cols.len()];
                // SAFETY: the buffers hold the extents passed.
                unsafe {
                    p.product(
                        m,
                        (k0, kn),
                        cols.clone(),
                        got.as_mut_ptr(),
                        cols.len(),
                        accumulate,
                        x.as_ptr().add(k0),
                        k,
                    )
                };
                for i in 0..m {
                    for (jj, j) in cols.clone().enumerate() {
                        let mut want = if accumulate { 0.5f64 } else { 0.0 };
                        for l in k0..k0 + kn {
                            want += f64::from(x[i * k + l]) * f64::from(wt[l * n + j]);
                        }
                        let g = f64::from(got[i * cols.len() + jj]);
                        assert!((g - want).abs() < 1e-3, "m {m} ({i}, {j}): {g} vs {want}");
                    }
                }
            }
        }
        // 16-bit panels hold the rounded weights.
        let b = Panels::from_wt(&wt, k, n, DType::BF16);
        let want: Vec<f32> = wt.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(b.to_f32(), want);
        assert_eq!(b.bytes(), k * n * 2);
        let h = Panels::from_wt(&wt, k, n, DType::F16).scaled(2.0);
        let want: Vec<f32> = wt
            .iter()
            .map(|&v| f16::from_f32(f16::from_f32(v).to_f32() * 2.0).to_f32())
            .collect();
        assert_eq!(h.to_f32(), want);
    }
}
