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


def test_qwen3_fast_path_equals_the_candle_path(ref, monkeypatch):
    # Float32 on the CPU runs the fused decoder layers; the environment switch runs
    # candle's ops instead. Both match transformers (above) and each other.
    enc = mlmf.Encoder.from_pretrained(QWEN3_DIR)
    fast = enc.encode(QWEN3["texts"])
    monkeypatch.setenv("MLMF_QWEN3_CANDLE_PATH", "1")
    slow = enc.encode(QWEN3["texts"])
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_allclose(fast.hidden_states[real], slow.hidden_states[real], atol=1e-5)
    np.testing.assert_allclose(fast.pooled, slow.pooled, atol=1e-6)
    np.testing.assert_allclose(slow.pooled, ref["pooled"], atol=TOL)


def test_qwen3_through_the_model_and_its_cache(ref):
    with pytest.warns(UserWarning, match="untrained"):
        model = mlmf.MultiModalModel.load({"modalities": {"text": {"model": str(QWEN3_DIR)}}})
    out = model.infer(text=QWEN3["texts"])
    np.testing.assert_allclose(out.embeddings["text"], ref["pooled"], atol=TOL)
    again = model.infer(text=QWEN3["texts"][::-1])
    np.testing.assert_array_equal(again.embeddings["text"], out.embeddings["text"][::-1])


INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages\nQuery: "


def test_qwen3_instruction_prefix_for_queries(ref):
    # The fixture's third text is a query written out with its instruction.
    assert QWEN3["texts"][2] == INSTRUCTION + "shapes"
    tp = mlmf.TextProcessor.from_pretrained(QWEN3_DIR, prefix=INSTRUCTION)
    ids = tp(["shapes"])["input_ids"][0]
    real = ref["attention_mask"][2].astype(bool)
    np.testing.assert_array_equal(ids, ref["input_ids"][2][real])
    import pickle

    assert pickle.loads(pickle.dumps(tp))(["shapes"])["input_ids"][0].tolist() == ids.tolist()
    with pytest.warns(UserWarning, match="untrained"):
        query = mlmf.MultiModalModel.load(
            {
                "modalities": {
                    "text": {
                        "model": str(QWEN3_DIR),
                        "preprocessing": {"prefix": INSTRUCTION},
                    }
                }
            }
        )
    out = query.infer(text=["shapes"])
    np.testing.assert_allclose(out.embeddings["text"][0], ref["pooled"][2], atol=TOL)
    # Documents go through a model without the prefix: another embedding, another key.
    with pytest.warns(UserWarning, match="untrained"):
        plain = mlmf.MultiModalModel.load({"modalities": {"text": {"model": str(QWEN3_DIR)}}})
    other = plain.infer(text=["shapes"]).embeddings["text"][0]
    assert np.abs(other - out.embeddings["text"][0]).max() > 1e-3
    with pytest.raises(mlmf.ConfigError, match="prefix"):
        mlmf.MultiModalModel.load(
            {"modalities": {"text": {"model": str(QWEN3_DIR), "preprocessing": {"prefix": 3}}}}
        )


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
