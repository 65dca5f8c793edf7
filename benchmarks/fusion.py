"""Fusion speed: mlmf.Fusion against PyTorch eager modules, side by side.

Every fusion strategy of docs/fusion.md, fp32, two threads for everyone, at realistic
widths: text 384 (all-MiniLM-L6-v2), image 768 (ViT-B/16), audio 512, fused width 512.
`late` (concat, mean, weighted, logits), `attention` (with and without
`attention_dim`) and `gated` fuse pooled embeddings of the three modalities, batch 64;
`early` and `middle` (gate none and tanh) fuse 77 padded text tokens with 197 image
tokens, 2 layers, 8 heads, batch 8; `early` and `middle` (gate none) run once more with
every text token real, where mlmf has no padded token to skip. The PyTorch contenders are float32
`torch.nn.Module`s written for speed (nn.Linear, nn.LayerNorm, batched matmuls,
F.scaled_dot_product_attention) that compute the formulas of docs/fusion.md; the
`early` row adds a stack of nn.TransformerEncoderLayer for reference. Both sides load
the same weights: every tensor that mlmf names is drawn in torch from a fixed seed and
saved to a safetensors file, which mlmf loads (`weights=`) and the torch module reads
with `safetensors.torch.load_file`. Contenders alternate within one process for
several rounds; the table reports medians per call, torch_time / mlmf_time and the
largest difference between the outputs.

Usage (from the repository root, with torch and safetensors installed into the same
environment as mlmf)::

    python benchmarks/fusion.py --out docs/benchmarks.md [--rounds 7] [--quick]

The script owns the section between `<!-- fusion:begin -->` and `<!-- fusion:end -->`
of the output file (created if missing). It writes no plot. The harness (threads,
timing, report) is harness.py.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import harness  # first: sets the thread variables before numpy or torch can start a pool
import numpy as np
import synthetic
import torch
import torch.nn.functional as F
from torch import nn

TARGET = 1.0  # mlmf at least as fast as PyTorch eager
TORCH = "PyTorch eager"
TORCH_ENCODER_LAYER = "PyTorch eager, nn.TransformerEncoderLayer"
SEED = synthetic.SEED
OUT_DIM = 512
LAYER_NORM_EPS = 1e-5
# A max abs diff above this gets a note (the outputs are O(1)).
DIFF_NOTE = 1e-4

POOLED_BATCH = 64
TOKEN_BATCH = 8
# Pooled rows: text (all-MiniLM-L6-v2), image (ViT-B/16), audio (Whisper-base) widths.
POOLED_DIMS = {"text": 384, "image": 768, "audio": 512}
# Token rows: padded text and a ViT-B/16 grid plus CLS.
TOKEN_DIMS = {"text": 384, "image": 768}
TEXT_TOKENS = 77
IMAGE_TOKENS = 197
LAYERS = 2
HEADS = 8


@dataclass
class Case:
    """One workload: a fusion layer configuration and its inputs."""

    key: str  # --only group
    label: str
    strategy: str
    options: dict[str, Any]
    tokens: bool  # token inputs (early, middle) rather than pooled ones
    rounds: int  # default timed rounds
    padded: bool = True  # token rows: text padded to TEXT_TOKENS (else every token real)

    @property
    def dims(self) -> dict[str, int]:
        return TOKEN_DIMS if self.tokens else POOLED_DIMS

    @property
    def batch(self) -> int:
        return TOKEN_BATCH if self.tokens else POOLED_BATCH


_POOLED = "pooled text 384 + image 768 + audio 512"
_TOKENS = f"text {TEXT_TOKENS} tok (padded) + image {IMAGE_TOKENS} tok"
_UNPADDED = f"text {TEXT_TOKENS} tok (all real, all-ones mask) + image {IMAGE_TOKENS} tok"
_LAYERS = f"{LAYERS} layers, {HEADS} heads, gelu MLP"
CASES = (
    Case("late", "late concat", "late", {"mode": "concat"}, False, 9),
    Case("late", "late mean", "late", {"mode": "mean"}, False, 9),
    Case("late", "late weighted", "late", {"mode": "weighted"}, False, 9),
    Case("late", "late logits", "late", {"mode": "logits"}, False, 9),
    Case("attention", "attention (Linear scorer)", "attention", {}, False, 9),
    Case(
        "attention", "attention, attention_dim 256", "attention", {"attention_dim": 256}, False, 9
    ),
    Case("gated", "gated", "gated", {}, False, 9),
    Case(
        "early",
        f"early, {_LAYERS}",
        "early",
        {"num_layers": LAYERS, "num_heads": HEADS, "mlp": "gelu"},
        True,
        7,
    ),
    Case(
        "middle",
        f"middle, gate none, {_LAYERS}",
        "middle",
        {"num_layers": LAYERS, "num_heads": HEADS, "mlp": "gelu", "gate": "none"},
        True,
        7,
    ),
    Case(
        "middle",
        f"middle, gate tanh, {_LAYERS}",
        "middle",
        {"num_layers": LAYERS, "num_heads": HEADS, "mlp": "gelu", "gate": "tanh"},
        True,
        7,
    ),
    # The same layers with every text token real: nothing for mlmf to skip.
    Case(
        "early",
        f"early, {_LAYERS}, unpadded text",
        "early",
        {"num_layers": LAYERS, "num_heads": HEADS, "mlp": "gelu"},
        True,
        7,
        padded=False,
    ),
    Case(
        "middle",
        f"middle, gate none, {_LAYERS}, unpadded text",
        "middle",
        {"num_layers": LAYERS, "num_heads": HEADS, "mlp": "gelu", "gate": "none"},
        True,
        7,
        padded=False,
    ),
)
GROUPS = tuple(dict.fromkeys(c.key for c in CASES))


# --------------------------------------------------------------------------- torch modules
#
# Each module's state_dict names are mlmf's tensor names (docs/fusion.md), except the
# early module, whose nn.TransformerEncoderLayer names are mapped (early_state_dict).
# forward takes {modality: tensor} (pooled, [B, D]) or {modality: (tokens, mask or
# None)} (token inputs) in dims order and returns the fused [B, out] (and the gates
# [B, M] where the strategy has them).

Pooled = dict[str, torch.Tensor]
Tokens = dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]


def _projections(dims: dict[str, int], out: int) -> nn.ModuleDict:
    return nn.ModuleDict({m: nn.Linear(d, out) for m, d in dims.items()})


def _weighted_sum(weights: torch.Tensor, projected: list[torch.Tensor]) -> torch.Tensor:
    """sum_m weights[:, m] * projected[m]: [B, M] x M x [B, out] -> [B, out], one bmm."""
    stacked = torch.stack(projected, dim=1)  # [B, M, out]
    return torch.bmm(weights.unsqueeze(1), stacked).squeeze(1)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_t mask_t x_t / max(1, sum_t mask_t): [B, T, D], [B, T] -> [B, D]."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)
    total = torch.bmm(m.unsqueeze(1), x).squeeze(1)
    return total / m.sum(dim=1, keepdim=True).clamp(min=1.0)


class LateConcat(nn.Module):
    """late, mode concat: proj(cat_m p_m)."""

    def __init__(self, dims: dict[str, int], out: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.proj = nn.Linear(sum(dims.values()), out)

    def forward(self, x: Pooled) -> torch.Tensor:
        return self.proj(torch.cat([x[m] for m in self.names], dim=1))


class LateMean(nn.Module):
    """late, mode mean: mean_m proj.m(p_m)."""

    def __init__(self, dims: dict[str, int], out: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.proj = _projections(dims, out)

    def forward(self, x: Pooled) -> torch.Tensor:
        total = self.proj[self.names[0]](x[self.names[0]])
        for m in self.names[1:]:
            total = total + self.proj[m](x[m])
        return total / len(self.names)


class LateWeighted(nn.Module):
    """late, mode weighted: sum_m w_m proj.m(p_m), w = softmax(modality_logits)."""

    def __init__(self, dims: dict[str, int], out: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.proj = _projections(dims, out)
        self.modality_logits = nn.Parameter(torch.zeros(len(dims)))

    def forward(self, x: Pooled) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x[self.names[0]].shape[0]
        w = torch.softmax(self.modality_logits, dim=0).expand(batch, -1)
        fused = _weighted_sum(w, [self.proj[m](x[m]) for m in self.names])
        return fused, w


class LateLogits(nn.Module):
    """late, mode logits: mean_m head.m(norm.m(p_m))."""

    def __init__(self, dims: dict[str, int], out: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d, eps=LAYER_NORM_EPS) for m, d in dims.items()})
        self.head = _projections(dims, out)

    def forward(self, x: Pooled) -> torch.Tensor:
        total = None
        for m in self.names:
            y = self.head[m](self.norm[m](x[m]))
            total = y if total is None else total + y
        assert total is not None
        return total / len(self.names)


class TwoLayer(nn.Module):
    """fc2(act(fc1(x))): the attention fusion's scorer with tanh (attention_dim), and
    the layers' MLP with exact GELU (hidden width 4 x dim)."""

    def __init__(
        self, n_in: int, hidden: int, n_out: int, act: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp(dim: int) -> TwoLayer:
    return TwoLayer(dim, 4 * dim, dim, F.gelu)


class AttentionFusion(nn.Module):
    """attention: w = softmax(score(cat_m p_m)); fused = sum_m w_m proj.m(p_m)."""

    def __init__(self, dims: dict[str, int], out: int, attention_dim: Optional[int]) -> None:
        super().__init__()
        self.names = list(dims)
        total, n = sum(dims.values()), len(dims)
        self.score = (
            nn.Linear(total, n)
            if attention_dim is None
            else TwoLayer(total, attention_dim, n, torch.tanh)
        )
        self.proj = _projections(dims, out)

    def forward(self, x: Pooled) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.softmax(self.score(torch.cat([x[m] for m in self.names], dim=1)), dim=1)
        return _weighted_sum(w, [self.proj[m](x[m]) for m in self.names]), w


class GatedFusion(nn.Module):
    """gated: g = sigmoid(gate(cat_m p_m)); fused = sum_m g_m proj.m(p_m)."""

    def __init__(self, dims: dict[str, int], out: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.gate = nn.Linear(sum(dims.values()), len(dims))
        self.proj = _projections(dims, out)

    def forward(self, x: Pooled) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.sigmoid(self.gate(torch.cat([x[m] for m in self.names], dim=1)))
        return _weighted_sum(g, [self.proj[m](x[m]) for m in self.names]), g


class CrossAttention(nn.Module):
    """q/k/v/out projections around F.scaled_dot_product_attention; the padding of the
    keys is a boolean mask (True: attend)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, keep: Optional[torch.Tensor]
    ) -> torch.Tensor:
        b, tq, d = query.shape
        tk, hd = context.shape[1], d // self.heads
        q = self.q_proj(query).view(b, tq, self.heads, hd).transpose(1, 2)
        k = self.k_proj(context).view(b, tk, self.heads, hd).transpose(1, 2)
        v = self.v_proj(context).view(b, tk, self.heads, hd).transpose(1, 2)
        attn_mask = None if keep is None else keep[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(a.transpose(1, 2).reshape(b, tq, d))


class EarlyLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x)); the
    self-attention is CrossAttention with the sequence as queries and context."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = mlp(dim)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, keep)
        return x + self.mlp(self.norm2(x))


class EarlyFusion(nn.Module):
    """early: projections plus type embeddings, one sequence, a stack of pre-norm layers
    with the padding masked as keys, a final LayerNorm and the masked mean.

    The layers are EarlyLayer (F.scaled_dot_product_attention), or with
    ``encoder_layer=True`` nn.TransformerEncoderLayer(norm_first=True,
    activation="gelu") with the padding as src_key_padding_mask (its names differ:
    see early_state_dict).
    """

    def __init__(
        self,
        dims: dict[str, int],
        out: int,
        num_layers: int,
        num_heads: int,
        encoder_layer: bool = False,
    ) -> None:
        super().__init__()
        self.names = list(dims)
        self.encoder_layer = encoder_layer
        self.proj = _projections(dims, out)
        self.type_embedding = nn.Parameter(torch.zeros(len(dims), out))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=out,
                nhead=num_heads,
                dim_feedforward=4 * out,
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=LAYER_NORM_EPS,
                batch_first=True,
                norm_first=True,
            )
            if encoder_layer
            else EarlyLayer(out, num_heads)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(out, eps=LAYER_NORM_EPS)

    def forward(self, x: Tokens) -> torch.Tensor:
        parts, masks = [], []
        for i, m in enumerate(self.names):
            tokens, mask = x[m]
            parts.append(self.proj[m](tokens) + self.type_embedding[i])
            masks.append(mask)
        h = torch.cat(parts, dim=1)
        mask: Optional[torch.Tensor] = None
        keep: Optional[torch.Tensor] = None
        if any(mk is not None for mk in masks):
            mask = torch.cat(
                [
                    (mk if mk is not None else p.new_ones(p.shape[:2])).to(h.dtype)
                    for mk, p in zip(masks, parts)
                ],
                dim=1,
            )
            keep = mask != 0
        for layer in self.layers:
            if self.encoder_layer:
                h = layer(h, src_key_padding_mask=None if keep is None else ~keep)
            else:
                h = layer(h, keep)
        return masked_mean(self.norm(h), mask)


def early_state_dict(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """mlmf's early tensor names -> nn.TransformerEncoderLayer's (q/k/v projections
    concatenated into in_proj_*, mlp.fc1/fc2 as linear1/linear2)."""
    out = dict(tensors)
    for i in range(num_layers):
        p = f"layers.{i}"
        for kind in ("weight", "bias"):
            out[f"{p}.self_attn.in_proj_{kind}"] = torch.cat(
                [out.pop(f"{p}.attn.{n}_proj.{kind}") for n in ("q", "k", "v")]
            )
            out[f"{p}.self_attn.out_proj.{kind}"] = out.pop(f"{p}.attn.out_proj.{kind}")
            out[f"{p}.linear1.{kind}"] = out.pop(f"{p}.mlp.fc1.{kind}")
            out[f"{p}.linear2.{kind}"] = out.pop(f"{p}.mlp.fc2.{kind}")
    return out


class MiddleBlock(nn.Module):
    """One modality's part of a middle layer: gated cross-attention over the other
    modalities' tokens, then a gated MLP, both pre-norm with residuals."""

    def __init__(self, dim: int, num_heads: int, gate: str) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = mlp(dim)
        assert gate in ("none", "tanh"), gate
        self.tanh = gate == "tanh"
        if self.tanh:
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, keep: Optional[torch.Tensor]
    ) -> torch.Tensor:
        a = self.attn(self.norm_q(x), self.norm_kv(context), keep)
        y = x + (torch.tanh(self.attn_gate) * a if self.tanh else a)
        h = self.mlp(self.norm_mlp(y))
        return y + (torch.tanh(self.mlp_gate) * h if self.tanh else h)


class MiddleFusion(nn.Module):
    """middle: per layer, every modality's tokens attend over the other modalities'
    tokens (all from the layer's input); a shared final LayerNorm, the masked mean per
    modality and the mean over modalities."""

    def __init__(
        self, dims: dict[str, int], out: int, num_layers: int, num_heads: int, gate: str
    ) -> None:
        super().__init__()
        self.names = list(dims)
        self.proj = _projections(dims, out)
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: MiddleBlock(out, num_heads, gate) for m in dims})
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(out, eps=LAYER_NORM_EPS)

    def forward(self, x: Tokens) -> torch.Tensor:
        h = {m: self.proj[m](x[m][0]) for m in self.names}
        masks = {m: x[m][1] for m in self.names}
        keep = {m: None if mk is None else mk != 0 for m, mk in masks.items()}
        # Each modality's context (the other modalities' tokens) and its key mask.
        context_keep: dict[str, Optional[torch.Tensor]] = {}
        for m in self.names:
            others = [n for n in self.names if n != m]
            if all(keep[n] is None for n in others):
                context_keep[m] = None
            else:
                context_keep[m] = torch.cat(
                    [
                        keep[n] if keep[n] is not None else h[n].new_ones(h[n].shape[:2]).bool()
                        for n in others
                    ],
                    dim=1,
                )
        for layer in self.layers:
            new = {}
            for m in self.names:
                others = [h[n] for n in self.names if n != m]
                context = others[0] if len(others) == 1 else torch.cat(others, dim=1)
                new[m] = layer[m](h[m], context, context_keep[m])
            h = new
        pooled = [masked_mean(self.norm(h[m]), masks[m]) for m in self.names]
        total = pooled[0]
        for p in pooled[1:]:
            total = total + p
        return total / len(pooled)


def torch_module(
    case: Case, tensors: dict[str, torch.Tensor], encoder_layer: bool = False
) -> nn.Module:
    """The case's torch module in eval mode, loaded (strict) from mlmf's tensors
    (``encoder_layer``: the early module built on nn.TransformerEncoderLayer)."""
    dims, opts = case.dims, case.options
    state = tensors
    module: nn.Module
    if case.strategy == "late":
        module = {"concat": LateConcat, "mean": LateMean, "weighted": LateWeighted}.get(
            opts["mode"], LateLogits
        )(dims, OUT_DIM)
    elif case.strategy == "attention":
        module = AttentionFusion(dims, OUT_DIM, opts.get("attention_dim"))
    elif case.strategy == "gated":
        module = GatedFusion(dims, OUT_DIM)
    elif case.strategy == "early":
        module = EarlyFusion(dims, OUT_DIM, opts["num_layers"], opts["num_heads"], encoder_layer)
        if encoder_layer:
            state = early_state_dict(tensors, opts["num_layers"])
    else:
        assert case.strategy == "middle", case.strategy
        module = MiddleFusion(dims, OUT_DIM, opts["num_layers"], opts["num_heads"], opts["gate"])
    module.load_state_dict(state, strict=True)
    return module.eval()


# --------------------------------------------------------------------------- weights


def draw_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """float32 values for every tensor name, in order, from one seeded generator.

    Linear weights and biases uniform in ±1/sqrt(in) (torch.nn.Linear's range, biases
    included), norm weights 1 + 0.1 N(0,1), norm biases 0.1 N(0,1), type_embedding
    0.2 N(0,1), modality_logits N(0,1), tanh gates 0.5 + 0.2 N(0,1).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def normal(shape: tuple[int, ...], mean: float, std: float) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=gen, dtype=torch.float32)

    for name, shape in shapes.items():
        shape = tuple(shape)
        stem, _, leaf = name.rpartition(".")
        weight_shape = shapes.get(f"{stem}.weight") if leaf == "bias" else None
        if name == "modality_logits":
            out[name] = normal(shape, 0.0, 1.0)
        elif name == "type_embedding":
            out[name] = normal(shape, 0.0, 0.2)
        elif leaf in ("attn_gate", "mlp_gate") and len(shape) == 1 and shape[0] == 1:
            out[name] = normal(shape, 0.5, 0.2)
        elif len(shape) == 2 or (weight_shape is not None and len(weight_shape) == 2):
            fan_in = shape[1] if len(shape) == 2 else weight_shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = (2.0 * torch.rand(shape, generator=gen) - 1.0) * bound
        elif leaf == "weight":  # a norm
            out[name] = normal(shape, 1.0, 0.1)
        elif leaf == "bias":
            out[name] = normal(shape, 0.0, 0.1)
        else:
            raise ValueError(f"no initialisation for tensor {name!r} {shape}")
    return out


# --------------------------------------------------------------------------- rows


def case_inputs(case: Case) -> str:
    """The inputs part of a row's workload."""
    if not case.tokens:
        return _POOLED
    return _TOKENS if case.padded else _UNPADDED


def make_inputs(case: Case) -> dict[str, Any]:
    """numpy inputs in dims order: [B, D] pooled, or (tokens, mask) / tokens for the token
    rows (text padded: row lengths drawn in [8, 77], row 0 full, or all 77 real with an
    all-ones mask; image without a mask)."""
    rng = np.random.default_rng(SEED + 1)
    out: dict[str, Any] = {}
    for m, d in case.dims.items():
        if not case.tokens:
            out[m] = rng.standard_normal((case.batch, d), dtype=np.float32)
        elif m == "text":
            x = rng.standard_normal((case.batch, TEXT_TOKENS, d), dtype=np.float32)
            lengths = rng.integers(8, TEXT_TOKENS + 1, size=case.batch)
            lengths[0] = TEXT_TOKENS
            if not case.padded:
                lengths[:] = TEXT_TOKENS
            mask = (np.arange(TEXT_TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
            out[m] = (x, mask)
        else:
            out[m] = rng.standard_normal((case.batch, IMAGE_TOKENS, d), dtype=np.float32)
    return out


class Fusion(harness.Suite):
    """Builds the layers, the inputs and the rows."""

    name = "fusion"
    groups = GROUPS
    rounds_help = "timed rounds for every row (default: 9 pooled rows, 7 token rows)"
    closing = {"diff_note": DIFF_NOTE, "disagree": "mlmf and the torch module disagree"}
    columns = (
        harness.WORKLOAD,
        harness.COMPETITOR,
        *harness.time_columns("time/call", harness.fmt_time),
        harness.RATIO,
        harness.met_column("Target (no slower than PyTorch eager)", "**not met**"),
        harness.diff_column("max abs diff (fused / gates)"),
    )

    def row_for(self, index: int, case: Case) -> harness.Row:
        from safetensors.torch import load_file, save_file

        import mlmf

        # The tensor names and shapes come from mlmf (an untrained layer, its warning
        # silenced); the values from torch (SEED + index).
        names = harness.quietly(mlmf.Fusion, case.strategy, case.dims, OUT_DIM, **case.options)
        path = self.dir / f"fusion_{index}.safetensors"
        save_file(draw_weights(names.tensor_shapes(), SEED + index), str(path))
        fus = mlmf.Fusion(case.strategy, case.dims, OUT_DIM, weights=str(path), **case.options)
        if fus.untrained:
            raise RuntimeError("mlmf did not load the weights file")
        module = torch_module(case, load_file(str(path)))

        inputs = make_inputs(case)
        # Shared memory with the numpy inputs.
        if case.tokens:
            t_inputs: Any = {
                m: (
                    (torch.from_numpy(v[0]), torch.from_numpy(v[1]))
                    if isinstance(v, tuple)
                    else (torch.from_numpy(v), None)
                )
                for m, v in inputs.items()
            }
        else:
            t_inputs = {m: torch.from_numpy(v) for m, v in inputs.items()}
        has_gates = isinstance(module, (LateWeighted, AttentionFusion, GatedFusion))
        max_diff: list[float] = []

        def compare(ours: Any, theirs: Any) -> str:
            if has_gates:
                pairs = ((ours.fused, theirs[0]), (ours.gates, theirs[1]))
                return harness.abs_diffs(*pairs, record=max_diff)
            return harness.abs_diffs((ours.fused, theirs), record=max_diff)

        def torch_fn(mod: nn.Module) -> Callable[[], Any]:
            def run() -> Any:
                with torch.inference_mode():
                    return mod(t_inputs)

            return run

        # The module also runs with one torch thread: on a busy two-core machine torch's
        # OpenMP pool can lose much of its time to a descheduled worker.
        competitors = [harness.Contender(TORCH, torch_fn(module), target=TARGET)]
        if case.strategy == "early":
            # The stock layer, for reference (no target): its fused fast path handles the
            # padding mask without scaled_dot_product_attention.
            stock = torch_module(case, load_file(str(path)), encoder_layer=True)
            competitors.append(harness.Contender(TORCH_ENCODER_LAYER, torch_fn(stock)))
        return harness.Row(
            key=case.key,
            workload=f"{case.label}; {case_inputs(case)}, batch {case.batch}",
            rounds=self.rounds_for(case.rounds),
            mlmf=harness.Contender("mlmf", lambda: fus(inputs)),
            competitors=harness.with_one_thread(competitors),
            compare=compare,
            max_diff=max_diff,
        )

    def build(self, only: Optional[list[str]]) -> list[harness.Row]:
        # Named by label (the skip note's name), picked by key.
        builders = [
            (case.label, functools.partial(self.row_for, index, case))
            for index, case in enumerate(CASES)
            if not only or case.key in only
        ]
        return self.build_rows(builders, None, skipped="row skipped")

    # report --------------------------------------------------------------------

    def section(
        self, lines: list[harness.Line], rows: list[Any], env: dict[str, str], png: bool
    ) -> str:
        min_time = self.args.min_time
        rounds = ", ".join(
            dict.fromkeys(
                f"{'token' if r.key in ('early', 'middle') else 'pooled'} rows {r.rounds}"
                for r in rows
            )
        )
        method = [
            "Method: one `mlmf.Fusion` layer per row against a PyTorch eager module computing "
            "the same formulas (docs/fusion.md), fp32 on the CPU, fused width "
            f"{OUT_DIM}. Pooled rows: standard-normal embeddings of text (384), image (768) "
            f"and audio (512), batch {POOLED_BATCH}. Token rows: {TEXT_TOKENS} text tokens "
            f"(384 wide, padded: row lengths drawn in [8, {TEXT_TOKENS}], an int64 0/1 mask) "
            f"and {IMAGE_TOKENS} image tokens (768 wide, no mask), batch {TOKEN_BATCH}, "
            f"{LAYERS} layers of {HEADS} heads, gelu MLP of width {4 * OUT_DIM}, LayerNorm. "
            "Weights: mlmf names every tensor (`tensor_shapes()`); each is drawn in torch "
            f"from seed {SEED} + row index (linear layers uniform in ±1/sqrt(in), biases "
            "included; norm weights 1 + 0.1 N(0,1), norm biases 0.1 N(0,1); type_embedding "
            "0.2 N(0,1); modality_logits N(0,1); tanh gates 0.5 + 0.2 N(0,1), so the gates "
            "matter), saved to a safetensors file that `mlmf.Fusion(..., weights=...)` loads "
            "and the torch module reads with `safetensors.torch.load_file` "
            "(`load_state_dict(strict=True)`). torch gets the same arrays via "
            "`torch.from_numpy` and runs under `torch.inference_mode()` in eval mode. Each "
            "contender is warmed up, then the contenders alternate for several rounds "
            f"({rounds}; order reversed every other round); each timed sample repeats the call "
            f"until it lasts at least {min_time:g} s. Figures are medians over the rounds, "
            "per call (the whole batch). Ratio = competitor time / mlmf time. *max abs diff* "
            "compares mlmf's `fused` (and `gates` where the strategy has them) with torch's.",
            "",
            "PyTorch modules (float32 `torch.nn.Module`s, one per strategy):",
            "",
            f"- late concat: one `nn.Linear({sum(POOLED_DIMS.values())}, {OUT_DIM})` over "
            "`torch.cat` of the inputs; late "
            "mean: an `nn.Linear` per modality, summed and divided by the count; late "
            "weighted: the same projections combined with `softmax(modality_logits)` by one "
            "`torch.bmm`; late logits: `nn.LayerNorm` + `nn.Linear` head per modality, averaged.",
            "- attention: `nn.Linear` scorer (or `fc1` → tanh → `fc2` with attention_dim) on "
            "the concatenation, softmax over modalities, then the weighted sum of the "
            "per-modality `nn.Linear` projections by one `torch.bmm`; gated: the same with "
            "`sigmoid` gates.",
            "- early: per-modality `nn.Linear` + type embedding, `torch.cat` into one sequence, "
            f"{LAYERS} pre-norm layers (`nn.LayerNorm`, self-attention with `nn.Linear` "
            "q/k/v/out around `F.scaled_dot_product_attention` and the padding as a boolean "
            "`attn_mask`, `nn.LayerNorm`, gelu MLP), final `nn.LayerNorm`, masked mean by "
            "`torch.bmm`. The *nn.TransformerEncoderLayer* line (no target, for reference) "
            f"runs the same weights through {LAYERS} × `nn.TransformerEncoderLayer(512, "
            f"{HEADS}, 2048, dropout=0, activation='gelu', batch_first=True, norm_first=True)` "
            "with `src_key_padding_mask`, which in eval mode under inference mode takes "
            "torch's fused encoder-layer fast path; mlmf's `layers.{i}.attn.{q,k,v}_proj` are "
            "concatenated into `in_proj_weight`/`in_proj_bias`, `mlp.fc1`/`fc2` become "
            "`linear1`/`linear2`.",
            "- middle: per layer and modality a block of `nn.LayerNorm`s, a cross-attention "
            "(`nn.Linear` q/k/v/out around `F.scaled_dot_product_attention`, the context's "
            "padding as a boolean `attn_mask`), the tanh gates as `nn.Parameter`s, and a gelu "
            "MLP (`nn.Linear`, `F.gelu`, `nn.Linear`); a shared final `nn.LayerNorm`, the "
            "masked mean per modality and the mean over modalities.",
        ]
        notes = [  # the fixed notes, then the run's
            f"Target: mlmf no slower than PyTorch eager (ratio ≥ {TARGET:g}x) on every row.",
            "The pooled rows are small: about 0.11 GFLOP of projections per call (0.16 with "
            "attention_dim 256), multiply-adds counted as two operations.",
            "Padded text positions are excluded from every key set and from the masked "
            "means, so `fused` does not depend on them. mlmf's `early` and `middle` drop them "
            "before the first layer and run on the real tokens only (docs/fusion.md, packed "
            "rows); the torch modules compute them. The *unpadded text* rows (every text token "
            "real) show the two without that difference.",
            harness.one_thread_note("module"),
            *self.notes,
        ]
        return harness.section_text(
            "Fusion", "fusion.py", self.quick, method, env, self.table(lines), notes
        )


if __name__ == "__main__":
    sys.exit(Fusion.main())
