"""SigLIP 2 (NaFlex) fixtures (part of area ``zoo``): a tiny random ``Siglip2Model``
checkpoint and transformers' outputs on it.

Run through ``scripts/make_fixtures.py --only zoo`` (``make_zoo`` stores the returned
description under ``"siglip2"`` in ``zoo/expected.json``; the arrays go to
``zoo/siglip2.npz``, the checkpoint to ``zoo/models/siglip2_tiny``, the generated input
images to ``zoo/inputs/``).

- ``siglip2_tiny``: ``Siglip2Model`` at odd shapes.  Text tower: vocabulary
  ``TOKENIZER_VOCAB`` (384, the tokenizer's, see below), hidden 36, 3 heads, 2 pre-norm
  layers, MLP 50 (``gelu_pytorch_tanh``), 16 learned positions, ``final_layer_norm``,
  and a ``head`` Linear 36 -> 36 (``projection_size``) on the LAST position's state
  (with the left padding below that is the last real token of every text; of a truncated
  text, its 16th token); ``pad_token_id`` 0, ``eos_token_id`` 1, ``bos_token_id`` 2.
  Vision tower: patches of 5x5x3 = 75 values come in already cut out and go through a
  Linear 75 -> 36 (``embeddings.patch_embedding``, not a convolution), plus learned
  position embeddings on a 4x4 grid (``num_patches`` 16, an ``nn.Embedding(16, 36)``
  whose row ``r * 4 + c`` is grid cell (r, c)), resized per image to its patch grid;
  then hidden 36, 3 heads, 2 layers, MLP 50, ``post_layernorm`` and the multi-head
  attention pooling head (``head.probe``, ``head.attention`` an ``nn.MultiheadAttention``
  with packed ``in_proj_weight``/``in_proj_bias`` and ``out_proj``, ``head.layernorm``,
  ``head.mlp``).  ``logit_scale`` and ``logit_bias`` are [1] parameters.  Every
  parameter is redrawn like the other zoo checkpoints (``_redraw``: norm weights
  1 + 0.1 N(0,1), all else 0.2 N(0,1), in parameter-name order from one generator),
  on a copy whose token embedding has ``DRAW_VOCAB`` = 544 rows (the vocabulary of the
  CLIP-style tokenizer this checkpoint had before), then cut to the first 384 rows: so
  every other parameter, the whole vision tower included, keeps the values it had.
  Then ``logit_scale`` = ln 10 and ``logit_bias`` = -2.5 are set so that the sigmoids
  are not saturated.
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

Tokenizer (``siglip2_tiny/tokenizer.json``, written by ``_tokenizer``): a tiny
Gemma-style BPE.  ``tokenizers.trainers.BpeTrainer`` (no randomness; the script trains
twice and checks that both runs agree) on CORPUS, normalised by Replace(" ", "▁") and,
for training only, pre-split before each "▁" (Split("▁", merged_with_next)), so that, as
in Gemma's SentencePiece vocabulary, pieces never cross a word boundary and a word's
leading "▁" is part of its first piece.  The vocabulary is then laid out as Gemma's:
``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, the 256 byte tokens
``<0x00>`` .. ``<0xFF>`` at 5 .. 260 (so ``byte_fallback`` can produce ids: a character
outside the vocabulary becomes the tokens of its UTF-8 bytes), then the trained alphabet
and merged pieces at 261 .. 383 (384 ids).  The tokenizer.json is Gemma's layout:
model BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True, no dropout), normalizer
Replace(" ", "▁") (no Prepend: Gemma adds no dummy prefix, so a text's first word has no
"▁"), no pre-tokenizer, decoder Sequence[Replace("▁", " "), ByteFallback, Fuse],
post-processor TemplateProcessing "<bos> $A" (pair "<bos> $A <bos> $B"), the five
special tokens as added tokens (special, not normalised), no padding or truncation.
tokenizer_config.json: ``tokenizer_class`` GemmaTokenizer, the five special tokens,
``model_max_length`` 16, and no ``padding_side`` (nor ``add_bos_token``).

Text reference path: ``AutoTokenizer.from_pretrained(dir)``, as transformers builds it for
real SigLIP 2 checkpoints: ``siglip2`` is among the model types whose hub tokenizer class
it treats as incorrect, so it ignores "GemmaTokenizer" and builds ``Siglip2Tokenizer``
(asserted).  That class takes only the vocabulary and merges from tokenizer.json and
builds its own pipeline: BPE(byte_fallback=True, fuse_unk=True, unk "<unk>"), normalizer
Sequence[Lowercase, Replace(" ", "▁")], pre-tokenizer Split(" ", merged_with_previous)
(which finds no space after the normaliser: the whole text is one BPE word), the same
decoder; the post-processor is taken from tokenizer.json as it is (so ``<bos>`` is
prepended although the tokenizer's ``add_bos_token`` attribute reads False; no
``<eos>``), and ``padding_side`` is the class default "left".  It is called as
``Siglip2Processor`` calls it (``padding="max_length", truncation=True``) with
``max_length`` 16 (the text tower's ``max_position_embeddings``; the processor's default
64 would not fit): a longer text keeps ``<bos>`` and its first 15 tokens; a shorter one
gets ``<pad>`` (0) ids and attention 0 on the LEFT.  The script checks that
``Siglip2Processor(image_processor, tokenizer)`` gives the same ids, and that the raw
tokenizer.json pipeline (``tokenizers.Tokenizer.from_file``: no lowercasing) gives other
ids for some texts; those raw ids (unpadded, untruncated) are recorded in expected.json
(``raw_input_ids``) for information only.  TEXTS: upper-case letters (lowercasing
matters), characters outside the vocabulary ("naïve Zoë ☃": byte fallback), a text past
16 tokens (truncated) and a short one.

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
- ``input_ids`` / ``attention_mask`` [5, 16]: that tokenizer on TEXTS with
  ``padding="max_length", max_length=16, truncation=True``: left padding, ``<bos>``
  first, truncated texts cut at 16 ids (no end token).
  ``text.pooled`` [5, 36]: ``text_model(input_ids, attention_mask).pooler_output`` =
  ``head(final_layer_norm(h)[:, -1])``, not normalised (what ``get_text_features``
  returns as ``pooler_output``).  The padding mask is passed, as the processor's output
  carries it; the encoder is bidirectional (no causal mask).
- ``logits_per_text`` [5 texts, 7 images] / ``logits_per_image`` [7, 5]:
  ``Siglip2Model(input_ids, attention_mask, pixel_values, pixel_attention_mask,
  spatial_shapes)``: ``exp(logit_scale) * t_hat . i_hat + logit_bias`` on the
  L2-normalised pooled features.
- Zero-shot: LABELS put into TEMPLATE (fixtures_aligned's), tokenized the same way
  (``zero_shot.input_ids`` / ``zero_shot.attention_mask`` [4, 16]), the same model
  call; ``zero_shot.logits`` = ``logits_per_image`` [7 images, 4 labels] and
  ``zero_shot.probs`` its sigmoid.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from fixtures_aligned import IMAGES as COMMITTED_IMAGES
from fixtures_aligned import LABELS, TEMPLATE
from fixtures_zoo import SEED, SRC, _redraw
from make_fixtures import save_npz
from PIL import Image

MODEL_SEED = SEED + 30
IMAGE_SEED = SEED + 31
PATCH = 5
MAX_PATCHES = 20
GRID = 4  # sqrt(num_patches): the position table is GRID x GRID
TEXT_LEN = 16
# Texts for the text tower: upper case (the reference lowercases), characters outside
# the vocabulary (byte fallback), one past TEXT_LEN tokens (truncated), a short one.
TEXTS = [
    "A Photo of a CAT",
    "The Mountain Lake in the Morning",
    "naïve Zoë ☃",
    "two dogs playing in the snow near a small red boat on the lake at night",
    "red",
]
# The tokenizer's training corpus.
CORPUS = [
    "A photo of a cat sitting on the sofa.",
    "A painting of a mountain lake in the morning.",
    "Two dogs are playing in the snow!",
    "The red traffic light at night, seen from a car.",
    "A small boat on the blue water near the shore.",
    "People walking in a busy street of the old city.",
    "The cat and the dog sleep in the warm sun.",
    "Three birds sit on a green tree in the park.",
    "A photo of a mountain at night with bright stars.",
    "Light snow is falling on the quiet lake.",
    "Children play with a red ball near the water.",
    "An old man reads a book at the window.",
]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0 .. 4, as Gemma's
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # ids 5 .. 260
TOKENIZER_VOCAB = 384
# Rows of the token embedding as drawn (the vocabulary of the CLIP-style tokenizer this
# checkpoint first had), so that every other parameter keeps its draw; see _checkpoint.
DRAW_VOCAB = 544
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


def _train_bpe() -> dict:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training only: words split before each "▁", so pieces stay inside a word.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(BYTE_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return json.loads(tok.to_str())["model"]


def _tokenizer(d: Path) -> int:
    """Writes the Gemma-style tokenizer files to d (see the docstring); its vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    trained = _train_bpe()
    assert _train_bpe() == trained, "BpeTrainer is not deterministic"
    learned = [t for t in trained["vocab"] if t not in SPECIAL_TOKENS]
    assert not set(learned) & set(BYTE_TOKENS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + learned)}
    assert len(vocab) == TOKENIZER_VOCAB, len(vocab)
    merges = [tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0",
        pair="<bos>:0 $A:0 <bos>:1 $B:1",
        special_tokens=[("<bos>", vocab["<bos>"])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) == TOKENIZER_VOCAB
    tok.save(str(d / "tokenizer.json"))
    names = ["pad_token", "eos_token", "bos_token", "unk_token", "mask_token"]
    special = dict(zip(names, SPECIAL_TOKENS))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "GemmaTokenizer", **special, "model_max_length": TEXT_LEN},
            indent=2,
        )
        + "\n"
    )
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return TOKENIZER_VOCAB


def _checkpoint(d: Path):
    from transformers import Siglip2Config, Siglip2Model

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    vocab = _tokenizer(d)
    text_config = {
        **SIZES,
        "vocab_size": vocab,
        "max_position_embeddings": TEXT_LEN,
        "projection_size": 36,
        "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
        "bos_token_id": SPECIAL_TOKENS.index("<bos>"),
        "eos_token_id": SPECIAL_TOKENS.index("<eos>"),
    }
    vision_config = {
        **SIZES,
        "num_channels": 3,
        "patch_size": PATCH,
        "num_patches": GRID * GRID,
    }
    cfg = Siglip2Config(text_config=text_config, vision_config=vision_config)
    # _redraw draws the parameters in name order from one generator: drawn on a copy with
    # DRAW_VOCAB embedding rows, cut to the tokenizer's, every other parameter keeps the
    # values it had with the earlier 544-id tokenizer (the vision tower's above all).
    drawn = Siglip2Model(
        Siglip2Config(
            text_config={**text_config, "vocab_size": DRAW_VOCAB}, vision_config=vision_config
        )
    )
    _redraw(drawn, MODEL_SEED)
    state = drawn.state_dict()
    emb = "text_model.embeddings.token_embedding.weight"
    state[emb] = state[emb][:vocab].clone()
    torch.manual_seed(MODEL_SEED)
    model = Siglip2Model(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
        model.logit_bias.fill_(LOGIT_BIAS)
    model.save_pretrained(str(d), safe_serialization=True)
    model, info = Siglip2Model.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"siglip2_tiny: {bad}"
    return model.eval(), text_config, vision_config


def make_siglip2(models: Path) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer, Siglip2Processor
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
    tok = AutoTokenizer.from_pretrained(str(d))
    assert type(tok).__name__ == "Siglip2Tokenizer", type(tok)
    assert tok.padding_side == "left", tok.padding_side
    assert len(tok) == text_config["vocab_size"], len(tok)
    backend = tok.backend_tokenizer
    assert backend.model.byte_fallback and backend.model.fuse_unk
    raw_tok = Tokenizer.from_file(str(d / "tokenizer.json"))

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
    # The processor's own text path gives the same ids.
    siglip2_proc = Siglip2Processor(image_processor=proc, tokenizer=tok)
    for texts, ref_enc in ((TEXTS, text), (prompts, zs_text)):
        via = siglip2_proc(text=texts, max_length=TEXT_LEN, return_tensors="pt")
        assert torch.equal(via["input_ids"], ref_enc["input_ids"])
        assert torch.equal(via["attention_mask"], ref_enc["attention_mask"])
    # The shape of what came out: <bos> first, left padding, truncation keeps <bos>.
    bos = tok.convert_tokens_to_ids("<bos>")
    unk = tok.convert_tokens_to_ids("<unk>")
    for ids, mask in zip(text["input_ids"].tolist(), text["attention_mask"].tolist()):
        n = sum(mask)
        assert mask == [0] * (TEXT_LEN - n) + [1] * n
        assert ids[: TEXT_LEN - n] == [0] * (TEXT_LEN - n) and ids[TEXT_LEN - n] == bos
        assert unk not in ids
    assert any(sum(m) == TEXT_LEN for m in text["attention_mask"].tolist())
    assert any(i in range(5, 5 + 256) for i in text["input_ids"].flatten().tolist())
    raw_ids = [e.ids for e in raw_tok.encode_batch(TEXTS)]
    real_ids = [
        [i for i, m in zip(ids, mask) if m]
        for ids, mask in zip(text["input_ids"].tolist(), text["attention_mask"].tolist())
    ]
    assert any(r[:TEXT_LEN] != a for r, a in zip(raw_ids, real_ids)), "lowercasing unused"
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
        "tokenizer": {
            "call": "AutoTokenizer.from_pretrained(dir)(texts, padding='max_length', "
            f"truncation=True, max_length={TEXT_LEN}) (as Siglip2Processor calls it; "
            "checked against Siglip2Processor(image_processor, tokenizer))",
            "class": type(tok).__name__,
            "tokenizer_config_class": "GemmaTokenizer",
            "padding_side": tok.padding_side,
            "add_bos_token_attribute": bool(tok.add_bos_token),
            "bos_added": all(ids[0] == bos for ids in real_ids),
            "vocab_size": len(tok),
            "model": f"BPE(unk_token={backend.model.unk_token!r}, "
            f"byte_fallback={backend.model.byte_fallback}, fuse_unk={backend.model.fuse_unk})",
            "normalizer": str(backend.normalizer),
            "pre_tokenizer": str(backend.pre_tokenizer),
            "post_processor": str(backend.post_processor),
            "decoder": str(backend.decoder),
            "tokenizer_json": {
                "normalizer": str(raw_tok.normalizer),
                "pre_tokenizer": str(raw_tok.pre_tokenizer),
                "post_processor": str(raw_tok.post_processor),
            },
            "corpus": CORPUS,
        },
        "input_ids": text["input_ids"].tolist(),
        "attention_mask": text["attention_mask"].tolist(),
        "tokens": [tok.convert_ids_to_tokens(ids) for ids in text["input_ids"].tolist()],
        "raw_input_ids": raw_ids,
        "raw_input_ids_are": "tokenizers.Tokenizer.from_file(dir/tokenizer.json)"
        ".encode_batch(texts).ids: the tokenizer.json pipeline (no lowercasing), no "
        "padding or truncation; for information, not the reference",
        "text_padding": f"max_length ({TEXT_LEN}) on the left, truncation at {TEXT_LEN} "
        "ids (<bos> + 15 tokens); the attention_mask is passed to the text tower",
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
