"""X-CLIP fixtures (part of area ``zoo``): a tiny random ``XCLIPModel`` checkpoint (video
tower with cross-frame message tokens, Multi-frame Integration Transformer, CLIP text
tower, video-specific prompt generator) and transformers' outputs on it.

Run through ``scripts/make_fixtures.py --only zoo`` (``make_zoo`` stores the returned
description under ``"xclip"`` in ``zoo/expected.json``; the arrays go to ``zoo/xclip.npz``,
the checkpoint to ``zoo/models/xclip_tiny``).

Checkpoint ``xclip_tiny`` (``XCLIPModel`` saved with ``save_pretrained(safe_serialization=
True)``; ``XCLIPConfig(text_config, vision_config, projection_dim=20, prompt_layers=2,
prompt_alpha=0.1, prompt_hidden_act="gelu", prompt_num_attention_heads=4)``):

- Text tower (``XCLIPTextModel``, CLIP's text transformer): the tokenizer files of
  ``encoders/models/clip_tiny`` copied as they are (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json, vocab.json, merges.txt: the tiny CLIP byte-level BPE,
  ``CLIPTokenizer``, right padding, 544 ids 0..543 with the two special tokens already in
  the BPE vocabulary: ``<|startoftext|>`` = 542 (bos), ``<|endoftext|>`` = 543 (eos, pad
  and unk); ``model_max_length`` 77), so ``vocab_size`` 544 (the tokenizer's size; the
  largest id it emits, 543, is the eos).  Hidden 28, 2 pre-norm layers, 4 heads
  (head_dim 7), MLP 44 (``quick_gelu``: x * sigmoid(1.702 x)), 24 learned positions (ids
  0..T-1), ``layer_norm_eps`` 1e-5, causal self-attention, ``final_layer_norm``.
  ``pad/bos/eos_token_id`` in the config are the tokenizer's 543 / 542 / 543, BUT
  ``XCLIPTextModel.__init__`` sets ``self.eos_token_id = 2`` whatever the config says
  ("force legacy behaviour"), so the pooled state is ALWAYS the legacy one:
  ``last_hidden_state[b, argmax(input_ids[b])]`` (argmax returns the first maximum; the
  eos 543 is the largest id, so this is the first eos = the last real token).
  ``text_projection`` Linear(28, 20, no bias).
- Video tower (``XCLIPVisionModel``, run on the B * 6 frames as one batch of images):
  30x30 frames, 6x6 patches (``patch_embedding`` Conv2d(3, 36, 6, stride 6, no bias):
  25 patches row-major) after the ``class_embedding`` -> 26 tokens, plus
  ``position_embedding`` (26 rows), ``pre_layernorm``; hidden 36, 2 layers, 3 heads
  (head_dim 12), MLP 50 (``quick_gelu``), eps 1e-5, 6 frames (``num_frames``).  Each
  ``XCLIPVisionEncoderLayer`` first builds a cross-frame message token: ``msg =
  message_fc(h[:, 0])`` (the class token of each frame, Linear(36, 36)) viewed [B, 6, 36];
  ``msg = msg + message_attn(message_ln(msg))`` (full attention among the 6 frames of a
  video, 3 heads, q/k/v/out with biases); the message token is appended to each frame's
  tokens as token 26 (27 tokens), then ``h = h + self_attn(layer_norm1(h))`` over all 27
  tokens (no mask), the message token is DROPPED (back to 26 tokens), ``h = h +
  mlp(layer_norm2(h))``.  ``last_hidden_state`` [B * 6, 26, 36] is NOT normalised; the
  pooler is ``post_layernorm(last_hidden_state[:, 0])``.  ``visual_projection``
  Linear(36, 20, no bias) of the pooler gives the frame embeddings [B, 6, 20].
- MIT (``XCLIPMultiframeIntegrationTransformer``, ``mit.``): ``x = frame_embeds +
  mit.position_embedding`` ([1, 6, 20]); 2 pre-norm layers (``XCLIPEncoderLayer``: hidden
  ``mit_hidden_size`` 20, 2 heads (head_dim 10), MLP ``mit_intermediate_size`` 30,
  ``quick_gelu``, eps 1e-5, full attention over the 6 frames, no message token, no final
  norm); ``last_hidden_state = encoder(x) + frame_embeds`` (the residual is the input
  WITHOUT the position embedding); the video embedding (``get_video_features(...)
  .pooler_output``) is its mean over the frames [B, 20] (not normalised).
  ``mit_hidden_size`` must equal ``projection_dim``.
- Prompt features: ``img_features = (prompts_visual_layernorm(vision last_hidden_state[:,
  1:, :]) @ prompts_visual_projection).view(B, 6, 25, 20).mean(dim=1)`` [B, 25, 20]: the
  25 patch tokens (class token dropped; no post_layernorm) through a LayerNorm(36) and the
  [36, 20] parameter ``prompts_visual_projection`` (a plain matrix, used as ``x @ P``, NOT
  a Linear's transposed weight), averaged over the frames.
- Prompt generator (``XCLIPPromptGenerator``, ``prompts_generator.``) on text [B, K, 20]
  (the K projected text embeddings, the same for every video) and visual = img_features:
  ``visual = layernorm(visual)`` (eps 1e-5); 2 ``PromptGeneratorLayer``s, each ``text =
  text + cross_attn(norm1(text), visual, visual)`` (``XCLIPCrossAttention``: q/k/v
  Linear(20, 20, no bias), 4 heads of 5, scale 5^-0.5, no mask, softmax over the 25
  visual tokens, heads concatenated, ``proj`` Linear(20, 20) with bias) then ``text = text
  + mlp(norm3(text))`` (``mlp.0`` Linear(20, 80), exact erf ``gelu``, ``mlp.3``
  Linear(80, 20)); norm1 / norm3 eps 1e-5; the output is ``alpha * text`` with ``alpha``
  a [20] parameter (per dimension).
- Head (``XCLIPModel.forward``): ``t = text_embeds.unsqueeze(0).expand(B, -1, -1)``;
  ``t = t + prompts_generator(t, img_features)`` (video-specific text embeddings
  [B, K, 20]); ``t_hat``, ``v_hat`` L2-normalised (``x / x.norm(dim=-1)``);
  ``logits_per_video[b, k] = exp(logit_scale) * <v_hat[b], t_hat[b, k]>`` [B, K];
  ``logits_per_text`` is its transpose.  ``logit_scale`` is a 0-d parameter.
- Seeds: ``torch.manual_seed(SEED + 50)``, the model built and ``.eval()``, then every
  parameter redrawn with fixtures_zoo's ``_redraw(model, SEED + 50)`` (names ending in
  ``norm.weight``: 1 + 0.1 N(0,1); everything else, biases, ``alpha``, ``class_embedding``
  and ``prompts_visual_projection`` included, 0.2 N(0,1)).  As that name test misses
  ``layer_norm1/2.weight``, ``message_ln.weight`` and the prompt generator's
  ``norm1/norm3.weight``, afterwards the weight of EVERY ``nn.LayerNorm`` is redrawn as
  1 + 0.1 N(0,1) (a generator seeded ``SEED + 50 + 500``, modules in name order), as in
  fixtures_clap.py.  Then ``logit_scale`` = ln 7.  ``prompts_generator.alpha`` keeps its
  redrawn value (random per dimension, instead of the constant 0.1 of a fresh model).
- preprocessor_config.json: a ``VideoMAEImageProcessor`` as fixtures_zoo._videomae's
  (``do_resize`` with ``shortest_edge`` 34, ``resample`` 2 = bilinear, centre crop 30x30,
  rescale 1/255, normalise) with CLIP's mean [0.48145466, 0.4578275, 0.40821073] / std
  [0.26862954, 0.26130258, 0.27577711] and ``processor_class: XCLIPProcessor``.
  ``AutoProcessor.from_pretrained(dir)`` gives an ``XCLIPProcessor`` with the
  torchvision-backed ``VideoMAEImageProcessor``, whose pixel values differ from the PIL
  processor's by up to ~0.015; the references use ``VideoMAEImageProcessorPil``, as
  fixtures_zoo._videomae does.

Inputs: fixtures_zoo's ``_clips()`` (uint8 [6, H, W, 3], H x W 40x52, 45x37, 30x30;
``clip0..clip2``) through ``VideoMAEImageProcessorPil(**preprocessor_config without
image_processor_type / processor_class)`` on the list of the three clips ->
``pixel_values`` [3, 6, 3, 30, 30].  TEXTS tokenised by ``AutoTokenizer.from_pretrained
(dir)`` (``CLIPTokenizer``) with ``padding=True`` (to the longest, 22 tokens; every text
fits in 24 positions, checked; lengths 18, 7, 22, 4): ``input_ids`` /
``attention_mask`` [4, 22].  Zero-shot: LABELS put into TEMPLATE, the same tokenizer ->
``zero_shot_input_ids`` / ``zero_shot_attention_mask`` [3, 14].

Reference outputs (``xclip.npz``; floats float32, ints int64, clips uint8), all from the
checkpoint reloaded with ``XCLIPModel.from_pretrained(dir).eval()`` (sdpa attention),
under ``torch.no_grad()``:

- ``text_last_hidden_state`` [4, 22, 28]: ``text_model(input_ids, attention_mask)
  .last_hidden_state`` (after ``final_layer_norm``).  The real tokens' rows do not depend
  on the mask (causal attention never sees the right padding); padding rows attend to
  (causal AND real) keys, i.e. to all the real tokens: they differ from a causal-only
  run and need not be compared.  ``text_embeds`` [4, 20]: ``get_text_features(input_ids,
  attention_mask).pooler_output`` = ``text_projection`` of the argmax-pooled state, NOT
  normalised.
- ``vision_last_hidden_state`` [18, 26, 36]: ``vision_model(pixel_values.reshape(-1, 3,
  30, 30)).last_hidden_state`` (frame f of video b at row b * 6 + f).  ``frame_embeds``
  [3, 6, 20]: ``visual_projection(pooler_output)`` viewed per video, the MIT's input.
  ``mit_last_hidden_state`` [3, 6, 20]: ``mit(frame_embeds).last_hidden_state``.
  ``video_embeds`` [3, 20]: ``get_video_features(pixel_values).pooler_output`` (the MIT's
  mean over frames, NOT normalised).
- ``img_features`` [3, 25, 20]: as ``XCLIPModel.forward`` computes it before the prompt
  generator (above).  ``prompt_generator_out`` [3, 4, 20]:
  ``prompts_generator(text_embeds expanded to [3, 4, 20], img_features)`` (the alpha-scaled
  offset added to the text embeddings).
- ``model(input_ids, attention_mask, pixel_values)``: ``logits_per_video`` [3, 4],
  ``logits_per_text`` [4, 3] (its transpose), ``text_embeds_per_video`` [3, 4, 20] (its
  ``text_embeds``: video-specific, normalised), ``video_embeds_normalized`` [3, 20] (its
  ``video_embeds``, normalised).
- Zero-shot: ``model(zero_shot_input_ids, zero_shot_attention_mask, pixel_values)``:
  ``zero_shot_logits`` = its ``logits_per_video`` [3 videos, 3 labels],
  ``zero_shot_probs`` their softmax over the labels.

The script checks (asserts) the decomposition the Rust side follows: the video tower
gives ``video_embeds`` and ``img_features``, the text tower ``text_embeds``, and the head
recomputes ``logits_per_video`` from those three with ``model.prompts_generator`` to 1e-6
(absolute), and ``text_embeds_per_video`` / ``video_embeds_normalized`` likewise.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from fixtures_zoo import SEED, SRC, VIDEO_PROC_CFG, VIDEO_SHAPES, _clips, _redraw
from make_fixtures import save_npz, write_json

MODEL_SEED = SEED + 50
NORM_SEED_OFFSET = 500
LOGIT_SCALE = math.log(7.0)

TEXTS = [
    "a video of a dog running.",
    "cooking",
    "two people are playing tennis",
    "a cat",
]
LABELS = ["dog", "cat", "car"]
TEMPLATE = "a video of a {}."

VISION_SIZES = {
    "image_size": 30,
    "patch_size": 6,
    "num_channels": 3,
    "num_frames": 6,
    "hidden_size": 36,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 50,
    "hidden_act": "quick_gelu",
    "mit_hidden_size": 20,
    "mit_intermediate_size": 30,
    "mit_num_hidden_layers": 2,
    "mit_num_attention_heads": 2,
    "layer_norm_eps": 1e-5,
}
TEXT_SIZES = {
    "hidden_size": 28,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 44,
    "max_position_embeddings": 24,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
ROOT_SETTINGS = {
    "projection_dim": 20,
    "prompt_layers": 2,
    "prompt_alpha": 0.1,
    "prompt_hidden_act": "gelu",
    "prompt_num_attention_heads": 4,
}
NUM_PATCHES = (VISION_SIZES["image_size"] // VISION_SIZES["patch_size"]) ** 2
# VideoMAEImageProcessor settings as fixtures_zoo._videomae writes them, with CLIP's
# mean/std and the processor class X-CLIP's hub checkpoints name.
PROC_CFG = {
    "image_processor_type": VIDEO_PROC_CFG["image_processor_type"],
    "processor_class": "XCLIPProcessor",
    **VIDEO_PROC_CFG,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
DECOMPOSITION = (
    "video tower: pixel_values [B, 6, 3, 30, 30] -> video_embeds [B, 20] (MIT mean) and "
    "img_features [B, 25, 20]; text tower: input_ids, attention_mask -> text_embeds [K, 20] "
    "(argmax(input_ids) pooling, text_projection); head: t = text_embeds.unsqueeze(0)"
    ".expand(B, -1, -1); t = t + prompts_generator(t, img_features); t_hat = t / "
    "||t||_2 (last axis); v_hat = video_embeds / ||video_embeds||_2; logits_per_video = "
    "exp(logit_scale) * einsum('bd,bkd->bk', v_hat, t_hat) [B, K] (checked against the "
    "forward to 1e-6); logits_per_text = logits_per_video.T; text_embeds_per_video = "
    "t_hat, video_embeds_normalized = v_hat"
)
CLIP = SRC / "encoders" / "models" / "clip_tiny"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]


def _norms(model: torch.nn.Module, seed: int) -> list[str]:
    """Every nn.LayerNorm weight 1 + 0.1 N(0,1), modules in name order."""
    g = torch.Generator().manual_seed(seed + NORM_SEED_OFFSET)
    names = []
    with torch.no_grad():
        for name, m in sorted(model.named_modules()):
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                names.append(name)
    return names


def _vocab_size() -> int:
    tok = json.loads((CLIP / "tokenizer.json").read_text())
    ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    # The two special tokens are already entries of the BPE vocabulary (542, 543).
    assert ids == set(range(len(ids))), "ids are dense from 0"
    return len(ids)


def _checkpoint(d: Path):
    from transformers import XCLIPConfig, XCLIPModel

    d.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(CLIP / f, d / f)
    src = json.loads((CLIP / "config.json").read_text())["text_config"]
    text_config = {
        **TEXT_SIZES,
        "vocab_size": _vocab_size(),
        "pad_token_id": src["pad_token_id"],
        "bos_token_id": src["bos_token_id"],
        "eos_token_id": src["eos_token_id"],
    }
    cfg = XCLIPConfig(text_config=text_config, vision_config=dict(VISION_SIZES), **ROOT_SETTINGS)
    assert cfg.vision_config.mit_hidden_size == cfg.projection_dim
    torch.manual_seed(MODEL_SEED)
    model = XCLIPModel(cfg).eval()
    _redraw(model, MODEL_SEED)
    norms = _norms(model, MODEL_SEED)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    model.save_pretrained(str(d), safe_serialization=True)
    write_json(d / "preprocessor_config.json", PROC_CFG)

    loaded, info = XCLIPModel.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, bad
    loaded.eval()
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), f"{k} differs after reload"
    return loaded, text_config, norms


def _safetensors_keys(d: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def make_xclip(models: Path) -> dict:
    from transformers import AutoTokenizer, CLIPTokenizer
    from transformers.models.videomae.image_processing_pil_videomae import (
        VideoMAEImageProcessorPil,
    )

    d = models / "xclip_tiny"
    model, text_config, norms = _checkpoint(d)
    vocab = text_config["vocab_size"]
    max_len = TEXT_SIZES["max_position_embeddings"]

    # Videos, preprocessed as fixtures_zoo._videomae does.
    clips = _clips()
    proc = VideoMAEImageProcessorPil(
        **{
            k: v
            for k, v in PROC_CFG.items()
            if k not in ("image_processor_type", "processor_class")
        }
    )
    pixels = proc(list(clips), return_tensors="np")["pixel_values"].astype(np.float32)
    b, f, c, h, w = pixels.shape
    assert (b, f, c, h, w) == (3, 6, 3, 30, 30), pixels.shape
    arrays: dict[str, np.ndarray] = {"pixel_values": pixels}
    for i, clip in enumerate(clips):
        arrays[f"clip{i}"] = clip

    # Texts.
    tok = AutoTokenizer.from_pretrained(str(d))
    assert isinstance(tok, CLIPTokenizer) and tok.padding_side == "right"
    ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    assert ids == {"pad": 543, "bos": 542, "eos": 543}, ids
    kw = {"padding": True, "return_tensors": "pt"}
    text = tok(TEXTS, **kw)
    prompts = [TEMPLATE.format(label) for label in LABELS]
    zs_text = tok(prompts, **kw)
    lengths = {}
    for name, enc, n in (("texts", text, len(TEXTS)), ("prompts", zs_text, len(prompts))):
        ii, mm = enc["input_ids"], enc["attention_mask"]
        assert ii.shape[0] == n and ii.shape[1] <= max_len, ii.shape
        assert int(ii.max()) < vocab and int(ii.max()) == ids["eos"]
        lens = mm.sum(1)
        lengths[name] = lens.tolist()
        for r in range(n):
            k = int(lens[r])
            assert int(ii[r, 0]) == ids["bos"] and int(ii[r, k - 1]) == ids["eos"]
            assert bool((ii[r, k - 1 :] == ids["pad"]).all()) and bool(mm[r, :k].all())
            # argmax(input_ids) = the first eos = the last real token.
            assert int(ii[r].argmax()) == k - 1
    assert lengths == {"texts": [18, 7, 22, 4], "prompts": [13, 12, 14]}, lengths
    arrays["input_ids"] = text["input_ids"].numpy()
    arrays["attention_mask"] = text["attention_mask"].numpy()
    arrays["zero_shot_input_ids"] = zs_text["input_ids"].numpy()
    arrays["zero_shot_attention_mask"] = zs_text["attention_mask"].numpy()

    x = torch.from_numpy(pixels)
    input_ids, mask = text["input_ids"], text["attention_mask"]
    dim = ROOT_SETTINGS["projection_dim"]
    with torch.no_grad():
        # Text tower.
        t_out = model.text_model(input_ids=input_ids, attention_mask=mask)
        text_embeds = model.get_text_features(input_ids, mask).pooler_output
        rows = torch.arange(len(TEXTS))
        pooled = t_out.last_hidden_state[rows, input_ids.argmax(-1)]
        assert torch.equal(t_out.pooler_output, pooled)
        assert torch.allclose(text_embeds, model.text_projection(pooled), atol=1e-6)

        # Video tower.
        video_embeds = model.get_video_features(x).pooler_output
        v_out = model.vision_model(x.reshape(-1, c, h, w))
        frame_embeds = model.visual_projection(v_out.pooler_output).view(b, f, dim)
        mit_out = model.mit(frame_embeds)
        assert torch.allclose(mit_out.pooler_output, video_embeds, atol=1e-6)
        img = model.prompts_visual_layernorm(v_out.last_hidden_state[:, 1:, :])
        img_features = (img @ model.prompts_visual_projection).view(b, f, -1, dim).mean(dim=1)
        assert img_features.shape == (b, NUM_PATCHES, dim)
        assert v_out.last_hidden_state.shape == (b * f, NUM_PATCHES + 1, 36)

        # The full forward.
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=x)
        assert torch.allclose(out.logits_per_text, out.logits_per_video.T)

        # The head by hand: the decomposition the fixture documents.
        t = text_embeds.unsqueeze(0).expand(b, -1, -1)
        prompt_out = model.prompts_generator(t, img_features)
        t = t + prompt_out
        t_hat = t / t.norm(p=2, dim=-1, keepdim=True)
        v_hat = video_embeds / video_embeds.norm(p=2, dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * torch.einsum("bd,bkd->bk", v_hat, t_hat)
        assert torch.allclose(logits, out.logits_per_video, atol=1e-6, rtol=0), (
            (logits - out.logits_per_video).abs().max()
        )
        assert torch.allclose(t_hat, out.text_embeds, atol=1e-6)
        assert torch.allclose(v_hat, out.video_embeds, atol=1e-6)

        # Zero-shot.
        zs = model(
            input_ids=zs_text["input_ids"],
            attention_mask=zs_text["attention_mask"],
            pixel_values=x,
        )
        zs_probs = zs.logits_per_video.softmax(dim=1)

    arrays.update(
        {
            "text_embeds": text_embeds,
            "text_last_hidden_state": t_out.last_hidden_state,
            "video_embeds": video_embeds,
            "vision_last_hidden_state": v_out.last_hidden_state,
            "frame_embeds": frame_embeds,
            "mit_last_hidden_state": mit_out.last_hidden_state,
            "img_features": img_features,
            "prompt_generator_out": prompt_out,
            "logits_per_video": out.logits_per_video,
            "logits_per_text": out.logits_per_text,
            "text_embeds_per_video": out.text_embeds,
            "video_embeds_normalized": out.video_embeds,
            "zero_shot_logits": zs.logits_per_video,
            "zero_shot_probs": zs_probs,
        }
    )
    for k, v in arrays.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if k.startswith("clip"):
            assert v.dtype == np.uint8
        elif v.dtype.kind == "f":
            v = v.astype(np.float32)
        else:
            v = v.astype(np.int64)
        arrays[k] = v
    save_npz(models.parent / "xclip.npz", arrays)

    size = (d / "model.safetensors").stat().st_size
    return {
        "arrays": "xclip.npz",
        "model": "models/xclip_tiny",
        "model_class": "XCLIPModel",
        "seed": MODEL_SEED,
        "norm_seed": MODEL_SEED + NORM_SEED_OFFSET,
        "model_safetensors_bytes": size,
        "text_config": text_config,
        "vision_config": VISION_SIZES,
        "root_config": ROOT_SETTINGS,
        "logit_scale": LOGIT_SCALE,
        "attn_implementation": model.config._attn_implementation,
        "layer_norms": norms,
        "texts": TEXTS,
        "labels": LABELS,
        "template": TEMPLATE,
        "prompts": prompts,
        "token_ids": {**ids, "max": vocab - 1},
        "lengths": lengths,
        "clips": [f"clip{i}: uint8 [6, {h}, {w}, 3]" for i, (h, w) in enumerate(VIDEO_SHAPES)],
        "processor": "VideoMAEImageProcessorPil(**preprocessor_config without "
        "image_processor_type / processor_class) on the list of the three clips",
        "zero_shot": {
            "probs": zs_probs.tolist(),
            "best": [LABELS[i] for i in zs_probs.argmax(dim=1).tolist()],
        },
        "text_pooling": "XCLIPTextModel sets self.eos_token_id = 2 (legacy, whatever the "
        "config's eos_token_id 543): pooled = last_hidden_state[b, argmax(input_ids[b])] "
        "(first maximum = first eos 543 = last real token)",
        "text_padding_rows": "text_last_hidden_state rows at padding positions depend on "
        "the attention mask (they attend to all real tokens); only real rows need match",
        "vision_frames": "frame f of video b is row b * 6 + f of vision_last_hidden_state",
        "decomposition": DECOMPOSITION,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "safetensors_keys": _safetensors_keys(d),
    }
