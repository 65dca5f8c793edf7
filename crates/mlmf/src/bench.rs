//! Entry points into the CPU kernels for `benches/` (hidden from the documentation; not
//! part of the API): one linear map `x W^T` in int8, float32 or bfloat16, as the encoders
//! run it.

use crate::kernels::{self, int8::Int8Matrix, panel::Panels, Lin, WeightRef};

/// A linear map quantised to int8 as an int8 load does it (7-bit codes per output
/// channel), run by the int8 kernel this CPU has.
pub struct Int8Linear {
    w: Int8Matrix,
    k: usize,
    n: usize,
}

impl Int8Linear {
    /// From a PyTorch-layout weight `[out, in]`.
    pub fn new(w: &[f32], out: usize, inn: usize) -> Self {
        let (codes, scales) = kernels::int8::quantize_out_in(w, out, inn);
        let mut wt = vec![0i8; out * inn];
        for (o, row) in codes.chunks_exact(inn).enumerate() {
            for (i, &c) in row.iter().enumerate() {
                wt[i * out + o] = c;
            }
        }
        let w = Int8Matrix::from_codes(&wt, scales, inn, out).expect("codes from the rule fit");
        Self { w, k: inn, n: out }
    }

    /// `dst = x W^T` for `m` rows.
    pub fn forward(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        let part = [Lin {
            w: WeightRef::Int8(&self.w),
            b: None,
        }];
        kernels::linear(x, m, self.k, &part, dst, self.n, false, None);
    }
}

/// A float32 (or bfloat16) linear map kept as panels, as a load in that dtype keeps it.
pub struct F32Linear {
    w: Panels,
    k: usize,
    n: usize,
}

impl F32Linear {
    /// From a PyTorch-layout weight `[out, in]` (`out` a multiple of 16).
    pub fn new(w: &[f32], out: usize, inn: usize) -> Self {
        Self::in_dtype(w, out, inn, candle_core::DType::F32)
    }

    /// The same in bfloat16: on the BF16 tile where this CPU has it (and
    /// `MLMF_BF16_KERNEL` does not say `widen`), else widened to float32.
    pub fn bf16(w: &[f32], out: usize, inn: usize) -> Self {
        Self::in_dtype(w, out, inn, candle_core::DType::BF16)
    }

    fn in_dtype(w: &[f32], out: usize, inn: usize, dtype: candle_core::DType) -> Self {
        assert!(
            Panels::fits(out),
            "{out} outputs: expected a multiple of 16"
        );
        let w = Panels::from_out_in(w, inn, out, dtype);
        Self { w, k: inn, n: out }
    }

    /// Whether the products run on the BF16 tile.
    pub fn on_bf16_tile(&self) -> bool {
        self.w.bf16_products()
    }

    /// `dst = x W^T` for `m` rows.
    pub fn forward(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        let part = [Lin {
            w: WeightRef::Panel(&self.w),
            b: None,
        }];
        kernels::linear(x, m, self.k, &part, dst, self.n, false, None);
    }
}

/// Whether this CPU multiplies bfloat16 on the BF16 tile.
pub fn bf16_tile() -> bool {
    kernels::btile::supported()
}

/// Multi-head self-attention over the projections `qkv` `[b*t, 3d]` (queries, keys,
/// values side by side) into `ctx` `[b*t, d]`, scaled by `1/sqrt(d/heads)`, as an
/// encoder layer runs it: with `bf16` both products run on the BF16 tile (where the CPU
/// has it), as next to bfloat16 weights, at any key count (layers keep float32 below
/// the count the tile pays off at).
pub fn attention(qkv: &[f32], shape: (usize, usize, usize, usize), bf16: bool, ctx: &mut [f32]) {
    let scale = ((shape.2 / shape.3) as f32).powf(-0.5);
    kernels::attention::attention_on(qkv, shape, scale, None, ctx, bf16);
}

/// The fewest keys for which a bfloat16 layer's attention runs on the BF16 tile.
pub const MIN_TILE_KEYS: usize = kernels::attention::MIN_TILE_KEYS;

/// Median seconds of `f` over enough calls to fill about half a second.
pub fn median_s(mut f: impl FnMut()) -> f64 {
    f();
    let t = std::time::Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.5 / once) as usize).clamp(5, 200);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

/// The largest difference between `got` and `want`, relative to `want`'s largest value.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    worst / scale
}
