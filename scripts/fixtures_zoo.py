"""Model-zoo fixtures (area ``zoo``): tiny random checkpoints of the families added
beyond the first encoders, and transformers' outputs on them.

Run through ``scripts/make_fixtures.py --only zoo``.  So far:

- ``qwen3_tiny``: ``Qwen3Model`` at odd shapes (hidden 36, 3 layers, 3 query heads
  sharing 1 key/value head, head_dim 10 so the attention width 30 differs from the
  hidden width, SwiGLU 50 wide, 40 positions), every parameter redrawn from a seeded
  generator (RMSNorm weights 1 + 0.1 N(0,1), all else 0.2 N(0,1)).  Its tokenizer is
  the tiny byte-level BPE of ``encoders/models/clip_tiny`` with
  ``padding_side: left`` and ``<|endoftext|>`` as the padding token, as
  Qwen3-Embedding's tokenizer pads.  Reference: the tokenizer on TEXTS (padded to the
  longest, truncated at 40), ``Qwen3Model(input_ids, attention_mask)``, and the
  Qwen3-Embedding pooling: the last token's state (the last position under left
  padding), L2-normalised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from make_fixtures import ROOT, save_npz, write_json

SRC = ROOT / "tests" / "fixtures"
SEED = 301
TEXTS = [
    "What is the capital of France?",
    "a",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery: shapes",
    "the quick brown fox jumps over the lazy dog " * 4,
]


def _redraw(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def _qwen3(models: Path) -> dict:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    d = models / "qwen3_tiny"
    d.mkdir(parents=True, exist_ok=True)
    clip = SRC / "encoders" / "models" / "clip_tiny"
    shutil.copy(clip / "tokenizer.json", d / "tokenizer.json")
    vocab = len(json.loads((clip / "tokenizer.json").read_text())["model"]["vocab"]) + 2
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "padding_side": "left",
                "model_max_length": 40,
            },
            indent=2,
        )
        + "\n"
    )
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=36,
        intermediate_size=50,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
        max_position_embeddings=40,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Qwen3Model(cfg).eval()
    _redraw(model, SEED)
    model.save_pretrained(str(d), safe_serialization=True)
    model = Qwen3Model.from_pretrained(str(d)).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.padding_side == "left"
    enc = tok(TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        hidden = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
    mask = enc["attention_mask"]
    assert bool(mask[:, -1].all()), "left padding: every row ends with a real token"
    pooled = torch.nn.functional.normalize(hidden[:, -1], p=2, dim=1)
    arrays = {
        "input_ids": enc["input_ids"].numpy().astype(np.int64),
        "attention_mask": mask.numpy().astype(np.int64),
        "hidden_states": hidden.numpy().astype(np.float32),
        "pooled": pooled.numpy().astype(np.float32),
    }
    save_npz(d.parent.parent / "qwen3_tiny.npz", arrays)
    return {
        "model": "models/qwen3_tiny",
        "model_class": "Qwen3Model",
        "seed": SEED,
        "texts": TEXTS,
        "arrays": "qwen3_tiny.npz",
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "pooled_is": "last_hidden_state[:, -1] (left padding), L2-normalised "
        "(Qwen3-Embedding's last_token_pool + F.normalize)",
        "hidden_states_is": "Qwen3Model last_hidden_state (after the final norm); rows at "
        "padding positions are not compared",
        "call": "tok = AutoTokenizer.from_pretrained(dir); enc = tok(texts, padding=True, "
        "truncation=True, max_length=40, return_tensors='pt'); "
        "Qwen3Model.from_pretrained(dir)(**enc).last_hidden_state",
    }


def make_zoo(out: Path) -> None:
    import transformers

    write_json(
        out / "expected.json",
        {
            "area": "zoo",
            "schema": 1,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "tolerance": 1e-4,
            "cases": {"qwen3_tiny": _qwen3(out / "models")},
        },
    )
