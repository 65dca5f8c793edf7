"""Model-zoo families beyond the first encoders, against transformers
(tests/fixtures/zoo, made by scripts/fixtures_zoo.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES

ZOO = FIXTURES / "zoo"
EXPECTED = json.loads((ZOO / "expected.json").read_text())
TOL = EXPECTED["tolerance"]
QWEN3 = EXPECTED["cases"]["qwen3_tiny"]
QWEN3_DIR = ZOO / QWEN3["model"]


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / QWEN3["arrays"]) as z:
        return {k: z[k] for k in z.files}


def test_qwen3_tokens_equal_the_tokenizer(ref):
    tp = mlmf.TextProcessor.from_pretrained(QWEN3_DIR)
    b = tp(QWEN3["texts"])
    np.testing.assert_array_equal(b["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(b["attention_mask"], ref["attention_mask"])
    assert ref["attention_mask"][:, 0].min() == 0, "left padding is exercised"
    assert ref["input_ids"].shape[1] == 40, "the long text is cut at the 40 positions"


def test_qwen3_embeddings_equal_transformers(ref):
    enc = mlmf.Encoder.from_pretrained(QWEN3_DIR)
    assert (enc.model_type, enc.modality, enc.output_dim) == ("qwen3", "text", 36)
    out = enc.encode(QWEN3["texts"])
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_array_equal(out.mask.astype(bool), real)
    np.testing.assert_allclose(out.hidden_states[real], ref["hidden_states"][real], atol=TOL)
    np.testing.assert_allclose(out.pooled, ref["pooled"], atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=1), 1.0, atol=1e-6)


def test_qwen3_through_the_model_and_its_cache(ref):
    with pytest.warns(UserWarning, match="untrained"):
        model = mlmf.MultiModalModel.load({"modalities": {"text": {"model": str(QWEN3_DIR)}}})
    out = model.infer(text=QWEN3["texts"])
    np.testing.assert_allclose(out.embeddings["text"], ref["pooled"], atol=TOL)
    again = model.infer(text=QWEN3["texts"][::-1])
    np.testing.assert_array_equal(again.embeddings["text"], out.embeddings["text"][::-1])


def _copy(tmp_path, **config):
    d = tmp_path / "qwen3"
    shutil.copytree(QWEN3_DIR, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_qwen3_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(mlmf.ModelLoadError, match="encodes text, not image"):
        mlmf.Encoder.from_pretrained(QWEN3_DIR, modality="image")
    d = _copy(tmp_path, num_hidden_layers=4)
    with pytest.raises(mlmf.ModelLoadError, match=r"weight `layers\.3\.[a-z_.]+` is missing"):
        mlmf.Encoder.from_pretrained(d)
    shutil.rmtree(d)
    d = _copy(tmp_path, rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4})
    with pytest.raises(mlmf.ModelLoadError, match='rope type "yarn" is not supported'):
        mlmf.Encoder.from_pretrained(d)
    shutil.rmtree(d)
    d = _copy(tmp_path, num_key_value_heads=2)
    with pytest.raises(mlmf.ModelLoadError, match="multiple of num_key_value_heads"):
        mlmf.Encoder.from_pretrained(d)
    shutil.rmtree(d)
    d = _copy(tmp_path, layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(mlmf.ModelLoadError, match="sliding-window"):
        mlmf.Encoder.from_pretrained(d)
