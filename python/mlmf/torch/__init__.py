"""PyTorch versions of mlmf's trainable layers (optional: ``pip install 'mlmf[torch]'``).

The modules compute what mlmf's layers compute and their ``state_dict`` names are
mlmf's tensor names, so weights move both ways through safetensors files:

>>> import mlmf, mlmf.torch
>>> fus = mlmf.torch.Fusion("gated", {"text": 384, "image": 512}, 512)
>>> ...                                            # train it with torch
>>> mlmf.torch.save_mlmf(fus, "fusion.safetensors")
>>> mlmf.Fusion("gated", {"text": 384, "image": 512}, 512, weights="fusion.safetensors")

``from_mlmf`` / ``to_mlmf`` convert whole layers.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mlmf.torch needs PyTorch, which is not installed: pip install 'mlmf[torch]'"
    ) from exc

from .attention import CrossModalAttention
from .fusion import (
    AttentionFusion,
    EarlyFusion,
    Fusion,
    FusionBase,
    FusionOutput,
    GatedFusion,
    LateFusion,
    MiddleFusion,
)
from .interop import from_mlmf, load_mlmf, save_mlmf, to_mlmf

__all__ = [
    "AttentionFusion",
    "CrossModalAttention",
    "EarlyFusion",
    "Fusion",
    "FusionBase",
    "FusionOutput",
    "GatedFusion",
    "LateFusion",
    "MiddleFusion",
    "from_mlmf",
    "load_mlmf",
    "save_mlmf",
    "to_mlmf",
]
