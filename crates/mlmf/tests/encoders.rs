//! Encoders on the tiny fixture checkpoints, against the transformers outputs stored in
//! tests/fixtures/encoders/expected.npz (made by scripts/make_fixtures.py).

mod common;

use std::path::PathBuf;

use common::{array, expected, fixtures, ids, manifest_case, max_diff};
use mlmf::encoders::{Encoder, EncoderInput, EncoderOptions};
use mlmf::preprocess::text::TextBatch;
use mlmf::{MlmfError, Modality};
use ndarray::Array4;

fn load(id: &str, modality: Modality) -> (Encoder, serde_json::Value) {
    let case = manifest_case(id);
    let dir = fixtures().join(case["model"].as_str().unwrap());
    let opts = EncoderOptions {
        modality: Some(modality),
        ..Default::default()
    };
    (Encoder::from_pretrained(dir, &opts).unwrap(), case)
}

#[test]
fn bert_matches_transformers() {
    let npz = expected();
    let (enc, case) = load("bert_tiny_pair", Modality::Text);
    let batch = TextBatch {
        input_ids: ids(&array(&npz, &case["inputs"]["input_ids"])),
        attention_mask: ids(&array(&npz, &case["inputs"]["attention_mask"])),
        token_type_ids: ids(&array(&npz, &case["inputs"]["token_type_ids"])),
    };
    let out = enc.encode(&EncoderInput::Text(batch)).unwrap();
    assert!(max_diff(&out.pooled, &array(&npz, &case["outputs"]["pooled"])) < 1e-4);
    assert!(
        max_diff(
            &out.hidden_states,
            &array(&npz, &case["outputs"]["hidden_states"])
        ) < 1e-4
    );
}

#[test]
fn vit_matches_transformers_and_checks_pixel_shapes() {
    let npz = expected();
    let (enc, case) = load("vit_tiny", Modality::Image);
    let px = array(&npz, &case["inputs"]["pixel_values"]);
    let dims = px.dims().to_vec();
    let data = px.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let px = Array4::from_shape_vec((dims[0], dims[1], dims[2], dims[3]), data).unwrap();
    let out = enc.encode(&EncoderInput::Image(px)).unwrap();
    assert!(max_diff(&out.pooled, &array(&npz, &case["outputs"]["pooled"])) < 1e-4);

    let wrong = Array4::<f32>::zeros((1, 3, 31, 30));
    let err = enc.encode(&EncoderInput::Image(wrong)).unwrap_err();
    assert!(
        matches!(&err, MlmfError::Input { modality: Modality::Image, message, .. } if message.contains("[B >= 1, 3, 30, 30]")),
        "{err}"
    );
    let err = enc
        .encode(&EncoderInput::Audio {
            features: ndarray::Array3::zeros((1, 80, 3000)),
            valid_frames: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("takes image input"), "{err}");
}

#[test]
fn unknown_model_type_is_refused_with_the_list() {
    let dir = tempdir("unknown_type");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    std::fs::copy(
        fixtures().join("models/vit_tiny/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = Encoder::from_pretrained(&dir, &EncoderOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"mamba\"") && msg.contains("siglip_vision_model"),
        "{msg}"
    );
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mlmf-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
