//! [`MultiModalModel`]: processors, encoders, fusion, cross-modal attention and the
//! content-keyed caches behind one `infer` call (docs/model.md).
//!
//! A call carries raw inputs of any subset of the model's modalities, `B` items each
//! (row `i` of every modality belongs to the same multimodal item). Per modality, each
//! item gets a [`ContentKey`]; items found in the modality's cache are not processed
//! again, and the rest are preprocessed and encoded as one batch, concurrently with
//! the other modalities. Items another call is computing right now are waited for,
//! not computed twice. The per-item encodings are then stacked (token states padded to
//! the longest item) and fused; fused rows and attention maps are cached too, keyed by
//! the items' keys and the layer settings.

mod aligned;
mod encode;
pub(crate) mod keys;
mod stats;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::adapters::Adapters;
use crate::attention::CrossModalAttention;
use crate::cache::{ByteCache, ContentKey, DiskTier, Fingerprint, Flights, Weighted};
use crate::config::{AttentionPair, FusionLevel, MultiModalConfig};
use crate::encoders::layers::ce;
use crate::encoders::{Encoder, RawInputs};
use crate::error::{MlmfError, Result};
use crate::fusion::{Fusion, ModalityInput};
use crate::modality::Modality;

pub(crate) use aligned::zero_shot_from;
pub use stats::{CallModality, CallStats, LatencySummary, ModalityStats, ModelStats};
use stats::{Latency, ModalityCounters};

pub(crate) use encode::real_lengths;
use encode::{encode_modality, given_items, stack_pooled, stack_tokens, Encoded};

/// One item's encoding, as cached: its pooled vector and its real token states.
#[derive(Debug, Clone)]
pub struct ItemEncoding {
    /// `[D']`.
    pub pooled: Tensor,
    /// `[T_i, D]`: the item's positions up to its last real one.
    pub hidden: Tensor,
    /// `[T_i]` u8, 1 for real positions.
    pub mask: Tensor,
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

impl ItemEncoding {
    /// The tensors the disk tier stores: pooled, hidden, mask.
    fn tensors(&self) -> Vec<Tensor> {
        vec![self.pooled.clone(), self.hidden.clone(), self.mask.clone()]
    }

    fn from_tensors(mut t: Vec<Tensor>) -> Option<Self> {
        if t.len() != 3 {
            return None;
        }
        let mask = t.pop()?;
        let hidden = t.pop()?;
        let pooled = t.pop()?;
        Some(Self {
            pooled,
            hidden,
            mask,
        })
    }
}

impl Weighted for ItemEncoding {
    fn bytes(&self) -> u64 {
        tensor_bytes(&self.pooled) + tensor_bytes(&self.hidden) + tensor_bytes(&self.mask)
    }
}

/// One modality's items encoded ahead of a call: content keys, encodings in item
/// order, and what encoding them did.
#[derive(Debug, Clone)]
pub(crate) struct PreEncoded {
    pub(crate) keys: Vec<ContentKey>,
    pub(crate) items: Vec<ItemEncoding>,
    pub(crate) stats: CallModality,
}

/// One cached fused row.
#[derive(Debug, Clone)]
struct FusedRow {
    /// `[out_dim]`.
    fused: Tensor,
    /// `[M]`, for strategies with per-modality weights.
    gates: Option<Tensor>,
}

impl Weighted for FusedRow {
    fn bytes(&self) -> u64 {
        tensor_bytes(&self.fused) + self.gates.as_ref().map_or(0, tensor_bytes)
    }
}

/// One cached attention map `[H, Tq_i, Tk_i]`.
#[derive(Debug, Clone)]
struct AttentionRow(Tensor);

impl Weighted for AttentionRow {
    fn bytes(&self) -> u64 {
        tensor_bytes(&self.0)
    }
}

/// What a call passes to [`MultiModalModel::infer`].
#[derive(Debug, Clone, Default)]
pub struct MultiModalInput {
    /// Raw inputs per modality; every modality carries the same number of items.
    pub inputs: BTreeMap<Modality, RawInputs>,
    /// Caller-chosen ids per modality (one per item), used as cache keys instead of the
    /// content; an id must change when its item does.
    pub ids: BTreeMap<Modality, Vec<String>>,
    /// Embeddings given directly, per modality: `[B, D]` pooled or `[B, T, D]` tokens
    /// with an optional `[B, T]` 0/1 mask. For modalities configured with `dim` (no
    /// checkpoint), and to bypass an encoder with embeddings computed elsewhere.
    pub embeddings: BTreeMap<Modality, ModalityInput>,
    /// Compute the cross-modal attention maps (and the fusion's own, for `early` and
    /// `middle`).
    pub return_attention: bool,
    /// Return every modality's token states (they are assembled anyway when the
    /// fusion or an attention map needs them).
    pub return_tokens: bool,
}

impl MultiModalInput {
    /// An input with `items` for `modality` added.
    pub fn with(mut self, items: RawInputs) -> Self {
        self.inputs.insert(keys::modality(&items), items);
        self
    }
}

/// Token states of one modality in an output.
#[derive(Debug, Clone)]
pub struct TokenStates {
    /// `[B, T, D]`, zero past each item's last real position.
    pub hidden_states: Tensor,
    /// `[B, T]` u8.
    pub mask: Tensor,
}

/// What [`MultiModalModel::infer`] returns.
#[derive(Debug, Clone)]
pub struct MultiModalOutput {
    /// Pooled embeddings `[B, D']` per modality present in the call.
    pub embeddings: BTreeMap<Modality, Tensor>,
    /// `[B, adapters.dim]` per adapted modality present in the call: the adapter's
    /// output on the fusion's input (token states are pooled by the masked mean after
    /// the adapter); empty without adapters.
    pub projected: BTreeMap<Modality, Tensor>,
    /// Token states per modality present in the call, when asked for (or needed by
    /// the fusion or an attention map); else empty.
    pub tokens: BTreeMap<Modality, TokenStates>,
    /// The fused embedding `[B, out_dim]`.
    pub fused: Tensor,
    /// `[B, M]` per-modality fusion weights (the fusion's modality order), for the
    /// strategies that have them.
    pub gates: Option<Tensor>,
    /// Attention maps `[B, H, Tq, Tk]` by name: `"text->image"` for the configured
    /// pairs, `fusion/layers.{i}...` for the fusion's own; empty unless asked for.
    pub attention: Vec<(String, Tensor)>,
    /// Modalities whose inputs were ignored because they are disabled.
    pub skipped: Vec<Modality>,
    /// With late `similarity` fusion, when the call has texts and the aligned
    /// modality: the checkpoint's logits of every text row against every row of the
    /// other modality.
    pub similarity: Option<crate::aligned::Similarity>,
    /// What this call did.
    pub stats: CallStats,
}

/// One modality of a model.
struct Slot {
    modality: Modality,
    /// `None` for a modality whose embeddings the caller gives.
    encoder: Option<Encoder>,
    /// `(pooled width, token width)`.
    widths: (usize, usize),
    enabled: AtomicBool,
    model_id: String,
    fingerprint: Fingerprint,
    cache: Option<ByteCache<ItemEncoding>>,
    /// The on-disk tier, shared by every modality (keys differ by modality).
    disk: Option<Arc<DiskTier>>,
    device: Device,
    flights: Flights<ItemEncoding>,
    counters: ModalityCounters,
}

/// A cross-modal attention layer between two modalities' token states.
struct PairLayer {
    pair: AttentionPair,
    layer: CrossModalAttention,
    fingerprint: Fingerprint,
}

struct Inner {
    config: MultiModalConfig,
    slots: Vec<Slot>,
    fusion: Fusion,
    adapters: Option<Adapters>,
    level: FusionLevel,
    fusion_fingerprint: Fingerprint,
    fusion_cache: Option<ByteCache<FusedRow>>,
    pairs: Vec<PairLayer>,
    attention_cache: Option<ByteCache<AttentionRow>>,
    disk: Option<Arc<DiskTier>>,
    calls: AtomicU64,
    fuse_latency: Latency,
    attention_latency: Latency,
    total_latency: Latency,
    /// The aligned heads late `similarity` fusion scores with (read at load).
    aligned: std::sync::OnceLock<crate::aligned::AlignedHead>,
}

/// A loaded multimodal model; cheap to clone (clones share everything, caches
/// included) and safe to call from many threads at once.
#[derive(Clone)]
pub struct MultiModalModel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MultiModalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiModalModel")
            .field("modalities", &self.modalities())
            .field("fusion", &self.inner.fusion)
            .finish_non_exhaustive()
    }
}

/// Where a modality's embeddings come from.
#[derive(Debug, Clone)]
pub(crate) enum Producer {
    /// A checkpoint's encoder, on raw inputs.
    Encoder(Encoder),
    /// Embeddings the caller computes, this wide (`modalities.<m>.dim`).
    Given(Modality, usize),
}

impl Producer {
    fn modality(&self) -> Modality {
        match self {
            Self::Encoder(e) => e.modality(),
            Self::Given(m, _) => *m,
        }
    }

    /// `(pooled width, token width)`.
    fn widths(&self) -> (usize, usize) {
        match self {
            Self::Encoder(e) => (e.model().output_dim(), e.model().hidden_size()),
            Self::Given(_, d) => (*d, *d),
        }
    }
}

/// The parts [`crate::loader::MultiModalLoader`] hands over.
pub(crate) struct Parts {
    pub config: MultiModalConfig,
    pub producers: Vec<Producer>,
    pub device: Device,
}

/// A cache that is not a modality's (fusion results, attention maps), LRU.
fn side_cache<V: Weighted + Clone + Send + Sync + 'static>(
    name: &str,
    config: &MultiModalConfig,
    budget: u64,
) -> Option<ByteCache<V>> {
    config
        .cache
        .enabled
        .then(|| ByteCache::new(name, crate::config::CachePolicy::Lru, budget))
}

impl MultiModalModel {
    /// Builds the model from loaded encoders: fusion, attention layers, caches.
    pub(crate) fn assemble(parts: Parts) -> Result<Self> {
        let Parts {
            config,
            mut producers,
            device,
        } = parts;
        producers.sort_by_key(Producer::modality);
        let fcfg = &config.fusion;
        let level = fcfg.level();
        let dims: Vec<(Modality, usize)> = producers
            .iter()
            .map(|p| {
                let (pooled, tokens) = p.widths();
                let width = match level {
                    FusionLevel::Pooled => pooled,
                    FusionLevel::Tokens => tokens,
                };
                (p.modality(), width)
            })
            .collect();
        let adapters = config
            .adapters
            .as_ref()
            .map(|a| Adapters::new(a, &dims, &device))
            .transpose()
            .map_err(|e| e.under("adapters"))?;
        // Adapted modalities reach the fusion at the adapters' width.
        let dims: Vec<(Modality, usize)> = dims
            .into_iter()
            .map(|(m, d)| match &adapters {
                Some(a) if a.covers(m) => (m, a.dim()),
                _ => (m, d),
            })
            .collect();
        let out_dim = fcfg
            .out_dim
            .unwrap_or_else(|| dims.iter().map(|d| d.1).max().unwrap_or(1));
        let fusion = Fusion::new(
            &fcfg.strategy,
            &dims,
            out_dim,
            &crate::fusion::FusionSettings {
                weights: fcfg.weights.clone(),
                seed: fcfg.seed,
                required: fcfg.required.clone(),
            },
            &device,
        )
        .map_err(|e| e.under("fusion"))?;
        let fusion_fingerprint = Fingerprint::of(&(
            &config.fusion,
            &dims,
            out_dim,
            file_identity(fcfg.weights.as_deref()),
            (
                &config.adapters,
                file_identity(config.adapters.as_ref().and_then(|a| a.weights.as_deref())),
            ),
        ))?;

        let mut pairs = Vec::new();
        let acfg = &config.cross_modal_attention;
        for (i, pair) in acfg.pairs.iter().enumerate() {
            let width = |m: Modality| {
                producers
                    .iter()
                    .find(|p| p.modality() == m)
                    .map(|p| p.widths().1)
                    .ok_or_else(|| {
                        MlmfError::config(
                            format!("cross_modal_attention.pairs.{i}"),
                            format!("`{pair}` names `{m}`, which the model does not have"),
                        )
                    })
            };
            let (dq, dk) = (width(pair.query)?, width(pair.key)?);
            let mut layer = match &acfg.weights {
                Some(dir) => {
                    let path = dir.join(format!("{}-{}.safetensors", pair.query, pair.key));
                    CrossModalAttention::load(&path, dq, dk, acfg, &device)?
                }
                None => CrossModalAttention::new(dq, dk, acfg, acfg.seed + i as u64, &device)?,
            };
            layer.query_modality = pair.query;
            layer.kv_modality = pair.key;
            let weights = acfg
                .weights
                .as_ref()
                .map(|d| d.join(format!("{}-{}.safetensors", pair.query, pair.key)));
            let fingerprint =
                Fingerprint::of(&(pair, acfg, i, dq, dk, file_identity(weights.as_deref())))?;
            pairs.push(PairLayer {
                pair: *pair,
                layer,
                fingerprint,
            });
        }

        let order: Vec<Modality> = producers.iter().map(Producer::modality).collect();
        let side_caches = if pairs.is_empty() { 1 } else { 2 };
        let (budgets, side_budget) = config.cache.split(&order, side_caches);
        let disk = match (&config.cache.disk, config.cache.enabled) {
            (Some(d), true) => Some(Arc::new(DiskTier::open(&d.path).map_err(|e| match e {
                MlmfError::Cache { message, .. } => MlmfError::config("cache.disk.path", message),
                other => other,
            })?)),
            _ => None,
        };
        let slots = producers
            .into_iter()
            .zip(budgets)
            .map(|(producer, budget)| {
                let modality = producer.modality();
                let (model_id, fingerprint) = match &producer {
                    Producer::Encoder(encoder) => {
                        let m = encoder.model();
                        let dir = std::fs::canonicalize(encoder.dir())
                            .unwrap_or_else(|_| encoder.dir().to_path_buf());
                        // Weights in another precision give other numbers: the
                        // precision is part of the id (float32 keeps its old form).
                        let dtype = match encoder.precision() {
                            crate::encoders::Precision::F32 => format!("{:?}", m.dtype()),
                            p => p.to_string(),
                        };
                        let id = format!(
                            "{}:{}:{}:{}",
                            m.model_type(),
                            dir.display(),
                            dtype,
                            config.device
                        );
                        let fp = Fingerprint::of(&(
                            encoder.processor_settings(),
                            file_identity(Some(&dir.join("config.json"))),
                        ))?;
                        (id, fp)
                    }
                    Producer::Given(_, d) => ("given".to_string(), Fingerprint::of(d)?),
                };
                let enabled = config.modalities.get(&modality).is_none_or(|c| c.enabled);
                Ok(Slot {
                    modality,
                    widths: producer.widths(),
                    encoder: match producer {
                        Producer::Encoder(e) => Some(e),
                        Producer::Given(..) => None,
                    },
                    enabled: AtomicBool::new(enabled),
                    model_id,
                    fingerprint,
                    cache: config.cache.enabled.then(|| {
                        let policy = config.cache.modality(modality).policy();
                        ByteCache::new(&modality.to_string(), policy, budget)
                    }),
                    disk: disk.clone(),
                    device: device.clone(),
                    flights: Flights::default(),
                    counters: ModalityCounters::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        Self {
            inner: Arc::new(Inner {
                fusion_cache: side_cache("fusion", &config, side_budget),
                attention_cache: if pairs.is_empty() {
                    None
                } else {
                    side_cache("attention", &config, side_budget)
                },
                config,
                slots,
                fusion,
                adapters,
                level,
                fusion_fingerprint,
                pairs,
                disk,
                calls: AtomicU64::new(0),
                fuse_latency: Latency::default(),
                attention_latency: Latency::default(),
                total_latency: Latency::default(),
                aligned: std::sync::OnceLock::new(),
            }),
        }
        .with_late_similarity()
    }

    /// The configuration the model was loaded from (checkpoint paths filled in).
    pub fn config(&self) -> &MultiModalConfig {
        &self.inner.config
    }

    /// The model's modalities, in order.
    pub fn modalities(&self) -> Vec<Modality> {
        self.inner.slots.iter().map(|s| s.modality).collect()
    }

    /// The modalities currently enabled.
    pub fn enabled_modalities(&self) -> Vec<Modality> {
        self.inner
            .slots
            .iter()
            .filter(|s| s.enabled.load(Ordering::Relaxed))
            .map(|s| s.modality)
            .collect()
    }

    fn slot(&self, m: Modality) -> Result<&Slot> {
        self.inner
            .slots
            .iter()
            .find(|s| s.modality == m)
            .ok_or_else(|| {
                MlmfError::input(
                    m,
                    format!(
                        "this model has no {m} modality (it has: {})",
                        names(&self.modalities())
                    ),
                )
            })
    }

    /// Switches a modality on or off without reloading: while off, its inputs are
    /// ignored (and listed in the output's `skipped`).
    pub fn set_enabled(&self, modality: Modality, enabled: bool) -> Result<()> {
        self.slot(modality)?
            .enabled
            .store(enabled, Ordering::Relaxed);
        Ok(())
    }

    /// The encoder of `modality` (an error for a modality whose embeddings are given).
    pub fn encoder(&self, modality: Modality) -> Result<&Encoder> {
        self.slot(modality)?.encoder.as_ref().ok_or_else(|| {
            MlmfError::input(
                modality,
                "this modality has no encoder: its embeddings are given to infer directly",
            )
        })
    }

    /// `(pooled width, token width)` of `modality`'s embeddings.
    pub fn widths(&self, modality: Modality) -> Result<(usize, usize)> {
        Ok(self.slot(modality)?.widths)
    }

    /// The fusion layer.
    pub fn fusion(&self) -> &Fusion {
        &self.inner.fusion
    }

    /// The projection adapters, when configured.
    pub fn adapters(&self) -> Option<&Adapters> {
        self.inner.adapters.as_ref()
    }

    /// The attention layer of every configured pair, in order.
    pub fn attention_layers(&self) -> Vec<(AttentionPair, &CrossModalAttention)> {
        self.inner
            .pairs
            .iter()
            .map(|p| (p.pair, &p.layer))
            .collect()
    }

    /// Encodes `items` of one modality through its cache (and the disk tier): items
    /// seen before are not encoded again. One [`ItemEncoding`] per item, in order.
    pub fn encode_items(&self, modality: Modality, items: RawInputs) -> Result<Vec<ItemEncoding>> {
        if keys::len(&items) == 0 && keys::modality(&items) == modality {
            return Ok(Vec::new());
        }
        Ok(self.encode_keyed(modality, items)?.items)
    }

    /// Which encoder output the fusion takes.
    pub fn fusion_level(&self) -> FusionLevel {
        self.inner.level
    }

    /// The configured attention pairs, and whether each layer is untrained.
    pub fn attention_pairs(&self) -> Vec<(AttentionPair, bool)> {
        self.inner
            .pairs
            .iter()
            .map(|p| (p.pair, p.layer.is_untrained()))
            .collect()
    }

    /// Drops every cached entry (statistics are kept).
    pub fn clear_cache(&self) {
        for s in &self.inner.slots {
            if let Some(c) = &s.cache {
                c.clear();
            }
        }
        if let Some(c) = &self.inner.fusion_cache {
            c.clear();
        }
        if let Some(c) = &self.inner.attention_cache {
            c.clear();
        }
    }

    /// Counters, latency percentiles and cache statistics.
    pub fn stats(&self) -> ModelStats {
        let i = &self.inner;
        let mut cached_bytes = 0;
        let modalities = i
            .slots
            .iter()
            .map(|s| {
                let cache = s.cache.as_ref().map(ByteCache::stats);
                cached_bytes += cache.as_ref().map_or(0, |c| c.bytes);
                let c = &s.counters;
                (
                    s.modality.to_string(),
                    ModalityStats {
                        dtype: s.encoder.as_ref().map(|e| e.precision().to_string()),
                        weight_bytes: s.encoder.as_ref().map_or(0, Encoder::weight_bytes),
                        enabled: s.enabled.load(Ordering::Relaxed),
                        calls: c.calls.load(Ordering::Relaxed),
                        items: c.items.load(Ordering::Relaxed),
                        encoded: c.encoded.load(Ordering::Relaxed),
                        preprocess: c.preprocess.summary(),
                        encode: c.encode.summary(),
                        cache,
                    },
                )
            })
            .collect();
        let fusion_cache = i.fusion_cache.as_ref().map(ByteCache::stats);
        let attention_cache = i.attention_cache.as_ref().map(ByteCache::stats);
        cached_bytes += fusion_cache.as_ref().map_or(0, |c| c.bytes);
        cached_bytes += attention_cache.as_ref().map_or(0, |c| c.bytes);
        let disk = i.disk.as_ref().map(|d| d.stats());
        ModelStats {
            disk,
            calls: i.calls.load(Ordering::Relaxed),
            modalities,
            fuse: i.fuse_latency.summary(),
            attention: i.attention_latency.summary(),
            total: i.total_latency.summary(),
            fusion_cache,
            attention_cache,
            cached_bytes,
        }
    }

    /// Zeroes every counter and latency window (cached entries stay).
    pub fn reset_stats(&self) {
        let i = &self.inner;
        i.calls.store(0, Ordering::Relaxed);
        for s in &i.slots {
            s.counters.reset();
            if let Some(c) = &s.cache {
                c.reset_stats();
            }
        }
        for l in [&i.fuse_latency, &i.attention_latency, &i.total_latency] {
            l.reset();
        }
        for c in [&i.fusion_cache].into_iter().flatten() {
            c.reset_stats();
        }
        if let Some(c) = &i.attention_cache {
            c.reset_stats();
        }
        if let Some(d) = &i.disk {
            d.reset_stats();
        }
    }

    /// Changes the total memory of the in-memory caches at run time (see
    /// [`CacheConfig::split_within`](crate::config::CacheConfig::split_within): when it
    /// shrinks, low-priority modalities give up memory first). Entries that no longer
    /// fit are dropped now.
    pub fn set_cache_budget(&self, total: u64) -> Result<()> {
        let i = &self.inner;
        if !i.config.cache.enabled {
            return Err(MlmfError::Cache {
                cache: "model".into(),
                message: "caching is off (cache.enabled = false)".into(),
            });
        }
        let order = self.modalities();
        let sides = 1 + usize::from(i.attention_cache.is_some());
        let (budgets, side) = i.config.cache.split_within(total, &order, sides);
        for (s, b) in i.slots.iter().zip(budgets) {
            if let Some(c) = &s.cache {
                c.set_budget(b);
            }
        }
        for c in [&i.fusion_cache].into_iter().flatten() {
            c.set_budget(side);
        }
        if let Some(c) = &i.attention_cache {
            c.set_budget(side);
        }
        Ok(())
    }

    /// Sets one modality's cache budget at run time, leaving the others as they are.
    pub fn set_modality_budget(&self, modality: Modality, bytes: u64) -> Result<()> {
        match &self.slot(modality)?.cache {
            Some(c) => {
                c.set_budget(bytes);
                Ok(())
            }
            None => Err(MlmfError::Cache {
                cache: modality.to_string(),
                message: "caching is off (cache.enabled = false)".into(),
            }),
        }
    }

    /// The budget of every in-memory cache by name (modalities, `fusion`, `attention`).
    pub fn cache_budgets(&self) -> BTreeMap<String, u64> {
        let i = &self.inner;
        let mut out: BTreeMap<String, u64> = i
            .slots
            .iter()
            .filter_map(|s| {
                s.cache
                    .as_ref()
                    .map(|c| (s.modality.to_string(), c.budget()))
            })
            .collect();
        if let Some(c) = &i.fusion_cache {
            out.insert("fusion".into(), c.budget());
        }
        if let Some(c) = &i.attention_cache {
            out.insert("attention".into(), c.budget());
        }
        out
    }

    /// The on-disk tier, when configured.
    pub fn disk_cache(&self) -> Option<&DiskTier> {
        self.inner.disk.as_deref()
    }

    /// `gates` `[B, M]` of an output as one column per modality, in the fusion's
    /// modality order.
    pub fn gate_columns(&self, gates: &Tensor) -> Result<Vec<(Modality, Vec<f32>)>> {
        let rows = gates
            .to_dtype(DType::F32)
            .and_then(|g| g.to_vec2::<f32>())
            .map_err(ce("gates"))?;
        Ok(self
            .fusion()
            .modalities()
            .iter()
            .enumerate()
            .map(|(j, (m, _))| (*m, rows.iter().map(|row| row[j]).collect()))
            .collect())
    }

    /// Encodes `items` of one modality through its cache, as [`Self::encode_items`],
    /// and returns their content keys (what [`Self::infer_encoded`] takes) and what the
    /// call did.
    pub(crate) fn encode_keyed(&self, modality: Modality, items: RawInputs) -> Result<PreEncoded> {
        if keys::modality(&items) != modality {
            return Err(MlmfError::input(
                modality,
                format!("given {} inputs", keys::modality(&items)),
            ));
        }
        let slot = self.slot(modality)?;
        let e = encode_modality(slot, items, None)?;
        Ok(PreEncoded {
            keys: e.keys,
            items: e.items,
            stats: e.stats,
        })
    }

    /// Runs the whole pipeline on `input`; see the module docs.
    pub fn infer(&self, input: MultiModalInput) -> Result<MultiModalOutput> {
        self.infer_encoded(input, BTreeMap::new())
    }

    /// [`Self::infer`], with the modalities in `pre` already encoded (the server's
    /// batchers encode many calls' items together): their raw inputs are checked as
    /// usual but not encoded again.
    pub(crate) fn infer_encoded(
        &self,
        input: MultiModalInput,
        pre: BTreeMap<Modality, PreEncoded>,
    ) -> Result<MultiModalOutput> {
        let start = Instant::now();
        let MultiModalInput {
            inputs,
            mut ids,
            embeddings: given,
            return_attention,
            return_tokens,
        } = input;
        // Check the call's shape before any work.
        let mut skipped = Vec::new();
        let mut work: Vec<(&Slot, RawInputs, Option<Vec<String>>)> = Vec::new();
        let mut done: Vec<Encoded> = Vec::new();
        let mut batch: Option<(usize, Modality)> = None;
        for (m, items) in inputs {
            if keys::modality(&items) != m {
                return Err(MlmfError::input(
                    m,
                    format!("given {} inputs", keys::modality(&items)),
                ));
            }
            let slot = self.slot(m)?;
            let n = keys::len(&items);
            if n == 0 {
                return Err(MlmfError::input(
                    m,
                    "expected at least one item, got an empty batch",
                ));
            }
            same_batch(&mut batch, m, n)?;
            let item_ids = ids.remove(&m);
            if let Some(v) = &item_ids {
                if v.len() != n {
                    return Err(MlmfError::input(
                        m,
                        format!("{} ids for {n} items: expected one id per item", v.len()),
                    ));
                }
            }
            if !slot.enabled.load(Ordering::Relaxed) {
                skipped.push(m);
                continue;
            }
            work.push((slot, items, item_ids));
        }
        let mut given_work: Vec<(&Slot, ModalityInput)> = Vec::new();
        for (m, emb) in given {
            let slot = self.slot(m)?;
            if work.iter().any(|(s, _, _)| s.modality == m) || skipped.contains(&m) {
                return Err(MlmfError::input(
                    m,
                    "given both as raw inputs and as embeddings: pass one",
                ));
            }
            let n = emb.states.dims().first().copied().unwrap_or(0);
            same_batch(&mut batch, m, n)?;
            if !slot.enabled.load(Ordering::Relaxed) {
                skipped.push(m);
                continue;
            }
            given_work.push((slot, emb));
        }
        if let Some(m) = ids.keys().next() {
            return Err(MlmfError::input(
                *m,
                "ids were given for a modality with no raw inputs",
            ));
        }
        for (m, p) in pre {
            let slot = self.slot(m)?;
            let n = p.items.len();
            if n == 0 || p.keys.len() != n {
                return Err(MlmfError::input(
                    m,
                    "expected at least one item, got an empty batch",
                ));
            }
            if work.iter().any(|(s, _, _)| s.modality == m)
                || given_work.iter().any(|(s, _)| s.modality == m)
            {
                return Err(MlmfError::input(m, "given twice in one call: pass it once"));
            }
            same_batch(&mut batch, m, n)?;
            if !slot.enabled.load(Ordering::Relaxed) {
                skipped.push(m);
                continue;
            }
            done.push(Encoded {
                modality: m,
                keys: p.keys,
                items: p.items,
                stats: p.stats,
            });
        }
        if work.is_empty() && given_work.is_empty() && done.is_empty() {
            let modality = skipped
                .first()
                .copied()
                .unwrap_or_else(|| self.inner.slots[0].modality);
            return Err(MlmfError::MissingModality {
                modality,
                message: if skipped.is_empty() {
                    format!(
                        "no inputs were given; the model takes {}",
                        names(&self.modalities())
                    )
                } else {
                    format!(
                        "every modality given is disabled ({}); enable one with set_enabled",
                        names(&skipped)
                    )
                },
            });
        }
        self.inner.calls.fetch_add(1, Ordering::Relaxed);

        // Encode every modality, concurrently when there are several.
        let results: Vec<Result<Encoded>> = if work.is_empty() {
            Vec::new()
        } else if work.len() == 1 {
            let (slot, items, ids) = work
                .pop()
                .ok_or_else(|| MlmfError::Internal("no work".into()))?;
            vec![encode_modality(slot, items, ids)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = work
                    .into_iter()
                    .map(|(slot, items, ids)| {
                        s.spawn(move || {
                            crate::error::catch_panic("encoding panicked", || {
                                encode_modality(slot, items, ids)
                            })
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(MlmfError::Internal("an encoding thread panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        let mut encoded: Vec<Encoded> = results.into_iter().collect::<Result<_>>()?;
        encoded.append(&mut done);
        for (slot, emb) in given_work {
            encoded.push(given_items(slot, emb)?);
        }

        let mut stats = CallStats::default();
        let mut embeddings = BTreeMap::new();
        let mut tokens: BTreeMap<Modality, TokenStates> = BTreeMap::new();
        let mut row_keys: BTreeMap<Modality, Vec<ContentKey>> = BTreeMap::new();
        let keep_tokens = return_tokens
            || self.inner.level == FusionLevel::Tokens
            || (return_attention && !self.inner.pairs.is_empty());
        // X-CLIP's scores read the video's token states too.
        let need_tokens = keep_tokens || self.inner.aligned.get().is_some_and(|h| h.needs_tokens());
        for e in encoded {
            stats
                .modalities
                .insert(e.modality.to_string(), e.stats.clone());
            embeddings.insert(e.modality, stack_pooled(&e.items)?);
            if need_tokens {
                tokens.insert(e.modality, stack_tokens(&e.items)?);
            }
            row_keys.insert(e.modality, e.keys);
        }

        let t = Instant::now();
        let inputs = self.fusion_inputs(&embeddings, &tokens)?;
        let projected = self.projected(&inputs)?;
        let (fused, gates, fusion_cached, mut attention) =
            self.fuse(inputs, &row_keys, return_attention)?;
        let fuse_time = t.elapsed();
        self.inner.fuse_latency.record(fuse_time);
        stats.fuse_ms = ms(fuse_time);
        stats.fusion_cached = fusion_cached;

        if return_attention && !self.inner.pairs.is_empty() {
            let t = Instant::now();
            let mut maps = self.pair_attention(&tokens, &row_keys)?;
            maps.append(&mut attention);
            attention = maps;
            let took = t.elapsed();
            self.inner.attention_latency.record(took);
            stats.attention_ms = ms(took);
        }
        let similarity = self.late_similarity(&embeddings, &tokens)?;
        if !keep_tokens {
            tokens.clear();
        }
        let total = start.elapsed();
        self.inner.total_latency.record(total);
        stats.total_ms = ms(total);
        Ok(MultiModalOutput {
            embeddings,
            projected,
            tokens,
            fused,
            gates,
            attention,
            skipped,
            similarity,
            stats,
        })
    }

    /// What the fusion takes, per modality present: pooled embeddings or token states
    /// with their masks, through the adapters where configured.
    fn fusion_inputs(
        &self,
        embeddings: &BTreeMap<Modality, Tensor>,
        tokens: &BTreeMap<Modality, TokenStates>,
    ) -> Result<Vec<(Modality, ModalityInput)>> {
        let adapt = |m: Modality, x: &Tensor| match &self.inner.adapters {
            Some(a) => a.forward(m, x),
            None => Ok(x.clone()),
        };
        match self.inner.level {
            FusionLevel::Pooled => embeddings
                .iter()
                .map(|(m, t)| Ok((*m, ModalityInput::pooled(adapt(*m, t)?))))
                .collect(),
            FusionLevel::Tokens => tokens
                .iter()
                .map(|(m, t)| {
                    Ok((
                        *m,
                        ModalityInput::tokens(adapt(*m, &t.hidden_states)?, Some(t.mask.clone())),
                    ))
                })
                .collect(),
        }
    }

    /// The adapted modalities' fusion inputs as one vector per row `[B, dim]`.
    fn projected(
        &self,
        inputs: &[(Modality, ModalityInput)],
    ) -> Result<BTreeMap<Modality, Tensor>> {
        let Some(a) = &self.inner.adapters else {
            return Ok(BTreeMap::new());
        };
        inputs
            .iter()
            .filter(|(m, _)| a.covers(*m))
            .map(|(m, x)| {
                // Float32 as the fusion reads them (16-bit encoders' states are not).
                let states = x
                    .states
                    .to_dtype(DType::F32)
                    .map_err(ce("projected embeddings"))?;
                let v = match &x.mask {
                    None if states.rank() == 2 => states,
                    mask => {
                        let mask = mask
                            .as_ref()
                            .map(|k| k.to_dtype(DType::F32))
                            .transpose()
                            .map_err(ce("projected embeddings"))?;
                        crate::fusion::masked_mean(&states, mask.as_ref())?
                    }
                };
                Ok((*m, v))
            })
            .collect()
    }

    /// The fused rows: from the fusion cache when every row is there, else one fusion
    /// call over the batch (whose rows are then cached).
    #[allow(clippy::type_complexity)]
    fn fuse(
        &self,
        inputs: Vec<(Modality, ModalityInput)>,
        row_keys: &BTreeMap<Modality, Vec<ContentKey>>,
        return_attention: bool,
    ) -> Result<(Tensor, Option<Tensor>, bool, Vec<(String, Tensor)>)> {
        let i = &self.inner;
        let rows = row_keys.values().next().map_or(0, Vec::len);
        let fusion_keys: Vec<ContentKey> = (0..rows)
            .map(|r| {
                let per: Vec<ContentKey> = i
                    .fusion
                    .modalities()
                    .iter()
                    .map(|(m, _)| row_keys.get(m).map_or(ContentKey([0; 32]), |k| k[r]))
                    .collect();
                ContentKey::combine(&per, &i.fusion_fingerprint)
            })
            .collect();
        // The fusion's own attention maps are not cached: a call asking for them runs it.
        let fusion_attends = matches!(
            i.fusion.strategy(),
            crate::config::FusionStrategy::Early(_) | crate::config::FusionStrategy::Middle(_)
        );
        if let Some(cache) = i
            .fusion_cache
            .as_ref()
            .filter(|_| !(return_attention && fusion_attends))
        {
            // Every row is looked up (and counted), then used only if all are there.
            let looked: Vec<Option<FusedRow>> = fusion_keys.iter().map(|k| cache.get(k)).collect();
            if let Some(hits) = looked.into_iter().collect::<Option<Vec<_>>>() {
                let fused =
                    Tensor::stack(&hits.iter().map(|h| h.fused.clone()).collect::<Vec<_>>(), 0)
                        .map_err(ce("fused rows"))?;
                let gates = hits
                    .iter()
                    .map(|h| h.gates.clone())
                    .collect::<Option<Vec<_>>>()
                    .map(|g| Tensor::stack(&g, 0))
                    .transpose()
                    .map_err(ce("gate rows"))?;
                return Ok((fused, gates, true, Vec::new()));
            }
        }
        let out = i.fusion.forward(&inputs, return_attention)?;
        if let Some(cache) = &i.fusion_cache {
            for (r, key) in fusion_keys.into_iter().enumerate() {
                let f = ce("caching fused rows");
                let row = FusedRow {
                    fused: out.fused.get(r).and_then(|t| t.copy()).map_err(&f)?,
                    gates: out
                        .gates
                        .as_ref()
                        .map(|g| g.get(r).and_then(|t| t.copy()))
                        .transpose()
                        .map_err(&f)?,
                };
                cache.insert(key, row);
            }
        }
        let attention = out
            .attention
            .into_iter()
            .map(|(name, t)| (format!("fusion/{name}"), t))
            .collect();
        Ok((out.fused, out.gates, false, attention))
    }

    /// The configured attention maps between the modalities present.
    fn pair_attention(
        &self,
        tokens: &BTreeMap<Modality, TokenStates>,
        row_keys: &BTreeMap<Modality, Vec<ContentKey>>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.inner.pairs {
            let (Some(q), Some(k)) = (tokens.get(&p.pair.query), tokens.get(&p.pair.key)) else {
                continue;
            };
            let (qk, kk) = (&row_keys[&p.pair.query], &row_keys[&p.pair.key]);
            let keys: Vec<ContentKey> = qk
                .iter()
                .zip(kk)
                .map(|(a, b)| ContentKey::combine(&[*a, *b], &p.fingerprint))
                .collect();
            let f = ce("attention maps");
            let (_, tq) = q.mask.dims2().map_err(&f)?;
            let (_, tk) = k.mask.dims2().map_err(&f)?;
            if let Some(cache) = &self.inner.attention_cache {
                let looked: Vec<Option<AttentionRow>> = keys.iter().map(|k| cache.get(k)).collect();
                if let Some(hits) = looked.into_iter().collect::<Option<Vec<_>>>() {
                    let rows = hits
                        .iter()
                        .map(|h| {
                            let (_, a, b) = h.0.dims3()?;
                            h.0.pad_with_zeros(1, 0, tq - a)?
                                .pad_with_zeros(2, 0, tk - b)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()
                        .map_err(&f)?;
                    out.push((p.pair.to_string(), Tensor::stack(&rows, 0).map_err(&f)?));
                    continue;
                }
            }
            let res = p.layer.forward(
                &q.hidden_states,
                &k.hidden_states,
                Some(&q.mask),
                Some(&k.mask),
                true,
            )?;
            let weights = res
                .weights
                .ok_or_else(|| MlmfError::Internal("attention weights missing".into()))?;
            if let Some(cache) = &self.inner.attention_cache {
                let ql = real_lengths(&q.mask)?;
                let kl = real_lengths(&k.mask)?;
                for (r, key) in keys.into_iter().enumerate() {
                    let row = weights
                        .get(r)
                        .and_then(|w| w.narrow(1, 0, ql[r]))
                        .and_then(|w| w.narrow(2, 0, kl[r]))
                        .and_then(|w| w.copy())
                        .map_err(&f)?;
                    cache.insert(key, AttentionRow(row));
                }
            }
            out.push((p.pair.to_string(), weights));
        }
        Ok(out)
    }
}

/// Checks that modality `m` carries as many items (`n`) as the modalities before it.
fn same_batch(batch: &mut Option<(usize, Modality)>, m: Modality, n: usize) -> Result<()> {
    match *batch {
        Some((b, m0)) if b != n => Err(MlmfError::input(
            m,
            format!("{n} items, but {m0} has {b}: every modality of a call needs one item per row"),
        )),
        Some(_) => Ok(()),
        None => {
            *batch = Some((n, m));
            Ok(())
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn names(ms: &[Modality]) -> String {
    ms.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A file's length and modification time, so that replacing it changes the keys
/// derived from its settings.
fn file_identity(path: Option<&std::path::Path>) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path?).ok()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some((meta.len(), mtime))
}

#[cfg(test)]
mod tests;
