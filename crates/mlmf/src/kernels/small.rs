//! The 6 x 16 AVX2 register tile under the CPU linear maps.
//!
//! The tile reads 16 columns of `W^T` per inner index (one 64-byte line in float32, 32
//! bytes in 16 bits, widened in registers: a shift for bfloat16, `vcvtph2ps` for
//! float16) and six rows of `x` as broadcasts, accumulating in twelve registers; the
//! inner dimension goes in passes, so that the block of the weight a pass reads stays
//! in cache while every row tile uses it. It reads `W^T` in one of two layouts:
//!
//! - [`product_panels`]: panels ([`super::panel`]), the layout CPU linear maps are
//!   loaded in, at any row count (rows in blocks that stay in L2), prefetching the next
//!   panel as it goes;
//! - [`product`]: a row-major `W^T` read in place, for 16-bit maps kept contiguous (a
//!   width that is not a multiple of 16 cut to its whole panels) and float32 products
//!   of a few rows.
//!
//! The AVX2 + FMA tile is compiled in when the build targets those instructions (the
//! default, x86-64-v3); elsewhere [`available`] is false and callers use the general
//! kernels.

use half::{bf16, f16};

/// At most this many rows take the tile with 16-bit weights widened in its registers;
/// more rows widen a block of the weight first (panels: [`super::panel`]; contiguous
/// `W^T`: [`super::half`]) ...
pub(crate) const MAX_ROWS_HALF: usize = 64;
/// ... and with float32 weights, where it gains only while the general kernel's copy
/// of the block is a large share (measured single-threaded on this machine's Zen 2
/// cores: 12 rows 79 against 66-72 GFLOP/s, 50 rows level).
pub(crate) const MAX_ROWS_F32: usize = 16;

/// Rows and columns of the register tile.
const MR: usize = 6;
const NR: usize = 16;

/// Rows of `W^T` per pass: their 16-column block (16 KB in float32) stays in the L1
/// cache while every row tile of `x` uses it.
const KC: usize = 256;

/// Whether this build has the small-product kernel.
pub(crate) const fn available() -> bool {
    cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))
}

/// A weight element the tile widens to float32 in registers.
pub(crate) trait Elem: Copy {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    /// Eight consecutive values at `p` as float32.
    ///
    /// # Safety
    /// `p` must address eight readable values.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod x86 {
    use std::arch::x86_64::*;

    use super::{bf16, f16, Elem, MR, NR};

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Elem for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    impl Elem for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
    }

    /// `c[0..R, 0..16] (+)= a[0..R, 0..k] · b[0..k, 0..16]` (`a` row stride `a_rs`, `b`
    /// row stride `ldb`, `c` row stride `c_rs`). With `PF`, row `kk` of the next block
    /// (`pf`, rows 16 values apart) is prefetched into L2 as row `kk` of `b` is read.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<T: Elem, const R: usize, const PF: bool>(
        a: *const f32,
        a_rs: usize,
        k: usize,
        b: *const T,
        ldb: usize,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
        pf: *const T,
    ) {
        const { assert!(R >= 1 && R <= MR) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            if PF {
                _mm_prefetch::<_MM_HINT_T1>(pf.add(kk * NR).cast());
            }
            let bp = b.add(kk * ldb);
            let b0 = T::load8(bp);
            let b1 = T::load8(bp.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * a_rs + kk));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let cp = c.add(r * c_rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cp));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cp.add(8)));
            }
            _mm256_storeu_ps(cp, v0);
            _mm256_storeu_ps(cp.add(8), v1);
        }
    }
}

/// `dst[0..m, 0..nc] (+)= lhs[0..m, 0..kn] · w[0..kn, 0..nc]` for `nc` a multiple of 16,
/// `w` row-major with row stride `ld` (a block of `W^T`), read in place.
///
/// # Safety
/// `lhs` must address `m` rows of `kn` values (row stride `lhs_rs`), `w` `kn` rows of
/// `nc` values (row stride `ld`), `dst` `m` rows of `nc` values (row stride `dst_rs`),
/// not overlapping the others. Only when [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product<T: Elem>(
    m: usize,
    kn: usize,
    nc: usize,
    w: *const T,
    ld: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    let block = |k0: usize, c0: usize| (w.add(k0 * ld + c0), ld);
    blocked::<T, false>(m, kn, nc, KC, block, dst, dst_rs, accumulate, lhs, lhs_rs);
}

/// Rows of `W^T` per pass over panels (`[KC_PANEL, 16]`, 32 KB in float32, read in
/// memory order; measured best of 256 and 512 at 12 to 400 rows).
const KC_PANEL: usize = 512;

/// [`product`] for a weight stored as panels ([`super::panel`]): `W^T`'s columns
/// `c0 + 16 j .. c0 + 16 (j + 1)` (inner rows `k0..k0 + kn`) are the `[kn, 16]` block at
/// `panels + (c0 / 16 + j) * k * 16 + k0 * 16`, contiguous. Rows go in blocks of
/// [`MC`], so that a block of `lhs` stays in the L2 cache while every panel passes.
///
/// The first row tile on a block prefetches the next block into the L2 cache: a
/// model's weights do not fit in the caches, so each forward streams them from memory,
/// and the hardware prefetcher alone left the tile waiting (measured with two threads
/// streaming 12 weights of 768 x 3072 at 50 rows: about 150 GFLOP/s without, 168 with
/// a prefetch into L1, which the block itself fills, 180 into L2).
///
/// # Safety
/// `panels` must address the whole `[n / 16, k, 16]` layout with `c0 + nc <= n`,
/// `k0 + kn <= k`, `c0` and `nc` multiples of 16; `lhs` and `dst` as for [`product`].
/// Only when [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_panels<T: Elem>(
    m: usize,
    (k0, kn): (usize, usize),
    (c0, nc): (usize, usize),
    panels: *const T,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    debug_assert!(c0.is_multiple_of(NR) && k0 + kn <= k);
    let block = |kk: usize, c: usize| (panels.add((c0 + c) * k + (k0 + kk) * NR), NR);
    for r0 in (0..m).step_by(MC) {
        let rows = MC.min(m - r0);
        blocked::<T, true>(
            rows,
            kn,
            nc,
            KC_PANEL,
            block,
            dst.add(r0 * dst_rs),
            dst_rs,
            accumulate,
            lhs.add(r0 * lhs_rs),
            lhs_rs,
        );
    }
}

/// Rows of `lhs` per block of [`product_panels`] (a multiple of [`MR`]; 120 rows of a
/// 512-long pass are 240 KB).
const MC: usize = 120;

/// The loop nest: passes of `kc` inner rows, 16-column blocks (`block(k, c)` gives the
/// block's first weight and its row stride), 6-row tiles. With `PF` (blocks whose rows
/// are 16 values apart) the first row tile prefetches the next block.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn blocked<T: Elem, const PF: bool>(
    m: usize,
    kn: usize,
    nc: usize,
    kc_max: usize,
    block: impl Fn(usize, usize) -> (*const T, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    debug_assert!(nc.is_multiple_of(NR) && available());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    // Rows in tiles of as equal a height as allows at most 6 (50 rows: four of 5 and
    // five of 6, not eight of 6 and one of 2): a tile of few rows has too few
    // accumulators to cover the FMA latency.
    let tiles = m.div_ceil(MR);
    let (base, extra) = (m / tiles.max(1), m % tiles.max(1));
    for k0 in (0..kn).step_by(kc_max) {
        let kc = kc_max.min(kn - k0);
        let acc = accumulate || k0 > 0;
        for c0 in (0..nc).step_by(NR) {
            let (b, ld) = block(k0, c0);
            // The next block: the next panel, or the first of the next pass.
            let next = if !PF {
                None
            } else if c0 + NR < nc {
                Some(block(k0, c0 + NR).0)
            } else if k0 + kc < kn {
                Some(block(k0 + kc, 0).0)
            } else {
                None
            };
            let mut r0 = 0;
            for t in 0..tiles {
                let rows = base + usize::from(t < extra);
                let (a, c) = (lhs.add(r0 * lhs_rs + k0), dst.add(r0 * dst_rs + c0));
                let pf = next.filter(|_| r0 == 0);
                macro_rules! tile {
                    ($r:literal) => {
                        match pf {
                            Some(p) => {
                                x86::tile::<T, $r, true>(a, lhs_rs, kc, b, ld, c, dst_rs, acc, p)
                            }
                            None => x86::tile::<T, $r, false>(
                                a,
                                lhs_rs,
                                kc,
                                b,
                                ld,
                                c,
                                dst_rs,
                                acc,
                                std::ptr::null(),
                            ),
                        }
                    };
                }
                match rows {
                    1 => tile!(1),
                    2 => tile!(2),
                    3 => tile!(3),
                    4 => tile!(4),
                    5 => tile!(5),
                    _ => tile!(6),
                }
                r0 += rows;
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = (
            m, kn, nc, kc_max, block, dst, dst_rs, accumulate, lhs, lhs_rs,
        );
        unreachable!("small::product without the AVX2 tile");
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
mod portable {
    use super::{bf16, f16, Elem};
    impl Elem for f32 {}
    impl Elem for bf16 {}
    impl Elem for f16 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Elem>(wide: impl Fn(f32) -> T, back: impl Fn(T) -> f32) {
        // Every row count of the tile (1..=6) and a second row block, a column block
        // inside a wider weight, two passes over the inner dimension, and accumulation.
        let (kn, ld, c0, nc) = (300, 80, 16, 48);
        let w: Vec<T> = (0..kn * ld)
            .map(|i| wide(((i * 13 % 29) as f32 - 14.0) * 0.01))
            .collect();
        for m in 1..=13 {
            let x: Vec<f32> = (0..m * kn)
                .map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.1)
                .collect();
            for accumulate in [false, true] {
                let mut got = vec![0.5f32; m * nc];
                // SAFETY: the buffers hold the extents passed.
                unsafe {
                    product(
                        m,
                        kn,
                        nc,
                        w[c0..].as_ptr(),
                        ld,
                        got.as_mut_ptr(),
                        nc,
                        accumulate,
                        x.as_ptr(),
                        kn,
                    )
                };
                for i in 0..m {
                    for j in 0..nc {
                        let mut want = if accumulate { 0.5f64 } else { 0.0 };
                        for l in 0..kn {
                            want += f64::from(x[i * kn + l]) * f64::from(back(w[l * ld + c0 + j]));
                        }
                        let g = f64::from(got[i * nc + j]);
                        assert!((g - want).abs() < 1e-4, "m {m} ({i}, {j}): {g} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_equal_the_product_for_every_row_count_and_weight_format() {
        if !available() {
            return;
        }
        check(|v| v, |v| v);
        check(bf16::from_f32, |v| v.to_f32());
        check(f16::from_f32, |v| v.to_f32());
    }
}
