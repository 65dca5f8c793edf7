//! The core of softmax attention as one float32 CPU op with its backward pass, for
//! the training forward of plain attention (no soft-cap, window, key selection or
//! adaptive temperature; QK-norm is applied to the inputs beforehand):
//!
//! ```text
//! q [B, Tq, H, hd], k, v [B, Tk, Hkv, hd]          (the projections, heads in place)
//! w = softmax over allowed keys of scale q k^T     (kv padding; query head h reads kv head h / (H / Hkv))
//! ctx [B, Tq, H, hd] = w v                         (0 for masked query rows and rows with no key)
//! ```
//!
//! Heads are read in place (no transposes); the weights are recomputed in the backward
//! pass instead of kept. Work is split over (batch row, kv head) so that the key and
//! value gradients of a group of query heads are summed by one task.

use std::sync::Arc;

use super::par;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::ops::{slice, with_slice};
use crate::kernels::{dot, exp, gemm_into, max, sum};

/// Shapes, scale and masks of one attention call.
#[derive(Clone)]
pub(crate) struct AttnCore {
    pub(crate) b: usize,
    pub(crate) tq: usize,
    pub(crate) tk: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) hd: usize,
    pub(crate) scale: f32,
    /// `[B, Tk]` 0/1: which keys exist.
    pub(crate) kmask: Option<Arc<Vec<f32>>>,
    /// `[B, Tq]` 0/1: which query rows exist.
    pub(crate) qmask: Option<Arc<Vec<f32>>>,
}

impl AttnCore {
    fn real_query(&self, b: usize, i: usize) -> bool {
        self.qmask
            .as_ref()
            .is_none_or(|m| m[b * self.tq + i] != 0.0)
    }

    /// The weights of query head `h` of row `b`: `[Tq, Tk]`, 0 where not allowed.
    fn weights(&self, q: &[f32], k: &[f32], b: usize, h: usize, w: &mut [f32]) {
        let (hd, tq, tk) = (self.hd, self.tq, self.tk);
        let kvh = h / (self.heads / self.kv_heads);
        let (qs, ks) = (self.heads * hd, self.kv_heads * hd);
        // SAFETY: w is tq x tk; q rows of head h (stride qs), k rows of head kvh
        // (stride ks) read as k^T.
        unsafe {
            gemm_into(
                tq,
                tk,
                hd,
                w.as_mut_ptr(),
                tk,
                false,
                q.as_ptr().add(b * tq * qs + h * hd),
                qs,
                1,
                k.as_ptr().add(b * tk * ks + kvh * hd),
                1,
                ks,
                self.scale,
            );
        }
        for i in 0..tq {
            let row = &mut w[i * tk..(i + 1) * tk];
            if !self.real_query(b, i) {
                row.fill(0.0);
                continue;
            }
            if let Some(m) = &self.kmask {
                for (o, &k) in row.iter_mut().zip(&m[b * tk..(b + 1) * tk]) {
                    if k == 0.0 {
                        *o = f32::NEG_INFINITY;
                    }
                }
            }
            let m = max(row);
            if m == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            for o in row.iter_mut() {
                *o = if *o == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp(*o - m)
                };
            }
            let inv = 1.0 / sum(row);
            row.iter_mut().for_each(|o| *o *= inv);
        }
    }

    pub(super) fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (hd, tq, tk, h_all) = (self.hd, self.tq, self.tk, self.heads);
        let group = h_all / self.kv_heads;
        let (qs, ks) = (h_all * hd, self.kv_heads * hd);
        // One task per batch row; its ctx rows are its own, and every head's product
        // writes all of its columns.
        let row = |b: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
            let out = out.as_mut_ptr().cast::<f32>();
            let mut w = vec![0f32; tq * tk];
            for h in 0..h_all {
                self.weights(q, k, b, h, &mut w);
                let kvh = h / group;
                // SAFETY: out rows of head h (stride qs) = w [tq, tk] v_kvh [tk, hd].
                unsafe {
                    gemm_into(
                        tq,
                        hd,
                        tk,
                        out.add(h * hd),
                        qs,
                        false,
                        w.as_ptr(),
                        tk,
                        1,
                        v.as_ptr().add(b * tk * ks + kvh * hd),
                        ks,
                        1,
                        1.0,
                    );
                }
            }
        };
        // SAFETY: each chunk is written completely (heads 0..H cover the row's width).
        let (ctx, _) = unsafe { par::filled(self.b * tq * qs, tq * qs, row) };
        ctx
    }

    /// `(dq, dk, dv)` from the output gradient `g` `[B, Tq, H, hd]`.
    pub(super) fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (hd, tq, tk, h_all, kvh_all) = (self.hd, self.tq, self.tk, self.heads, self.kv_heads);
        let group = h_all / kvh_all;
        let (qs, ks) = (h_all * hd, kvh_all * hd);
        // Per (b, kv head): the dq rows of its query heads, and the dk and dv rows of
        // the kv head, written in place (disjoint between tasks): dq by one product per
        // query head, dk and dv by the group's first head and added to by the others.
        let (nq, nk) = (self.b * tq * qs, self.b * tk * ks);
        let mut dq: Vec<f32> = Vec::with_capacity(nq);
        let mut dk: Vec<f32> = Vec::with_capacity(nk);
        let mut dv: Vec<f32> = Vec::with_capacity(nk);
        let (dqp, dkp, dvp) = (
            par::Shared(dq.as_mut_ptr()),
            par::Shared(dk.as_mut_ptr()),
            par::Shared(dv.as_mut_ptr()),
        );
        par::for_ranges(self.b * kvh_all, |tasks| {
            let mut w = vec![0f32; tq * tk];
            let mut dw = vec![0f32; tq * tk];
            for task in tasks {
                let (b, kvh) = (task / kvh_all, task % kvh_all);
                // SAFETY (all products below): offsets stay inside the batch row's
                // rows of this head; the destinations are this task's own rows and
                // columns of dq, dk and dv.
                let (kp, vp) = unsafe {
                    (
                        k.as_ptr().add(b * tk * ks + kvh * hd),
                        v.as_ptr().add(b * tk * ks + kvh * hd),
                    )
                };
                let (dkt, dvt) = unsafe {
                    (
                        dkp.get().add(b * tk * ks + kvh * hd),
                        dvp.get().add(b * tk * ks + kvh * hd),
                    )
                };
                for gh in 0..group {
                    let h = kvh * group + gh;
                    let first = gh == 0;
                    self.weights(q, k, b, h, &mut w);
                    let gp = unsafe { g.as_ptr().add(b * tq * qs + h * hd) };
                    let qp = unsafe { q.as_ptr().add(b * tq * qs + h * hd) };
                    unsafe {
                        // dW = g v^T [tq, tk]; dV (+)= w^T g [tk, hd].
                        gemm_into(
                            tq,
                            tk,
                            hd,
                            dw.as_mut_ptr(),
                            tk,
                            false,
                            gp,
                            qs,
                            1,
                            vp,
                            1,
                            ks,
                            1.0,
                        );
                        at_b(dvt, (tk, hd, tq), !first, &w, (gp, qs), ks);
                    }
                    // dLogits = w (dW - rowsum(w dW)) scale, in place in dw.
                    for (wr, dr) in w.chunks_exact(tk).zip(dw.chunks_exact_mut(tk)) {
                        let wd = dot(wr, dr);
                        for (d, &wv) in dr.iter_mut().zip(wr) {
                            *d = wv * (*d - wd) * self.scale;
                        }
                    }
                    unsafe {
                        // dq = dL k [tq, hd]; dK (+)= dL^T q [tk, hd].
                        gemm_into(
                            tq,
                            hd,
                            tk,
                            dqp.get().add(b * tq * qs + h * hd),
                            qs,
                            false,
                            dw.as_ptr(),
                            tk,
                            1,
                            kp,
                            ks,
                            1,
                            1.0,
                        );
                        at_b(dkt, (tk, hd, tq), !first, &dw, (qp, qs), ks);
                    }
                }
            }
        });
        // SAFETY: every (row, head) block of dq and every (row, kv head) block of dk and
        // dv was written above (group >= 1; a product with an empty inner dimension
        // writes zeros).
        unsafe {
            dq.set_len(nq);
            dk.set_len(nk);
            dv.set_len(nk);
        }
        (dq, dk, dv)
    }
}

/// `dst [tk, hd] (+)= a^T b` for `a` `[tq, tk]` (contiguous) and `b` `[tq, hd]` (row
/// stride `b_rs`); `dst` has row stride `dst_rs`; `+=` when `accumulate`.
///
/// # Safety
/// `dst` and `b` must address their whole strided extents; `dst` must not overlap them.
unsafe fn at_b(
    dst: *mut f32,
    (tk, hd, tq): (usize, usize, usize),
    accumulate: bool,
    a: &[f32],
    (b, b_rs): (*const f32, usize),
    dst_rs: usize,
) {
    gemm_into(
        tk,
        hd,
        tq,
        dst,
        dst_rs,
        accumulate,
        a.as_ptr(),
        1,
        tk,
        b,
        b_rs,
        1,
        1.0,
    );
}

impl CustomOp3 for AttnCore {
    fn name(&self) -> &'static str {
        "mlmf-attention-core"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let ctx = self.forward(q, k, v);
        Ok((
            CpuStorage::F32(ctx),
            Shape::from((self.b, self.tq, self.heads * self.hd)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dq, dk, dv) = with_slice(q, |q| {
            with_slice(k, |k| {
                with_slice(v, |v| with_slice(&g, |g| self.backward(q, k, v, g)))
            })
        })????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// `ctx [B, Tq, H*hd]` of `q [B, Tq, H*hd]` over `k, v [B, Tk, Hkv*hd]`.
pub(crate) fn attention_core(
    core: AttnCore,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, core)
}
