//! The configuration reference (docs/configuration.md) documents every field the
//! config structs have: a field added without documentation fails here.

use mlmf::config::{MultiModalConfig, PreprocessingConfig};
use mlmf::preprocess::audio::AudioProcessorConfig;
use mlmf::preprocess::image::ImageProcessorConfig;
use mlmf::preprocess::text::TextProcessorConfig;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    std::fs::read_to_string(path).expect("docs/configuration.md")
}

fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(o) = v.as_object() {
        for (k, v) in o {
            out.push(k.clone());
            keys(v, out);
        }
    }
}

#[test]
fn every_config_field_is_documented() {
    let mut cfg = MultiModalConfig::default();
    cfg.modalities.insert(
        mlmf::Modality::Text,
        mlmf::config::ModalityConfig {
            model: Some("m".into()),
            enabled: true,
            preprocessing: PreprocessingConfig::default(),
            dim: Some(8),
            dtype: Some(mlmf::encoders::Precision::Int8),
        },
    );
    cfg.distributed = Some(Default::default());
    cfg.adapters = Some(mlmf::config::AdaptersConfig {
        modalities: vec![mlmf::Modality::Text],
        hidden: Some(8),
        weights: Some("a.safetensors".into()),
        ..Default::default()
    });
    cfg.train = Some(
        serde_json::from_value(serde_json::json!({
            "objectives": [
                {"type": "contrastive", "between": ["text", "image"], "temperature": 0.1,
                 "name": "n", "loss": "sigmoid", "bias": -5.0},
                {"type": "contrastive", "pair": "text->image"},
                {"type": "classify", "num_classes": 3},
                {"type": "regress", "dim": 2}
            ],
            "warmup_steps": 3,
            "stages": [{"name": "s", "modalities": ["text"], "steps": 2}],
            "early_stopping": {"metric": "loss"},
            "checkpoint_every": 5
        }))
        .unwrap(),
    );
    let mut names = Vec::new();
    keys(&cfg.to_value(), &mut names);
    for v in [
        serde_json::to_value(TextProcessorConfig::default()).unwrap(),
        serde_json::to_value(ImageProcessorConfig::clip()).unwrap(),
        serde_json::to_value(AudioProcessorConfig::whisper()).unwrap(),
        serde_json::to_value(mlmf::config::CrossModalAttentionConfig::default()).unwrap(),
        serde_json::to_value(mlmf::preprocess::video::VideoProcessorConfig::default()).unwrap(),
        serde_json::to_value(mlmf::config::fusion::LayerStackOptions::default()).unwrap(),
        serde_json::to_value(mlmf::config::fusion::LateOptions::default()).unwrap(),
        serde_json::to_value(mlmf::config::ModalityCacheConfig::default()).unwrap(),
        serde_json::to_value(mlmf::config::ModalityAssignment::default()).unwrap(),
    ] {
        keys(&v, &mut names);
    }
    names.extend(
        [
            "attention_dim",
            "name",
            "modality_assignments",
            "out_dim",
            "weights",
            "seed",
            "required",
            "inputs",
            "pairs",
            "dtype",
        ]
        .map(String::from),
    );
    let doc = doc();
    let missing: Vec<_> = names
        .iter()
        .filter(|n| {
            ![
                "text",
                "height",
                "width",
                "shortest_edge",
                "type",
                "num_frames",
            ]
            .contains(&n.as_str())
        })
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented config keys: {missing:?}");
}

#[test]
fn documented_example_parses() {
    let doc = doc();
    let start = doc.find("```toml\n").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    let cfg = MultiModalConfig::from_str_as(&doc[start..end], mlmf::config::ConfigFormat::Toml)
        .expect("the example in docs/configuration.md is valid");
    assert_eq!(cfg.modalities.len(), 4);
}

/// Processors built from a config file: checkpoint settings with the file's
/// `preprocessing` keys laid over them, relative model paths resolved against the file.
#[test]
fn processors_from_config_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("mlmf-procs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clip = root.join("tests/fixtures/text/clip_bpe");
    let siglip = root.join("tests/fixtures/image/configs/siglip_small");
    let text = format!(
        "[modalities.text]\nmodel = {clip:?}\npreprocessing = {{ max_length = 5, padding = \"max_length\" }}\n\
         [modalities.image]\nmodel = {siglip:?}\npreprocessing = {{ do_normalize = false }}\n\
         [modalities.audio.preprocessing]\nfeature_size = 128\n\
         [modalities.video.preprocessing]\nsampler = {{ type = \"uniform\", num_frames = 3 }}\n"
    );
    let path = dir.join("mlmf.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = MultiModalConfig::from_file(&path).unwrap();
    let p = mlmf::preprocess::Preprocessors::from_config(&cfg).unwrap();
    let ids = p
        .text
        .unwrap()
        .encode(&["a photo of a cat on a mat"])
        .unwrap();
    assert_eq!(ids.input_ids.shape(), &[1, 5]);
    let image = p.image.unwrap();
    assert!(!image.config().do_normalize);
    assert_eq!(
        image.config().image_mean,
        [0.5; 3],
        "SigLIP checkpoint values kept"
    );
    assert_eq!(p.audio.unwrap().config().feature_size, 128);
    let video = p.video.unwrap();
    assert_eq!(video.sample_indices(9, None).unwrap(), vec![vec![0, 3, 6]]);
    assert!(
        !video.image().config().do_normalize,
        "video frames use the image processor"
    );

    // Errors name the field path.
    std::fs::write(&path, "[modalities.text]\nenabled = true\n").unwrap();
    let cfg = MultiModalConfig::from_file(&path).unwrap();
    let err = mlmf::preprocess::Preprocessors::from_config(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`modalities.text.model`"), "{err}");
    std::fs::write(&path, "[modalities.image]\nmodel = \"nowhere\"\n").unwrap();
    let cfg = MultiModalConfig::from_file(&path).unwrap();
    let err = mlmf::preprocess::Preprocessors::from_config(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
