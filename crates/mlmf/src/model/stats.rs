//! Model statistics: calls and items per modality, latency percentiles per stage, and
//! the caches' counters.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::cache::{CacheStats, DiskStats};

/// How many recent samples a latency window keeps.
const WINDOW: usize = 4096;

/// Recent latencies of one stage.
#[derive(Default)]
pub(crate) struct Latency {
    samples: Mutex<VecDeque<f64>>,
    count: AtomicU64,
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == WINDOW {
            s.pop_front();
        }
        s.push_back(ms);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.count.store(0, Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        let mut v: Vec<f64> = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        LatencySummary {
            count: self.count.load(Ordering::Relaxed),
            mean_ms: if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// Latency of one stage over the recent window (at most 4096 samples); `count` is
/// every sample since the last reset.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Counters of one modality.
#[derive(Default)]
pub(crate) struct ModalityCounters {
    pub calls: AtomicU64,
    pub items: AtomicU64,
    /// Items computed by this model (not served from the cache or another call).
    pub encoded: AtomicU64,
    pub preprocess: Latency,
    pub encode: Latency,
}

impl ModalityCounters {
    pub fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.items.store(0, Ordering::Relaxed);
        self.encoded.store(0, Ordering::Relaxed);
        self.preprocess.reset();
        self.encode.reset();
    }
}

/// Statistics of one modality.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModalityStats {
    /// The precision of the encoder's weights (`None` for given embeddings).
    pub dtype: Option<String>,
    /// Bytes the encoder's weights occupy in memory.
    pub weight_bytes: u64,
    pub enabled: bool,
    /// Calls that carried this modality.
    pub calls: u64,
    /// Items received.
    pub items: u64,
    /// Items the encoder ran on (the rest came from the cache or a concurrent call).
    pub encoded: u64,
    /// Preprocessing of the items the encoder ran on, per batch.
    pub preprocess: LatencySummary,
    /// Encoding, per batch.
    pub encode: LatencySummary,
    /// The modality's encoding cache (`None` when caching is off).
    pub cache: Option<CacheStats>,
}

/// What `MultiModalModel::stats` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelStats {
    pub calls: u64,
    pub modalities: BTreeMap<String, ModalityStats>,
    /// The fusion stage, per call that ran it.
    pub fuse: LatencySummary,
    /// The cross-modal attention maps, per call that asked for them.
    pub attention: LatencySummary,
    /// Whole calls.
    pub total: LatencySummary,
    pub fusion_cache: Option<CacheStats>,
    pub attention_cache: Option<CacheStats>,
    /// Bytes held by every in-memory cache together.
    pub cached_bytes: u64,
    /// The on-disk tier, when configured.
    pub disk: Option<DiskStats>,
}

/// What one call did, in its output.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CallStats {
    /// Per modality: items, cache hits, items encoded, preprocess and encode ms.
    pub modalities: BTreeMap<String, CallModality>,
    pub fuse_ms: f64,
    /// Whether every fused row came from the fusion cache.
    pub fusion_cached: bool,
    pub attention_ms: f64,
    pub total_ms: f64,
}

/// One modality within one call.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CallModality {
    pub items: usize,
    /// Items served from the in-memory cache.
    pub hits: usize,
    /// Items read from the on-disk tier.
    pub disk_hits: usize,
    /// Items this call waited for another call to compute.
    pub shared: usize,
    /// Items this call encoded.
    pub encoded: usize,
    pub preprocess_ms: f64,
    pub encode_ms: f64,
}
