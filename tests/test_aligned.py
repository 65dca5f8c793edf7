"""Similarity and zero-shot from an aligned checkpoint's own heads (CLIP, SigLIP),
against transformers' CLIPModel / SiglipModel (tests/fixtures/aligned, made by
scripts/fixtures_aligned.py), and late fusion's `similarity` mode."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES
from mlmf import cli

EXPECTED = json.loads((FIXTURES / "aligned" / "expected.json").read_text())
TOL = EXPECTED["tolerance"]
FAMILIES = sorted(EXPECTED["families"])
MODELS = FIXTURES / "encoders" / "models"


def case(family: str) -> dict:
    return EXPECTED["families"][family]


def images(c: dict) -> list[str]:
    return [str(FIXTURES / f) for f in c["images"]]


def model_for(family: str, mode: str = "similarity", **fusion) -> mlmf.MultiModalModel:
    d = str(FIXTURES / case(family)["model"])
    return mlmf.MultiModalModel.load(
        {
            "modalities": {"text": {"model": d}, "image": {"model": d}},
            "fusion": {"strategy": "late", "mode": mode, **fusion},
        }
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family) -> mlmf.MultiModalModel:
    return model_for(family)


def test_similarity_logits_equal_transformers(family, model):
    c = case(family)
    s = model.similarity(c["texts"], image=images(c))
    want = np.array(c["logits_per_text"], dtype=np.float32)
    assert s.logits_per_text.shape == want.shape == (len(c["texts"]), len(c["images"]))
    np.testing.assert_allclose(s.logits_per_text, want, rtol=0, atol=TOL["logits"])
    np.testing.assert_allclose(
        s.logits_per_image, np.array(c["logits_per_image"]), rtol=0, atol=TOL["logits"]
    )
    np.testing.assert_array_equal(s.logits_per_other, s.logits_per_text.T)
    assert s.family == family and s.modality == mlmf.Modality.IMAGE
    assert s.logit_scale == pytest.approx(c["heads"]["logit_scale"], abs=1e-7)
    if family == "siglip":
        assert s.logit_bias == pytest.approx(c["heads"]["logit_bias"], abs=1e-7)
    else:
        assert s.logit_bias is None
    assert family in repr(s)


def test_zero_shot_probabilities_equal_transformers(family, model):
    c = case(family)
    z = c["zero_shot"]
    r = model.zero_shot(image=images(c), labels=z["labels"], template=z["template"])
    assert r.prompts == z["prompts"]
    assert r.labels == z["labels"]
    np.testing.assert_allclose(r.logits, np.array(z["logits"]), rtol=0, atol=TOL["logits"])
    np.testing.assert_allclose(r.probs, np.array(z["probs"]), rtol=0, atol=TOL["probs"])
    assert r.best == z["best"]
    assert r.best_index == [z["labels"].index(b) for b in z["best"]]
    if family == "clip":
        assert r.probabilities == "softmax"
        np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, atol=1e-6)
    else:
        assert r.probabilities == "sigmoid"


def test_label_prompts_are_cached_like_any_text(family):
    m = model_for(family)
    c = case(family)
    z = c["zero_shot"]
    first = m.zero_shot(image=images(c), labels=z["labels"], template=z["template"])
    before = m.stats()["modalities"]["text"]
    again = m.zero_shot(image=images(c), labels=z["labels"], template=z["template"])
    after = m.stats()["modalities"]["text"]
    assert after["encoded"] == before["encoded"], "the second call encodes no prompt again"
    assert after["cache"]["hits"] - before["cache"]["hits"] == len(z["labels"])
    np.testing.assert_array_equal(first.probs, again.probs)


def test_late_similarity_mode_exposes_the_scores_in_infer(family):
    c = case(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "untrained" warning: the mode has no weights
        m = model_for(family)
    texts, imgs = c["texts"][:3], images(c)
    out = m.infer(text=texts, image=imgs)
    assert out.similarity is not None
    want = np.array(c["logits_per_text"], dtype=np.float32)[:3]
    np.testing.assert_allclose(out.similarity.logits_per_text, want, rtol=0, atol=TOL["logits"])
    direct = m.similarity(texts, image=imgs).logits_per_text
    np.testing.assert_allclose(out.similarity.logits_per_text, direct, rtol=0, atol=1e-6)
    # The fused vector: the mean of the two unit vectors of each row.
    e = out.embeddings
    unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in e.items()}
    np.testing.assert_allclose(out.fused, (unit["text"] + unit["image"]) / 2, atol=1e-6)
    # One modality alone: no scores, the fused vector is that modality's unit vector.
    only = m.infer(image=imgs)
    assert only.similarity is None
    np.testing.assert_allclose(only.fused, unit["image"], atol=1e-6)


def test_other_late_modes_have_no_similarity(family):
    c = case(family)
    with pytest.warns(UserWarning, match="untrained"):
        m = model_for(family, mode="mean")
    assert m.infer(text=c["texts"][:3], image=images(c)).similarity is None
    # similarity() itself needs no particular fusion.
    assert m.similarity(c["texts"][:1], image=images(c)[:1]).logits_per_text.shape == (1, 1)


def test_bad_input_is_named(model):
    img = images(case("clip"))[:1]
    with pytest.raises(mlmf.InputError, match="at least one label"):
        model.zero_shot(image=img, labels=[])
    with pytest.raises(mlmf.ConfigError, match="exactly once"):
        model.zero_shot(image=img, labels=["cat"], template="a photo")
    with pytest.raises(mlmf.InputError, match="label 1 is empty"):
        model.zero_shot(image=img, labels=["cat", " "])
    with pytest.raises(mlmf.MissingModalityError, match="image=, audio= or video="):
        model.zero_shot(labels=["cat"])
    with pytest.raises(mlmf.InputError, match="no audio modality"):
        model.similarity(["a cat"], audio=[np.zeros(1600, dtype=np.float32)])
    with pytest.raises(mlmf.InputError, match="one modality at a time"):
        model.similarity(["a cat"], image=img, audio=[np.zeros(16, dtype=np.float32)])
    with pytest.raises(mlmf.InputError, match="empty batch"):
        model.similarity([], image=img)


def test_towers_of_different_checkpoints_are_refused():
    config = {
        "modalities": {
            "text": {"model": str(MODELS / "clip_tiny")},
            "image": {"model": str(MODELS / "siglip_tiny")},
        },
        "fusion": {"strategy": "late", "mode": "mean", "out_dim": 8},
    }
    with pytest.warns(UserWarning):
        m = mlmf.MultiModalModel.load(config)
    with pytest.raises(mlmf.ConfigError, match="one aligned checkpoint.*clip_tiny.*siglip_tiny"):
        m.similarity(["a cat"], image=images(case("clip"))[:1])
    config["fusion"] = {"strategy": "late", "mode": "similarity"}
    # Different widths (24 and 32) are refused by the mode first.
    with pytest.raises(mlmf.ConfigError, match="late mode `similarity`"):
        mlmf.MultiModalModel.load(config)
    # Equal widths (32), still not one checkpoint: a lone SigLIP text tower beside the
    # dual checkpoint's image tower.
    config["modalities"]["text"] = {"model": str(MODELS / "siglip_text_tiny")}
    config["modalities"]["image"] = {"model": str(MODELS / "siglip_tiny")}
    with pytest.raises(mlmf.ConfigError, match="late mode `similarity` needs"):
        mlmf.MultiModalModel.load(config)


def test_models_without_aligned_heads_or_text_are_refused():
    bert = str(MODELS / "bert_tiny")
    vit = str(MODELS / "vit_tiny")
    with pytest.warns(UserWarning):
        m = mlmf.MultiModalModel.load(
            {
                "modalities": {"text": {"model": bert}, "image": {"model": vit}},
                "fusion": {"strategy": "late", "mode": "mean", "out_dim": 8},
            }
        )
    with pytest.raises(mlmf.ConfigError, match="one aligned checkpoint"):
        m.similarity(["a cat"], image=images(case("clip"))[:1])
    clip = str(MODELS / "clip_tiny")
    with pytest.warns(UserWarning):
        image_only = mlmf.MultiModalModel.load(
            {"modalities": {"image": {"model": clip}}, "fusion": {"strategy": "late"}}
        )
    with pytest.raises(mlmf.MissingModalityError, match="no text modality"):
        image_only.zero_shot(image=images(case("clip"))[:1], labels=["cat"])


def test_a_text_only_checkpoint_asked_for_audio_is_a_load_error():
    with pytest.raises(mlmf.ModelLoadError, match="encodes text, not audio"):
        mlmf.MultiModalModel.load({"modalities": {"audio": {"model": str(MODELS / "bert_tiny")}}})


def test_similarity_mode_has_nothing_to_train():
    d = str(MODELS / "clip_tiny")
    config = {
        "modalities": {"text": {"model": d}, "image": {"model": d}},
        "fusion": {"strategy": "late", "mode": "similarity"},
    }
    with pytest.raises(mlmf.ConfigError, match="no weights to train"):
        mlmf.Trainer(config, objectives=[mlmf.Contrastive("text", "image")], progress=False)


def test_cli_zero_shot(capsys):
    c = case("siglip")
    z = c["zero_shot"]
    argv = ["zero-shot", "--model", str(FIXTURES / c["model"])]
    for f in images(c):
        argv += ["--image", f]
    argv += ["--labels", ",".join(z["labels"][:2]), "--labels", ",".join(z["labels"][2:])]
    assert cli.main([*argv, "--json", "--top", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["family"] == "siglip" and got["probabilities"] == "sigmoid"
    assert [r["best"] for r in got["results"]] == z["best"]
    for r, want in zip(got["results"], z["probs"]):
        for label, p in zip(r["labels"], r["probs"]):
            assert p == pytest.approx(want[z["labels"].index(label)], abs=TOL["probs"])
    assert cli.main([*argv, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot with a siglip checkpoint (sigmoid over 4 labels" in out
    assert cli.main(["zero-shot", "--model", str(FIXTURES / c["model"]), "--labels", "cat"]) == 1
    assert "give --image, --audio or --video" in capsys.readouterr().err
