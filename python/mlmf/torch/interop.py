"""Moving weights between ``mlmf.torch`` modules and mlmf's own layers.

The files are safetensors with mlmf's tensor names in float32 (what
``mlmf.Fusion(..., weights=path)`` and ``mlmf.CrossModalAttention(..., weights=path)``
read and what their ``save(path)`` writes).
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .attention import CrossModalAttention
from .fusion import OPTION_DEFAULTS, Fusion, FusionBase

PathLike = Union[str, "os.PathLike[str]"]

# Keywords of mlmf.CrossModalAttention that have no effect on the torch module's outputs
# (or that only mlmf's own constructor takes).
_ATTENTION_IGNORED = {"dropout", "weights", "seed", "query_modality", "kv_modality", "bias"}


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mlmf.torch needs safetensors to read and write weights: pip install 'mlmf[torch]'"
        ) from exc
    return st


def save_mlmf(module: nn.Module, path: PathLike) -> None:
    """Write ``module``'s state_dict as float32 safetensors under mlmf's tensor names."""
    state = {
        name: t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name, t in module.state_dict().items()
    }
    _safetensors().save_file(state, str(path))


def load_mlmf(module: nn.Module, path: PathLike) -> nn.Module:
    """Load a file written by ``save_mlmf`` or by mlmf's ``save`` into ``module`` (every
    tensor must match, none may be missing or extra); returns ``module``."""
    tensors = _safetensors().load_file(str(path))
    module.load_state_dict(tensors, strict=True)
    return module


def _fusion_options(obj: Any) -> dict[str, Any]:
    strategy = "gated" if obj.strategy == "adaptive" else obj.strategy
    if strategy not in OPTION_DEFAULTS:
        raise ValueError(f"mlmf.Fusion({obj.strategy!r}) has no torch module")
    options = {k: v for k, v in dict(obj.options).items() if k != "strategy"}
    return {**OPTION_DEFAULTS[strategy], **options}


def _attention_config(obj: Any, weights: Path) -> dict[str, Any]:
    accepted = set(inspect.signature(CrossModalAttention.__init__).parameters) - {"self"}
    config = getattr(obj, "config", None)
    if config is not None:
        config = dict(config)
        if config.get("adaptive"):
            raise NotImplementedError(
                "mlmf.torch.CrossModalAttention does not implement adaptive=True"
            )
        return {k: v for k, v in config.items() if k in accepted and k not in _ATTENTION_IGNORED}
    warnings.warn(
        "this mlmf.CrossModalAttention has no `config`: only dim, kv_dim, num_heads, "
        "num_kv_heads, head_dim, temperature and qk_norm (read from the weights) carry over",
        stacklevel=3,
    )
    names = set(_safetensors().load_file(str(weights)))
    return {
        "dim": obj.dim,
        "kv_dim": obj.kv_dim,
        "num_heads": obj.num_heads,
        "num_kv_heads": obj.num_kv_heads,
        "head_dim": obj.head_dim,
        "temperature": obj.temperature,
        "qk_norm": "q_norm.weight" in names,
    }


def from_mlmf(obj: Any) -> nn.Module:
    """The torch module equivalent to an ``mlmf.Fusion`` or ``mlmf.CrossModalAttention``,
    with the same weights (float32)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        obj.save(path)
        if hasattr(obj, "strategy"):
            module: nn.Module = Fusion(
                obj.strategy,
                dict(obj.dims),
                obj.out_dim,
                required=list(getattr(obj, "required", None) or []) or None,
                **_fusion_options(obj),
            )
        elif hasattr(obj, "num_heads"):
            module = CrossModalAttention(**_attention_config(obj, path))
        else:
            raise TypeError(
                f"expected mlmf.Fusion or mlmf.CrossModalAttention, got {type(obj).__name__}"
            )
        return load_mlmf(module, path)


def _build_mlmf(module: nn.Module, path: Path) -> Any:
    import mlmf

    if isinstance(module, FusionBase):
        options = {k: v for k, v in module.options.items() if v is not None}
        return mlmf.Fusion(
            module.strategy,
            dict(module.dims),
            module.out_dim,
            weights=path,
            required=module.required or None,
            **options,
        )
    if isinstance(module, CrossModalAttention):
        return mlmf.CrossModalAttention(weights=path, **module.config)
    raise TypeError(f"expected an mlmf.torch fusion or attention module, got {type(module)}")


def to_mlmf(module: nn.Module, path: Optional[PathLike] = None) -> Any:
    """Save ``module`` (to ``path``, or a temporary file) and return the equivalent
    ``mlmf.Fusion`` / ``mlmf.CrossModalAttention`` built with ``weights=`` that file."""
    if path is not None:
        save_mlmf(module, path)
        return _build_mlmf(module, Path(path))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "weights.safetensors"
        save_mlmf(module, tmp_path)
        return _build_mlmf(module, tmp_path)
