//! [`DistributedConfig`]: which cluster nodes run which modality.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::MultiModalConfig;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// How modality encoders are spread over nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShardingStrategy {
    /// Every node runs every modality.
    #[default]
    Replicated,
    /// Each modality runs on the nodes its selectors (node labels) name.
    ModalitySpecific {
        modality_assignments: BTreeMap<Modality, Vec<String>>,
    },
}

/// Distributed settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedConfig {
    pub sharding: ShardingStrategy,
}

impl DistributedConfig {
    /// Checks the assignments against the configured modalities.
    pub fn validate(&self, whole: &MultiModalConfig) -> Result<()> {
        if let ShardingStrategy::ModalitySpecific {
            modality_assignments,
        } = &self.sharding
        {
            let path = "sharding.modality_assignments";
            for (m, nodes) in modality_assignments {
                if nodes.is_empty() || nodes.iter().any(|n| n.trim().is_empty()) {
                    return Err(MlmfError::config(
                        format!("{path}.{m}"),
                        "expected a non-empty list of node selectors",
                    ));
                }
                if !whole.modalities.is_empty() && !whole.modalities.contains_key(m) {
                    return Err(MlmfError::config(
                        format!("{path}.{m}"),
                        format!("modality `{m}` is assigned to nodes but not configured under `modalities`"),
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
        }
        Ok(())
    }
}
