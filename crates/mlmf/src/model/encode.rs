//! Per-modality encoding through the caches: content keys, cache and disk-tier
//! lookups, single flight, one preprocess + encode batch for the items nobody has,
//! and the per-item split and re-stacking of encoder outputs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{keys, ms, CallModality, ItemEncoding, Slot, TokenStates};
use crate::cache::ContentKey;
use crate::encoders::layers::ce;
use crate::encoders::{EncoderOutput, RawInputs};
use crate::error::{MlmfError, Result};
use crate::fusion::ModalityInput;
use crate::modality::Modality;

/// One modality's per-item encodings in call order.
pub(super) struct Encoded {
    pub(super) modality: Modality,
    pub(super) keys: Vec<ContentKey>,
    pub(super) items: Vec<ItemEncoding>,
    pub(super) stats: CallModality,
}

/// Embeddings a call gives directly, checked and split into items; keyed by their
/// bytes (for the fusion and attention caches).
pub(super) fn given_items(slot: &Slot, emb: ModalityInput) -> Result<Encoded> {
    let m = slot.modality;
    let f = ce("given embeddings");
    let states = emb
        .states
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(&slot.device))
        .and_then(|t| t.contiguous())
        .map_err(&f)?;
    let (pooled_width, token_width) = slot.widths;
    let dims = states.dims().to_vec();
    let (b, t, width, want) = match dims[..] {
        [b, d] => (b, 1, d, pooled_width),
        [b, t, d] => (b, t, d, token_width),
        _ => {
            return Err(MlmfError::input(
                m,
                format!("expected embeddings [B, D] or [B, T, D], got shape {dims:?}"),
            ))
        }
    };
    if b == 0 || t == 0 {
        return Err(MlmfError::input(
            m,
            format!("expected at least one item and one token, got shape {dims:?}"),
        ));
    }
    if width != want {
        return Err(MlmfError::input(
            m,
            format!("expected embeddings {want} wide, got shape {dims:?}"),
        ));
    }
    let values = states
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(&f)?;
    if let Some(p) = values.iter().position(|v| !v.is_finite()) {
        return Err(
            MlmfError::input(m, "embeddings contain NaN or infinity").at_index(p / (t * width))
        );
    }
    let out = if dims.len() == 2 {
        EncoderOutput {
            hidden_states: states.unsqueeze(1).map_err(&f)?,
            mask: Tensor::ones((b, 1), DType::U8, &slot.device).map_err(&f)?,
            pooled: states,
        }
    } else {
        let mask = match &emb.mask {
            // The mask comes from the host; the states are on the model's device.
            Some(mk) => crate::attention::check_mask(mk, b, t, "mask: ", m)?
                .to_device(&slot.device)
                .map_err(&f)?,
            None => Tensor::ones((b, t), DType::F32, &slot.device).map_err(&f)?,
        };
        EncoderOutput {
            pooled: crate::encoders::layers::masked_mean(&states, &mask)?,
            mask: mask.to_dtype(DType::U8).map_err(&f)?,
            hidden_states: states,
        }
    };
    let items = split_items(&out)?;
    let space = keys::KeySpace {
        modality: m,
        model_id: &slot.model_id,
        fingerprint: &slot.fingerprint,
    };
    let row = t * width;
    let keys = items
        .iter()
        .enumerate()
        .map(|(r, e)| {
            let mask: Vec<u8> = e.mask.to_vec1::<u8>().map_err(&f)?;
            Ok(space.given(
                &dims[1..],
                bytemuck::cast_slice(&values[r * row..(r + 1) * row]),
                &mask,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let c = &slot.counters;
    c.calls.fetch_add(1, Ordering::Relaxed);
    c.items.fetch_add(b as u64, Ordering::Relaxed);
    Ok(Encoded {
        modality: m,
        keys,
        items,
        stats: CallModality {
            items: b,
            ..CallModality::default()
        },
    })
}

/// Keys, cache lookups, single flight, then one preprocess + encode batch of the
/// items nobody has.
pub(super) fn encode_modality(
    slot: &Slot,
    mut items: RawInputs,
    ids: Option<Vec<String>>,
) -> Result<Encoded> {
    let m = slot.modality;
    let n = keys::len(&items);
    let c = &slot.counters;
    c.calls.fetch_add(1, Ordering::Relaxed);
    c.items.fetch_add(n as u64, Ordering::Relaxed);
    let space = keys::KeySpace {
        modality: m,
        model_id: &slot.model_id,
        fingerprint: &slot.fingerprint,
    };
    let content = keys::content_keys(&space, &mut items)?;
    let keys: Vec<ContentKey> = match ids {
        Some(ids) => ids.iter().map(|id| space.id(id)).collect(),
        None => content,
    };
    let mut stats = CallModality {
        items: n,
        ..CallModality::default()
    };
    let mut found: Vec<Option<ItemEncoding>> = vec![None; n];

    let Some(cache) = &slot.cache else {
        let (encs, pre, enc) = run_encoder(slot, &items, None)?;
        stats.encoded = n;
        stats.preprocess_ms = ms(pre);
        stats.encode_ms = ms(enc);
        return Ok(Encoded {
            modality: m,
            keys,
            items: encs,
            stats,
        });
    };

    // Distinct keys in first-seen order, and where each item's key sits among them.
    let mut distinct: Vec<ContentKey> = Vec::new();
    let mut slot_of: Vec<usize> = Vec::with_capacity(n);
    let mut first_item: Vec<usize> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match distinct.iter().position(|d| d == k) {
            Some(j) => slot_of.push(j),
            None => {
                slot_of.push(distinct.len());
                distinct.push(*k);
                first_item.push(i);
            }
        }
    }
    let mut values: Vec<Option<ItemEncoding>> = distinct.iter().map(|k| cache.get(k)).collect();
    let missing: Vec<usize> = (0..distinct.len())
        .filter(|&j| values[j].is_none())
        .collect();
    stats.hits = n - slot_of.iter().filter(|&&j| values[j].is_none()).count();
    if !missing.is_empty() {
        let missing_keys: Vec<ContentKey> = missing.iter().map(|&j| distinct[j]).collect();
        let claim = slot.flights.claim(&missing_keys);
        // A call that finished between the lookup and the claim left its result in
        // the cache: take it instead of computing again.
        let mut todo: Vec<usize> = Vec::new();
        for p in claim.leader.positions() {
            let j = missing[p];
            match cache.peek(&distinct[j]) {
                Some(v) => values[j] = Some(v),
                None => todo.push(p),
            }
        }
        if let Some(disk) = slot.disk.as_ref().filter(|_| !todo.is_empty()) {
            let keys: Vec<ContentKey> = todo.iter().map(|&p| missing_keys[p]).collect();
            let found = disk.get_many(&keys, &slot.device);
            let mut rest = Vec::new();
            for (&p, f) in todo.iter().zip(found) {
                match f.and_then(ItemEncoding::from_tensors) {
                    Some(e) => {
                        cache.insert(missing_keys[p], e.clone());
                        values[missing[p]] = Some(e);
                        stats.disk_hits += slot_of.iter().filter(|&&s| s == missing[p]).count();
                    }
                    None => rest.push(p),
                }
            }
            todo = rest;
        }
        if !todo.is_empty() {
            let positions: Vec<usize> = todo.iter().map(|&p| first_item[missing[p]]).collect();
            match run_encoder(slot, &items, Some(&positions)) {
                Ok((encs, pre, enc)) => {
                    stats.encoded = todo.len();
                    stats.preprocess_ms = ms(pre);
                    stats.encode_ms = ms(enc);
                    if let Some(disk) = &slot.disk {
                        let entries: Vec<(ContentKey, Vec<Tensor>)> = todo
                            .iter()
                            .zip(&encs)
                            .map(|(&p, e)| (missing_keys[p], e.tensors()))
                            .collect();
                        // A failed write costs only the disk copy (counted in its
                        // stats); the call goes on from memory.
                        let _ = disk.put_many(&entries);
                    }
                    for (&p, e) in todo.iter().zip(&encs) {
                        cache.insert(missing_keys[p], e.clone());
                        values[missing[p]] = Some(e.clone());
                    }
                    let led = &values;
                    claim.leader.finish(|p| {
                        led[missing[p]]
                            .clone()
                            .ok_or_else(|| MlmfError::Internal("a led item has no value".into()))
                    });
                }
                Err(e) => {
                    claim.leader.fail(&e);
                    return Err(e);
                }
            }
        } else {
            let led = &values;
            claim.leader.finish(|p| {
                led[missing[p]]
                    .clone()
                    .ok_or_else(|| MlmfError::Internal("a led item has no value".into()))
            });
        }
        for (p, flight) in claim.waits {
            let j = missing[p];
            values[j] = Some(flight.wait()?);
            stats.shared += slot_of.iter().filter(|&&s| s == j).count();
        }
    }
    for (i, j) in slot_of.iter().enumerate() {
        found[i] = values[*j].clone();
    }
    let items = found
        .into_iter()
        .map(|v| v.ok_or_else(|| MlmfError::Internal(format!("{m} item without a value"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Encoded {
        modality: m,
        keys,
        items,
        stats,
    })
}

/// Preprocesses and encodes the items at `positions` (all when `None`); returns their
/// encodings and the two stage times.
pub(super) fn run_encoder(
    slot: &Slot,
    items: &RawInputs,
    positions: Option<&[usize]>,
) -> Result<(Vec<ItemEncoding>, Duration, Duration)> {
    let n = keys::len(items);
    let selected;
    let batch = match positions {
        Some(p) if p.len() != n || p.iter().enumerate().any(|(i, &q)| i != q) => {
            selected = keys::select(items, p);
            &selected
        }
        _ => items,
    };
    // Point an item error at the item's index in the call, not in the sub-batch.
    let at = |mut e: MlmfError| {
        if let (
            MlmfError::Input { index, .. }
            | MlmfError::Decode { index, .. }
            | MlmfError::Io { index, .. },
            Some(p),
        ) = (&mut e, positions)
        {
            if let Some(i) = index.as_mut() {
                if let Some(&q) = p.get(*i) {
                    *i = q;
                }
            }
        }
        e
    };
    let c = &slot.counters;
    let t = Instant::now();
    let encoder = slot.encoder.as_ref().ok_or_else(|| {
        MlmfError::input(
            slot.modality,
            "this modality has no encoder: pass its embeddings (`embeddings=` / `**custom`)",
        )
    })?;
    let pre = encoder.preprocess(batch).map_err(at)?;
    let t_pre = t.elapsed();
    c.preprocess.record(t_pre);
    let t = Instant::now();
    let out = on_device(encoder.encode_preprocessed(&pre).map_err(at)?, &slot.device)?;
    let encs = split_items(&out)?;
    let t_enc = t.elapsed();
    c.encode.record(t_enc);
    c.encoded.fetch_add(encs.len() as u64, Ordering::Relaxed);
    Ok((encs, t_pre, t_enc))
}

/// `out` on the model's device: an encoder registered from Python returns host
/// tensors, and the fusion, attention and cached items live on the model's device.
fn on_device(out: EncoderOutput, device: &Device) -> Result<EncoderOutput> {
    if out.pooled.device().same_device(device) {
        return Ok(out);
    }
    let f = ce("encoder output to the model's device");
    Ok(EncoderOutput {
        pooled: out.pooled.to_device(device).map_err(&f)?,
        hidden_states: out.hidden_states.to_device(device).map_err(&f)?,
        mask: out.mask.to_device(device).map_err(&f)?,
    })
}

/// Per row: the position after the last real one (at least 1).
pub(crate) fn real_lengths(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask
        .to_dtype(DType::U8)
        .and_then(|m| m.to_vec2::<u8>())
        .map_err(ce("mask"))?;
    Ok(rows
        .iter()
        .map(|r| r.iter().rposition(|&v| v != 0).map_or(1, |p| p + 1))
        .collect())
}

/// A batch output as per-item encodings with their own storage.
pub(super) fn split_items(out: &EncoderOutput) -> Result<Vec<ItemEncoding>> {
    let f = ce("splitting a batch into items");
    let lengths = real_lengths(&out.mask)?;
    let mask = out.mask.to_dtype(DType::U8).map_err(&f)?;
    lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            Ok(ItemEncoding {
                pooled: out.pooled.get(r).and_then(|t| t.copy()).map_err(&f)?,
                hidden: out
                    .hidden_states
                    .get(r)
                    .and_then(|t| t.narrow(0, 0, len))
                    .and_then(|t| t.copy())
                    .map_err(&f)?,
                mask: mask
                    .get(r)
                    .and_then(|t| t.narrow(0, 0, len))
                    .and_then(|t| t.copy())
                    .map_err(&f)?,
            })
        })
        .collect()
}

/// Pooled vectors of items back into a batch `[B, D']`.
pub(super) fn stack_pooled(items: &[ItemEncoding]) -> Result<Tensor> {
    Tensor::stack(
        &items.iter().map(|e| e.pooled.clone()).collect::<Vec<_>>(),
        0,
    )
    .map_err(ce("stacking items"))
}

/// Token states of items back into a batch, padded with zeros to the longest.
pub(super) fn stack_tokens(items: &[ItemEncoding]) -> Result<TokenStates> {
    let f = ce("stacking items");
    let lengths = items
        .iter()
        .map(|e| e.mask.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(&f)?;
    let longest = lengths.iter().copied().max().unwrap_or(1);
    let pad = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        if n == longest {
            Ok(t.clone())
        } else {
            t.pad_with_zeros(0, 0, longest - n)
        }
    };
    let mut hidden = Vec::with_capacity(items.len());
    let mut masks = Vec::with_capacity(items.len());
    for (e, &n) in items.iter().zip(&lengths) {
        hidden.push(pad(&e.hidden, n).map_err(&f)?);
        masks.push(pad(&e.mask, n).map_err(&f)?);
    }
    Ok(TokenStates {
        hidden_states: Tensor::stack(&hidden, 0).map_err(&f)?,
        mask: Tensor::stack(&masks, 0).map_err(&f)?,
    })
}
