//! [`DistributedConfig`]: which cluster nodes run which modality, and how
//! (docs/distributed.md).
//!
//! ```toml
//! [distributed]
//! max_retries = 3
//!
//! [distributed.sharding]
//! strategy = "modality_specific"
//! modality_assignments.text = ["modality=text"]          # node label selectors
//! modality_assignments.image = { selectors = ["modality=image"], replicas = 2, num_gpus = 1 }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{ByteSize, MultiModalConfig};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Where and how one modality's replicas run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModalityAssignment {
    /// Node selectors, any of which may place a replica: `key=value` matches a Ray node
    /// label (`ray start --labels modality=image`); a bare `name` asks for one unit of
    /// the custom resource `name` (`ray start --resources '{"name": 1}'`).
    pub selectors: Vec<String>,
    /// Replicas (one Ray actor each).
    pub replicas: usize,
    /// CPUs per replica; its encoder uses as many threads.
    pub num_cpus: f64,
    /// GPUs per replica; a replica with a GPU runs on `cuda` when mlmf was built with it.
    pub num_gpus: f64,
    /// Memory reserved per replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Requests a replica works on at once; more wait in the driver (backpressure).
    pub max_in_flight: usize,
}

impl Default for ModalityAssignment {
    fn default() -> Self {
        Self {
            selectors: Vec::new(),
            replicas: 1,
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: None,
            max_in_flight: 4,
        }
    }
}

/// A list of selectors is shorthand for an assignment with the defaults.
fn assignment<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<ModalityAssignment, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Table(ModalityAssignment),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(selectors) => ModalityAssignment {
            selectors,
            ..ModalityAssignment::default()
        },
        Raw::Table(a) => a,
    })
}

fn assignments<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<Modality, ModalityAssignment>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "assignment")] ModalityAssignment);
    let map: BTreeMap<Modality, Wrap> = BTreeMap::deserialize(d)?;
    Ok(map.into_iter().map(|(k, Wrap(v))| (k, v)).collect())
}

/// How modality encoders are spread over nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShardingStrategy {
    /// Every node runs every modality: `replicas` replicas of each, placed anywhere.
    Replicated {
        #[serde(default = "one")]
        replicas: usize,
    },
    /// Each modality runs on the nodes its assignment selects.
    ModalitySpecific {
        #[serde(deserialize_with = "assignments")]
        modality_assignments: BTreeMap<Modality, ModalityAssignment>,
    },
}

fn one() -> usize {
    1
}

impl Default for ShardingStrategy {
    fn default() -> Self {
        Self::Replicated { replicas: 1 }
    }
}

/// Distributed settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedConfig {
    pub sharding: ShardingStrategy,
    /// How often a request whose replica (or node) died is sent again, to another
    /// replica, before it fails.
    pub max_retries: usize,
    /// Seconds to wait for a modality's replicas to start before loading fails.
    pub start_timeout_s: f64,
    /// Send files as their bytes (true) or as paths the replicas open themselves
    /// (false: needs a filesystem every node sees at the same paths).
    pub send_file_bytes: bool,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            sharding: ShardingStrategy::default(),
            max_retries: 3,
            start_timeout_s: 60.0,
            send_file_bytes: true,
        }
    }
}

impl ModalityAssignment {
    fn validate(&self) -> Result<()> {
        if self.selectors.is_empty() || self.selectors.iter().any(|n| n.trim().is_empty()) {
            return Err(MlmfError::config(
                "selectors",
                "expected a non-empty list of node selectors (`key=value` labels or resource \
                 names)",
            ));
        }
        if self.replicas == 0 {
            return Err(MlmfError::config("replicas", "must be at least 1"));
        }
        if !(self.num_cpus.is_finite() && self.num_cpus >= 0.0) {
            return Err(MlmfError::config("num_cpus", "must be a number >= 0"));
        }
        if !(self.num_gpus.is_finite() && self.num_gpus >= 0.0) {
            return Err(MlmfError::config("num_gpus", "must be a number >= 0"));
        }
        if self.max_in_flight == 0 {
            return Err(MlmfError::config("max_in_flight", "must be at least 1"));
        }
        Ok(())
    }
}

impl DistributedConfig {
    /// Checks the assignments against the configured modalities.
    pub fn validate(&self, whole: &MultiModalConfig) -> Result<()> {
        if !(self.start_timeout_s.is_finite() && self.start_timeout_s > 0.0) {
            return Err(MlmfError::config("start_timeout_s", "must be above 0"));
        }
        match &self.sharding {
            ShardingStrategy::Replicated { replicas } if *replicas == 0 => {
                Err(MlmfError::config("sharding.replicas", "must be at least 1"))
            }
            ShardingStrategy::Replicated { .. } => Ok(()),
            ShardingStrategy::ModalitySpecific {
                modality_assignments,
            } => {
                let path = "sharding.modality_assignments";
                for (m, a) in modality_assignments {
                    a.validate().map_err(|e| e.under(&format!("{path}.{m}")))?;
                    if !whole.modalities.is_empty() && !whole.modalities.contains_key(m) {
                        return Err(MlmfError::config(
                            format!("{path}.{m}"),
                            format!(
                                "modality `{m}` is assigned to nodes but not configured under \
                                 `modalities`"
                            ),
                        ));
                    }
                }
                for m in whole.enabled_modalities() {
                    if !modality_assignments.contains_key(&m) {
                        return Err(MlmfError::config(
                            path,
                            format!("enabled modality `{m}` has no node assignment"),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}
