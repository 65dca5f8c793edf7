//! 16-bit weights (bfloat16, float16) on the float32 kernels.
//!
//! A 16-bit weight stays 16-bit in memory (half the resident bytes of float32). Maps
//! stored as panels widen in the tile's registers ([`super::small`]); for a map kept as
//! a contiguous `W^T` (its width not a multiple of 16), each matrix product with many
//! rows widens the block of `W^T` it is about to read into a float32 scratch
//! of at most [`CHUNK`] values, a few hundred rows at a time, and runs the float32
//! kernel on it; activations, accumulation and the output stay float32. The widening
//! is a shift (bfloat16) or the F16C conversion (float16) over data that the product
//! then reads from cache.

use half::{bf16, f16};

use super::gemm_into;

/// The most float32 values one widened block holds (1 MB: in the last-level cache; the
/// product then packs it into its own L2-sized panels as it does a float32 weight).
const CHUNK: usize = 256 * 1024;

/// A 16-bit float that widens to float32.
pub(crate) trait Half: Copy + Send + Sync {
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Half for bf16 {
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

impl Half for f16 {
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
}

thread_local! {
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst (+)= lhs · W^T[0..kn, cols]` for an `m`-row `lhs` (row stride `lhs_rs`) and a
/// 16-bit `W^T` whose rows are `ld` wide, `w` starting at the first row to read.
///
/// # Safety
/// As [`gemm_into`]: `lhs` must address `m` rows of `kn` values, `dst` `m` rows of
/// `cols.len()` values with row stride `dst_rs`, not overlapping `lhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_half<T: Half>(
    m: usize,
    kn: usize,
    cols: std::ops::Range<usize>,
    w: &[T],
    ld: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    let nc = cols.len();
    if nc == 0 || m == 0 {
        return;
    }
    // Blocks of whole columns (every row of `W^T`), so that each output element is
    // written once; at least 16 columns, a multiple of 16 when there are more.
    let width = if nc <= 16 {
        nc
    } else {
        ((CHUNK / kn.max(1)) / 16 * 16).clamp(16, nc)
    };
    WIDE.with(|cell| {
        let mut wide = cell.borrow_mut();
        if wide.len() < kn * width {
            wide.resize(kn * width, 0.0);
        }
        for c0 in (0..nc).step_by(width) {
            let wc = width.min(nc - c0);
            let from = cols.start + c0;
            for r in 0..kn {
                T::widen(
                    &w[r * ld + from..r * ld + from + wc],
                    &mut wide[r * wc..(r + 1) * wc],
                );
            }
            gemm_into(
                m,
                wc,
                kn,
                dst.add(c0),
                dst_rs,
                accumulate,
                lhs,
                lhs_rs,
                1,
                wide.as_ptr(),
                wc,
                1,
                1.0,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widened_products_equal_the_float32_product_of_the_rounded_weights() {
        // More columns than one block holds, so the product runs in several passes.
        let (m, kn, ld) = (3, 2100, 300);
        let cols = 5..290;
        let x: Vec<f32> = (0..m * kn)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let w32: Vec<f32> = (0..kn * ld)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01)
            .collect();
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let nc = cols.len();
        for (name, rounded) in [
            ("bf16", wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            ("f16", wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
        ] {
            let mut got = vec![1f32; m * nc];
            // SAFETY: the buffers hold the extents passed.
            unsafe {
                match name {
                    "bf16" => gemm_half(
                        m,
                        kn,
                        cols.clone(),
                        &wb,
                        ld,
                        got.as_mut_ptr(),
                        nc,
                        true,
                        x.as_ptr(),
                        kn,
                    ),
                    _ => gemm_half(
                        m,
                        kn,
                        cols.clone(),
                        &wh,
                        ld,
                        got.as_mut_ptr(),
                        nc,
                        true,
                        x.as_ptr(),
                        kn,
                    ),
                }
            }
            for i in 0..m {
                for (j, c) in cols.clone().enumerate() {
                    let want: f64 = 1.0
                        + (0..kn)
                            .map(|l| f64::from(x[i * kn + l]) * f64::from(rounded[l * ld + c]))
                            .sum::<f64>();
                    let g = f64::from(got[i * nc + j]);
                    assert!((g - want).abs() < 1e-3, "{name} ({i}, {j}): {g} vs {want}");
                }
            }
        }
    }
}
