//! Layer norm over rows.

use rayon::prelude::*;

use super::{sum, sum_sq_dev};

/// Layer norm of each `d`-wide row of `x` into `out`.
pub(crate) fn layer_norm(x: &[f32], d: usize, (w, b): (&[f32], &[f32]), eps: f32, out: &mut [f32]) {
    let rows_per_task = (16384 / d).max(1);
    let rows = |out: &mut [f32], x: &[f32]| {
        for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let mean = sum(r) / d as f32;
            let var = sum_sq_dev(r, mean) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(r).zip(w).zip(b) {
                *o = ((v - mean) * rstd).mul_add(*w, *b);
            }
        }
    };
    // A few rows (pooled embeddings) cost less than waking the pool.
    if x.len() <= 4 * rows_per_task * d {
        rows(out, x);
    } else {
        out.par_chunks_mut(rows_per_task * d)
            .zip(x.par_chunks(rows_per_task * d))
            .for_each(|(out, x)| rows(out, x));
    }
}
