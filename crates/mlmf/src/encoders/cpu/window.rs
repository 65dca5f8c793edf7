//! Shifted-window (Swin) blocks on the float32 CPU path ([`crate::encoders::htsat`]).
//!
//! A block is a pre-norm transformer layer whose attention runs inside windows of a
//! token grid, the grid rolled by half a window in every other block. Here the roll
//! and the window partition are one row permutation fused into the first layer norm
//! (each window's tokens land side by side), attention runs one task per (window,
//! head, query block) with the per-window bias, and the inverse permutation is fused
//! into the residual add. The MLP is per token and runs in grid order. A stack of
//! blocks keeps its state in one buffer: no candle op between them.

use candle_core::Tensor;
use rayon::prelude::*;

use super::{attention, is_plain_f32, layer_norm, linear, with_slices, Bias, Lin};
use crate::encoders::layers::{ce, Activation, LayerNorm, Linear};
use crate::error::{MlmfError, Result};

/// One block's weights and geometry.
pub(crate) struct WindowBlock<'a> {
    pub norm1: &'a LayerNorm,
    pub q: &'a Linear,
    pub k: &'a Linear,
    pub v: &'a Linear,
    pub o: &'a Linear,
    pub norm2: &'a LayerNorm,
    pub fc1: &'a Linear,
    pub fc2: &'a Linear,
    pub act: Activation,
    pub heads: usize,
    /// Tokens per window.
    pub window_tokens: usize,
    /// Per position in window order, the grid token it reads (roll and partition).
    pub gather: &'a [u32],
    /// Per grid token, its position in window order.
    pub scatter: &'a [u32],
    /// `[windows, heads, T, T]`: relative positions and the shift mask.
    pub bias: &'a Bias,
}

impl<'a> WindowBlock<'a> {
    fn linears(&self) -> [&'a Linear; 6] {
        [self.q, self.k, self.v, self.o, self.fc1, self.fc2]
    }

    fn norms(&self) -> [&'a Tensor; 4] {
        [
            &self.norm1.weight,
            &self.norm1.bias,
            &self.norm2.weight,
            &self.norm2.bias,
        ]
    }
}

/// Layer norm of the rows of `x` `[B*L, C]` read in `gather` order (per batch row)
/// into `out`.
fn gathered_norm(
    x: &[f32],
    c: usize,
    l: usize,
    gather: &[u32],
    n: (&[f32], &[f32], f32),
    out: &mut [f32],
) {
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / l, row % l);
        let src = (bi * l + gather[i] as usize) * c;
        layer_norm(&x[src..src + c], c, (n.0, n.1), n.2, o);
    });
}

/// Runs `blocks` on `x` `[B, L, C]` when it and every weight are float32 CPU tensors;
/// `None` otherwise (the candle ops run then).
pub(crate) fn run_blocks(x: &Tensor, blocks: &[WindowBlock<'_>]) -> Result<Option<Tensor>> {
    if blocks.is_empty()
        || !is_plain_f32(x)
        || !blocks.iter().all(|b| {
            b.linears().iter().all(|l| l.runs_here()) && b.norms().iter().all(|t| is_plain_f32(t))
        })
    {
        return Ok(None);
    }
    let f = ce("window blocks");
    let (b, l, c) = x.dims3().map_err(&f)?;
    let m = b * l;
    let mut x: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let mut h = vec![0f32; m * c];
    let mut qkv = vec![0f32; m * 3 * c];
    let mut ctx = vec![0f32; m * c];
    let mut u: Vec<f32> = Vec::new();
    for blk in blocks {
        let t = blk.window_tokens;
        if t == 0 || !l.is_multiple_of(t) || blk.gather.len() != l || blk.scatter.len() != l {
            return Err(MlmfError::Internal("window blocks: geometry".into()));
        }
        let tensors: Vec<Option<&Tensor>> = blk
            .linears()
            .iter()
            .flat_map(|l| l.tensors())
            .chain(blk.norms().into_iter().map(Some))
            .collect();
        with_slices(&tensors, |s| -> Result<()> {
            let lins = blk.linears();
            let lin = |i: usize| -> Option<Lin<'_>> { lins[i].lin(s[2 * i], s[2 * i + 1]) };
            let (Some(q), Some(k), Some(v), Some(o), Some(fc1), Some(fc2)) =
                (lin(0), lin(1), lin(2), lin(3), lin(4), lin(5))
            else {
                return Err(MlmfError::Internal("window block weights".into()));
            };
            let f = |i: usize| s[i].and_then(|w| w.f32());
            let (Some(n1w), Some(n1b), Some(n2w), Some(n2b)) = (f(12), f(13), f(14), f(15)) else {
                return Err(MlmfError::Internal("window block norms".into()));
            };
            let mlp = fc1.w.len() / c;
            u.resize(m * mlp, 0.0);
            // Attention in window order, back into grid order with the residual.
            gathered_norm(&x, c, l, blk.gather, (n1w, n1b, blk.norm1.eps), &mut h);
            linear(&h, m, c, &[q, k, v], &mut qkv, 3 * c, false, None);
            let scale = 1.0 / ((c / blk.heads) as f32).sqrt();
            attention(
                &qkv,
                m / t,
                t,
                c,
                blk.heads,
                scale,
                Some(blk.bias),
                &mut ctx,
                crate::kernels::attention::bf16_products(q.w),
            );
            linear(&ctx, m, c, &[o], &mut h, c, false, None);
            x.par_chunks_mut(c).enumerate().for_each(|(row, xr)| {
                let (bi, j) = (row / l, row % l);
                let src = (bi * l + blk.scatter[j] as usize) * c;
                for (a, b) in xr.iter_mut().zip(&h[src..src + c]) {
                    *a += b;
                }
            });
            // The MLP, per token.
            layer_norm(&x, c, (n2w, n2b), blk.norm2.eps, &mut h);
            linear(&h, m, c, &[fc1], &mut u, mlp, false, Some(blk.act));
            linear(&u, m, mlp, &[fc2], &mut x, c, true, None);
            Ok(())
        })?;
    }
    Tensor::from_vec(x, (b, l, c), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}
