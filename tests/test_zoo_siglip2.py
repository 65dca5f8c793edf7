"""SigLIP 2: NaFlex patches, both towers, similarity and zero-shot against transformers
(tests/fixtures/zoo, made by scripts/fixtures_siglip2.py)."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES

ZOO = FIXTURES / "zoo"
EXPECTED = json.loads((ZOO / "expected.json").read_text())
TOL = EXPECTED["tolerance"]
CASE = EXPECTED["siglip2"]
MODEL = ZOO / CASE["model"]


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / CASE["arrays"]) as z:
        return {k: z[k] for k in z.files}


def files() -> list[str]:
    return [str(FIXTURES / im["file"]) for im in CASE["images"]]


def real_rows(ref: dict) -> np.ndarray:
    return ref["pixel_attention_mask"].astype(bool)


def test_patches_equal_the_reference_processor_bit_for_bit(ref):
    proc = mlmf.PatchImageProcessor.from_pretrained(MODEL)
    assert (proc.config["patch_size"], proc.config["max_num_patches"]) == (5, 20)
    out = proc(files())
    assert out["pixel_values"].shape == ref["pixel_values"].shape == (7, 20, 75)
    np.testing.assert_array_equal(out["spatial_shapes"], ref["spatial_shapes"])
    np.testing.assert_array_equal(out["pixel_attention_mask"], ref["pixel_attention_mask"])
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    # Survives pickling (Ray workers) with its settings.
    back = pickle.loads(pickle.dumps(proc))
    np.testing.assert_array_equal(back(files()[:2])["pixel_values"], out["pixel_values"][:2])


def test_patch_grids_follow_the_reference_binary_search():
    proc = mlmf.PatchImageProcessor(patch_size=5, max_num_patches=20)
    for im in CASE["images"]:
        h, w = im["size_hw"]
        out = proc([np.zeros((h, w, 3), np.uint8)])
        assert out["spatial_shapes"][0].tolist() == im["spatial_shape"], im["file"]


def test_image_embeddings_equal_transformers(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL)
    assert (enc.model_type, enc.modality, enc.output_dim) == ("siglip2", "image", 36)
    out = enc.encode(files())
    assert out.hidden_states.shape == (7, 20, 36)
    np.testing.assert_array_equal(out.mask, ref["pixel_attention_mask"])
    m = real_rows(ref)
    np.testing.assert_allclose(out.hidden_states[m], ref["vision.hidden_states"][m], atol=TOL)
    np.testing.assert_allclose(out.pooled, ref["vision.pooled"], atol=TOL)
    # The reference's own patches give the same result.
    direct = enc.encode(
        {"pixel_values": ref["pixel_values"], "spatial_shapes": ref["spatial_shapes"]}
    )
    np.testing.assert_allclose(direct.pooled, ref["vision.pooled"], atol=TOL)


def test_padding_patches_do_not_change_an_image(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL)
    x = ref["pixel_values"][5:6].copy()  # a 3 x 6 grid: 2 padding rows
    grid = ref["spatial_shapes"][5:6]
    a = enc.encode({"pixel_values": x, "spatial_shapes": grid}).pooled
    x[0, 18:] = 7.0
    b = enc.encode({"pixel_values": x, "spatial_shapes": grid}).pooled
    np.testing.assert_array_equal(a, b)


def test_tokens_equal_the_siglip2_tokenizer(ref):
    # transformers tokenizes SigLIP 2 text with its Siglip2Tokenizer (lower-cased, left
    # padding), not with the shipped tokenizer.json's own pipeline.
    tp = mlmf.TextProcessor.from_pretrained(MODEL)
    out = tp(CASE["texts"], padding="max_length", max_length=16)
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
    assert ref["attention_mask"][:, 0].min() == 0, "left padding is exercised"
    raw = CASE["raw_input_ids"]
    assert any(
        r != list(t[m.astype(bool)])
        for r, t, m in zip(raw, out["input_ids"], out["attention_mask"])
    )
    assert tp("A CAT")["input_ids"].tolist() == tp("a cat")["input_ids"].tolist()


def test_text_embeddings_equal_transformers(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL, modality="text")
    assert (enc.model_type, enc.modality) == ("siglip2", "text")
    out = enc.encode(CASE["texts"])
    np.testing.assert_allclose(out.pooled, ref["text.pooled"], atol=TOL)


@pytest.fixture(scope="module")
def model() -> mlmf.MultiModalModel:
    d = str(MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlmf.MultiModalModel.load(
            {
                "modalities": {"text": {"model": d}, "image": {"model": d}},
                "fusion": {"strategy": "late", "mode": "similarity"},
            }
        )


def test_similarity_equals_transformers(ref, model):
    s = model.similarity(CASE["texts"], image=files())
    np.testing.assert_allclose(s.logits_per_text, ref["logits_per_text"], atol=TOL, rtol=0)
    np.testing.assert_allclose(s.logits_per_image, ref["logits_per_image"], atol=TOL, rtol=0)
    assert s.family == "siglip2"
    assert s.logit_scale == pytest.approx(CASE["logit_scale"], abs=1e-6)
    assert s.logit_bias == pytest.approx(CASE["logit_bias"], abs=1e-6)


def test_zero_shot_equals_transformers(ref, model):
    r = model.zero_shot(image=files(), labels=CASE["labels"], template=CASE["template"])
    assert r.prompts == CASE["prompts"]
    np.testing.assert_allclose(r.logits, ref["zero_shot.logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(r.probs, ref["zero_shot.probs"], atol=1e-5, rtol=0)
    assert r.best == CASE["zero_shot"]["best"]


def test_bad_inputs_name_what_was_expected(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL)
    with pytest.raises(mlmf.InputError, match=r"expected variable-resolution patches \[B, N, 75\]"):
        enc.encode(np.zeros((1, 3, 20, 25), np.float32))
    with pytest.raises(mlmf.InputError, match=r"image input 1: expected a patch grid of 1 to 20"):
        enc.encode({"pixel_values": ref["pixel_values"][:2], "spatial_shapes": [[4, 5], [5, 5]]})
    with pytest.raises(mlmf.InputError, match="pixel_values"):
        enc.encode({"spatial_shapes": [[4, 5]]})
    with pytest.raises(mlmf.InputError, match="variable-resolution patches"):
        mlmf.Encoder.from_pretrained(MODEL, modality="video")
    with pytest.raises(mlmf.ConfigError, match="max_num_patches"):
        mlmf.PatchImageProcessor(max_num_patches=0)


def test_bad_checkpoints_are_named(tmp_path):
    d = tmp_path / "s2"
    shutil.copytree(MODEL, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["num_patches"] = 15
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ConfigError, match="num_patches.*square"):
        mlmf.Encoder.from_pretrained(d)
    cfg["vision_config"]["num_patches"] = 25
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ModelLoadError, match=r"position_embedding\.weight` has shape"):
        mlmf.Encoder.from_pretrained(d)


def test_inspect_names_the_patch_processor(capsys):
    from mlmf import cli

    cli.main(["inspect", str(MODEL)])
    out = capsys.readouterr().out
    assert "PatchImageProcessor" in out and "siglip2" in out, out
    assert "aligned heads  logit_scale, logit_bias" in out, out
