//! wav2vec 2.0 (`model_type: wav2vec2`) and HuBERT (`hubert`), as transformers'
//! `Wav2Vec2Model` / `HubertModel`: raw-waveform speech encoders.
//!
//! - Feature encoder: 1-D convolutions over the samples (`conv_dim`, `conv_kernel`,
//!   `conv_stride`), each followed by GELU; `feat_extract_norm: group` puts a group norm
//!   with one group per channel (statistics over time) after the first only, `layer` a
//!   layer norm over channels after each. Each convolution runs as one matrix product
//!   over the windows it reads (in channels-last layout a window is one contiguous run).
//! - Feature projection: layer norm (HuBERT: only with `feat_proj_layer_norm`) and a
//!   linear map to `hidden_size`.
//! - Positional convolution: a grouped convolution over time (`num_conv_pos_embeddings`
//!   wide, `num_conv_pos_embedding_groups` groups, "same" padding, the last output
//!   dropped for an even width) with weight normalisation (`weight_g`/`weight_v` or
//!   `parametrizations.weight.original0/1`, folded at load), GELU, added to the states.
//! - Transformer: `do_stable_layer_norm: false` norms the states, then post-norm
//!   layers; `true` runs pre-norm layers and norms at the end.
//!
//! Input: `[B, 1, samples]` from the `Wav2Vec2FeatureExtractor` processor, each row's
//! real length in `valid_frames`. Every clip runs the feature encoder at its own length
//! (the first group norm's statistics then cover that clip only, as when the reference
//! sees it alone); the transformer masks the padded frames. A clip's result therefore
//! does not depend on what it is batched with. `pooled` is the mean of the frames.

use candle_core::{DType, Device, Tensor};

use crate::encoders::config::Cfg;
use crate::encoders::inputs::{mask_tensor, wrong_input};
use crate::encoders::layers::{
    ce, load_layers, masked_mean, padding_bias, run_layers, Activation, AttentionNames,
    EncoderLayer, LayerNames, LayerNorm, Linear, Placement, Sizes, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Group norm with one group per channel: statistics over time, `[T, C]` rows.
struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
}

/// PyTorch's GroupNorm default eps, which the feature encoder's norm uses.
const GROUP_NORM_EPS: f64 = 1e-5;

/// One feature-encoder convolution (no padding) with its norm and activation.
struct Conv {
    /// `[out, kernel * in]`, columns in (tap, channel) order.
    linear: Linear,
    kernel: usize,
    stride: usize,
    group_norm: Option<ChannelNorm>,
    layer_norm: Option<LayerNorm>,
}

/// The positional convolution, one linear map per group.
struct PosConv {
    groups: Vec<Linear>,
    kernel: usize,
}

/// A loaded wav2vec 2.0 or HuBERT encoder.
pub struct Wav2Vec2 {
    convs: Vec<Conv>,
    act: Activation,
    proj_norm: Option<LayerNorm>,
    projection: Linear,
    pos_conv: PosConv,
    norm: LayerNorm,
    stable: bool,
    layers: Vec<EncoderLayer>,
    /// The fewest samples that give one frame.
    min_samples: usize,
    place: Placement,
    info: EncoderInfo,
}

/// Frames a convolution stack makes of `n` samples (0 when too short).
#[cfg(test)]
fn frames_after(convs: &[(usize, usize)], n: usize) -> usize {
    convs.iter().fold(
        n,
        |len, &(k, s)| {
            if len < k {
                0
            } else {
                (len - k) / s + 1
            }
        },
    )
}

/// The windows a convolution of width `k` and stride `s` reads from `x` `[T, C]`, one
/// row each: `[T_out, k * C]` in (tap, channel) order.
fn windows(x: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let f = ce("convolution windows");
    let (t, c) = x.dims2().map_err(&f)?;
    let out = (t - k) / s + 1;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // Channels-last: window i is the contiguous run of rows i*s .. i*s + k.
        let v = x
            .contiguous()
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(&f)?;
        let mut rows = Vec::with_capacity(out * k * c);
        for i in 0..out {
            rows.extend_from_slice(&v[i * s * c..(i * s + k) * c]);
        }
        return Tensor::from_vec(rows, (out, k * c), x.device()).map_err(f);
    }
    windows_by_ops(x, k, s, out).map_err(f)
}

/// [`windows`] as tensor ops on the tensor's device (no index uploaded per tap): tap
/// `j` is rows `j, j + s, ..`: `out * s` rows from `j` (zeros padded past the end) seen
/// as `[out, s, c]`, first of each `s`.
fn windows_by_ops(x: &Tensor, k: usize, s: usize, out: usize) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let padded = x.contiguous()?.pad_with_zeros(0, 0, s)?;
    let taps = (0..k)
        .map(|j| {
            padded
                .narrow(0, j, out * s)?
                .reshape((out, s, c))?
                .narrow(1, 0, 1)?
                .squeeze(1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&taps, 1)
}

impl ChannelNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("group norm");
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32).map_err(&f)?;
        let mean = x.mean_keepdim(0).map_err(&f)?;
        let centred = x.broadcast_sub(&mean).map_err(&f)?;
        let var = centred.sqr().and_then(|v| v.mean_keepdim(0)).map_err(&f)?;
        centred
            .broadcast_div(&(var + GROUP_NORM_EPS).and_then(|v| v.sqrt()).map_err(&f)?)
            .and_then(|y| y.broadcast_mul(&self.weight))
            .and_then(|y| y.broadcast_add(&self.bias))
            .and_then(|y| y.to_dtype(dtype))
            .map_err(f)
    }
}

impl Conv {
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let mut y = self
            .linear
            .forward(&windows(x, self.kernel, self.stride)?)?;
        if let Some(n) = &self.group_norm {
            if self.layer_norm.is_none() {
                let w = (&n.weight, &n.bias);
                if let Some(out) =
                    crate::encoders::cpu::channel_norm::channel_norm(&y, w, GROUP_NORM_EPS, act)?
                {
                    return Ok(out);
                }
            }
            y = n.forward(&y)?;
        }
        if let Some(n) = &self.layer_norm {
            y = n.forward(&y)?;
        }
        act.forward(&y)
    }
}

impl PosConv {
    /// `x` `[T, D]` -> `[T, D]`: the grouped convolution with zero padding of half the
    /// width on both sides, the surplus last frame of an even width dropped.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("positional convolution");
        let (t, d) = x.dims2().map_err(&f)?;
        let pad = self.kernel / 2;
        let padded = x.pad_with_zeros(0, pad, pad).map_err(&f)?;
        let width = d / self.groups.len();
        let parts = self
            .groups
            .iter()
            .enumerate()
            .map(|(g, lin)| {
                let xg = padded
                    .narrow(1, g * width, width)
                    .and_then(|x| x.contiguous())
                    .map_err(&f)?;
                lin.forward(&windows(&xg, self.kernel, 1)?)?
                    .narrow(0, 0, t)
                    .map_err(&f)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1).map_err(f)
    }
}

/// Loads a wav2vec 2.0 or HuBERT checkpoint.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    req.check_modality(&[Modality::Audio])?;
    let ckpt = req.checkpoint;
    let model_type = ckpt.model_type().unwrap_or("wav2vec2").to_string();
    let cfg = Cfg::new(ckpt.config(), "");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-5, "gelu"))?;
    let dims = cfg.sizes("conv_dim", &[512; 7])?;
    let kernels = cfg.sizes("conv_kernel", &[10, 3, 3, 3, 3, 2, 2])?;
    let strides = cfg.sizes("conv_stride", &[5, 2, 2, 2, 2, 2, 2])?;
    if kernels.len() != dims.len() || strides.len() != dims.len() {
        return Err(MlmfError::config(
            cfg.name("conv_dim"),
            format!(
                "conv_dim, conv_kernel and conv_stride must have one entry per layer, got \
                 {}, {} and {}",
                dims.len(),
                kernels.len(),
                strides.len()
            ),
        ));
    }
    let conv_bias = cfg.boolean("conv_bias", false)?;
    let norm_kind = cfg.string("feat_extract_norm", "group")?;
    if !matches!(norm_kind, "group" | "layer") {
        return Err(MlmfError::config(
            cfg.name("feat_extract_norm"),
            format!("expected \"group\" or \"layer\", got {norm_kind:?}"),
        ));
    }
    for key in ["add_adapter", "conv_pos_batch_norm"] {
        if cfg.boolean(key, false)? {
            return Err(MlmfError::config(
                cfg.name(key),
                "is not supported (mlmf loads the plain encoder)",
            ));
        }
    }
    let act = Activation::parse(
        cfg.string("feat_extract_activation", "gelu")?,
        &cfg.name("feat_extract_activation"),
    )?;
    let stable = cfg.boolean("do_stable_layer_norm", false)?;
    let proj_norm = model_type != "hubert" || cfg.boolean("feat_proj_layer_norm", true)?;
    let kernel = cfg.size("num_conv_pos_embeddings", 128)?;
    let n_groups = cfg.size("num_conv_pos_embedding_groups", 16)?;
    if !s.hidden.is_multiple_of(n_groups) {
        return Err(MlmfError::config(
            cfg.name("num_conv_pos_embedding_groups"),
            format!("{n_groups} does not divide hidden_size {}", s.hidden),
        ));
    }

    let place = req.placement();
    let prefix = ckpt
        .find_prefix("feature_extractor.conv_layers.0.conv.weight")
        .ok_or_else(|| {
            ckpt.error("weight `feature_extractor.conv_layers.0.conv.weight` is missing")
        })?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let f = ce("wav2vec2 load");
    let mut convs = Vec::with_capacity(dims.len());
    let mut in_ch = 1;
    for (i, ((&out, &k), &st)) in dims.iter().zip(&kernels).zip(&strides).enumerate() {
        let l = |n: &str| p(&format!("feature_extractor.conv_layers.{i}.{n}"));
        let weight = w
            .get(&l("conv.weight"), &[out, in_ch, k])?
            .permute((0, 2, 1))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((out, k * in_ch)))
            .map_err(&f)?;
        let bias = if conv_bias {
            Some(w.get(&l("conv.bias"), &[out])?)
        } else {
            None
        };
        let (group_norm, layer_norm) = match (norm_kind, i) {
            ("group", 0) => (
                Some(ChannelNorm {
                    weight: w.get_f32(&l("layer_norm.weight"), &[out])?,
                    bias: w.get_f32(&l("layer_norm.bias"), &[out])?,
                }),
                None,
            ),
            // nn.LayerNorm's default eps.
            ("layer", _) => (None, Some(LayerNorm::load(w, &l("layer_norm"), out, 1e-5)?)),
            _ => (None, None),
        };
        convs.push(Conv {
            linear: Linear::from_parts(weight, bias)?,
            kernel: k,
            stride: st,
            group_norm,
            layer_norm,
        });
        in_ch = out;
    }
    // One frame out of the last convolution needs this many samples.
    let min_samples = kernels
        .iter()
        .zip(&strides)
        .rev()
        .fold(1, |n, (&k, &st)| (n - 1) * st + k);
    let feat = in_ch;
    let names = LayerNames {
        attention: AttentionNames {
            q: "attention.q_proj",
            k: "attention.k_proj",
            v: "attention.v_proj",
            o: "attention.out_proj",
            k_bias: true,
        },
        norm1: "layer_norm",
        fc1: "feed_forward.intermediate_dense",
        fc2: "feed_forward.output_dense",
        norm2: "final_layer_norm",
        pre_norm: stable,
    };
    let d = s.hidden;
    Ok(Box::new(Wav2Vec2 {
        convs,
        act,
        proj_norm: if proj_norm {
            Some(LayerNorm::load(
                w,
                &p("feature_projection.layer_norm"),
                feat,
                s.eps,
            )?)
        } else {
            None
        },
        projection: Linear::load(w, &p("feature_projection.projection"), feat, d, true)?,
        pos_conv: load_pos_conv(w, &p("encoder.pos_conv_embed.conv."), d, kernel, n_groups)?,
        norm: LayerNorm::load(w, &p("encoder.layer_norm"), d, s.eps)?,
        stable,
        layers: load_layers(w, &p("encoder.layers."), &names, &s)?,
        min_samples,
        info: place.info(
            Modality::Audio,
            &model_type,
            d,
            d,
            ProcessorKind::Audio {
                n_mels: 1,
                frames: 0,
            },
        ),
        place,
    }))
}

/// The positional convolution under `c` (`...pos_conv_embed.conv.`): weight
/// normalisation folded, `w[:, :, k] = g[k] v[:, :, k] / ||v[:, :, k]||`.
fn load_pos_conv(
    w: Weights<'_>,
    c: &str,
    d: usize,
    kernel: usize,
    n_groups: usize,
) -> Result<PosConv> {
    let width = d / n_groups;
    let shape = [d, width, kernel];
    let cpu = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        w.ckpt
            .tensor(name, shape, DType::F32, &Device::Cpu)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(ce("wav2vec2 load"))
    };
    let pairs = [
        ("weight_g", "weight_v"),
        (
            "parametrizations.weight.original0",
            "parametrizations.weight.original1",
        ),
    ];
    let weight = match pairs.iter().find(|(g, _)| w.contains(&format!("{c}{g}"))) {
        Some((g, v)) => {
            let g = cpu(&format!("{c}{g}"), &[1, 1, kernel])?;
            let mut v = cpu(&format!("{c}{v}"), &shape)?;
            for (k, &gk) in g.iter().enumerate() {
                let norm = v
                    .iter()
                    .skip(k)
                    .step_by(kernel)
                    .map(|&x| f64::from(x).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let scale = (f64::from(gk) / norm) as f32;
                for x in v.iter_mut().skip(k).step_by(kernel) {
                    *x *= scale;
                }
            }
            v
        }
        None => cpu(&format!("{c}weight"), &shape)?,
    };
    let bias = cpu(&format!("{c}bias"), &[d])?;
    let f = ce("wav2vec2 load");
    let groups = (0..n_groups)
        .map(|g| {
            // Rows g*width.. of [D, width, K], columns reordered to (tap, channel).
            let mut rows = Vec::with_capacity(width * kernel * width);
            for o in g * width..(g + 1) * width {
                for k in 0..kernel {
                    for i in 0..width {
                        rows.push(weight[(o * width + i) * kernel + k]);
                    }
                }
            }
            let wt = Tensor::from_vec(rows, (width, kernel * width), &w.place.device)
                .and_then(|t| t.to_dtype(w.place.dtype))
                .map_err(&f)?;
            let b = Tensor::from_vec(
                bias[g * width..(g + 1) * width].to_vec(),
                width,
                &w.place.device,
            )
            .and_then(|t| t.to_dtype(w.place.dtype))
            .map_err(&f)?;
            Linear::from_parts(wt, Some(b))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PosConv { groups, kernel })
}

impl Wav2Vec2 {
    /// Checks the batch and returns each row's samples as a `[n, 1]` tensor.
    fn clips(&self, input: &EncoderInput) -> Result<Vec<Tensor>> {
        let expected = "raw waveforms [B >= 1, 1, samples] from the Wav2Vec2FeatureExtractor \
                        processor";
        let EncoderInput::Audio {
            features,
            valid_frames,
        } = input
        else {
            return Err(wrong_input(Modality::Audio, expected, input));
        };
        let (b, c, width) = features.dim();
        if b == 0 || c != 1 {
            return Err(MlmfError::input(
                Modality::Audio,
                format!("expected {expected}, got {:?}", features.shape()),
            ));
        }
        let lengths = match valid_frames {
            Some(v) if v.len() != b => {
                return Err(MlmfError::input(
                    Modality::Audio,
                    format!(
                        "expected {b} valid-sample counts, one per row, got {}",
                        v.len()
                    ),
                ))
            }
            Some(v) => v.clone(),
            None => vec![width; b],
        };
        let f = ce("wav2vec2 input");
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                if n < self.min_samples || n > width {
                    return Err(MlmfError::input(
                        Modality::Audio,
                        format!(
                            "expected between {} samples (the feature encoder's receptive \
                             field) and the row width {width}, got {n}",
                            self.min_samples
                        ),
                    )
                    .at_index(i));
                }
                let row: Vec<f32> = features
                    .slice(ndarray::s![i, 0, ..n])
                    .iter()
                    .copied()
                    .collect();
                Tensor::from_vec(row, (n, 1), &self.place.device)
                    .and_then(|t| t.to_dtype(self.place.dtype))
                    .map_err(&f)
            })
            .collect()
    }

    /// Feature encoder and projection of one clip: `[n, 1]` -> `[T, D]`.
    fn frames(&self, clip: &Tensor) -> Result<Tensor> {
        let mut x = clip.clone();
        for conv in &self.convs {
            x = conv.forward(&x, self.act)?;
        }
        if let Some(n) = &self.proj_norm {
            x = n.forward(&x)?;
        }
        self.projection.forward(&x)
    }
}

impl ModalityEncoder for Wav2Vec2 {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let f = ce("wav2vec2");
        let clips = self.clips(input)?;
        let frames = clips
            .iter()
            .map(|c| self.frames(c))
            .collect::<Result<Vec<_>>>()?;
        let lengths: Vec<usize> = frames
            .iter()
            .map(|x| x.dim(0).map_err(&f))
            .collect::<Result<_>>()?;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        // Padded frames are zero going into the positional convolution, as the
        // reference zeroes them; each clip's convolution reads only its own frames.
        let rows = frames
            .iter()
            .map(|x| {
                let pos = self.act.forward(&self.pos_conv.forward(x)?)?;
                (x + pos)
                    .and_then(|y| y.pad_with_zeros(0, 0, longest - y.dim(0)?))
                    .map_err(&f)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut hidden = Tensor::stack(&rows, 0).map_err(&f)?;
        let b = lengths.len();
        let mask_rows: Vec<u8> = lengths
            .iter()
            .flat_map(|&n| (0..longest).map(move |t| u8::from(t < n)))
            .collect();
        let mask = mask_tensor(b, longest, mask_rows, &self.place.device)?;
        let bias = if lengths.iter().all(|&n| n == longest) {
            None
        } else {
            Some(padding_bias(&mask)?)
        };
        if !self.stable {
            hidden = self.norm.forward(&hidden)?;
        }
        hidden = run_layers(&self.layers, hidden, &bias)?;
        if self.stable {
            hidden = self.norm.forward(&hidden)?;
        }
        let pooled = masked_mean(&hidden, &mask)?;
        Ok(EncoderOutput {
            hidden_states: hidden,
            mask,
            pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counts_follow_the_convolutions() {
        let base = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)];
        // One second at 16 kHz gives 49 frames; 400 samples (25 ms) give one.
        assert_eq!(frames_after(&base, 16000), 49);
        assert_eq!(frames_after(&base, 400), 1);
        assert_eq!(frames_after(&base, 399), 0);
    }

    #[test]
    fn windows_are_the_convolution_reads() {
        // [5, 2] rows (t, c) = 10 t + c; kernel 2, stride 2: windows at t = 0 and 2.
        let x = Tensor::from_vec(
            (0..5)
                .flat_map(|t| (0..2).map(move |c| (10 * t + c) as f32))
                .collect::<Vec<_>>(),
            (5, 2),
            &Device::Cpu,
        )
        .unwrap();
        let w = windows(&x, 2, 2).unwrap();
        assert_eq!(
            w.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 10.0, 11.0], vec![20.0, 21.0, 30.0, 31.0]]
        );
        // The generic path (another dtype, or a GPU) reads the same windows, for the
        // feature encoder's kernels and strides and the positional convolution's.
        for (t, k, s) in [
            (5, 2, 2),
            (17, 3, 2),
            (41, 10, 5),
            (12, 2, 2),
            (130, 128, 1),
        ] {
            let x = Tensor::from_vec(
                (0..t * 3).map(|i| i as f32).collect::<Vec<_>>(),
                (t, 3),
                &Device::Cpu,
            )
            .unwrap();
            let w = windows(&x, k, s).unwrap();
            let w64 = windows(&x.to_dtype(DType::F64).unwrap(), k, s).unwrap();
            assert_eq!(w.dims(), &[(t - k) / s + 1, 3 * k]);
            assert_eq!(
                w64.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                w.to_vec2::<f32>().unwrap(),
                "t {t}, kernel {k}, stride {s}"
            );
        }
    }
}
