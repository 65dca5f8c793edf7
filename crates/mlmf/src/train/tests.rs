//! Training forward and gradients against the PyTorch references in
//! `tests/fixtures/train` (scripts/fixtures_train.py), the training forward against
//! the inference layers, and the guard that every trainable tensor gets a gradient.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::attention::AttnNet;
use super::fusion::{FusionNet, ModIn};
use super::nn::Lin;
use super::objectives;
use super::vars::VarStore;
use crate::config::train::ContrastiveLoss;
use crate::config::{CrossModalAttentionConfig, FusionStrategy};
use crate::fusion::{Fusion, FusionSettings, ModalityInput};
use crate::modality::Modality;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(file), &Device::Cpu).unwrap()
}

fn cases(kind: &str) -> Vec<Value> {
    manifest()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect()
}

/// Largest `|got - want| - (abs + rel |want|)` (<= 0 passes) and the largest raw
/// difference.
fn excess(got: &Tensor, want: &Tensor) -> (f32, f32) {
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        g.len(),
        w.len(),
        "shapes {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    let mut worst = f32::NEG_INFINITY;
    let mut raw = 0f32;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        raw = raw.max(d);
        worst = worst.max(d - (1e-6 + 1e-4 * b.abs()));
    }
    (worst, raw)
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let (e, raw) = excess(got, want);
    assert!(
        e <= 0.0,
        "{what}: max |diff| {raw} beyond 1e-6 + 1e-4 |want|"
    );
}

fn modality(name: &str) -> Modality {
    name.parse().unwrap()
}

fn dims_of(c: &Value) -> Vec<(Modality, usize)> {
    c["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                modality(d[0].as_str().unwrap()),
                d[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn strategy_of(c: &Value) -> FusionStrategy {
    let mut v = c["options"].clone();
    v["strategy"] = c["strategy"].clone();
    serde_json::from_value(v).unwrap()
}

/// A store holding the case's weights (names from the manifest).
fn store(c: &Value, t: &HashMap<String, Tensor>, prefix: &str) -> VarStore {
    let mut vs = VarStore::default();
    for w in c["weights"].as_array().unwrap() {
        let n = w.as_str().unwrap();
        vs.add(&format!("{prefix}{n}"), &t[n], true).unwrap();
    }
    vs
}

/// The case's inputs as training inputs, in the fusion's modality order.
fn mod_inputs(
    c: &Value,
    t: &HashMap<String, Tensor>,
    dims: &[(Modality, usize)],
) -> Vec<Option<ModIn>> {
    dims.iter()
        .map(|(m, _)| {
            let x = t.get(&format!("input.{m}"))?.clone();
            let b = x.dim(0).unwrap();
            let present = t
                .get(&format!("present.{m}"))
                .cloned()
                .unwrap_or_else(|| Tensor::ones(b, DType::F32, &Device::Cpu).unwrap())
                .reshape((b, 1))
                .unwrap();
            let rows: Vec<bool> = present
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&p| p != 0.0)
                .collect();
            let _ = c;
            Some(ModIn {
                x,
                mask: t.get(&format!("mask.{m}")).cloned(),
                present,
                rows,
            })
        })
        .collect()
}

/// Largest absolute value of a tensor.
fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Gradients of `sum(out * grad_output)` for every tensor of `vs`, compared with
/// `grad.<name>` (a tensor without a gradient counts as zeros). A tensor's error is
/// relative to its largest reference value, floored at 1% of the case's largest
/// gradient: a gradient that is zero in exact arithmetic (a key bias under softmax)
/// is float32 rounding noise of the other gradients' size.
fn check_grads(id: &str, vs: &VarStore, prefix: &str, out: &Tensor, t: &HashMap<String, Tensor>) {
    let loss = (out * &t["grad_output"]).unwrap().sum_all().unwrap();
    let grads = super::ops_layer::backward(&loss).unwrap();
    let scale = vs
        .iter()
        .map(|(name, _)| max_abs(&t[&format!("grad.{}", name.strip_prefix(prefix).unwrap())]))
        .fold(0f32, f32::max);
    for (name, v) in vs.iter() {
        let n = name.strip_prefix(prefix).unwrap();
        let want = &t[&format!("grad.{n}")];
        let got = grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            .reshape(want.dims())
            .unwrap();
        let diff = max_abs(&(&got - want.to_dtype(DType::F32).unwrap()).unwrap());
        let tol = 1e-6 + 1e-4 * max_abs(want).max(0.01 * scale);
        assert!(diff <= tol, "{id}: grad.{n}: max |diff| {diff} > {tol}");
    }
}

/// Runs `check` on the fused CPU ops, then on the composed candle ops (what other
/// devices run): both are held to the PyTorch references.
fn both_paths(check: impl Fn()) {
    check();
    super::ops::composed(check);
}

#[test]
fn fusion_forward_and_gradients_equal_pytorch_autograd() {
    both_paths(fusion_cases);
}

fn fusion_cases() {
    let all = cases("fusion");
    assert!(all.len() >= 28, "{} fusion cases", all.len());
    for c in all {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let dims = dims_of(&c);
        let vs = store(&c, &t, "fusion.");
        let net = FusionNet::new(&vs, "fusion.", &strategy_of(&c), &dims).unwrap();
        let inputs = mod_inputs(&c, &t, &dims);
        let out = net.forward(&inputs).unwrap();
        check(&format!("{id}: fused"), &out.fused, &t["fused"]);
        if let (Some(g), Some(want)) = (&out.gates, t.get("gates")) {
            check(&format!("{id}: gates"), g, want);
        }
        check_grads(id, &vs, "fusion.", &out.fused, &t);
    }
}

/// Writes a case's weights alone, for the inference layer to load.
fn weights_file(c: &Value, t: &HashMap<String, Tensor>, dir: &std::path::Path) -> PathBuf {
    let map: HashMap<String, Tensor> = c["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let n = w.as_str().unwrap();
            (n.to_string(), t[n].clone())
        })
        .collect();
    let path = dir.join(format!("{}.safetensors", c["id"].as_str().unwrap()));
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn training_forward_equals_the_inference_forward() {
    let dir = std::env::temp_dir().join(format!("mlmf-train-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for c in cases("fusion") {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let dims = dims_of(&c);
        let strategy = strategy_of(&c);
        let settings = FusionSettings {
            weights: Some(weights_file(&c, &t, &dir)),
            ..Default::default()
        };
        let fusion = Fusion::new(
            &strategy,
            &dims,
            c["out_dim"].as_u64().unwrap() as usize,
            &settings,
            &Device::Cpu,
        )
        .unwrap();
        let vs = store(&c, &t, "");
        let net = FusionNet::new(&vs, "", &strategy, &dims).unwrap();
        let inputs = mod_inputs(&c, &t, &dims);
        let trained = net.forward(&inputs).unwrap().fused;
        let b = trained.dim(0).unwrap();
        // Inference fuses one call's modalities: row by row, with the modalities the row has.
        for r in 0..b {
            let call: Vec<(Modality, ModalityInput)> = inputs
                .iter()
                .zip(&dims)
                .filter_map(|(i, (m, _))| {
                    let i = i.as_ref()?;
                    if !i.rows[r] {
                        return None;
                    }
                    let x = i.x.narrow(0, r, 1).unwrap();
                    let mask = i.mask.as_ref().map(|k| k.narrow(0, r, 1).unwrap());
                    Some((
                        *m,
                        if x.rank() == 2 {
                            ModalityInput::pooled(x)
                        } else {
                            ModalityInput::tokens(x, mask)
                        },
                    ))
                })
                .collect();
            let want = fusion.forward(&call, false).unwrap().fused;
            let got = trained.narrow(0, r, 1).unwrap();
            let d = crate::encoders::layers::max_abs_diff(&got, &want);
            assert!(
                d < 2e-6,
                "{id} row {r}: training and inference forwards differ by {d}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn attention_config(
    args: &Value,
) -> (
    CrossModalAttentionConfig,
    (usize, usize, usize),
    usize,
    usize,
) {
    let mut a = args.as_object().unwrap().clone();
    let dim = a.remove("dim").unwrap().as_u64().unwrap() as usize;
    let kv_dim = a
        .remove("kv_dim")
        .unwrap()
        .as_u64()
        .map_or(dim, |k| k as usize);
    a.remove("bias");
    let cfg: CrossModalAttentionConfig = serde_json::from_value(Value::Object(a)).unwrap();
    let heads = cfg.num_heads;
    let hd = cfg.head_dim.unwrap_or(dim / heads);
    (
        cfg.clone(),
        (heads, cfg.num_kv_heads.unwrap_or(heads), hd),
        dim,
        kv_dim,
    )
}

#[test]
fn attention_forward_and_gradients_equal_pytorch_autograd() {
    both_paths(attention_cases);
}

fn attention_cases() {
    for c in cases("attention") {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let (cfg, heads, _, _) = attention_config(&c["args"]);
        let vs = store(&c, &t, "");
        let net = AttnNet::from_store(&vs, "", heads, &cfg).unwrap();
        let out = net
            .forward(
                &t["query"],
                &t["key_value"],
                t.get("query_mask"),
                t.get("kv_mask"),
            )
            .unwrap();
        check(&format!("{id}: output"), &out, &t["output"]);
        check_grads(id, &vs, "", &out, &t);
    }
}

#[test]
fn attention_training_forward_equals_the_inference_layer() {
    let dir = std::env::temp_dir().join(format!("mlmf-train-attn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for c in cases("attention") {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let (cfg, heads, dim, kv_dim) = attention_config(&c["args"]);
        let layer = crate::attention::CrossModalAttention::load(
            &weights_file(&c, &t, &dir),
            dim,
            kv_dim,
            &cfg,
            &Device::Cpu,
        )
        .unwrap();
        let want = layer
            .forward(
                &t["query"],
                &t["key_value"],
                t.get("query_mask"),
                t.get("kv_mask"),
                false,
            )
            .unwrap()
            .output;
        let vs = store(&c, &t, "");
        let got = AttnNet::from_store(&vs, "", heads, &cfg)
            .unwrap()
            .forward(
                &t["query"],
                &t["key_value"],
                t.get("query_mask"),
                t.get("kv_mask"),
            )
            .unwrap();
        let d = crate::encoders::layers::max_abs_diff(&got, &want);
        assert!(
            d < 2e-6,
            "{id}: training and inference attention differ by {d}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pair_scores_and_gradients_equal_pytorch_autograd() {
    both_paths(pair_cases);
}

fn pair_cases() {
    for c in cases("pair_scores") {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let (cfg, heads, _, _) = attention_config(&c["args"]);
        let vs = store(&c, &t, "");
        let net = AttnNet::from_store(&vs, "", heads, &cfg).unwrap();
        let s = net
            .pair_scores(
                &t["query"],
                &t["query_mask"],
                &t["key_value"],
                &t["kv_mask"],
            )
            .unwrap();
        check(&format!("{id}: scores"), &s, &t["scores"]);
        check_grads(id, &vs, "", &s, &t);
    }
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()
}

#[test]
fn objective_losses_and_gradients_equal_pytorch_autograd() {
    both_paths(objective_cases);
}

fn objective_cases() {
    for c in cases("objective") {
        let id = c["id"].as_str().unwrap();
        let t = load(c["file"].as_str().unwrap());
        let vars: HashMap<String, Var> = c["tensors"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "labels" && *k != "targets")
            .map(|k| (k.clone(), var(&t[k])))
            .collect();
        let v = |k: &str| vars[k].as_tensor().clone();
        let labels = || {
            let l: Vec<i64> = t["labels"].flatten_all().unwrap().to_vec1().unwrap();
            let l: Vec<u32> = l.into_iter().map(|x| x as u32).collect();
            objectives::labels_tensor(&l, &Device::Cpu).unwrap()
        };
        let head = || Lin {
            w: v("head.weight"),
            b: Some(v("head.bias")),
        };
        let infonce = || {
            let sim = objectives::cosine_matrix(&v("u"), &v("v")).unwrap();
            objectives::contrastive(&sim, ContrastiveLoss::Infonce, &v("logit_scale"), None)
                .unwrap()
        };
        let loss = match c["objective"].as_str().unwrap() {
            "infonce" => infonce(),
            "sigmoid" => {
                let sim = objectives::cosine_matrix(&v("u"), &v("v")).unwrap();
                objectives::contrastive(
                    &sim,
                    ContrastiveLoss::Sigmoid,
                    &v("logit_scale"),
                    Some(&v("logit_bias")),
                )
                .unwrap()
            }
            "classify" => objectives::classify(&v("fused"), &head(), &labels()).unwrap(),
            "regress" => objectives::regress(&v("fused"), &head(), &t["targets"]).unwrap(),
            "weighted" => {
                let cl = objectives::classify(&v("u"), &head(), &labels()).unwrap();
                (cl + (infonce() * 0.5).unwrap()).unwrap()
            }
            other => panic!("unknown objective {other}"),
        };
        let want = c["loss64"].as_f64().unwrap();
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!(
            (got - want).abs() <= 1e-6 + 1e-4 * want.abs(),
            "{id}: loss {got} vs {want}"
        );
        let grads = super::ops_layer::backward(&loss).unwrap();
        for g in c["grads"].as_array().unwrap() {
            let g = g.as_str().unwrap();
            let name = g.strip_prefix("grad.").unwrap();
            let got = grads
                .get(vars[name].as_tensor())
                .cloned()
                .unwrap_or_else(|| v(name).zeros_like().unwrap());
            check(&format!("{id}: {g}"), &got, &t[g]);
        }
    }
}

/// The 50-step run of the fixture's `loop` through the real [`super::Trainer`]: adapters,
/// a gated fusion, a classifier and InfoNCE; AdamW, warmup + cosine, clipping.
#[test]
fn fifty_steps_of_training_follow_the_pytorch_loss_curve() {
    use crate::config::{AdaptersConfig, FusionStrategy, MultiModalConfig, TrainConfig};
    let m = manifest()["loop"].clone();
    let t = load(m["file"].as_str().unwrap());
    let dir = std::env::temp_dir().join(format!("mlmf-train-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let part = |prefix: &str, file: &str| {
        let map: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&format!("init.{prefix}"))
                    .map(|n| (n.to_string(), v.clone()))
            })
            .collect();
        candle_core::safetensors::save(&map, dir.join(file)).unwrap();
        dir.join(file)
    };
    let heads: HashMap<String, Tensor> = t
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix("init.")?;
            (n.starts_with("heads.") || n.starts_with("objectives."))
                .then(|| (n.to_string(), v.clone()))
        })
        .collect();
    candle_core::safetensors::save(&heads, dir.join("heads.safetensors")).unwrap();
    let mut config = MultiModalConfig::default();
    config.fusion.strategy = FusionStrategy::Gated(Default::default());
    config.fusion.out_dim = Some(16);
    config.fusion.weights = Some(part("fusion.", "fusion.safetensors"));
    config.adapters = Some(AdaptersConfig {
        dim: 16,
        weights: Some(part("adapters.", "adapters.safetensors")),
        ..Default::default()
    });
    let model = crate::MultiModalLoader::new(config)
        .with_given_modality(Modality::Text, 24)
        .with_given_modality(Modality::Image, 20)
        .load()
        .unwrap();
    let train: TrainConfig = serde_json::from_value(serde_json::json!({
        "objectives": [
            {"type": "classify", "num_classes": 5, "weight": 1.0},
            {"type": "contrastive", "between": ["text", "image"], "weight": 0.5}
        ],
        "batch_size": 16, "lr": 0.01, "warmup_steps": 5, "weight_decay": 0.01,
        "clip_grad_norm": 1.0, "shuffle": false,
        "stages": [{"modalities": ["text", "image"], "steps": 50}]
    }))
    .unwrap();
    let mut trainer = super::Trainer::new(model, train).unwrap();
    trainer.load_heads(&dir.join("heads.safetensors")).unwrap();
    let mut b = trainer.dataset_builder("loop", None).unwrap();
    let text: Vec<f32> = t["data.text"].flatten_all().unwrap().to_vec1().unwrap();
    let image: Vec<f32> = t["data.image"].flatten_all().unwrap().to_vec1().unwrap();
    let labels: Vec<i64> = t["data.labels"].to_vec1().unwrap();
    for r in 0..64 {
        let row = |v: &[f32], w: usize| super::RowData {
            pooled: v[r * w..(r + 1) * w].to_vec(),
            tokens: None,
        };
        let data = [
            (Modality::Text, row(&text, 24)),
            (Modality::Image, row(&image, 20)),
        ]
        .into_iter()
        .collect();
        b.push(
            super::Example {
                label: Some(labels[r]),
                ..Default::default()
            },
            data,
        )
        .unwrap();
    }
    let data = b.finish().unwrap();
    let mut losses = Vec::new();
    trainer
        .fit(&data, None, &dir.join("run"), false, &mut |e| {
            if let super::Event::Step(s) = e {
                losses.push(s.loss);
            }
            Ok(())
        })
        .unwrap();
    let want: Vec<f64> = t["losses"].to_vec1().unwrap();
    assert_eq!(losses.len(), 50);
    let worst = losses
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(
        worst <= 1e-4,
        "loss curve differs from PyTorch's by up to {worst}"
    );
    assert!(
        want[49] < 0.3 * want[0],
        "the reference itself should learn"
    );
    // The final weights too (the run ends holding them: no validation, last = best).
    for (name, v) in trainer.nets.vs.iter() {
        let want = &t[&format!("final.{name}")];
        let d = max_abs(&(v.as_tensor() - want).unwrap());
        assert!(d <= 1e-4, "final {name} differs by {d}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every trainable tensor of every built-in strategy, adapter kind, attention pair and
/// objective receives a gradient that is present, finite and not zero (candle ops
/// built without a backward pass would leave some without one).
#[test]
fn every_trainable_tensor_receives_a_gradient() {
    use crate::config::{AdaptersConfig, MultiModalConfig, TrainConfig};
    let strategies = [
        r#"{"strategy": "late", "mode": "concat"}"#,
        r#"{"strategy": "late", "mode": "mean"}"#,
        r#"{"strategy": "late", "mode": "weighted"}"#,
        r#"{"strategy": "late", "mode": "logits"}"#,
        r#"{"strategy": "attention"}"#,
        r#"{"strategy": "attention", "attention_dim": 5}"#,
        r#"{"strategy": "gated"}"#,
        r#"{"strategy": "early", "num_layers": 2, "num_heads": 2}"#,
        r#"{"strategy": "early", "num_heads": 2, "mlp": "swiglu", "norm": "rms"}"#,
        r#"{"strategy": "middle", "num_heads": 2}"#,
        r#"{"strategy": "middle", "num_heads": 2, "gate": "tanh"}"#,
        r#"{"strategy": "middle", "num_heads": 2, "gate": "sigmoid", "num_layers": 2}"#,
    ];
    let pairs = [
        r#"{"num_heads": 2, "pairs": ["text->image"]}"#,
        r#"{"num_heads": 2, "num_kv_heads": 1, "qk_norm": true, "rope_base": 10000.0, "softcap": 30.0, "pairs": ["text->image"]}"#,
    ];
    let (b, widths) = (
        6usize,
        [
            (Modality::Text, 12usize),
            (Modality::Image, 10),
            (Modality::Audio, 8),
        ],
    );
    for (k, s) in strategies.iter().enumerate() {
        let mut config = MultiModalConfig::default();
        let mut fusion: serde_json::Value = serde_json::from_str(s).unwrap();
        fusion["out_dim"] = 8.into();
        config.fusion = serde_json::from_value(fusion).unwrap();
        config.adapters = Some(AdaptersConfig {
            dim: 8,
            hidden: (k % 2 == 1).then_some(6),
            ..Default::default()
        });
        config.cross_modal_attention = serde_json::from_str(pairs[k % 2]).unwrap();
        let mut loader = crate::MultiModalLoader::new(config);
        for (m, w) in widths {
            loader = loader.with_given_modality(m, w);
        }
        let model = loader.load().unwrap();
        let train: TrainConfig = serde_json::from_value(serde_json::json!({
            "objectives": [
                {"type": "contrastive", "between": ["text", "image"]},
                {"type": "contrastive", "between": ["fused", "audio"], "loss": "sigmoid"},
                {"type": "contrastive", "pair": "text->image", "loss": "sigmoid", "name": "pair"},
                {"type": "classify", "num_classes": 3},
                {"type": "regress", "dim": 2}
            ]
        }))
        .unwrap();
        let trainer = super::Trainer::new(model, train).unwrap();
        // Flamingo's tanh gates start closed, so their branch would see no gradient at
        // the first step: open them as training does after one step.
        for (name, v) in trainer.nets.vs.iter() {
            if name.ends_with("_gate") {
                v.set(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let mut builder = trainer.dataset_builder("guard", None).unwrap();
        let mut rng = crate::attention::SplitMix(k as u64 + 1);
        for r in 0..b {
            let data = widths
                .iter()
                .map(|&(m, w)| {
                    let t = 2 + (r + w) % 3;
                    let x = rng.uniform(t * w, 1.0);
                    let pooled = (0..w)
                        .map(|j| (0..t).map(|i| x[i * w + j]).sum::<f32>() / t as f32)
                        .collect();
                    (
                        m,
                        super::RowData {
                            pooled,
                            tokens: Some((x, vec![1; t])),
                        },
                    )
                })
                .collect();
            builder
                .push(
                    super::Example {
                        id: None,
                        label: Some((r % 3) as i64),
                        target: Some(vec![r as f32, 1.0]),
                    },
                    data,
                )
                .unwrap();
        }
        let data = builder.finish().unwrap();
        let rows: Vec<usize> = (0..b).collect();
        let loss = trainer
            .nets
            .batch_loss(&data, &rows, &|_| true, &[])
            .unwrap()
            .unwrap();
        assert_eq!(loss.parts.len(), 5, "{s}: every objective ran");
        let grads = super::ops_layer::backward(&loss.total).unwrap();
        for (i, (name, v)) in trainer.nets.vs.iter().enumerate() {
            if !trainer.nets.vs.is_trainable(i) {
                continue;
            }
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{s}: `{name}` has no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{s}: `{name}` has a non-finite gradient"
            );
            // A key projection's bias shifts every logit of a row alike: softmax cancels
            // it, and its gradient is zero up to rounding.
            if !name.ends_with("k_proj.bias") {
                let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!(norm > 1e-6, "{s}: `{name}` has a zero gradient");
            }
        }
    }
}
