//! The CPU kernels: the floor under the encoders, the cross-modal attention and the
//! fusion stacks.
//!
//! Everything here works on plain slices (and the candle storage they are borrowed
//! from); nothing knows about layers or models. The stacks that run layers on these
//! kernels live with their layers ([`crate::encoders::cpu`]).
//!
//! - [`linear`]: `x W^T + b` with the bias, activation or residual applied to each
//!   output block right after it is computed, split over the threads by columns, rows
//!   or the inner dimension;
//! - [`attention`]: multi-head attention rows, one task per (batch row, head, block of
//!   up to 128 queries), softmax normalisation applied to the small output block, and
//!   the additive bias they read;
//! - [`norm`]: layer norm over rows;
//! - [`math`]: exp, erf, tanh and the activations as branch-free polynomials the
//!   compiler vectorises, and sums with independent accumulators;
//! - [`panel`]: weights stored as 16-column panels, the layout the tile reads;
//! - [`int8`] and [`qtile`]: dynamically quantised int8 linear maps and their
//!   AVX-512 VNNI and AVX2 register tiles;
//! - [`btile`]: bfloat16 products on the AVX-512 BF16 dot-product instruction, for
//!   bfloat16 weights and the attention next to bfloat16 and int8 weights, on CPUs
//!   that have it;
//! - [`tensor`]: borrowing the CPU storage of candle tensors, and transposing weights
//!   at load so that the kernels read them in memory order.
//!
//! Linear maps loaded for the CPU keep `W^T` as panels and run on the 6 x 16 AVX2 tile
//! of [`small`] at every row count; other float32 products (attention, weights built
//! at run time) use the `gemm` crate's kernels (the ones candle's CPU backend calls)
//! single-threaded inside each task.

pub(crate) mod attention;
pub(crate) mod btile;
pub(crate) mod half;
pub(crate) mod int8;
pub(crate) mod linear;
pub(crate) mod math;
pub(crate) mod norm;
pub(crate) mod panel;
pub(crate) mod qtile;
pub(crate) mod small;
pub(crate) mod tensor;

pub(crate) use attention::{attend_rows, attention, cross_attention, Bias, Rows, SCRATCH};
pub(crate) use linear::{linear, Lin, WeightRef, PARALLEL_MIN_MACS};
pub(crate) use math::{dot, erf, exp, exp_sum, max, max_abs, sum, sum_sq_dev, tanh, Activation};
pub(crate) use norm::layer_norm;
pub(crate) use tensor::{
    is_plain_f32, is_plain_weight, slice, transpose, transpose_le_bytes, weight_data, with_slices,
};

/// Deterministic values spread over `[-amp, amp]`, for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: usize, amp: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i + seed) * 2_654_435_761) % 2001) as f32 / 1000.0 - 1.0) * amp)
        .collect()
}

/// Added to the attention logits of masked keys: far below any real logit, yet finite
/// so that a row with every key masked stays a number.
pub(crate) const MASKED: f32 = -1e30;

/// A destination shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct Dst(pub(crate) *mut f32);
// SAFETY: every use splits the destination into disjoint regions, one per task.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer (a method, so that closures capture the whole `Dst`, which is
    /// `Send`, rather than its raw-pointer field).
    pub(crate) fn ptr(self) -> *mut f32 {
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
