//! Fused float32 CPU ops with their backward passes, for the hot spots of the
//! training forward: linear maps (bias in the product, the three backward products
//! straight to gemm), LayerNorm, RMSNorm, exact GELU and the row softmax. Composed
//! from candle's elementwise ops each would allocate and walk its tensor ten to
//! twenty times between forward and backward; here forward and backward are one pass
//! over the rows each, split between threads. The math is the composed ops' (nn.rs),
//! which still serve other devices and dtypes; tests hold the two equal.

use super::par;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::kernels::{dot, erf, exp, gemm_into, max, sum, sum_sq_dev};

/// Rows per parallel task: enough work to amortise a task.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused op: non-contiguous input"),
    }
}

/// Runs `f` on a float32 tensor's values: in place for a contiguous CPU tensor, else
/// on a host copy.
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (st, l) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(c), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            return Ok(f(&c.as_slice::<f32>()?[a..b]));
        }
    }
    let host = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&host))
}

/// A vector of `n` values that `fill` writes completely (no zeroing first).
fn filled(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(v.as_mut_ptr());
    // SAFETY: `fill` wrote all `n` values through the pointer.
    unsafe { v.set_len(n) };
    v
}

/// `f(r, row r of a, row r of b, row r of the output)` over the `d`-wide rows (`b` may
/// be empty), split between the pool's threads; the output has `a`'s length.
fn map_rows(
    a: &[f32],
    b: &[f32],
    d: usize,
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let d = d.max(1);
    let per = rows_per_task(d);
    let mut y = vec![0f32; a.len()];
    par::chunks_mut(&mut y, d * per, |i, yc| {
        let n = yc.len();
        let ac = &a[i * d * per..][..n];
        for (k, (yr, ar)) in yc.chunks_exact_mut(d).zip(ac.chunks_exact(d)).enumerate() {
            let r = i * per + k;
            let br = if b.is_empty() {
                &[][..]
            } else {
                &b[r * d..(r + 1) * d]
            };
            f(r, ar, br, yr);
        }
    });
    y
}

/// Sums `parts` (per-task partial vectors of length `n`).
fn reduce(parts: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    let mut acc = vec![0f32; n];
    for p in parts {
        acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    acc
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension.
pub(super) struct LayerNorm {
    pub(super) eps: f32,
}

impl LayerNorm {
    /// Mean and `1 / sqrt(var + eps)` of a row.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = sum(row) / n;
        let var = sum_sq_dev(row, mean) / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "mlmf-layer-norm"
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
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        Ok((CpuStorage::F32(self.forward(x, w, b)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_slice(x, |xv| {
            with_slice(w, |wv| with_slice(g, |gv| self.grads(x, xv, wv, gv)))
        })???
    }
}

impl LayerNorm {
    pub(super) fn forward(&self, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let d = w.len().max(1);
        let chunk = d * rows_per_task(d);
        // SAFETY: every row of every chunk is written.
        let (y, _) = unsafe {
            par::filled(x.len(), chunk, |i, yc| {
                let xc = &x[i * chunk..][..yc.len()];
                for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    let (mean, r) = self.stats(xr);
                    for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                        o.write((v - mean) * r * wi + bi);
                    }
                }
            })
        };
        y
    }

    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        xv: &[f32],
        wv: &[f32],
        gv: &[f32],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = wv.len();
        let (dx, dw, db) = self.grads_host(xv, wv, gv);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }

    /// `(dx, dw, db)` for the output gradient `gv`.
    pub(super) fn grads_host(
        &self,
        xv: &[f32],
        wv: &[f32],
        gv: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = wv.len();
        let chunk = d * rows_per_task(d);
        // SAFETY: every row of every chunk is written (the second loop over `i`).
        let (dx, parts) = unsafe {
            par::filled(xv.len(), chunk, |i, dxc| {
                let (xc, gc) = (&xv[i * chunk..][..dxc.len()], &gv[i * chunk..][..dxc.len()]);
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                let mut gw = vec![0f32; d];
                for ((dxr, xr), gr) in dxc
                    .chunks_exact_mut(d)
                    .zip(xc.chunks_exact(d))
                    .zip(gc.chunks_exact(d))
                {
                    let (mean, r) = self.stats(xr);
                    for (((((xh, gwi), dwi), dbi), (&xi, &gi)), &wi) in xhat
                        .iter_mut()
                        .zip(gw.iter_mut())
                        .zip(dw.iter_mut())
                        .zip(db.iter_mut())
                        .zip(xr.iter().zip(gr))
                        .zip(wv)
                    {
                        *xh = (xi - mean) * r;
                        *gwi = gi * wi;
                        *dwi += gi * *xh;
                        *dbi += gi;
                    }
                    // Sums with independent accumulators, so that they vectorise.
                    let (m1, m2) = (sum(&gw) / d as f32, dot(&gw, &xhat) / d as f32);
                    for ((o, &gwi), &xh) in dxr.iter_mut().zip(&gw).zip(&xhat) {
                        o.write(r * (gwi - m1 - xh * m2));
                    }
                }
                (dw, db)
            })
        };
        let (dws, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        (dx, reduce(dws, d), reduce(dbs, d))
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "mlmf-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = w.len();
        let y = map_rows(x, &[], d, |_, xr, _, yr| {
            let r = 1.0 / (dot(xr, xr) / d as f32 + self.eps).sqrt();
            for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * wi;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        with_slice(x, |xv| {
            with_slice(w, |wv| with_slice(g, |gv| self.grads(x, xv, wv, gv)))
        })???
    }
}

impl RmsNorm {
    fn grads(
        &self,
        x: &Tensor,
        xv: &[f32],
        wv: &[f32],
        gv: &[f32],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = wv.len();
        let chunk = d * rows_per_task(d);
        let mut dx = vec![0f32; xv.len()];
        let dws: Vec<Vec<f32>> = par::chunks_mut(&mut dx, chunk, |i, dxc| {
            let (xc, gc) = (&xv[i * chunk..][..dxc.len()], &gv[i * chunk..][..dxc.len()]);
            let mut dw = vec![0f32; d];
            let mut gw = vec![0f32; d];
            for ((dxr, xr), gr) in dxc
                .chunks_exact_mut(d)
                .zip(xc.chunks_exact(d))
                .zip(gc.chunks_exact(d))
            {
                let r = 1.0 / (dot(xr, xr) / d as f32 + self.eps).sqrt();
                for (((gwi, dwi), (&gi, &xi)), &wi) in gw
                    .iter_mut()
                    .zip(dw.iter_mut())
                    .zip(gr.iter().zip(xr))
                    .zip(wv)
                {
                    *gwi = gi * wi;
                    *dwi += gi * xi * r;
                }
                let k = dot(&gw, xr) * r * r * r / d as f32;
                for ((o, &gwi), &xi) in dxr.iter_mut().zip(&gw).zip(xr) {
                    *o = r * gwi - k * xi;
                }
            }
            dw
        });
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(reduce(dws, d), d, dev)?),
        ))
    }
}

/// `0.5 x (1 + erf(x / sqrt 2))` elementwise.
pub(super) struct Gelu;

const CHUNK: usize = 16_384;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "mlmf-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(Self::forward(slice(s, l)?)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        with_slice(x, |xv| with_slice(g, |gv| Self::grads(x, xv, gv)))??
    }
}

impl Gelu {
    pub(super) fn forward(x: &[f32]) -> Vec<f32> {
        // SAFETY: every element of every chunk is written.
        let (y, _) = unsafe {
            par::filled(x.len(), CHUNK, |i, yc| {
                let xc = &x[i * CHUNK..][..yc.len()];
                for (o, &v) in yc.iter_mut().zip(xc) {
                    o.write(0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)));
                }
            })
        };
        y
    }

    fn grads(x: &Tensor, xv: &[f32], gv: &[f32]) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(Tensor::from_vec(
            Self::grads_host(xv, gv),
            x.shape(),
            x.device(),
        )?))
    }

    /// The input's gradient for the output gradient `gv`.
    pub(super) fn grads_host(xv: &[f32], gv: &[f32]) -> Vec<f32> {
        // d/dx = Phi(x) + x phi(x).
        let c = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        // SAFETY: every element of every chunk is written.
        let (dx, _) = unsafe {
            par::filled(xv.len(), CHUNK, |i, dc| {
                let (xc, gc) = (&xv[i * CHUNK..][..dc.len()], &gv[i * CHUNK..][..dc.len()]);
                for ((o, &v), &gi) in dc.iter_mut().zip(xc).zip(gc) {
                    let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    o.write(gi * (cdf + v * c * exp(-0.5 * v * v)));
                }
            })
        };
        dx
    }
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "mlmf-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let d = l.dims().last().copied().unwrap_or(1);
        let y = map_rows(x, &[], d, |_, xr, _, yr| {
            let m = max(xr);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = exp(v - m);
            }
            let inv = 1.0 / sum(yr);
            yr.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        with_slice(res, |yv| with_slice(g, |gv| Self::grads(res, yv, gv)))??
    }
}

impl Softmax {
    fn grads(res: &Tensor, yv: &[f32], gv: &[f32]) -> candle_core::Result<Option<Tensor>> {
        let d = res.dims().last().copied().unwrap_or(1);
        let dx = map_rows(yv, gv, d, |_, yr, gr, dr| {
            let yg = dot(yr, gr);
            for ((o, &y), &gi) in dr.iter_mut().zip(yr).zip(gr) {
                *o = y * (gi - yg);
            }
        });
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// `dst (m x n, row stride n) = lhs · rhs` (or `+=` with `accumulate`), operands given
/// by row and column strides; the rows of `dst` split between the pool's threads.
///
/// # Safety
/// Each pointer must address its whole strided matrix; `dst` must not overlap.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // One block per thread, split along the longer side of the output: every block
    // packs all of the other operand, so splitting the short side (the output
    // dimension of a weight gradient, 256 rows against 1024 columns) would pack the
    // long one once per block. Measured on two cores, per shape: 256x1024x1600 went
    // from 114 to 163 GFLOP/s, 1600x1024x256 from 155 to 186.
    let (split_m, len) = if m >= n { (true, m) } else { (false, n) };
    let blocks = if m * n * k < 1 << 18 {
        1
    } else {
        par::threads().min(len.div_ceil(32)).max(1)
    };
    // Whole micro-tiles (16 rows or 8 columns) per block where possible.
    let step = if split_m { 16 } else { 8 };
    let per = len.div_ceil(blocks).div_ceil(step) * step;
    let (dst, lhs, rhs) = (
        par::Shared(dst),
        par::SharedConst(lhs),
        par::SharedConst(rhs),
    );
    par::for_ranges(blocks, |r| {
        for blk in r {
            let a = blk * per;
            let b = len.min(a + per);
            if a >= b {
                continue;
            }
            // SAFETY: rows (or columns) a..b of dst and of lhs (or rhs); blocks are
            // disjoint.
            unsafe {
                if split_m {
                    gemm_into(
                        b - a,
                        n,
                        k,
                        dst.get().add(a * n),
                        n,
                        accumulate,
                        lhs.get().add(a * lhs_rs),
                        lhs_rs,
                        lhs_cs,
                        rhs.get(),
                        rhs_rs,
                        rhs_cs,
                        1.0,
                    );
                } else {
                    gemm_into(
                        m,
                        b - a,
                        k,
                        dst.get().add(a),
                        n,
                        accumulate,
                        lhs.get(),
                        lhs_rs,
                        lhs_cs,
                        rhs.get().add(a * rhs_cs),
                        rhs_rs,
                        rhs_cs,
                        1.0,
                    );
                }
            }
        }
    });
}

/// `x [N, in] · w [out, in]^T (+ b [out])`.
pub(super) struct Linear {
    pub(super) bias: bool,
}

impl Linear {
    pub(super) fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize) -> Vec<f32> {
        let inp = x.len().checked_div(rows).unwrap_or(0);
        let n_out = w.len().checked_div(inp).unwrap_or(0);
        let mut y = match b {
            Some(b) if n_out > 0 => {
                // SAFETY: every row of every chunk gets the bias.
                let (y, _) = unsafe {
                    par::filled(rows * n_out, n_out * rows_per_task(n_out), |_, c| {
                        for r in c.chunks_exact_mut(n_out) {
                            r.iter_mut().zip(b).for_each(|(o, &v)| {
                                o.write(v);
                            });
                        }
                    })
                };
                y
            }
            Some(_) => Vec::new(),
            None => Vec::new(),
        };
        // SAFETY: y is rows x n_out; x is rows x inp (row stride inp); w is n_out x inp,
        // read as its transpose (stride 1 over inp, inp over n_out).
        let product = |dst: *mut f32, acc: bool| unsafe {
            matmul(
                (rows, n_out, inp),
                dst,
                acc,
                x.as_ptr(),
                (inp, 1),
                w.as_ptr(),
                (1, inp),
            );
        };
        if b.is_some() {
            product(y.as_mut_ptr(), true);
            y
        } else if inp == 0 {
            vec![0f32; rows * n_out]
        } else {
            y = filled(rows * n_out, |p| product(p, false));
            y
        }
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let n_out = w.dim(0)?;
        let dev = x.device().clone();
        // The input's gradient only where something upstream learns (not for data).
        let want_dx = x.track_op();
        let (dx, dw, db) = with_slice(x, |xv| {
            with_slice(w, |wv| {
                with_slice(g, |gv| self.grads_host(xv, wv, gv, rows, want_dx))
            })
        })???;
        Ok((
            dx.map(|d| Tensor::from_vec(d, (rows, inp), &dev))
                .transpose()?,
            Tensor::from_vec(dw, (n_out, inp), &dev)?,
            db.map(|d| Tensor::from_vec(d, n_out, &dev)).transpose()?,
        ))
    }

    /// `(dx, dw, db)` of `x [rows, in] · w [out, in]^T (+ b)` for the output gradient
    /// `gv`: `dx` only when `want_dx`, `db` only with a bias.
    pub(super) fn grads_host(
        &self,
        xv: &[f32],
        wv: &[f32],
        gv: &[f32],
        rows: usize,
        want_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>) {
        let inp = xv.len().checked_div(rows).unwrap_or(0);
        let n_out = wv.len().checked_div(inp).unwrap_or(0);
        // SAFETY: shapes as named: dx = g [rows, out] · w [out, inp]; dw = g^T · x;
        // each output written completely (k >= 1).
        let dx = (want_dx && n_out > 0).then(|| {
            filled(rows * inp, |p| unsafe {
                matmul(
                    (rows, inp, n_out),
                    p,
                    false,
                    gv.as_ptr(),
                    (n_out, 1),
                    wv.as_ptr(),
                    (inp, 1),
                );
            })
        });
        let dw = if rows == 0 {
            vec![0f32; n_out * inp]
        } else {
            filled(n_out * inp, |p| unsafe {
                matmul(
                    (n_out, inp, rows),
                    p,
                    false,
                    gv.as_ptr(),
                    (1, n_out),
                    xv.as_ptr(),
                    (inp, 1),
                );
            })
        };
        let db = self.bias.then(|| Self::column_sums(gv, n_out));
        (dx, dw, db)
    }

    /// Sums of the columns of a row-major `[rows, n]` matrix.
    fn column_sums(gv: &[f32], n_out: usize) -> Vec<f32> {
        let chunk = n_out.max(1) * rows_per_task(n_out);
        let parts: Vec<Vec<f32>> = par::map(gv.len().div_ceil(chunk), |i| {
            let c = &gv[i * chunk..gv.len().min((i + 1) * chunk)];
            let mut acc = vec![0f32; n_out];
            for r in c.chunks_exact(n_out.max(1)) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        });
        reduce(parts, n_out)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "mlmf-linear"
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
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (rows, _) = l1.shape().dims2()?;
        let n_out = l2.shape().dims2()?.0;
        Ok((
            CpuStorage::F32(Self::forward(x, w, Some(b), rows)),
            Shape::from((rows, n_out)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, g)?;
        Ok((dx, Some(dw), db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "mlmf-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (rows, _) = l1.shape().dims2()?;
        let n_out = l2.shape().dims2()?.0;
        Ok((
            CpuStorage::F32(Self::forward(x, w, None, rows)),
            Shape::from((rows, n_out)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, g)?;
        Ok((dx, Some(dw)))
    }
}

/// `x [N, in] · w^T + b` (2-D `x`), on the fused op when it serves.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) || x.rank() != 2 {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x
            .apply_op3(&w, &b.contiguous()?, Linear { bias: true })
            .map(Some),
        None => x.apply_op2(&w, Linear { bias: false }).map(Some),
    }
}

/// `sum_t mask_t x_t / max(1, sum_t mask_t)` over the tokens of `x` `[B, T, D]`, the
/// `[B, T]` mask a constant.
struct MaskedMean {
    mask: std::sync::Arc<Vec<f32>>,
    t: usize,
}

impl MaskedMean {
    fn weights(&self, b: usize) -> (&[f32], f32) {
        let m = &self.mask[b * self.t..(b + 1) * self.t];
        (m, 1.0 / m.iter().sum::<f32>().max(1.0))
    }
}

impl CustomOp1 for MaskedMean {
    fn name(&self) -> &'static str {
        "mlmf-masked-mean"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, t, d) = l.shape().dims3()?;
        let mut y = vec![0f32; b * d];
        par::chunks_mut(&mut y, d.max(1), |bi, yr| {
            let (m, inv) = self.weights(bi);
            for (ti, &mt) in m.iter().enumerate() {
                if mt != 0.0 {
                    let xr = &x[(bi * t + ti) * d..][..d];
                    yr.iter_mut().zip(xr).for_each(|(o, &v)| *o += mt * v);
                }
            }
            yr.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), Shape::from((b, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, d) = x.dims3()?;
        let g = g.contiguous()?;
        let dx = with_slice(&g, |g| {
            let mut dx = vec![0f32; b * t * d];
            par::chunks_mut(&mut dx, (t * d).max(1), |bi, dr| {
                let (m, inv) = self.weights(bi);
                let gr = &g[bi * d..(bi + 1) * d];
                for (ti, &mt) in m.iter().enumerate() {
                    if mt != 0.0 {
                        let s = mt * inv;
                        dr[ti * d..(ti + 1) * d]
                            .iter_mut()
                            .zip(gr)
                            .for_each(|(o, &v)| *o = s * v);
                    }
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The masked mean of `x` `[B, T, D]` over its tokens (`mask` `[B, T]`, a constant),
/// on the fused op when it serves.
pub(crate) fn masked_mean(x: &Tensor, mask: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) || x.rank() != 3 || mask.track_op() {
        return Ok(None);
    }
    let t = x.dim(1)?;
    let m = mask
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    x.contiguous()?
        .apply_op1(MaskedMean {
            mask: std::sync::Arc::new(m),
            t,
        })
        .map(Some)
}

/// Rows scaled to unit length: `x / sqrt(|x|^2 + 1e-12)` over the last dimension.
struct Normalize;

impl Normalize {
    fn norm(row: &[f32]) -> f32 {
        (dot(row, row) + 1e-12).sqrt()
    }
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "mlmf-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let d = l.dims().last().copied().unwrap_or(1);
        let y = map_rows(x, &[], d, |_, xr, _, yr| {
            let inv = 1.0 / Self::norm(xr);
            yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_slice(x, |xv| {
            with_slice(&g, |gv| {
                map_rows(xv, gv, d, |_, xr, gr, dr| {
                    let inv = 1.0 / Self::norm(xr);
                    let xg = dot(xr, gr) * inv;
                    for ((o, &xv), &gi) in dr.iter_mut().zip(xr).zip(gr) {
                        *o = (gi - xv * inv * xg) * inv;
                    }
                })
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Unit-length rows on the fused op when it serves.
pub(crate) fn normalize(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1(Normalize).map(Some)
}

/// `a + b` for two tensors of one shape.
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "mlmf-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; a.len()];
        par::chunks_mut(&mut y, CHUNK, |i, yc| {
            let (ac, bc) = (&a[i * CHUNK..][..yc.len()], &b[i * CHUNK..][..yc.len()]);
            for ((o, &x), &z) in yc.iter_mut().zip(ac).zip(bc) {
                *o = x + z;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            a.track_op().then(|| g.clone()),
            b.track_op().then(|| g.clone()),
        ))
    }
}

/// Rows of `x` `[N, D]` (any leading shape) scaled by constant factors `[N]`.
struct ScaleRows(std::sync::Arc<Vec<f32>>);

impl ScaleRows {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let d = x.len() / self.0.len().max(1);
        map_rows(x, &[], d, |r, xr, _, yr| {
            let s = self.0[r];
            yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * s);
        })
    }
}

impl CustomOp1 for ScaleRows {
    fn name(&self) -> &'static str {
        "mlmf-scale-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.apply(slice(s, l)?)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let dx = with_slice(&g, |g| self.apply(g))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `a + b` (same shapes) on the fused op when it serves.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fused(a) && a.dims() == b.dims() {
        return a.contiguous()?.apply_op2(&b.contiguous()?, Add);
    }
    a + b
}

/// `x` `[..., D]` with row `r` (over the leading dimensions) multiplied by `factors[r]`.
pub(crate) fn scale_rows(x: &Tensor, factors: Vec<f32>) -> candle_core::Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(1);
    if factors.len() * d != x.elem_count() {
        candle_core::bail!("scale_rows: {} factors for {:?}", factors.len(), x.dims());
    }
    if fused(x) {
        return x
            .contiguous()?
            .apply_op1(ScaleRows(std::sync::Arc::new(factors)));
    }
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = 1;
    }
    x.broadcast_mul(&Tensor::from_vec(factors, shape, x.device())?)
}

thread_local! {
    /// Tests switch the fused ops off on their thread to run the composed ops.
    static COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused ops off on this thread (the composed candle ops instead).
#[cfg(test)]
pub(crate) fn composed<R>(f: impl FnOnce() -> R) -> R {
    COMPOSED.with(|c| c.set(true));
    let r = f();
    COMPOSED.with(|c| c.set(false));
    r
}

/// Whether the fused ops serve `x` (float32 on the CPU).
pub(crate) fn serves(x: &Tensor) -> bool {
    fused(x)
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !COMPOSED.with(|c| c.get())
}

pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNorm { eps: eps as f32 },
        )
        .map(Some)
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
        .map(Some)
}

pub(crate) fn gelu(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1(Gelu).map(Some)
}

pub(crate) fn softmax(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fused(x) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1(Softmax).map(Some)
}
