//! Projection adapters: per-modality maps from an encoder's embedding width to one
//! common width, in front of the fusion (docs/training.md, "Adapters").
//!
//! An adapter is `Linear(D_m -> dim)` or, with `hidden`, `fc2(gelu(fc1(x)))`. It takes
//! what the fusion takes (pooled `[B, D_m]` or token states `[B, T, D_m]`, every token
//! mapped alike) and returns `[..., dim]`. Trained adapters put the modalities in one
//! space: a text vector and an image vector can then be compared directly, which is
//! what contrastive training between two modalities optimises.
//!
//! Tensor names (PyTorch's `[out, in]` layout): `{m}.weight`, `{m}.bias`, or with
//! `hidden`, `{m}.fc1.weight`, `{m}.fc1.bias`, `{m}.fc2.weight`, `{m}.fc2.bias`. Without
//! a weights file the adapters initialise from a seed as `torch.nn.Linear` does and
//! report themselves untrained.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::AdaptersConfig;
use crate::encoders::layers::{Activation, Linear};
use crate::error::{MlmfError, Result};
use crate::fusion::params::Params;
use crate::modality::Modality;

#[derive(Debug, Clone)]
enum Map {
    Linear(Linear),
    Mlp(Linear, Linear),
}

/// The adapters of a model; see the module docs.
#[derive(Debug, Clone)]
pub struct Adapters {
    dim: usize,
    maps: Vec<(Modality, Map)>,
    tensors: Vec<(String, Tensor)>,
    untrained: bool,
}

impl Adapters {
    /// Adapters for the modalities of `widths` that `cfg` covers (every one of them must
    /// be covered by name if `cfg.modalities` names it).
    pub fn new(
        cfg: &AdaptersConfig,
        widths: &[(Modality, usize)],
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(m) = cfg
            .modalities
            .iter()
            .find(|m| !widths.iter().any(|(n, _)| n == *m))
        {
            return Err(MlmfError::config(
                "modalities",
                format!("`{m}` is not one of the model's modalities"),
            ));
        }
        let mut p = match &cfg.weights {
            Some(path) => Params::load(path, device)?,
            None => Params::seeded(cfg.seed, device),
        };
        let mut maps = Vec::new();
        for &(m, d) in widths.iter().filter(|(m, _)| cfg.covers(*m)) {
            let map = match cfg.hidden {
                None => Map::Linear(p.linear(&m.to_string(), d, cfg.dim, true)?),
                Some(h) => Map::Mlp(
                    p.linear(&format!("{m}.fc1"), d, h, true)?,
                    p.linear(&format!("{m}.fc2"), h, cfg.dim, true)?,
                ),
            };
            maps.push((m, map));
        }
        let untrained = p.is_seeded();
        let tensors = p.finish("these adapters")?;
        Ok(Self {
            dim: cfg.dim,
            maps,
            tensors,
            untrained,
        })
    }

    /// Output width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Whether `m` has an adapter.
    pub fn covers(&self, m: Modality) -> bool {
        self.maps.iter().any(|(n, _)| *n == m)
    }

    /// The adapted modalities, in order.
    pub fn modalities(&self) -> Vec<Modality> {
        self.maps.iter().map(|(m, _)| *m).collect()
    }

    /// Whether the weights are a seeded initialisation rather than loaded ones.
    pub fn is_untrained(&self) -> bool {
        self.untrained
    }

    /// The tensors by name, in creation order (PyTorch's layout).
    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// `x` `[..., D_m]` through `m`'s adapter (`x` itself when `m` has none).
    pub fn forward(&self, m: Modality, x: &Tensor) -> Result<Tensor> {
        match self.maps.iter().find(|(n, _)| *n == m) {
            None => Ok(x.clone()),
            Some((_, Map::Linear(l))) => l.forward(x),
            Some((_, Map::Mlp(a, b))) => b.forward(&Activation::Gelu.forward(&a.forward(x)?)?),
        }
    }

    /// Writes the weights (safetensors, the names [`Adapters::new`] reads).
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| {
            MlmfError::model_load("adapter weights", path, format!("cannot write: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_map_every_token_and_round_trip() {
        let cfg = AdaptersConfig {
            dim: 6,
            hidden: Some(5),
            ..Default::default()
        };
        let widths = [(Modality::Text, 4), (Modality::Image, 3)];
        let a = Adapters::new(&cfg, &widths, &Device::Cpu).unwrap();
        assert!(a.is_untrained());
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let y = a.forward(Modality::Text, &x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 6]);
        // Token 1 of row 0 alone gives the same row.
        let one = a
            .forward(
                Modality::Text,
                &x.get(0).unwrap().get(1).unwrap().unsqueeze(0).unwrap(),
            )
            .unwrap();
        let diff = (one.squeeze(0).unwrap() - y.get(0).unwrap().get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
        let dir = std::env::temp_dir().join(format!("mlmf-adapters-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        a.save(&path).unwrap();
        let b = Adapters::new(
            &AdaptersConfig {
                weights: Some(path.clone()),
                ..cfg.clone()
            },
            &widths,
            &Device::Cpu,
        )
        .unwrap();
        assert!(!b.is_untrained());
        let yb = b.forward(Modality::Text, &x).unwrap();
        let diff = (yb - &y).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // Another layout names the missing tensor.
        let err = Adapters::new(
            &AdaptersConfig {
                weights: Some(path),
                hidden: None,
                ..cfg
            },
            &widths,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(err.to_string().contains("text.weight"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
