//! The training forward of [`CrossModalAttention`](crate::attention::CrossModalAttention):
//! the same layer (docs/attention.md) in differentiable candle ops, in two shapes:
//!
//! - [`AttnNet::forward`]: query row `b` attends over key row `b` (`[B, Tq, dim]` over
//!   `[B, Tk, kv_dim]`), as the fusion layers and `infer` use it;
//! - [`AttnNet::pair_scores`]: every query item against every key item, reduced to a
//!   score `S[i, j]` = the mean over `i`'s real query tokens of the cosine between the
//!   token and what it reads from item `j` — what a contrastive objective on an
//!   attention pair trains (docs/training.md).
//!
//! Padding, the sliding window, `top_k` / `sparsity_ratio` and adaptive attention
//! decide which keys a row keeps; that choice, and adaptive attention's temperature,
//! are computed from the logits' values and enter the graph as constants.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::nn::{linear, masked_softmax, rms_norm, Lin};
use super::ops::scale_rows;
use super::ops_attention::{attention_core, AttnCore};
use super::vars::VarStore;
use crate::attention::{rope, select};
use crate::config::CrossModalAttentionConfig;
use crate::encoders::layers::ce;
use crate::error::Result;

/// What the fused `middle` layer op needs of a plain attention layer.
pub(crate) struct PlainParts<'a> {
    /// The q, k, v and output projections.
    pub(crate) lins: [&'a Lin; 4],
    pub(crate) core: AttnCore,
    /// Per query row: 0 where the row reads nothing (`None`: every row reads).
    pub(crate) keep: Option<Vec<f32>>,
}

/// A cross-modal attention layer over trainable tensors.
pub(crate) struct AttnNet {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    qk_norm: Option<(Tensor, Tensor)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    cfg: CrossModalAttentionConfig,
}

impl AttnNet {
    /// The layer whose tensors are `{prefix}q_proj.weight`, ... in `vs`.
    pub(crate) fn from_store(
        vs: &VarStore,
        prefix: &str,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        cfg: &CrossModalAttentionConfig,
    ) -> Result<Self> {
        let lin = |n: &str| -> Result<Lin> {
            Ok(Lin {
                w: vs.get(&format!("{prefix}{n}.weight"))?,
                b: Some(vs.get(&format!("{prefix}{n}.bias"))?),
            })
        };
        let qk_norm = if cfg.qk_norm {
            Some((
                vs.get(&format!("{prefix}q_norm.weight"))?,
                vs.get(&format!("{prefix}k_norm.weight"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q: lin("q_proj")?,
            k: lin("k_proj")?,
            v: lin("v_proj")?,
            o: lin("out_proj")?,
            qk_norm,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (f64::from(cfg.temperature) * (head_dim as f64).sqrt()),
            cfg: cfg.clone(),
        })
    }

    /// Queries or keys `[B, T, H*hd]` -> `[B, H, T, hd]`, QK-norm and rotary embeddings
    /// applied.
    fn heads_of(&self, x: &Tensor, heads: usize, norm: Option<&Tensor>) -> Result<Tensor> {
        let f = ce("attention heads");
        let (b, t, _) = x.dims3().map_err(&f)?;
        let mut h = x
            .reshape((b, t, heads, self.head_dim))
            .and_then(|x| x.transpose(1, 2))
            .and_then(|x| x.contiguous())
            .map_err(&f)?;
        if let Some(w) = norm {
            h = rms_norm(&h, w, f64::from(self.cfg.qk_norm_eps))?;
        }
        if let Some(base) = self.cfg.rope_base {
            h = rope(&h, base, self.cfg.rope_scale)?;
        }
        Ok(h)
    }

    /// Queries `[B, H, Tq, hd]`, keys and values `[B, H, Tk, hd]` (kv heads repeated
    /// for grouped-query attention).
    fn project(&self, query: &Tensor, kv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let f = ce("attention projections");
        let (qn, kn) = match &self.qk_norm {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let q = self.heads_of(&self.q.forward(query)?, self.heads, qn)?;
        let k = self.heads_of(&self.k.forward(kv)?, self.kv_heads, kn)?;
        let v = {
            let (b, t, _) = kv.dims3().map_err(&f)?;
            self.v
                .forward(kv)?
                .reshape((b, t, self.kv_heads, self.head_dim))
                .and_then(|x| x.transpose(1, 2))
                .and_then(|x| x.contiguous())
                .map_err(&f)?
        };
        if self.kv_heads == self.heads {
            return Ok((q, k, v));
        }
        let group = self.heads / self.kv_heads;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let (b, _, t, hd) = x.dims4().map_err(&f)?;
            x.unsqueeze(2)
                .and_then(|x| x.broadcast_as((b, self.kv_heads, group, t, hd)))
                .and_then(|x| x.contiguous())
                .and_then(|x| x.reshape((b, self.heads, t, hd)))
                .map_err(&f)
        };
        Ok((q, repeat(&k)?, repeat(&v)?))
    }

    /// Logits `[..., Tq, Tk]` (scaled, soft-capped) to weights, given which keys each
    /// row may see before selection (`base`, broadcastable to the logits, or `None`
    /// for all). Returns the weights and the per-row "sees any key" flags
    /// `[..., Tq, 1]`.
    fn weights(&self, logits: Tensor, base: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let f = ce("attention weights");
        let mut logits = (logits * self.scale).map_err(&f)?;
        if let Some(c) = self.cfg.softcap {
            let c = f64::from(c);
            logits = (logits / c)
                .and_then(|x| x.tanh())
                .and_then(|x| x * c)
                .map_err(&f)?;
        }
        let dims = logits.dims().to_vec();
        let sparse = self.cfg.top_k.is_some() || self.cfg.sparsity_ratio.is_some();
        let allowed = if sparse || self.cfg.adaptive {
            let tk = *dims.last().unwrap_or(&1);
            let mut l: Vec<f32> = logits
                .detach()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(&f)?;
            let mut a: Vec<f32> = match base {
                Some(b) => b
                    .broadcast_as(dims.as_slice())
                    .and_then(|b| b.flatten_all())
                    .and_then(|b| b.to_vec1())
                    .map_err(&f)?,
                None => vec![1.0; l.len()],
            };
            if self.cfg.adaptive {
                let mut inv_tau = Vec::with_capacity(l.len() / tk);
                let mut kept = Vec::with_capacity(tk);
                for (row, ok) in l.chunks_exact_mut(tk).zip(a.chunks_exact_mut(tk)) {
                    inv_tau.push((1.0 / select::adapt_row(row, ok, &self.cfg, &mut kept)) as f32);
                }
                let mut shape = dims.clone();
                if let Some(last) = shape.last_mut() {
                    *last = 1;
                }
                let inv = Tensor::from_vec(inv_tau, shape, logits.device()).map_err(&f)?;
                logits = logits.broadcast_mul(&inv).map_err(&f)?;
            } else {
                let mut scratch = Vec::with_capacity(tk);
                for (row, ok) in l.chunks_exact(tk).zip(a.chunks_exact_mut(tk)) {
                    select::keep_largest(ok, row, &self.cfg, &mut scratch);
                }
            }
            Some(Tensor::from_vec(a, dims.as_slice(), logits.device()).map_err(&f)?)
        } else {
            base.cloned()
        };
        let w = masked_softmax(&logits, allowed.as_ref())?;
        let any = match &allowed {
            Some(a) => a.max_keepdim(D::Minus1).map_err(&f)?,
            None => {
                let mut shape = dims;
                if let Some(last) = shape.last_mut() {
                    *last = 1;
                }
                Tensor::ones(shape, DType::F32, logits.device()).map_err(&f)?
            }
        };
        Ok((w, any))
    }

    /// Keys row `i` may see by padding and the sliding window, `[B|1, 1, Tq|1, Tk]`.
    fn base_allowed(
        &self,
        kv_mask: Option<&Tensor>,
        tq: usize,
        tk: usize,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let f = ce("attention mask");
        let pad = kv_mask
            .map(|m| {
                let (b, t) = m.dims2()?;
                m.reshape((b, 1, 1, t))
            })
            .transpose()
            .map_err(&f)?;
        let Some(w) = self.cfg.sliding_window else {
            return Ok(pad);
        };
        let near: Vec<f32> = (0..tq)
            .flat_map(|i| (0..tk).map(move |j| f32::from(u8::from(i.abs_diff(j) <= w))))
            .collect();
        let near = Tensor::from_vec(near, (1, 1, tq, tk), dev).map_err(&f)?;
        Ok(Some(match pad {
            Some(p) => p.broadcast_mul(&near).map_err(&f)?,
            None => near,
        }))
    }

    /// Whether the layer's key choice depends on padding alone and the fused core
    /// serves `query` (float32 on the CPU).
    fn plain(&self, query: &Tensor) -> bool {
        let c = &self.cfg;
        c.softcap.is_none()
            && c.sliding_window.is_none()
            && c.top_k.is_none()
            && c.sparsity_ratio.is_none()
            && !c.adaptive
            && c.rope_base.is_none()
            && super::ops::serves(query)
    }

    /// The fused attention core of a `[B, Tq]` query over `[B, Tk]` keys with their
    /// masks, and the per-query-row factor of the output (0 for rows that read
    /// nothing: masked queries and batch rows without keys; `None`: all 1).
    fn core(
        &self,
        query_mask: Option<&Tensor>,
        kv_mask: Option<&Tensor>,
        (b, tq, tk): (usize, usize, usize),
    ) -> Result<(AttnCore, Option<Vec<f32>>)> {
        let host = |m: Option<&Tensor>| -> Result<Option<Vec<f32>>> {
            m.map(|m| m.flatten_all().and_then(|m| m.to_vec1::<f32>()))
                .transpose()
                .map_err(ce("attention mask"))
        };
        let (km, qm) = (host(kv_mask)?, host(query_mask)?);
        let keep: Vec<f32> = (0..b * tq)
            .map(|r| {
                let (bi, i) = (r / tq, r % tq);
                let real = qm.as_ref().is_none_or(|m| m[bi * tq + i] != 0.0);
                let any = km
                    .as_ref()
                    .is_none_or(|m| m[bi * tk..(bi + 1) * tk].iter().any(|&x| x != 0.0));
                f32::from(u8::from(real && any))
            })
            .collect();
        let core = AttnCore {
            b,
            tq,
            tk,
            heads: self.heads,
            kv_heads: self.kv_heads,
            hd: self.head_dim,
            scale: self.scale as f32,
            kmask: km.map(Arc::new),
            qmask: qm.map(Arc::new),
        };
        let keep = (!keep.iter().all(|&k| k == 1.0)).then_some(keep);
        Ok((core, keep))
    }

    /// The projections and core of a plain layer without QK-norm (what the fused
    /// `middle` layer op runs), or `None`.
    pub(crate) fn plain_parts(
        &self,
        query: &Tensor,
        query_mask: Option<&Tensor>,
        kv_mask: Option<&Tensor>,
        (b, tq, tk): (usize, usize, usize),
    ) -> Result<Option<PlainParts<'_>>> {
        if self.qk_norm.is_some() || !self.plain(query) {
            return Ok(None);
        }
        let (core, keep) = self.core(query_mask, kv_mask, (b, tq, tk))?;
        Ok(Some(PlainParts {
            lins: [&self.q, &self.k, &self.v, &self.o],
            core,
            keep,
        }))
    }

    /// [`forward`](Self::forward) on the fused attention core (see `ops_attention`),
    /// for layers whose key choice depends on padding alone; `None` otherwise.
    fn forward_core(
        &self,
        query: &Tensor,
        kv: &Tensor,
        query_mask: Option<&Tensor>,
        kv_mask: Option<&Tensor>,
        (b, tq, tk): (usize, usize, usize),
    ) -> Result<Option<Tensor>> {
        if !self.plain(query) {
            return Ok(None);
        }
        let f = ce("attention");
        let (core, keep) = self.core(query_mask, kv_mask, (b, tq, tk))?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let normed = |x: Tensor, heads: usize, w: Option<&Tensor>| -> Result<Tensor> {
            match w {
                None => Ok(x),
                Some(w) => {
                    let (bb, t, _) = x.dims3().map_err(ce("qk norm"))?;
                    let y = rms_norm(
                        &x.reshape((bb, t, heads, hd)).map_err(ce("qk norm"))?,
                        w,
                        f64::from(self.cfg.qk_norm_eps),
                    )?;
                    y.reshape((bb, t, heads * hd)).map_err(ce("qk norm"))
                }
            }
        };
        let (qn, kn) = match &self.qk_norm {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        let q = normed(self.q.forward(query)?, h, qn)?;
        let k = normed(self.k.forward(kv)?, kvh, kn)?;
        let v = self.v.forward(kv)?;
        let ctx = attention_core(core, &q, &k, &v).map_err(&f)?;
        let out = self.o.forward(&ctx)?;
        match keep {
            None => Ok(Some(out)),
            Some(keep) => scale_rows(&out, keep).map(Some).map_err(f),
        }
    }

    /// Query row `b` over key row `b`: `[B, Tq, dim]`; masked query rows and rows that
    /// see no key are 0.
    pub(crate) fn forward(
        &self,
        query: &Tensor,
        kv: &Tensor,
        query_mask: Option<&Tensor>,
        kv_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let f = ce("attention");
        let (b, tq, _) = query.dims3().map_err(&f)?;
        let tk = kv.dim(1).map_err(&f)?;
        if let Some(out) = self.forward_core(query, kv, query_mask, kv_mask, (b, tq, tk))? {
            return Ok(out);
        }
        let (q, k, v) = self.project(query, kv)?;
        let logits = q
            .matmul(&k.t().and_then(|k| k.contiguous()).map_err(&f)?)
            .map_err(&f)?;
        let base = self.base_allowed(kv_mask, tq, tk, query.device())?;
        let (mut w, any) = self.weights(logits, base.as_ref())?;
        if let Some(m) = query_mask {
            w = w
                .broadcast_mul(&m.reshape((b, 1, tq, 1)).map_err(&f)?)
                .map_err(&f)?;
        }
        let ctx = w
            .matmul(&v)
            .and_then(|c| c.transpose(1, 2))
            .and_then(|c| c.contiguous())
            .and_then(|c| c.reshape((b, tq, self.heads * self.head_dim)))
            .map_err(&f)?;
        // `any` is [B|1, H|1, Tq, 1]: a row sees a key in one head iff in all of them.
        let any = any.max_keepdim(1).and_then(|a| a.squeeze(1)).map_err(&f)?;
        let out = self.o.forward(&ctx)?;
        let mut out = out.broadcast_mul(&any).map_err(&f)?;
        if let Some(m) = query_mask {
            out = out
                .broadcast_mul(&m.unsqueeze(2).map_err(&f)?)
                .map_err(&f)?;
        }
        Ok(out)
    }

    /// `S [Bq, Bk]`: for query item `i` (`x` `[Bq, Tq, dim]`, `qmask` `[Bq, Tq]`) and
    /// key item `j` (`y` `[Bk, Tk, kv_dim]`, `kmask` `[Bk, Tk]`), the mean over `i`'s
    /// real tokens `t` of `cos(x[i, t], attn(x_i, y_j)[t])`, with
    /// `cos(a, b) = a.b / (sqrt(|a|^2 + 1e-12) sqrt(|b|^2 + 1e-12))`.
    pub(crate) fn pair_scores(
        &self,
        x: &Tensor,
        qmask: &Tensor,
        y: &Tensor,
        kmask: &Tensor,
    ) -> Result<Tensor> {
        let f = ce("attention pair scores");
        let (bq, tq, _) = x.dims3().map_err(&f)?;
        let (bk, tk, _) = y.dims3().map_err(&f)?;
        let (h, hd) = (self.heads, self.head_dim);
        let (q, k, v) = self.project(x, y)?;
        // [H, Bq*Tq, hd] x [H, hd, Bk*Tk] -> [H, Bq, Tq, Bk, Tk] -> [Bq, Bk, H, Tq, Tk].
        let qh = q
            .transpose(0, 1)
            .and_then(|q| q.contiguous())
            .and_then(|q| q.reshape((h, bq * tq, hd)))
            .map_err(&f)?;
        let kh = k
            .permute((1, 3, 0, 2))
            .and_then(|k| k.contiguous())
            .and_then(|k| k.reshape((h, hd, bk * tk)))
            .map_err(&f)?;
        let logits = qh
            .matmul(&kh)
            .and_then(|l| l.reshape((h, bq, tq, bk, tk)))
            .and_then(|l| l.permute((1, 3, 0, 2, 4)))
            .and_then(|l| l.contiguous())
            .map_err(&f)?;
        // Keys of item j: its padding (and the window), [1, Bk, 1, Tq|1, Tk].
        let base = self
            .base_allowed(Some(kmask), tq, tk, x.device())?
            .map(|b| b.unsqueeze(0))
            .transpose()
            .map_err(&f)?;
        let (w, any) = self.weights(logits, base.as_ref())?;
        // [Bq, Bk, H, Tq, Tk] -> [H, Bk, Bq*Tq, Tk] x [H, Bk, Tk, hd] -> [H, Bk, Bq, Tq, hd].
        let wh = w
            .permute((2, 1, 0, 3, 4))
            .and_then(|w| w.contiguous())
            .and_then(|w| w.reshape((h, bk, bq * tq, tk)))
            .map_err(&f)?;
        let vh = v.transpose(0, 1).and_then(|v| v.contiguous()).map_err(&f)?;
        let ctx = wh
            .matmul(&vh)
            .and_then(|c| c.reshape((h, bk, bq, tq, hd)))
            .and_then(|c| c.permute((2, 1, 3, 0, 4)))
            .and_then(|c| c.contiguous())
            .and_then(|c| c.reshape((bq, bk, tq, h * hd)))
            .map_err(&f)?;
        let out = linear(&ctx, &self.o.w, self.o.b.as_ref())?;
        // Rows that see no key (`any` [Bq, Bk, H, Tq, 1] -> [Bq|1, Bk, Tq, 1]) are 0.
        let any = any.max_keepdim(2).and_then(|a| a.squeeze(2)).map_err(&f)?;
        let out = out.broadcast_mul(&any).map_err(&f)?;
        // Cosine of each query token with what it read.
        let xe = x.unsqueeze(1).map_err(&f)?;
        let dot = out
            .broadcast_mul(&xe)
            .and_then(|p| p.sum(D::Minus1))
            .map_err(&f)?;
        let norm = |t: &Tensor| {
            t.sqr()
                .and_then(|s| s.sum(D::Minus1))
                .and_then(|s| s + 1e-12)
                .and_then(|s| s.sqrt())
        };
        let nx = norm(&xe).map_err(&f)?;
        let no = norm(&out).map_err(&f)?;
        let cos = dot
            .broadcast_div(&no)
            .and_then(|c| c.broadcast_div(&nx))
            .map_err(&f)?;
        let qm = qmask.unsqueeze(1).map_err(&f)?;
        let count = qmask
            .sum_keepdim(1)
            .and_then(|c| c.maximum(1f32))
            .map_err(&f)?;
        cos.broadcast_mul(&qm)
            .and_then(|c| c.sum(D::Minus1))
            .and_then(|s| s.broadcast_div(&count))
            .map_err(f)
    }
}
