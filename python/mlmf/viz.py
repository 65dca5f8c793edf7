"""Pictures of attention (needs the ``viz`` extra: matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import numpy.typing as npt


def attention_heatmap(
    weights: npt.ArrayLike,
    path: Union[str, os.PathLike[str]],
    *,
    query_labels: Optional[Sequence[str]] = None,
    key_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    size: tuple[int, int] = (800, 600),
    dpi: int = 100,
) -> Path:
    """Draws ``weights`` ``[Tq, Tk]`` (e.g. text tokens x image patches, one head or the
    head average) as a heatmap PNG of ``size`` pixels (width, height) and returns the
    path. Queries run down the rows, keys across the columns; labels are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mlmf.viz needs matplotlib: pip install 'mlmf[viz]'") from exc
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"expected weights [Tq, Tk] with Tq, Tk >= 1, got shape {w.shape}")
    for name, labels, n in (
        ("query_labels", query_labels, w.shape[0]),
        ("key_labels", key_labels, w.shape[1]),
    ):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name}: {len(labels)} labels for {n} positions")
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    im = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="attention weight")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if query_labels is not None:
        ax.set_yticks(range(len(query_labels)), labels=list(query_labels))
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)), labels=list(key_labels), rotation=90)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


__all__ = ["attention_heatmap"]
