use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;

use candle_core::{DType, Device};
use proptest::prelude::*;

use super::*;

const I: Modality = Modality::Image;

fn fp(v: u32) -> Fingerprint {
    Fingerprint::of(&serde_json::json!({ "size": v })).unwrap()
}

fn key(n: u32) -> ContentKey {
    ContentKey::of_bytes(I, "m", &fp(224), &n.to_le_bytes())
}

/// A float32 tensor of `n` elements (4n bytes).
fn value(n: usize) -> Tensor {
    Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn keys_separate_bytes_modality_model_and_settings() {
    let base = ContentKey::of_bytes(I, "clip", &fp(224), b"abc");
    assert_eq!(base, ContentKey::of_bytes(I, "clip", &fp(224), b"abc"));
    for other in [
        ContentKey::of_bytes(I, "clip", &fp(224), b"abd"),
        ContentKey::of_bytes(Modality::Audio, "clip", &fp(224), b"abc"),
        ContentKey::of_bytes(I, "siglip", &fp(224), b"abc"),
        ContentKey::of_bytes(I, "clip", &fp(336), b"abc"),
        ContentKey::of_id(I, "clip", &fp(224), "abc"),
        // Length-prefixed parts: moving bytes between the model id and the item is
        // another key.
        ContentKey::of_bytes(I, "clipa", &fp(224), b"bc"),
    ] {
        assert_ne!(base, other);
    }
    assert_eq!(base.to_hex().len(), 64);
    let (a, b) = (key(1), key(2));
    assert_ne!(
        ContentKey::combine(&[a, b], &fp(0)),
        ContentKey::combine(&[b, a], &fp(0))
    );
    assert_ne!(
        ContentKey::combine(&[a, b], &fp(0)),
        ContentKey::combine(&[a, b], &fp(1))
    );
}

#[test]
fn hits_misses_and_identical_values() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Lru, 1 << 20);
    assert!(c.get(&key(1)).is_none());
    let v = Tensor::arange(0f32, 10.0, &Device::Cpu).unwrap();
    assert!(c.insert(key(1), v.clone()));
    let got = c.get(&key(1)).unwrap();
    assert_eq!(got.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.entries, s.bytes), (1, 1, 1, 40));
    assert_eq!(s.hit_rate(), 0.5);
    c.reset_stats();
    assert_eq!(c.stats().hits, 0);
    assert_eq!(c.stats().entries, 1);
    c.clear();
    assert_eq!(c.stats().entries, 0);
}

#[test]
fn a_value_larger_than_the_budget_is_refused() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Lru, 100);
    assert!(!c.insert(key(1), value(26)));
    let (v, hit) = c.get_or_try_insert_with(key(2), || Ok(value(30))).unwrap();
    assert_eq!((v.elem_count(), hit), (30, false));
    let s = c.stats();
    assert_eq!((s.rejected, s.entries, s.bytes), (2, 0, 0));
}

#[test]
fn lru_drops_the_least_recently_used() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Lru, 3 * 400);
    for i in 0..3 {
        c.insert(key(i), value(100));
    }
    c.get(&key(0)); // 1 is now the least recently used
    c.insert(key(3), value(100));
    assert!(c.get(&key(1)).is_none());
    for i in [0, 2, 3] {
        assert!(c.get(&key(i)).is_some(), "{i}");
    }
    assert_eq!(c.stats().evictions, 1);
}

#[test]
fn a_modality_cache_follows_the_config() {
    let cfg: CacheConfig = serde_json::from_value(serde_json::json!({
        "max_memory": 1000,
        "modalities": { "image": { "max_memory": 400, "policy": "lfu" } }
    }))
    .unwrap();
    let image: ByteCache<Tensor> = ByteCache::for_modality(I, &cfg);
    let audio: ByteCache<Tensor> = ByteCache::for_modality(Modality::Audio, &cfg);
    assert_eq!((image.name(), image.budget()), ("image", 400));
    assert_eq!((audio.name(), audio.budget()), ("audio", 1000));
}

#[test]
fn ttl_entries_expire() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Ttl { seconds: 0.05 }, 1 << 20);
    c.insert(key(1), value(4));
    assert!(c.get(&key(1)).is_some());
    std::thread::sleep(Duration::from_millis(120));
    assert!(c.get(&key(1)).is_none());
    assert_eq!(c.stats().expirations, 1);
}

#[test]
fn concurrent_requests_for_one_key_compute_once() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Lfu, 1 << 20);
    let runs = AtomicUsize::new(0);
    let start = Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                start.wait();
                let (v, _) = c
                    .get_or_try_insert_with(key(7), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(value(16))
                    })
                    .unwrap();
                assert_eq!(v.elem_count(), 16);
            });
        }
    });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let s = c.stats();
    assert_eq!((s.hits + s.misses, s.misses), (8, 1));
}

#[test]
fn a_failed_computation_is_not_cached_and_keeps_its_type() {
    let c: ByteCache<Tensor> = ByteCache::new("image", CachePolicy::Lru, 1 << 20);
    let e = c
        .get_or_try_insert_with(key(1), || Err(MlmfError::decode(I, "truncated JPEG")))
        .unwrap_err();
    assert!(matches!(e, MlmfError::Decode { .. }), "{e}");
    let (_, hit) = c.get_or_try_insert_with(key(1), || Ok(value(1))).unwrap();
    assert!(!hit);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the sizes and the order, the bytes held never exceed the budget after
    /// a call, and every value stored within it is readable back until evicted.
    #[test]
    fn the_budget_holds_after_every_call(
        budget in 64u64..4096,
        lfu in any::<bool>(),
        ops in proptest::collection::vec((0u32..24, 0usize..600), 1..80),
    ) {
        let policy = if lfu { CachePolicy::Lfu } else { CachePolicy::Lru };
        let c: ByteCache<Tensor> = ByteCache::new("p", policy, budget);
        for (k, n) in ops {
            let stored = c.insert(key(k), value(n));
            prop_assert_eq!(stored, (4 * n) as u64 <= budget);
            prop_assert!(c.bytes() <= budget, "{} > {}", c.bytes(), budget);
            if let (true, Some(v)) = (stored, c.get(&key(k))) {
                prop_assert_eq!(v.elem_count(), n);
            }
        }
    }
}

#[test]
fn the_global_budget_is_split_without_overspending() {
    use crate::config::{ByteSize, CacheConfig, ModalityCacheConfig};
    let mut c = CacheConfig {
        max_memory: ByteSize(1600),
        ..CacheConfig::default()
    };
    let ms = [Modality::Text, Modality::Image, Modality::Audio];
    let (each, side) = c.split(&ms, 2);
    assert_eq!(side, 100);
    assert_eq!(each, vec![466, 466, 466]);
    assert!(each.iter().sum::<u64>() + 2 * side <= 1600);
    c.modalities.insert(
        Modality::Image,
        ModalityCacheConfig {
            max_memory: Some(ByteSize(1000)),
            ..ModalityCacheConfig::default()
        },
    );
    let (each, side) = c.split(&ms, 1);
    assert_eq!(each[1], 1000);
    assert!(each.iter().sum::<u64>() + side <= 1600, "{each:?} {side}");
    // Own budgets above the total are refused by validation, naming the field.
    c.modalities.insert(
        Modality::Text,
        ModalityCacheConfig {
            max_memory: Some(ByteSize(1000)),
            ..ModalityCacheConfig::default()
        },
    );
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("modalities") && err.contains("max_memory"),
        "{err}"
    );
}

#[test]
fn a_smaller_total_is_taken_from_low_priorities_first() {
    use crate::config::{ByteSize, CacheConfig, ModalityCacheConfig};
    let mut c = CacheConfig {
        max_memory: ByteSize(1600),
        ..CacheConfig::default()
    };
    c.modalities.insert(
        Modality::Image,
        ModalityCacheConfig {
            priority: 5,
            ..ModalityCacheConfig::default()
        },
    );
    let ms = [Modality::Text, Modality::Image, Modality::Audio];
    // Growing: every budget in proportion.
    let (grown, side) = c.split_within(3200, &ms, 1);
    assert_eq!(side, 200);
    assert!(grown.iter().all(|&b| b >= 2 * 466), "{grown:?}");
    assert!(grown.iter().sum::<u64>() + side <= 3200);
    // Shrinking: text and audio (priority 0) give up memory before image.
    let (small, side) = c.split_within(800, &ms, 1);
    assert_eq!(side, 50);
    assert!(small.iter().sum::<u64>() + side <= 800, "{small:?}");
    assert_eq!(small[1], 500, "{small:?}");
    assert_eq!(small[0], small[2]);
    // Less than the high-priority cache alone: the others are empty first.
    let (tiny, _) = c.split_within(400, &ms, 1);
    assert_eq!((tiny[0], tiny[2]), (0, 0), "{tiny:?}");
    assert!(tiny[1] > 0);
}

#[test]
fn set_budget_keeps_what_fits() {
    let c: ByteCache<Tensor> = ByteCache::new("t", CachePolicy::Lru, 4000);
    for i in 0..8 {
        c.insert(key(i), value(100)); // 400 bytes each
    }
    assert_eq!(c.stats().entries, 8);
    c.set_budget(1000);
    let s = c.stats();
    assert_eq!(s.budget, 1000);
    assert!(s.bytes <= 1000 && s.entries == 2, "{s:?}");
    assert_eq!(s.evictions, 6);
    c.set_budget(4000);
    c.insert(key(20), value(100));
    assert_eq!(c.stats().entries, 3);
}
