//! The encoders and the cross-modal attention on CUDA against the same stages on the CPU
//! in float32 (within 1e-4). Built with `--features cuda` only (`make check-cuda` compiles
//! it); where no GPU opens, each test says why on stderr and returns.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{Device, Tensor};
use common::{array, expected, fixtures, ids, manifest_case, max_diff};
use mlmf::attention::CrossModalAttention;
use mlmf::config::CrossModalAttentionConfig;
use mlmf::device::DeviceSpec;
use mlmf::encoders::{Encoder, EncoderInput, EncoderOptions};
use mlmf::preprocess::text::TextBatch;
use mlmf::Modality;
use ndarray::{Array3, Array4};

const ATOL: f32 = 1e-4;

/// The GPU, or `None` (with the reason printed) when it cannot be opened here.
fn gpu() -> Option<Device> {
    match DeviceSpec::Cuda(0).open() {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no usable GPU: {e}");
            None
        }
    }
}

fn load(id: &str, modality: Modality, device: DeviceSpec) -> (Encoder, serde_json::Value) {
    let case = manifest_case(id);
    let dir = fixtures().join(case["model"].as_str().unwrap());
    let opts = EncoderOptions {
        modality: Some(modality),
        device,
        ..Default::default()
    };
    (Encoder::from_pretrained(dir, &opts).unwrap(), case)
}

fn to4(t: &Tensor) -> Array4<f32> {
    let d = t.dims().to_vec();
    let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Array4::from_shape_vec((d[0], d[1], d[2], d[3]), data).unwrap()
}

fn to3(t: &Tensor) -> Array3<f32> {
    let d = t.dims().to_vec();
    let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Array3::from_shape_vec((d[0], d[1], d[2]), data).unwrap()
}

/// Encodes case `id`'s stored inputs on the CPU and on the GPU; compares the outputs.
fn same_on_both(id: &str, modality: Modality) {
    if gpu().is_none() {
        return;
    }
    let npz = expected();
    let (cpu, case) = load(id, modality, DeviceSpec::Cpu);
    let (cuda, _) = load(id, modality, DeviceSpec::Cuda(0));
    let input = |k: &str| array(&npz, &case["inputs"][k]);
    let x = match modality {
        Modality::Text => EncoderInput::Text(TextBatch {
            input_ids: ids(&input("input_ids")),
            attention_mask: ids(&input("attention_mask")),
            token_type_ids: ids(&input("token_type_ids")),
        }),
        Modality::Image => EncoderInput::Image(to4(&input("pixel_values"))),
        _ => EncoderInput::Audio {
            features: to3(&input("input_features")),
            valid_frames: None,
        },
    };
    let (a, b) = (cpu.encode(&x).unwrap(), cuda.encode(&x).unwrap());
    assert!(b.pooled.device().is_cuda() || b.pooled.device().is_cpu());
    let d = max_diff(&a.pooled, &b.pooled.to_device(&Device::Cpu).unwrap());
    assert!(d < ATOL, "{id} pooled: {d}");
    let h = b.hidden_states.to_device(&Device::Cpu).unwrap();
    let d = max_diff(&a.hidden_states, &h);
    assert!(d < ATOL, "{id} hidden states: {d}");
}

#[test]
fn bert_on_cuda_equals_the_cpu() {
    same_on_both("bert_tiny", Modality::Text);
}

#[test]
fn vit_on_cuda_equals_the_cpu() {
    same_on_both("vit_tiny", Modality::Image);
}

#[test]
fn clip_vision_on_cuda_equals_the_cpu() {
    same_on_both("clip_vision_tiny", Modality::Image);
}

#[test]
fn whisper_on_cuda_equals_the_cpu() {
    same_on_both("whisper_tiny", Modality::Audio);
}

#[test]
fn attention_on_cuda_equals_the_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg = CrossModalAttentionConfig {
        num_heads: 4,
        ..Default::default()
    };
    let (b, tq, tk, dim, kv_dim) = (2, 5, 7, 32, 24);
    let data = |n: usize, s: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + s) % 101) as f32 / 50.0 - 1.0)
            .collect()
    };
    let on = |device: &Device| {
        let layer = CrossModalAttention::new(dim, kv_dim, &cfg, 3, device).unwrap();
        let q = Tensor::from_vec(data(b * tq * dim, 1), (b, tq, dim), device).unwrap();
        let kv = Tensor::from_vec(data(b * tk * kv_dim, 2), (b, tk, kv_dim), device).unwrap();
        let mask = Tensor::from_vec(
            vec![1u8, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            (b, tk),
            device,
        )
        .unwrap();
        let out = layer.forward(&q, &kv, None, Some(&mask), true).unwrap();
        let cpu = |t: Tensor| t.to_device(&Device::Cpu).unwrap();
        (cpu(out.output), cpu(out.weights.unwrap()))
    };
    let (a, wa) = on(&Device::Cpu);
    let (g, wg) = on(&dev);
    assert!(max_diff(&a, &g) < ATOL, "output: {}", max_diff(&a, &g));
    assert!(max_diff(&wa, &wg) < ATOL, "weights: {}", max_diff(&wa, &wg));
}
