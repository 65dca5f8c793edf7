"""Attention layers composed from :class:`mlmf.CrossModalAttention`, and helpers to
analyse attention weights."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from mlmf._mlmf import CrossModalAttention

_Path = Union[str, "os.PathLike[str]"]


class BidirectionalCrossAttention:
    """Two modalities attending over each other in one layer.

    ``a`` tokens (width ``dim_a``) attend over ``b`` tokens (width ``dim_b``) and ``b``
    over ``a``, each direction with its own :class:`~mlmf.CrossModalAttention` (its own
    projections and weights file). Every keyword of ``CrossModalAttention`` except the
    widths applies to both directions.

    >>> att = BidirectionalCrossAttention(384, 512, num_heads=8,
    ...                                   weights=("t2i.safetensors", "i2t.safetensors"))
    >>> text_out, image_out = att(text, image, a_mask=text_mask, b_mask=image_mask)
    """

    def __init__(
        self,
        dim_a: int,
        dim_b: int,
        num_heads: int = 8,
        *,
        weights: Optional[tuple[_Path, _Path]] = None,
        seed: int = 0,
        modalities: tuple[str, str] = ("text", "image"),
        **options: Any,
    ) -> None:
        wa, wb = weights if weights is not None else (None, None)
        ma, mb = modalities
        self.a_to_b = CrossModalAttention(
            dim_a,
            num_heads,
            dim_b,
            weights=wa,
            seed=seed,
            query_modality=ma,
            kv_modality=mb,
            **options,
        )
        self.b_to_a = CrossModalAttention(
            dim_b,
            num_heads,
            dim_a,
            weights=wb,
            seed=seed + 1,
            query_modality=mb,
            kv_modality=ma,
            **options,
        )

    @property
    def untrained(self) -> bool:
        return self.a_to_b.untrained or self.b_to_a.untrained

    def save(self, path_a_to_b: _Path, path_b_to_a: _Path) -> None:
        """Writes both directions' weights (the files ``weights=`` reads)."""
        self.a_to_b.save(path_a_to_b)
        self.b_to_a.save(path_b_to_a)

    def __call__(
        self,
        a: npt.NDArray[Any],
        b: npt.NDArray[Any],
        a_mask: Optional[npt.NDArray[Any]] = None,
        b_mask: Optional[npt.NDArray[Any]] = None,
        return_weights: bool = False,
        average_weights: bool = False,
    ) -> Any:
        """``(a_out, b_out)``, or ``((a_out, a_weights), (b_out, b_weights))`` with
        ``return_weights``: ``a_out`` is ``a`` attending over ``b`` ``[B, Ta, dim_a]``."""
        kw = {"return_weights": return_weights, "average_weights": average_weights}
        a_out = self.a_to_b(a, b, query_mask=a_mask, kv_mask=b_mask, **kw)
        b_out = self.b_to_a(b, a, query_mask=b_mask, kv_mask=a_mask, **kw)
        return a_out, b_out

    def __repr__(self) -> str:
        return f"BidirectionalCrossAttention({self.a_to_b!r}, {self.b_to_a!r})"


def head_entropy(weights: npt.ArrayLike, *, base: float = np.e) -> npt.NDArray[np.float64]:
    """Entropy of each attention row, ``-sum(w log w)`` over the keys (``0 log 0 = 0``).

    ``weights`` is ``[..., Tq, Tk]`` (per head ``[B, H, Tq, Tk]`` gives ``[B, H, Tq]``).
    0 means one key takes all the attention, ``log(Tk)`` means it is spread evenly.
    Rows that attend to nothing (all zero: masked queries) give 0.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"expected weights [..., Tq, Tk], got shape {w.shape}")
    logs = np.log(np.where(w > 0, w, 1.0)) / np.log(base)
    return -(w * logs).sum(axis=-1)


def top_attended(
    weights: npt.ArrayLike, k: int = 5
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The ``k`` keys each query row attends to most: ``(indices, weights)``, both
    ``[..., Tq, k]``, largest first (``k`` is capped at ``Tk``)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"expected weights [..., Tq, Tk], got shape {w.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, w.shape[-1])
    idx = np.argsort(-w, axis=-1, kind="stable")[..., :k]
    return idx.astype(np.int64), np.take_along_axis(w, idx, axis=-1)


__all__ = ["BidirectionalCrossAttention", "head_entropy", "top_attended"]
