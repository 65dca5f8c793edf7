use std::path::{Path, PathBuf};

use ndarray::ArrayD;

use super::*;
use crate::config::fusion::AttentionFusionOptions;
use crate::config::{FusionStrategy, ModalityConfig};
use crate::encoders::EncoderOptions;
use crate::fusion::FusionSettings;
use crate::loader::MultiModalLoader;
use crate::preprocess::audio::AudioInput;
use crate::preprocess::image::ImageInput;
use crate::preprocess::Source;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ckpt(name: &str) -> PathBuf {
    root().join("tests/fixtures/encoders/models").join(name)
}

fn data(name: &str) -> PathBuf {
    root().join("python/mlmf/data").join(name)
}

/// Text (sentence-transformers BERT), image (CLIP vision) and audio (Whisper).
fn config() -> MultiModalConfig {
    let mut c = MultiModalConfig::default();
    for (m, dir) in [
        (Modality::Text, "st_mean_norm"),
        (Modality::Image, "clip_vision_tiny"),
        (Modality::Audio, "whisper_tiny"),
    ] {
        c.modalities.insert(
            m,
            ModalityConfig {
                model: Some(ckpt(dir)),
                ..ModalityConfig::default()
            },
        );
    }
    c.fusion.strategy = FusionStrategy::Attention(AttentionFusionOptions {
        attention_dim: Some(16),
    });
    c.fusion.out_dim = Some(24);
    c
}

fn load(c: MultiModalConfig) -> MultiModalModel {
    MultiModalLoader::new(c).load().unwrap()
}

fn texts() -> RawInputs {
    RawInputs::Text(vec![
        "a red square".into(),
        "two tones, one after the other".into(),
        "a red square".into(),
    ])
}

fn pixels(seed: u8) -> ImageInput {
    let v: Vec<u8> = (0..40 * 30 * 3)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    ImageInput::Array(ArrayD::from_shape_vec(vec![40, 30, 3], v).unwrap())
}

fn images() -> RawInputs {
    RawInputs::Image(vec![
        ImageInput::Source(Source::Path(data("sample.jpg"))),
        pixels(7),
        pixels(11),
    ])
}

fn audio() -> RawInputs {
    let tone: Vec<f32> = (0..8000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    RawInputs::Audio(vec![
        AudioInput::Source(Source::Path(data("sample.flac"))),
        AudioInput::Samples {
            data: ndarray::Array2::from_shape_vec((1, 8000), tone).unwrap(),
            sampling_rate: Some(16000),
        },
        AudioInput::Source(Source::Path(data("sample.flac"))),
    ])
}

fn full_input() -> MultiModalInput {
    MultiModalInput::default()
        .with(texts())
        .with(images())
        .with(audio())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .sub(&b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn infer_equals_the_stages_run_by_hand() {
    let c = config();
    let model = load(c.clone());
    let out = model.infer(full_input()).unwrap();

    // The same stages by hand: each encoder on its raw batch, then the fusion.
    let mut inputs = Vec::new();
    for (m, raw) in [
        (Modality::Text, texts()),
        (Modality::Image, images()),
        (Modality::Audio, audio()),
    ] {
        let enc = Encoder::from_pretrained(
            c.modalities[&m].model.as_ref().unwrap(),
            &EncoderOptions {
                modality: Some(m),
                ..EncoderOptions::default()
            },
        )
        .unwrap();
        let o = enc.encode_raw(&raw).unwrap();
        assert_eq!(max_diff(&out.embeddings[&m], &o.pooled), 0.0, "{m}");
        inputs.push((m, ModalityInput::pooled(o.pooled)));
    }
    let dims: Vec<(Modality, usize)> = model.fusion().modalities().to_vec();
    let fusion = Fusion::new(
        &c.fusion.strategy,
        &dims,
        24,
        &FusionSettings::default(),
        &Device::Cpu,
    )
    .unwrap();
    let f = fusion.forward(&inputs, false).unwrap();
    assert_eq!(max_diff(&out.fused, &f.fused), 0.0);
    assert_eq!(
        max_diff(out.gates.as_ref().unwrap(), f.gates.as_ref().unwrap()),
        0.0
    );
    assert_eq!(out.fused.dims(), &[3, 24]);
}

#[test]
fn a_second_call_is_served_from_the_caches() {
    let model = load(config());
    let first = model.infer(full_input()).unwrap();
    // Row 0 and row 2 share their text; audio rows 0 and 2 are the same file.
    assert_eq!(first.stats.modalities["text"].encoded, 2);
    assert_eq!(first.stats.modalities["audio"].encoded, 2);
    assert_eq!(first.stats.modalities["image"].encoded, 3);
    assert!(!first.stats.fusion_cached);
    let second = model.infer(full_input()).unwrap();
    for m in ["text", "image", "audio"] {
        let s = &second.stats.modalities[m];
        assert_eq!((s.hits, s.encoded), (3, 0), "{m}");
    }
    assert!(second.stats.fusion_cached);
    assert_eq!(max_diff(&first.fused, &second.fused), 0.0);
    for m in [Modality::Text, Modality::Image, Modality::Audio] {
        assert_eq!(max_diff(&first.embeddings[&m], &second.embeddings[&m]), 0.0);
    }
    let stats = model.stats();
    assert_eq!(stats.calls, 2);
    let text = &stats.modalities["text"];
    assert_eq!((text.items, text.encoded), (6, 2));
    let cache = text.cache.as_ref().unwrap();
    assert_eq!(cache.entries, 2);
    assert!(cache.bytes > 0 && stats.cached_bytes >= cache.bytes);
    assert_eq!(text.encode.count, 1);
    model.reset_stats();
    assert_eq!(model.stats().calls, 0);
}

#[test]
fn an_item_cached_from_one_batch_matches_it_encoded_in_another() {
    let model = load(config());
    let a = model
        .infer(MultiModalInput::default().with(texts()))
        .unwrap();
    let alone = MultiModalModel::assemble(Parts {
        config: {
            let mut c = config();
            c.cache.enabled = false;
            c
        },
        producers: model
            .inner
            .slots
            .iter()
            .filter_map(|s| s.encoder.clone().map(Producer::Encoder))
            .collect(),
        device: Device::Cpu,
    })
    .unwrap();
    let b = alone
        .infer(MultiModalInput::default().with(RawInputs::Text(vec![
            "two tones, one after the other".into(),
        ])))
        .unwrap();
    let row = a.embeddings[&Modality::Text].get(1).unwrap();
    let d = max_diff(&row, &b.embeddings[&Modality::Text].get(0).unwrap());
    assert!(d < 1e-5, "{d}");
    // Caching changes nothing about a cold call.
    let c = alone
        .infer(MultiModalInput::default().with(texts()))
        .unwrap();
    assert_eq!(max_diff(&a.fused, &c.fused), 0.0);
}

#[test]
fn files_are_keyed_by_content_and_ids_replace_content() {
    let model = load(config());
    let dir = std::env::temp_dir().join(format!("mlmf-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("renamed.jpg");
    std::fs::copy(data("sample.jpg"), &copy).unwrap();
    let one = |p: PathBuf| {
        MultiModalInput::default().with(RawInputs::Image(vec![ImageInput::Source(Source::Path(p))]))
    };
    model.infer(one(data("sample.jpg"))).unwrap();
    let again = model.infer(one(copy.clone())).unwrap();
    assert_eq!(again.stats.modalities["image"].hits, 1);
    // Bytes of the file: the same key as its path.
    let bytes = std::fs::read(&copy).unwrap();
    let b = model
        .infer(
            MultiModalInput::default().with(RawInputs::Image(vec![ImageInput::Source(
                Source::Bytes(bytes),
            )])),
        )
        .unwrap();
    assert_eq!(b.stats.modalities["image"].hits, 1);
    // A caller id: keyed by the id, not the content.
    let mut with_id = one(copy);
    with_id
        .ids
        .insert(Modality::Image, vec!["photo-1".to_string()]);
    let c = model.infer(with_id.clone()).unwrap();
    assert_eq!(c.stats.modalities["image"].encoded, 1);
    let d = model.infer(with_id).unwrap();
    assert_eq!(d.stats.modalities["image"].hits, 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn concurrent_identical_calls_encode_once() {
    let model = load(config());
    let input = MultiModalInput::default().with(images()).with(texts());
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (model, input) = (model.clone(), input.clone());
            s.spawn(move || model.infer(input).unwrap());
        }
    });
    let stats = model.stats();
    assert_eq!(stats.calls, 8);
    assert_eq!(stats.modalities["image"].encoded, 3);
    assert_eq!(stats.modalities["text"].encoded, 2);
}

#[test]
fn disabled_modalities_are_skipped_until_enabled() {
    let mut c = config();
    c.modalities.get_mut(&Modality::Audio).unwrap().enabled = false;
    let model = load(c);
    assert_eq!(
        model.enabled_modalities(),
        vec![Modality::Text, Modality::Image]
    );
    let out = model.infer(full_input()).unwrap();
    assert_eq!(out.skipped, vec![Modality::Audio]);
    assert!(!out.embeddings.contains_key(&Modality::Audio));
    // The result equals fusing only the present modalities.
    let two = model
        .infer(MultiModalInput::default().with(texts()).with(images()))
        .unwrap();
    assert_eq!(max_diff(&out.fused, &two.fused), 0.0);
    model.set_enabled(Modality::Audio, true).unwrap();
    let out = model.infer(full_input()).unwrap();
    assert!(out.skipped.is_empty());
    assert!(out.embeddings.contains_key(&Modality::Audio));
    model.set_enabled(Modality::Text, false).unwrap();
    model.set_enabled(Modality::Image, false).unwrap();
    model.set_enabled(Modality::Audio, false).unwrap();
    let err = model.infer(full_input()).unwrap_err();
    assert!(matches!(err, MlmfError::MissingModality { .. }), "{err}");
    assert!(model.set_enabled(Modality::Video, true).is_err());
}

#[test]
fn bad_calls_are_typed_errors_naming_the_modality() {
    let model = load(config());
    let err = model
        .infer(
            MultiModalInput::default()
                .with(texts())
                .with(RawInputs::Image(vec![pixels(3)])),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            MlmfError::Input {
                modality: Modality::Image,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("1 items, but text has 3"), "{err}");

    let err = model
        .infer(MultiModalInput::default().with(RawInputs::Video(vec![])))
        .unwrap_err();
    assert!(err.to_string().contains("no video modality"), "{err}");

    let mut bad_ids = MultiModalInput::default().with(texts());
    bad_ids.ids.insert(Modality::Text, vec!["x".into()]);
    let err = model.infer(bad_ids).unwrap_err();
    assert!(err.to_string().contains("1 ids for 3 items"), "{err}");

    // A corrupt file: the error names the modality and the item's index in the call,
    // even when the items before it came from the cache.
    model
        .infer(MultiModalInput::default().with(RawInputs::Image(vec![pixels(5)])))
        .unwrap();
    let err = model
        .infer(MultiModalInput::default().with(RawInputs::Image(vec![
            pixels(5),
            ImageInput::Source(Source::Bytes(b"not an image".to_vec())),
        ])))
        .unwrap_err();
    match &err {
        MlmfError::Decode {
            modality, index, ..
        } => {
            assert_eq!((*modality, *index), (Modality::Image, Some(1)), "{err}")
        }
        MlmfError::Input {
            modality, index, ..
        } => {
            assert_eq!((*modality, *index), (Modality::Image, Some(1)), "{err}")
        }
        other => panic!("{other}"),
    }
    let err = model
        .infer(
            MultiModalInput::default().with(RawInputs::Audio(vec![AudioInput::Source(
                Source::Path("/no/such/file.wav".into()),
            )])),
        )
        .unwrap_err();
    assert!(err.to_string().contains("audio"), "{err}");
    assert!(MultiModalLoader::new(MultiModalConfig::default())
        .load()
        .is_err());
}

#[test]
fn attention_pairs_return_cached_maps() {
    let mut c = config();
    c.cross_modal_attention.num_heads = 2;
    c.cross_modal_attention.pairs = vec!["text->image".parse().unwrap()];
    let model = load(c);
    assert_eq!(model.attention_pairs().len(), 1);
    let mut input = MultiModalInput::default().with(texts()).with(images());
    input.return_attention = true;
    let a = model.infer(input.clone()).unwrap();
    let (name, w) = &a.attention[0];
    assert_eq!(name, "text->image");
    let tq = a.tokens[&Modality::Text].mask.dim(1).unwrap();
    let tk = a.tokens[&Modality::Image].mask.dim(1).unwrap();
    assert_eq!(w.dims(), &[3, 2, tq, tk]);
    // Rows sum to 1 over the keys for real query positions.
    let sums = w.sum(3).unwrap().get(0).unwrap().get(0).unwrap();
    let first: f32 = sums.get(0).unwrap().to_scalar().unwrap();
    assert!((first - 1.0).abs() < 1e-5, "{first}");
    let b = model.infer(input).unwrap();
    assert_eq!(max_diff(w, &b.attention[0].1), 0.0);
    assert_eq!(model.stats().attention_cache.unwrap().hits, 3);

    let mut bad = config();
    bad.cross_modal_attention.pairs = vec!["text->video".parse().unwrap()];
    let err = MultiModalLoader::new(bad).load().unwrap_err().to_string();
    assert!(err.contains("cross_modal_attention.pairs.0"), "{err}");
}

#[test]
fn token_level_fusion_runs_on_padded_items() {
    let mut c = config();
    c.fusion.strategy = FusionStrategy::Early(Default::default());
    c.fusion.out_dim = Some(16);
    c.cross_modal_attention.num_heads = 2;
    let model = load(c.clone());
    assert_eq!(model.fusion_level(), FusionLevel::Tokens);
    let mut input = MultiModalInput::default().with(texts()).with(images());
    input.return_attention = true;
    let a = model.infer(input.clone()).unwrap();
    assert!(a.attention.iter().any(|(n, _)| n == "fusion/layers.0"));
    // By hand: the encoders' own token states (padding positions as the encoder left
    // them) give the same fused rows.
    let mut inputs = Vec::new();
    for (m, raw) in [(Modality::Text, texts()), (Modality::Image, images())] {
        let o = model.encoder(m).unwrap().encode_raw(&raw).unwrap();
        inputs.push((m, ModalityInput::tokens(o.hidden_states, Some(o.mask))));
    }
    let f = model.fusion().forward(&inputs, false).unwrap();
    let d = max_diff(&a.fused, &f.fused);
    assert!(d < 1e-6, "{d}");
    input.return_attention = false;
    let b = model.infer(input).unwrap();
    assert!(b.stats.fusion_cached);
    assert_eq!(max_diff(&a.fused, &b.fused), 0.0);
}

#[test]
fn load_async_on_tokio() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let model = rt
        .block_on(MultiModalLoader::new(config()).load_async())
        .unwrap();
    assert_eq!(model.modalities().len(), 3);
}

#[test]
fn the_disk_tier_serves_a_fresh_model() {
    let dir = std::env::temp_dir().join(format!("mlmf-model-disk-{}", std::process::id()));
    let mut c = config();
    c.cache.disk = Some(crate::config::DiskCacheConfig {
        path: dir.join("cache.redb"),
    });
    let first = load(c.clone());
    let a = first.infer(full_input()).unwrap();
    assert_eq!(first.stats().disk.unwrap().writes, 7);
    drop(first);
    let second = load(c);
    let b = second.infer(full_input()).unwrap();
    for m in ["text", "image", "audio"] {
        let s = &b.stats.modalities[m];
        assert_eq!(s.encoded, 0, "{m}");
        assert_eq!(s.disk_hits, 3, "{m}");
    }
    assert_eq!(max_diff(&a.fused, &b.fused), 0.0);
    let (entries, bad) = second.disk_cache().unwrap().verify().unwrap();
    assert_eq!((entries, bad), (7, 0));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn given_embeddings_for_a_modality_without_a_checkpoint() {
    let custom = Modality::Custom(3);
    let model = MultiModalLoader::new(config())
        .with_given_modality(custom, 6)
        .load()
        .unwrap();
    assert!(model.encoder(custom).is_err());
    let emb = Tensor::arange(0f32, 18.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 6))
        .unwrap();
    let mut input = MultiModalInput::default().with(texts());
    input
        .embeddings
        .insert(custom, ModalityInput::pooled(emb.clone()));
    let out = model.infer(input.clone()).unwrap();
    assert_eq!(max_diff(&out.embeddings[&custom], &emb), 0.0);
    // By hand: the fusion on the text encoder's output and the given rows.
    let text = model
        .encoder(Modality::Text)
        .unwrap()
        .encode_raw(&texts())
        .unwrap();
    let f = model
        .fusion()
        .forward(
            &[
                (Modality::Text, ModalityInput::pooled(text.pooled)),
                (custom, ModalityInput::pooled(emb.clone())),
            ],
            false,
        )
        .unwrap();
    assert_eq!(max_diff(&out.fused, &f.fused), 0.0);
    // Repeated: the fused rows come from the cache (keyed by the given bytes too).
    assert!(model.infer(input).unwrap().stats.fusion_cached);
    // Token-level embeddings are pooled by their masked mean.
    let tokens = Tensor::ones((3, 4, 6), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::from_vec([1f32, 1., 0., 0.].repeat(3), (3, 4), &Device::Cpu).unwrap();
    let mut input = MultiModalInput {
        return_tokens: true,
        ..MultiModalInput::default()
    };
    input
        .embeddings
        .insert(custom, ModalityInput::tokens(tokens, Some(mask)));
    let out = model.infer(input).unwrap();
    assert_eq!(out.tokens[&custom].mask.dims(), &[3, 2]);
    // Wrong width, wrong batch, both raw and given: typed errors naming the modality.
    let mut bad = MultiModalInput::default().with(texts());
    bad.embeddings.insert(
        custom,
        ModalityInput::pooled(Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap()),
    );
    let err = model.infer(bad).unwrap_err().to_string();
    assert!(err.contains("custom:3") && err.contains("6 wide"), "{err}");
    let mut bad = MultiModalInput::default().with(texts());
    bad.embeddings.insert(
        custom,
        ModalityInput::pooled(Tensor::zeros((2, 6), DType::F32, &Device::Cpu).unwrap()),
    );
    assert!(model.infer(bad).is_err());
    let mut bad = MultiModalInput::default().with(texts());
    bad.embeddings.insert(
        Modality::Text,
        ModalityInput::pooled(Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap()),
    );
    assert!(model.infer(bad).unwrap_err().to_string().contains("both"));
    // A custom modality with neither model nor dim is a config error.
    let mut c = config();
    c.modalities.insert(custom, ModalityConfig::default());
    let err = MultiModalLoader::new(c).load().unwrap_err().to_string();
    assert!(err.contains("modalities.custom:3.dim"), "{err}");
}
