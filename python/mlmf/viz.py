"""Pictures of attention and training curves (needs the ``viz`` extra: matplotlib)."""

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


def training_curves(
    history: Sequence[dict],
    path: Union[str, os.PathLike[str]],
    *,
    size: tuple[int, int] = (1000, 420),
    dpi: int = 100,
) -> Path:
    """Draws a training history (``Trainer.fit``'s, or ``history.json``) as a PNG: the
    training and validation losses per epoch on the left, the validation metrics
    (recall@1, accuracy, macro-F1, MSE) on the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mlmf.viz needs matplotlib: pip install 'mlmf[viz]'") from exc
    if not history:
        raise ValueError("an empty history: nothing to draw")
    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    if any("loss" in h["val"] for h in history):
        left.plot(
            epochs, [h["val"].get("loss", np.nan) for h in history], marker="o", label="val loss"
        )
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    names = sorted(
        {
            k
            for h in history
            for k in h["val"]
            if k.endswith("R@1") or k in ("accuracy", "macro_f1", "mse")
        }
    )
    for k in names:
        right.plot(epochs, [h["val"].get(k, np.nan) for h in history], marker="o", label=k)
    right.set_xlabel("epoch")
    right.set_ylabel("validation metric")
    if names:
        right.legend(fontsize="small")
    else:
        right.text(0.5, 0.5, "no validation data", ha="center", va="center")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


__all__ = ["attention_heatmap", "training_curves"]
