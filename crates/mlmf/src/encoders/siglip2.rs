//! SigLIP 2 (`siglip2`, `siglip2_vision_model`, `siglip2_text_model`), as
//! transformers' `Siglip2Model`: SigLIP's towers with a variable-resolution (NaFlex)
//! image tower.
//!
//! Vision: patches cut by the processor (`[B, N, P * P * 3]`, (row, column, channel)
//! inside a patch) embedded by one linear map; the learned `G x G` position table
//! (`num_patches = G²`) resized to each image's patch grid by antialiased bilinear
//! interpolation (PyTorch's `interpolate(mode="bilinear", align_corners=False,
//! antialias=True)`, width then height), padded rows given the grid's first position;
//! pre-norm layers that mask the padded patches as keys, `post_layernorm`, and the
//! attention-pooling head, which masks them too.
//!
//! Text: SigLIP's text tower unchanged ([`crate::encoders::siglip`]).

use candle_core::{DType, Tensor};

use crate::encoders::clip::{tower, tower_cfg, CLIP_LAYER};
use crate::encoders::inputs::{mask_tensor, wrong_input};
use crate::encoders::layers::{
    ce, load_layers, masked_mean, padding_bias, run_layers, EncoderLayer, LayerNorm, Linear,
    Placement, Sizes, Weights,
};
use crate::encoders::registry::LoadRequest;
use crate::encoders::siglip::{is_dual, load_text, PoolingHead};
use crate::encoders::{EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::image::naflex::check_batch;

/// SigLIP 2's image tower.
pub struct Siglip2Vision {
    patch: usize,
    projection: Linear,
    /// The position table `[G, G, D]`, float32 on the CPU (resized per grid).
    table: Vec<f32>,
    grid: usize,
    /// The tables resized for the grids seen lately, on the model's device.
    resized: GridTables,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    head: Option<PoolingHead>,
    place: Placement,
    info: EncoderInfo,
}

/// Loads the tower of a SigLIP 2 checkpoint that the request's modality selects.
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    match tower(req, "siglip2")? {
        (Modality::Text, t) => Ok(Box::new(load_text(req, &t)?)),
        (_, t) => Ok(Box::new(load_vision(req, &t)?)),
    }
}

fn load_vision(req: &LoadRequest<'_>, model_type: &str) -> Result<Siglip2Vision> {
    let ckpt = req.checkpoint;
    let cfg = tower_cfg(ckpt.config(), is_dual(model_type), "vision_config");
    let s = Sizes::read(cfg, (768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh"))?;
    let patch = cfg.size("patch_size", 16)?;
    let channels = cfg.size("num_channels", 3)?;
    let positions = cfg.size("num_patches", 256)?;
    let grid = (positions as f64).sqrt().round() as usize;
    if grid * grid != positions {
        return Err(MlmfError::config(
            cfg.name("num_patches"),
            format!("must be a square number of positions, got {positions}"),
        ));
    }
    if channels != 3 {
        return Err(MlmfError::config(
            cfg.name("num_channels"),
            format!("mlmf's patch processor makes RGB patches: expected 3, got {channels}"),
        ));
    }
    let use_head = cfg.boolean("vision_use_head", true)?;
    let place = req.placement();
    let prefix = ckpt
        .find_prefix("embeddings.patch_embedding.weight")
        .ok_or_else(|| {
            ckpt.error("weight `vision_model.embeddings.patch_embedding.weight` is missing")
        })?;
    let w = Weights {
        ckpt,
        place: &place,
    };
    let p = |n: &str| format!("{prefix}{n}");
    let d = s.hidden;
    let table = ckpt
        .tensor(
            &p("embeddings.position_embedding.weight"),
            &[positions, d],
            DType::F32,
            &candle_core::Device::Cpu,
        )?
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce("siglip2 load"))?;
    Ok(Siglip2Vision {
        patch,
        projection: Linear::load(
            w,
            &p("embeddings.patch_embedding"),
            channels * patch * patch,
            d,
            true,
        )?,
        table,
        grid,
        resized: GridTables::default(),
        layers: load_layers(w, &p("encoder.layers."), &CLIP_LAYER, &s)?,
        post_norm: LayerNorm::load(w, &p("post_layernorm"), d, s.eps)?,
        head: if use_head {
            Some(PoolingHead::load(w, &p("head."), &s)?)
        } else {
            None
        },
        info: place.info(
            Modality::Image,
            model_type,
            d,
            d,
            ProcessorKind::Patches { patch },
        ),
        place,
    })
}

/// For each of `out` output positions, the input positions `[first, first + len)` and
/// their weights: PyTorch's antialiased linear filter (`_upsample_bilinear2d_aa`,
/// `align_corners=False`) from `n` inputs.
fn aa_weights(n: usize, out: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = n as f64 / out as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..out)
        .map(|i| {
            let centre = scale * (i as f64 + 0.5);
            let first = ((centre - support + 0.5) as i64).max(0) as usize;
            let last = ((centre + support + 0.5) as i64).min(n as i64) as usize;
            let mut w: Vec<f64> = (first..last)
                .map(|j| {
                    let x = (j as f64 - centre + 0.5) * inv;
                    (1.0 - x.abs()).max(0.0)
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total > 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (first, w)
        })
        .collect()
}

/// The `[g, g, d]` table resized to `[h, w, d]` (width first, then height; an axis of
/// unchanged size is copied), row-major positions.
fn resize_table(table: &[f32], g: usize, d: usize, (h, w): (usize, usize)) -> Vec<f32> {
    let mut wide = vec![0f64; g * w * d];
    let cols = aa_weights(g, w);
    for y in 0..g {
        for (x, (first, ws)) in cols.iter().enumerate() {
            let dst = &mut wide[(y * w + x) * d..(y * w + x + 1) * d];
            if g == w {
                let src = &table[(y * g + x) * d..(y * g + x + 1) * d];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(o, &v)| *o = f64::from(v));
                continue;
            }
            for (k, &wt) in ws.iter().enumerate() {
                let src = &table[(y * g + first + k) * d..(y * g + first + k + 1) * d];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(o, &v)| *o += wt * f64::from(v));
            }
        }
    }
    let rows = aa_weights(g, h);
    let mut out = vec![0f32; h * w * d];
    for (y, (first, ws)) in rows.iter().enumerate() {
        for x in 0..w {
            let dst = &mut out[(y * w + x) * d..(y * w + x + 1) * d];
            if g == h {
                let src = &wide[(y * w + x) * d..(y * w + x + 1) * d];
                dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v as f32);
                continue;
            }
            let mut acc = vec![0f64; d];
            for (k, &wt) in ws.iter().enumerate() {
                let src = &wide[((first + k) * w + x) * d..((first + k) * w + x + 1) * d];
                acc.iter_mut().zip(src).for_each(|(a, &v)| *a += wt * v);
            }
            dst.iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
        }
    }
    out
}

/// How many grids keep their resized position table (a 16 x 16 grid of 768 wide rows:
/// 0.8 MB in float32).
const GRIDS: usize = 16;

/// Position tables resized per grid, kept on the model's device so that a call uploads
/// nothing for a grid seen lately: at most [`GRIDS`], the least recently used dropped
/// first.
#[derive(Default)]
struct GridTables(std::sync::Mutex<Vec<((usize, usize), Tensor)>>);

impl GridTables {
    /// The table for `grid`, made by `make` when not held.
    fn get(&self, grid: (usize, usize), make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = match held.iter().position(|(g, _)| *g == grid) {
            Some(i) => held.remove(i),
            None => {
                if held.len() == GRIDS {
                    held.remove(0);
                }
                (grid, make()?)
            }
        };
        let table = entry.1.clone();
        held.push(entry);
        Ok(table)
    }
}

/// `table` `[h*w, D]` extended to `n` rows by repeating its first row (padded patches
/// get the grid's first position, as the reference does).
fn pad_rows(table: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let (hw, d) = table.dims2()?;
    if hw >= n {
        return Ok(table.clone());
    }
    let first = table
        .narrow(0, 0, 1)?
        .broadcast_as((n - hw, d))?
        .contiguous()?;
    Tensor::cat(&[table, &first], 0)
}

impl Siglip2Vision {
    /// Position rows `[B, N, D]` for the batch's grids: each grid's resized table (kept
    /// on the device per grid), its padded rows given the first position.
    fn positions(&self, shapes: &[(usize, usize)], n: usize) -> Result<Tensor> {
        let d = self.info.hidden_size;
        let f = ce("siglip2 positions");
        let rows = shapes
            .iter()
            .map(|&(h, w)| {
                let table = self.resized.get((h, w), || {
                    let host = resize_table(&self.table, self.grid, d, (h, w));
                    Tensor::from_vec(host, (h * w, d), &self.place.device)
                        .and_then(|t| t.to_dtype(self.place.dtype))
                        .map_err(&f)
                })?;
                pad_rows(&table, n).map_err(&f)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0).map_err(&f)
    }
}

impl ModalityEncoder for Siglip2Vision {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let dim = 3 * self.patch * self.patch;
        let EncoderInput::Patches { patches, shapes } = input else {
            return Err(wrong_input(
                Modality::Image,
                format!(
                    "variable-resolution patches [B, N, {dim}] with their grids (the \
                     Siglip2ImageProcessor output: pixel_values and spatial_shapes)"
                ),
                input,
            ));
        };
        check_batch(patches, shapes, dim)?;
        let f = ce("siglip2 vision");
        let (b, n, _) = patches.dim();
        let data: Vec<f32> = patches.iter().copied().collect();
        let x = Tensor::from_vec(data, (b, n, dim), &self.place.device)
            .and_then(|t| t.to_dtype(self.place.dtype))
            .map_err(&f)?;
        let x = (self.projection.forward(&x)? + self.positions(shapes, n)?).map_err(&f)?;
        let valid: Vec<u8> = shapes
            .iter()
            .flat_map(|&(h, w)| (0..n).map(move |i| u8::from(i < h * w)))
            .collect();
        let padded = valid.contains(&0);
        let mask = mask_tensor(b, n, valid, &self.place.device)?;
        let bias = if padded {
            Some(padding_bias(&mask)?)
        } else {
            None
        };
        let hidden = self
            .post_norm
            .forward(&run_layers(&self.layers, x, &bias)?)?;
        let pooled = match &self.head {
            Some(h) => h.forward(&hidden, &bias)?,
            None => masked_mean(&hidden, &mask)?,
        };
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
    fn antialiased_weights_sum_to_one_and_cover_the_input() {
        for (n, out) in [(4, 2), (4, 10), (16, 7), (5, 5)] {
            let ws = aa_weights(n, out);
            assert_eq!(ws.len(), out);
            for (first, w) in &ws {
                assert!(first + w.len() <= n);
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        // Halving: a triangle twice as wide, centred at 1.0 for output 0, reads
        // inputs 0, 1, 2 with weights 0.75, 0.75, 0.25 before normalisation.
        let (first, w) = &aa_weights(4, 2)[0];
        assert_eq!(*first, 0);
        let want = [0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75];
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{w:?}"
        );
    }

    #[test]
    fn an_unchanged_grid_keeps_the_table() {
        let table: Vec<f32> = (0..4 * 4 * 2).map(|v| v as f32).collect();
        assert_eq!(resize_table(&table, 4, 2, (4, 4)), table);
    }

    /// A grid's table is made once while held, the least recently used goes first,
    /// and padding repeats the first position.
    #[test]
    fn grid_tables_are_kept_per_grid_and_padded_with_the_first_position() {
        let dev = candle_core::Device::Cpu;
        let tables = GridTables::default();
        let made = std::cell::Cell::new(0);
        let table = |g: (usize, usize)| {
            let v: Vec<f32> = (0..g.0 * g.1 * 2).map(|i| (i + 100 * g.0) as f32).collect();
            made.set(made.get() + 1);
            Tensor::from_vec(v, (g.0 * g.1, 2), &dev).map_err(ce("test"))
        };
        let get = |g| tables.get(g, || table(g)).unwrap();
        let first = get((2, 3)).to_vec2::<f32>().unwrap();
        assert_eq!(get((2, 3)).to_vec2::<f32>().unwrap(), first);
        assert_eq!(made.get(), 1);
        for h in 3..3 + GRIDS {
            get((h, 1));
        }
        // (2, 3) was the least recently used when the 17th grid came.
        assert_eq!(made.get(), 1 + GRIDS);
        get((GRIDS + 2, 1));
        assert_eq!(made.get(), 1 + GRIDS);
        get((2, 3));
        assert_eq!(made.get(), 2 + GRIDS);

        let padded = pad_rows(&get((2, 3)), 9).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(padded[..6], first[..]);
        assert!(padded[6..].iter().all(|r| *r == first[0]));
        assert_eq!(
            pad_rows(&get((2, 3)), 6).unwrap().to_vec2::<f32>().unwrap(),
            first
        );
    }
}
