//! The float32 CPU path of the encoder stack.
//!
//! On the CPU in float32 a stack of [`EncoderLayer`]s runs here instead of as a chain
//! of candle ops, on the kernels of [`crate::kernels`]. The arithmetic is the same;
//! what changes is how much memory it touches and how the two threads are used: the
//! query, key and value projections write side by side into one `[M, 3D]` buffer,
//! attention reads its heads from there and writes its result where the output
//! projection reads it, residuals accumulate into the hidden state, and buffers are
//! allocated once per stack, not per op, and kept for the next stack run.
//!
//! Layers that are not a plain [`EncoderLayer`] have their own stacks on the same
//! kernels: Qwen3's decoder layers ([`decoder`]), HTSAT's shifted-window blocks
//! ([`window`]), wav2vec 2.0's per-channel norm ([`channel_norm`]), and the packed
//! token-level fusion stacks ([`packed`]).

use candle_core::Tensor;
use rayon::prelude::*;

use crate::encoders::layers::LinearWeight;
use crate::encoders::layers::{ce, AttnBias, EncoderLayer, LayerNorm, Linear};
use crate::error::{MlmfError, Result};
use crate::kernels::{
    attention, is_plain_f32, is_plain_weight, layer_norm, linear, slice, tanh, weight_data,
    with_slices, Activation, Bias, Lin, WeightRef,
};

pub(crate) mod channel_norm;
pub(crate) mod decoder;
pub(crate) mod packed;
pub(crate) mod window;

impl Linear {
    /// The dense weight (`None` for int8) and the bias.
    fn tensors(&self) -> [Option<&Tensor>; 2] {
        [self.dense(), self.bias.as_ref()]
    }

    /// The weight when it is not a tensor (panels, int8).
    pub(crate) fn owned(&self) -> Option<WeightRef<'_>> {
        match &self.weight {
            LinearWeight::Panels(p) => Some(WeightRef::Panel(p)),
            LinearWeight::Int8(m) => Some(WeightRef::Int8(m)),
            LinearWeight::Dense(_) => None,
        }
    }

    /// Whether this map runs here: `W^T` stored as panels, int8, or a float32 or
    /// 16-bit CPU tensor, and a float32 CPU bias.
    fn runs_here(&self) -> bool {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => self.transposed && is_plain_weight(w),
            LinearWeight::Panels(_) | LinearWeight::Int8(_) => true,
        };
        weight && self.bias.as_ref().is_none_or(is_plain_f32)
    }

    /// The map's weight and bias from the slots [`with_slices`] gave for
    /// [`Linear::tensors`] (panels and int8 have no slot).
    fn lin<'g>(&'g self, w: Option<WeightRef<'g>>, b: Option<WeightRef<'g>>) -> Option<Lin<'g>> {
        let w = match self.owned() {
            Some(w) => w,
            None => w?,
        };
        let b = match (&self.bias, b) {
            (None, _) => None,
            (Some(_), b) => Some(b?.f32()?),
        };
        Some(Lin { w, b })
    }

    /// The map as kernel operands, borrowed from `guards` (from [`Linear::guards`]).
    fn lin_from<'g, G: std::ops::Deref<Target = candle_core::Storage>>(
        &'g self,
        guards: &'g LinGuards<'g, G>,
    ) -> Option<Lin<'g>> {
        let w = guards.0.as_ref().and_then(|(s, l)| weight_data(s, l));
        let b = guards.1.as_ref().and_then(|(s, l)| weight_data(s, l));
        self.lin(w, b)
    }

    /// Read guards on the weight and bias storage.
    fn guards(&self) -> LinGuards<'_, impl std::ops::Deref<Target = candle_core::Storage> + '_> {
        (
            self.dense().map(|t| t.storage_and_layout()),
            self.bias.as_ref().map(|t| t.storage_and_layout()),
        )
    }
}

/// Read guards on a linear map's dense weight and bias.
type LinGuards<'a, G> = (
    Option<(G, &'a candle_core::Layout)>,
    Option<(G, &'a candle_core::Layout)>,
);

impl LayerNorm {
    fn tensors(&self) -> [Option<&Tensor>; 2] {
        [Some(&self.weight), Some(&self.bias)]
    }
}

impl EncoderLayer {
    /// Every weight of the layer in a fixed order: q, k, v, o (weight, bias), norm1,
    /// norm2, fc1, fc2.
    fn tensors(&self) -> [Option<&Tensor>; 16] {
        let a = &self.attn;
        let [qw, qb] = a.q.tensors();
        let [kw, kb] = a.k.tensors();
        let [vw, vb] = a.v.tensors();
        let [ow, ob] = a.o.tensors();
        let [n1w, n1b] = self.norm1.tensors();
        let [n2w, n2b] = self.norm2.tensors();
        let [f1w, f1b] = self.fc1.tensors();
        let [f2w, f2b] = self.fc2.tensors();
        [
            qw, qb, kw, kb, vw, vb, ow, ob, n1w, n1b, n2w, n2b, f1w, f1b, f2w, f2b,
        ]
    }
}

/// One layer's weights as slices.
struct LayerView<'a> {
    q: Lin<'a>,
    k: Lin<'a>,
    v: Lin<'a>,
    o: Lin<'a>,
    norm1: (&'a [f32], &'a [f32]),
    norm2: (&'a [f32], &'a [f32]),
    fc1: Lin<'a>,
    fc2: Lin<'a>,
}

fn view<'g>(layer: &'g EncoderLayer, s: &[Option<WeightRef<'g>>]) -> Option<LayerView<'g>> {
    let a = &layer.attn;
    let f = |i: usize| s[i]?.f32();
    Some(LayerView {
        q: a.q.lin(s[0], s[1])?,
        k: a.k.lin(s[2], s[3])?,
        v: a.v.lin(s[4], s[5])?,
        o: a.o.lin(s[6], s[7])?,
        norm1: (f(8)?, f(9)?),
        norm2: (f(10)?, f(11)?),
        fc1: layer.fc1.lin(s[12], s[13])?,
        fc2: layer.fc2.lin(s[14], s[15])?,
    })
}

// ---------------------------------------------------------------------------------
// The stack.

/// Runs `layers` on `x` `[B, T, D]` when it and every weight are float32 CPU tensors;
/// `None` when the model lives elsewhere (the candle path runs then).
pub(crate) fn run_layers(
    layers: &[EncoderLayer],
    x: &Tensor,
    bias: &AttnBias,
) -> Result<Option<Tensor>> {
    if layers.is_empty()
        || !is_plain_f32(x)
        || !layers.iter().all(|l| {
            let a = &l.attn;
            [&a.q, &a.k, &a.v, &a.o, &l.fc1, &l.fc2]
                .iter()
                .all(|lin| lin.runs_here())
                && [&l.norm1, &l.norm2]
                    .iter()
                    .flat_map(|n| n.tensors())
                    .flatten()
                    .all(is_plain_f32)
        })
    {
        return Ok(None);
    }
    let f = ce("encoder layers");
    let (b, t, d) = x.dims3().map_err(&f)?;
    let m = b * t;
    let inter = layers[0].fc1.out_dim()?;
    let bias = Bias::from_tensor(bias, b, layers[0].attn.heads, t)?;
    let mut x: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let [mut h, mut qkv, mut ctx, mut u] = stack_buffers([m * d, m * 3 * d, m * d, m * inter]);
    for layer in layers {
        with_slices(&layer.tensors(), |slices| -> Result<()> {
            let w = view(layer, slices)
                .ok_or_else(|| MlmfError::Internal("encoder layer weights".into()))?;
            let li = layer.fc1.out_dim()?;
            if li != inter {
                u.resize(m * li, 0.0);
            }
            let heads = layer.attn.heads;
            let scale = layer.attn.scale as f32;
            let (eps1, eps2) = (layer.norm1.eps, layer.norm2.eps);
            let qkv_parts = [w.q, w.k, w.v];
            let bf16 = crate::kernels::attention::bf16_products(w.q.w);
            if layer.pre_norm {
                // x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))
                layer_norm(&x, d, w.norm1, eps1, &mut h);
                linear(&h, m, d, &qkv_parts, &mut qkv, 3 * d, false, None);
                attention(&qkv, b, t, d, heads, scale, bias.as_ref(), &mut ctx, bf16);
                linear(&ctx, m, d, &[w.o], &mut x, d, true, None);
                layer_norm(&x, d, w.norm2, eps2, &mut h);
                linear(&h, m, d, &[w.fc1], &mut u, li, false, Some(layer.act));
                linear(&u, m, li, &[w.fc2], &mut x, d, true, None);
            } else {
                // x = ln1(x + attn(x)); x = ln2(x + fc2(act(fc1(x))))
                linear(&x, m, d, &qkv_parts, &mut qkv, 3 * d, false, None);
                attention(&qkv, b, t, d, heads, scale, bias.as_ref(), &mut ctx, bf16);
                h.copy_from_slice(&x);
                linear(&ctx, m, d, &[w.o], &mut h, d, true, None);
                layer_norm(&h, d, w.norm1, eps1, &mut x);
                linear(&x, m, d, &[w.fc1], &mut u, li, false, Some(layer.act));
                h.copy_from_slice(&x);
                linear(&u, m, li, &[w.fc2], &mut h, d, true, None);
                layer_norm(&h, d, w.norm2, eps2, &mut x);
            }
            Ok(())
        })?;
    }
    keep_stack_buffers([h, qkv, ctx, u]);
    Tensor::from_vec(x, (b, t, d), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// The work buffers of the last layer stack run, kept for the next (process-wide:
/// calls from Python may run each on a thread of its own).
static STACK: std::sync::Mutex<Option<[Vec<f32>; 4]>> = std::sync::Mutex::new(None);

/// A layer stack's four work buffers (`h`, `qkv`, `ctx`, the MLP's `u`) of `lens`,
/// reused from the previous stack run (the stack puts them back when it is done, up
/// to [`KEEP_BYTES`]; a stack running beside another gets fresh ones). Long inputs need tens of MB (VideoMAE-base: 1568 tokens, 45 MB);
/// fresh allocations that large come from the OS page by page on every call, and the
/// kernel's zeroing of those pages took about 3% of a VideoMAE-base call. Every kernel
/// writes all of a buffer before reading it, so the previous call's values do no harm.
fn stack_buffers(lens: [usize; 4]) -> [Vec<f32>; 4] {
    let mut bufs = STACK
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_else(|| std::array::from_fn(|_| Vec::new()));
    for (buf, n) in bufs.iter_mut().zip(lens) {
        // Shrinking keeps the allocation; growing zero-fills only the new part.
        buf.resize(n, 0.0);
    }
    bufs
}

/// The most buffer memory kept between stack runs (a larger batch frees its buffers
/// as before).
const KEEP_BYTES: usize = 256 << 20;

/// Puts a stack's buffers back for the next run, unless they are large.
fn keep_stack_buffers(bufs: [Vec<f32>; 4]) {
    let bytes: usize = bufs.iter().map(|b| b.capacity() * 4).sum();
    if bytes <= KEEP_BYTES {
        if let Ok(mut s) = STACK.lock() {
            *s = Some(bufs);
        }
    }
}

/// LayerNorm of a float32 CPU `x` `[.., D]` over its last dimension (rows in parallel);
/// `None` when something lives elsewhere.
pub(crate) fn layer_norm_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x) || !is_plain_f32(w) || !is_plain_f32(b) {
        return Ok(None);
    }
    let Some(&d) = x.dims().last() else {
        return Ok(None);
    };
    let mut out = vec![0f32; x.elem_count()];
    {
        let (xg, wg, bg) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            b.storage_and_layout(),
        );
        let (Some(xs), Some(ws), Some(bs)) =
            (slice(&xg.0, xg.1), slice(&wg.0, wg.1), slice(&bg.0, bg.1))
        else {
            return Ok(None);
        };
        if ws.len() != d || bs.len() != d {
            return Ok(None);
        }
        layer_norm(xs, d, (ws, bs), eps, &mut out);
    }
    Tensor::from_vec(out, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("layer norm"))
}

/// `x + fc2(act(fc1(layer_norm(x))))` for float32 CPU tensors (`x` `[.., D]`, the
/// LayerNorm's `(weight, bias, eps)`), with the bias, activation and residual fused into
/// the matrix products; `None` when something lives elsewhere.
pub(crate) fn mlp_residual(
    x: &Tensor,
    (nw, nb, eps): (&Tensor, &Tensor, f32),
    fc1: &Linear,
    fc2: &Linear,
    act: Activation,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x)
        || !is_plain_f32(nw)
        || !is_plain_f32(nb)
        || !fc1.runs_here()
        || !fc2.runs_here()
    {
        return Ok(None);
    }
    let f = ce("mlp");
    let Some(&d) = x.dims().last() else {
        return Ok(None);
    };
    let m = x.elem_count() / d.max(1);
    let hidden = fc1.out_dim()?;
    let mut y: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&f)?;
    let mut h = vec![0f32; m * d];
    let mut u = vec![0f32; m * hidden];
    {
        let tensors = [nw, nb];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let (Some(w), Some(b)) = (
            slice(&guards[0].0, guards[0].1),
            slice(&guards[1].0, guards[1].1),
        ) else {
            return Ok(None);
        };
        layer_norm(&y, d, (w, b), eps, &mut h);
        let lins = [fc1, fc2];
        let lg: Vec<_> = lins.iter().map(|l| l.guards()).collect();
        let mut parts = Vec::with_capacity(2);
        for (l, g) in lins.iter().zip(&lg) {
            let Some(p) = l.lin_from(g) else {
                return Ok(None);
            };
            parts.push(p);
        }
        linear(&h, m, d, &parts[..1], &mut u, hidden, false, Some(act));
        linear(&u, m, hidden, &parts[1..], &mut y, d, true, None);
    }
    Tensor::from_vec(y, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// `x W^T + b` for a float32 CPU `x` `[.., K]` and linear map; `None` elsewhere.
pub(crate) fn linear_forward(lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
    let Some((out, n)) = project(x, &[lin])? else {
        return Ok(None);
    };
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("linear"))
}

/// Multi-head self-attention of float32 CPU `x` `[B, T, D]` through `q`, `k`, `v`
/// (one product into a side-by-side buffer) with an additive `bias`, before the
/// output projection: `[B, T, D]`. `None` when `x` or a map
/// lives elsewhere (the caller runs the candle ops then). Used by layers that are not
/// a plain [`EncoderLayer`] (windowed attention).
pub(crate) fn self_attention(
    x: &Tensor,
    (q, k, v): (&Linear, &Linear, &Linear),
    heads: usize,
    scale: f64,
    bias: Option<&Bias>,
) -> Result<Option<Tensor>> {
    let Ok((b, t, d)) = x.dims3() else {
        return Ok(None);
    };
    let Some((qkv, n)) = project(x, &[q, k, v])? else {
        return Ok(None);
    };
    if n != 3 * d || heads == 0 || !d.is_multiple_of(heads) {
        return Ok(None);
    }
    let mut ctx = vec![0f32; b * t * d];
    let bf16 = matches!(&q.weight, LinearWeight::Panels(p) if p.bf16_products());
    attention(&qkv, b, t, d, heads, scale as f32, bias, &mut ctx, bf16);
    Tensor::from_vec(ctx, (b, t, d), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("attention"))
}

/// `x W_i^T + b_i` of a float32 CPU `x` `[.., K]` for several maps at once, side by
/// side in one `[rows, sum of widths]` buffer (one pass of tasks for all of them);
/// returns the buffer and its width, or `None` when `x` or a map lives elsewhere.
pub(crate) fn project(x: &Tensor, lins: &[&Linear]) -> Result<Option<(Vec<f32>, usize)>> {
    if !is_plain_f32(x) || !lins.iter().all(|l| l.runs_here()) {
        return Ok(None);
    }
    let Some(&k) = x.dims().last() else {
        return Ok(None);
    };
    let m = x.elem_count() / k.max(1);
    let n: usize = lins.iter().map(|l| l.out_dim()).sum::<Result<usize>>()?;
    let guards: Vec<_> = lins.iter().map(|l| l.guards()).collect();
    let mut parts = Vec::with_capacity(lins.len());
    for (l, g) in lins.iter().zip(&guards) {
        let Some(p) = l.lin_from(g) else {
            return Ok(None);
        };
        parts.push(p);
    }
    let xg = x.storage_and_layout();
    let Some(xs) = slice(&xg.0, xg.1) else {
        return Ok(None);
    };
    let mut out = vec![0f32; m * n];
    linear(xs, m, k, &parts, &mut out, n, false, None);
    Ok(Some((out, n)))
}

/// How the bias enters [`stacked_linear`].
pub(crate) enum StackBias<'a> {
    None,
    /// `[N]`, added once to every row.
    Shared(&'a Tensor),
    /// `[M, N]`: modality `m`'s bias, scaled like its product.
    PerModality(&'a Tensor),
}

/// `y[b] = sum_m s[b, m] (x_m[b] W_m^T) + bias` as one matrix product: the inputs,
/// each row scaled by `s[b, m]`, side by side (a missing modality's slot is zero) times
/// `lin`, the modalities' `W_m^T` stacked along the input dimension (`[sum D_m, N]`,
/// no bias of its own). `scale` is `[B, M]` row-major (1 everywhere when `None`); a
/// missing modality contributes nothing, its bias included.
/// Returns `[B, N]`; `None` when an input or the map is not a float32 CPU tensor.
pub(crate) fn stacked_linear(
    lin: &Linear,
    x: &[Option<&Tensor>],
    widths: &[usize],
    batch: usize,
    scale: Option<&[f32]>,
    bias: StackBias<'_>,
) -> Result<Option<Tensor>> {
    let bias_t = match bias {
        StackBias::None => None,
        StackBias::Shared(t) | StackBias::PerModality(t) => Some(t),
    };
    if !lin.runs_here()
        || !x.iter().flatten().all(|t| is_plain_f32(t))
        || bias_t.is_some_and(|t| !is_plain_f32(t))
    {
        return Ok(None);
    }
    let k: usize = widths.iter().sum();
    let n = lin.out_dim()?;
    let mods = widths.len();
    if x.len() != mods || scale.is_some_and(|s| s.len() != batch * mods) {
        return Err(MlmfError::Internal("stacked linear: shapes".into()));
    }
    let s = |b: usize, m: usize| scale.map_or(1.0, |s| s[b * mods + m]);
    // The scaled inputs side by side.
    let mut z = vec![0f32; batch * k];
    let mut off = 0;
    for (m, (xm, &d)) in x.iter().zip(widths).enumerate() {
        if let Some(t) = xm {
            let g = t.storage_and_layout();
            let xs = slice(&g.0, g.1)
                .filter(|v| v.len() == batch * d)
                .ok_or_else(|| MlmfError::Internal("stacked linear: input".into()))?;
            for (b, (zr, xr)) in z.chunks_exact_mut(k).zip(xs.chunks_exact(d)).enumerate() {
                let f = s(b, m);
                for (zv, xv) in zr[off..off + d].iter_mut().zip(xr) {
                    *zv = f * xv;
                }
            }
        }
        off += d;
    }
    // The bias term first, then the product accumulates onto it.
    let mut y = vec![0f32; batch * n];
    if let Some(t) = bias_t {
        let g = t.storage_and_layout();
        let bv = slice(&g.0, g.1).ok_or_else(|| MlmfError::Internal("stacked bias".into()))?;
        for (b, row) in y.chunks_exact_mut(n).enumerate() {
            match bias {
                StackBias::PerModality(_) => {
                    for (m, bm) in bv.chunks_exact(n).enumerate() {
                        let f = s(b, m);
                        if x[m].is_some() && f != 0.0 {
                            row.iter_mut().zip(bm).for_each(|(r, v)| *r += f * v);
                        }
                    }
                }
                _ => row.copy_from_slice(&bv[..n]),
            }
        }
    }
    {
        let g = lin.guards();
        let w = lin
            .lin_from(&g)
            .ok_or_else(|| MlmfError::Internal("stacked weight".into()))?;
        let w = Lin { w: w.w, b: None };
        linear(&z, batch, k, &[w], &mut y, n, true, None);
    }
    Tensor::from_vec(y, (batch, n), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(ce("stacked linear"))
}

/// `f` applied in place to chunks of a copy of a float32 CPU tensor, in parallel;
/// `None` elsewhere.
fn elementwise(
    x: &Tensor,
    what: &'static str,
    f: impl Fn(&mut [f32]) + Send + Sync,
) -> Result<Option<Tensor>> {
    if !is_plain_f32(x) {
        return Ok(None);
    }
    let err = ce(what);
    let mut v: Vec<f32> = x.flatten_all().and_then(|x| x.to_vec1()).map_err(&err)?;
    v.par_chunks_mut(16384).for_each(f);
    Tensor::from_vec(v, x.dims(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(err)
}

/// `tanh(x)` for a float32 CPU tensor (to about 1e-7); `None` elsewhere.
pub(crate) fn tanh_forward(x: &Tensor) -> Result<Option<Tensor>> {
    elementwise(x, "tanh", |c| c.iter_mut().for_each(|v| *v = tanh(*v)))
}

/// `act(x)` for a float32 CPU tensor; `None` elsewhere.
pub(crate) fn activation_forward(act: Activation, x: &Tensor) -> Result<Option<Tensor>> {
    elementwise(x, "activation", |c| act.apply_slice(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// A layer of seeded pseudo-random weights (`d` wide, `inter` hidden units).
    fn random_layer(
        seed: u64,
        d: usize,
        heads: usize,
        inter: usize,
        pre_norm: bool,
    ) -> EncoderLayer {
        use crate::encoders::layers::SelfAttention;
        use candle_core::Device;
        let mut state = seed;
        let mut next = |n: usize, scale: f32| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect();
            v
        };
        let mut t = |shape: &[usize], scale: f32| {
            Tensor::from_vec(next(shape.iter().product(), scale), shape, &Device::Cpu).unwrap()
        };
        let mut lin = |o: usize, i: usize| {
            let w = t(&[o, i], 2.0 / (i as f32).sqrt());
            Linear::from_parts(w, Some(t(&[o], 0.2))).unwrap()
        };
        let attn = SelfAttention::from_parts(lin(d, d), lin(d, d), lin(d, d), lin(d, d), d, heads);
        let (fc1, fc2) = (lin(inter, d), lin(d, inter));
        let mut norm = || LayerNorm {
            weight: (t(&[d], 0.5) + 1.0).unwrap(),
            bias: t(&[d], 0.2),
            eps: 1e-5,
        };
        let (norm1, norm2) = (norm(), norm());
        EncoderLayer {
            attn,
            norm1,
            norm2,
            fc1,
            fc2,
            act: Activation::Gelu,
            pre_norm,
        }
    }

    #[test]
    fn fast_path_equals_the_candle_ops() {
        use candle_core::Device;
        // T = 150 > 128 exercises query blocks; a per-head bias and a padding bias.
        let (b, t, d, heads, inter) = (2, 150, 48, 4, 70);
        for pre_norm in [true, false] {
            let layers: Vec<EncoderLayer> = (0..2)
                .map(|i| random_layer(7 + i, d, heads, inter, pre_norm))
                .collect();
            let x = Tensor::from_vec(
                (0..b * t * d)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                    .collect::<Vec<_>>(),
                (b, t, d),
                &Device::Cpu,
            )
            .unwrap();
            let mut mask = vec![1u8; b * t];
            mask[t + 100..].iter_mut().for_each(|m| *m = 0);
            let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
            let per_head = Tensor::from_vec(
                (0..heads * t * t)
                    .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
                    .collect::<Vec<_>>(),
                (1, heads, t, t),
                &Device::Cpu,
            )
            .unwrap();
            let bias = crate::encoders::layers::padding_bias(&mask)
                .unwrap()
                .broadcast_add(&per_head)
                .unwrap();
            let bias = Some(bias);
            let fast = run_layers(&layers, &x, &bias)
                .unwrap()
                .expect("float32 CPU path");
            let slow = layers
                .iter()
                .try_fold(x.clone(), |x, l| l.forward(&x, &bias))
                .unwrap();
            let diff = crate::encoders::layers::max_abs_diff(&fast, &slow);
            assert!(diff < 2e-5, "pre_norm={pre_norm}: max difference {diff}");
        }
    }

    /// `layer` with every linear map's weight in another format.
    fn converted(layer: &EncoderLayer, to: impl Fn(&Linear) -> Linear) -> EncoderLayer {
        let mut l = layer.clone();
        for lin in [
            &mut l.attn.q,
            &mut l.attn.k,
            &mut l.attn.v,
            &mut l.attn.o,
            &mut l.fc1,
            &mut l.fc2,
        ] {
            *lin = to(lin);
        }
        l
    }

    #[test]
    fn sixteen_bit_and_int8_weights_run_the_fused_stack() {
        use crate::kernels::int8::Int8Matrix;
        use candle_core::Device;
        // 64-wide maps (whole 16-column panels) at 5 rows take the small-product tile,
        // at 300 rows the widened blocks and the general kernel.
        let (d, heads, inter) = (64, 4, 96);
        let layer = random_layer(11, d, heads, inter, true);
        // W^T as float32 `[k, n]`.
        let wt = |l: &Linear| -> (Vec<f32>, usize, usize) {
            let w = l.weight_out_in().unwrap();
            let (n, k) = w.dims2().unwrap();
            let data = w.t().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            (data, k, n)
        };
        // 16-bit W^T held contiguous (maps whose width is not a multiple of 16) ...
        let sixteen = |dt: DType| {
            converted(&layer, |l| {
                let (data, k, n) = wt(l);
                let t = Tensor::from_vec(data, (k, n), &Device::Cpu).unwrap();
                Linear {
                    weight: LinearWeight::Dense(t.to_dtype(dt).unwrap()),
                    bias: l.bias.clone(),
                    transposed: true,
                }
            })
        };
        // ... and as panels.
        let panels = |dt: DType| {
            converted(&layer, |l| {
                use crate::kernels::panel::Panels;
                let (data, k, n) = wt(l);
                let p = Panels::from_wt(&data, k, n, dt);
                Linear {
                    weight: LinearWeight::Panels(std::sync::Arc::new(p)),
                    bias: l.bias.clone(),
                    transposed: true,
                }
            })
        };
        assert!(matches!(layer.fc1.weight, LinearWeight::Panels(_)));
        let int8 = converted(&layer, |l| {
            let (data, k, n) = wt(l);
            Linear {
                weight: LinearWeight::Int8(std::sync::Arc::new(Int8Matrix::quantize(&data, k, n))),
                bias: l.bias.clone(),
                transposed: true,
            }
        });
        for rows in [5, 300] {
            let x = Tensor::from_vec(
                (0..rows * d)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                    .collect::<Vec<_>>(),
                (1, rows, d),
                &Device::Cpu,
            )
            .unwrap();
            let want = run_layers(std::slice::from_ref(&layer), &x, &None)
                .unwrap()
                .unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            for (name, l, tol) in [
                ("bf16", sixteen(DType::BF16), 2e-2),
                ("f16", sixteen(DType::F16), 5e-3),
                ("bf16 panels", panels(DType::BF16), 2e-2),
                ("f16 panels", panels(DType::F16), 5e-3),
                ("int8", int8.clone(), 5e-2),
            ] {
                let got = run_layers(std::slice::from_ref(&l), &x, &None)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name} left the fused stack"));
                let diff = crate::encoders::layers::max_abs_diff(&got, &want);
                assert!(
                    diff < tol * scale,
                    "{name} at {rows} rows: {diff} (scale {scale})"
                );
                assert!(diff > 0.0, "{name}: the weights were not converted");
            }
        }
    }

    #[test]
    fn other_dtypes_are_left_to_candle() {
        let layer = random_layer(1, 8, 2, 8, true);
        let x = Tensor::zeros(
            (1, 3, 8),
            candle_core::DType::F16,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(run_layers(&[layer], &x, &None).unwrap().is_none());
    }
}
