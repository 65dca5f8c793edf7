"""Text: ids and masks equal to transformers / tokenizers on the committed fixtures."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES, load_manifest

MANIFEST = load_manifest("text")
TEXTS = json.loads((FIXTURES / "text" / MANIFEST["texts"]).read_text(encoding="utf-8"))
EXPECTED = json.loads((FIXTURES / "text" / MANIFEST["expected"]).read_text(encoding="utf-8"))

# How each reference call maps onto mlmf's processor. Ragged cases (no padding) are
# compared one sentence at a time.
CALLS = {
    "padding_longest": dict(padding="longest", truncation=False),
    "max_length_77": dict(padding="max_length", truncation=True, max_length=77),
    "max_length_128": dict(padding="max_length", truncation=True, max_length=128),
    "max_length_16": dict(padding="max_length", truncation=True, max_length=16),
    "no_padding": dict(padding="do_not_pad", truncation=False),
    "no_special_tokens": dict(padding="do_not_pad", truncation=False, add_special_tokens=False),
    "raw_unpadded": dict(padding="do_not_pad", truncation=False),
    "raw_file_defaults": dict(padding="do_not_pad", truncation=False),
    "raw_pad77": dict(padding="max_length", truncation=True, max_length=77),
    "pairs_longest": dict(padding="longest", truncation=True),
}


def _processor(name: str, minilm_dir):
    if name == "text/clip_bpe":
        return mlmf.TextProcessor.from_pretrained(FIXTURES / "text" / "clip_bpe")
    return mlmf.TextProcessor.from_pretrained(minilm_dir)


def _cases():
    for case in MANIFEST["cases"]:
        kind = case["id"].split("__", 1)[1]
        if case["id"] == "minilm__raw_file_defaults":
            # tokenizer.json of that checkpoint stores padding/truncation at 128; mlmf,
            # like transformers, replaces stored settings with the call's. Covered by
            # minilm__max_length_128.
            continue
        yield pytest.param(case, CALLS[kind], id=case["id"])


@pytest.mark.parametrize(("case", "kwargs"), list(_cases()))
def test_ids_equal_reference(case, kwargs, minilm_dir):
    tp = _processor(case["tokenizer"], minilm_dir)
    exp = EXPECTED[case["id"]]
    if case["ragged"]:
        for i, text in enumerate(TEXTS):
            got = tp([text], **kwargs)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in exp:
                    assert got[key][0].tolist() == exp[key][i], (case["id"], key, i, text)
        return
    if "pairs" in case["id"]:
        got = tp(TEXTS, list(reversed(TEXTS)), **kwargs)
    else:
        got = tp(TEXTS, **kwargs)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in exp:
            assert got[key].dtype == np.int64
            assert got[key].tolist() == exp[key], (case["id"], key)


def test_defaults_pad_longest_and_truncate_to_model_max_length(minilm_dir):
    tp = mlmf.TextProcessor.from_pretrained(minilm_dir)
    assert tp.model_max_length == 512
    out = tp(["word " * 1000, "short"])
    assert out["input_ids"].shape == (2, 512)
    assert out["attention_mask"][1].sum() == 3


def test_clip_pad_token_and_model_max_length():
    tp = mlmf.TextProcessor.from_pretrained(FIXTURES / "text" / "clip_bpe")
    assert tp.pad_token_id == MANIFEST["tokenizers"]["clip_bpe"]["pad_token_id"]
    assert tp.model_max_length == 77


def test_decode_roundtrip(minilm_dir):
    tp = mlmf.TextProcessor.from_pretrained(minilm_dir)
    ids = tp("A photo of a cat.")["input_ids"][0].tolist()
    assert tp.decode(ids) == "a photo of a cat."


def test_pickle_roundtrip():
    tp = mlmf.TextProcessor.from_pretrained(FIXTURES / "text" / "clip_bpe", max_length=16)
    tp2 = pickle.loads(pickle.dumps(tp))
    a, b = tp(TEXTS[:5]), tp2(TEXTS[:5])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_typed_errors(tmp_path):
    tp = mlmf.TextProcessor.from_pretrained(FIXTURES / "text" / "clip_bpe")
    with pytest.raises(mlmf.InputError, match=r"text input 1: got int: expected a str"):
        tp(["ok", 3])
    with pytest.raises(mlmf.InputError, match="empty batch"):
        tp([])
    with pytest.raises(mlmf.InputError, match="text input 1: .*padding=longest"):
        tp(["a", "a much longer sentence"], padding=False)
    with pytest.raises(mlmf.ConfigError, match="padding"):
        tp(["a"], padding="sideways")
    with pytest.raises(mlmf.InputError, match="pair"):
        tp(["a", "b"], ["c"])
    with pytest.raises(mlmf.ModelLoadError, match="tokenizer.json not found"):
        mlmf.TextProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(mlmf.ModelLoadError):
        mlmf.TextProcessor.from_pretrained(tmp_path)
