//! Which keys a query row keeps, row by row on host values: the `top_k` /
//! `sparsity_ratio` selection and adaptive attention's temperature and sparsity
//! (docs/attention.md). The inference path and the training forward share them; in
//! training the chosen keys and the temperature are constants of the step (no gradient
//! flows through the choice).

use crate::config::CrossModalAttentionConfig;

/// Keeps in `allowed` (a row of 0/1) only the largest `logits` among the allowed ones:
/// `top_k` of them, or `max(1, ceil((1 - sparsity_ratio) n))` of the `n` allowed; a
/// row with at most that many allowed keys is unchanged.
pub(crate) fn keep_largest(
    allowed: &mut [f32],
    logits: &[f32],
    cfg: &CrossModalAttentionConfig,
    scratch: &mut Vec<f32>,
) {
    scratch.clear();
    scratch.extend(
        allowed
            .iter()
            .zip(logits)
            .filter(|(a, _)| **a != 0.0)
            .map(|(_, &v)| v),
    );
    let n = scratch.len();
    let k = match (cfg.top_k, cfg.sparsity_ratio) {
        (Some(k), _) => k,
        (None, Some(ratio)) => (((1.0 - ratio) * n as f64).ceil() as usize).max(1),
        (None, None) => n,
    };
    if n > k {
        scratch.sort_unstable_by(|x, y| y.total_cmp(x));
        let threshold = scratch[k - 1];
        for (a, &v) in allowed.iter_mut().zip(logits) {
            if v < threshold {
                *a = 0.0;
            }
        }
    }
}

/// Adaptive attention on one row: over the `n` allowed logits, `tau = clamp(std /
/// adaptive_target_std, min, max)`; the whole row is divided by `tau` in place and only
/// the `k = max(1, ceil((1 - s) n))` largest scaled logits stay allowed, with
/// `s = adaptive_max_sparsity * (1 - H / ln n)` from the entropy `H` of the row's
/// softmax at `tau`. Returns `tau` (1 and nothing changed when `n <= 1`).
pub(crate) fn adapt_row(
    logits: &mut [f32],
    allowed: &mut [f32],
    cfg: &CrossModalAttentionConfig,
    kept: &mut Vec<f64>,
) -> f64 {
    kept.clear();
    kept.extend(
        logits
            .iter()
            .zip(allowed.iter())
            .filter(|(_, &o)| o != 0.0)
            .map(|(&v, _)| f64::from(v)),
    );
    let n = kept.len();
    if n <= 1 {
        return 1.0;
    }
    let target = f64::from(cfg.adaptive_target_std);
    let (lo, hi) = (
        f64::from(cfg.adaptive_min_temperature),
        f64::from(cfg.adaptive_max_temperature),
    );
    let mean = kept.iter().sum::<f64>() / n as f64;
    let std = (kept.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let tau = (std / target).clamp(lo, hi);
    kept.iter_mut().for_each(|v| *v /= tau);
    let max = kept.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = kept.iter().map(|v| (v - max).exp()).sum();
    let entropy: f64 = kept
        .iter()
        .map(|v| {
            let p = (v - max).exp() / z;
            if p > 0.0 {
                -p * p.ln()
            } else {
                0.0
            }
        })
        .sum();
    let s = cfg.adaptive_max_sparsity * (1.0 - entropy / (n as f64).ln());
    let k = (((1.0 - s) * n as f64).ceil() as usize).clamp(1, n);
    for v in logits.iter_mut() {
        *v = (f64::from(*v) / tau) as f32;
    }
    if k < n {
        // The threshold from the scaled float32 values themselves, so that the k-th
        // largest is kept exactly.
        let mut vals: Vec<f32> = logits
            .iter()
            .zip(allowed.iter())
            .filter(|(_, &o)| o != 0.0)
            .map(|(&v, _)| v)
            .collect();
        vals.sort_unstable_by(|x, y| y.total_cmp(x));
        let threshold = vals[k - 1];
        for (v, o) in logits.iter().zip(allowed.iter_mut()) {
            if *v < threshold {
                *o = 0.0;
            }
        }
    }
    tau
}
