"""SigLIP 2 (NaFlex) fixtures (part of area ``zoo``): a tiny random ``Siglip2Model``
checkpoint and transformers' outputs on it.

Run through ``scripts/make_fixtures.py --only zoo`` (``make_zoo`` stores the returned
description under ``"siglip2"`` in ``zoo/expected.json``; the arrays go to
``zoo/siglip2.npz``, the checkpoint to ``zoo/models/siglip2_tiny``, the generated input
images to ``zoo/inputs/``).

- ``siglip2_tiny``: ``Siglip2Model`` at odd shapes.  Text tower: the tokenizer files
  of ``encoders/models/siglip_tiny`` copied as they are (the tiny CLIP-style byte-level BPE,
  ``CLIPTokenizer``, 544 ids, ``<|endoftext|>`` = 543 as end and padding token,
  ``model_max_length`` 77), hidden 36, 3 heads, 2 pre-norm layers, MLP 50
  (``gelu_pytorch_tanh``), 16 learned positions, ``final_layer_norm``, and a ``head``
  Linear 36 -> 36 (``projection_size``) on the LAST position's state (with
  ``padding="max_length"`` that is a padding token for every text shorter than 16).
  Vision tower: patches of 5x5x3 = 75 values come in already cut out and go through a
  Linear 75 -> 36 (``embeddings.patch_embedding``, not a convolution), plus learned
  position embeddings on a 4x4 grid (``num_patches`` 16, an ``nn.Embedding(16, 36)``
  whose row ``r * 4 + c`` is grid cell (r, c)), resized per image to its patch grid;
  then hidden 36, 3 heads, 2 layers, MLP 50, ``post_layernorm`` and the multi-head
  attention pooling head (``head.probe``, ``head.attention`` an ``nn.MultiheadAttention``
  with packed ``in_proj_weight``/``in_proj_bias`` and ``out_proj``, ``head.layernorm``,
  ``head.mlp``).  ``logit_scale`` and ``logit_bias`` are [1] parameters.  Every
  parameter is redrawn like the other zoo checkpoints (``_redraw``: norm weights
  1 + 0.1 N(0,1), all else 0.2 N(0,1)), then ``logit_scale`` = ln 10 and
  ``logit_bias`` = -2.5 are set so that the sigmoids are not saturated.
  Its preprocessor_config.json is written by ``Siglip2ImageProcessorPil.save_pretrained``
  (``image_processor_type: Siglip2ImageProcessor``, patch_size 5, max_num_patches 20,
  resample 2 = bilinear, rescale 1/255, mean = std = 0.5).

Images: the committed ``image/inputs/jpeg420_81x61.jpg``, ``rgb_640x480.png`` and
``exif_orient6_64x48.jpg`` opened with ``Image.open`` as they are (no EXIF transpose:
mlmf does not rotate by EXIF orientation, see fixtures_aligned.py; all three give a 4x5
grid), plus four generated RGB PNGs written to ``zoo/inputs/`` (smooth sinusoidal
gradients and a ramp plus uniform noise in [-20, 20]; sizes H x W):
``wide_23x190.png`` (2x10 patches) and ``tall_150x31.png`` (10x2), wider/taller than
the 4x4 position grid in one direction and smaller in the other, so the position resize
upsamples along one axis and downsamples (antialiased) along the other; and, as the
five above fill all 20 patch slots, two that leave padding: ``wide_29x61.png`` (3x6,
18 patches, 2 padding rows) and ``square_33x33.png`` (4x4, 16 patches, 4 padding rows;
the position table is "resized" to its own size).

Text: the tokenizer is loaded as the class its tokenizer_config.json names
(``CLIPTokenizer``: the tokenizer.json pipeline, right padding), as for siglip_tiny.
``AutoTokenizer`` would not do that here: transformers lists ``siglip2`` among the
model types whose hub tokenizer class is "incorrect" and builds a ``Siglip2Tokenizer``
(a Gemma-style BPE rebuilt from the vocab and merges with its own space-split
pre-tokenizer, lowercasing and ``padding_side = "left"``), which ignores the
tokenizer.json's normaliser/pre-tokenizer and pads on the left.

Reference outputs (``siglip2.npz``; floats float32, ints int64):

- ``Siglip2ImageProcessorPil(**preprocessor_config)`` on the list of the seven PIL
  images (``return_tensors="np"``).  Per image the target size is
  ``get_image_size_for_max_num_patches(h, w, 5, 20)`` (a binary search for the largest
  scale whose sizes, each rounded UP to a multiple of 5 and at least 5, give at most 20
  patches); the image is resized to it (PIL bilinear), rescaled, normalised and cut by
  ``convert_image_to_patches``: patches in row-major grid order, and inside a patch the
  75 values in (row in patch, column in patch, channel) order, i.e. index
  ``(py * 5 + px) * 3 + c``.  ``pixel_values`` [7, 20, 75]: rows past the image's
  h * w patches are zeros; ``pixel_attention_mask`` [7, 20]: 1 for real patches, 0 for
  padding; ``spatial_shapes`` [7, 2]: (patch rows, patch columns).
- ``pos_embeddings`` [7, 20, 36]: ``Siglip2VisionEmbeddings.resize_positional_embeddings``
  of ``position_embedding.weight.reshape(4, 4, 36)`` to each ``spatial_shapes`` row,
  ``max_length`` 20, exactly as the embeddings' forward calls it: the table permuted to
  [1, 36, 4, 4], cast to float32 on CPU, ``F.interpolate(size=(h, w), mode="bilinear",
  align_corners=False, antialias=True)``, reshaped to [h * w, 36] row-major; rows past
  h * w are filled with the FIRST resized row (grid cell (0, 0)), not zeros.
- ``vision.hidden_states`` [7, 20, 36]: ``vision_model(pixel_values,
  pixel_attention_mask, spatial_shapes).last_hidden_state`` (after ``post_layernorm``).
  The encoder masks padding patches as keys only (a padding patch still attends to the
  real ones, so its rows are finite; they are not meaningful and need not be compared).
  ``vision.pooled`` [7, 36]: its ``pooler_output``, the attention-pooling head over the
  real patches only (padding keys get ``finfo(float32).min`` added in the
  ``nn.MultiheadAttention``); not normalised.  ``get_image_features`` returns this same
  output object (``pooler_output`` is the image feature).
- ``input_ids`` / ``attention_mask`` [5, 16]: the tokenizer on TEXTS (fixtures_aligned's
  list) with ``padding="max_length", max_length=16, truncation=True`` (the text tower's
  ``max_position_embeddings``; longer texts are cut, end token kept).
  ``text.pooled`` [5, 36]: ``text_model(input_ids, attention_mask).pooler_output`` =
  ``head(final_layer_norm(h)[:, -1])``, not normalised (what ``get_text_features``
  returns as ``pooler_output``).  The padding mask is passed, as the processor's output
  carries it; the encoder is bidirectional (no causal mask).
- ``logits_per_text`` [5 texts, 7 images] / ``logits_per_image`` [7, 5]:
  ``Siglip2Model(input_ids, attention_mask, pixel_values, pixel_attention_mask,
  spatial_shapes)``: ``exp(logit_scale) * t_hat . i_hat + logit_bias`` on the
  L2-normalised pooled features.
- Zero-shot: LABELS put into TEMPLATE (``zero_shot.input_ids`` /
  ``zero_shot.attention_mask`` [4, 16]), the same model call; ``zero_shot.logits`` =
  ``logits_per_image`` [7 images, 4 labels] and ``zero_shot.probs`` its sigmoid.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from fixtures_aligned import IMAGES as COMMITTED_IMAGES
from fixtures_aligned import LABELS, TEMPLATE, TEXTS
from fixtures_zoo import SEED, SRC, _redraw
from make_fixtures import save_npz
from PIL import Image

MODEL_SEED = SEED + 30
IMAGE_SEED = SEED + 31
PATCH = 5
MAX_PATCHES = 20
GRID = 4  # sqrt(num_patches): the position table is GRID x GRID
TEXT_LEN = 16
LOGIT_SCALE = math.log(10.0)
LOGIT_BIAS = -2.5
# Generated images, (height, width).
GENERATED = {
    "wide_23x190.png": (23, 190),
    "tall_150x31.png": (150, 31),
    "wide_29x61.png": (29, 61),
    "square_33x33.png": (33, 33),
}
PROC_CFG = {
    "patch_size": PATCH,
    "max_num_patches": MAX_PATCHES,
    "resample": 2,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
SIZES = {
    "hidden_size": 36,
    "intermediate_size": 50,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
}


def _write_generated(inputs: Path) -> list[str]:
    rng = np.random.default_rng(IMAGE_SEED)
    inputs.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (name, (h, w)) in enumerate(GENERATED.items()):
        y = np.arange(h)[:, None, None]
        x = np.arange(w)[None, :, None]
        c = np.arange(3)[None, None, :]
        # Smooth content (two sinusoids and a ramp per channel) plus noise, so the
        # resize has something to average.
        base = (
            128
            + 70 * np.sin(x / (6.0 + 3 * k) + c) * np.cos(y / (5.0 + 2 * k) - c)
            + 40 * (x / w - y / h) * (1 - c)
        )
        noise = rng.integers(-20, 21, size=(h, w, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(inputs / name)
        names.append(f"zoo/inputs/{name}")
    return names


def _open(rel: str) -> Image.Image:
    with Image.open(SRC / rel) as im:
        im.load()
        return im.copy()


def _checkpoint(d: Path):
    from transformers import Siglip2Config, Siglip2Model

    src = SRC / "encoders" / "models" / "siglip_tiny"
    d.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "spiece", "vocab", "merges")):
            shutil.copy(f, d / f.name)
    src_text = json.loads((src / "config.json").read_text())["text_config"]
    text_config = {
        **SIZES,
        "vocab_size": src_text["vocab_size"],
        "max_position_embeddings": TEXT_LEN,
        "projection_size": 36,
        "pad_token_id": src_text["pad_token_id"],
        "bos_token_id": src_text["bos_token_id"],
        "eos_token_id": src_text["eos_token_id"],
    }
    vision_config = {
        **SIZES,
        "num_channels": 3,
        "patch_size": PATCH,
        "num_patches": GRID * GRID,
    }
    cfg = Siglip2Config(text_config=text_config, vision_config=vision_config)
    torch.manual_seed(MODEL_SEED)
    model = Siglip2Model(cfg).eval()
    _redraw(model, MODEL_SEED)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
        model.logit_bias.fill_(LOGIT_BIAS)
    model.save_pretrained(str(d), safe_serialization=True)
    model, info = Siglip2Model.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"siglip2_tiny: {bad}"
    return model.eval(), text_config, vision_config


def make_siglip2(models: Path) -> dict:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPTokenizer
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
        get_image_size_for_max_num_patches,
    )

    d = models / "siglip2_tiny"
    model, text_config, vision_config = _checkpoint(d)
    proc = Siglip2ImageProcessorPil(**PROC_CFG)
    proc.save_pretrained(str(d))
    saved = AutoImageProcessor.from_pretrained(str(d), backend="pil")
    assert type(saved) is Siglip2ImageProcessorPil
    assert (saved.patch_size, saved.max_num_patches) == (PATCH, MAX_PATCHES)
    tok_class = json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tok_class == "CLIPTokenizer"
    tok = CLIPTokenizer.from_pretrained(str(d))
    assert tok.padding_side == "right"
    # What AutoTokenizer makes of this folder (recorded, not used): see the docstring.
    auto_tok = AutoTokenizer.from_pretrained(str(d))

    images = list(COMMITTED_IMAGES) + _write_generated(models.parent / "inputs")
    pils = [_open(rel) for rel in images]
    enc = proc(pils, return_tensors="np")
    pixel_values = np.asarray(enc["pixel_values"], dtype=np.float32)
    pixel_mask = np.asarray(enc["pixel_attention_mask"]).astype(np.int64)
    spatial = np.asarray(enc["spatial_shapes"]).astype(np.int64)
    targets = [
        get_image_size_for_max_num_patches(im.height, im.width, PATCH, MAX_PATCHES) for im in pils
    ]
    for (th, tw), (gh, gw), m in zip(targets, spatial, pixel_mask):
        assert (th // PATCH, tw // PATCH) == (gh, gw)
        assert int(m.sum()) == gh * gw <= MAX_PATCHES

    pv = torch.from_numpy(pixel_values)
    pm = torch.from_numpy(pixel_mask)
    ss = torch.from_numpy(spatial)

    def encode(texts: list[str]):
        return tok(
            texts,
            padding="max_length",
            truncation=True,
            max_length=TEXT_LEN,
            return_tensors="pt",
        )

    text = encode(TEXTS)
    prompts = [TEMPLATE.format(label) for label in LABELS]
    zs_text = encode(prompts)
    emb = model.vision_model.embeddings
    with torch.no_grad():
        table = emb.position_embedding.weight.reshape(
            emb.position_embedding_size, emb.position_embedding_size, -1
        )
        pos = emb.resize_positional_embeddings(table, ss, max_length=pv.shape[1])
        vision = model.vision_model(pixel_values=pv, pixel_attention_mask=pm, spatial_shapes=ss)
        image_features = model.get_image_features(
            pixel_values=pv, pixel_attention_mask=pm, spatial_shapes=ss
        ).pooler_output
        text_out = model.text_model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        )
        text_features = model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        ).pooler_output
        out = model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=pv,
            pixel_attention_mask=pm,
            spatial_shapes=ss,
        )
        zs = model(
            input_ids=zs_text["input_ids"],
            attention_mask=zs_text["attention_mask"],
            pixel_values=pv,
            pixel_attention_mask=pm,
            spatial_shapes=ss,
        )
    assert torch.equal(image_features, vision.pooler_output)
    assert torch.equal(text_features, text_out.pooler_output)
    probs = torch.sigmoid(zs.logits_per_image)

    arrays = {
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_mask,
        "spatial_shapes": spatial,
        "pos_embeddings": pos.numpy(),
        "vision.hidden_states": vision.last_hidden_state.numpy(),
        "vision.pooled": vision.pooler_output.numpy(),
        "input_ids": text["input_ids"].numpy(),
        "attention_mask": text["attention_mask"].numpy(),
        "text.pooled": text_out.pooler_output.numpy(),
        "logits_per_text": out.logits_per_text.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
        "zero_shot.input_ids": zs_text["input_ids"].numpy(),
        "zero_shot.attention_mask": zs_text["attention_mask"].numpy(),
        "zero_shot.logits": zs.logits_per_image.numpy(),
        "zero_shot.probs": probs.numpy(),
    }
    for k, v in arrays.items():
        arrays[k] = v.astype(np.float32 if v.dtype.kind == "f" else np.int64)
    save_npz(models.parent / "siglip2.npz", arrays)

    best = [LABELS[i] for i in probs.argmax(dim=1).tolist()]
    return {
        "arrays": "siglip2.npz",
        "model": "models/siglip2_tiny",
        "model_class": "Siglip2Model",
        "seed": MODEL_SEED,
        "image_seed": IMAGE_SEED,
        "attn_implementation": model.config._attn_implementation,
        "text_config": text_config,
        "vision_config": vision_config,
        "position_grid": [GRID, GRID],
        "logit_scale": LOGIT_SCALE,
        "logit_bias": LOGIT_BIAS,
        "processor": "Siglip2ImageProcessorPil(**preprocessor_config) on the PIL images "
        "(return_tensors='np'); preprocessor_config.json written by its save_pretrained",
        "preprocessor_config": PROC_CFG,
        "patch_layout": "patches row-major over the (rows, cols) grid; inside a patch "
        "(row, col, channel): index (py * patch + px) * 3 + c (convert_image_to_patches); "
        "padding rows of pixel_values are 0, pixel_attention_mask 0",
        "pos_embeddings_is": "resize_positional_embeddings(position_embedding.weight."
        "reshape(4, 4, 36), spatial_shapes, max_length=20): F.interpolate bilinear, "
        "align_corners=False, antialias=True in float32, flattened row-major; rows past "
        "h * w repeat the first resized row",
        "images": [
            {
                "file": rel,
                "size_hw": [im.height, im.width],
                "target_hw": [int(th), int(tw)],
                "spatial_shape": [int(g) for g in grid],
                "num_patches": int(grid[0] * grid[1]),
            }
            for rel, im, (th, tw), grid in zip(images, pils, targets, spatial)
        ],
        "target_sizes": [[int(th), int(tw)] for th, tw in targets],
        "images_opened": "Image.open(path) as is (no EXIF transpose), mode RGB",
        "texts": TEXTS,
        "tokenizer": "CLIPTokenizer.from_pretrained(dir) (the class tokenizer_config.json "
        f"names; right padding); AutoTokenizer.from_pretrained(dir) gives "
        f"{type(auto_tok).__name__} (padding_side {auto_tok.padding_side}) because of "
        "model_type siglip2, and is not used",
        "text_padding": f"max_length ({TEXT_LEN}), truncation at {TEXT_LEN}; the "
        "attention_mask is passed to the text tower",
        "labels": LABELS,
        "template": TEMPLATE,
        "prompts": prompts,
        "vision_pooled_is": "vision_model(...).pooler_output: the MAP head over the real "
        "patches (padding keys masked), not normalised; = get_image_features(...)."
        "pooler_output",
        "vision_hidden_states_is": "last_hidden_state after post_layernorm; rows at "
        "padding patches are not meaningful",
        "text_pooled_is": "text_model(input_ids, attention_mask).pooler_output = "
        "head(final_layer_norm(h)[:, -1]), not normalised; = get_text_features(...)."
        "pooler_output",
        "logits_is": "exp(logit_scale) * normalize(text.pooled) @ normalize(vision.pooled).T "
        "+ logit_bias (logits_per_text [texts, images]; logits_per_image its transpose)",
        "zero_shot": {
            "probabilities": "sigmoid(logits_per_image) [images, labels]",
            "best": best,
        },
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "call": "Siglip2Model.from_pretrained(dir)(input_ids, attention_mask, pixel_values, "
        "pixel_attention_mask, spatial_shapes)",
    }
