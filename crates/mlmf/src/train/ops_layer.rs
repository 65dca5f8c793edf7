//! One modality's half of a `middle` fusion layer (docs/fusion.md) as a single
//! float32 CPU op with its own backward pass, for the layer as it is built by default
//! (LayerNorms, a GELU MLP, no gates, plain attention):
//!
//! ```text
//! y1 = x + keep * (attention(LN_q(x), LN_kv(c)) W_o^T + b_o)
//! y  = y1 + fc2(gelu(fc1(LN_mlp(y1))))
//! ```
//!
//! `c` is the other modalities' tokens, `keep` zeroes the rows that read nothing.
//! Composed from the fused ops of `ops.rs` the layer is about twenty graph nodes, and
//! candle's autograd accumulates the gradient of each intermediate into a fresh zero
//! tensor before passing it on; here the forward keeps its intermediates and the
//! backward runs straight through them, with the same functions, in the same order of
//! operations, as the composed ops.
//!
//! The op's graph arguments are `x`, `c` and the query weight (so that the node is in
//! the graph whenever the layer learns). The other seventeen weights' gradients cannot
//! return through candle's `CustomOp3`: they go to a per-thread sink that
//! [`backward`] merges into the [`GradStore`]. Every backward pass of a training loss
//! goes through [`backward`].

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, StorageRef, Tensor};

use super::ops::{slice, Gelu, LayerNorm, Linear};
use super::ops_attention::AttnCore;
use super::par;

/// The layer's tensors, in this order: `norm_q` weight and bias, `norm_kv`, the q, k,
/// v and output projections (weight, bias), `norm_mlp`, `fc1`, `fc2`.
pub(crate) const PARAMS: usize = 18;
const NORM_Q: usize = 0;
const NORM_KV: usize = 2;
const Q: usize = 4;
const K: usize = 6;
const V: usize = 8;
const O: usize = 10;
const NORM_MLP: usize = 12;
const FC1: usize = 14;
const FC2: usize = 16;

thread_local! {
    /// Weight gradients the layer ops computed during this thread's backward pass.
    static SINK: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()`, with the weight gradients of the fused layers merged in.
pub(crate) fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    SINK.with(|s| s.borrow_mut().clear());
    let grads = loss.backward();
    let pending = SINK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut grads = grads?;
    for (t, g) in pending {
        let g = match grads.remove(&t) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&t, g);
    }
    Ok(grads)
}

/// What the forward keeps for the backward pass.
struct Saved {
    xq: Vec<f32>,
    xc: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    y1: Vec<f32>,
    h0: Vec<f32>,
    h1: Vec<f32>,
    h2: Vec<f32>,
}

struct CrossLayerOp {
    params: Vec<Tensor>,
    core: AttnCore,
    keep: Option<Vec<f32>>,
    norm: LayerNorm,
    saved: Mutex<Option<Saved>>,
}

/// A CPU tensor's float32 values under a held read guard.
fn host<'a>(st: &'a StorageRef<'_>, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match &**st {
        Storage::Cpu(c) => slice(c, l),
        _ => candle_core::bail!("fused middle layer: a tensor is not on the CPU"),
    }
}

/// `out[i] = a[i] + f[row] * out[i]` over `d`-wide rows (`f` = 1 when `None`).
fn residual(out: &mut [f32], a: &[f32], f: Option<&[f32]>, d: usize) {
    let per = (16_384 / d.max(1)).max(1) * d.max(1);
    par::chunks_mut(out, per, |i, oc| {
        let ac = &a[i * per..][..oc.len()];
        for (r, (or, ar)) in oc.chunks_mut(d).zip(ac.chunks(d)).enumerate() {
            let s = f.map_or(1.0, |f| f[(i * per) / d + r]);
            if s == 1.0 {
                or.iter_mut().zip(ar).for_each(|(o, &v)| *o += v);
            } else {
                or.iter_mut().zip(ar).for_each(|(o, &v)| *o = v + *o * s);
            }
        }
    });
}

impl CrossLayerOp {
    fn forward(&self, x: &[f32], c: &[f32], w: &[&[f32]]) -> (Vec<f32>, Saved) {
        let d = w[NORM_Q].len();
        let (n, nc) = (x.len() / d.max(1), c.len() / d.max(1));
        let ln = &self.norm;
        let xq = ln.forward(x, w[NORM_Q], w[NORM_Q + 1]);
        let xc = ln.forward(c, w[NORM_KV], w[NORM_KV + 1]);
        let q = Linear::forward(&xq, w[Q], Some(w[Q + 1]), n);
        let k = Linear::forward(&xc, w[K], Some(w[K + 1]), nc);
        let v = Linear::forward(&xc, w[V], Some(w[V + 1]), nc);
        let a = self.core.forward(&q, &k, &v);
        let mut y1 = Linear::forward(&a, w[O], Some(w[O + 1]), n);
        residual(&mut y1, x, self.keep.as_deref(), d);
        let h0 = ln.forward(&y1, w[NORM_MLP], w[NORM_MLP + 1]);
        let h1 = Linear::forward(&h0, w[FC1], Some(w[FC1 + 1]), n);
        let h2 = Gelu::forward(&h1);
        let mut y = Linear::forward(&h2, w[FC2], Some(w[FC2 + 1]), n);
        residual(&mut y, &y1, None, d);
        let saved = Saved {
            xq,
            xc,
            q,
            k,
            v,
            a,
            y1,
            h0,
            h1,
            h2,
        };
        (y, saved)
    }

    /// `(dx, dc, d params)` for the output gradient `g`.
    fn backward(
        &self,
        (x, c, g): (&[f32], &[f32], &[f32]),
        w: &[&[f32]],
        s: &Saved,
    ) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let d = w[NORM_Q].len();
        let (n, nc) = (x.len() / d.max(1), c.len() / d.max(1));
        let lin = Linear { bias: true };
        let ln = &self.norm;
        let mut dp: Vec<Vec<f32>> = vec![Vec::new(); PARAMS];
        let mut put = |i: usize, (dw, db): (Vec<f32>, Option<Vec<f32>>)| {
            dp[i] = dw;
            dp[i + 1] = db.unwrap_or_default();
        };
        // The MLP branch: y = y1 + fc2(gelu(fc1(LN(y1)))).
        let (gh2, dw, db) = lin.grads_host(&s.h2, w[FC2], g, n, true);
        put(FC2, (dw, db));
        let gh1 = Gelu::grads_host(&s.h1, &gh2.unwrap_or_default());
        let (gh0, dw, db) = lin.grads_host(&s.h0, w[FC1], &gh1, n, true);
        put(FC1, (dw, db));
        let (mut gy1, dw, db) = ln.grads_host(&s.y1, w[NORM_MLP], &gh0.unwrap_or_default());
        put(NORM_MLP, (dw, Some(db)));
        residual(&mut gy1, g, None, d);
        // The attention branch: y1 = x + keep * o.
        let go = match &self.keep {
            None => None,
            Some(keep) => {
                let mut go = gy1.clone();
                for (r, k) in go.chunks_mut(d).zip(keep) {
                    if *k != 1.0 {
                        r.iter_mut().for_each(|v| *v *= k);
                    }
                }
                Some(go)
            }
        };
        let (ga, dw, db) = lin.grads_host(&s.a, w[O], go.as_deref().unwrap_or(&gy1), n, true);
        put(O, (dw, db));
        let (gq, gk, gv) = self
            .core
            .backward(&s.q, &s.k, &s.v, &ga.unwrap_or_default());
        let (gxq, dw, db) = lin.grads_host(&s.xq, w[Q], &gq, n, true);
        put(Q, (dw, db));
        let (gxc, dw, db) = lin.grads_host(&s.xc, w[K], &gk, nc, true);
        put(K, (dw, db));
        let mut gxc = gxc.unwrap_or_default();
        let (gxv, dw, db) = lin.grads_host(&s.xc, w[V], &gv, nc, true);
        put(V, (dw, db));
        residual(&mut gxc, &gxv.unwrap_or_default(), None, d);
        let (dc, dw, db) = ln.grads_host(c, w[NORM_KV], &gxc);
        put(NORM_KV, (dw, Some(db)));
        let (mut dx, dw, db) = ln.grads_host(x, w[NORM_Q], &gxq.unwrap_or_default());
        put(NORM_Q, (dw, Some(db)));
        residual(&mut dx, &gy1, None, d);
        (dx, dc, dp)
    }
}

impl CustomOp3 for CrossLayerOp {
    fn name(&self) -> &'static str {
        "mlmf-middle-layer"
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
        let (x, c, wq) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        // The query weight is the op's own argument (its storage is held already).
        let held: Vec<Option<(StorageRef<'_>, &Layout)>> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, t)| (i != Q).then(|| t.storage_and_layout()))
            .collect();
        let w = held
            .iter()
            .map(|h| match h {
                Some((st, l)) => host(st, l),
                None => Ok(wq),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (y, saved) = self.forward(x, c, &w);
        if let Ok(mut s) = self.saved.lock() {
            *s = Some(saved);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        c: &Tensor,
        wq: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused middle layer: poisoned state".into()))?;
        let Some(s) = saved.as_ref() else {
            candle_core::bail!("fused middle layer: backward before forward");
        };
        let (dx, dc, mut dp) = {
            let held: Vec<(StorageRef<'_>, &Layout)> =
                self.params.iter().map(|t| t.storage_and_layout()).collect();
            let w = held
                .iter()
                .map(|(st, l)| host(st, l))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let (xs, xl) = x.storage_and_layout();
            let (cs, cl) = c.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            self.backward((host(&xs, xl)?, host(&cs, cl)?, host(&gs, gl)?), &w, s)
        };
        let dev = x.device();
        SINK.with(|sink| -> candle_core::Result<()> {
            let mut sink = sink.borrow_mut();
            for (i, t) in self.params.iter().enumerate() {
                if i != Q && t.track_op() {
                    let grad = Tensor::from_vec(std::mem::take(&mut dp[i]), t.shape(), dev)?;
                    sink.push((t.clone(), grad));
                }
            }
            Ok(())
        })?;
        let dwq = wq
            .track_op()
            .then(|| Tensor::from_vec(std::mem::take(&mut dp[Q]), wq.shape(), dev))
            .transpose()?;
        Ok((
            x.track_op()
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            c.track_op()
                .then(|| Tensor::from_vec(dc, c.shape(), dev))
                .transpose()?,
            dwq,
        ))
    }
}

/// The layer over `x` `[B, Tq, D]` and `c` `[B, Tk, D]` as one op; `params` in the
/// order of [`PARAMS`], `core` and `keep` as the attention layer makes them.
pub(crate) fn cross_layer(
    params: Vec<Tensor>,
    core: AttnCore,
    keep: Option<Vec<f32>>,
    eps: f32,
    x: &Tensor,
    c: &Tensor,
) -> candle_core::Result<Tensor> {
    if params.len() != PARAMS {
        candle_core::bail!(
            "fused middle layer: {} tensors, expected {PARAMS}",
            params.len()
        );
    }
    let params = params
        .into_iter()
        .map(|p| p.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let wq = params[Q].clone();
    x.contiguous()?.apply_op3(
        &c.contiguous()?,
        &wq,
        CrossLayerOp {
            params,
            core,
            keep,
            norm: LayerNorm { eps },
            saved: Mutex::new(None),
        },
    )
}
