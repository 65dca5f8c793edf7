"""Fusion fixtures (area ``fusion``): seeded fusion layers and their reference outputs.

Run through ``scripts/make_fixtures.py --only fusion``, which calls :func:`make_fusion`
and provides the shared helpers (``Arrays``, ``write_json``, ...).  The fusion layers
are specified in docs/fusion.md; layout and manifest schema: tests/fixtures/README.md.

Every strategy is written out in float64 with matmul / einsum (``Linear`` is
``y = x W^T + b``, weights in PyTorch's ``[out, in]`` layout), over the present
modalities only: the reference never sees a missing modality, so a concatenation uses
only the present modalities' column blocks of its weight, a softmax over modalities
runs over the present ones and a mean divides by their number.  ``pool`` is the masked
mean ``sum_t mask_t x_t / max(1, sum_t mask_t)``; a pooled input ``[B, D]`` is one
token with mask 1.

    late concat:    proj(cat_{m in P} pool(x_m))                     proj [out, sum D_m]
    late mean:      mean_{m in P} proj.m(pool(x_m))
    late weighted:  sum_{m in P} w_m proj.m(pool(x_m)),  w = softmax_P(modality_logits)
    late logits:    mean_{m in P} head.m(layer_norm.m(pool(x_m)))    norm.{m}, head.{m}
    attention:      s = score(cat_P p) or score.fc2(tanh(score.fc1(cat_P p))) (attention_dim)
                    w = softmax_P(s);  fused = sum_P w_m proj.m(p_m)
    gated:          g = sigmoid(gate(cat_P p));  fused = sum_P g_m proj.m(p_m)
    early:          X = cat_P(proj.m(x_m) + type_embedding[m]);  per layer i (pre-norm)
                    X = X + attn(norm1(X)) (self-attention, padding masked on both sides)
                    X = X + mlp(norm2(X));  fused = pool(norm(X))
    middle:         x_m = proj.m(x_m);  per layer i, every present m from the layer input:
                    c = cat_{n in P, n != m} x_n;  a = attn(norm_q(x_m), norm_kv(c)) (0 alone)
                    x_m = x_m + G_attn(x_m, a);  x_m = x_m + G_mlp(x_m, mlp(norm_mlp(x_m)))
                    fused = mean_P pool(norm(x_m))

``gates`` ``[B, M]`` (attention, gated, late weighted) holds w / g in the present
modalities' columns and 0 in the others.  ``attn`` is mlmf's ``CrossModalAttention(out,
num_heads, kv_dim=out)`` (biases on q/k/v/out, scale 1/sqrt(head_dim)), computed with
the written-out reference of scripts/fixtures_attention.py: masked keys weight 0,
masked query rows and rows without an allowed key give weights 0 and output 0.  Norms:
LayerNorm ``(x - mean) / sqrt(var + 1e-5) * weight + bias``, RMSNorm ``x / sqrt(mean(x^2)
+ 1e-6) * weight``; MLPs: ``fc2(gelu(fc1(x)))`` (exact erf GELU) or
``down_proj(silu(gate_proj(x)) * up_proj(x))`` (no biases), hidden ``int(mlp_ratio *
out)``; gates: none ``y``, tanh ``tanh(alpha) * y``, sigmoid ``sigmoid(gate(x)) * y``.

Cross-checks (asserted to 1e-6, recorded per case under ``references`` /
``cross_checks``): every norm against torch.nn.functional.layer_norm / rms_norm, and the
``early`` cases with mlp gelu and norm layer against a stack of
torch.nn.TransformerEncoderLayer(norm_first=True, activation="gelu", batch_first=True,
dropout=0) loaded with the same weights (src_key_padding_mask, compared at the real
tokens) followed by layer_norm and the masked mean.

Weights are float32 draws from ``torch.Generator().manual_seed(seed)`` in the order of
the case's ``weight_shapes``: matrices 0.2 N(0,1), biases 0.25 N(0,1), norm weights
1 + 0.2 N(0,1), norm biases 0.1 N(0,1), type_embedding 0.2 N(0,1), modality_logits
N(0,1), tanh gates 0.5 + 0.2 N(0,1) (nonzero: the gate matters); inputs are N(0,1)
rounded to multiples of 1/32 from ``Generator(seed + 1000)``.  The references run in
float64 on those float32 values; outputs are stored as float32.

The building blocks (``blocks/<id>.safetensors``) hold one block's tensors under the
names of docs/fusion.md (no prefix), its inputs ``x`` (and ``y``, the value a gate
scales) and the expected ``out``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import fixtures_attention as fa
import numpy as np
import torch
import torch.nn.functional as F
from make_fixtures import SCHEMA_VERSION, Arrays, write_json
from torch import nn

# Inputs: N(0,1) rounded to this grid (exact in float32).
INPUT_STEP = 1 / 32
# Standard deviations (and means) of the seeded weights, per kind of tensor.
INIT: dict[str, tuple[float, float]] = {  # kind -> (mean, std)
    "matrix": (0.0, 0.2),
    "bias": (0.0, 0.25),
    "norm_weight": (1.0, 0.2),
    "norm_bias": (0.0, 0.1),
    "type_embedding": (0.0, 0.2),
    "modality_logits": (0.0, 1.0),
    "tanh_gate": (0.5, 0.2),
}
LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6
BATCH = 2
# Absolute tolerance a float32 implementation is held to (written to the manifest).
TOLERANCE = 1e-5
# Cross-checks against torch's own modules must agree to this (float64).
REFERENCE_TOL = 1e-6

WRITTEN = "written-out"
LAYER_NORM_REF = "torch.nn.functional.layer_norm"
RMS_NORM_REF = "torch.nn.functional.rms_norm"
ENCODER_LAYER_REF = "torch.nn.TransformerEncoderLayer"

# Modality widths; a case's `dims` is an ordered selection of these.
WIDTHS = {"text": 24, "image": 20, "audio": 16}

# Options and their defaults, per strategy (docs/fusion.md).
LAYER_OPTIONS: dict[str, Any] = {
    "num_layers": 1,
    "num_heads": 8,
    "mlp": "gelu",
    "mlp_ratio": 4.0,
    "norm": "layer",
}
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "late": {"mode": "concat"},
    "attention": {"attention_dim": None},
    "gated": {},
    "early": LAYER_OPTIONS,
    "middle": {**LAYER_OPTIONS, "gate": "none"},
}


def pooled() -> dict[str, Any]:
    """A pooled input [B, D]."""
    return {"form": "pooled", "tokens": 1, "mask": None}


def tokens(t: int, mask: list[list[int]] | None = None) -> dict[str, Any]:
    """A token input [B, T, D], with a padding mask [B, T] or without one."""
    assert mask is None or (len(mask) == BATCH and all(len(r) == t and any(r) for r in mask))
    return {"form": "tokens", "tokens": t, "mask": mask}


# One spec per case.  `dims` lists modality names (widths from WIDTHS) in order;
# `inputs` holds the present modalities only.  Weights come from Generator(seed),
# inputs from Generator(seed + 1000).
CASES: list[dict[str, Any]] = [
    {
        "id": "late_concat",
        "seed": 401,
        "description": "late, default mode (concat); text tokens (batch row 1 has one real "
        "token) and pooled image",
        "strategy": "late",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {},
        "inputs": {"text": tokens(5, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]), "image": pooled()},
    },
    {
        "id": "late_concat_missing",
        "seed": 402,
        "description": "late concat with image missing: only the text and audio column "
        "blocks of proj.weight are used",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "concat"},
        "inputs": {"text": pooled(), "audio": tokens(4)},
    },
    {
        "id": "late_mean",
        "seed": 403,
        "description": "late mean of the per-modality projections; pooled text, image tokens",
        "strategy": "late",
        "dims": ["text", "image"],
        "out_dim": 24,
        "options": {"mode": "mean"},
        "inputs": {
            "text": pooled(),
            "image": tokens(6, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
        },
    },
    {
        "id": "late_mean_missing",
        "seed": 404,
        "description": "late mean with image missing (mean over the 2 present modalities); "
        "required = [text]",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "mean"},
        "required": ["text"],
        "inputs": {"text": tokens(3, [[1, 1, 0], [1, 1, 1]]), "audio": pooled()},
    },
    {
        "id": "late_weighted",
        "seed": 405,
        "description": "late weighted: softmax(modality_logits) over the 3 modalities "
        "(gates: the same row for every batch row)",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "weighted"},
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "image": pooled(),
            "audio": tokens(3),
        },
    },
    {
        "id": "late_weighted_missing",
        "seed": 406,
        "description": "late weighted with text missing: softmax over the image and audio "
        "logits only; gates column 0 is 0",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "weighted"},
        "inputs": {
            "image": tokens(7, [[1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]]),
            "audio": pooled(),
        },
    },
    {
        "id": "late_logits",
        "seed": 407,
        "description": "late logits: per-modality LayerNorm + classifier head, averaged "
        "(16 classes)",
        "strategy": "late",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {"mode": "logits"},
        "inputs": {"text": tokens(4, [[1, 1, 1, 1], [1, 1, 0, 0]]), "image": pooled()},
    },
    {
        "id": "attention",
        "seed": 408,
        "description": "attention without attention_dim (score: one Linear); pooled inputs",
        "strategy": "attention",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {},
        "inputs": {"text": pooled(), "image": pooled()},
    },
    {
        "id": "attention_dim",
        "seed": 409,
        "description": "attention with attention_dim 12 (score.fc1, tanh, score.fc2); 3 "
        "modalities, token and pooled inputs",
        "strategy": "attention",
        "dims": ["text", "image", "audio"],
        "out_dim": 24,
        "options": {"attention_dim": 12},
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
            "image": pooled(),
            "audio": tokens(6, [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]),
        },
    },
    {
        "id": "attention_missing",
        "seed": 410,
        "description": "attention with attention_dim 8 and image missing: fc1 reads the text "
        "and audio columns, the softmax runs over fc2's text and audio rows",
        "strategy": "attention",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"attention_dim": 8},
        "inputs": {"text": pooled(), "audio": tokens(4, [[1, 1, 1, 0], [1, 1, 1, 1]])},
    },
    {
        "id": "gated",
        "seed": 411,
        "description": "gated: sigmoid gates from the concatenation; text tokens with a "
        "mask, image tokens without one",
        "strategy": "gated",
        "dims": ["text", "image"],
        "out_dim": 24,
        "options": {},
        "inputs": {
            "text": tokens(6, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
            "image": tokens(5),
        },
    },
    {
        "id": "gated_missing",
        "seed": 412,
        "description": "gated with audio missing: the gate reads the text and image "
        "columns; gates column 2 is 0",
        "strategy": "gated",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {},
        "inputs": {"text": pooled(), "image": tokens(4, [[1, 0, 0, 0], [1, 1, 1, 0]])},
    },
    {
        "id": "early",
        "seed": 413,
        "description": "early, 2 layers, 4 heads, gelu MLP (mlp_ratio 2), LayerNorm; batch "
        "row 0 has no "
        "padding, row 1 one real text token and 2 image tokens; attention weights returned; "
        "cross-checked with torch.nn.TransformerEncoderLayer",
        "strategy": "early",
        "dims": ["text", "image"],
        "out_dim": 24,
        "options": {
            "num_layers": 2,
            "num_heads": 4,
            "mlp": "gelu",
            "mlp_ratio": 2.0,
            "norm": "layer",
        },
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
            "image": tokens(4, [[1, 1, 1, 1], [1, 1, 0, 0]]),
        },
        "return_attention": True,
    },
    {
        "id": "early_swiglu_rms",
        "seed": 414,
        "description": "early, 1 layer, 2 heads, swiglu MLP (mlp_ratio 2.5: hidden 40), "
        "RMSNorm; 3 modalities, pooled text (one token)",
        "strategy": "early",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {
            "num_layers": 1,
            "num_heads": 2,
            "mlp": "swiglu",
            "mlp_ratio": 2.5,
            "norm": "rms",
        },
        "inputs": {
            "text": pooled(),
            "image": tokens(3, [[1, 1, 0], [1, 1, 1]]),
            "audio": tokens(4),
        },
    },
    {
        "id": "early_missing",
        "seed": 415,
        "description": "early with the default options (1 layer, 8 heads of width 3, gelu, "
        "mlp_ratio 4, LayerNorm) and audio missing: the sequence holds text and image "
        "tokens only; type_embedding rows 0 and 1; attention weights returned",
        "strategy": "early",
        "dims": ["text", "image", "audio"],
        "out_dim": 24,
        "options": {},
        "inputs": {"text": tokens(4, [[1, 1, 1, 0], [1, 1, 1, 1]]), "image": tokens(3)},
        "return_attention": True,
    },
    {
        "id": "middle",
        "seed": 416,
        "description": "middle, 2 layers, 4 heads, no gate (default), gelu MLP (mlp_ratio 2), "
        "LayerNorm; text and image tokens with padding; attention weights returned",
        "strategy": "middle",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {"num_layers": 2, "num_heads": 4, "mlp_ratio": 2.0},
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "image": tokens(6, [[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]),
        },
        "return_attention": True,
    },
    {
        "id": "middle_tanh",
        "seed": 417,
        "description": "middle, 1 layer, 2 heads (head_dim 8), tanh gates, swiglu MLP "
        "(default mlp_ratio 4: hidden 64), RMSNorm; pooled image (its query attends over the "
        "text tokens, the text over one image token)",
        "strategy": "middle",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {"num_heads": 2, "gate": "tanh", "mlp": "swiglu", "norm": "rms"},
        "inputs": {"text": tokens(4, [[1, 1, 1, 1], [1, 1, 0, 0]]), "image": pooled()},
    },
    {
        "id": "middle_sigmoid",
        "seed": 418,
        "description": "middle, 2 layers, 4 heads, sigmoid gates, mlp_ratio 2; 3 modalities "
        "(each attends over the other two); attention weights returned",
        "strategy": "middle",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"num_layers": 2, "num_heads": 4, "gate": "sigmoid", "mlp_ratio": 2.0},
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
            "image": tokens(3, [[1, 1, 1], [1, 0, 0]]),
            "audio": tokens(4, [[1, 1, 0, 0], [1, 1, 1, 1]]),
        },
        "return_attention": True,
    },
    {
        "id": "middle_missing",
        "seed": 419,
        "description": "middle, 1 layer, 4 heads, tanh gates, mlp_ratio 2, with image "
        "missing: text attends over audio and audio over text; attention weights returned",
        "strategy": "middle",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"num_heads": 4, "gate": "tanh", "mlp_ratio": 2.0},
        "inputs": {
            "text": tokens(5, [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
            "audio": tokens(3, [[1, 1, 1], [1, 1, 0]]),
        },
        "return_attention": True,
    },
    {
        "id": "middle_alone",
        "seed": 420,
        "description": "middle, 1 layer, sigmoid gates, mlp_ratio 2, with only text present: "
        "a = 0 (no attention weights are returned), the MLP still applies",
        "strategy": "middle",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {"num_heads": 4, "gate": "sigmoid", "mlp_ratio": 2.0},
        "inputs": {"text": tokens(5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])},
        "return_attention": True,
    },
]

# Building blocks: one file each, d = 24, x [2, 5, 24].  Weights from Generator(seed),
# then x (and y) from Generator(seed + 1000).
BLOCK_DIM = 24
BLOCK_SHAPE = (2, 5, BLOCK_DIM)
BLOCKS: list[dict[str, Any]] = [
    {"id": "layer_norm", "seed": 501, "block": "LayerNorm"},
    {"id": "rms_norm", "seed": 502, "block": "RmsNorm"},
    {"id": "mlp_gelu", "seed": 503, "block": "Mlp", "mlp": "gelu", "mlp_ratio": 2.0},
    {"id": "mlp_swiglu", "seed": 504, "block": "Mlp", "mlp": "swiglu", "mlp_ratio": 2.5},
    {"id": "tanh_gate", "seed": 505, "block": "TanhGate"},
    {"id": "sigmoid_gate", "seed": 506, "block": "SigmoidGate"},
]


# ---------------------------------------------------------------------------
# Tensor names and shapes
# ---------------------------------------------------------------------------

Spec = list[tuple[str, tuple[int, ...], str]]  # (name, shape, init kind)
Weights = dict[str, torch.Tensor]


def linear_spec(prefix: str, n_out: int, n_in: int, bias: bool = True) -> Spec:
    out: Spec = [(f"{prefix}.weight", (n_out, n_in), "matrix")]
    if bias:
        out.append((f"{prefix}.bias", (n_out,), "bias"))
    return out


def norm_spec(prefix: str, d: int, kind: str) -> Spec:
    out: Spec = [(f"{prefix}.weight", (d,), "norm_weight")]
    if kind == "layer":
        out.append((f"{prefix}.bias", (d,), "norm_bias"))
    return out


def mlp_hidden(d: int, ratio: float) -> int:
    return int(ratio * d)


def mlp_spec(prefix: str, d: int, kind: str, ratio: float) -> Spec:
    h = mlp_hidden(d, ratio)
    if kind == "gelu":
        return linear_spec(f"{prefix}.fc1", h, d) + linear_spec(f"{prefix}.fc2", d, h)
    return (
        linear_spec(f"{prefix}.gate_proj", h, d, bias=False)
        + linear_spec(f"{prefix}.up_proj", h, d, bias=False)
        + linear_spec(f"{prefix}.down_proj", d, h, bias=False)
    )


def attn_spec(prefix: str, d: int) -> Spec:
    return [
        spec
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for spec in linear_spec(f"{prefix}.{proj}", d, d)
    ]


def gate_spec(name: str, d: int, kind: str | None) -> Spec:
    if kind == "tanh":
        return [(name, (1,), "tanh_gate")]
    if kind == "sigmoid":
        return linear_spec(name, d, d)
    return []


def weight_spec(strategy: str, dims: dict[str, int], out: int, opts: dict[str, Any]) -> Spec:
    """Every learned tensor of a fusion layer built for all of ``dims``, in draw order."""
    total, n_mod = sum(dims.values()), len(dims)
    per_mod_proj = [s for m, d in dims.items() for s in linear_spec(f"proj.{m}", out, d)]
    if strategy == "late":
        mode = opts["mode"]
        if mode == "concat":
            return linear_spec("proj", out, total)
        if mode == "mean":
            return per_mod_proj
        if mode == "weighted":
            return per_mod_proj + [("modality_logits", (n_mod,), "modality_logits")]
        assert mode == "logits", mode
        return [
            s
            for m, d in dims.items()
            for s in norm_spec(f"norm.{m}", d, "layer") + linear_spec(f"head.{m}", out, d)
        ]
    if strategy == "attention":
        a = opts["attention_dim"]
        if a is None:
            score = linear_spec("score", n_mod, total)
        else:
            score = linear_spec("score.fc1", a, total) + linear_spec("score.fc2", n_mod, a)
        return score + per_mod_proj
    if strategy == "gated":
        return linear_spec("gate", n_mod, total) + per_mod_proj
    nk, mk, ratio, gk = opts["norm"], opts["mlp"], opts["mlp_ratio"], opts.get("gate")
    if strategy == "early":
        spec = per_mod_proj + [("type_embedding", (n_mod, out), "type_embedding")]
        for i in range(opts["num_layers"]):
            p = f"layers.{i}"
            spec += norm_spec(f"{p}.norm1", out, nk) + attn_spec(f"{p}.attn", out)
            spec += norm_spec(f"{p}.norm2", out, nk) + mlp_spec(f"{p}.mlp", out, mk, ratio)
        return spec + norm_spec("norm", out, nk)
    assert strategy == "middle", strategy
    spec = list(per_mod_proj)
    for i in range(opts["num_layers"]):
        for m in dims:
            p = f"layers.{i}.{m}"
            spec += norm_spec(f"{p}.norm_q", out, nk) + norm_spec(f"{p}.norm_kv", out, nk)
            spec += attn_spec(f"{p}.attn", out) + gate_spec(f"{p}.attn_gate", out, gk)
            spec += norm_spec(f"{p}.norm_mlp", out, nk) + mlp_spec(f"{p}.mlp", out, mk, ratio)
            spec += gate_spec(f"{p}.mlp_gate", out, gk)
    return spec + norm_spec("norm", out, nk)


def draw_weights(spec: Spec, seed: int) -> Weights:
    """float32 tensors in ``spec`` order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape, kind in spec:
        assert name not in out, name
        mean, std = INIT[kind]
        out[name] = mean + std * torch.randn(shape, generator=gen, dtype=torch.float32)
    return out


def grid(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """N(0,1) rounded to multiples of INPUT_STEP (float32)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    return torch.round(x / INPUT_STEP) * INPUT_STEP


# ---------------------------------------------------------------------------
# References (float64)
# ---------------------------------------------------------------------------


class Checks:
    """Largest difference seen per cross-check reference (each asserted < REFERENCE_TOL)."""

    def __init__(self) -> None:
        self.max_abs_diff: dict[str, float] = {}

    def record(self, reference: str, got: torch.Tensor, want: torch.Tensor) -> None:
        d = float((got - want).abs().max())
        assert d < REFERENCE_TOL, (reference, d)
        self.max_abs_diff[reference] = max(self.max_abs_diff.get(reference, 0.0), d)


def linear(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    y = x @ w[f"{prefix}.weight"].T
    bias = w.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LAYER_NORM_EPS) * weight + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + RMS_NORM_EPS) * weight


def norm(x: torch.Tensor, w: Weights, prefix: str, kind: str, checks: Checks) -> torch.Tensor:
    """The written-out norm, checked against torch.nn.functional's."""
    d = x.shape[-1]
    weight = w[f"{prefix}.weight"]
    if kind == "layer":
        y = layer_norm(x, weight, w[f"{prefix}.bias"])
        ref = F.layer_norm(x, (d,), weight, w[f"{prefix}.bias"], eps=LAYER_NORM_EPS)
        checks.record(LAYER_NORM_REF, y, ref)
    else:
        assert kind == "rms", kind
        y = rms_norm(x, weight)
        checks.record(RMS_NORM_REF, y, F.rms_norm(x, (d,), weight, eps=RMS_NORM_EPS))
    return y


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: x * Phi(x) with the erf form."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def mlp(x: torch.Tensor, w: Weights, prefix: str, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return linear(gelu(linear(x, w, f"{prefix}.fc1")), w, f"{prefix}.fc2")
    assert kind == "swiglu", kind
    hidden = silu(linear(x, w, f"{prefix}.gate_proj")) * linear(x, w, f"{prefix}.up_proj")
    return linear(hidden, w, f"{prefix}.down_proj")


def gate(x: torch.Tensor, y: torch.Tensor, w: Weights, name: str, kind: str) -> torch.Tensor:
    """G(x, y): none y, tanh tanh(alpha) * y, sigmoid sigmoid(x W^T + b) * y."""
    if kind == "none":
        return y
    if kind == "tanh":
        return torch.tanh(w[name]) * y
    assert kind == "sigmoid", kind
    return torch.sigmoid(linear(x, w, name)) * y


def attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    query_mask: torch.Tensor,
    kv_mask: torch.Tensor,
    w: Weights,
    prefix: str,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CrossModalAttention(dim, num_heads, kv_dim=dim) by the attention area's reference.

    Returns the output [B, Tq, dim] and the weights [B, H, Tq, Tk].
    """
    dim = query.shape[-1]
    args = fa.constructor_args({"config": {"dim": dim, "num_heads": num_heads, "kv_dim": dim}})
    res = fa.resolve(args)
    lw = {name: w[f"{prefix}.{name}"] for name in fa.WEIGHT_NAMES}
    r = fa.written_out(lw, args, res, query, key_value, query_mask, kv_mask)
    return r["out"], r["weights_per_head"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask_t x_t / max(1, sum_t mask_t): [B, T, D], [B, T] -> [B, D]."""
    total = (x * mask[..., None]).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0)[:, None]


Inputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (x [B, T, D], mask [B, T])


def column_blocks(dims: dict[str, int]) -> dict[str, slice]:
    """Each modality's columns in a concatenation over all of ``dims``."""
    out, start = {}, 0
    for m, d in dims.items():
        out[m] = slice(start, start + d)
        start += d
    return out


def present_columns(weight: torch.Tensor, dims: dict[str, int], present: list[str]) -> torch.Tensor:
    """The present modalities' column blocks of ``weight`` [n, sum D_m], concatenated."""
    cols = column_blocks(dims)
    return torch.cat([weight[:, cols[m]] for m in present], dim=1)


def gates_matrix(values: torch.Tensor, dims: dict[str, int], present: list[str]) -> torch.Tensor:
    """[B, |P|] per-present-modality values -> [B, M] with 0 in the missing columns."""
    out = torch.zeros(values.shape[0], len(dims), dtype=values.dtype)
    names = list(dims)
    for i, m in enumerate(present):
        out[:, names.index(m)] = values[:, i]
    return out


def late(w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, checks: Checks) -> dict:
    present = [m for m in dims if m in inputs]
    p = {m: masked_mean(*inputs[m]) for m in present}
    mode = opts["mode"]
    if mode == "concat":
        x = torch.cat([p[m] for m in present], dim=1)
        return {"fused": x @ present_columns(w["proj.weight"], dims, present).T + w["proj.bias"]}
    if mode == "mean":
        return {"fused": torch.stack([linear(p[m], w, f"proj.{m}") for m in present]).mean(0)}
    if mode == "weighted":
        idx = [list(dims).index(m) for m in present]
        weights = torch.softmax(w["modality_logits"][idx], dim=0)
        rows = weights[None, :].expand(p[present[0]].shape[0], -1)
        return {
            "fused": weighted_projections(w, rows, present, p),
            "gates": gates_matrix(rows, dims, present),
        }
    assert mode == "logits", mode
    heads = [linear(norm(p[m], w, f"norm.{m}", "layer", checks), w, f"head.{m}") for m in present]
    return {"fused": torch.stack(heads).mean(0)}


def weighted_projections(
    w: Weights, weights: torch.Tensor, present: list[str], p: dict[str, torch.Tensor]
) -> torch.Tensor:
    """sum_i weights[:, i] proj.m_i(p_m_i)."""
    terms = [weights[:, i : i + 1] * linear(p[m], w, f"proj.{m}") for i, m in enumerate(present)]
    return torch.stack(terms).sum(0)


def attention_fusion(
    w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, checks: Checks
) -> dict:
    present = [m for m in dims if m in inputs]
    rows = [list(dims).index(m) for m in present]
    p = {m: masked_mean(*inputs[m]) for m in present}
    x = torch.cat([p[m] for m in present], dim=1)
    if opts["attention_dim"] is None:
        wt = present_columns(w["score.weight"], dims, present)[rows]
        scores = x @ wt.T + w["score.bias"][rows]
    else:
        fc1 = present_columns(w["score.fc1.weight"], dims, present)
        hidden = torch.tanh(x @ fc1.T + w["score.fc1.bias"])
        scores = hidden @ w["score.fc2.weight"][rows].T + w["score.fc2.bias"][rows]
    weights = torch.softmax(scores, dim=1)
    return {
        "fused": weighted_projections(w, weights, present, p),
        "gates": gates_matrix(weights, dims, present),
    }


def gated_fusion(
    w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, checks: Checks
) -> dict:
    present = [m for m in dims if m in inputs]
    rows = [list(dims).index(m) for m in present]
    p = {m: masked_mean(*inputs[m]) for m in present}
    x = torch.cat([p[m] for m in present], dim=1)
    wt = present_columns(w["gate.weight"], dims, present)[rows]
    g = torch.sigmoid(x @ wt.T + w["gate.bias"][rows])
    return {
        "fused": weighted_projections(w, g, present, p),
        "gates": gates_matrix(g, dims, present),
    }


def early_sequence(
    w: Weights, dims: dict[str, int], inputs: Inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """X = cat over present m (dims order) of proj.m(x_m) + type_embedding[m], and its mask."""
    present = [m for m in dims if m in inputs]
    names = list(dims)
    parts = [
        linear(inputs[m][0], w, f"proj.{m}") + w["type_embedding"][names.index(m)] for m in present
    ]
    return torch.cat(parts, dim=1), torch.cat([inputs[m][1] for m in present], dim=1)


def early(w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, checks: Checks) -> dict:
    x, mask = early_sequence(w, dims, inputs)
    attn: dict[str, torch.Tensor] = {}
    for i in range(opts["num_layers"]):
        p = f"layers.{i}"
        h = norm(x, w, f"{p}.norm1", opts["norm"], checks)
        a, attn[p] = attention(h, h, mask, mask, w, f"{p}.attn", opts["num_heads"])
        x = x + a
        x = x + mlp(norm(x, w, f"{p}.norm2", opts["norm"], checks), w, f"{p}.mlp", opts["mlp"])
    fused = masked_mean(norm(x, w, "norm", opts["norm"], checks), mask)
    return {"fused": fused, "attention": attn}


def middle(w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, checks: Checks) -> dict:
    present = [m for m in dims if m in inputs]
    kind, gate_kind = opts["norm"], opts["gate"]
    x = {m: linear(inputs[m][0], w, f"proj.{m}") for m in present}
    mask = {m: inputs[m][1] for m in present}
    attn: dict[str, torch.Tensor] = {}
    for i in range(opts["num_layers"]):
        new = {}
        for m in present:
            p = f"layers.{i}.{m}"
            others = [n for n in present if n != m]
            if others:
                c = torch.cat([x[n] for n in others], dim=1)
                c_mask = torch.cat([mask[n] for n in others], dim=1)
                q = norm(x[m], w, f"{p}.norm_q", kind, checks)
                kv = norm(c, w, f"{p}.norm_kv", kind, checks)
                a, attn[p] = attention(q, kv, mask[m], c_mask, w, f"{p}.attn", opts["num_heads"])
            else:  # alone: nothing to attend to
                a = torch.zeros_like(x[m])
            y = x[m] + gate(x[m], a, w, f"{p}.attn_gate", gate_kind)
            h = mlp(norm(y, w, f"{p}.norm_mlp", kind, checks), w, f"{p}.mlp", opts["mlp"])
            new[m] = y + gate(y, h, w, f"{p}.mlp_gate", gate_kind)
        x = new
    pooled_out = [masked_mean(norm(x[m], w, "norm", kind, checks), mask[m]) for m in present]
    return {"fused": torch.stack(pooled_out).mean(0), "attention": attn}


STRATEGIES = {
    "late": late,
    "attention": attention_fusion,
    "gated": gated_fusion,
    "early": early,
    "middle": middle,
}


def encoder_layer_check(
    w: Weights, dims: dict[str, int], opts: dict, inputs: Inputs, fused: torch.Tensor
) -> float:
    """``early`` (gelu, layer) through torch.nn.TransformerEncoderLayer; returns the max diff.

    The layers get src_key_padding_mask (padding as keys); padded query positions differ
    (the fusion layer gives them attention output 0), so only the real tokens are compared,
    through layer_norm and the masked mean, against the written-out ``fused``.
    """
    out = fused.shape[-1]
    x, mask = early_sequence(w, dims, inputs)
    padding = mask == 0
    for i in range(opts["num_layers"]):
        p = f"layers.{i}"
        layer = nn.TransformerEncoderLayer(
            d_model=out,
            nhead=opts["num_heads"],
            dim_feedforward=mlp_hidden(out, opts["mlp_ratio"]),
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=LAYER_NORM_EPS,
            batch_first=True,
            norm_first=True,
            dtype=torch.float64,
        )
        with torch.no_grad():
            sa = layer.self_attn
            sa.in_proj_weight.copy_(
                torch.cat([w[f"{p}.attn.{n}_proj.weight"] for n in ("q", "k", "v")])
            )
            sa.in_proj_bias.copy_(
                torch.cat([w[f"{p}.attn.{n}_proj.bias"] for n in ("q", "k", "v")])
            )
            sa.out_proj.weight.copy_(w[f"{p}.attn.out_proj.weight"])
            sa.out_proj.bias.copy_(w[f"{p}.attn.out_proj.bias"])
            for ours, theirs in (("fc1", layer.linear1), ("fc2", layer.linear2)):
                theirs.weight.copy_(w[f"{p}.mlp.{ours}.weight"])
                theirs.bias.copy_(w[f"{p}.mlp.{ours}.bias"])
            for ours, theirs in (("norm1", layer.norm1), ("norm2", layer.norm2)):
                theirs.weight.copy_(w[f"{p}.{ours}.weight"])
                theirs.bias.copy_(w[f"{p}.{ours}.bias"])
        # Gradients enabled: the module takes its ordinary (non fast-path) route.
        layer.eval()
        x = layer(x, src_key_padding_mask=padding).detach()
    final = F.layer_norm(x, (out,), w["norm.weight"], w["norm.bias"], eps=LAYER_NORM_EPS)
    return float((masked_mean(final, mask) - fused).abs().max())


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def case_options(spec: dict) -> dict[str, Any]:
    """The options a layer runs with: the defaults updated with the ones passed."""
    defaults = OPTION_DEFAULTS[spec["strategy"]]
    unknown = set(spec["options"]) - set(defaults)
    assert not unknown, (spec["id"], unknown)
    return {**defaults, **spec["options"]}


def draw_inputs(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    """float32 inputs of the present modalities, in dims order, from one generator."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in spec["dims"]:
        if m in spec["inputs"]:
            form = spec["inputs"][m]
            shape = (BATCH, WIDTHS[m])
            if form["form"] == "tokens":
                shape = (BATCH, form["tokens"], WIDTHS[m])
            out[m] = grid(shape, gen)
    return out


def as_tokens(x32: torch.Tensor, mask: list[list[int]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [B, T, D] and [B, T] mask (pooled: one token with mask 1)."""
    x = x32.to(torch.float64)
    if x.dim() == 2:
        x = x[:, None, :]
    m = torch.ones(x.shape[:2], dtype=torch.float64)
    if mask is not None:
        m = torch.tensor(mask, dtype=torch.float64)
    return x, m


def check_result(cid: str, r: dict[str, np.ndarray], dims: list[str], present: list[str]) -> None:
    for k, v in r.items():
        assert np.isfinite(v).all(), (cid, k)
    assert float(r["fused"].std()) > 0.05, cid
    if "gates" in r:
        g = r["gates"]
        missing = [i for i, m in enumerate(dims) if m not in present]
        assert (g[:, missing] == 0).all() and (g[:, [dims.index(m) for m in present]] > 0).all()


def make_case(spec: dict, out: Path, arrays: Arrays) -> dict:
    cid, strategy = spec["id"], spec["strategy"]
    dims = {m: WIDTHS[m] for m in spec["dims"]}
    opts = case_options(spec)
    present = [m for m in dims if m in spec["inputs"]]
    assert present and set(spec["inputs"]) <= set(dims), cid
    required = spec.get("required", [])
    assert set(required) <= set(present), cid
    ret_attn = spec.get("return_attention", False)
    assert not ret_attn or strategy in ("early", "middle"), cid

    wspec = weight_spec(strategy, dims, spec["out_dim"], opts)
    w32 = draw_weights(wspec, spec["seed"])
    fa.save_weights(w32, out / cid / "weights.safetensors")
    x32 = draw_inputs(spec, spec["seed"] + 1000)

    input_entries = {}
    for m in present:
        form = spec["inputs"][m]
        arrays.add(f"{cid}/input/{m}", x32[m].numpy())
        if form["mask"] is not None:
            arrays.add(f"{cid}/mask/{m}", np.asarray(form["mask"], dtype=np.int64))
        input_entries[m] = {
            "form": form["form"],
            "tokens": form["tokens"],
            "mask": form["mask"] is not None,
        }

    w64 = {k: v.to(torch.float64) for k, v in w32.items()}
    inputs = {m: as_tokens(x32[m], spec["inputs"][m]["mask"]) for m in present}
    checks = Checks()
    r = STRATEGIES[strategy](w64, dims, opts, inputs, checks)
    references = [WRITTEN, *sorted(checks.max_abs_diff)]
    cross = dict(checks.max_abs_diff)
    if strategy == "early" and opts["mlp"] == "gelu" and opts["norm"] == "layer":
        d = encoder_layer_check(w64, dims, opts, inputs, r["fused"])
        assert d < REFERENCE_TOL, (cid, d)
        references.append(ENCODER_LAYER_REF)
        cross[ENCODER_LAYER_REF] = d

    for key, a in r.get("attention", {}).items():
        # Every query row sums to 1 (real query with allowed keys) or is 0 (padded query).
        sums = a.sum(dim=-1)
        assert (((sums - 1).abs() < 1e-12) | (sums == 0)).all() and (sums > 0).any(), (cid, key)
    result = {"fused": r["fused"].to(torch.float32).numpy()}
    if "gates" in r:
        result["gates"] = r["gates"].to(torch.float32).numpy()
    check_result(cid, result, list(dims), present)
    output_keys = [f"{cid}/{k}" for k in result]
    for k, v in result.items():
        arrays.add(f"{cid}/{k}", v)
    if ret_attn:
        for key, a in r["attention"].items():
            arrays.add(f"{cid}/attention/{key}", a.to(torch.float32).numpy())
            output_keys.append(f"{cid}/attention/{key}")

    return {
        "id": cid,
        "description": spec["description"],
        "strategy": strategy,
        "dims": [[m, d] for m, d in dims.items()],
        "out_dim": spec["out_dim"],
        "options": spec["options"],
        "required": required,
        "batch": BATCH,
        "inputs": input_entries,
        "return_attention": ret_attn,
        "outputs": output_keys,
        "references": references,
        "cross_checks": cross,
        "resolved_options": opts,
        "weights": f"fusion/{cid}/weights.safetensors",
        "weight_shapes": {name: list(shape) for name, shape, _ in wspec},
        "seeds": {"weights": spec["seed"], "inputs": spec["seed"] + 1000},
    }


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


# Block tensors are computed under this prefix and stored without it.
BLOCK_PREFIX = "block"


def block_spec(spec: dict) -> Spec:
    """The block's tensors, named as below its prefix."""
    d, block, p = BLOCK_DIM, spec["block"], BLOCK_PREFIX
    if block == "LayerNorm":
        full = norm_spec(p, d, "layer")
    elif block == "RmsNorm":
        full = norm_spec(p, d, "rms")
    elif block == "Mlp":
        full = mlp_spec(p, d, spec["mlp"], spec["mlp_ratio"])
    elif block == "TanhGate":
        return gate_spec("alpha", d, "tanh")  # stored under the gate's own name
    else:
        assert block == "SigmoidGate", block
        full = gate_spec(p, d, "sigmoid")
    return [(name.removeprefix(f"{p}."), shape, kind) for name, shape, kind in full]


def make_block(spec: dict, out: Path) -> dict:
    bid, block = spec["id"], spec["block"]
    w32 = draw_weights(block_spec(spec), spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    data = {"x": grid(BLOCK_SHAPE, gen)}
    if block in ("TanhGate", "SigmoidGate"):
        data["y"] = grid(BLOCK_SHAPE, gen)
    w = {k: v.to(torch.float64) for k, v in w32.items()}
    pw = {f"{BLOCK_PREFIX}.{k}": v for k, v in w.items()}
    x = data["x"].to(torch.float64)
    checks = Checks()
    if block == "LayerNorm":
        y = norm(x, pw, BLOCK_PREFIX, "layer", checks)
    elif block == "RmsNorm":
        y = norm(x, pw, BLOCK_PREFIX, "rms", checks)
    elif block == "Mlp":
        y = mlp(x, pw, BLOCK_PREFIX, spec["mlp"])
    elif block == "TanhGate":
        y = gate(x, data["y"].to(torch.float64), w, "alpha", "tanh")
    else:
        y = gate(x, data["y"].to(torch.float64), pw, BLOCK_PREFIX, "sigmoid")
    fa.save_weights(
        {**w32, **data, "out": y.to(torch.float32)}, out / "blocks" / f"{bid}.safetensors"
    )
    entry: dict[str, Any] = {"id": bid, "block": block, "dim": BLOCK_DIM}
    if block == "Mlp":
        hidden = mlp_hidden(BLOCK_DIM, spec["mlp_ratio"])
        entry.update(mlp=spec["mlp"], mlp_ratio=spec["mlp_ratio"], hidden=hidden)
    entry.update(
        file=f"fusion/blocks/{bid}.safetensors",
        tensors=list(w32),
        inputs=list(data),
        shape=list(BLOCK_SHAPE),
        references=[WRITTEN, *sorted(checks.max_abs_diff)],
        cross_checks=checks.max_abs_diff,
        seeds={"weights": spec["seed"], "inputs": spec["seed"] + 1000},
    )
    return entry


# ---------------------------------------------------------------------------
# Area
# ---------------------------------------------------------------------------


SEMANTICS: dict[str, str] = {
    "pool": "late / attention / gated pool token inputs: sum_t mask_t x_t / max(1, sum_t "
    "mask_t); a pooled input [B, D] is one token with mask 1; a token input without a mask "
    "has every token real",
    "missing": "only the present modalities enter: concatenations use their column blocks "
    "(as zeros in the missing slots), softmaxes over modalities run over them, means divide "
    "by their number, token sequences hold only their tokens; gates are 0 in the missing "
    "columns; every tensor of `dims` is in the weights file all the same",
    "late": "concat: proj(cat_P p); mean: mean_P proj.m(p_m); weighted: sum_P w_m "
    "proj.m(p_m), w = softmax_P(modality_logits), gates = w on every row; logits: mean_P "
    "head.m(LayerNorm norm.m(p_m))",
    "attention": "s = score(cat_P p) [B, |P|] (the present rows and column blocks of "
    "score.weight), or with attention_dim score.fc2(tanh(score.fc1(cat_P p))) (fc1's present "
    "column blocks, fc2's present rows); w = softmax(s); fused = sum_P w_m proj.m(p_m); "
    "gates = w",
    "gated": "g = sigmoid(gate(cat_P p)) (present rows and column blocks); fused = sum_P g_m "
    "proj.m(p_m); gates = g",
    "early": "X = cat_P(proj.m(x_m) + type_embedding[index of m in dims]); per layer i: "
    "X = X + attn(norm1(X)) (queries and keys X, padding mask on both sides), X = X + "
    "mlp(norm2(X)); fused = masked_mean(norm(X)); attention layers.{i} [B, H, T, T]",
    "middle": "x_m = proj.m(x_m); per layer i, for every present m from the layer's input: "
    "c = cat over present n != m (dims order) of x_n with its mask, a = attn(norm_q(x_m), "
    "norm_kv(c)) (query mask = m's mask) or a = 0 when m is the only present modality (no "
    "attention weights then), y = x_m + G_attn(x_m, a), x_m = y + G_mlp(y, "
    "mlp(norm_mlp(y))); fused = mean_P masked_mean(norm(x_m)) (one shared norm); attention "
    "layers.{i}.{m} [B, H, T_m, T_context]",
    "attn": "CrossModalAttention(out_dim, num_heads, kv_dim=out_dim): q/k/v/out_proj with "
    "biases, head_dim = out_dim / num_heads, logits q k^T / sqrt(head_dim), masked keys "
    "weight 0, masked query rows and rows with no allowed key: weights 0 and output 0 (not "
    "out_proj.bias)",
    "norm": "layer: (x - mean) / sqrt(var + 1e-5) * weight + bias (biased variance); rms: "
    "x / sqrt(mean(x^2) + 1e-6) * weight",
    "mlp": "hidden = int(mlp_ratio * out_dim); gelu: fc2(gelu(fc1(x))), exact erf GELU; "
    "swiglu: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases",
    "gate": "G(x, y): none: y; tanh: tanh(attn_gate / mlp_gate [1]) * y; sigmoid: "
    "sigmoid(x W^T + b) * y with attn_gate.* / mlp_gate.* [out, out], [out]",
    "blocks": "blocks/<id>.safetensors: the block's tensors (names below the block's "
    "prefix; a tanh gate's alpha as `alpha`), x [2, 5, 24] and, for gates, y (the value "
    "gated); out = block(x) (a gate: G(x, y))",
}


def make_fusion(out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on CPU, whatever the machine
    try:
        _make_fusion(out)
    finally:
        torch.set_num_threads(threads)


def _make_fusion(out: Path) -> None:
    import safetensors

    arrays = Arrays(out)
    cases = [make_case(spec, out, arrays) for spec in CASES]
    blocks = [make_block(spec, out) for spec in BLOCKS]
    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "fusion",
            "schema_version": SCHEMA_VERSION,
            "tolerance": TOLERANCE,
            "torch_version": torch.__version__,
            "safetensors_version": safetensors.__version__,
            "spec": "docs/fusion.md",
            "dtype": "float32 weights, inputs and outputs; references computed in float64 on "
            "the float32 values, outputs cast to float32",
            "init": "weights drawn in weight_shapes order from "
            "torch.Generator().manual_seed(seeds.weights), float32: "
            + ", ".join(f"{k} {m} + {sd} N(0,1)" for k, (m, sd) in INIT.items())
            + "; inputs N(0,1) rounded to multiples of 1/32, the present modalities in dims "
            "order, from seeds.inputs",
            "arrays": "expected.npz keys: <id>/input/<name> (float32 [B, D] pooled or "
            "[B, T, D] tokens), <id>/mask/<name> (int64 [B, T], 1 = real token; only for "
            "token inputs with mask true), <id>/fused [B, out_dim], <id>/gates [B, M] "
            "(attention, gated, late weighted), <id>/attention/<key> [B, H, Tq, Tk] (early "
            "key layers.{i}, middle key layers.{i}.{m}; only with return_attention)",
            "semantics": SEMANTICS,
            "references": {
                WRITTEN: "every case: the formulas of docs/fusion.md in float64 over the "
                "present modalities only (concatenations use the present column blocks, "
                "softmaxes and means run over the present modalities); the attention inside "
                "early / middle is the attention area's written-out reference",
                LAYER_NORM_REF: "every LayerNorm of the case against "
                "F.layer_norm(x, (d,), weight, bias, eps=1e-5)",
                RMS_NORM_REF: "every RMSNorm of the case against "
                "F.rms_norm(x, (d,), weight, eps=1e-6)",
                ENCODER_LAYER_REF: "early with mlp gelu and norm layer: per layer "
                "nn.TransformerEncoderLayer(d_model=out_dim, nhead=num_heads, "
                "dim_feedforward=hidden, dropout=0, activation='gelu', layer_norm_eps=1e-5, "
                "batch_first=True, norm_first=True) in float64 with self_attn.in_proj_weight "
                "= cat(q, k, v weights), in_proj_bias likewise, out_proj, linear1 = mlp.fc1, "
                "linear2 = mlp.fc2, norm1, norm2 from the file, src_key_padding_mask = "
                "(mask == 0); then F.layer_norm with norm.* and the masked mean over the "
                "real tokens, compared with fused",
                "tolerance": f"cross_checks (max abs diff, float64) asserted < {REFERENCE_TOL}",
            },
            "cases": cases,
            "blocks": blocks,
        },
    )
