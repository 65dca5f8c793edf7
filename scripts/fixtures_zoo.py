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
- ``videomae_tiny`` / ``videomae_cls_tiny`` / ``videomae_norm_tiny``: VideoMAE at odd
  shapes (30x30 frames cut into 6x6 patches, 6 frames in tubelets of 2: 75 tokens;
  hidden 36, 3 heads, 3 layers, MLP 50), redrawn like Qwen3's.  ``videomae_tiny`` is a
  ``VideoMAEModel`` with query/value biases and mean pooling; ``videomae_cls_tiny`` a
  ``VideoMAEForVideoClassification`` (weights under ``videomae.``, an ``fc_norm``, no
  query/value biases); ``videomae_norm_tiny`` a ``VideoMAEModel`` with
  ``use_mean_pooling: false`` (a final layernorm, the first token pooled).  Their
  preprocessor_config.json is a ``VideoMAEImageProcessor`` (shortest edge 34, bilinear,
  centre crop 30, ImageNet mean/std).  Reference: ``VideoMAEImageProcessorPil`` on
  CLIPS (uint8 frames [6, H, W, 3] of several sizes), then the model on its
  pixel_values; pooled is the mean of ``last_hidden_state`` (through ``fc_norm`` for
  the classification checkpoint) or its first token (``use_mean_pooling: false``), as
  ``VideoMAEForVideoClassification`` reads them before its classifier.
- ``speech``: wav2vec2, HuBERT and AST checkpoints, ``speech.npz``; see fixtures_speech.py.
- ``siglip2``: a SigLIP 2 (NaFlex) ``Siglip2Model`` checkpoint, ``siglip2.npz`` and the
  generated images in ``inputs/``; see fixtures_siglip2.py.
- ``clap``: two CLAP ``ClapModel`` checkpoints (RoBERTa text tower; HTSAT audio tower,
  unfused and fused) and ``clap.npz``; see fixtures_clap.py.
- ``xclip``: an X-CLIP ``XCLIPModel`` checkpoint (CLIP text tower; video tower with
  cross-frame message tokens, the multi-frame integration transformer and the
  video-specific prompt generator) and ``xclip.npz``; see fixtures_xclip.py.
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


VIDEO_SHAPES = [(40, 52), (45, 37), (30, 30)]
# The VideoMAEImageProcessor settings of the tiny video checkpoints (30x30 frames).
VIDEO_PROC_CFG = {
    "image_processor_type": "VideoMAEImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 34},
    "resample": 2,
    "do_center_crop": True,
    "crop_size": {"height": 30, "width": 30},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(SEED + 1)
    clips = []
    for h, w in VIDEO_SHAPES:
        # A smooth moving gradient plus noise, so resizing has something to average.
        t = np.arange(6)[:, None, None, None]
        y = np.arange(h)[None, :, None, None]
        x = np.arange(w)[None, None, :, None]
        c = np.arange(3)[None, None, None, :]
        base = 128 + 90 * np.sin((x + 3 * t) / 7.0 + c) * np.cos((y - 2 * t) / 5.0)
        noise = rng.integers(-20, 21, size=(6, h, w, 3))
        clips.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return clips


def _videomae(models: Path, clips: list[np.ndarray]) -> dict:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel
    from transformers.models.videomae.image_processing_pil_videomae import (
        VideoMAEImageProcessorPil,
    )

    variants = {
        "videomae_tiny": (VideoMAEModel, {"qv_bias": True, "use_mean_pooling": True}),
        "videomae_cls_tiny": (
            VideoMAEForVideoClassification,
            {"qv_bias": False, "use_mean_pooling": True, "num_labels": 5},
        ),
        "videomae_norm_tiny": (VideoMAEModel, {"qv_bias": True, "use_mean_pooling": False}),
    }
    proc_cfg = VIDEO_PROC_CFG
    proc = VideoMAEImageProcessorPil(
        **{k: v for k, v in proc_cfg.items() if k != "image_processor_type"}
    )
    pixels = proc(list(clips), return_tensors="np")["pixel_values"].astype(np.float32)
    arrays = {"pixel_values": pixels}
    for i, clip in enumerate(clips):
        arrays[f"clip{i}"] = clip
    cases = {}
    for k, (name, (cls, extra)) in enumerate(variants.items()):
        d = models / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = VideoMAEConfig(
            image_size=30,
            patch_size=6,
            num_channels=3,
            num_frames=6,
            tubelet_size=2,
            hidden_size=36,
            num_hidden_layers=3,
            num_attention_heads=3,
            intermediate_size=50,
            hidden_act="gelu",
            **extra,
        )
        torch.manual_seed(SEED + 10 + k)
        model = cls(cfg).eval()
        _redraw(model, SEED + 10 + k)
        model.save_pretrained(str(d), safe_serialization=True)
        write_json(d / "preprocessor_config.json", proc_cfg)
        model = cls.from_pretrained(str(d)).eval()
        with torch.no_grad():
            x = torch.from_numpy(pixels)
            if cls is VideoMAEModel:
                hidden = model(pixel_values=x).last_hidden_state
                pooled = hidden.mean(1) if extra["use_mean_pooling"] else hidden[:, 0]
            else:
                hidden = model.videomae(pixel_values=x).last_hidden_state
                pooled = model.fc_norm(hidden.mean(1))
        arrays[f"{name}.hidden_states"] = hidden.numpy().astype(np.float32)
        arrays[f"{name}.pooled"] = pooled.numpy().astype(np.float32)
        cases[name] = {
            "model": f"models/{name}",
            "model_class": cls.__name__,
            "seed": SEED + 10 + k,
            "config": extra,
            "pooled_is": (
                "fc_norm(last_hidden_state.mean(1))"
                if cls is not VideoMAEModel
                else "last_hidden_state.mean(1)"
                if extra["use_mean_pooling"]
                else "last_hidden_state[:, 0] (after the final layernorm)"
            ),
        }
    save_npz(models.parent / "videomae.npz", arrays)
    return {
        "arrays": "videomae.npz",
        "clips": [f"clip{i}: uint8 [6, {h}, {w}, 3]" for i, (h, w) in enumerate(VIDEO_SHAPES)],
        "processor": "VideoMAEImageProcessorPil(**preprocessor_config) on the clips",
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "models": cases,
    }


def make_zoo(out: Path) -> None:
    import transformers
    from fixtures_clap import make_clap  # imported here: they import this module
    from fixtures_siglip2 import make_siglip2
    from fixtures_speech import make_speech
    from fixtures_xclip import make_xclip

    write_json(
        out / "expected.json",
        {
            "area": "zoo",
            "schema": 1,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "tolerance": 1e-4,
            "cases": {"qwen3_tiny": _qwen3(out / "models")},
            "videomae": _videomae(out / "models", _clips()),
            "speech": make_speech(out / "models"),
            "siglip2": make_siglip2(out / "models"),
            "clap": make_clap(out / "models"),
            "xclip": make_xclip(out / "models"),
        },
    )
