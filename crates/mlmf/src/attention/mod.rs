//! Cross-modal attention: queries from one modality attend over the tokens of another.
//!
//! [`CrossModalAttention`] projects each side with its own linear map (queries from
//! width `dim`, keys and values from width `kv_dim`), runs multi-head attention with
//! optional grouped-query sharing of key/value heads, a temperature, and padding masks
//! on both sides, and projects back to `dim`:
//!
//! ```text
//! q = q_proj(query)            [B, H,   Tq, hd]
//! k, v = k_proj(kv), v_proj(kv) [B, Hkv, Tk, hd]   query head h reads kv head h / (H / Hkv)
//! w = softmax(q k^T / (temperature * sqrt(hd)))     masked keys get weight 0
//! out = out_proj(w v)          [B, Tq, dim]         masked query rows are 0 (and their w)
//! ```
//!
//! A query row whose keys are all masked gets all-zero weights and output (never NaN).
//!
//! Weights load from and save to safetensors with the names `q_proj.weight`,
//! `q_proj.bias`, `k_proj.*`, `v_proj.*`, `out_proj.*` (PyTorch's `[out, in]` layout).
//! Without weights a layer initialises deterministically from a seed, as
//! `torch.nn.Linear` does (uniform in `±1/sqrt(in)`), and reports itself untrained.

pub(crate) mod select;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::config::CrossModalAttentionConfig;
use crate::encoders::cpu;
use crate::encoders::layers::{ce, Linear, MASKED};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// What [`CrossModalAttention::forward`] returns.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[B, Tq, dim]`.
    pub output: Tensor,
    /// Per-head weights `[B, H, Tq, Tk]`, when asked for.
    pub weights: Option<Tensor>,
}

/// A multi-head cross-attention layer (see the module docs).
#[derive(Debug, Clone)]
pub struct CrossModalAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    dim: usize,
    kv_dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// `q_norm` / `k_norm` RMSNorm weights `[head_dim]` when `qk_norm` is on.
    qk_norm: Option<(Tensor, Tensor)>,
    cfg: CrossModalAttentionConfig,
    untrained: bool,
    /// The modalities of the two sides, named in input errors.
    pub query_modality: Modality,
    pub kv_modality: Modality,
}

/// A deterministic uniform generator (splitmix64) for untrained initialisation.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `n` values uniform in `[-bound, bound)`.
    pub(crate) fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_f32() * 2.0 - 1.0) * bound)
            .collect()
    }
}

/// The four projections' `(name, out, in)` shapes.
fn shapes(
    dim: usize,
    kv_dim: usize,
    q_width: usize,
    kv_width: usize,
) -> [(&'static str, usize, usize); 4] {
    [
        ("q_proj", q_width, dim),
        ("k_proj", kv_width, kv_dim),
        ("v_proj", kv_width, kv_dim),
        ("out_proj", dim, q_width),
    ]
}

impl CrossModalAttention {
    fn sizes(
        dim: usize,
        kv_dim: usize,
        cfg: &CrossModalAttentionConfig,
    ) -> Result<(usize, usize, usize)> {
        cfg.validate()?;
        if dim == 0 || kv_dim == 0 {
            return Err(MlmfError::config(
                if dim == 0 { "dim" } else { "kv_dim" },
                "must be at least 1",
            ));
        }
        let heads = cfg.num_heads;
        let head_dim = match cfg.head_dim {
            Some(h) => h,
            None if dim.is_multiple_of(heads) => dim / heads,
            None => {
                return Err(MlmfError::config(
                    "num_heads",
                    format!("{heads} does not divide dim {dim}; set head_dim"),
                ))
            }
        };
        Ok((heads, cfg.num_kv_heads.unwrap_or(heads), head_dim))
    }

    fn build(
        dim: usize,
        kv_dim: usize,
        cfg: &CrossModalAttentionConfig,
        mut get: impl FnMut(&str, usize, usize) -> Result<(Tensor, Tensor)>,
        qk_norm: Option<(Tensor, Tensor)>,
        untrained: bool,
    ) -> Result<Self> {
        let (heads, kv_heads, head_dim) = Self::sizes(dim, kv_dim, cfg)?;
        if cfg.rope_base.is_some() && head_dim % 2 == 1 {
            return Err(MlmfError::config(
                "rope_base",
                format!("rotary embeddings need an even head_dim, got {head_dim}"),
            ));
        }
        let [q, k, v, o] =
            shapes(dim, kv_dim, heads * head_dim, kv_heads * head_dim).map(|(name, out, inp)| {
                get(name, out, inp).and_then(|(w, b)| Linear::from_parts(w, Some(b)))
            });
        Ok(Self {
            q: q?,
            k: k?,
            v: v?,
            o: o?,
            dim,
            kv_dim,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (f64::from(cfg.temperature) * (head_dim as f64).sqrt()),
            qk_norm,
            cfg: cfg.clone(),
            untrained,
            query_modality: Modality::Text,
            kv_modality: Modality::Image,
        })
    }

    /// An untrained layer, initialised from `seed` (same seed, same weights).
    pub fn new(
        dim: usize,
        kv_dim: usize,
        cfg: &CrossModalAttentionConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SplitMix(seed);
        let f = ce("attention init");
        let (_, _, head_dim) = Self::sizes(dim, kv_dim, cfg)?;
        let ones = || Tensor::ones(head_dim, DType::F32, device).map_err(&f);
        let qk_norm = if cfg.qk_norm {
            Some((ones()?, ones()?))
        } else {
            None
        };
        Self::build(
            dim,
            kv_dim,
            cfg,
            |_, out, inp| {
                let bound = 1.0 / (inp as f32).sqrt();
                let w = Tensor::from_vec(rng.uniform(out * inp, bound), (out, inp), device)
                    .map_err(&f)?;
                let b = Tensor::from_vec(rng.uniform(out, bound), out, device).map_err(&f)?;
                Ok((w, b))
            },
            qk_norm,
            true,
        )
    }

    /// A layer (no QK-norm) whose projections come from `get(name, out, in)`, which
    /// returns the `[out, in]` weight and the bias of `q_proj`, `k_proj`, `v_proj` and
    /// `out_proj` in that order; the fusion layers build theirs this way.
    pub(crate) fn from_projections(
        dim: usize,
        kv_dim: usize,
        cfg: &CrossModalAttentionConfig,
        get: impl FnMut(&str, usize, usize) -> Result<(Tensor, Tensor)>,
        untrained: bool,
    ) -> Result<Self> {
        Self::build(dim, kv_dim, cfg, get, None, untrained)
    }

    /// A layer with the weights in the safetensors file `path` (names in the module
    /// docs); every tensor's shape is checked against the configuration.
    pub fn load(
        path: &Path,
        dim: usize,
        kv_dim: usize,
        cfg: &CrossModalAttentionConfig,
        device: &Device,
    ) -> Result<Self> {
        let what = "cross-modal attention weights";
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| MlmfError::model_load(what, path, e.to_string()))?;
        let fetch = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| {
                MlmfError::model_load(what, path, format!("tensor `{name}` is missing"))
            })?;
            if t.dims() != shape {
                return Err(MlmfError::model_load(
                    what,
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    ),
                ));
            }
            t.to_dtype(DType::F32)
                .map_err(|e| MlmfError::model_load(what, path, e.to_string()))
        };
        let (_, _, head_dim) = Self::sizes(dim, kv_dim, cfg)?;
        let qk_norm = if cfg.qk_norm {
            Some((
                fetch("q_norm.weight", &[head_dim])?,
                fetch("k_norm.weight", &[head_dim])?,
            ))
        } else {
            None
        };
        Self::build(
            dim,
            kv_dim,
            cfg,
            |name, out, inp| {
                Ok((
                    fetch(&format!("{name}.weight"), &[out, inp])?,
                    fetch(&format!("{name}.bias"), &[out])?,
                ))
            },
            qk_norm,
            false,
        )
    }

    /// The weights by the names [`load`](Self::load) reads, PyTorch's `[out, in]` layout.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, lin) in [
            ("q_proj", &self.q),
            ("k_proj", &self.k),
            ("v_proj", &self.v),
            ("out_proj", &self.o),
        ] {
            out.push((format!("{name}.weight"), lin.weight_out_in()?));
            if let Some(b) = &lin.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        }
        if let Some((qn, kn)) = &self.qk_norm {
            out.push(("q_norm.weight".into(), qn.clone()));
            out.push(("k_norm.weight".into(), kn.clone()));
        }
        Ok(out)
    }

    /// The layer's settings.
    pub fn config(&self) -> &CrossModalAttentionConfig {
        &self.cfg
    }

    /// Writes the weights to `path` (safetensors, the names [`load`](Self::load) reads).
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self.named_tensors()?.into_iter().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| {
            MlmfError::model_load(
                "cross-modal attention weights",
                path,
                format!("cannot write: {e}"),
            )
        })
    }

    /// Whether the weights are a seeded initialisation rather than loaded ones.
    pub fn is_untrained(&self) -> bool {
        self.untrained
    }

    /// `(num_heads, num_kv_heads, head_dim)`.
    pub fn heads(&self) -> (usize, usize, usize) {
        (self.heads, self.kv_heads, self.head_dim)
    }

    /// Whether no variant is on: softmax attention of the projections with the
    /// temperature, nothing else (the float32 CPU kernels' case).
    pub(crate) fn is_plain(&self) -> bool {
        let c = &self.cfg;
        !(c.qk_norm
            || c.rope_base.is_some()
            || c.softcap.is_some()
            || c.sliding_window.is_some()
            || c.top_k.is_some()
            || c.sparsity_ratio.is_some()
            || c.adaptive)
    }

    /// The logit scale, `1 / (temperature * sqrt(head_dim))`.
    pub(crate) fn scale(&self) -> f64 {
        self.scale
    }

    /// `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    pub(crate) fn projections(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    /// Query width and key/value width.
    pub fn dims(&self) -> (usize, usize) {
        (self.dim, self.kv_dim)
    }

    /// Checks one side: `[B, T, width]` float, T >= 1, finite; returns `(B, T)`.
    fn check_side(
        &self,
        x: &Tensor,
        width: usize,
        side: &str,
        modality: Modality,
    ) -> Result<(usize, usize)> {
        let bad = |m: String| MlmfError::input(modality, format!("{side}: {m}"));
        let (b, t, w) = x.dims3().map_err(|_| {
            bad(format!(
                "expected [batch, tokens, {width}], got shape {:?}",
                x.dims()
            ))
        })?;
        if w != width {
            return Err(bad(format!(
                "expected width {width}, got {w} (shape {:?})",
                x.dims()
            )));
        }
        if b == 0 || t == 0 {
            return Err(bad(format!(
                "expected at least one row and one token, got shape {:?}",
                x.dims()
            )));
        }
        if !x.dtype().is_float() {
            return Err(bad(format!("expected a float tensor, got {:?}", x.dtype())));
        }
        let x32 = x.to_dtype(DType::F32).map_err(ce("attention input"))?;
        check_finite(&x32, modality, &format!("{side}: "))?;
        Ok((b, t))
    }

    /// `[B, T, H*hd]` -> `[B, H, T, hd]`.
    fn split(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3().map_err(ce("attention heads"))?;
        x.reshape((b, t, heads, self.head_dim))
            .and_then(|x| x.transpose(1, 2))
            .and_then(|x| x.contiguous())
            .map_err(ce("attention heads"))
    }

    /// Attention of `query` `[B, Tq, dim]` over `key_value` `[B, Tk, kv_dim]`; masks are
    /// `[B, T]` of 0/1 (1 = real token).
    pub fn forward(
        &self,
        query: &Tensor,
        key_value: &Tensor,
        query_mask: Option<&Tensor>,
        kv_mask: Option<&Tensor>,
        return_weights: bool,
    ) -> Result<AttentionOutput> {
        let (b, tq) = self.check_side(query, self.dim, "query", self.query_modality)?;
        let (bk, tk) = self.check_side(key_value, self.kv_dim, "key_value", self.kv_modality)?;
        if bk != b {
            return Err(MlmfError::input(
                self.kv_modality,
                format!("key_value: batch of {bk} rows, the query has {b}"),
            ));
        }
        let qm = query_mask
            .map(|m| check_mask(m, b, tq, "query_mask: ", self.query_modality))
            .transpose()?;
        let km = kv_mask
            .map(|m| check_mask(m, b, tk, "kv_mask: ", self.kv_modality))
            .transpose()?;
        let f = ce("cross-modal attention");
        let query = query.to_dtype(DType::F32).map_err(&f)?;
        let key_value = key_value.to_dtype(DType::F32).map_err(&f)?;
        if let Some(out) = self.forward_cpu(
            &query,
            &key_value,
            qm.as_ref(),
            km.as_ref(),
            return_weights,
            (b, tq, tk),
        )? {
            return Ok(out);
        }
        let mut q = self.split(&self.q.forward(&query)?, self.heads)?;
        let mut k = self.split(&self.k.forward(&key_value)?, self.kv_heads)?;
        let mut v = self.split(&self.v.forward(&key_value)?, self.kv_heads)?;
        if let Some((qn, kn)) = &self.qk_norm {
            let eps = f64::from(self.cfg.qk_norm_eps);
            q = rms_norm(&q, qn, eps)?;
            k = rms_norm(&k, kn, eps)?;
        }
        if let Some(base) = self.cfg.rope_base {
            q = rope(&q, base, self.cfg.rope_scale)?;
            k = rope(&k, base, self.cfg.rope_scale)?;
        }
        if self.kv_heads != self.heads {
            // Query head h reads kv head h / group: repeat each kv head `group` times.
            let group = self.heads / self.kv_heads;
            let repeat = |x: &Tensor| {
                x.unsqueeze(2)
                    .and_then(|x| x.broadcast_as((b, self.kv_heads, group, tk, self.head_dim)))
                    .and_then(|x| x.reshape((b, self.heads, tk, self.head_dim)))
            };
            k = repeat(&k).map_err(&f)?;
            v = repeat(&v).map_err(&f)?;
        }
        let kt = k.t().and_then(|k| k.contiguous()).map_err(&f)?;
        let mut logits = (q.matmul(&kt).map_err(&f)? * self.scale).map_err(&f)?;
        if let Some(c) = self.cfg.softcap {
            let c = f64::from(c);
            logits = (logits / c)
                .and_then(|x| x.tanh())
                .and_then(|x| x * c)
                .map_err(&f)?;
        }
        // Which keys each query row may see: kv padding, window, top-k ([B, H, Tq, Tk]).
        let mut allowed = self.allowed(&logits, km.as_ref(), (b, tq, tk))?;
        if self.cfg.adaptive {
            let (l, a) = self.adapt(&logits, allowed.as_ref())?;
            logits = l;
            allowed = Some(a);
        }
        if let Some(a) = &allowed {
            let bias = a
                .affine(-f64::from(MASKED), f64::from(MASKED))
                .map_err(&f)?;
            logits = (logits + bias).map_err(&f)?;
        }
        let mut weights = candle_nn::ops::softmax_last_dim(&logits).map_err(&f)?;
        if let Some(a) = &allowed {
            // Disallowed keys get exactly 0; a row with no allowed key becomes all 0.
            weights = (weights * a).map_err(&f)?;
        }
        if let Some(m) = &qm {
            let m = m.reshape((b, 1, tq, 1)).map_err(&f)?;
            weights = weights.broadcast_mul(&m).map_err(&f)?;
        }
        let ctx = weights
            .matmul(&v)
            .and_then(|c| c.transpose(1, 2))
            .and_then(|c| c.contiguous())
            .and_then(|c| c.reshape((b, tq, self.heads * self.head_dim)))
            .map_err(&f)?;
        // A query row that sees no key attends to nothing: its output is 0 (not
        // out_proj's bias).
        let any = allowed
            .as_ref()
            .map(|a| {
                a.max(D::Minus1)
                    .and_then(|x| x.max(1))
                    .and_then(|x| x.unsqueeze(2))
            })
            .transpose()
            .map_err(&f)?;
        let output = zero_rows(self.o.forward(&ctx)?, qm.as_ref(), any.as_ref())?;
        Ok(AttentionOutput {
            output,
            weights: return_weights.then_some(weights),
        })
    }
}

impl CrossModalAttention {
    /// The float32 CPU path ([`crate::kernels::cross_attention`]): one task per
    /// (batch row, head, block of queries), heads read in place, no logits tensor.
    /// Taken on the CPU when no variant beyond grouped-query heads and key masks is on;
    /// `None` otherwise.
    fn forward_cpu(
        &self,
        query: &Tensor,
        key_value: &Tensor,
        qm: Option<&Tensor>,
        km: Option<&Tensor>,
        return_weights: bool,
        (b, tq, tk): (usize, usize, usize),
    ) -> Result<Option<AttentionOutput>> {
        if !query.device().is_cpu() || !self.is_plain() {
            return Ok(None);
        }
        let f = ce("cross-modal attention");
        let (Some((q, _)), Some((kv, _))) = (
            cpu::project(query, &[&self.q])?,
            cpu::project(key_value, &[&self.k, &self.v])?,
        ) else {
            return Ok(None);
        };
        let keys = km
            .map(|m| m.flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .transpose()
            .map_err(&f)?;
        let width = self.heads * self.head_dim;
        let mut ctx = vec![0f32; b * tq * width];
        let mut w = return_weights.then(|| vec![0f32; b * self.heads * tq * tk]);
        crate::kernels::cross_attention(
            &q,
            &kv,
            (b, tq, tk),
            (self.heads, self.kv_heads, self.head_dim),
            self.scale as f32,
            keys.as_deref(),
            &mut ctx,
            w.as_deref_mut(),
        );
        let dev = query.device();
        let ctx = Tensor::from_vec(ctx, (b, tq, width), dev).map_err(&f)?;
        let mut weights = w
            .map(|w| Tensor::from_vec(w, (b, self.heads, tq, tk), dev))
            .transpose()
            .map_err(&f)?;
        if let (Some(wt), Some(m)) = (weights.as_mut(), qm) {
            let m = m.reshape((b, 1, tq, 1)).map_err(&f)?;
            *wt = wt.broadcast_mul(&m).map_err(&f)?;
        }
        let any = km
            .map(|m| m.max_keepdim(1).and_then(|a| a.unsqueeze(2)))
            .transpose()
            .map_err(&f)?;
        let output = zero_rows(self.o.forward(&ctx)?, qm, any.as_ref())?;
        Ok(Some(AttentionOutput { output, weights }))
    }

    /// 1 where query row `(b, h, i)` may attend key `j`, 0 elsewhere: the key padding
    /// mask, the sliding window `|i - j| <= w`, then the `top_k` (or
    /// `sparsity_ratio`) largest of the remaining logits; `None` when nothing is masked.
    fn allowed(
        &self,
        logits: &Tensor,
        km: Option<&Tensor>,
        (b, tq, tk): (usize, usize, usize),
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let sparse = cfg.top_k.is_some() || cfg.sparsity_ratio.is_some();
        if km.is_none() && cfg.sliding_window.is_none() && !sparse {
            return Ok(None);
        }
        let f = ce("attention mask");
        let h = self.heads;
        if let (Some(m), None, false) = (km, cfg.sliding_window, sparse) {
            // The key padding mask alone: built where the logits are, with no round
            // trip through the host (on a GPU, B x H x Tq x Tk floats per call).
            return m
                .ne(0f32)
                .and_then(|m| m.to_dtype(DType::F32))
                .and_then(|m| m.reshape((b, 1, 1, tk)))
                .and_then(|m| m.broadcast_as((b, h, tq, tk)))
                .and_then(|m| m.contiguous())
                .map(Some)
                .map_err(f);
        }
        let keys: Option<Vec<f32>> = km
            .map(|m| m.flatten_all().and_then(|m| m.to_vec1()))
            .transpose()
            .map_err(&f)?;
        let lv: Option<Vec<f32>> = if sparse {
            Some(logits.flatten_all().and_then(|l| l.to_vec1()).map_err(&f)?)
        } else {
            None
        };
        let mut a = vec![0f32; b * h * tq * tk];
        let mut kept: Vec<f32> = Vec::with_capacity(tk);
        for (r, row) in a.chunks_exact_mut(tk).enumerate() {
            let (bi, i) = (r / (h * tq), r % tq);
            for (j, x) in row.iter_mut().enumerate() {
                let real = keys.as_ref().is_none_or(|k| k[bi * tk + j] != 0.0);
                let near = cfg.sliding_window.is_none_or(|w| i.abs_diff(j) <= w);
                *x = if real && near { 1.0 } else { 0.0 };
            }
            if let Some(lv) = &lv {
                select::keep_largest(row, &lv[r * tk..(r + 1) * tk], cfg, &mut kept);
            }
        }
        Tensor::from_vec(a, (b, h, tq, tk), logits.device())
            .map(Some)
            .map_err(f)
    }
}

impl CrossModalAttention {
    /// Adaptive attention: per query row, the logits of the `n` keys the row may see
    /// are divided by `tau = clamp(std / adaptive_target_std, min, max)`, and only the
    /// `k = max(1, ceil((1 - s) n))` largest are kept, with
    /// `s = adaptive_max_sparsity * (1 - H / ln n)` from the entropy `H` of the
    /// row's softmax at `tau`: a peaked row is sparsified, a flat one keeps its keys.
    /// Returns the scaled logits and the keys each row keeps.
    fn adapt(&self, logits: &Tensor, allowed: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let f = ce("adaptive attention");
        let cfg = &self.cfg;
        let dims = logits.dims().to_vec();
        let tk = *dims
            .last()
            .ok_or_else(|| MlmfError::Internal("logits".into()))?;
        let mut l: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?;
        let mut a: Vec<f32> = match allowed {
            Some(a) => a.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?,
            None => vec![1.0; l.len()],
        };
        let mut kept: Vec<f64> = Vec::with_capacity(tk);
        for (row, ok) in l.chunks_exact_mut(tk).zip(a.chunks_exact_mut(tk)) {
            select::adapt_row(row, ok, cfg, &mut kept);
        }
        let dev = logits.device();
        let l = Tensor::from_vec(l, dims.as_slice(), dev).map_err(&f)?;
        let a = Tensor::from_vec(a, dims.as_slice(), dev).map_err(f)?;
        Ok((l, a))
    }
}

/// Errors if the float32 `x` `[B, T, D]` holds a NaN or an infinity, naming the input
/// row and token. One reduction on the usual path; the values are copied out only to
/// locate a non-finite one (a finite sum that overflows finds none and passes).
/// `prefix` starts the message (e.g. `"key_value: "`).
pub(crate) fn check_finite(x: &Tensor, modality: Modality, prefix: &str) -> Result<()> {
    let f = ce("input check");
    let total = x.sum_all().and_then(|s| s.to_scalar::<f32>()).map_err(&f)?;
    if total.is_finite() {
        return Ok(());
    }
    let (_, t, d) = x.dims3().map_err(&f)?;
    let values = x
        .flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(&f)?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(pos) => Err(MlmfError::input(
            modality,
            format!(
                "{prefix}non-finite value {} at token {}",
                values[pos],
                (pos / d) % t
            ),
        )
        .at_index(pos / (d * t))),
        None => Ok(()),
    }
}

/// A `[B, T]` mask of 0/1 as float32 `[B, T]`; `prefix` starts error messages.
pub(crate) fn check_mask(
    mask: &Tensor,
    b: usize,
    t: usize,
    prefix: &str,
    modality: Modality,
) -> Result<Tensor> {
    if mask.dims() != [b, t] {
        return Err(MlmfError::input(
            modality,
            format!(
                "{prefix}expected a mask of shape [{b}, {t}], got {:?}",
                mask.dims()
            ),
        ));
    }
    let f = ce("mask");
    let m = mask.to_dtype(DType::F32).map_err(&f)?;
    let vals = m
        .flatten_all()
        .and_then(|m| m.to_vec1::<f32>())
        .map_err(f)?;
    if let Some(pos) = vals.iter().position(|&v| v != 0.0 && v != 1.0) {
        return Err(MlmfError::input(
            modality,
            format!(
                "{prefix}mask values must be 0 or 1, got {} at token {}",
                vals[pos],
                pos % t
            ),
        )
        .at_index(pos / t));
    }
    Ok(m)
}

/// `output` `[B, Tq, D]` with the rows of masked queries (`qm` `[B, Tq]`) and of
/// queries that see no key (`any` `[B, Tq|1, 1]`, 0 there) set to 0.
pub(crate) fn zero_rows(
    output: Tensor,
    qm: Option<&Tensor>,
    any: Option<&Tensor>,
) -> Result<Tensor> {
    let f = ce("attention output");
    let mut output = output;
    if let Some(m) = qm {
        let m = m.unsqueeze(D::Minus1).map_err(&f)?;
        output = output.broadcast_mul(&m).map_err(&f)?;
    }
    if let Some(a) = any {
        output = output.broadcast_mul(a).map_err(&f)?;
    }
    Ok(output)
}

/// RMSNorm over the last dimension: `x * w / sqrt(mean(x^2) + eps)`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let f = ce("qk norm");
    let ms = x
        .sqr()
        .and_then(|s| s.mean_keepdim(D::Minus1))
        .map_err(&f)?;
    x.broadcast_div(&(ms + eps).and_then(|m| m.sqrt()).map_err(&f)?)
        .and_then(|y| y.broadcast_mul(w))
        .map_err(f)
}

/// Rotary embeddings ("rotate half") on `[B, H, T, hd]` at positions `0..T` divided by
/// `scale`; angles computed in float64.
pub(crate) fn rope(x: &Tensor, base: f64, scale: f64) -> Result<Tensor> {
    let f = ce("rotary embedding");
    let (_, _, t, hd) = x.dims4().map_err(&f)?;
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * hd);
    let mut sin = Vec::with_capacity(t * hd);
    for p in 0..t {
        let pos = p as f64 / scale;
        for _ in 0..2 {
            for i in 0..half {
                let angle = pos / base.powf(2.0 * i as f64 / hd as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let dev = x.device();
    let cos = Tensor::from_vec(cos, (t, hd), dev).map_err(&f)?;
    let sin = Tensor::from_vec(sin, (t, hd), dev).map_err(&f)?;
    let x1 = x.narrow(D::Minus1, 0, half).map_err(&f)?;
    let x2 = x.narrow(D::Minus1, half, half).map_err(&f)?;
    let rotated = Tensor::cat(&[&x2.neg().map_err(&f)?, &x1], D::Minus1).map_err(&f)?;
    x.broadcast_mul(&cos)
        .and_then(|a| a + rotated.broadcast_mul(&sin)?)
        .map_err(f)
}

/// Mean over heads of per-head weights `[B, H, Tq, Tk]` -> `[B, Tq, Tk]`.
pub fn average_heads(weights: &Tensor) -> Result<Tensor> {
    weights.mean(1).map_err(ce("average heads"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv_heads: Option<usize>) -> CrossModalAttentionConfig {
        CrossModalAttentionConfig {
            num_heads: heads,
            num_kv_heads: kv_heads,
            ..Default::default()
        }
    }

    fn input(b: usize, t: usize, w: usize, seed: u64) -> Tensor {
        let v = SplitMix(seed).uniform(b * t * w, 1.0);
        Tensor::from_vec(v, (b, t, w), &Device::Cpu).unwrap()
    }

    use crate::encoders::layers::max_abs_diff as max_diff;

    #[test]
    fn seeded_init_is_deterministic_and_flagged() {
        let a = CrossModalAttention::new(16, 12, &cfg(4, None), 3, &Device::Cpu).unwrap();
        let b = CrossModalAttention::new(16, 12, &cfg(4, None), 3, &Device::Cpu).unwrap();
        let c = CrossModalAttention::new(16, 12, &cfg(4, None), 4, &Device::Cpu).unwrap();
        let (q, kv) = (input(2, 3, 16, 1), input(2, 5, 12, 2));
        let ya = a.forward(&q, &kv, None, None, false).unwrap().output;
        let yb = b.forward(&q, &kv, None, None, false).unwrap().output;
        let yc = c.forward(&q, &kv, None, None, false).unwrap().output;
        assert_eq!(max_diff(&ya, &yb), 0.0);
        assert!(max_diff(&ya, &yc) > 1e-3);
        assert!(a.is_untrained());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("mlmf-att-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let a = CrossModalAttention::new(16, 12, &cfg(4, Some(2)), 9, &Device::Cpu).unwrap();
        a.save(&path).unwrap();
        let b = CrossModalAttention::load(&path, 16, 12, &cfg(4, Some(2)), &Device::Cpu).unwrap();
        assert!(!b.is_untrained());
        let (q, kv) = (input(2, 3, 16, 1), input(2, 5, 12, 2));
        let ya = a.forward(&q, &kv, None, None, true).unwrap();
        let yb = b.forward(&q, &kv, None, None, true).unwrap();
        assert_eq!(max_diff(&ya.output, &yb.output), 0.0);
        // The wrong configuration names the tensor and both shapes.
        let err =
            CrossModalAttention::load(&path, 16, 12, &cfg(4, None), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("k_proj.weight"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The key padding mask built with tensor ops equals the host construction (which
    /// a window too wide to exclude anything takes).
    #[test]
    fn the_key_mask_built_on_the_device_equals_the_host_one() {
        let (b, tq, tk) = (2, 3, 5);
        let km = Tensor::from_vec(
            vec![1f32, 1., 0., 1., 0., 0., 1., 0., 0., 1.],
            (b, tk),
            &Device::Cpu,
        )
        .unwrap();
        let logits = input(b * 4, tq, tk, 3).reshape((b, 4, tq, tk)).unwrap();
        let plain = CrossModalAttention::new(16, 12, &cfg(4, None), 1, &Device::Cpu).unwrap();
        let wide = CrossModalAttentionConfig {
            sliding_window: Some(1000),
            ..cfg(4, None)
        };
        let host = CrossModalAttention::new(16, 12, &wide, 1, &Device::Cpu).unwrap();
        let a = plain
            .allowed(&logits, Some(&km), (b, tq, tk))
            .unwrap()
            .unwrap();
        let want = host
            .allowed(&logits, Some(&km), (b, tq, tk))
            .unwrap()
            .unwrap();
        assert_eq!(a.dims(), &[b, 4, tq, tk]);
        assert_eq!(max_diff(&a, &want), 0.0);
        let row = a.get(1).unwrap().get(2).unwrap().get(0).unwrap();
        assert_eq!(row.to_vec1::<f32>().unwrap(), vec![0., 1., 0., 0., 1.]);
    }

    #[test]
    fn weights_are_a_distribution_over_unmasked_keys() {
        let a = CrossModalAttention::new(16, 12, &cfg(4, Some(1)), 5, &Device::Cpu).unwrap();
        let (q, kv) = (input(2, 3, 16, 1), input(2, 5, 12, 2));
        let km =
            Tensor::from_vec(vec![1u8, 1, 0, 1, 0, 0, 0, 0, 0, 0], (2, 5), &Device::Cpu).unwrap();
        let qm = Tensor::from_vec(vec![1u8, 0, 1, 1, 1, 1], (2, 3), &Device::Cpu).unwrap();
        let out = a.forward(&q, &kv, Some(&qm), Some(&km), true).unwrap();
        let w = out.weights.unwrap();
        assert_eq!(w.dims(), &[2, 4, 3, 5]);
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let row = |b: usize, h: usize, i: usize| &w[((b * 4 + h) * 3 + i) * 5..][..5];
        for h in 0..4 {
            // Row 0, query 0: sums to 1 over keys 0, 1, 3; keys 2 and 4 get 0.
            let r = row(0, h, 0);
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert_eq!((r[2], r[4]), (0.0, 0.0));
            // Row 0, query 1 is masked: all 0.
            assert!(row(0, h, 1).iter().all(|&x| x == 0.0));
            // Row 1: every key masked: all 0, no NaN.
            for i in 0..3 {
                assert!(row(1, h, i).iter().all(|&x| x == 0.0));
            }
        }
        let y = out.output.to_vec3::<f32>().unwrap();
        assert!(y[0][1].iter().all(|&x| x == 0.0));
        assert!(y[1].iter().flatten().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let a = CrossModalAttention::new(16, 12, &cfg(4, None), 5, &Device::Cpu).unwrap();
        let (q, kv) = (input(2, 3, 16, 1), input(2, 5, 12, 2));
        let empty = Tensor::zeros((2, 0, 12), DType::F32, &Device::Cpu).unwrap();
        let mut nan = vec![0f32; 2 * 5 * 12];
        nan[5 * 12 + 2 * 12 + 3] = f32::NAN;
        let nan = Tensor::from_vec(nan, (2, 5, 12), &Device::Cpu).unwrap();
        let bad_mask = Tensor::ones((2, 4), DType::U8, &Device::Cpu).unwrap();
        let cases = [
            (
                a.forward(&input(2, 3, 15, 1), &kv, None, None, false),
                "text input: query: expected width 16",
            ),
            (
                a.forward(&q, &input(2, 5, 16, 1), None, None, false),
                "image input: key_value: expected width 12",
            ),
            (
                a.forward(&q, &input(3, 5, 12, 1), None, None, false),
                "batch of 3 rows",
            ),
            (
                a.forward(&q, &empty, None, None, false),
                "at least one row and one token",
            ),
            (
                a.forward(&q, &nan, None, None, false),
                "image input 1: key_value: non-finite value NaN at token 2",
            ),
            (
                a.forward(&q, &kv, None, Some(&bad_mask), false),
                "kv_mask: expected a mask of shape [2, 5]",
            ),
        ];
        for (got, want) in cases {
            let err = got.unwrap_err();
            assert!(matches!(err, MlmfError::Input { .. }), "{err:?}");
            assert!(
                err.to_string().contains(want),
                "{err} does not say {want:?}"
            );
        }
        let err = CrossModalAttention::new(16, 12, &cfg(4, Some(3)), 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("num_kv_heads"), "{err}");
    }

    #[test]
    fn window_and_top_k_limit_the_keys_each_query_sees() {
        let c = CrossModalAttentionConfig {
            num_heads: 2,
            sliding_window: Some(1),
            ..Default::default()
        };
        let a = CrossModalAttention::new(8, 6, &c, 1, &Device::Cpu).unwrap();
        let (q, kv) = (input(1, 4, 8, 1), input(1, 6, 6, 2));
        let w = a
            .forward(&q, &kv, None, None, true)
            .unwrap()
            .weights
            .unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (r, row) in w.chunks(6).enumerate() {
            let i = r % 4;
            for (j, &x) in row.iter().enumerate() {
                assert_eq!(x > 0.0, i.abs_diff(j) <= 1, "query {i} key {j}: {x}");
            }
        }
        for (top_k, ratio, keep) in [(Some(2), None, 2), (None, Some(0.5), 3)] {
            let c = CrossModalAttentionConfig {
                num_heads: 2,
                top_k,
                sparsity_ratio: ratio,
                ..Default::default()
            };
            let a = CrossModalAttention::new(8, 6, &c, 1, &Device::Cpu).unwrap();
            let w = a
                .forward(&q, &kv, None, None, true)
                .unwrap()
                .weights
                .unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for row in w.chunks(6) {
                assert_eq!(row.iter().filter(|&&x| x > 0.0).count(), keep);
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn adaptive_attention_reduces_to_fixed_settings_and_keeps_enough_keys() {
        let (q, kv) = (input(2, 4, 8, 1), input(2, 9, 6, 2));
        let mut km = vec![1u8; 18];
        km[11..14].iter_mut().for_each(|m| *m = 0);
        let km = Tensor::from_vec(km, (2, 9), &Device::Cpu).unwrap();
        let run = |c: &CrossModalAttentionConfig| {
            let a = CrossModalAttention::new(8, 6, c, 4, &Device::Cpu).unwrap();
            a.forward(&q, &kv, None, Some(&km), true).unwrap()
        };
        let base = CrossModalAttentionConfig {
            num_heads: 2,
            ..Default::default()
        };
        // Temperature pinned to t and no sparsity: a fixed temperature of t.
        for t in [1.0f32, 2.0] {
            let adaptive = run(&CrossModalAttentionConfig {
                adaptive: true,
                adaptive_min_temperature: t,
                adaptive_max_temperature: t,
                adaptive_max_sparsity: 0.0,
                ..base.clone()
            });
            let fixed = run(&CrossModalAttentionConfig {
                temperature: t,
                ..base.clone()
            });
            assert!(max_diff(&adaptive.output, &fixed.output) < 1e-6);
        }
        // Sharpened rows (temperature 0.02) are sparsified, each still a distribution
        // over at least ceil((1 - 0.9) n) of its keys.
        let out = run(&CrossModalAttentionConfig {
            adaptive: true,
            adaptive_min_temperature: 0.02,
            adaptive_max_temperature: 0.02,
            adaptive_max_sparsity: 0.9,
            ..base.clone()
        });
        let w = out.weights.unwrap().flatten_all().unwrap();
        let w = w.to_vec1::<f32>().unwrap();
        let mut sparser = 0;
        for (r, row) in w.chunks(9).enumerate() {
            let n = if r < 8 { 9 } else { 6 };
            let kept = row.iter().filter(|&&x| x > 0.0).count();
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(kept >= (0.1 * n as f64).ceil() as usize && kept <= n);
            sparser += usize::from(kept < n);
            if r >= 8 {
                assert_eq!(&row[2..5], &[0.0; 3]);
            }
        }
        assert!(sparser > 0, "no row was sparsified");
        let err = CrossModalAttention::new(
            8,
            6,
            &CrossModalAttentionConfig {
                adaptive: true,
                top_k: Some(2),
                ..base
            },
            0,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(err.to_string().contains("adaptive"), "{err}");
    }

    #[test]
    fn cpu_path_equals_the_candle_path() {
        // A softcap far above every logit changes nothing but sends the layer through
        // the candle ops; without it the float32 CPU kernels run.
        for kv_heads in [None, Some(2), Some(1)] {
            let fast_cfg = CrossModalAttentionConfig {
                num_heads: 4,
                num_kv_heads: kv_heads,
                ..Default::default()
            };
            let slow_cfg = CrossModalAttentionConfig {
                softcap: Some(1e9),
                ..fast_cfg.clone()
            };
            let fast = CrossModalAttention::new(16, 12, &fast_cfg, 11, &Device::Cpu).unwrap();
            let slow = CrossModalAttention::new(16, 12, &slow_cfg, 11, &Device::Cpu).unwrap();
            // Tq = 150 > 128: two query blocks.
            let (q, kv) = (input(2, 150, 16, 1), input(2, 9, 12, 2));
            let mut km = vec![1u8; 18];
            km[3] = 0;
            km[9..].iter_mut().for_each(|m| *m = 0);
            let km = Tensor::from_vec(km, (2, 9), &Device::Cpu).unwrap();
            let mut qm = vec![1u8; 300];
            qm[7] = 0;
            let qm = Tensor::from_vec(qm, (2, 150), &Device::Cpu).unwrap();
            let a = fast.forward(&q, &kv, Some(&qm), Some(&km), true).unwrap();
            let b = slow.forward(&q, &kv, Some(&qm), Some(&km), true).unwrap();
            assert!(max_diff(&a.output, &b.output) < 1e-5);
            let (wa, wb) = (a.weights.unwrap(), b.weights.unwrap());
            assert!(max_diff(&wa, &wb) < 1e-6);
        }
    }
}
