//! Patch extraction from preprocessed pixels.
//!
//! * [`extract_patches`]: ViT-style non-overlapping patches, `[B, C, H, W]` ->
//!   `[B, (H/P) * (W/P), C * P * P]`, patches in row-major order, each flattened as
//!   `(c, py, px)`.
//! * [`qwen2vl_patches`]: the layout of transformers' `Qwen2VLImageProcessor` /
//!   `Qwen2VLVideoProcessor.patchify`: frames `[T, C, H, W]` are grouped in temporal
//!   patches (the last frame repeated to fill the last group), and spatial patches are
//!   ordered by `merge x merge` blocks: rows `(t, bh, bw, mh, mw)`, columns
//!   `(c, tt, py, px)`, i.e. `[grid_t * grid_h * grid_w, C * temporal * P * P]`.

use ndarray::{Array2, Array3, ArrayView4};
use rayon::prelude::*;

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

fn input_err(message: String) -> MlmfError {
    MlmfError::input(Modality::Image, message)
}

/// `[B, C, H, W]` -> `[B, (H/P)*(W/P), C*P*P]`; `H` and `W` must be multiples of `patch`.
pub fn extract_patches(pixels: ArrayView4<'_, f32>, patch: usize) -> Result<Array3<f32>> {
    let (b, c, h, w) = pixels.dim();
    if patch == 0 || h % patch != 0 || w % patch != 0 {
        return Err(input_err(format!(
            "patch size {patch} must be > 0 and divide the height and width, got pixels of \
             shape [{b}, {c}, {h}, {w}]"
        )));
    }
    let (gh, gw) = (h / patch, w / patch);
    let dim = c * patch * patch;
    let pixels = pixels.as_standard_layout();
    let src = pixels
        .as_slice()
        .ok_or_else(|| MlmfError::Internal("standard-layout array without a slice".into()))?;
    let mut out = vec![0f32; b * gh * gw * dim];
    out.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, rest) = (row / (gh * gw), row % (gh * gw));
            let (py0, px0) = ((rest / gw) * patch, (rest % gw) * patch);
            for ci in 0..c {
                for py in 0..patch {
                    let s = ((bi * c + ci) * h + py0 + py) * w + px0;
                    let d = (ci * patch + py) * patch;
                    if let (Some(d), Some(s)) = (dst.get_mut(d..d + patch), src.get(s..s + patch)) {
                        d.copy_from_slice(s);
                    }
                }
            }
        });
    Array3::from_shape_vec((b, gh * gw, dim), out)
        .map_err(|e| MlmfError::Internal(format!("patch array shape: {e}")))
}

/// Qwen2-VL patches of `frames` `[T, C, H, W]`: returns the flattened patches
/// `[grid_t * grid_h * grid_w, C * temporal_patch * patch * patch]` and the grid
/// `[grid_t, grid_h, grid_w]` with `grid_t = ceil(T / temporal_patch)`,
/// `grid_h = H / patch`, `grid_w = W / patch`. `H` and `W` must be multiples of
/// `patch * merge`. A single image is `T = 1` (repeated `temporal_patch` times).
pub fn qwen2vl_patches(
    frames: ArrayView4<'_, f32>,
    patch: usize,
    temporal_patch: usize,
    merge: usize,
) -> Result<(Array2<f32>, [usize; 3])> {
    let (t, c, h, w) = frames.dim();
    let factor = patch.saturating_mul(merge);
    if patch == 0 || temporal_patch == 0 || merge == 0 {
        return Err(input_err(format!(
            "patch ({patch}), temporal_patch ({temporal_patch}) and merge ({merge}) must all be > 0"
        )));
    }
    if t == 0 || h % factor != 0 || w % factor != 0 || h == 0 || w == 0 {
        return Err(input_err(format!(
            "expected at least one frame with height and width multiples of patch * merge = \
             {factor}, got frames of shape [{t}, {c}, {h}, {w}]"
        )));
    }
    let grid_t = t.div_ceil(temporal_patch);
    let (gh, gw) = (h / patch, w / patch);
    let (bh_n, bw_n) = (gh / merge, gw / merge);
    let dim = c * temporal_patch * patch * patch;
    let frames = frames.as_standard_layout();
    let src = frames
        .as_slice()
        .ok_or_else(|| MlmfError::Internal("standard-layout array without a slice".into()))?;
    let rows = grid_t * gh * gw;
    let mut out = vec![0f32; rows * dim];
    out.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            // row = ((ti * bh_n + bh) * bw_n + bw) * merge^2 + mh * merge + mw
            let mm = merge * merge;
            let (block, inner) = (row / mm, row % mm);
            let (mh, mw) = (inner / merge, inner % merge);
            let (tb, bw) = (block / bw_n, block % bw_n);
            let (ti, bh) = (tb / bh_n, tb % bh_n);
            let y0 = (bh * merge + mh) * patch;
            let x0 = (bw * merge + mw) * patch;
            for ci in 0..c {
                for tt in 0..temporal_patch {
                    // Pad the last group by repeating the last frame.
                    let f = (ti * temporal_patch + tt).min(t - 1);
                    for py in 0..patch {
                        let s = ((f * c + ci) * h + y0 + py) * w + x0;
                        let d = ((ci * temporal_patch + tt) * patch + py) * patch;
                        if let (Some(d), Some(s)) =
                            (dst.get_mut(d..d + patch), src.get(s..s + patch))
                        {
                            d.copy_from_slice(s);
                        }
                    }
                }
            }
        });
    let arr = Array2::from_shape_vec((rows, dim), out)
        .map_err(|e| MlmfError::Internal(format!("patch array shape: {e}")))?;
    Ok((arr, [grid_t, gh, gw]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array4, Axis};

    fn ramp(shape: (usize, usize, usize, usize)) -> Array4<f32> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Array4::from_shape_vec(shape, (0..n).map(|i| i as f32).collect()).unwrap()
    }

    #[test]
    fn vit_patches_match_a_naive_loop() {
        let (b, c, h, w, p) = (2, 3, 8, 12, 4);
        let x = ramp((b, c, h, w));
        let out = extract_patches(x.view(), p).unwrap();
        assert_eq!(out.dim(), (b, 6, c * p * p));
        for bi in 0..b {
            for ph in 0..h / p {
                for pw in 0..w / p {
                    for ci in 0..c {
                        for py in 0..p {
                            for px in 0..p {
                                let v = out[[bi, ph * (w / p) + pw, (ci * p + py) * p + px]];
                                assert_eq!(v, x[[bi, ci, ph * p + py, pw * p + px]]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn vit_patches_refuse_indivisible_sizes() {
        let x = ramp((1, 3, 10, 12));
        let err = extract_patches(x.view(), 4).unwrap_err().to_string();
        assert!(
            err.contains("divide") && err.contains("[1, 3, 10, 12]"),
            "{err}"
        );
        assert!(extract_patches(x.view(), 0).is_err());
    }

    /// The reference's reshape + permute, written with ndarray's own axis machinery.
    fn qwen_reference(frames: &Array4<f32>, p: usize, tp: usize, m: usize) -> Array2<f32> {
        let (t, c, h, w) = frames.dim();
        let pad = (tp - t % tp) % tp;
        let mut padded = frames.clone();
        for _ in 0..pad {
            let last = padded.index_axis(Axis(0), padded.dim().0 - 1).to_owned();
            padded.push(Axis(0), last.view()).unwrap();
        }
        let tt = padded.dim().0;
        let (gt, gh, gw) = (tt / tp, h / p, w / p);
        let flat: Vec<f32> = padded.iter().copied().collect();
        // view as (gt, tp, c, gh/m, m, p, gw/m, m, p) and permute to
        // (gt, gh/m, gw/m, m, m, c, tp, p, p)
        let dims = [gt, tp, c, gh / m, m, p, gw / m, m, p];
        let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&dims), flat).unwrap();
        let perm = arr.permuted_axes(ndarray::IxDyn(&[0, 3, 6, 4, 7, 2, 1, 5, 8]));
        let data: Vec<f32> = perm.iter().copied().collect();
        Array2::from_shape_vec((gt * gh * gw, c * tp * p * p), data).unwrap()
    }

    #[test]
    fn qwen2vl_layout_matches_reshape_permute() {
        for &(t, c, h, w, p, tp, m) in &[
            (1usize, 3usize, 8usize, 12usize, 2usize, 2usize, 2usize),
            (3, 3, 8, 8, 2, 2, 2),
            (4, 2, 12, 6, 3, 2, 1),
            (5, 1, 4, 8, 2, 3, 2),
        ] {
            let x = ramp((t, c, h, w));
            let (got, grid) = qwen2vl_patches(x.view(), p, tp, m).unwrap();
            assert_eq!(grid, [t.div_ceil(tp), h / p, w / p]);
            assert_eq!(
                got,
                qwen_reference(&x, p, tp, m),
                "{t} {c} {h} {w} {p} {tp} {m}"
            );
        }
    }

    #[test]
    fn qwen2vl_refuses_bad_grids() {
        let x = ramp((2, 3, 6, 8));
        let err = qwen2vl_patches(x.view(), 2, 2, 2).unwrap_err().to_string();
        assert!(err.contains("multiples of patch * merge = 4"), "{err}");
        assert!(qwen2vl_patches(x.view(), 0, 2, 2).is_err());
        let empty = Array4::<f32>::zeros((0, 3, 4, 4));
        assert!(qwen2vl_patches(empty.view(), 2, 2, 2).is_err());
    }
}
