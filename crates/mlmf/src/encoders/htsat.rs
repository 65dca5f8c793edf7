//! HTSAT, CLAP's audio tower (transformers' `ClapAudioEncoder`): a Swin transformer
//! over the log-mel spectrogram laid out as a square image.
//!
//! 1. Batch norm over mel bins (the stored running statistics), then the frames
//!    resampled to `spec_size * freq_ratio` by bicubic interpolation
//!    (`align_corners=True`, PyTorch's A = -0.75 kernel) when there are fewer, and the
//!    `[frames, mels]` spectrogram folded into a `spec_size x spec_size` image: row
//!    `k * mels + f`, column `t` holds frame `k * spec_size + t` of bin `f`
//!    (`freq_ratio = spec_size / num_mel_bins` time chunks stacked).
//! 2. Patch embedding: a `patch_size` convolution with stride `patch_stride` (no
//!    overlap), as one matrix product, then layer norm.
//! 3. Stages of Swin blocks (`depths`, `num_attention_heads`): window attention over
//!    `window_size`² tokens with a learned relative-position bias, every other block
//!    on windows shifted by half a window (a cyclic roll, with the −100 mask between
//!    regions that the roll brings together); a stage whose grid is no larger than a
//!    window runs one unshifted window. Between stages, patch merging: each 2x2
//!    neighbourhood concatenated (top-left, bottom-left, top-right, bottom-right),
//!    layer norm, a linear map to twice the width. The token gathers and scatters
//!    (roll, window partition and their inverse) are index lists built at load.
//! 4. A final layer norm. `pooled` is the mean over tokens (the reference's average
//!    pool); `hidden_states` lists the tokens as the reference's `last_hidden_state`
//!    does, frequency bin within a chunk first, then time along the whole clip.
//!
//! The fusion block of `enable_fusion` checkpoints runs only for clips the reference
//! marks `is_longer`; mlmf marks none (its long audio is chunked), so such checkpoints
//! run this same path on the first mel channel.

use candle_core::{DType, Device, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::cpu::window::{self, WindowBlock};
use crate::encoders::inputs::{full_mask, wrong_input};
use crate::encoders::layers::{
    attention, ce, merge_heads, split_heads, Activation, LayerNorm, Linear, Placement, Weights,
};
use crate::encoders::EncoderInput;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Added between tokens of different roll regions (the reference's value).
const SHIFT_MASK: f32 = -100.0;

/// One Swin block.
struct Block {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    /// `[windows, heads, T, T]`: relative-position bias plus the shift mask.
    bias: Tensor,
    /// The same, for the float32 CPU attention kernel.
    cpu_bias: crate::kernels::Bias,
    /// Token order of the rolled, window-partitioned grid, and its inverse.
    gather: Tensor,
    scatter: Tensor,
    /// The same orders for the float32 CPU path.
    gather_rows: Vec<u32>,
    scatter_rows: Vec<u32>,
    window: usize,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

/// Patch merging after a stage.
struct Merge {
    /// The four neighbours' token lists, in the reference's concatenation order.
    parts: [Tensor; 4],
    norm: LayerNorm,
    reduction: Linear,
}

struct Stage {
    blocks: Vec<Block>,
    merge: Option<Merge>,
}

/// A loaded HTSAT audio encoder (without CLAP's projection).
pub(crate) struct Htsat {
    spec_size: usize,
    n_mels: usize,
    freq_ratio: usize,
    patch: usize,
    /// `(weight, bias, running_mean, running_var)` per mel bin.
    batch_norm: [Vec<f32>; 4],
    projection: Linear,
    patch_norm: Option<LayerNorm>,
    stages: Vec<Stage>,
    norm: LayerNorm,
    /// The final tokens in the reference's `last_hidden_state` order.
    output_order: Tensor,
    pub(crate) width: usize,
    place: Placement,
}

fn index(v: Vec<u32>, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, device).map_err(ce("htsat indices"))
}

/// The relative-position index of a `w x w` window: `[T, T]`, `T = w²`.
fn relative_index(w: usize) -> Vec<usize> {
    let t = w * w;
    let mut out = Vec::with_capacity(t * t);
    for i in 0..t {
        for j in 0..t {
            let dy = (i / w) as isize - (j / w) as isize + w as isize - 1;
            let dx = (i % w) as isize - (j % w) as isize + w as isize - 1;
            out.push((dy * (2 * w as isize - 1) + dx) as usize);
        }
    }
    out
}

/// For a `res x res` grid in windows of `w`, rolled by `-shift`: the source token of
/// each position in window order, and each position's roll region label.
fn window_order(res: usize, w: usize, shift: usize) -> (Vec<u32>, Vec<usize>) {
    let per = res / w;
    let region = |i: usize| usize::from(i >= res - w) + usize::from(i >= res - shift);
    let mut src = Vec::with_capacity(res * res);
    let mut label = Vec::with_capacity(res * res);
    for wy in 0..per {
        for wx in 0..per {
            for iy in 0..w {
                for ix in 0..w {
                    let (y, x) = (wy * w + iy, wx * w + ix);
                    src.push((((y + shift) % res) * res + (x + shift) % res) as u32);
                    label.push(if shift > 0 {
                        region(y) * 3 + region(x)
                    } else {
                        0
                    });
                }
            }
        }
    }
    (src, label)
}

#[allow(clippy::too_many_arguments)]
fn load_block(
    w: Weights<'_>,
    p: &str,
    dim: usize,
    heads: usize,
    res: usize,
    cfg_window: usize,
    shift: usize,
    (mlp, eps, act): (usize, f64, Activation),
) -> Result<Block> {
    let n = |s: &str| format!("{p}{s}");
    let f = ce("htsat load");
    let window = cfg_window.min(res);
    if !res.is_multiple_of(window) || (res < cfg_window) {
        return Err(w.ckpt.error(format!(
            "a {res}x{res} patch grid does not fit windows of {cfg_window} (padded windows \
             are not supported)"
        )));
    }
    let t = window * window;
    let table = w
        .ckpt
        .tensor(
            &n("attention.self.relative_position_bias_table"),
            &[(2 * cfg_window - 1).pow(2), heads],
            DType::F32,
            &Device::Cpu,
        )?
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(&f)?;
    let rel = relative_index(window);
    let (src, label) = window_order(res, window, shift);
    let windows = (res / window).pow(2);
    let mut bias = Vec::with_capacity(windows * heads * t * t);
    for wi in 0..windows {
        let lab = &label[wi * t..(wi + 1) * t];
        for h in 0..heads {
            for i in 0..t {
                for j in 0..t {
                    let m = if lab[i] == lab[j] { 0.0 } else { SHIFT_MASK };
                    bias.push(table[rel[i * t + j] * heads + h] + m);
                }
            }
        }
    }
    let mut inverse = vec![0u32; src.len()];
    for (k, &s) in src.iter().enumerate() {
        inverse[s as usize] = k as u32;
    }
    let dev = &w.place.device;
    let lin = |s: &str, i: usize, o: usize| Linear::load(w, &n(s), i, o, true);
    Ok(Block {
        norm1: LayerNorm::load(w, &n("layernorm_before"), dim, eps)?,
        q: lin("attention.self.query", dim, dim)?,
        k: lin("attention.self.key", dim, dim)?,
        v: lin("attention.self.value", dim, dim)?,
        o: lin("attention.output.dense", dim, dim)?,
        heads,
        cpu_bias: crate::kernels::Bias::per_window(bias.clone(), windows, heads, t),
        bias: Tensor::from_vec(bias, (windows, heads, t, t), dev).map_err(&f)?,
        gather: index(src.clone(), dev)?,
        scatter: index(inverse.clone(), dev)?,
        gather_rows: src,
        scatter_rows: inverse,
        window,
        norm2: LayerNorm::load(w, &n("layernorm_after"), dim, eps)?,
        fc1: lin("intermediate.dense", dim, mlp)?,
        fc2: lin("output.dense", mlp, dim)?,
        act,
    })
}

impl Block {
    /// The block for the float32 CPU path ([`window::run_blocks`]).
    fn view(&self) -> WindowBlock<'_> {
        WindowBlock {
            norm1: &self.norm1,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            norm2: &self.norm2,
            fc1: &self.fc1,
            fc2: &self.fc2,
            act: self.act,
            heads: self.heads,
            window_tokens: self.window * self.window,
            gather: &self.gather_rows,
            scatter: &self.scatter_rows,
            bias: &self.cpu_bias,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("htsat block");
        let (b, l, c) = x.dims3().map_err(&f)?;
        let t = self.window * self.window;
        let windows = l / t;
        let h = self
            .norm1
            .forward(x)?
            .index_select(&self.gather, 1)
            .and_then(|h| h.reshape((b * windows, t, c)))
            .map_err(&f)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let lins = (&self.q, &self.k, &self.v);
        let fast = crate::encoders::cpu::self_attention(
            &h,
            lins,
            self.heads,
            scale,
            Some(&self.cpu_bias),
        )?;
        let ctx = match fast {
            Some(ctx) => ctx,
            None => {
                let bias = Some(if b == 1 {
                    self.bias.clone()
                } else {
                    self.bias.repeat((b, 1, 1, 1)).map_err(&f)?
                });
                let q = split_heads(&self.q.forward(&h)?, self.heads)?;
                let k = split_heads(&self.k.forward(&h)?, self.heads)?;
                let v = split_heads(&self.v.forward(&h)?, self.heads)?;
                merge_heads(&attention(&q, &k, &v, scale, &bias)?)?
            }
        };
        let out = self
            .o
            .forward(&ctx)?
            .reshape((b, l, c))
            .and_then(|o| o.index_select(&self.scatter, 1))
            .map_err(&f)?;
        let x = (x + out).map_err(&f)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?)?,
        )?;
        (x + m).map_err(f)
    }
}

impl Merge {
    fn load(w: Weights<'_>, p: &str, dim: usize, res: usize) -> Result<Self> {
        let half = res / 2;
        let part = |dr: usize, dc: usize| -> Result<Tensor> {
            let v: Vec<u32> = (0..half * half)
                .map(|i| (((i / half) * 2 + dr) * res + (i % half) * 2 + dc) as u32)
                .collect();
            index(v, &w.place.device)
        };
        if !res.is_multiple_of(2) {
            return Err(w
                .ckpt
                .error(format!("a {res}x{res} grid cannot be merged 2x2")));
        }
        Ok(Self {
            parts: [part(0, 0)?, part(1, 0)?, part(0, 1)?, part(1, 1)?],
            norm: LayerNorm::load(w, &format!("{p}norm"), 4 * dim, 1e-5)?,
            reduction: Linear::load(w, &format!("{p}reduction"), 4 * dim, 2 * dim, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("htsat merge");
        let parts = self
            .parts
            .iter()
            .map(|i| x.index_select(i, 1))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&f)?;
        let cat = Tensor::cat(&parts, 2).map_err(&f)?;
        self.reduction.forward(&self.norm.forward(&cat)?)
    }
}

/// Loads the audio encoder under `p` (`audio_model.audio_encoder.`) with `cfg` (the
/// checkpoint's `audio_config`).
pub(crate) fn load(cfg: Cfg<'_>, w: Weights<'_>, p: &str) -> Result<Htsat> {
    let f = ce("htsat load");
    let spec_size = cfg.size("spec_size", 256)?;
    let n_mels = cfg.size("num_mel_bins", 64)?;
    let window = cfg.size("window_size", 8)?;
    let patch = cfg.size("patch_size", 4)?;
    let stride = match cfg.sizes("patch_stride", &[patch, patch]) {
        Ok(s) => s,
        Err(_) => vec![cfg.size("patch_stride", patch)?; 2],
    };
    let embed = cfg.size("patch_embeds_hidden_size", 96)?;
    let depths = cfg.sizes("depths", &[2, 2, 6, 2])?;
    let heads = cfg.sizes("num_attention_heads", &[4, 8, 16, 32])?;
    let mlp_ratio = cfg.positive("mlp_ratio", 4.0)?;
    let eps = cfg.positive("layer_norm_eps", 1e-5)?;
    let act = Activation::parse(cfg.string("hidden_act", "gelu")?, &cfg.name("hidden_act"))?;
    let freq_ratio = spec_size / n_mels;
    if freq_ratio == 0 || spec_size / freq_ratio != n_mels || stride != [patch, patch] {
        return Err(MlmfError::config(
            cfg.name("spec_size"),
            format!(
                "mlmf runs HTSAT with spec_size a multiple of num_mel_bins ({spec_size} / \
                 {n_mels}) and non-overlapping patches (patch_stride = patch_size = {patch}, \
                 got {stride:?})"
            ),
        ));
    }
    if heads.len() != depths.len() {
        return Err(MlmfError::config(
            cfg.name("num_attention_heads"),
            format!("one entry per stage of depths {depths:?}, got {heads:?}"),
        ));
    }
    if cfg.string("fusion_type", "aff_2d").unwrap_or("aff_2d") == "channel_map"
        && cfg.boolean("enable_fusion", false)?
    {
        return Err(MlmfError::config(
            cfg.name("fusion_type"),
            "\"channel_map\" fusion is not supported (its patch embedding reads 4 channels)",
        ));
    }
    let grid = spec_size / patch;
    let place = w.place;
    let n = |s: &str| format!("{p}{s}");
    let bn = |s: &str| -> Result<Vec<f32>> {
        w.ckpt
            .tensor(
                &n(&format!("batch_norm.{s}")),
                &[n_mels],
                DType::F32,
                &Device::Cpu,
            )?
            .to_vec1::<f32>()
            .map_err(ce("htsat load"))
    };
    let batch_norm = [
        bn("weight")?,
        bn("bias")?,
        bn("running_mean")?,
        bn("running_var")?,
    ];
    let projection = Linear::from_parts(
        w.get(&n("patch_embed.proj.weight"), &[embed, 1, patch, patch])?
            .reshape((embed, patch * patch))
            .map_err(&f)?,
        Some(w.get(&n("patch_embed.proj.bias"), &[embed])?),
    )?;
    let patch_norm = if cfg.boolean("enable_patch_layer_norm", true)? {
        Some(LayerNorm::load(w, &n("patch_embed.norm"), embed, 1e-5)?)
    } else {
        None
    };
    let mut stages = Vec::with_capacity(depths.len());
    let (mut dim, mut res) = (embed, grid);
    for (s, (&depth, &h)) in depths.iter().zip(&heads).enumerate() {
        if !dim.is_multiple_of(h) {
            return Err(w.ckpt.error(format!(
                "stage {s}: width {dim} is not divisible by {h} attention heads"
            )));
        }
        let mlp = (mlp_ratio * dim as f64) as usize;
        let shift_ok = res > window;
        let blocks = (0..depth)
            .map(|i| {
                let shift = if i % 2 == 1 && shift_ok {
                    window / 2
                } else {
                    0
                };
                load_block(
                    w,
                    &n(&format!("layers.{s}.blocks.{i}.")),
                    dim,
                    h,
                    res,
                    window,
                    shift,
                    (mlp, eps, act),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let merge = if s + 1 < depths.len() {
            Some(Merge::load(
                w,
                &n(&format!("layers.{s}.downsample.")),
                dim,
                res,
            )?)
        } else {
            None
        };
        stages.push(Stage { blocks, merge });
        if s + 1 < depths.len() {
            dim *= 2;
            res /= 2;
        }
    }
    // The reference's last_hidden_state: [C, freq bins per chunk, chunks x time].
    let bins = res / freq_ratio;
    if bins == 0 {
        return Err(w.ckpt.error(format!(
            "the final {res}x{res} grid is smaller than freq_ratio {freq_ratio}"
        )));
    }
    let mut order = Vec::with_capacity(res * res);
    for fb in 0..bins {
        for k in 0..freq_ratio {
            for t in 0..res {
                order.push(((k * bins + fb) * res + t) as u32);
            }
        }
    }
    Ok(Htsat {
        spec_size,
        n_mels,
        freq_ratio,
        patch,
        batch_norm,
        projection,
        patch_norm,
        stages,
        norm: LayerNorm::load(w, &n("norm"), dim, 1e-5)?,
        output_order: index(order, &place.device)?,
        width: dim,
        place: place.clone(),
    })
}

/// PyTorch's cubic convolution weights (A = -0.75) of the four taps around `t` in
/// `[0, 1)`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

impl Htsat {
    /// The square images `[B, 1, S, S]` of log-mel features `[B, mels, frames]`.
    fn images(&self, input: &EncoderInput) -> Result<Tensor> {
        let width = self.spec_size * self.freq_ratio;
        let expected = format!(
            "log-mel features [B >= 1, {}, frames <= {width}] from the ClapFeatureExtractor \
             processor",
            self.n_mels
        );
        let EncoderInput::Audio { features, .. } = input else {
            return Err(wrong_input(Modality::Audio, &expected, input));
        };
        let (b, m, t) = features.dim();
        if b == 0 || m != self.n_mels || t == 0 || t > width {
            return Err(MlmfError::input(
                Modality::Audio,
                format!("expected {expected}, got {:?}", features.shape()),
            ));
        }
        let [bw, bb, rm, rv] = &self.batch_norm;
        let s = self.spec_size;
        // Source frame and weights of each output frame (align_corners=True).
        let taps: Vec<(isize, [f32; 4])> = (0..width)
            .map(|i| {
                if t == width {
                    return (i as isize, [0.0, 1.0, 0.0, 0.0]);
                }
                let scale = if width > 1 {
                    (t - 1) as f32 / (width - 1) as f32
                } else {
                    0.0
                };
                let real = scale * i as f32;
                let i0 = real.floor();
                (i0 as isize, cubic_weights(real - i0))
            })
            .collect();
        let mut img = vec![0f32; b * s * s];
        let mut row = vec![0f32; t];
        for bi in 0..b {
            for f in 0..m {
                let inv = 1.0 / (rv[f] + 1e-5).sqrt();
                for (j, r) in row.iter_mut().enumerate() {
                    *r = (features[[bi, f, j]] - rm[f]) * inv * bw[f] + bb[f];
                }
                for (i, (i0, wts)) in taps.iter().enumerate() {
                    let v: f32 = wts
                        .iter()
                        .enumerate()
                        .map(|(k, w)| {
                            let j = (i0 - 1 + k as isize).clamp(0, t as isize - 1) as usize;
                            w * row[j]
                        })
                        .sum();
                    let (chunk, col) = (i / s, i % s);
                    img[(bi * s + chunk * m + f) * s + col] = v;
                }
            }
        }
        Tensor::from_vec(img, (b, 1, s, s), &self.place.device)
            .and_then(|x| x.to_dtype(self.place.dtype))
            .map_err(ce("htsat image"))
    }

    /// Token states in the reference's order `[B, L, C]` and their mean `[B, C]`.
    pub(crate) fn forward(&self, input: &EncoderInput) -> Result<(Tensor, Tensor, Tensor)> {
        let f = ce("htsat");
        let img = self.images(input)?;
        let b = img.dim(0).map_err(&f)?;
        let patches = crate::encoders::layers::patchify(&img, self.patch)?;
        let mut x = self.projection.forward(&patches)?;
        if let Some(n) = &self.patch_norm {
            x = n.forward(&x)?;
        }
        for stage in &self.stages {
            let fast: Vec<WindowBlock<'_>> = stage.blocks.iter().map(Block::view).collect();
            match window::run_blocks(&x, &fast)? {
                Some(y) => x = y,
                None => {
                    for block in &stage.blocks {
                        x = block.forward(&x)?;
                    }
                }
            }
            if let Some(m) = &stage.merge {
                x = m.forward(&x)?;
            }
        }
        let x = self.norm.forward(&x)?;
        let pooled = x
            .to_dtype(DType::F32)
            .and_then(|h| h.mean(1))
            .and_then(|h| h.to_dtype(x.dtype()))
            .map_err(&f)?;
        let hidden = x.index_select(&self.output_order, 1).map_err(&f)?;
        let l = hidden.dim(1).map_err(&f)?;
        Ok((hidden, full_mask(b, l, &self.place.device)?, pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_interpolate() {
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
        let w = cubic_weights(0.3);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn windows_roll_and_label_regions() {
        // 4x4 grid, windows of 2, shift 1: window 0 starts at source token (1, 1).
        let (src, label) = window_order(4, 2, 1);
        assert_eq!(&src[..4], &[5, 6, 9, 10]);
        // The last window mixes the roll's regions: 4 distinct labels.
        let last: std::collections::BTreeSet<_> = label[12..].iter().collect();
        assert_eq!(last.len(), 4);
        let (plain, zeros) = window_order(4, 2, 0);
        assert_eq!(&plain[..4], &[0, 1, 4, 5]);
        assert!(zeros.iter().all(|&l| l == 0));
    }

    #[test]
    fn fused_stages_equal_the_block_by_block_path() {
        use crate::encoders::checkpoint::Checkpoint;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/zoo/models/clap_tiny");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let place = Placement::cpu_f32();
        let w = Weights {
            ckpt: &ckpt,
            place: &place,
        };
        let cfg = Cfg::new(ckpt.config(), "").sub("audio_config");
        let h = load(cfg, w, "audio_model.audio_encoder.").unwrap();
        for stage in &h.stages {
            let b0 = &stage.blocks[0];
            let (l, c) = (b0.gather_rows.len(), b0.norm1.weight.dim(0).unwrap());
            let x = Tensor::randn(0f32, 1.0, (2, l, c), &Device::Cpu).unwrap();
            let views: Vec<WindowBlock<'_>> = stage.blocks.iter().map(Block::view).collect();
            let fused = window::run_blocks(&x, &views).unwrap().unwrap();
            let mut slow = x.clone();
            for block in &stage.blocks {
                slow = block.forward(&slow).unwrap();
            }
            let diff = crate::encoders::layers::max_abs_diff(&fused, &slow);
            assert!(diff < 1e-5, "stage of width {c}: {diff}");
        }
    }

    #[test]
    fn relative_index_matches_the_reference_layout() {
        let idx = relative_index(2);
        // Token 0 against itself: (0 + 1) * 3 + (0 + 1) = 4; token 0 vs 3: dy=-1, dx=-1.
        assert_eq!(idx[0], 4);
        assert_eq!(idx[3], 0);
        assert_eq!(idx[3 * 4], 8);
    }
}
