"""Aligned-head fixtures (area ``aligned``): similarity logits and zero-shot
probabilities of the committed tiny dual-tower checkpoints, computed by
transformers' own models.

Run through ``scripts/make_fixtures.py --only aligned``.  It reads
``tests/fixtures/encoders/models/{clip_tiny,siglip_tiny}`` (made by the ``encoders``
area) and the committed test images, and writes ``expected.json``: per family, the
texts, the image files, ``logits_per_text`` / ``logits_per_image`` from
``CLIPModel(...)`` / ``SiglipModel(...)`` on the processors' outputs, and a zero-shot
case (labels put into a template; ``softmax`` over the labels for CLIP,
``sigmoid`` for SigLIP, as the model cards do).

Preprocessing as mlmf's defaults for these checkpoints: the image processor of the
checkpoint with the PIL backend; texts truncated at the text tower's
``max_position_embeddings`` (16 here: the longer prompts are cut, end token kept),
CLIP text padded to the longest, SigLIP text padded to that length (what
SiglipProcessor users pass, and what the tower was trained with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from make_fixtures import ROOT, write_json
from PIL import Image

SRC = ROOT / "tests" / "fixtures"
MODELS = SRC / "encoders" / "models"
IMAGES = [
    "image/inputs/jpeg420_81x61.jpg",
    "image/inputs/rgb_640x480.png",
    "image/inputs/exif_orient6_64x48.jpg",
]
TEXTS = [
    "a photo of a cat",
    "a painting of a mountain lake in the morning",
    "red",
    "two dogs playing in the snow!",
    "a diagram",
]
LABELS = ["cat", "mountain lake", "dog", "traffic light at night"]
TEMPLATE = "a photo of a {}."


def _images() -> list[Image.Image]:
    out = []
    for f in IMAGES:
        with Image.open(SRC / f) as im:
            im.load()
            out.append(im.copy())
    return out


def _case(family: str) -> dict[str, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel

    d = MODELS / f"{family}_tiny"
    cls = {"clip": CLIPModel, "siglip": SiglipModel}[family]
    model = cls.from_pretrained(str(d)).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    proc = AutoImageProcessor.from_pretrained(str(d), backend="pil")
    n = model.config.text_config.max_position_embeddings
    if family == "siglip":

        def encode(texts: list[str]) -> Any:
            return tok(
                texts, padding="max_length", truncation=True, max_length=n, return_tensors="pt"
            )

        padding = f"max_length ({n})"
    else:

        def encode(texts: list[str]) -> Any:
            return tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")

        padding = f"longest, truncated at {n}"
    pixel_values = proc(images=_images(), return_tensors="pt")["pixel_values"]

    def run(texts: list[str]) -> Any:
        enc = encode(texts)
        with torch.no_grad():
            return model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=pixel_values,
            )

    out = run(TEXTS)
    prompts = [TEMPLATE.format(label) for label in LABELS]
    zs = run(prompts)
    logits = zs.logits_per_image
    probs = logits.softmax(dim=1) if family == "clip" else torch.sigmoid(logits)
    head = {"logit_scale": float(model.logit_scale.detach().reshape(-1)[0])}
    if family == "siglip":
        head["logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    return {
        "model": f"encoders/models/{family}_tiny",
        "model_class": cls.__name__,
        "image_processor": type(proc).__name__,
        "text_padding": padding,
        "texts": TEXTS,
        "images": IMAGES,
        "heads": head,
        "logits_per_text": out.logits_per_text.tolist(),
        "logits_per_image": out.logits_per_image.tolist(),
        "zero_shot": {
            "labels": LABELS,
            "template": TEMPLATE,
            "prompts": prompts,
            "probabilities": "softmax over labels" if family == "clip" else "sigmoid",
            "logits": logits.tolist(),
            "probs": probs.tolist(),
            "best": [LABELS[i] for i in probs.argmax(dim=1).tolist()],
        },
        "call": f"{cls.__name__}.from_pretrained(dir)(input_ids, attention_mask, pixel_values)",
    }


def make_aligned(out: Path) -> None:
    import transformers

    write_json(
        out / "expected.json",
        {
            "area": "aligned",
            "schema": 1,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "tolerance": {"logits": 1e-4, "probs": 1e-5},
            "families": {f: _case(f) for f in ("clip", "siglip")},
        },
    )
