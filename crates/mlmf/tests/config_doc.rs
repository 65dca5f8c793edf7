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
        },
    );
    cfg.distributed = Some(Default::default());
    let mut names = Vec::new();
    keys(&cfg.to_value(), &mut names);
    for v in [
        serde_json::to_value(TextProcessorConfig::default()).unwrap(),
        serde_json::to_value(ImageProcessorConfig::clip()).unwrap(),
        serde_json::to_value(AudioProcessorConfig::whisper()).unwrap(),
        serde_json::to_value(mlmf::config::CrossModalAttentionConfig::default()).unwrap(),
    ] {
        keys(&v, &mut names);
    }
    names.extend(["attention_dim", "name", "modality_assignments"].map(String::from));
    let doc = doc();
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !["text", "height", "width", "shortest_edge"].contains(&n.as_str()))
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
    assert_eq!(cfg.modalities.len(), 3);
}
