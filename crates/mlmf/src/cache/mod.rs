//! Content-addressed caches of encoder work (docs/cache.md).
//!
//! - [`ContentKey`]: a 256-bit blake3 hash of an item's raw bytes (a file by its
//!   content, not its path) together with its modality, the model id and a
//!   [`Fingerprint`] of the preprocessing settings, so the same bytes under other
//!   settings or another model get another key. Callers may key items by their own
//!   ids instead ([`ContentKey::of_id`]).
//! - [`ByteCache`]: one cache with an eviction policy (`lru`, `lfu` = TinyLFU, `ttl`,
//!   `tti`, from moka) and a byte budget that holds after every call; concurrent
//!   requests for one missing key compute it once ([`ByteCache::get_or_try_insert_with`]);
//!   hits, misses, evictions, refusals and bytes are counted ([`CacheStats`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use serde::Serialize;

mod disk;
mod flight;

pub use disk::{DiskStats, DiskTier};
pub use flight::{Claim, Flight, Flights, Leader};

use crate::config::{CacheConfig, CachePolicy};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// What keys are made of, besides the item: bumped when the key layout changes.
const DOMAIN: &[u8] = b"mlmf content key v1\0";

/// A blake3 hash of preprocessing (or any other) settings, part of every content key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The hash of `settings` serialised as JSON (field order as declared).
    pub fn of<T: Serialize + ?Sized>(settings: &T) -> Result<Self> {
        let json = serde_json::to_vec(settings)
            .map_err(|e| MlmfError::Internal(format!("settings fingerprint: {e}")))?;
        Ok(Self(*blake3::hash(&json).as_bytes()))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex(&self.0[..8]))
    }
}

/// The key of one cached item.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentKey(pub [u8; 32]);

impl ContentKey {
    fn hasher(kind: &[u8], modality: Modality, model_id: &str, fp: &Fingerprint) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(kind);
        for part in [modality.to_string().as_bytes(), model_id.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&fp.0);
        h
    }

    /// The key of raw input bytes (an encoded file, a text's UTF-8, a tensor's bytes
    /// after its dtype and shape).
    pub fn of_bytes(modality: Modality, model_id: &str, fp: &Fingerprint, bytes: &[u8]) -> Self {
        let mut h = Self::hasher(b"bytes\0", modality, model_id, fp);
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
        Self(*h.finalize().as_bytes())
    }

    /// The key of an item given in parts (a header such as dtype and shape, then the
    /// data); each part is length-prefixed, so parts cannot run into each other.
    pub fn of_parts(modality: Modality, model_id: &str, fp: &Fingerprint, parts: &[&[u8]]) -> Self {
        let mut h = Self::hasher(b"parts\0", modality, model_id, fp);
        h.update(&(parts.len() as u64).to_le_bytes());
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Self(*h.finalize().as_bytes())
    }

    /// The key of an item the caller names with its own id (the id must change when the
    /// content does).
    pub fn of_id(modality: Modality, model_id: &str, fp: &Fingerprint, id: &str) -> Self {
        let mut h = Self::hasher(b"id\0", modality, model_id, fp);
        h.update(&(id.len() as u64).to_le_bytes());
        h.update(id.as_bytes());
        Self(*h.finalize().as_bytes())
    }

    /// The key of an ordered set of keys under some settings (a fusion result, an
    /// attention map between two items).
    pub fn combine(keys: &[ContentKey], settings: &Fingerprint) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(b"combined\0");
        h.update(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            h.update(&k.0);
        }
        h.update(&settings.0);
        Self(*h.finalize().as_bytes())
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentKey({})", hex(&self.0[..8]))
    }
}

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cached value's size in bytes, which the budget counts.
pub trait Weighted {
    fn bytes(&self) -> u64;
}

impl Weighted for Tensor {
    fn bytes(&self) -> u64 {
        (self.elem_count() * self.dtype().size_in_bytes()) as u64
    }
}

/// What a cache has done since it was made (or its counters were reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries removed to keep the budget (or by TinyLFU admission).
    pub evictions: u64,
    /// Entries removed because their time to live / idle ran out.
    pub expirations: u64,
    /// Values not stored because they alone exceed the budget.
    pub rejected: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// The byte budget.
    pub budget: u64,
}

impl CacheStats {
    /// hits / (hits + misses), 0 before any lookup.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    rejected: AtomicU64,
}

/// One cache of values by [`ContentKey`], bounded in bytes.
#[derive(Clone)]
pub struct ByteCache<V: Weighted + Clone + Send + Sync + 'static> {
    name: String,
    policy: CachePolicy,
    /// The moka cache; replaced by a new one when the budget changes.
    inner: Arc<std::sync::RwLock<moka::sync::Cache<ContentKey, V>>>,
    budget: Arc<AtomicU64>,
    counters: Arc<Counters>,
}

impl<V: Weighted + Clone + Send + Sync + 'static> fmt::Debug for ByteCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteCache")
            .field("name", &self.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<V: Weighted + Clone + Send + Sync + 'static> ByteCache<V> {
    /// A cache named `name` (used in messages and stats) with `budget` bytes.
    pub fn new(name: &str, policy: CachePolicy, budget: u64) -> Self {
        let counters = Arc::new(Counters::default());
        Self {
            name: name.to_string(),
            policy,
            inner: Arc::new(std::sync::RwLock::new(Self::build(
                policy,
                budget,
                Arc::clone(&counters),
            ))),
            budget: Arc::new(AtomicU64::new(budget)),
            counters,
        }
    }

    fn build(
        policy: CachePolicy,
        budget: u64,
        c: Arc<Counters>,
    ) -> moka::sync::Cache<ContentKey, V> {
        let mut b = moka::sync::Cache::builder()
            .max_capacity(budget)
            .weigher(|_k: &ContentKey, v: &V| u32::try_from(v.bytes()).unwrap_or(u32::MAX))
            .eviction_listener(move |_k, _v, cause| match cause {
                RemovalCause::Size => {
                    c.evictions.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Expired => {
                    c.expirations.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            });
        b = match policy {
            CachePolicy::Lru => b.eviction_policy(EvictionPolicy::lru()),
            CachePolicy::Lfu => b.eviction_policy(EvictionPolicy::tiny_lfu()),
            CachePolicy::Ttl { seconds } => b
                .eviction_policy(EvictionPolicy::lru())
                .time_to_live(Duration::from_secs_f64(seconds)),
            CachePolicy::Tti { seconds } => b
                .eviction_policy(EvictionPolicy::lru())
                .time_to_idle(Duration::from_secs_f64(seconds)),
        };
        b.build()
    }

    /// The current moka cache (a cheap handle).
    fn cache(&self) -> moka::sync::Cache<ContentKey, V> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the budget at run time. moka caches have a fixed capacity, so the
    /// entries move to a new cache of the new size, whose policy drops what no longer
    /// fits (counted as evictions); `ttl` / `tti` clocks restart for the moved entries.
    pub fn set_budget(&self, budget: u64) {
        let mut slot = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let fresh = Self::build(self.policy, budget, Arc::clone(&self.counters));
        self.budget.store(budget, Ordering::Relaxed);
        for (k, v) in slot.iter() {
            if self.fits(v.bytes()) {
                fresh.insert(*k, v);
            } else {
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        fresh.run_pending_tasks();
        *slot = fresh;
    }

    /// `modality`'s cache as `config` sets it: its policy, and its own budget or else
    /// `config.max_memory`.
    pub fn for_modality(modality: Modality, config: &CacheConfig) -> Self {
        let m = config.modality(modality);
        let budget = m.max_memory.unwrap_or(config.max_memory).0;
        Self::new(&modality.to_string(), m.policy(), budget)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Whether a value of `bytes` can be stored at all (moka weighs entries in `u32`).
    fn fits(&self, bytes: u64) -> bool {
        bytes <= self.budget() && bytes <= u64::from(u32::MAX)
    }

    /// The value for `key`, counting a hit or a miss.
    pub fn get(&self, key: &ContentKey) -> Option<V> {
        let v = self.cache().get(key);
        let counter = if v.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        v
    }

    /// The value for `key` without counting a hit or a miss (a second look within one
    /// request that was already counted).
    pub fn peek(&self, key: &ContentKey) -> Option<V> {
        self.cache().get(key)
    }

    /// Stores `value`; `false` (and nothing stored) when it alone exceeds the budget.
    /// The budget holds when this returns.
    pub fn insert(&self, key: ContentKey, value: V) -> bool {
        if !self.fits(value.bytes()) {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let c = self.cache();
        c.insert(key, value);
        c.run_pending_tasks();
        true
    }

    /// The value for `key`, computing it with `f` on a miss. Concurrent callers asking
    /// for the same missing key wait for one computation and share its result (or its
    /// error). Returns the value and whether it was a hit.
    pub fn get_or_try_insert_with(
        &self,
        key: ContentKey,
        f: impl FnOnce() -> Result<V>,
    ) -> Result<(V, bool)> {
        let cache = self.cache();
        if let Some(v) = cache.get(&key) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((v, true));
        }
        let computed = std::sync::atomic::AtomicBool::new(false);
        let too_big = std::sync::Mutex::new(None);
        let got = cache.try_get_with(key, || {
            computed.store(true, Ordering::Relaxed);
            let v = f()?;
            if self.fits(v.bytes()) {
                Ok(v)
            } else {
                // Not stored: hand the value back through the error path.
                if let Ok(mut slot) = too_big.lock() {
                    *slot = Some(v);
                }
                Err(MlmfError::Cache {
                    cache: self.name.clone(),
                    message: "value exceeds the budget".into(),
                })
            }
        });
        let hit = !computed.load(Ordering::Relaxed);
        let counter = if hit {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match got {
            Ok(v) => {
                cache.run_pending_tasks();
                Ok((v, hit))
            }
            Err(e) => {
                if let Some(v) = too_big.lock().ok().and_then(|mut s| s.take()) {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    return Ok((v, false));
                }
                Err(Arc::try_unwrap(e).unwrap_or_else(|shared| shared.duplicate()))
            }
        }
    }

    /// Removes one entry.
    pub fn remove(&self, key: &ContentKey) {
        let c = self.cache();
        c.invalidate(key);
        c.run_pending_tasks();
    }

    /// Removes every entry.
    pub fn clear(&self) {
        let c = self.cache();
        c.invalidate_all();
        c.run_pending_tasks();
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        let c = self.cache();
        c.run_pending_tasks();
        c.weighted_size()
    }

    pub fn stats(&self) -> CacheStats {
        let cache = self.cache();
        cache.run_pending_tasks();
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            expirations: c.expirations.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            entries: cache.entry_count(),
            bytes: cache.weighted_size(),
            budget: self.budget(),
        }
    }

    /// Sets the counters back to 0 (the entries stay).
    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in [
            &c.hits,
            &c.misses,
            &c.evictions,
            &c.expirations,
            &c.rejected,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
