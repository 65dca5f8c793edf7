//! Borrowing the CPU storage of candle tensors as slices, and transposing weights.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::WeightRef;
use crate::error::{ce, Result};

/// The float32 CPU slice of a tensor's storage, when it is one, contiguous.
pub(crate) fn slice<'g>(storage: &'g Storage, layout: &Layout) -> Option<&'g [f32]> {
    if !layout.is_contiguous() {
        return None;
    }
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            v.get(start..start + layout.shape().elem_count())
        }
        _ => None,
    }
}

/// The float32, bfloat16 or float16 CPU slice of a tensor's storage, when it is one,
/// contiguous.
pub(crate) fn weight_data<'g>(storage: &'g Storage, layout: &Layout) -> Option<WeightRef<'g>> {
    if !layout.is_contiguous() {
        return None;
    }
    let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(range).map(WeightRef::F32),
        Storage::Cpu(CpuStorage::BF16(v)) => v.get(range).map(WeightRef::Bf16),
        Storage::Cpu(CpuStorage::F16(v)) => v.get(range).map(WeightRef::F16),
        _ => None,
    }
}

/// Runs `f` on the CPU data of `tensors` (`None` for a missing tensor or one that is
/// not plain float32 or 16-bit CPU memory), borrowed for the call.
pub(crate) fn with_slices<R>(
    tensors: &[Option<&Tensor>],
    f: impl FnOnce(&[Option<WeightRef<'_>>]) -> R,
) -> R {
    let guards: Vec<Option<_>> = tensors
        .iter()
        .map(|t| t.map(|t| t.storage_and_layout()))
        .collect();
    let slices: Vec<Option<WeightRef<'_>>> = guards
        .iter()
        .map(|g| g.as_ref().and_then(|(s, l)| weight_data(s, l)))
        .collect();
    f(&slices)
}

/// Whether `t` is contiguous float32, bfloat16 or float16 CPU memory.
pub(crate) fn is_plain_weight(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    weight_data(&storage, layout).is_some()
}

pub(crate) fn is_plain_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && {
        let (storage, layout) = t.storage_and_layout();
        slice(&storage, layout).is_some()
    }
}

/// `W^T` of a float32 CPU matrix `W` `[r, c]`, contiguous `[c, r]`; `None` for other
/// tensors.
pub(crate) fn transpose(w: &Tensor) -> Result<Option<Tensor>> {
    if !is_plain_f32(w) {
        return Ok(None);
    }
    let f = ce("transpose");
    let (r, c) = w.dims2().map_err(&f)?;
    let (guard, layout) = w.storage_and_layout();
    let Some(src) = slice(&guard, layout) else {
        return Ok(None);
    };
    let out = transpose_with(r, c, |i| src[i]);
    drop(guard);
    Tensor::from_vec(out, (c, r), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(f)
}

/// The transpose `[c, r]` of a little-endian float32 matrix `[r, c]` given as bytes
/// (a memory-mapped safetensors view, not necessarily aligned).
pub(crate) fn transpose_le_bytes(bytes: &[u8], r: usize, c: usize) -> Vec<f32> {
    transpose_with(r, c, |i| {
        let b = &bytes[4 * i..4 * i + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    })
}

/// `out[j * r + i] = at(i * c + j)`, tiled, in parallel over output rows.
fn transpose_with(r: usize, c: usize, at: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = Vec::with_capacity(r * c);
    // SAFETY: every element is written below before the vector is read: the chunks
    // cover the whole buffer and each fills its TILE x r block completely.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(r * c)
    };
    if r == 0 || c == 0 {
        return out;
    }
    out.par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(blk, rows)| {
            let c0 = blk * TILE;
            let nc = rows.len() / r;
            for r0 in (0..r).step_by(TILE) {
                for i in r0..(r0 + TILE).min(r) {
                    for j in 0..nc {
                        rows[j * r + i] = at(i * c + c0 + j);
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_candle() {
        let w = Tensor::from_vec(
            (0..70 * 45).map(|i| i as f32).collect::<Vec<_>>(),
            (70, 45),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mine = transpose(&w).unwrap().unwrap().to_vec2::<f32>().unwrap();
        let want = w.t().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(mine, want);
    }
}
