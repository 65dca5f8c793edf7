//! [`CacheConfig`]: whether encodings are cached and how much memory they may use.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use std::collections::BTreeMap;

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A number of bytes, written in configs as an integer or as `"512 MiB"`, `"2GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = MlmfError;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            MlmfError::config(
                "",
                format!(
                    "cannot read {s:?} as a size: expected e.g. 1048576, \"512 MiB\" or \"2 GB\""
                ),
            )
        };
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024.0 * 1024.0,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "t" | "tib" => 1024.0f64.powi(4),
            _ => return Err(bad()),
        };
        let bytes = n * mult;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0;
        let mut u = 0;
        while u + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
            v /= 1024;
            u += 1;
        }
        write!(f, "{v} {}", UNITS[u])
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Self(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Cache settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Total memory all in-memory caches may hold.
    pub max_memory: ByteSize,
    /// Per-modality cache settings (policy, budget); a modality not listed
    /// gets the defaults.
    pub modalities: BTreeMap<Modality, ModalityCacheConfig>,
    /// The on-disk tier: encodings that survive restarts and are shared by the
    /// processes of one machine; absent = memory only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskCacheConfig>,
}

/// `cache.disk`: where the on-disk tier lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCacheConfig {
    /// The database file (created when missing); relative to the config file's folder.
    pub path: std::path::PathBuf,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_memory: ByteSize(512 << 20),
            modalities: BTreeMap::new(),
            disk: None,
        }
    }
}

impl CacheConfig {
    /// Checks value ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.enabled && self.max_memory.0 == 0 {
            return Err(MlmfError::config(
                "max_memory",
                "an enabled cache needs a budget above 0 bytes (or set enabled = false)",
            ));
        }
        for (m, c) in &self.modalities {
            c.validate()
                .map_err(|e| e.under(&format!("modalities.{m}")))?;
        }
        let own: u64 = self
            .modalities
            .values()
            .filter_map(|c| c.max_memory.map(|b| b.0))
            .sum();
        if self.enabled && own > self.max_memory.0 {
            return Err(MlmfError::config(
                "modalities",
                format!(
                    "the modalities' own budgets add up to {}, more than max_memory ({}); \
                     raise max_memory or lower them",
                    ByteSize(own),
                    self.max_memory
                ),
            ));
        }
        Ok(())
    }

    /// How `max_memory` is shared by a model's caches: a modality with its own
    /// `max_memory` gets that; of the rest, each of the `side_caches` (fusion results,
    /// attention maps: small rows) gets a sixteenth, and the modalities without a budget
    /// share what remains equally. Returns the budget per modality and per side cache.
    pub fn split(&self, modalities: &[Modality], side_caches: usize) -> (Vec<u64>, u64) {
        let own: Vec<Option<u64>> = modalities
            .iter()
            .map(|m| self.modality(*m).max_memory.map(|b| b.0))
            .collect();
        let fixed: u64 = own.iter().flatten().sum();
        let rest = self.max_memory.0.saturating_sub(fixed);
        let shared = own.iter().filter(|b| b.is_none()).count() as u64;
        let side = if shared == 0 && side_caches > 0 {
            rest / side_caches as u64
        } else {
            rest / 16
        };
        let left = rest.saturating_sub(side * side_caches as u64);
        let each = left.checked_div(shared).unwrap_or(0);
        (own.iter().map(|b| b.unwrap_or(each)).collect(), side)
    }

    /// Budgets when the total is set to `total` at run time: the side caches scale with
    /// the total; the modalities' budgets of [`split`](Self::split) grow in proportion
    /// when there is more room, and when there is less, the lowest-priority modalities
    /// give up memory first (equal priorities in proportion to their budgets).
    pub fn split_within(
        &self,
        total: u64,
        modalities: &[Modality],
        side_caches: usize,
    ) -> (Vec<u64>, u64) {
        let (want, side_want) = self.split(modalities, side_caches);
        let configured = self.max_memory.0.max(1);
        let side = (side_want as u128 * total as u128 / configured as u128) as u64;
        let avail = total.saturating_sub(side * side_caches as u64);
        let want_sum: u64 = want.iter().sum();
        if want_sum == 0 {
            return (want, side);
        }
        if avail >= want_sum {
            let grown = want
                .iter()
                .map(|&w| (w as u128 * avail as u128 / want_sum as u128) as u64)
                .collect();
            return (grown, side);
        }
        let mut budgets = want.clone();
        let mut deficit = want_sum - avail;
        let mut levels: Vec<i32> = modalities
            .iter()
            .map(|m| self.modality(*m).priority)
            .collect();
        levels.sort_unstable();
        levels.dedup();
        for level in levels {
            if deficit == 0 {
                break;
            }
            let members: Vec<usize> = (0..modalities.len())
                .filter(|&i| self.modality(modalities[i]).priority == level)
                .collect();
            let group: u64 = members.iter().map(|&i| budgets[i]).sum();
            let cut = deficit.min(group);
            let mut taken = 0;
            for (n, &i) in members.iter().enumerate() {
                let share = if n + 1 == members.len() {
                    cut - taken
                } else {
                    (cut as u128 * budgets[i] as u128)
                        .checked_div(group as u128)
                        .unwrap_or(0) as u64
                };
                let share = share.min(budgets[i]);
                budgets[i] -= share;
                taken += share;
            }
            deficit -= taken;
        }
        (budgets, side)
    }

    /// The settings of `modality`'s cache (the defaults when not listed).
    pub fn modality(&self, modality: Modality) -> ModalityCacheConfig {
        self.modalities.get(&modality).cloned().unwrap_or_default()
    }
}

/// Which entries a full cache drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// TinyLFU: admission and eviction by estimated frequency.
    Lfu,
    /// LRU, and every entry expires `ttl_seconds` after it was written.
    Ttl,
    /// LRU, and an entry expires `ttl_seconds` after it was last read or written.
    Tti,
}

/// An eviction policy with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CachePolicy {
    Lru,
    Lfu,
    Ttl { seconds: f64 },
    Tti { seconds: f64 },
}

/// One modality's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModalityCacheConfig {
    pub policy: PolicyKind,
    /// Seconds for `ttl` / `tti`.
    pub ttl_seconds: Option<f64>,
    /// This modality's own budget (`None`: a share of `cache.max_memory`).
    pub max_memory: Option<ByteSize>,
    /// When the total budget shrinks at run time, caches of lower priority give up
    /// their memory first.
    pub priority: i32,
}

impl Default for ModalityCacheConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Lru,
            ttl_seconds: None,
            max_memory: None,
            priority: 0,
        }
    }
}

impl ModalityCacheConfig {
    pub fn validate(&self) -> Result<()> {
        match (self.policy, self.ttl_seconds) {
            (PolicyKind::Ttl | PolicyKind::Tti, None) => Err(MlmfError::config(
                "ttl_seconds",
                "policies `ttl` and `tti` need ttl_seconds (a number of seconds > 0)",
            )),
            (_, Some(t)) if !(t.is_finite() && t > 0.0) => Err(MlmfError::config(
                "ttl_seconds",
                format!("expected a number of seconds > 0, got {t}"),
            )),
            (PolicyKind::Lru | PolicyKind::Lfu, Some(_)) => Err(MlmfError::config(
                "ttl_seconds",
                "only used with policy `ttl` or `tti`",
            )),
            _ if self.max_memory.is_some_and(|b| b.0 == 0) => Err(MlmfError::config(
                "max_memory",
                "a cache budget must be above 0 bytes",
            )),
            _ => Ok(()),
        }
    }

    /// The policy with its parameters (after [`validate`](Self::validate)).
    pub fn policy(&self) -> CachePolicy {
        let seconds = self.ttl_seconds.unwrap_or(f64::MAX);
        match self.policy {
            PolicyKind::Lru => CachePolicy::Lru,
            PolicyKind::Lfu => CachePolicy::Lfu,
            PolicyKind::Ttl => CachePolicy::Ttl { seconds },
            PolicyKind::Tti => CachePolicy::Tti { seconds },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("1024".parse::<ByteSize>().unwrap(), ByteSize(1024));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("2GB".parse::<ByteSize>().unwrap(), ByteSize(2_000_000_000));
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512 MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 B");
    }

    #[test]
    fn modality_cache_settings_are_checked() {
        let ok = ModalityCacheConfig {
            policy: PolicyKind::Ttl,
            ttl_seconds: Some(2.5),
            ..Default::default()
        };
        assert_eq!(ok.policy(), CachePolicy::Ttl { seconds: 2.5 });
        ok.validate().unwrap();
        for (bad, field) in [
            (
                ModalityCacheConfig {
                    policy: PolicyKind::Tti,
                    ..Default::default()
                },
                "ttl_seconds",
            ),
            (
                ModalityCacheConfig {
                    ttl_seconds: Some(3.0),
                    ..Default::default()
                },
                "ttl_seconds",
            ),
            (
                ModalityCacheConfig {
                    policy: PolicyKind::Ttl,
                    ttl_seconds: Some(-1.0),
                    ..Default::default()
                },
                "ttl_seconds",
            ),
            (
                ModalityCacheConfig {
                    max_memory: Some(ByteSize(0)),
                    ..Default::default()
                },
                "max_memory",
            ),
        ] {
            let cfg = CacheConfig {
                modalities: [(Modality::Image, bad)].into(),
                ..Default::default()
            };
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("modalities.image.{field}")), "{e}");
        }
    }
}
