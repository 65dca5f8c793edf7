"""Cross-modal attention fixtures (area ``attention``): seeded layers and their reference outputs.

Run through ``scripts/make_fixtures.py --only attention``, which calls
:func:`make_attention` and provides the shared helpers (``Arrays``,
``write_json``, ...).  Layout and manifest schema: tests/fixtures/README.md.

The layer is mlmf's ``CrossModalAttention(dim, num_heads, kv_dim, head_dim=None
-> dim // num_heads, num_kv_heads=None -> num_heads, temperature=1.0, bias=True,
qk_norm=False, qk_norm_eps=1e-6, softcap=None, sliding_window=None, top_k=None,
sparsity_ratio=None, rope_base=None, rope_scale=1.0, adaptive=False,
adaptive_target_std=1.0, adaptive_min_temperature=0.5, adaptive_max_temperature=2.0,
adaptive_max_sparsity=0.5)`` (float32, batch first),
with the weights ``q_proj.{weight,bias}`` ``[H*hd, dim]``, ``k_proj.*`` /
``v_proj.*`` ``[Hkv*hd, kv_dim]``, ``out_proj.*`` ``[dim, H*hd]`` and, with
qk_norm, ``q_norm.weight`` / ``k_norm.weight`` ``[hd]`` in one
``weights.safetensors`` per case:

    q = q_proj(query) -> [B, H, Tq, hd];  k, v = k_proj(kv), v_proj(kv) -> [B, Hkv, Tk, hd]
    qk_norm: q, k = x * w / sqrt(mean(x^2 over hd) + qk_norm_eps) (q_norm / k_norm weights)
    rope_base: q, k = x * cos + rotate_half(x) * sin, angle = (pos / rope_scale) * inv_freq,
        inv_freq[i] = rope_base^(-2i/hd), cos/sin of [f, f]; query positions 0..Tq-1,
        key positions 0..Tk-1; rotate_half(x) = cat(-x2, x1)  (transformers' Llama)
    query head h reads kv head h // (H // Hkv)
    logits = q k^T / (temperature * sqrt(hd));  softcap: logits = c * tanh(logits / c)
    allowed keys: kv_mask 1 and, with sliding_window w, |i - j| <= w
    top_k / sparsity_ratio: per query row and head only the k largest allowed logits
        (k = top_k, or max(1, ceil((1 - sparsity_ratio) * n_allowed)); all if n_allowed <= k)
    adaptive (never with top_k / sparsity_ratio): per query row and head, over the row's
        n allowed logits l (unchanged when n <= 1):
        sigma = sqrt(mean((l - mean(l))^2))                      (population std)
        tau = clamp(sigma / adaptive_target_std, adaptive_min_temperature,
                    adaptive_max_temperature)                    (defaults 1.0, 0.5, 2.0)
        l = l / tau;  p = softmax(l);  h = -sum(p ln p) / ln(n)  (normalised entropy)
        s = adaptive_max_sparsity * (1 - h)                      (default 0.5)
        keep the k = max(1, ceil((1 - s) * n)) largest l; the weights are the softmax of
        the kept l (the scaled logits)
    the other keys -> -inf
    weights = softmax(logits) [B, H, Tq, Tk];  out = out_proj(merge(weights v)) [B, Tq, dim]
    a query row with no allowed key: weights 0 and output row 0 (not out_proj.bias)
    a query row with query_mask 0: weights 0 and output row 0
    weights_mean = weights.mean(over heads) [B, Tq, Tk]

Weights are drawn in float32 from a seeded generator (0.2 N(0,1) for matrices,
0.25 N(0,1) for biases), inputs are N(0,1) draws rounded to multiples of 1/32
(exact in float32, and they compress); both are stored as float32.  The
references run in float64 on those float32 values and their outputs are cast
to float32:

- ``written-out``: the formula above with matmul/einsum (no
  nn.MultiheadAttention), for every case;
- ``torch.nn.MultiheadAttention``: for the plain cases (num_kv_heads ==
  num_heads, num_heads * head_dim == dim, temperature 1, no query mask), with
  ``q/k/v_proj_weight``, ``in_proj_bias`` and ``out_proj`` set from the same
  tensors and ``key_padding_mask = (kv_mask == 0)``.  The two must agree to
  1e-6 (asserted); the stored arrays are MultiheadAttention's, except where it
  gives NaN (a row whose keys are all masked), where they are the written-out
  ones.

Other cases also record how far the written-out result is from
MultiheadAttention run on an equivalent layer (kv heads repeated, q scaled by
1 / temperature, query rows zeroed afterwards) where one exists.  The variant
cases (qk_norm, rope, softcap, sliding_window, top_k, sparsity_ratio,
adaptive) have the written-out reference only (MultiheadAttention has none of
these); their q/k steps are checked against torch.nn.functional.rms_norm and
transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, and the adaptive
entropy against torch.distributions.Categorical.  Key selection (top_k,
sparsity_ratio, adaptive) is kept away from ties and from rounding edges, so
that a float32 implementation keeps the same keys: the k-th and (k+1)-th
largest logits of a row differ by more than MIN_TOPK_GAP, and with adaptive
(1 - s) * n is more than MIN_INTEGER_DISTANCE from an integer.  The
``bidirectional`` case holds two layers (text -> image and image -> text) over
one shared set of inputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from make_fixtures import SCHEMA_VERSION, Arrays, write_json
from torch import nn

# Inputs: N(0,1) rounded to this grid (exact in float32).
INPUT_STEP = 1 / 32
WEIGHT_STD = 0.2
BIAS_STD = 0.25
# qk_norm weights: 1 + NORM_STD N(0,1).
NORM_STD = 0.2
# top_k / sparsity_ratio: the k-th and (k+1)-th largest allowed logits of a row must be
# at least this far apart (float64), so that a float32 implementation keeps the same keys.
MIN_TOPK_GAP = 1e-3
# adaptive: (1 - s) * n must be at least this far from an integer (float64), so that a
# float32 implementation rounds k the same way.
MIN_INTEGER_DISTANCE = 1e-3
# adaptive entropy against torch.distributions.Categorical (float64).
ENTROPY_TOL = 1e-12
# rotary q/k against transformers' LlamaRotaryEmbedding (float32 angles) + apply_rotary_pos_emb.
ROPE_TOL = 1e-5
# Plain cases must agree with nn.MultiheadAttention to this (float64 computations).
REFERENCE_TOL = 1e-6

MHA = "torch.nn.MultiheadAttention"
WRITTEN = "written-out"

BASE = {"dim": 24, "num_heads": 4, "kv_dim": 20, "batch": 2, "tq": 5, "tk": 7}

# One spec per case.  ``config`` holds the constructor arguments as passed
# (None = the default); masks are per batch row, None = no mask.
# Weights come from Generator(seed), inputs from Generator(seed + 1000).
CASES: list[dict[str, Any]] = [
    {
        "id": "plain",
        "seed": 301,
        "description": "no masks",
    },
    {
        "id": "kv_mask",
        "seed": 302,
        "description": "kv_mask: batch row 1 has keys 2, 5 and 6 masked",
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0]],
    },
    {
        "id": "query_mask",
        "seed": 303,
        "description": "query_mask: batch row 0 has its last two queries masked, row 1 query 1",
        "query_mask": [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]],
    },
    {
        "id": "kv_all_masked",
        "seed": 304,
        "description": "kv_mask: batch row 1 has every key masked (weights and output rows 0), "
        "row 0 key 3",
        "kv_mask": [[1, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
    },
    {
        "id": "gqa",
        "seed": 305,
        "description": "grouped-query attention: 4 query heads over 2 kv heads (heads 0-1 read "
        "kv head 0, heads 2-3 kv head 1); kv_mask: batch row 0 has its last two keys masked",
        "config": {"num_kv_heads": 2},
        "kv_mask": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
    },
    {
        "id": "mqa",
        "seed": 306,
        "description": "multi-query attention: 4 query heads over 1 kv head; no masks",
        "config": {"num_kv_heads": 1},
    },
    {
        "id": "head_dim_8",
        "seed": 307,
        "description": "head_dim 8 with dim 24 and 4 heads (q width 32 != dim); both masks: "
        "kv_mask row 0 keys 0 and 6, query_mask row 1 query 4",
        "config": {"head_dim": 8},
        "kv_mask": [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]],
        "query_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
    },
    {
        "id": "temperature_0.5",
        "seed": 308,
        "description": "temperature 0.5 (logits / (0.5 * sqrt(hd))); no masks",
        "config": {"temperature": 0.5},
    },
    {
        "id": "tq1",
        "seed": 309,
        "description": "a single query (Tq = 1); kv_mask: batch row 1 has its last two keys masked",
        "tq": 1,
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
    },
    # Variants: written-out reference only.
    {
        "id": "qk_norm",
        "seed": 310,
        "description": "qk_norm: RMSNorm over head_dim on q and k after the head split "
        "(q_norm.weight, k_norm.weight [6], eps 1e-6); kv_mask: batch row 1 has keys 0 and 3 "
        "masked",
        "config": {"qk_norm": True},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1]],
    },
    {
        "id": "rope",
        "seed": 311,
        "description": "rotary embedding on q and k, base 10000 (query positions 0-4, key "
        "positions 0-6); kv_mask: batch row 0 has keys 4, 5 and 6 masked",
        "config": {"rope_base": 10000.0},
        "kv_mask": [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
    },
    {
        "id": "rope_scaled",
        "seed": 312,
        "description": "rotary embedding, base 500, rope_scale 4 (angle = pos / 4 * inv_freq); "
        "kv_mask: batch row 1 has key 6 masked; query_mask: batch row 0 query 2",
        "config": {"rope_base": 500.0, "rope_scale": 4.0},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]],
        "query_mask": [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]],
    },
    {
        "id": "softcap",
        "seed": 313,
        "description": "softcap 0.5: logits = 0.5 * tanh(logits / 0.5) after the 1/sqrt(hd) "
        "scaling, before masking (softcap_stats: how far into tanh's nonlinear range); "
        "kv_mask: batch row 0 has key 1 masked",
        "config": {"softcap": 0.5},
        "kv_mask": [[1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]],
    },
    {
        "id": "sliding_window",
        "seed": 314,
        "description": "sliding_window 1: query i reads keys j with |i - j| <= 1; kv_mask: batch "
        "row 1 has keys 0, 1 and 5 masked, so its query 0 has no allowed key (weights and out "
        "row 0)",
        "config": {"sliding_window": 1},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1]],
    },
    {
        "id": "top_k",
        "seed": 315,
        "description": "top_k 3: per query row and head only the 3 largest allowed logits are "
        "kept; kv_mask: batch row 1 has only keys 1 and 4 unmasked (fewer than 3: both kept)",
        "config": {"top_k": 3},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 0, 0]],
    },
    {
        "id": "sparsity_ratio",
        "seed": 316,
        "description": "sparsity_ratio 0.6: k = max(1, ceil(0.4 * n_allowed)) largest allowed "
        "logits per query row and head; batch row 0 unmasked (n 7 -> k 3), kv_mask: batch row 1 "
        "has keys 0, 2 and 5 masked (n 4 -> k 2)",
        "config": {"sparsity_ratio": 0.6},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1]],
    },
    {
        "id": "combined",
        "seed": 317,
        "description": "2 kv heads + qk_norm + rope base 10000 + softcap 1 + sliding_window 2 + "
        "top_k 2; kv_mask: batch row 0 has key 2 masked, row 1 keys 0 and 1 (its query 0 then "
        "has one allowed key, kept alone); query_mask: batch row 1 query 3",
        "config": {
            "num_kv_heads": 2,
            "qk_norm": True,
            "rope_base": 10000.0,
            "softcap": 1.0,
            "sliding_window": 2,
            "top_k": 2,
        },
        "kv_mask": [[1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]],
        "query_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]],
    },
    # Adaptive temperature and sparsity (seeds 320-322: 318 and 319 are bidirectional's).
    {
        "id": "adaptive",
        "seed": 320,
        "description": "adaptive with its default parameters; temperature 0.7 spreads the "
        "logits so that tau is clamped at 0.5 in some rows, at 2.0 in others, and inside the "
        "range in most; kv_mask: batch row 1 has keys 1 and 4 masked",
        "config": {"adaptive": True, "temperature": 0.7},
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1]],
    },
    {
        "id": "adaptive_params",
        "seed": 321,
        "description": "adaptive with every parameter set: target_std 1.5, temperatures "
        "clamped to [0.3, 1.2], max_sparsity 0.8, and temperature 0.6; kv_mask: batch row 0 "
        "has key 6 masked; query_mask: batch row 1 query 2",
        "config": {
            "temperature": 0.6,
            "adaptive": True,
            "adaptive_target_std": 1.5,
            "adaptive_min_temperature": 0.3,
            "adaptive_max_temperature": 1.2,
            "adaptive_max_sparsity": 0.8,
        },
        "kv_mask": [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]],
        "query_mask": [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]],
    },
    {
        "id": "adaptive_window",
        "seed": 322,
        "description": "adaptive (max_sparsity 0.9) after softcap 1 and sliding_window 2, 2 kv "
        "heads; kv_mask: batch row 1 has keys 0, 1 and 3 masked (its queries 0 and 1 have one "
        "allowed key, left unchanged; rows with 2-5 allowed keys elsewhere)",
        "config": {
            "num_kv_heads": 2,
            "softcap": 1.0,
            "sliding_window": 2,
            "adaptive": True,
            "adaptive_max_sparsity": 0.9,
        },
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 1, 1]],
    },
]

# Two layers over one set of inputs: text [B, 5, 24] and image [B, 7, 20] (drawn as query
# and key_value of the text_to_image layer from Generator(seed + 1000)).  text_to_image
# weights come from Generator(seed), image_to_text weights from Generator(seed + 1).
BIDIRECTIONAL: dict[str, Any] = {
    "id": "bidirectional",
    "seed": 318,
    "description": "two independent layers over the same inputs: text_to_image (query = text "
    "[B, 5, 24], key_value = image [B, 7, 20]) and image_to_text (query = image, dim 20, "
    "key_value = text, kv_dim 24, 4 heads -> head_dim 5); both masks on both directions "
    "(text_mask is query_mask of text_to_image and kv_mask of image_to_text): text_mask rows "
    "end with 1 and 3 padding tokens, image_mask row 1 with 2",
    "text_mask": [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]],
    "image_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
    "directions": {
        "text_to_image": {"config": {"dim": 24, "kv_dim": 20}, "query": "text", "kv": "image"},
        "image_to_text": {"config": {"dim": 20, "kv_dim": 24}, "query": "image", "kv": "text"},
    },
}

WEIGHT_NAMES = [
    f"{p}.{s}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for s in ("weight", "bias")
]
# Only with qk_norm, drawn after WEIGHT_NAMES from the same generator.
QK_NORM_WEIGHT_NAMES = ["q_norm.weight", "k_norm.weight"]

# The variant switches and their defaults (every case's config lists them).
VARIANT_DEFAULTS: dict[str, Any] = {
    "qk_norm": False,
    "qk_norm_eps": 1e-6,
    "softcap": None,
    "sliding_window": None,
    "top_k": None,
    "sparsity_ratio": None,
    "rope_base": None,
    "rope_scale": 1.0,
    "adaptive": False,
    "adaptive_target_std": 1.0,
    "adaptive_min_temperature": 0.5,
    "adaptive_max_temperature": 2.0,
    "adaptive_max_sparsity": 0.5,
}
# Parameters of the adaptive switch (set only together with it).
ADAPTIVE_PARAMETERS = [name for name in VARIANT_DEFAULTS if name.startswith("adaptive_")]


# ---------------------------------------------------------------------------
# Layer description, weights, inputs
# ---------------------------------------------------------------------------


def constructor_args(spec: dict) -> dict:
    """All constructor arguments as passed (None where the default applies)."""
    args = {
        "dim": BASE["dim"],
        "num_heads": BASE["num_heads"],
        "kv_dim": BASE["kv_dim"],
        "head_dim": None,
        "num_kv_heads": None,
        "temperature": 1.0,
        "bias": True,
        **VARIANT_DEFAULTS,
    }
    args.update(spec.get("config", {}))
    return args


def variants(args: dict) -> list[str]:
    """The variant switches a layer uses (those MultiheadAttention cannot express)."""
    out = []
    if args["qk_norm"]:
        out.append("qk_norm")
    if args["rope_base"] is not None:
        out.append("rope")
    for name in ("softcap", "sliding_window", "top_k", "sparsity_ratio"):
        if args[name] is not None:
            out.append(name)
    if args["adaptive"]:
        out.append("adaptive")
    return out


def resolve(args: dict) -> dict:
    head_dim = (
        args["head_dim"] if args["head_dim"] is not None else args["dim"] // args["num_heads"]
    )
    kv_heads = args["num_kv_heads"] if args["num_kv_heads"] is not None else args["num_heads"]
    assert args["num_heads"] % kv_heads == 0
    assert args["rope_base"] is None or head_dim % 2 == 0, "rope needs an even head_dim"
    assert args["rope_base"] is not None or args["rope_scale"] == 1.0
    assert args["top_k"] is None or args["sparsity_ratio"] is None
    assert args["sparsity_ratio"] is None or 0 <= args["sparsity_ratio"] < 1
    for name in ADAPTIVE_PARAMETERS:
        assert args["adaptive"] or args[name] == VARIANT_DEFAULTS[name], name
    if args["adaptive"]:
        assert args["top_k"] is None and args["sparsity_ratio"] is None
        assert args["adaptive_target_std"] > 0
        assert 0 < args["adaptive_min_temperature"] <= args["adaptive_max_temperature"]
        assert 0 <= args["adaptive_max_sparsity"] <= 1
    return {
        "head_dim": head_dim,
        "num_kv_heads": kv_heads,
        "q_width": args["num_heads"] * head_dim,
        "kv_width": kv_heads * head_dim,
        "scale": 1.0 / (args["temperature"] * math.sqrt(head_dim)),
    }


def is_plain(args: dict, res: dict, query_mask: Any) -> bool:
    return (
        res["num_kv_heads"] == args["num_heads"]
        and res["q_width"] == args["dim"]
        and args["temperature"] == 1.0
        and query_mask is None
        and not variants(args)
    )


def draw_weights(args: dict, res: dict, seed: int) -> dict[str, torch.Tensor]:
    """float32 weights in WEIGHT_NAMES order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (res["q_width"], args["dim"]),
        "k_proj": (res["kv_width"], args["kv_dim"]),
        "v_proj": (res["kv_width"], args["kv_dim"]),
        "out_proj": (args["dim"], res["q_width"]),
    }
    w: dict[str, torch.Tensor] = {}
    for name in WEIGHT_NAMES:
        proj, kind = name.split(".")
        shape = shapes[proj] if kind == "weight" else shapes[proj][:1]
        std = WEIGHT_STD if kind == "weight" else BIAS_STD
        w[name] = std * torch.randn(shape, generator=gen, dtype=torch.float32)
    if args["qk_norm"]:
        for name in QK_NORM_WEIGHT_NAMES:
            x = torch.randn((res["head_dim"],), generator=gen, dtype=torch.float32)
            w[name] = 1.0 + NORM_STD * x
    return w


def draw_inputs(args: dict, batch: int, tq: int, tk: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def grid(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        return torch.round(x / INPUT_STEP) * INPUT_STEP

    return {
        "query": grid((batch, tq, args["dim"])),
        "key_value": grid((batch, tk, args["kv_dim"])),
    }


# ---------------------------------------------------------------------------
# References (float64)
# ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * w / sqrt(mean(x^2 over the last axis) + eps)."""
    return x * weight / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(n: int, hd: int, base: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, hd] (float64) for positions 0..n-1."""
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = (torch.arange(n, dtype=torch.float64) / scale)[:, None] * inv_freq[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, base: float, scale: float) -> torch.Tensor:
    """x [..., T, hd] rotated with positions 0..T-1."""
    cos, sin = rope_cos_sin(x.shape[-2], x.shape[-1], base, scale)
    return x * cos + rotate_half(x) * sin


def keys_to_keep(n_allowed: int, args: dict) -> int:
    """How many of a row's n_allowed keys top_k / sparsity_ratio keep."""
    if args["top_k"] is not None:
        k = args["top_k"]
    else:
        kf = (1.0 - args["sparsity_ratio"]) * n_allowed
        # Keep clear of an integer product, where float32 and float64 could round apart.
        assert n_allowed == 0 or abs(kf - round(kf)) > 1e-3 or kf < 1, (n_allowed, kf)
        k = max(1, math.ceil(kf))
    return min(k, n_allowed)


def adaptive_selection(
    logits: torch.Tensor, allowed: torch.Tensor, args: dict
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The adaptive rule, one (batch, head, query) row at a time.

    ``logits`` [B, H, Tq, Tk] (after temperature and softcap), ``allowed`` [B, H, Tq, Tk].
    Returns the logits with each row's allowed entries divided by its temperature, the
    kept keys [B, H, Tq, Tk] and the per-row statistics.
    """
    b, h, tq, _ = logits.shape
    target = args["adaptive_target_std"]
    t_min, t_max = args["adaptive_min_temperature"], args["adaptive_max_temperature"]
    scaled = logits.clone()
    kept = torch.zeros_like(allowed)
    temperature: list = [[[None] * tq for _ in range(h)] for _ in range(b)]
    kept_count = [[[0] * tq for _ in range(h)] for _ in range(b)]
    clamped = {"min": 0, "max": 0, "inside": 0}
    entropies: list[float] = []
    distances: list[float] = []
    gaps: list[float] = []
    entropy_check = 0.0
    for bi in range(b):
        for hi in range(h):
            for qi in range(tq):
                idx = allowed[bi, hi, qi].nonzero().flatten()
                n = len(idx)
                if n <= 1:  # nothing to choose: unchanged
                    kept[bi, hi, qi, idx] = True
                    kept_count[bi][hi][qi] = n
                    continue
                row = logits[bi, hi, qi, idx]
                sigma = float(((row - row.mean()) ** 2).mean().sqrt())
                ratio = sigma / target
                tau = min(max(ratio, t_min), t_max)
                clamped["min" if ratio < t_min else "max" if ratio > t_max else "inside"] += 1
                row = row / tau
                p = torch.softmax(row, dim=0)
                entropy = float(-torch.special.xlogy(p, p).sum())
                cat = torch.distributions.Categorical(logits=row).entropy()
                entropy_check = max(entropy_check, abs(float(cat) - entropy))
                h_norm = entropy / math.log(n)
                sparsity = args["adaptive_max_sparsity"] * (1.0 - h_norm)
                kf = (1.0 - sparsity) * n
                k = max(1, math.ceil(kf))
                ranked = row.sort(descending=True)
                kept[bi, hi, qi, idx[ranked.indices[:k]]] = True
                scaled[bi, hi, qi, idx] = row
                temperature[bi][hi][qi] = round(tau, 6)
                kept_count[bi][hi][qi] = k
                entropies.append(h_norm)
                distances.append(abs(kf - round(kf)))
                if k < n:
                    gaps.append(float(ranked.values[k - 1] - ranked.values[k]))
    stats = {
        "temperature": temperature,
        "temperature_clamped_rows": clamped,
        "normalised_entropy_range": [min(entropies), max(entropies)] if entropies else None,
        "kept_keys_per_row_and_head": kept_count,
        "rows_with_dropped_keys": len(gaps),
        "min_distance_to_integer": min(distances) if distances else None,
        "min_gap_kth_to_next": min(gaps) if gaps else None,
        "entropy_check_max_abs_diff": entropy_check,
    }
    return scaled, kept, stats


def written_out(
    w: dict[str, torch.Tensor],
    args: dict,
    res: dict,
    query: torch.Tensor,
    key_value: torch.Tensor,
    query_mask: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
    info: dict | None = None,
) -> dict[str, torch.Tensor]:
    """The layer's formula, step by step (float64 in, float64 out).

    ``info`` (optional) receives the intermediate q/k, the pre-cap logits and the
    allowed / kept key masks.
    """
    info = {} if info is None else info
    b, tq, _ = query.shape
    tk = key_value.shape[1]
    h, hkv, hd = args["num_heads"], res["num_kv_heads"], res["head_dim"]
    q = (query @ w["q_proj.weight"].T + w["q_proj.bias"]).reshape(b, tq, h, hd).transpose(1, 2)
    k = key_value @ w["k_proj.weight"].T + w["k_proj.bias"]
    v = key_value @ w["v_proj.weight"].T + w["v_proj.bias"]
    k = k.reshape(b, tk, hkv, hd).transpose(1, 2)
    v = v.reshape(b, tk, hkv, hd).transpose(1, 2)
    info["q_heads"], info["k_heads"] = q, k
    # Per head over head_dim, after the head split, before rotary.
    if args["qk_norm"]:
        q = rms_norm(q, w["q_norm.weight"], args["qk_norm_eps"])
        k = rms_norm(k, w["k_norm.weight"], args["qk_norm_eps"])
        info["q_normed"], info["k_normed"] = q, k
    # Query positions 0..Tq-1, key positions 0..Tk-1.
    if args["rope_base"] is not None:
        q = apply_rope(q, args["rope_base"], args["rope_scale"])
        k = apply_rope(k, args["rope_base"], args["rope_scale"])
        info["q_rope"], info["k_rope"] = q, k
    # Query head i reads kv head i // (H // Hkv).
    kv_head = torch.arange(h) // (h // hkv)
    k, v = k[:, kv_head], v[:, kv_head]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / (args["temperature"] * math.sqrt(hd))
    # Softcap before any masking.
    if args["softcap"] is not None:
        info["logits_over_softcap"] = logits / args["softcap"]
        logits = args["softcap"] * torch.tanh(logits / args["softcap"])
    # Allowed keys [B, 1, Tq, Tk]: kv_mask, then the sliding window.
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool)
    if kv_mask is not None:
        allowed = allowed & (kv_mask[:, None, None, :] != 0)
    if args["sliding_window"] is not None:
        i = torch.arange(tq)[:, None]
        j = torch.arange(tk)[None, :]
        allowed = allowed & ((i - j).abs() <= args["sliding_window"])[None, None]
    info["allowed"] = allowed
    # Row has at least one allowed key [B, Tq] (the same for every head).
    has_key = allowed.any(dim=-1)[:, 0]
    # top_k / sparsity_ratio: per query row and head, the k largest allowed logits.
    if args["top_k"] is not None or args["sparsity_ratio"] is not None:
        n_allowed = allowed.sum(dim=-1)[:, 0]  # [B, Tq]
        k_row = torch.tensor(
            [[keys_to_keep(int(n), args) for n in row] for row in n_allowed.tolist()]
        )
        ranked = logits.masked_fill(~allowed, -math.inf).sort(dim=-1, descending=True).values
        kth = ranked.gather(-1, (k_row - 1).clamp(min=0)[:, None, :, None].expand(b, h, tq, 1))
        kept = allowed & (logits >= kth)
        assert (kept.sum(dim=-1) == k_row[:, None, :]).all(), "ties at the k-th logit"
        # Gap between the k-th and (k+1)-th largest allowed logit, where a key was dropped.
        gaps = [
            float(ranked[bi, hi, qi, k_row[bi, qi] - 1] - ranked[bi, hi, qi, k_row[bi, qi]])
            for bi in range(b)
            for hi in range(h)
            for qi in range(tq)
            if k_row[bi, qi] < n_allowed[bi, qi]
        ]
        info["allowed_keys_per_row"] = n_allowed.tolist()
        info["kept_keys_per_row"] = k_row.tolist()
        info["min_gap_kth_to_next"] = min(gaps) if gaps else None
        allowed = kept
    # adaptive: per query row and head, a temperature from the spread of the allowed
    # logits, then a sparsity from the entropy of the rescaled row.
    if args["adaptive"]:
        logits, allowed, info["adaptive"] = adaptive_selection(
            logits, allowed.expand(b, h, tq, tk), args
        )
    info["kept"] = allowed.expand(b, h, tq, tk)
    logits = logits.masked_fill(~allowed, -math.inf)
    # Softmax that gives 0 (not NaN) on a row of -inf.
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, e / torch.where(total > 0, total, 1.0), 0.0)
    if query_mask is not None:
        weights = weights * query_mask[:, None, :, None]
    ctx = torch.einsum("bhqk,bhkd->bhqd", weights, v).transpose(1, 2).reshape(b, tq, h * hd)
    out = ctx @ w["out_proj.weight"].T + w["out_proj.bias"]
    # Output rows are 0 where the query is masked or has no allowed key.
    keep = has_key.to(out.dtype)
    if query_mask is not None:
        keep = keep * query_mask
    out = out * keep[..., None]
    return {"out": out, "weights_per_head": weights, "weights_mean": weights.mean(dim=1)}


def mha_reference(
    w: dict[str, torch.Tensor],
    dim: int,
    num_heads: int,
    kv_dim: int,
    query: torch.Tensor,
    key_value: torch.Tensor,
    kv_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention (float64) with its projections set from ``w``."""
    mha = nn.MultiheadAttention(
        embed_dim=dim, num_heads=num_heads, kdim=kv_dim, vdim=kv_dim, bias=True, batch_first=True
    )
    mha = mha.to(torch.float64).eval()
    with torch.no_grad():
        mha.q_proj_weight.copy_(w["q_proj.weight"])
        mha.k_proj_weight.copy_(w["k_proj.weight"])
        mha.v_proj_weight.copy_(w["v_proj.weight"])
        mha.in_proj_bias.copy_(torch.cat([w["q_proj.bias"], w["k_proj.bias"], w["v_proj.bias"]]))
        mha.out_proj.weight.copy_(w["out_proj.weight"])
        mha.out_proj.bias.copy_(w["out_proj.bias"])
        kpm = None if kv_mask is None else kv_mask == 0
        out, per_head = mha(
            query,
            key_value,
            key_value,
            key_padding_mask=kpm,
            need_weights=True,
            average_attn_weights=False,
        )
        out2, mean = mha(
            query,
            key_value,
            key_value,
            key_padding_mask=kpm,
            need_weights=True,
            average_attn_weights=True,
        )
    # The averaging call recomputes the output (same math, not always the same bits).
    assert torch.allclose(out, out2, rtol=0, atol=1e-12, equal_nan=True)
    return {"out": out, "weights_per_head": per_head, "weights_mean": mean}


MHA_CALL = (
    "mha = torch.nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, kdim=kv_dim, "
    "vdim=kv_dim, bias=True, batch_first=True).double().eval(); "
    "mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight = q_proj.weight, k_proj.weight, "
    "v_proj.weight; mha.in_proj_bias = cat([q_proj.bias, k_proj.bias, v_proj.bias]); "
    "mha.out_proj.weight, mha.out_proj.bias = out_proj.weight, out_proj.bias; "
    "out, weights_per_head = mha(query, key_value, key_value, "
    "key_padding_mask=None if kv_mask is None else kv_mask == 0, need_weights=True, "
    "average_attn_weights=False); "
    "weights_mean = mha(..., need_weights=True, average_attn_weights=True)[1]"
)
WRITTEN_CALL = (
    "q = (query @ Wq.T + bq) -> [B,H,Tq,hd]; k, v = (kv @ Wk.T + bk), (kv @ Wv.T + bv) -> "
    "[B,Hkv,Tk,hd]; if qk_norm: q, k = x * w / sqrt((x * x).mean(-1) + qk_norm_eps) with "
    "q_norm.weight / k_norm.weight; if rope_base: q, k = x * cos + rotate_half(x) * sin, "
    "inv_freq = 1 / rope_base ** (arange(0, hd, 2) / hd), angle = (arange(T) / rope_scale) "
    "outer inv_freq, cos/sin of cat(angle, angle), rotate_half(x) = cat(-x[..., hd/2:], "
    "x[..., :hd/2]), T = Tq for q and Tk for k; k, v indexed with arange(H) // (H // Hkv); "
    "logits = einsum('bhqd,bhkd->bhqk', q, k) / (temperature * sqrt(hd)); if softcap: "
    "logits = softcap * tanh(logits / softcap); allowed = (kv_mask != 0) & (|i - j| <= "
    "sliding_window); if top_k or sparsity_ratio: allowed &= logits >= the k-th largest "
    "allowed logit of the row (k = min(top_k, n_allowed) or max(1, ceil((1 - sparsity_ratio) "
    "* n_allowed))); if adaptive: per row of n > 1 allowed logits l, tau = "
    "clamp(sqrt(mean((l - mean(l))^2)) / target_std, min_temperature, max_temperature), "
    "l = l / tau, h = -sum(p ln p) / ln(n) with p = softmax(l), s = max_sparsity * (1 - h), "
    "allowed = the k = max(1, ceil((1 - s) * n)) largest l; masked_fill(~allowed, -inf); "
    "weights = exp(logits - rowmax) / rowsum "
    "(0 on an all -inf row) * query_mask; out = merge(einsum('bhqk,bhkd->bhqd', weights, v)) "
    "@ Wo.T + bo, rows with query_mask 0 or no allowed key set to 0; "
    "weights_mean = weights.mean(1)"
)


def mha_equivalent(
    w: dict[str, torch.Tensor],
    args: dict,
    res: dict,
    query: torch.Tensor,
    key_value: torch.Tensor,
    query_mask: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """MultiheadAttention on an equivalent plain layer, or None where there is none."""
    if res["q_width"] != args["dim"] or variants(args):
        return None
    how = []
    w = dict(w)
    group = args["num_heads"] // res["num_kv_heads"]
    if group > 1:
        hd = res["head_dim"]
        for p in ("k_proj", "v_proj"):
            wt = w[f"{p}.weight"].reshape(res["num_kv_heads"], hd, -1)
            w[f"{p}.weight"] = wt.repeat_interleave(group, dim=0).reshape(-1, args["kv_dim"])
            w[f"{p}.bias"] = (
                w[f"{p}.bias"]
                .reshape(res["num_kv_heads"], hd)
                .repeat_interleave(group, 0)
                .reshape(-1)
            )
        how.append(f"k_proj/v_proj rows of each kv head repeated {group} times")
    if args["temperature"] != 1.0:
        w["q_proj.weight"] = w["q_proj.weight"] / args["temperature"]
        w["q_proj.bias"] = w["q_proj.bias"] / args["temperature"]
        how.append("q_proj weight and bias divided by temperature")
    r = mha_reference(w, args["dim"], args["num_heads"], args["kv_dim"], query, key_value, kv_mask)
    if query_mask is not None:
        m = query_mask
        r = {
            "out": r["out"] * m[..., None],
            "weights_per_head": r["weights_per_head"] * m[:, None, :, None],
            "weights_mean": r["weights_mean"] * m[..., None],
        }
        how.append("out, weights_per_head and weights_mean rows with query_mask 0 set to 0")
    return r, how


def max_abs_diffs(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rows: torch.Tensor | None = None
) -> dict[str, float]:
    """Largest |a - b| per output (optionally over batch rows ``rows`` only)."""
    out = {}
    for k in ("out", "weights_per_head", "weights_mean"):
        x, y = a[k], b[k]
        if rows is not None:
            x, y = x[rows], y[rows]
        out[k] = float((x - y).abs().max())
    return out


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def check_result(case_id: str, r: dict[str, np.ndarray], qm: Any, kept: torch.Tensor) -> float:
    """Sanity of a stored result; returns the mean row maximum of the live weight rows.

    ``kept`` [B, H, Tq, Tk]: the keys a query row may weight (kv_mask, window, top-k).
    """
    out, wph, wm = r["out"], r["weights_per_head"], r["weights_mean"]
    for k, v in r.items():
        assert np.isfinite(v).all(), f"{case_id}/{k}"
    b, h, tq, tk = wph.shape
    qm = np.ones((b, tq)) if qm is None else np.asarray(qm)
    kept = kept.numpy()
    live = (qm > 0) & kept.any(axis=-1).all(axis=1)  # [B, Tq]
    assert (kept.any(axis=-1).all(axis=1) == kept.any(axis=-1).any(axis=1)).all(), case_id
    sums = wph.astype(np.float64).sum(axis=-1)  # [B, H, Tq]
    assert np.allclose(sums, np.broadcast_to(live[:, None, :], sums.shape), atol=1e-6), case_id
    assert (wph[~kept] == 0).all(), case_id
    assert (wph[kept & live[:, None, :, None]] > 0).all(), case_id
    assert (out[~live] == 0).all(), case_id
    assert np.allclose(wm, wph.astype(np.float64).mean(axis=1), atol=1e-7), case_id
    assert float(out[live].std()) > 0.05, case_id
    row_max = float(wph.transpose(0, 2, 1, 3)[live].max(axis=-1).mean())
    assert 1.0 / tk < row_max < 0.9, f"{case_id}: attention row max {row_max}"
    return row_max


def piece_checks(w: dict[str, torch.Tensor], args: dict, res: dict, info: dict) -> dict:
    """The qk_norm / rope steps against torch's and transformers' own implementations."""
    out: dict[str, Any] = {}
    hd = res["head_dim"]
    if args["qk_norm"]:
        fn = torch.nn.functional.rms_norm
        eps = args["qk_norm_eps"]
        d = max(
            float(
                (fn(info[f"{x}_heads"], (hd,), w[f"{x}_norm.weight"], eps) - info[f"{x}_normed"])
                .abs()
                .max()
            )
            for x in ("q", "k")
        )
        assert d < REFERENCE_TOL, d
        out["qk_norm"] = {
            "check": "torch.nn.functional.rms_norm(x, (head_dim,), weight, eps=qk_norm_eps) "
            "in float64 on q / k after the head split",
            "max_abs_diff": d,
        }
    if args["rope_base"] is not None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaRotaryEmbedding,
            apply_rotary_pos_emb,
        )

        params: dict[str, Any] = {"rope_theta": args["rope_base"]}
        if args["rope_scale"] == 1.0:
            params["rope_type"] = "default"
        else:
            params.update(rope_type="linear", factor=args["rope_scale"])
        cfg = LlamaConfig(
            hidden_size=args["num_heads"] * hd,
            num_attention_heads=args["num_heads"],
            num_key_value_heads=res["num_kv_heads"],
            head_dim=hd,
            rope_parameters=params,
        )
        rot = LlamaRotaryEmbedding(cfg)
        before_q = info["q_normed"] if args["qk_norm"] else info["q_heads"]
        before_k = info["k_normed"] if args["qk_norm"] else info["k_heads"]
        diffs = {}
        for name, x, y in (("q", before_q, info["q_rope"]), ("k", before_k, info["k_rope"])):
            cos, sin = rot(x, torch.arange(x.shape[-2])[None])
            xr, _ = apply_rotary_pos_emb(x, x, cos, sin)
            diffs[name] = float((xr - y).abs().max())
        assert max(diffs.values()) < ROPE_TOL, diffs
        out["rope"] = {
            "check": "transformers LlamaRotaryEmbedding(LlamaConfig(head_dim=hd, "
            f"rope_parameters={params})) cos/sin for positions arange(T) (computed in "
            "float32 there) + apply_rotary_pos_emb on the float64 q / k",
            "max_abs_diff": diffs,
        }
    if args["adaptive"]:
        d = info["adaptive"]["entropy_check_max_abs_diff"]
        assert d < ENTROPY_TOL, d
        out["adaptive_entropy"] = {
            "check": "torch.distributions.Categorical(logits=l / tau).entropy() against "
            "-sum(p ln p) of each row with more than one allowed key (float64)",
            "max_abs_diff": d,
        }
    return out


def run_layer(
    key: str,
    args: dict,
    w32: dict[str, torch.Tensor],
    query32: torch.Tensor,
    kv32: torch.Tensor,
    qm_list: Any,
    km_list: Any,
    arrays: Arrays,
    inputs: dict,
) -> dict:
    """References for one layer; returns its manifest entries from ``resolved`` on.

    ``key`` prefixes the output array keys; ``inputs`` are the inputs' manifest entries.
    """
    res = resolve(args)
    batch = query32.shape[0]
    w64 = {k: v.to(torch.float64) for k, v in w32.items()}
    query, key_value = query32.to(torch.float64), kv32.to(torch.float64)
    qm = None if qm_list is None else torch.tensor(qm_list, dtype=torch.float64)
    km = None if km_list is None else torch.tensor(km_list, dtype=torch.float64)

    info: dict[str, Any] = {}
    written = written_out(w64, args, res, query, key_value, qm, km, info)
    references = [WRITTEN]
    stored = written
    diffs = None
    extra: dict[str, Any] = {}
    if is_plain(args, res, qm_list):
        mha = mha_reference(
            w64, args["dim"], args["num_heads"], args["kv_dim"], query, key_value, km
        )
        references = [MHA, WRITTEN]
        nan_rows = [i for i in range(batch) if not torch.isfinite(mha["out"][i]).all()]
        if nan_rows:
            # MultiheadAttention gives NaN on a row whose keys are all masked: compare the
            # other rows, store the written-out result.
            assert km is not None and all(km[i].sum() == 0 for i in nan_rows), key
            ok_rows = torch.tensor([i for i in range(batch) if i not in nan_rows])
            diffs = max_abs_diffs(mha, written, ok_rows)
            extra["mha_nan_batch_rows"] = nan_rows
            extra["mha_nan_note"] = (
                "nn.MultiheadAttention returns NaN (out and weights) for batch rows whose keys "
                "are all masked; the max diff is over the other rows and the stored arrays are "
                "the written-out ones (zeros there)"
            )
            stored_from = WRITTEN
        else:
            diffs = max_abs_diffs(mha, written)
            stored = mha
            stored_from = MHA
        assert max(diffs.values()) < REFERENCE_TOL, (key, diffs)
    else:
        stored_from = WRITTEN
        eq = mha_equivalent(w64, args, res, query, key_value, qm, km)
        if eq is not None:
            r, how = eq
            d = max_abs_diffs(r, written)
            assert max(d.values()) < REFERENCE_TOL, (key, d)
            extra["mha_equivalent"] = {"how": how, "max_abs_diff_vs_written_out": d}
        elif variants(args):
            extra["mha_equivalent"] = None
            extra["mha_equivalent_note"] = "none: nn.MultiheadAttention has no " + ", ".join(
                variants(args)
            )
        else:
            extra["mha_equivalent"] = None
            extra["mha_equivalent_note"] = (
                "none: nn.MultiheadAttention needs num_heads * head_dim == dim"
            )

    result = {k: v.to(torch.float32).numpy() for k, v in stored.items()}
    if diffs is not None:
        other = {k: v.to(torch.float32).numpy() for k, v in written.items()}
        extra["float32_max_abs_diff_between_references"] = {
            k: float(np.abs(result[k].astype(np.float64) - other[k]).max()) for k in result
        }
    row_max = check_result(key, result, qm_list, info["kept"])

    if km_list is not None:
        fully = [i for i, row in enumerate(km_list) if sum(row) == 0]
        if fully:
            extra["fully_masked_batch_rows"] = fully
            extra["fully_masked_note"] = (
                "out rows there are 0, not out_proj(0) = out_proj.bias; weights 0"
            )
    if variants(args):
        pieces = piece_checks(w64, args, res, info)
        if pieces:
            extra["piece_checks"] = pieces
        # Each switch must matter: the result with that one switch at its default differs.
        effect = {}
        for name, default in VARIANT_DEFAULTS.items():
            if name == "qk_norm_eps" or args[name] == default:
                continue
            other = written_out(w64, {**args, name: default}, res, query, key_value, qm, km)
            effect[name] = {
                k: float((other[k] - written[k]).abs().max()) for k in ("out", "weights_per_head")
            }
            assert min(effect[name].values()) > 1e-2, (key, name, effect[name])
        extra["effect_of_each_switch"] = effect
    if args["softcap"] is not None:
        x = info["logits_over_softcap"].abs()
        capped = args["softcap"] * torch.tanh(info["logits_over_softcap"])
        change = (capped - info["logits_over_softcap"] * args["softcap"]).abs()
        extra["softcap_stats"] = {
            "max_abs_logit_over_softcap": float(x.max()),
            "mean_abs_logit_over_softcap": float(x.mean()),
            "fraction_abs_over_1": float((x > 1).to(torch.float64).mean()),
            "max_abs_change_of_a_logit": float(change.max()),
        }
        # tanh must bend the logits, not just pass them through or clip them all.
        # tanh must bend the logits: neither |x| << 1 everywhere (linear) nor all clipped.
        st = extra["softcap_stats"]
        assert st["max_abs_logit_over_softcap"] > 2 and 0.5 < st["mean_abs_logit_over_softcap"] < 3
        assert 0.1 < st["fraction_abs_over_1"] < 0.9, st
    if args["sliding_window"] is not None or "kept_keys_per_row" in info:
        sel: dict[str, Any] = {
            "allowed_keys_per_row": info["allowed"].sum(dim=-1)[:, 0].tolist(),
        }
        if "kept_keys_per_row" in info:
            sel["kept_keys_per_row"] = info["kept_keys_per_row"]
            sel["min_gap_kth_to_next"] = info["min_gap_kth_to_next"]
            gap = info["min_gap_kth_to_next"]
            assert gap is None or gap > MIN_TOPK_GAP, (key, gap)
        extra["key_selection"] = sel
        empty = [
            [bi, qi]
            for bi, row in enumerate(info["allowed"].any(dim=-1)[:, 0].tolist())
            for qi, has in enumerate(row)
            if not has
        ]
        if empty:
            extra["empty_query_rows"] = empty
    if args["adaptive"]:
        st = info["adaptive"]
        dist, gap = st["min_distance_to_integer"], st["min_gap_kth_to_next"]
        assert dist is None or dist > MIN_INTEGER_DISTANCE, (key, dist)
        assert gap is None or gap > MIN_TOPK_GAP, (key, gap)
        assert st["rows_with_dropped_keys"] > 0, key
        extra["adaptive_stats"] = {
            "allowed_keys_per_row": info["allowed"].sum(dim=-1)[:, 0].tolist(),
            **{k: v for k, v in st.items() if k != "entropy_check_max_abs_diff"},
        }

    outputs = {k: arrays.add(f"{key}/{k}", v) for k, v in result.items()}
    return {
        "config": args,
        "resolved": {k: res[k] for k in ("head_dim", "num_kv_heads", "q_width", "kv_width")},
        "weight_shapes": {k: list(v.shape) for k, v in w32.items()},
        "inputs": inputs,
        "outputs": outputs,
        "references": references,
        "stored_from": stored_from,
        "max_abs_diff_between_references": diffs,
        **extra,
        "attention_row_max": row_max,
    }


def save_weights(w32: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(w32, str(path))
    path.chmod(0o644)  # safetensors writes 0600


def mask_entry(arrays: Arrays, key: str, mask: Any) -> dict | None:
    return None if mask is None else arrays.add(key, np.asarray(mask, dtype=np.int64))


def make_case(spec: dict, out: Path, arrays: Arrays) -> dict:
    cid = spec["id"]
    args = constructor_args(spec)
    res = resolve(args)
    batch, tq, tk = BASE["batch"], spec.get("tq", BASE["tq"]), BASE["tk"]
    w32 = draw_weights(args, res, spec["seed"])
    x32 = draw_inputs(args, batch, tq, tk, spec["seed"] + 1000)
    qm_list, km_list = spec.get("query_mask"), spec.get("kv_mask")
    save_weights(w32, out / cid / "weights.safetensors")

    inputs = {
        "query": arrays.add(f"{cid}/query", x32["query"].numpy()),
        "key_value": arrays.add(f"{cid}/key_value", x32["key_value"].numpy()),
        "query_mask": mask_entry(arrays, f"{cid}/query_mask", qm_list),
        "kv_mask": mask_entry(arrays, f"{cid}/kv_mask", km_list),
    }
    layer = run_layer(
        cid, args, w32, x32["query"], x32["key_value"], qm_list, km_list, arrays, inputs
    )
    return {
        "id": cid,
        "description": spec["description"],
        "config": layer.pop("config"),
        "resolved": layer.pop("resolved"),
        "weights": f"attention/{cid}/weights.safetensors",
        "weight_shapes": layer.pop("weight_shapes"),
        "seeds": {"weights": spec["seed"], "inputs": spec["seed"] + 1000},
        **layer,
    }


def make_bidirectional(spec: dict, out: Path, arrays: Arrays) -> dict:
    """One case, two layers: text -> image and image -> text over the same inputs."""
    cid = spec["id"]
    dirs = spec["directions"]
    t2i_args = constructor_args({"config": dirs["text_to_image"]["config"]})
    x32 = draw_inputs(t2i_args, BASE["batch"], BASE["tq"], BASE["tk"], spec["seed"] + 1000)
    data = {"text": x32["query"], "image": x32["key_value"]}
    masks = {"text": spec["text_mask"], "image": spec["image_mask"]}
    shared = {
        "text": arrays.add(f"{cid}/text", data["text"].numpy()),
        "image": arrays.add(f"{cid}/image", data["image"].numpy()),
        "text_mask": mask_entry(arrays, f"{cid}/text_mask", masks["text"]),
        "image_mask": mask_entry(arrays, f"{cid}/image_mask", masks["image"]),
    }
    directions = {}
    for n, (name, d) in enumerate(dirs.items()):
        args = constructor_args({"config": d["config"]})
        res = resolve(args)
        seed = spec["seed"] + n
        w32 = draw_weights(args, res, seed)
        save_weights(w32, out / cid / f"{name}.safetensors")
        qside, kside = d["query"], d["kv"]
        inputs = {
            "query": shared[qside],
            "key_value": shared[kside],
            "query_mask": shared[f"{qside}_mask"],
            "kv_mask": shared[f"{kside}_mask"],
        }
        layer = run_layer(
            f"{cid}/{name}",
            args,
            w32,
            data[qside],
            data[kside],
            masks[qside],
            masks[kside],
            arrays,
            inputs,
        )
        directions[name] = {
            "query_modality": qside,
            "kv_modality": kside,
            "config": layer.pop("config"),
            "resolved": layer.pop("resolved"),
            "weights": f"attention/{cid}/{name}.safetensors",
            "weight_shapes": layer.pop("weight_shapes"),
            "seeds": {"weights": seed, "inputs": spec["seed"] + 1000},
            **layer,
        }
    return {
        "id": cid,
        "description": spec["description"],
        "seeds": {
            "text_to_image_weights": spec["seed"],
            "image_to_text_weights": spec["seed"] + 1,
            "inputs": spec["seed"] + 1000,
        },
        "inputs": shared,
        "directions": directions,
    }


def make_attention(out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on CPU, whatever the machine
    try:
        _make_attention(out)
    finally:
        torch.set_num_threads(threads)


def _make_attention(out: Path) -> None:
    import safetensors
    import transformers

    arrays = Arrays(out)
    cases = [make_case(spec, out, arrays) for spec in CASES]
    cases.append(make_bidirectional(BIDIRECTIONAL, out, arrays))
    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "attention",
            "schema_version": SCHEMA_VERSION,
            "torch_version": torch.__version__,
            "safetensors_version": safetensors.__version__,
            "transformers_version": transformers.__version__,
            "layer": "CrossModalAttention(dim, num_heads, kv_dim, head_dim=None -> dim // "
            "num_heads, num_kv_heads=None -> num_heads, temperature=1.0, bias=True, "
            "qk_norm=False, qk_norm_eps=1e-6, softcap=None, sliding_window=None, top_k=None, "
            "sparsity_ratio=None, rope_base=None, rope_scale=1.0, adaptive=False, "
            "adaptive_target_std=1.0, adaptive_min_temperature=0.5, "
            "adaptive_max_temperature=2.0, adaptive_max_sparsity=0.5), float32, batch first, "
            "no dropout",
            "weight_names": WEIGHT_NAMES,
            "qk_norm_weight_names": QK_NORM_WEIGHT_NAMES,
            "dtype": "float32 weights, inputs and outputs; references computed in float64 on "
            "the float32 values, outputs cast to float32",
            "init": f"weights {WEIGHT_STD} N(0,1), biases {BIAS_STD} N(0,1), float32, drawn "
            "in q_proj.weight, q_proj.bias, k_proj.weight, ... order from "
            "torch.Generator().manual_seed(seeds.weights), then (qk_norm only) q_norm.weight "
            f"and k_norm.weight 1 + {NORM_STD} N(0,1); inputs N(0,1) rounded to "
            "multiples of 1/32 (query then key_value) from seeds.inputs",
            "masks": "int64 [B, T], 1 = real token; masked positions hold ordinary random inputs",
            "notes": {
                "key_selection": "cases with sliding_window / top_k / sparsity_ratio: "
                "allowed_keys_per_row and kept_keys_per_row are [B][Tq] key counts (the same for "
                "every head; which keys are kept differs per head): allowed = kv_mask and "
                "window, kept = after top_k / sparsity_ratio; min_gap_kth_to_next is the "
                "smallest float64 gap between the k-th and (k+1)-th largest allowed logit over "
                f"the rows where keys were dropped (asserted > {MIN_TOPK_GAP}: no ties, and a "
                "float32 implementation keeps the same keys)",
                "softcap_stats": "logits / softcap before capping, over every (b, h, q, k), "
                "masked keys included; tanh(x) / x is 0.96 at |x| 0.35, 0.76 at 1, 0.48 at 2",
                "effect_of_each_switch": "variant cases: max |difference| of out and "
                "weights_per_head when that one switch is set back to its default (asserted "
                "> 1e-2: a layer that ignores a switch fails the case)",
                "empty_query_rows": "[batch, query] rows with no allowed key (kv_mask and "
                "window): weights 0 and out row 0 (not out_proj.bias)",
                "piece_checks": "the qk_norm and rope steps against torch / transformers "
                "implementations, and the adaptive entropy against "
                "torch.distributions.Categorical (float64 intermediates)",
                "adaptive_stats": "adaptive cases: allowed_keys_per_row [B][Tq]; temperature "
                "[B][H][Tq] (tau of each row, null where the row has at most one allowed key); "
                "temperature_clamped_rows: how many rows (with more than one allowed key) have "
                "sigma / adaptive_target_std below adaptive_min_temperature, above "
                "adaptive_max_temperature, or inside; normalised_entropy_range [min, max] of h; "
                "kept_keys_per_row_and_head [B][H][Tq]; rows_with_dropped_keys; "
                "min_distance_to_integer: the smallest |(1 - s) * n - round((1 - s) * n)| "
                f"(asserted > {MIN_INTEGER_DISTANCE}: a float32 implementation gets the same "
                "k); min_gap_kth_to_next: the smallest gap between the k-th and (k+1)-th "
                "largest rescaled logit (l / tau) over the rows where keys were dropped "
                f"(asserted > {MIN_TOPK_GAP})",
            },
            "semantics": {
                "kv_head_of_query_head": "h // (num_heads // num_kv_heads)",
                "order": "project, split heads, qk_norm, rope, logits, softcap, mask (kv_mask, "
                "sliding_window), top_k / sparsity_ratio or adaptive, softmax, query_mask, "
                "out_proj",
                "qk_norm": "q, k [.., T, head_dim] -> x * w / sqrt(mean(x^2 over head_dim) + "
                "qk_norm_eps), w = q_norm.weight / k_norm.weight [head_dim] (shared by all "
                "heads), after the head split and before rope",
                "rope": "x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., hd/2:], "
                "x[..., :hd/2]); angle[p, i] = (p / rope_scale) * rope_base^(-2i/hd), "
                "i < hd/2; cos/sin of cat(angle, angle); p = 0..Tq-1 for q, 0..Tk-1 for k "
                "(transformers' Llama convention; rope_scale is its linear scaling factor)",
                "logits": "q k^T / (temperature * sqrt(head_dim)), then softcap: "
                "softcap * tanh(logits / softcap) (before masking)",
                "allowed_keys": "kv_mask 1 and, with sliding_window w, |i - j| <= w "
                "(query index i, key index j); the others -> -inf",
                "top_k": "per query row and head, among the allowed keys only the k largest "
                "logits (after softcap) are kept, the others -> -inf; k = top_k, or "
                "max(1, ceil((1 - sparsity_ratio) * n_allowed)); all allowed keys when "
                "n_allowed <= k (no ties in these inputs: key_selection.min_gap_kth_to_next)",
                "adaptive": "per query row and head, over the row's n allowed logits l (after "
                "temperature, softcap, kv_mask and sliding_window; the row is unchanged when "
                "n <= 1): sigma = sqrt(mean((l - mean(l))^2)) (population std); tau = "
                "clamp(sigma / adaptive_target_std, adaptive_min_temperature, "
                "adaptive_max_temperature); l = l / tau; p = softmax(l); h = -sum(p ln p) / "
                "ln(n); s = adaptive_max_sparsity * (1 - h); only the k = max(1, ceil((1 - s) "
                "* n)) largest l stay allowed, and the weights are the softmax of those l / tau "
                "(never combined with top_k / sparsity_ratio)",
                "all_keys_masked": "a query row with no allowed key (kv_mask, window): "
                "weights 0 and out row 0 (not out_proj.bias)",
                "query_mask_0": "weights 0 and out row 0",
                "weights_mean": "weights_per_head.mean(over heads), masked rows included as 0",
                "k_proj_bias_note": "without qk_norm, rope or softcap, k_proj.bias adds q . b_k "
                "to every logit of a query row, so it cannot change any output (loaders must "
                "still read it)",
            },
            "references": {
                MHA: "plain cases only (num_kv_heads == num_heads, num_heads * head_dim == dim, "
                "temperature 1, no query_mask, none of qk_norm, rope, softcap, sliding_window, "
                "top_k, sparsity_ratio, adaptive): " + MHA_CALL,
                WRITTEN: WRITTEN_CALL,
                "tolerance": f"the two agree to {REFERENCE_TOL} (asserted at generation)",
            },
            "bidirectional": "a case with `directions` {text_to_image, image_to_text} instead "
            "of config / weights / outputs: each direction is a layer entry with the fields of "
            "an ordinary case (config, resolved, weights, weight_shapes, seeds, inputs, "
            "outputs, references, ...) plus query_modality / kv_modality; its inputs point at "
            "the case's shared arrays (inputs: text, image, text_mask, image_mask)",
            "cases": cases,
        },
    )
