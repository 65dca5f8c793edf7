//! Checking an [`EncoderInput`] against what an encoder takes and turning it into
//! tensors: token batches, pixels, masks. Errors are [`MlmfError::Input`] naming the
//! modality, the row where it is known, and what was expected.

use std::fmt;

use candle_core::{DType, Device, Tensor};

use crate::encoders::layers::{ce, Placement};
use crate::encoders::EncoderInput;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::text::TextBatch;

/// The error for an input of the wrong kind or shape.
pub(crate) fn wrong_input(
    modality: Modality,
    expected: impl fmt::Display,
    got: &EncoderInput,
) -> MlmfError {
    MlmfError::input(
        modality,
        format!("expected {expected}, got {}", got.describe()),
    )
}

/// The frames of a native video model's input: `[B >= 1, frames, c, size, size]`
/// (the checkpoint's clip length, channels and image size), or the error naming it.
pub(crate) fn clip_frames(
    input: &EncoderInput,
    frames: usize,
    c: usize,
    size: usize,
) -> Result<&ndarray::Array5<f32>> {
    let expected = format!(
        "video frames [B >= 1, {frames}, {c}, {size}, {size}] (the checkpoint's num_frames, \
         num_channels and image_size)"
    );
    let EncoderInput::Video(px) = input else {
        return Err(wrong_input(Modality::Video, &expected, input));
    };
    let shape = px.shape();
    if shape[0] == 0 || shape[1..] != [frames, c, size, size] {
        return Err(MlmfError::input(
            Modality::Video,
            format!("expected {expected}, got {shape:?}"),
        ));
    }
    Ok(px)
}

/// A `[B, T]` u8 mask tensor from rows of 0/1 values.
pub(crate) fn mask_tensor(
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(data, (rows, cols), device).map_err(ce("mask"))
}

/// A `[B, T]` all-ones u8 mask.
pub(crate) fn full_mask(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    Tensor::ones((rows, cols), DType::U8, device).map_err(ce("mask"))
}

/// Checks every id is below `limit`; the error names the batch row.
pub(crate) fn check_ids(ids: &ndarray::Array2<i64>, limit: usize, what: &str) -> Result<()> {
    for (row, r) in ids.outer_iter().enumerate() {
        if let Some(&bad) = r.iter().find(|&&v| v < 0 || v as u64 >= limit as u64) {
            return Err(MlmfError::Input {
                modality: Modality::Text,
                index: Some(row),
                message: format!("{what} {bad} is out of range: expected 0..{limit}"),
            });
        }
    }
    Ok(())
}

/// The checked `[B, T]` token batch of a text encoder: non-empty, at most
/// `max_positions` long, ids below `vocab`.
pub(crate) fn text_batch(
    input: &EncoderInput,
    vocab: usize,
    max_positions: usize,
) -> Result<&TextBatch> {
    let EncoderInput::Text(batch) = input else {
        return Err(wrong_input(Modality::Text, "text token ids", input));
    };
    let (b, t) = batch.input_ids.dim();
    if b == 0 || t == 0 {
        return Err(MlmfError::input(
            Modality::Text,
            format!("expected a non-empty batch of token ids, got shape [{b}, {t}]"),
        ));
    }
    if t > max_positions {
        return Err(MlmfError::input(
            Modality::Text,
            format!("expected at most max_position_embeddings = {max_positions} tokens, got {t}"),
        ));
    }
    check_ids(&batch.input_ids, vocab, "token id")?;
    Ok(batch)
}

/// The batch's attention mask as a u8 tensor (all ones when absent or misshapen).
pub(crate) fn text_mask(batch: &TextBatch, device: &Device) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dim();
    let rows: Vec<u8> = if batch.attention_mask.dim() == (b, t) {
        batch
            .attention_mask
            .iter()
            .map(|&v| u8::from(v != 0))
            .collect()
    } else {
        vec![1; b * t]
    };
    mask_tensor(b, t, rows, device)
}

/// Checks pixels are `[B, channels, size, size]` with `B >= 1`; returns them as a tensor.
pub(crate) fn pixels_tensor(
    input: &EncoderInput,
    channels: usize,
    size: usize,
    place: &Placement,
    modality: Modality,
) -> Result<Tensor> {
    let EncoderInput::Image(px) = input else {
        return Err(wrong_input(
            modality,
            format!("image pixels [B, {channels}, {size}, {size}]"),
            input,
        ));
    };
    let shape = px.shape();
    if shape[0] == 0 || shape[1] != channels || shape[2] != size || shape[3] != size {
        return Err(MlmfError::input(
            modality,
            format!(
                "expected pixel values shaped [B >= 1, {channels}, {size}, {size}] (the \
                 checkpoint's image_size), got {shape:?}"
            ),
        ));
    }
    let data: Vec<f32> = px.iter().copied().collect();
    Tensor::from_vec(data, shape, &place.device)
        .and_then(|t| t.to_dtype(place.dtype))
        .map_err(ce("pixels"))
}
