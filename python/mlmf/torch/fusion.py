"""Fusion layers as ``torch.nn.Module``s with mlmf's semantics and tensor names.

Each module's ``state_dict`` holds exactly the tensors ``mlmf.Fusion`` reads
(docs/fusion.md: ``proj.text.weight``, ``layers.0.attn.q_proj.bias``, ...), so a file
written by :func:`mlmf.torch.save_mlmf` loads into ``mlmf.Fusion(..., weights=path)``.

A call takes the present modalities only; a missing modality is masked out as mlmf
does it (concatenations see zeros in its slot, softmaxes and means run over the present
modalities, token sequences leave its tokens out, its gate is 0).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CrossModalAttention, HeadRmsNorm

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6
LAYER_DEFAULTS: dict[str, Any] = {
    "num_layers": 1,
    "num_heads": 8,
    "mlp": "gelu",
    "mlp_ratio": 4.0,
    "norm": "layer",
}
# Every option of each strategy with its default ("adaptive" is gated's other name).
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "late": {"mode": "concat"},
    "attention": {"attention_dim": None},
    "gated": {},
    "early": dict(LAYER_DEFAULTS),
    "middle": {**LAYER_DEFAULTS, "gate": "none"},
}

Value = Union[Tensor, tuple[Tensor, Tensor]]


class FusionOutput(NamedTuple):
    """What a fusion call returns: ``fused`` [B, out], ``gates`` [B, M] or None, and the
    attention weights by layer name (with ``return_attention``)."""

    fused: Tensor
    gates: Optional[Tensor]
    attention: dict[str, Tensor]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum_t mask_t x_t / max(1, sum_t mask_t)``: [B, T, D], [B, T] -> [B, D]."""
    total = (x * mask[..., None]).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0)[:, None]


def make_norm(d: int, kind: str) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d, eps=LAYER_NORM_EPS)
    if kind == "rms":
        return HeadRmsNorm(d, RMS_NORM_EPS)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


class Mlp(nn.Module):
    """gelu: ``fc2(gelu(fc1(x)))`` (exact GELU); swiglu: ``down_proj(silu(gate_proj(x)) *
    up_proj(x))`` without biases; hidden ``int(ratio * d)``."""

    def __init__(self, d: int, kind: str, ratio: float) -> None:
        super().__init__()
        hidden = int(ratio * d)
        self.kind = kind
        if kind == "gelu":
            self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        elif kind == "swiglu":
            self.gate_proj = nn.Linear(d, hidden, bias=False)
            self.up_proj = nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)
        else:
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Scorer(nn.Module):
    """``fc2(tanh(fc1(x)))``: the attention strategy's scorer with ``attention_dim``."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class FusionBase(nn.Module):
    """What every strategy shares: the modalities, input handling and the options."""

    strategy = ""

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        options: dict[str, Any],
        required: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("dims must name at least one modality")
        self.dims = {str(m): int(d) for m, d in dims.items()}
        self.names = list(self.dims)
        self.out_dim = out_dim
        self.options = dict(options)
        self.required = [str(m) for m in (required or [])]
        unknown = [m for m in self.required if m not in self.dims]
        if unknown:
            raise ValueError(f"required modalities not in dims: {unknown}")

    def _linear_per_modality(self) -> nn.ModuleDict:
        return nn.ModuleDict({m: nn.Linear(d, self.out_dim) for m, d in self.dims.items()})

    def prepare(self, inputs: dict[str, Value]) -> dict[str, tuple[Tensor, Tensor]]:
        """The present modalities in dims order as (tokens [B, T, D], float mask [B, T])."""
        if not inputs:
            raise ValueError("no modality passed")
        unknown = [str(m) for m in inputs if str(m) not in self.dims]
        if unknown:
            raise KeyError(f"modalities not in dims: {unknown}")
        given = {str(m): v for m, v in inputs.items()}
        missing = [m for m in self.required if m not in given]
        if missing:
            raise KeyError(f"required modality missing: {missing}")
        out: dict[str, tuple[Tensor, Tensor]] = {}
        batch = None
        for m in self.names:
            if m not in given:
                continue
            value = given[m]
            mask = None
            if isinstance(value, (tuple, list)):
                value, mask = value
            x = value[:, None, :] if value.dim() == 2 else value
            if x.dim() != 3 or x.shape[-1] != self.dims[m]:
                raise ValueError(
                    f"{m}: expected [B, {self.dims[m]}] or [B, T, {self.dims[m]}], got "
                    f"{tuple(value.shape)}"
                )
            if mask is None:
                mask_f = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
            else:
                mask = torch.as_tensor(mask, device=x.device)
                if tuple(mask.shape) != tuple(x.shape[:2]):
                    raise ValueError(f"{m}: mask {tuple(mask.shape)} for tokens {tuple(x.shape)}")
                mask_f = (mask != 0).to(x.dtype)
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"{m}: batch size {x.shape[0]}, expected {batch}")
            batch = x.shape[0]
            out[m] = (x, mask_f)
        return out

    def pooled(self, inputs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        return {m: masked_mean(x, mask) for m, (x, mask) in inputs.items()}

    def concat_all(self, p: dict[str, Tensor]) -> Tensor:
        """``cat_m p_m`` over every modality of dims, zeros in the missing slots."""
        ref = next(iter(p.values()))
        parts = [p[m] if m in p else ref.new_zeros(ref.shape[0], d) for m, d in self.dims.items()]
        return torch.cat(parts, dim=1)

    def present_flags(self, p: dict[str, Any], like: Tensor) -> Tensor:
        """[M] bool: which modalities of dims are present."""
        return torch.tensor([m in p for m in self.names], device=like.device)

    def weighted_sum(self, weights: Tensor, p: dict[str, Tensor]) -> Tensor:
        """``sum_{m in P} weights[:, m] proj.m(p_m)``; ``weights`` [B, M]."""
        terms = [
            weights[:, i : i + 1] * self.proj[m](p[m]) for i, m in enumerate(self.names) if m in p
        ]
        return torch.stack(terms).sum(0)

    def forward(
        self, inputs: dict[str, Value], return_attention: bool = False
    ) -> FusionOutput:  # pragma: no cover - every strategy overrides it
        raise NotImplementedError


class LateFusion(FusionBase):
    """``late``: concat ``proj(cat p)``, mean, weighted (``modality_logits``), logits
    (per-modality LayerNorm + head, averaged) or similarity (the mean of the unit
    vectors, no weights: aligned towers' vectors kept in their own space)."""

    strategy = "late"

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        mode: str = "concat",
        *,
        required: Optional[list[str]] = None,
    ) -> None:
        super().__init__(dims, out_dim, {"mode": mode}, required)
        self.mode = mode
        if mode == "concat":
            self.proj = nn.Linear(sum(self.dims.values()), out_dim)
        elif mode in ("mean", "weighted"):
            self.proj = self._linear_per_modality()
            if mode == "weighted":
                self.modality_logits = nn.Parameter(torch.zeros(len(self.dims)))
        elif mode == "logits":
            self.norm = nn.ModuleDict({m: make_norm(d, "layer") for m, d in self.dims.items()})
            self.head = self._linear_per_modality()
        elif mode == "similarity":
            wrong = {m: d for m, d in self.dims.items() if d != out_dim}
            if wrong:
                raise ValueError(
                    "late mode 'similarity' keeps the aligned towers' space: every "
                    f"modality's width must equal out_dim ({out_dim}), got {wrong}"
                )
        else:
            raise ValueError(
                f"mode must be concat, mean, weighted, logits or similarity, got {mode!r}"
            )

    def forward(self, inputs: dict[str, Value], return_attention: bool = False) -> FusionOutput:
        p = self.pooled(self.prepare(inputs))
        if self.mode == "concat":
            return FusionOutput(self.proj(self.concat_all(p)), None, {})
        if self.mode == "mean":
            fused = torch.stack([self.proj[m](p[m]) for m in self.names if m in p]).mean(0)
            return FusionOutput(fused, None, {})
        if self.mode == "similarity":
            units = [F.normalize(p[m], dim=-1) for m in self.names if m in p]
            return FusionOutput(torch.stack(units).mean(0), None, {})
        if self.mode == "weighted":
            ref = next(iter(p.values()))
            present = self.present_flags(p, ref)
            w = torch.softmax(self.modality_logits.masked_fill(~present, -math.inf), dim=0)
            w = w.to(ref.dtype)[None, :].expand(ref.shape[0], -1)
            return FusionOutput(self.weighted_sum(w, p), w, {})
        heads = [self.head[m](self.norm[m](p[m])) for m in self.names if m in p]
        return FusionOutput(torch.stack(heads).mean(0), None, {})


class AttentionFusion(FusionBase):
    """``attention``: softmax over the present modalities of ``score(cat p)`` (or
    ``score.fc2(tanh(score.fc1(cat p)))`` with ``attention_dim``) weighting ``proj.m``."""

    strategy = "attention"

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        attention_dim: Optional[int] = None,
        *,
        required: Optional[list[str]] = None,
    ) -> None:
        super().__init__(dims, out_dim, {"attention_dim": attention_dim}, required)
        total, n = sum(self.dims.values()), len(self.dims)
        if attention_dim is None:
            self.score: nn.Module = nn.Linear(total, n)
        else:
            self.score = Scorer(total, attention_dim, n)
        self.proj = self._linear_per_modality()

    def forward(self, inputs: dict[str, Value], return_attention: bool = False) -> FusionOutput:
        p = self.pooled(self.prepare(inputs))
        scores = self.score(self.concat_all(p))
        present = self.present_flags(p, scores)
        w = torch.softmax(scores.masked_fill(~present[None, :], -math.inf), dim=1)
        return FusionOutput(self.weighted_sum(w, p), w, {})


class GatedFusion(FusionBase):
    """``gated`` (alias ``adaptive``): ``g = sigmoid(gate(cat p))`` weighting ``proj.m``."""

    strategy = "gated"

    def __init__(
        self, dims: dict[str, int], out_dim: int, *, required: Optional[list[str]] = None
    ) -> None:
        super().__init__(dims, out_dim, {}, required)
        self.gate = nn.Linear(sum(self.dims.values()), len(self.dims))
        self.proj = self._linear_per_modality()

    def forward(self, inputs: dict[str, Value], return_attention: bool = False) -> FusionOutput:
        p = self.pooled(self.prepare(inputs))
        g = torch.sigmoid(self.gate(self.concat_all(p)))
        g = g * self.present_flags(p, g)[None, :]
        return FusionOutput(self.weighted_sum(g, p), g, {})


def layer_options(
    num_layers: int, num_heads: int, mlp: str, mlp_ratio: float, norm: str
) -> dict[str, Any]:
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "mlp": mlp,
        "mlp_ratio": mlp_ratio,
        "norm": norm,
    }


class EncoderLayer(nn.Module):
    """Pre-norm self-attention layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, d: int, opts: dict[str, Any]) -> None:
        super().__init__()
        self.norm1 = make_norm(d, opts["norm"])
        self.attn = CrossModalAttention(d, opts["num_heads"], d)
        self.norm2 = make_norm(d, opts["norm"])
        self.mlp = Mlp(d, opts["mlp"], opts["mlp_ratio"])

    def forward(self, x: Tensor, mask: Tensor, want: bool) -> tuple[Tensor, Optional[Tensor]]:
        h = self.norm1(x)
        a, w = self.attn(h, h, mask, mask, return_weights=want)
        x = x + a
        return x + self.mlp(self.norm2(x)), w


class EarlyFusion(FusionBase):
    """``early``: every present modality's tokens (``proj.m`` + ``type_embedding[m]``) in
    one sequence through pre-norm transformer layers, then ``norm`` and the masked mean."""

    strategy = "early"

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        num_layers: int = 1,
        num_heads: int = 8,
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        *,
        required: Optional[list[str]] = None,
    ) -> None:
        opts = layer_options(num_layers, num_heads, mlp, mlp_ratio, norm)
        super().__init__(dims, out_dim, opts, required)
        self.proj = self._linear_per_modality()
        bound = 1.0 / math.sqrt(out_dim)
        self.type_embedding = nn.Parameter(
            torch.empty(len(self.dims), out_dim).uniform_(-bound, bound)
        )
        self.layers = nn.ModuleList(EncoderLayer(out_dim, opts) for _ in range(num_layers))
        self.norm = make_norm(out_dim, norm)

    def forward(self, inputs: dict[str, Value], return_attention: bool = False) -> FusionOutput:
        xs = self.prepare(inputs)
        parts = [
            self.proj[m](x) + self.type_embedding[self.names.index(m)] for m, (x, _) in xs.items()
        ]
        x = torch.cat(parts, dim=1)
        mask = torch.cat([mk for _, mk in xs.values()], dim=1)
        attention: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x, w = layer(x, mask, return_attention)
            if w is not None:
                attention[f"layers.{i}"] = w
        return FusionOutput(masked_mean(self.norm(x), mask), None, attention)


GATES = ("none", "tanh", "sigmoid")


def apply_gate(kind: str, gate: Any, x: Tensor, y: Tensor) -> Tensor:
    """``G(x, y)``: none ``y``; tanh ``tanh(alpha) * y``; sigmoid ``sigmoid(gate(x)) * y``."""
    if kind == "none":
        return y
    if kind == "tanh":
        return torch.tanh(gate) * y
    return torch.sigmoid(gate(x)) * y


class MiddleBlock(nn.Module):
    """One modality's part of a ``middle`` layer (tensors ``layers.{i}.{m}.*``)."""

    def __init__(self, d: int, opts: dict[str, Any]) -> None:
        super().__init__()
        self.gate_kind = opts["gate"]
        self.norm_q = make_norm(d, opts["norm"])
        self.norm_kv = make_norm(d, opts["norm"])
        self.attn = CrossModalAttention(d, opts["num_heads"], d)
        self.norm_mlp = make_norm(d, opts["norm"])
        self.mlp = Mlp(d, opts["mlp"], opts["mlp_ratio"])
        for name in ("attn_gate", "mlp_gate"):
            if self.gate_kind == "tanh":
                setattr(self, name, nn.Parameter(torch.zeros(1)))
            elif self.gate_kind == "sigmoid":
                setattr(self, name, nn.Linear(d, d))

    def forward(
        self, x: Tensor, mask: Tensor, ctx: Optional[tuple[Tensor, Tensor]], want: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        w = None
        if ctx is None:  # alone: nothing to attend to
            a = torch.zeros_like(x)
        else:
            a, w = self.attn(self.norm_q(x), self.norm_kv(ctx[0]), mask, ctx[1], want)
        y = x + apply_gate(self.gate_kind, getattr(self, "attn_gate", None), x, a)
        h = self.mlp(self.norm_mlp(y))
        return y + apply_gate(self.gate_kind, getattr(self, "mlp_gate", None), y, h), w


class MiddleFusion(FusionBase):
    """``middle``: each present modality's tokens attend over the other present
    modalities' tokens in every layer (gated residuals), then the shared ``norm``, the
    masked mean per modality and the mean over the present modalities."""

    strategy = "middle"

    def __init__(
        self,
        dims: dict[str, int],
        out_dim: int,
        num_layers: int = 1,
        num_heads: int = 8,
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        gate: str = "none",
        *,
        required: Optional[list[str]] = None,
    ) -> None:
        if gate not in GATES:
            raise ValueError(f"gate must be none, tanh or sigmoid, got {gate!r}")
        opts = {**layer_options(num_layers, num_heads, mlp, mlp_ratio, norm), "gate": gate}
        super().__init__(dims, out_dim, opts, required)
        self.proj = self._linear_per_modality()
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: MiddleBlock(out_dim, opts) for m in self.dims})
            for _ in range(num_layers)
        )
        self.norm = make_norm(out_dim, norm)

    def forward(self, inputs: dict[str, Value], return_attention: bool = False) -> FusionOutput:
        xs = self.prepare(inputs)
        x = {m: self.proj[m](t) for m, (t, _) in xs.items()}
        mask = {m: mk for m, (_, mk) in xs.items()}
        present = list(x)
        attention: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            new = {}
            for m in present:
                others = [n for n in present if n != m]
                ctx = None
                if others:
                    ctx = (
                        torch.cat([x[n] for n in others], dim=1),
                        torch.cat([mask[n] for n in others], dim=1),
                    )
                new[m], w = layer[m](x[m], mask[m], ctx, return_attention)
                if w is not None:
                    attention[f"layers.{i}.{m}"] = w
            x = new
        pooled = [masked_mean(self.norm(x[m]), mask[m]) for m in present]
        return FusionOutput(torch.stack(pooled).mean(0), None, attention)


STRATEGIES: dict[str, type[FusionBase]] = {
    "late": LateFusion,
    "attention": AttentionFusion,
    "gated": GatedFusion,
    "adaptive": GatedFusion,
    "early": EarlyFusion,
    "middle": MiddleFusion,
}


def Fusion(  # noqa: N802 - mirrors mlmf.Fusion, a class there
    strategy: str,
    dims: Union[dict[str, int], list[tuple[str, int]]],
    out_dim: int,
    *,
    required: Optional[list[str]] = None,
    **options: Any,
) -> FusionBase:
    """The torch module of ``mlmf.Fusion(strategy, dims, out_dim, **options)``."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}: one of late, attention, gated (adaptive), "
            "early, middle (custom has no torch module)"
        )
    name = "gated" if strategy == "adaptive" else strategy
    unknown = set(options) - set(OPTION_DEFAULTS[name])
    if unknown:
        raise TypeError(f"unknown option(s) for {strategy!r}: {sorted(unknown)}")
    dims = dict((str(m), int(d)) for m, d in (dims.items() if isinstance(dims, dict) else dims))
    return STRATEGIES[name](dims, out_dim, required=required, **options)
