//! Packed batches for the token-level fusion stacks (`early`, `middle`) on the float32
//! CPU path.
//!
//! A padded batch `[B, T, D]` with a 0/1 mask carries rows that no fused result
//! depends on: padded tokens are excluded from every key set and from the masked
//! means. Here only the real rows are kept, gathered into one `[N, D]` matrix with
//! per-item row offsets (`offsets[i]..offsets[i + 1]` are item `i`'s rows). Row-wise
//! work (norms, projections, MLPs, residuals) runs on the `N` rows, and attention runs
//! per item over its own rows, so no key needs a mask and no padded row costs a
//! multiply. With text padded to 77 tokens and ~40 real ones, that removes about
//! half of the text rows' work.

use candle_core::Tensor;
use rayon::prelude::*;

use super::view;
use crate::encoders::layers::{ce, Activation, EncoderLayer, LayerNorm, Linear};
use crate::error::{MlmfError, Result};
use crate::kernels::{
    attend_rows, is_plain_f32, layer_norm, linear, slice, Dst, Lin, Rows, WeightRef, SCRATCH,
};

/// The real rows of a batch, packed: `data` is `[offsets[B], width]`.
#[derive(Debug, Clone)]
struct Packed {
    data: Vec<f32>,
    width: usize,
    /// `B + 1` row offsets, from 0.
    offsets: Vec<usize>,
}

impl Packed {
    /// The rows of `x` `[B, T, D]` whose `mask` `[B, T]` entry is non-zero (all rows
    /// without a mask); `None` when `x` is not a float32 CPU tensor.
    fn gather(x: &Tensor, mask: Option<&Tensor>) -> Result<Option<Self>> {
        if !is_plain_f32(x) {
            return Ok(None);
        }
        let f = ce("packed tokens");
        let (b, t, d) = x.dims3().map_err(&f)?;
        let keep: Option<Vec<f32>> = mask
            .map(|m| m.flatten_all().and_then(|m| m.to_vec1()))
            .transpose()
            .map_err(&f)?;
        if keep.as_ref().is_some_and(|k| k.len() != b * t) {
            return Err(MlmfError::Internal("packed tokens: mask size".into()));
        }
        let (g, l) = x.storage_and_layout();
        let xs = slice(&g, l).ok_or_else(|| MlmfError::Internal("packed tokens".into()))?;
        let mut data = Vec::with_capacity(xs.len());
        let mut offsets = Vec::with_capacity(b + 1);
        offsets.push(0);
        for i in 0..b {
            for j in 0..t {
                if keep.as_ref().is_none_or(|k| k[i * t + j] != 0.0) {
                    let r = (i * t + j) * d;
                    data.extend_from_slice(&xs[r..r + d]);
                }
            }
            offsets.push(data.len() / d.max(1));
        }
        Ok(Some(Self {
            data,
            width: d,
            offsets,
        }))
    }

    fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    fn items(&self) -> usize {
        self.offsets.len() - 1
    }

    fn item(&self, i: usize) -> &[f32] {
        &self.data[self.offsets[i] * self.width..self.offsets[i + 1] * self.width]
    }

    /// Per item, the rows of each part in turn (the parts share batch size and width).
    fn interleave(parts: &[&Packed]) -> Self {
        let width = parts.first().map_or(0, |p| p.width);
        let items = parts.first().map_or(0, |p| p.items());
        let total: usize = parts.iter().map(|p| p.rows()).sum();
        let mut data = Vec::with_capacity(total * width);
        let mut offsets = Vec::with_capacity(items + 1);
        offsets.push(0);
        for i in 0..items {
            for p in parts {
                data.extend_from_slice(p.item(i));
            }
            offsets.push(data.len() / width.max(1));
        }
        Self {
            data,
            width,
            offsets,
        }
    }

    /// `[B, width]`: the mean of each item's rows, 0 for an item with none.
    fn mean_rows(&self) -> Vec<f32> {
        let d = self.width;
        let mut out = vec![0f32; self.items() * d];
        for (i, o) in out.chunks_exact_mut(d.max(1)).enumerate() {
            let rows = self.item(i);
            let n = rows.len() / d.max(1);
            for r in rows.chunks_exact(d) {
                for (o, v) in o.iter_mut().zip(r) {
                    *o += v;
                }
            }
            let inv = 1.0 / n.max(1) as f32;
            o.iter_mut().for_each(|o| *o *= inv);
        }
        out
    }
}

/// Runs `f` on the float32 slices of `tensors` (in order), read in place; `None` when
/// one of them is not a contiguous float32 CPU tensor.
fn with_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices: Option<Vec<&[f32]>> = guards.iter().map(|(s, l)| slice(s, l)).collect();
    slices.map(|s| f(&s))
}

/// The tensors of a linear map that runs here: `W^T` (unless it is held as panels or
/// int8), then the bias when it has one.
fn push_linear<'t>(lin: &'t Linear, out: &mut Vec<&'t Tensor>) -> Option<()> {
    if !lin.runs_here() {
        return None;
    }
    if lin.owned().is_none() {
        out.push(lin.dense()?);
    }
    out.extend(lin.bias.as_ref());
    Some(())
}

/// Reads back what [`push_linear`] pushed.
fn take_linear<'a>(lin: &'a Linear, s: &mut impl Iterator<Item = &'a [f32]>) -> Option<Lin<'a>> {
    let w = match lin.owned() {
        Some(w) => w,
        None => WeightRef::F32(s.next()?),
    };
    let b = match lin.bias {
        Some(_) => Some(s.next()?),
        None => None,
    };
    Some(Lin { w, b })
}

fn push_norm<'t>(n: &'t LayerNorm, out: &mut Vec<&'t Tensor>) {
    out.push(&n.weight);
    out.push(&n.bias);
}

fn take_norm<'a>(s: &mut impl Iterator<Item = &'a [f32]>) -> Option<(&'a [f32], &'a [f32])> {
    Some((s.next()?, s.next()?))
}

/// Attention over packed rows. Item `i`'s queries are rows `q_off[i]..q_off[i + 1]`
/// of `q` (row stride `q_rs`, head `h` at columns `h * dh..`), its keys and values
/// rows `k_off[i]..k_off[i + 1]` of `kv` at columns `k_col + h * dh` and
/// `v_col + h * dh` (row stride `kv_rs`). Every key is real. The result goes to
/// `ctx` (row stride `heads * dh`, rows as the queries'); an item with no key gets 0.
#[allow(clippy::too_many_arguments)]
fn packed_attention(
    (q, q_rs): (&[f32], usize),
    (kv, k_col, v_col, kv_rs): (&[f32], usize, usize, usize),
    q_off: &[usize],
    k_off: &[usize],
    (heads, dh): (usize, usize),
    scale: f32,
    ctx: &mut [f32],
) {
    let width = heads * dh;
    let (nq_all, nk_all) = (q_off[q_off.len() - 1], k_off[k_off.len() - 1]);
    assert_eq!(q_off.len(), k_off.len());
    assert!(q.len() >= nq_all * q_rs && q_rs >= width);
    assert!(kv.len() >= nk_all * kv_rs && k_col.max(v_col) + width <= kv_rs);
    assert!(ctx.len() >= nq_all * width);
    // Tasks: (item, head, first query, queries), at most 128 queries each.
    let mut tasks = Vec::new();
    for i in 0..q_off.len() - 1 {
        let nq = q_off[i + 1] - q_off[i];
        let block = nq.clamp(1, 128);
        for h in 0..heads {
            for q0 in (0..nq).step_by(block) {
                tasks.push((i, h, q0, block.min(nq - q0)));
            }
        }
    }
    let out = Dst(ctx.as_mut_ptr());
    tasks.par_iter().for_each(|&(i, h, q0, nq)| {
        let (qr, kr, tk) = (q_off[i] + q0, k_off[i], k_off[i + 1] - k_off[i]);
        // SAFETY: reads stay inside q and kv (asserted sizes); the task writes rows
        // qr..qr+nq, columns of head h, of ctx: disjoint per task.
        unsafe {
            let dst = out.ptr().add(qr * width + h * dh);
            if tk == 0 {
                for r in 0..nq {
                    std::slice::from_raw_parts_mut(dst.add(r * width), dh).fill(0.0);
                }
                return;
            }
            SCRATCH.with(|cell| {
                let mut scores = cell.borrow_mut();
                if scores.len() < nq * tk {
                    scores.resize(nq * tk, 0.0);
                }
                let rows = Rows {
                    q: q.as_ptr().add(qr * q_rs + h * dh),
                    q_rs,
                    k: kv.as_ptr().add(kr * kv_rs + k_col + h * dh),
                    v: kv.as_ptr().add(kr * kv_rs + v_col + h * dh),
                    kv_rs,
                    out: dst,
                    out_rs: width,
                    nq,
                    tk,
                    dh,
                };
                attend_rows(rows, scale, |_| None, None, &mut scores, None, None);
            });
        }
    });
}

/// One modality's half of a `middle` fusion layer, in the form the packed path runs:
/// LayerNorms, a GELU MLP, and the residual gates already folded into `o` and `fc2`.
pub(crate) struct CrossBlock<'a> {
    pub(crate) norm_q: &'a LayerNorm,
    pub(crate) norm_kv: &'a LayerNorm,
    /// `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    pub(crate) attn: [&'a Linear; 4],
    pub(crate) heads: usize,
    pub(crate) scale: f32,
    pub(crate) norm_mlp: &'a LayerNorm,
    pub(crate) fc1: &'a Linear,
    pub(crate) fc2: &'a Linear,
}

/// The `middle` stack on packed rows. `inputs[m]` is modality `m`'s tokens and mask
/// (`None` when missing), `proj[m]` its input projection, `layers[l][m]` its half of
/// layer `l`. Returns each present modality's pool `[B * D]` (the mean of its rows
/// after `norm`), or `None` when something lives elsewhere than float32 on the CPU.
pub(crate) fn middle_stack(
    inputs: &[Option<(&Tensor, Option<&Tensor>)>],
    proj: &[Linear],
    layers: &[Vec<CrossBlock<'_>>],
    norm: &LayerNorm,
) -> Result<Option<Vec<Option<Vec<f32>>>>> {
    let mut xs: Vec<Option<Packed>> = Vec::with_capacity(inputs.len());
    for x in inputs {
        match x {
            Some((t, m)) => match Packed::gather(t, *m)? {
                Some(p) => xs.push(Some(p)),
                None => return Ok(None),
            },
            None => xs.push(None),
        }
    }
    let present: Vec<usize> = (0..xs.len()).filter(|&m| xs[m].is_some()).collect();
    // Every weight, in the order the loop below reads them back.
    let mut ts: Vec<&Tensor> = Vec::new();
    for &m in &present {
        if push_linear(&proj[m], &mut ts).is_none() {
            return Ok(None);
        }
    }
    for layer in layers {
        for &m in &present {
            let l = &layer[m];
            push_norm(l.norm_q, &mut ts);
            push_norm(l.norm_kv, &mut ts);
            push_norm(l.norm_mlp, &mut ts);
            for lin in l.attn.iter().chain([&l.fc1, &l.fc2]) {
                if push_linear(lin, &mut ts).is_none() {
                    return Ok(None);
                }
            }
        }
    }
    push_norm(norm, &mut ts);
    if !ts.iter().all(|t| is_plain_f32(t)) {
        return Ok(None);
    }
    let run = |s: &[&[f32]]| -> Option<Vec<Option<Vec<f32>>>> {
        let mut s = s.iter().copied();
        let d = norm.weight.elem_count();
        // Input projections.
        for &m in &present {
            let lin = take_linear(&proj[m], &mut s)?;
            let x = xs[m].as_mut()?;
            let k = x.width;
            let mut y = vec![0f32; x.rows() * d];
            linear(&x.data, x.rows(), k, &[lin], &mut y, d, false, None);
            x.data = y;
            x.width = d;
        }
        let mut h = Vec::new();
        let mut q = Vec::new();
        let mut kv = Vec::new();
        let mut ctx = Vec::new();
        let mut u = Vec::new();
        for layer in layers {
            let mut next = xs.clone();
            for &m in &present {
                let l = &layer[m];
                let (nq, nkv, nmlp) = (take_norm(&mut s)?, take_norm(&mut s)?, take_norm(&mut s)?);
                let [wq, wk, wv, wo] = [
                    take_linear(l.attn[0], &mut s)?,
                    take_linear(l.attn[1], &mut s)?,
                    take_linear(l.attn[2], &mut s)?,
                    take_linear(l.attn[3], &mut s)?,
                ];
                let (fc1, fc2) = (take_linear(l.fc1, &mut s)?, take_linear(l.fc2, &mut s)?);
                let x = xs[m].as_ref()?;
                let y = next[m].as_mut()?;
                let rows = x.rows();
                let others: Vec<&Packed> = present
                    .iter()
                    .filter(|&&n| n != m)
                    .filter_map(|&n| xs[n].as_ref())
                    .collect();
                if !others.is_empty() {
                    // y = x + o(attend(q(norm_q(x)), kv(norm_kv(others))))
                    // One other modality is its own context; several are joined.
                    let joined;
                    let c = match others[..] {
                        [one] => one,
                        _ => {
                            joined = Packed::interleave(&others);
                            &joined
                        }
                    };
                    let crows = c.rows();
                    h.resize(rows * d, 0.0);
                    layer_norm(&x.data, d, nq, l.norm_q.eps, &mut h);
                    q.resize(rows * d, 0.0);
                    linear(&h, rows, d, &[wq], &mut q, d, false, None);
                    h.resize(crows.max(rows) * d, 0.0);
                    layer_norm(&c.data, d, nkv, l.norm_kv.eps, &mut h[..crows * d]);
                    kv.resize(crows * 2 * d, 0.0);
                    linear(&h, crows, d, &[wk, wv], &mut kv, 2 * d, false, None);
                    ctx.resize(rows * d, 0.0);
                    packed_attention(
                        (&q, d),
                        (&kv, 0, d, 2 * d),
                        &x.offsets,
                        &c.offsets,
                        (l.heads, d / l.heads),
                        l.scale,
                        &mut ctx,
                    );
                    let keyless = |i: usize| c.offsets[i + 1] == c.offsets[i];
                    if (0..x.items()).any(keyless) {
                        // An item whose other modalities have no real token gets no
                        // attention output (not even out_proj's bias).
                        h.resize(rows * d, 0.0);
                        linear(&ctx, rows, d, &[wo], &mut h, d, false, None);
                        for i in (0..x.items()).filter(|&i| !keyless(i)) {
                            let r = x.offsets[i] * d..x.offsets[i + 1] * d;
                            for (y, a) in y.data[r.clone()].iter_mut().zip(&h[r]) {
                                *y += a;
                            }
                        }
                    } else {
                        linear(&ctx, rows, d, &[wo], &mut y.data, d, true, None);
                    }
                }
                // y += fc2(gelu(fc1(norm_mlp(y))))
                let hidden = fc1.w.len() / d;
                h.resize(rows * d, 0.0);
                layer_norm(&y.data, d, nmlp, l.norm_mlp.eps, &mut h[..rows * d]);
                u.resize(rows * hidden, 0.0);
                linear(
                    &h,
                    rows,
                    d,
                    &[fc1],
                    &mut u,
                    hidden,
                    false,
                    Some(Activation::Gelu),
                );
                linear(&u, rows, hidden, &[fc2], &mut y.data, d, true, None);
            }
            xs = next;
        }
        let fin = take_norm(&mut s)?;
        let pools = xs
            .iter()
            .map(|x| {
                x.as_ref().map(|x| {
                    let mut out = Packed {
                        data: vec![0f32; x.data.len()],
                        width: d,
                        offsets: x.offsets.clone(),
                    };
                    layer_norm(&x.data, d, fin, norm.eps, &mut out.data);
                    out.mean_rows()
                })
            })
            .collect();
        Some(pools)
    };
    with_slices(&ts, run)
        .flatten()
        .map(Some)
        .ok_or_else(|| MlmfError::Internal("middle fusion: packed weights".into()))
}

/// The `early` stack on packed rows: each present modality's real tokens projected
/// by `proj[m]` plus row `m` of `type_embedding` `[M, D]`, joined per item, run
/// through the pre-norm `layers`, normalised by `norm` and averaged per item.
/// Returns the fused `[B * D]`, or `None` when something lives elsewhere.
pub(crate) fn early_stack(
    inputs: &[Option<(&Tensor, Option<&Tensor>)>],
    proj: &[Linear],
    type_embedding: &Tensor,
    layers: &[EncoderLayer],
    norm: &LayerNorm,
) -> Result<Option<Vec<f32>>> {
    if !layers.iter().all(|l| l.pre_norm) {
        return Ok(None);
    }
    let mut parts: Vec<(usize, Packed)> = Vec::new();
    for (m, x) in inputs.iter().enumerate() {
        if let Some((t, mask)) = x {
            match Packed::gather(t, *mask)? {
                Some(p) => parts.push((m, p)),
                None => return Ok(None),
            }
        }
    }
    let mut ts: Vec<&Tensor> = vec![type_embedding];
    for (m, _) in &parts {
        if push_linear(&proj[*m], &mut ts).is_none() {
            return Ok(None);
        }
    }
    for l in layers {
        let a = &l.attn;
        for lin in [&a.q, &a.k, &a.v, &a.o, &l.fc1, &l.fc2] {
            if !lin.runs_here() {
                return Ok(None);
            }
        }
        ts.extend(l.tensors().into_iter().flatten());
    }
    push_norm(norm, &mut ts);
    if !ts.iter().all(|t| is_plain_f32(t)) {
        return Ok(None);
    }
    let d = norm.weight.elem_count();
    let run = |s: &[&[f32]]| -> Option<Vec<f32>> {
        let (types, mut rest) = (s[0], s[1..].iter().copied());
        let mut projected = Vec::with_capacity(parts.len());
        for (m, x) in &parts {
            let lin = take_linear(&proj[*m], &mut rest)?;
            let mut y = vec![0f32; x.rows() * d];
            linear(&x.data, x.rows(), x.width, &[lin], &mut y, d, false, None);
            let t = types.get(m * d..(m + 1) * d)?;
            for r in y.chunks_exact_mut(d) {
                for (v, t) in r.iter_mut().zip(t) {
                    *v += t;
                }
            }
            projected.push(Packed {
                data: y,
                width: d,
                offsets: x.offsets.clone(),
            });
        }
        let mut x = Packed::interleave(&projected.iter().collect::<Vec<_>>());
        let n = x.rows();
        let mut h = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * 3 * d];
        let mut ctx = vec![0f32; n * d];
        let mut u = Vec::new();
        for l in layers {
            // The layer's slots as `EncoderLayer::tensors` lists them (an absent bias
            // is `None` there and took no slice).
            let slots = l
                .tensors()
                .iter()
                .map(|t| match t {
                    Some(_) => rest.next().map(|s| Some(WeightRef::F32(s))),
                    None => Some(None),
                })
                .collect::<Option<Vec<_>>>()?;
            let w = view(l, &slots)?;
            let inter = w.fc1.w.len() / d;
            layer_norm(&x.data, d, w.norm1, l.norm1.eps, &mut h);
            linear(&h, n, d, &[w.q, w.k, w.v], &mut qkv, 3 * d, false, None);
            let heads = l.attn.heads;
            packed_attention(
                (&qkv, 3 * d),
                (&qkv, d, 2 * d, 3 * d),
                &x.offsets,
                &x.offsets,
                (heads, d / heads),
                l.attn.scale as f32,
                &mut ctx,
            );
            linear(&ctx, n, d, &[w.o], &mut x.data, d, true, None);
            layer_norm(&x.data, d, w.norm2, l.norm2.eps, &mut h);
            u.resize(n * inter, 0.0);
            linear(&h, n, d, &[w.fc1], &mut u, inter, false, Some(l.act));
            linear(&u, n, inter, &[w.fc2], &mut x.data, d, true, None);
        }
        let fin = take_norm(&mut rest)?;
        layer_norm(&x.data, d, fin, norm.eps, &mut h);
        x.data = h;
        Some(x.mean_rows())
    };
    with_slices(&ts, run)
        .flatten()
        .map(Some)
        .ok_or_else(|| MlmfError::Internal("early fusion: packed weights".into()))
}
