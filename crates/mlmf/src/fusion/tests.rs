use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::attention::SplitMix;
use crate::config::fusion::{
    AttentionFusionOptions, GateKind, LateMode, LateOptions, LayerStackOptions, MlpKind, NormKind,
};
use crate::encoders::layers::max_abs_diff;

const T: Modality = Modality::Text;
const I: Modality = Modality::Image;
const A: Modality = Modality::Audio;

fn dims() -> Vec<(Modality, usize)> {
    vec![(T, 12), (I, 10), (A, 6)]
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(SplitMix(seed).uniform(n, 1.0), shape, &Device::Cpu).unwrap()
}

fn stack(gate: GateKind) -> LayerStackOptions {
    LayerStackOptions {
        num_layers: 2,
        num_heads: 2,
        gate,
        ..Default::default()
    }
}

fn strategies() -> Vec<FusionStrategy> {
    let mut v: Vec<FusionStrategy> = [
        LateMode::Concat,
        LateMode::Mean,
        LateMode::Weighted,
        LateMode::Logits,
    ]
    .into_iter()
    .map(|mode| FusionStrategy::Late(LateOptions { mode }))
    .collect();
    v.push(FusionStrategy::Attention(AttentionFusionOptions {
        attention_dim: None,
    }));
    v.push(FusionStrategy::Attention(AttentionFusionOptions {
        attention_dim: Some(5),
    }));
    v.push(FusionStrategy::Gated(Default::default()));
    v.push(FusionStrategy::Early(LayerStackOptions {
        mlp: MlpKind::Swiglu,
        norm: NormKind::Rms,
        ..stack(GateKind::None)
    }));
    for g in [GateKind::None, GateKind::Tanh, GateKind::Sigmoid] {
        v.push(FusionStrategy::Middle(stack(g)));
    }
    v
}

fn inputs(full: bool) -> Vec<(Modality, ModalityInput)> {
    let mask =
        Tensor::from_vec(vec![1f32, 1., 1., 0., 1., 0., 0., 0.], (2, 4), &Device::Cpu).unwrap();
    let mut v = vec![
        (T, ModalityInput::tokens(rand(&[2, 4, 12], 1), Some(mask))),
        (I, ModalityInput::tokens(rand(&[2, 3, 10], 2), None)),
    ];
    if full {
        v.push((A, ModalityInput::pooled(rand(&[2, 6], 3))));
    }
    v
}

fn build(s: &FusionStrategy, settings: &FusionSettings) -> Fusion {
    Fusion::new(s, &dims(), 8, settings, &Device::Cpu).unwrap()
}

#[test]
fn every_strategy_is_seeded_saved_and_loaded() {
    let dir = std::env::temp_dir().join(format!("mlmf-fusion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (k, s) in strategies().iter().enumerate() {
        let a = build(s, &FusionSettings::default());
        assert!(a.is_untrained());
        let again = build(s, &FusionSettings::default());
        let other = build(
            s,
            &FusionSettings {
                seed: 1,
                ..Default::default()
            },
        );
        for full in [true, false] {
            let ya = a.forward(&inputs(full), true).unwrap();
            assert_eq!(ya.fused.dims(), &[2, 8], "{s:?}");
            let yb = again.forward(&inputs(full), true).unwrap();
            assert_eq!(max_abs_diff(&ya.fused, &yb.fused), 0.0, "{s:?}");
            if !matches!(s, FusionStrategy::Middle(o) if o.gate == GateKind::Tanh) {
                let yc = other.forward(&inputs(full), false).unwrap();
                assert!(max_abs_diff(&ya.fused, &yc.fused) > 1e-4, "{s:?}");
            }
        }
        let path = dir.join(format!("{k}.safetensors"));
        a.save(&path).unwrap();
        let b = build(
            s,
            &FusionSettings {
                weights: Some(path.clone()),
                ..Default::default()
            },
        );
        assert!(!b.is_untrained());
        assert_eq!(a.tensor_names().len(), b.tensor_names().len());
        let (ya, yb) = (
            a.forward(&inputs(true), false).unwrap(),
            b.forward(&inputs(true), false).unwrap(),
        );
        assert_eq!(max_abs_diff(&ya.fused, &yb.fused), 0.0, "{s:?}");
    }
    // A file from another configuration names what does not fit.
    let path = dir.join("0.safetensors");
    let err = Fusion::new(
        &FusionStrategy::Gated(Default::default()),
        &dims(),
        8,
        &FusionSettings {
            weights: Some(path),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`gate.weight` is missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gates_are_zero_for_missing_modalities() {
    for s in [
        FusionStrategy::Gated(Default::default()),
        FusionStrategy::Attention(Default::default()),
        FusionStrategy::Late(LateOptions {
            mode: LateMode::Weighted,
        }),
    ] {
        let f = build(&s, &FusionSettings::default());
        let g = f.forward(&inputs(false), false).unwrap().gates.unwrap();
        let g = g.to_vec2::<f32>().unwrap();
        for row in g {
            assert_eq!(row[2], 0.0, "{s:?}");
            if !matches!(s, FusionStrategy::Gated(_)) {
                assert!((row[0] + row[1] - 1.0).abs() < 1e-6, "{s:?}");
            }
        }
    }
}

#[test]
fn an_untrained_tanh_gated_middle_layer_is_the_identity() {
    // alpha = 0: every layer leaves the projected tokens alone, so the result is the
    // mean over modalities of the pooled, normalised projections.
    let s = FusionStrategy::Middle(stack(GateKind::Tanh));
    let f = build(&s, &FusionSettings::default());
    let got = f.forward(&inputs(false), false).unwrap().fused;
    let p = f.prepare(&inputs(false)).unwrap();
    let mut params = Params::seeded(0, &Device::Cpu);
    let proj = projections(&mut params, "proj", &dims(), 8).unwrap();
    let pools: Vec<Option<Tensor>> = p
        .values
        .iter()
        .zip(&proj)
        .map(|(v, l)| {
            v.as_ref().map(|v| {
                let y = l.forward(&v.tokens).unwrap();
                let y = candle_nn::ops::layer_norm(
                    &y,
                    &Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
                    &Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
                    1e-5,
                )
                .unwrap();
                masked_mean(&y, v.mask.as_ref()).unwrap()
            })
        })
        .collect();
    let want = mean_present(&pools).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);
}

#[test]
fn bad_calls_are_typed_errors() {
    let f = Fusion::new(
        &FusionStrategy::Gated(Default::default()),
        &dims(),
        8,
        &FusionSettings {
            required: vec![I],
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let mut nan = vec![0f32; 2 * 10];
    nan[13] = f32::NAN;
    let nan = Tensor::from_vec(nan, (2, 10), &Device::Cpu).unwrap();
    let cases: Vec<(Vec<(Modality, ModalityInput)>, &str)> = vec![
        (
            vec![(T, ModalityInput::pooled(rand(&[2, 12], 1)))],
            "missing modality `image`: this fusion requires it",
        ),
        (vec![], "missing modality `text`: no modality was given"),
        (
            vec![(I, ModalityInput::pooled(rand(&[2, 9], 1)))],
            "image input: expected width 10",
        ),
        (
            vec![
                (I, ModalityInput::pooled(rand(&[2, 10], 1))),
                (T, ModalityInput::pooled(rand(&[3, 12], 1))),
            ],
            "text input: batch of 3 rows, but `image` has 2",
        ),
        (
            vec![(I, ModalityInput::pooled(nan))],
            "image input 1: non-finite value NaN",
        ),
        (
            vec![(
                I,
                ModalityInput::tokens(rand(&[2, 3, 10], 1), Some(rand(&[2, 4], 1))),
            )],
            "image input: expected a mask of shape [2, 3]",
        ),
        (
            vec![(
                I,
                ModalityInput::tokens(rand(&[2, 3, 10], 1), Some(rand(&[2, 3], 1))),
            )],
            "mask values must be 0 or 1",
        ),
        (
            vec![(I, ModalityInput::pooled(rand(&[2, 0, 10], 1)))],
            "at least one row and one token",
        ),
        (
            vec![(Modality::Video, ModalityInput::pooled(rand(&[2, 4], 1)))],
            "video input: not one of this fusion's modalities (text, image, audio)",
        ),
    ];
    for (inp, want) in cases {
        let err = f.forward(&inp, false).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    let err = Fusion::new(
        &FusionStrategy::Early(stack(GateKind::None)),
        &[(T, 12)],
        9,
        &FusionSettings::default(),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("num_heads"), "{err}");
}

struct Sum;

impl FusionComponent for Sum {
    fn fuse(&self, inputs: &FusionInputs, _: bool) -> Result<FusionOutput> {
        let pooled = inputs.pooled()?;
        Ok(FusionOutput {
            fused: mean_present(&pooled)?,
            gates: None,
            attention: Vec::new(),
        })
    }
}

#[test]
fn custom_components_by_name_and_shape_checked() {
    let s = FusionStrategy::Custom(crate::config::fusion::CustomOptions {
        name: "test-sum".into(),
    });
    let d = [(T, 4), (I, 4)];
    let err = Fusion::new(&s, &d, 4, &FusionSettings::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no fusion component is registered as `test-sum`"),
        "{err}"
    );
    register_component("test-sum", Arc::new(Sum));
    let f = Fusion::new(&s, &d, 4, &FusionSettings::default(), &Device::Cpu).unwrap();
    let (a, b) = (rand(&[2, 4], 1), rand(&[2, 4], 2));
    let y = f
        .forward(
            &[
                (T, ModalityInput::pooled(a.clone())),
                (I, ModalityInput::pooled(b.clone())),
            ],
            false,
        )
        .unwrap()
        .fused;
    let want = ((a + b).unwrap() / 2.0).unwrap();
    assert_eq!(max_abs_diff(&y, &want), 0.0);
    // A component whose output has the wrong width is caught.
    let f = Fusion::with_component(&d, 5, Arc::new(Sum), &[]).unwrap();
    let err = f
        .forward(&[(T, ModalityInput::pooled(rand(&[2, 4], 1)))], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("returned shape [2, 4], expected [2, 5]"),
        "{err}"
    );
}

#[test]
fn early_fused_kernels_equal_the_general_path() {
    // Without attention weights `early` (LayerNorm + GELU) runs on the encoders' fused
    // float32 kernels; with them, on the general path. The fused results agree.
    let f = build(
        &FusionStrategy::Early(stack(GateKind::None)),
        &FusionSettings::default(),
    );
    for full in [true, false] {
        let fast = f.forward(&inputs(full), false).unwrap().fused;
        let general = f.forward(&inputs(full), true).unwrap().fused;
        assert!(max_abs_diff(&fast, &general) < 1e-5);
    }
}

#[test]
fn stacked_projections_equal_the_separate_maps() {
    // sum_m s[b, m] (x_m W_m^T + b_m) with one modality missing, against the maps
    // applied one by one: on the one-product CPU path (contiguous inputs) and on the
    // tensor-op path (transposed views, which the CPU path declines).
    let mut p = Params::seeded(3, &Device::Cpu);
    let st = Stacked::per_modality(&mut p, "proj", &dims(), 7).unwrap();
    let mut p = Params::seeded(3, &Device::Cpu);
    let maps = projections(&mut p, "proj", &dims(), 7).unwrap();
    let s = rand(&[4, 3], 5);
    let views = [
        Some(rand(&[12, 4], 1).t().unwrap()),
        None,
        Some(rand(&[6, 4], 2).t().unwrap()),
    ];
    let mut want: Option<Tensor> = None;
    for (m, (l, x)) in maps.iter().zip(&views).enumerate() {
        if let Some(x) = x {
            let y = l
                .forward(&x.contiguous().unwrap())
                .unwrap()
                .broadcast_mul(&s.narrow(1, m, 1).unwrap())
                .unwrap();
            want = Some(match want {
                None => y,
                Some(w) => (w + y).unwrap(),
            });
        }
    }
    let want = want.unwrap();
    let contiguous: Vec<Option<Tensor>> = views
        .iter()
        .map(|x| x.as_ref().map(|x| x.contiguous().unwrap()))
        .collect();
    assert!(max_abs_diff(&st.forward(&contiguous, Some(&s)).unwrap(), &want) < 1e-6);
    assert!(max_abs_diff(&st.forward(&views, Some(&s)).unwrap(), &want) < 1e-6);
}

/// Token inputs of three rows whose masks leave items with no real token: text row 1
/// and image row 2 are all padding (so text row 2 and image row 1 have no keys when
/// only the two are present); `text_padded` pads every text row.
fn ragged_inputs(audio: bool, text_padded: bool) -> Vec<(Modality, ModalityInput)> {
    let mask = |v: Vec<f32>, t: usize| Tensor::from_vec(v, (3, t), &Device::Cpu).unwrap();
    let tm = if text_padded {
        vec![0f32; 15]
    } else {
        vec![1., 1., 0., 0., 1., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1.]
    };
    let im = vec![1., 0., 1., 1., 1., 1., 0., 0., 0., 0., 0., 0.];
    let mut v = vec![
        (
            T,
            ModalityInput::tokens(rand(&[3, 5, 12], 4), Some(mask(tm, 5))),
        ),
        (
            I,
            ModalityInput::tokens(rand(&[3, 4, 10], 5), Some(mask(im, 4))),
        ),
    ];
    if audio {
        v.push((A, ModalityInput::pooled(rand(&[3, 6], 6))));
    }
    v
}

#[test]
fn packed_token_stacks_equal_the_general_path() {
    // Without attention weights `early` and `middle` (LayerNorm + GELU, no or tanh
    // gates) drop padded tokens and run on packed rows; with them, the general path
    // runs on the padded batch. The fused results agree, including items that have
    // no real token and queries that have no key.
    let dir = std::env::temp_dir().join(format!("mlmf-packed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut fusions = vec![
        build(
            &FusionStrategy::Early(stack(GateKind::None)),
            &FusionSettings::default(),
        ),
        build(
            &FusionStrategy::Middle(stack(GateKind::None)),
            &FusionSettings::default(),
        ),
    ];
    // Tanh gates away from 0, so that folding them into the weights matters.
    let s = FusionStrategy::Middle(stack(GateKind::Tanh));
    let seeded = build(&s, &FusionSettings::default());
    let path = dir.join("seeded.safetensors");
    seeded.save(&path).unwrap();
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut k = 0.0;
    for (name, t) in w.iter_mut() {
        if name.ends_with("_gate") {
            k += 0.3;
            *t = Tensor::new(&[k - 1.0f32], &Device::Cpu).unwrap();
        }
    }
    let path = dir.join("gated.safetensors");
    candle_core::safetensors::save(&w, &path).unwrap();
    let gated = FusionSettings {
        weights: Some(path),
        ..Default::default()
    };
    fusions.push(build(&s, &gated));
    for f in &fusions {
        for (audio, padded) in [(false, false), (true, false), (false, true), (true, true)] {
            let x = ragged_inputs(audio, padded);
            let packed = f.forward(&x, false).unwrap().fused;
            let general = f.forward(&x, true).unwrap().fused;
            let err = max_abs_diff(&packed, &general);
            assert!(
                err < 1e-5,
                "{:?} audio {audio} padded {padded}: {err}",
                f.strategy
            );
        }
        // One modality alone: `middle` has no cross-attention then.
        let x = &ragged_inputs(false, false)[..1];
        let err = max_abs_diff(
            &f.forward(x, false).unwrap().fused,
            &f.forward(x, true).unwrap().fused,
        );
        assert!(err < 1e-5, "{:?} alone: {err}", f.strategy);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
