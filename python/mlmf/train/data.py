"""Training data in the forms ``mlmf.Trainer`` takes, turned into the core's datasets.

- JSONL (``mlmf encode --input-list`` rows): ``text``, ``image``, ``audio``, ``video``
  (paths relative to the file), ``id``, and optional ``label`` (int) and ``target``
  (a number or a list); ``meta`` is ignored. A list of such dicts works too.
- Arrays: ``{"text": float32 [N, D] or [N, T, D] or ([N, T, D], mask [N, T]), ...,
  "label": [N], "target": [N] or [N, K], "id": [N]}``; rows of NaN are rows without
  that modality.
- The Parquet output of ``mlmf.distributed.run_batch`` (a folder or ``.parquet``), with
  labels and targets joined by id from ``rows`` (see :func:`load_embeddings`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

import mlmf
from mlmf._progress import Progress

MODALITIES = ("text", "image", "audio", "video")
ROW_KEYS = {*MODALITIES, "id", "label", "target", "meta"}

Source = Union[str, os.PathLike, Iterable[Mapping[str, Any]], Mapping[str, Any]]


def _error(origin: str, row: Optional[int], field: Optional[str], message: str) -> mlmf.DataError:
    where = f" row {row}" if row is not None else ""
    what = f" field `{field}`" if field else ""
    return mlmf.DataError(f"{origin}{where}{what}: {message}")


def _check_row(row: Any, origin: str, n: int, base: Optional[Path]) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise _error(origin, n, None, f"expected an object, got {type(row).__name__}")
    unknown = set(row) - ROW_KEYS
    if unknown:
        raise _error(
            origin,
            n,
            sorted(unknown)[0],
            f"unknown key(s) {sorted(unknown)}: expected {', '.join(MODALITIES)}, id, label, "
            "target (and meta, ignored)",
        )
    out = {k: v for k, v in row.items() if k != "meta"}
    if "label" in out and out["label"] is not None:
        lab = out["label"]
        if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)):
            raise _error(origin, n, "label", f"expected an integer class index, got {lab!r}")
    if "target" in out and out["target"] is not None:
        t = out["target"]
        vals = t if isinstance(t, (list, tuple)) else [t]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise _error(origin, n, "target", f"expected a number or a list of numbers, got {t!r}")
    if base is not None:
        for m in ("image", "audio", "video"):
            if m in out and isinstance(out[m], str) and not Path(out[m]).is_absolute():
                out[m] = str(base / out[m])
    if not any(m in out for m in MODALITIES):
        raise _error(origin, n, None, f"the row has no input (keys: {sorted(row)})")
    return out


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The rows of a JSONL file, checked; relative media paths are made absolute."""
    p = Path(path)
    if not p.is_file():
        raise _error(str(p), None, None, "no such file")
    base = p.resolve().parent
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _error(p.name, len(rows), None, f"line {n + 1} is not JSON: {e}") from e
            rows.append(_check_row(row, p.name, len(rows), base))
    if not rows:
        raise _error(p.name, None, None, "no rows")
    return rows


def _example(row: Mapping[str, Any]) -> tuple[Optional[str], Optional[int], Optional[list[float]]]:
    t = row.get("target")
    if t is not None and not isinstance(t, (list, tuple)):
        t = [t]
    label = row.get("label")
    return (
        None if row.get("id") is None else str(row["id"]),
        None if label is None else int(label),
        None if t is None else [float(v) for v in t],
    )


def _as_arrays(source: Mapping[str, Any]) -> dict[str, Any]:
    """Checks an arrays dict: modality arrays, masks, presence, examples."""
    arrays: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    n: Optional[int] = None
    for k, v in source.items():
        if k in ("label", "target", "id"):
            continue
        if k.endswith("_mask"):
            continue
        try:
            mlmf.Modality.parse(k)
        except mlmf.MlmfError as e:
            raise _error(
                "arrays", None, k, f"not a modality name (or label, target, id): {e}"
            ) from None
        if isinstance(v, tuple):
            v, mask = v
            masks[k] = np.ascontiguousarray(np.asarray(mask, dtype=np.float32))
        elif f"{k}_mask" in source:
            masks[k] = np.ascontiguousarray(np.asarray(source[f"{k}_mask"], dtype=np.float32))
        a = np.asarray(v, dtype=np.float32)
        if a.ndim not in (2, 3):
            raise _error("arrays", None, k, f"expected [N, D] or [N, T, D], got shape {a.shape}")
        if n is not None and len(a) != n:
            raise _error("arrays", None, k, f"{len(a)} rows, but another modality has {n}")
        n = len(a)
        nan = np.isnan(a).reshape(len(a), -1)
        rows_nan = nan.all(axis=1)
        if (nan.any(axis=1) & ~rows_nan).any():
            bad = int(np.argmax(nan.any(axis=1) & ~rows_nan))
            raise _error(
                "arrays", bad, k, "some values are NaN (a whole row of NaN marks a missing input)"
            )
        a = np.where(np.isnan(a), 0.0, a).astype(np.float32)
        arrays[k] = np.ascontiguousarray(a)
        present[k] = (~rows_nan).tolist()
    if n is None:
        raise _error(
            "arrays", None, None, "no modality array (keys: text, image, audio, video, custom:N)"
        )
    labels = source.get("label")
    targets = source.get("target")
    ids = source.get("id")
    examples = []
    for r in range(n):
        lab = None if labels is None else labels[r]
        if lab is not None and not (isinstance(lab, float) and np.isnan(lab)):
            if float(lab) != int(lab):
                raise _error("arrays", r, "label", f"expected an integer class index, got {lab!r}")
            lab = int(lab)
        else:
            lab = None
        t = None
        if targets is not None:
            tr = np.atleast_1d(np.asarray(targets[r], dtype=np.float32))
            t = None if np.isnan(tr).all() else [float(x) for x in tr]
        examples.append((None if ids is None else str(ids[r]), lab, t))
    return {"arrays": arrays, "masks": masks, "present": present, "examples": examples}


def load_embeddings(
    output: Union[str, os.PathLike], rows: Optional[Source] = None
) -> dict[str, Any]:
    """The embeddings ``mlmf.distributed.run_batch`` wrote (Parquet) as an arrays dict
    for ``Trainer.fit``; ``label`` / ``target`` joined by ``id`` from ``rows`` (a JSONL
    file or dicts), when given."""
    from mlmf.distributed.batch import read_output

    out = read_output(output)
    if not out:
        raise _error(str(output), None, None, "no Parquet files")
    arrays: dict[str, Any] = {k[len("emb_") :]: v for k, v in out.items() if k.startswith("emb_")}
    arrays["id"] = [str(i) for i in out["id"]]
    if rows is not None:
        table = (
            read_jsonl(rows) if isinstance(rows, (str, os.PathLike)) else [dict(r) for r in rows]
        )
        by_id = {str(r["id"]): r for r in table if "id" in r}
        labels, targets = [], []
        for i in arrays["id"]:
            r = by_id.get(i, {})
            labels.append(r.get("label"))
            targets.append(r.get("target"))
        if any(v is not None for v in labels):
            arrays["label"] = [np.nan if v is None else v for v in labels]
        if any(v is not None for v in targets):
            arrays["target"] = [np.nan if v is None else v for v in targets]
    return arrays


def build(
    trainer: Any,
    model: mlmf.MultiModalModel,
    source: Source,
    *,
    dir: Optional[Path],
    batch: int,
    progress: bool,
    what: str,
) -> Any:
    """The core dataset for ``source`` (encoding raw rows through ``model``'s caches)."""
    if isinstance(source, Mapping):
        origin = "arrays"
        builder = trainer.builder(origin, None if dir is None else str(dir))
        a = _as_arrays(source)
        builder.add_arrays(a["arrays"], a["masks"], a["present"], a["examples"])
        return builder.finish()
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir() or p.suffix == ".parquet":
            return build(
                trainer,
                model,
                load_embeddings(p),
                dir=dir,
                batch=batch,
                progress=progress,
                what=what,
            )
        rows = read_jsonl(p)
        origin = p.name
    else:
        rows = [_check_row(r, "rows", i, None) for i, r in enumerate(source)]
        origin = "rows"
        if not rows:
            raise _error(origin, None, None, "no rows")
    builder = trainer.builder(origin, None if dir is None else str(dir))
    bar = Progress(len(rows), unit="rows", enabled=progress, desc=f"encoding {what}")
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            inputs = [{m: r[m] for m in MODALITIES if m in r} for r in chunk]
            builder.add_rows(model, inputs, [_example(r) for r in chunk], start)
            bar.update(len(chunk))
    finally:
        bar.close()
    return builder.finish()
