//! Vectorisable elementwise math: exp, erf, tanh, the activations, and sums with
//! independent accumulators.

/// The activations transformers' `ACT2FN` names, as the supported configs use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Exact GELU, `x * Φ(x)` (`gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    Relu,
    /// `x * sigmoid(x)` (`silu`, `swish`).
    Silu,
}

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
pub(crate) fn pow2(n: f32) -> f32 {
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
pub(crate) fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.abs());
    (1.0 - 2.0 / (e + 1.0)).copysign(x)
}

impl Activation {
    /// The activation of one value, as [`Activation::forward`] computes it.
    #[inline(always)]
    pub(crate) fn apply(self, x: f32) -> f32 {
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
    pub(crate) fn apply_slice(self, xs: &mut [f32]) {
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

/// The largest `|x|`, with eight independent accumulators.
#[inline]
pub(crate) fn max_abs(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0f32, |m, &v| m.max(v.abs()));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v.abs());
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `row = exp(row - max(row))` in place; returns the sum of the new values.
///
/// With AVX2 the exponentials and their sum are one pass of [`exp`]'s arithmetic in
/// intrinsics (the same operations in the same order, so the same values), two vector
/// accumulators wide; the compiler vectorised neither the fused loop nor, in the sum's
/// pass, more than one dependent accumulator. Elsewhere: separate passes.
#[inline]
pub(crate) fn exp_sum(row: &mut [f32]) -> f32 {
    let m = max(row);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    // SAFETY: AVX2 and FMA are compiled in.
    unsafe {
        x86::exp_sub_sum(row, m)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        row.iter_mut().for_each(|s| *s = exp(*s - m));
        sum(row)
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::exp`] of eight values (clamping with `vminps`/`vmaxps`).
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_castps_si256(_mm256_add_ps(n, _mm256_set1_ps(12_582_912.0 + 127.0)));
        _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
    }

    /// `row = exp(row - m)`, returning the sum.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline]
    pub(super) unsafe fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
        let whole = row.len() / 16 * 16;
        let mv = _mm256_set1_ps(m);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let p = row.as_mut_ptr();
        for i in (0..whole).step_by(16) {
            let e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            let e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), mv));
            _mm256_storeu_ps(p.add(i), e0);
            _mm256_storeu_ps(p.add(i + 8), e1);
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1));
        let mut total: f32 = lanes.iter().sum();
        for v in &mut row[whole..] {
            *v = super::exp(*v - m);
            total += *v;
        }
        total
    }
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
    fn exp_sum_equals_exp_of_the_shifted_row() {
        // Rows with and without a vector tail, a masked entry and extreme logits.
        for len in [0usize, 1, 7, 16, 33, 1500] {
            let mut row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            if len > 3 {
                row[2] = -1e30;
                row[3] = 200.0;
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let want: Vec<f32> = row.iter().map(|&v| exp(v - m)).collect();
            let total = exp_sum(&mut row);
            assert_eq!(row, want, "len {len}");
            let s: f64 = want.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (f64::from(total) - s).abs() <= 1e-6 * s.max(1.0),
                "len {len}"
            );
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
}
