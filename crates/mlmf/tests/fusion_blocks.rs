//! The fusion building blocks against PyTorch references (tests/fixtures/fusion/blocks,
//! written by scripts/make_fixtures.py): each file holds the block's weights, its
//! inputs and the reference output `out`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::max_diff;
use mlmf::fusion::blocks::{LayerNorm, Mlp, RmsNorm, SigmoidGate, TanhGate};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn blocks_match_pytorch() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("fusion/manifest.json")).unwrap(),
    )
    .unwrap();
    let blocks = manifest["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 6);
    for b in blocks {
        let id = b["id"].as_str().unwrap();
        let t: HashMap<String, Tensor> = candle_core::safetensors::load(
            fixtures().join(b["file"].as_str().unwrap()),
            &Device::Cpu,
        )
        .unwrap();
        let g = |n: &str| t.get(n).unwrap_or_else(|| panic!("{id}: no {n}")).clone();
        let got = match b["block"].as_str().unwrap() {
            "LayerNorm" => LayerNorm::new(g("weight"), g("bias"), LayerNorm::EPS)
                .unwrap()
                .forward(&g("x")),
            "RmsNorm" => RmsNorm::new(g("weight"), RmsNorm::EPS)
                .unwrap()
                .forward(&g("x")),
            "Mlp" if t.contains_key("fc1.weight") => Mlp::gelu(
                (g("fc1.weight"), g("fc1.bias")),
                (g("fc2.weight"), g("fc2.bias")),
            )
            .unwrap()
            .forward(&g("x")),
            "Mlp" => Mlp::swiglu(
                g("gate_proj.weight"),
                g("up_proj.weight"),
                g("down_proj.weight"),
            )
            .unwrap()
            .forward(&g("x")),
            "TanhGate" => {
                let alpha = g("alpha").to_vec1::<f32>().unwrap()[0];
                assert!(alpha != 0.0, "{id}: a zero alpha tests nothing");
                TanhGate::new(alpha).forward(&g("y"))
            }
            "SigmoidGate" => SigmoidGate::new(g("weight"), g("bias"))
                .unwrap()
                .forward(&g("x"), &g("y")),
            other => panic!("unknown block {other}"),
        }
        .unwrap();
        let err = max_diff(&got, &g("out"));
        assert!(err <= 1e-5, "{id}: max abs diff {err}");
    }
}
