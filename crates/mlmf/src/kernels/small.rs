//! Matrix products of a few rows (batch-1 inputs: 12 to 64 tokens) that read the
//! weight where it lies.
//!
//! A general kernel (the `gemm` crate's) first copies the block of `W^T` it is about to
//! use into a packed buffer. With many rows that copy is paid back many times; with a
//! few rows it is a large share of the work (at 50 rows, about a third of a CLIP
//! ViT-B/32 MLP product). Here a 6 x 16 register tile reads its 16 columns of `W^T`
//! straight from the weight, one 64-byte line per row of `W^T` (32 bytes for 16-bit
//! weights, widened in registers: a shift for bfloat16, `vcvtph2ps` for float16), and
//! the six rows of `x` as broadcasts: nothing is copied, and 16-bit weights cost no
//! extra pass. The inner dimension goes in passes of 256 rows of `W^T`, so that a
//! tile's block of the weight is read from memory once and from L1 by every row tile.
//!
//! The AVX2 + FMA tile is compiled in when the build targets those instructions (the
//! default, x86-64-v3); elsewhere [`available`] is false and callers use the general
//! kernels.

use half::{bf16, f16};

/// At most this many rows take the small-product kernel with 16-bit weights (which it
/// widens in registers, where the general path widens a block first) ...
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

    use super::{bf16, f16, Elem, MR};

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
    /// row stride `ldb`, `c` row stride `c_rs`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<T: Elem, const R: usize>(
        a: *const f32,
        a_rs: usize,
        k: usize,
        b: *const T,
        ldb: usize,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
    ) {
        const { assert!(R >= 1 && R <= MR) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
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
    debug_assert!(nc.is_multiple_of(NR) && available());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    for k0 in (0..kn).step_by(KC) {
        let kc = KC.min(kn - k0);
        let acc = accumulate || k0 > 0;
        for c0 in (0..nc).step_by(NR) {
            let b = w.add(k0 * ld + c0);
            for r0 in (0..m).step_by(MR) {
                let (a, c) = (lhs.add(r0 * lhs_rs + k0), dst.add(r0 * dst_rs + c0));
                macro_rules! tile {
                    ($r:literal) => {
                        x86::tile::<T, $r>(a, lhs_rs, kc, b, ld, c, dst_rs, acc)
                    };
                }
                match m - r0 {
                    1 => tile!(1),
                    2 => tile!(2),
                    3 => tile!(3),
                    4 => tile!(4),
                    5 => tile!(5),
                    _ => tile!(6),
                }
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
        let _ = (m, kn, w, ld, dst, dst_rs, accumulate, lhs, lhs_rs);
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
