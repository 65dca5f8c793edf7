"""Offline batch jobs on Ray Data: a table of rows (text, image / audio / video paths)
through one ``map_batches`` stage per modality, each placed on the nodes its
assignment selects, then a fusion stage; fused embeddings written to Parquet in
chunks, so that a rerun after an interruption skips what is already written."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

import mlmf
from mlmf.distributed.model import (
    MODALITIES,
    _canonical,
    _ray,
    build_fusion,
    config_dict,
    worker_config,
)
from mlmf.distributed.placement import plans

CHUNK_PREFIX = "part-"


class _EncodeStage:
    """A Ray Data stage: one modality's pooled embeddings for a batch of rows
    (``emb_<modality>``, NaN for rows without the modality)."""

    def __init__(self, modality: str, config: dict) -> None:
        warnings.simplefilter("ignore")
        self.modality = modality
        self.model = mlmf.MultiModalModel.load(config)
        self.width = self.model.encoders[modality][2]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = batch[self.modality]
        n = len(values)
        out = np.full((n, self.width), np.nan, dtype=np.float32)
        present = [i for i, v in enumerate(values) if isinstance(v, str) and v]
        if present:
            items = [str(values[i]) for i in present]
            res = self.model.infer(**{self.modality: items})
            out[present] = res.embeddings[self.modality]
        batch[f"emb_{self.modality}"] = out
        return batch


class _FuseStage:
    """A Ray Data stage: the fused embedding of each row from its modalities'
    embeddings (rows are grouped by which modalities they carry)."""

    def __init__(self, config: dict, widths: dict[str, int]) -> None:
        infos = {m: {"hidden_size": w, "output_dim": w} for m, w in widths.items()}
        self.fusion, _, self.order, level = build_fusion(config, infos)
        if level == "tokens":
            raise mlmf.ConfigError(
                "invalid config at `fusion.inputs`: batch jobs fuse pooled embeddings; "
                '`early` / `middle` fusion needs inputs = "pooled" here'
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embs = {m: batch[f"emb_{m}"] for m in self.order if f"emb_{m}" in batch}
        n = len(next(iter(embs.values())))
        present = {m: ~np.isnan(e).any(axis=1) for m, e in embs.items()}
        fused = None
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in range(n):
            key = tuple(m for m in self.order if m in present and present[m][i])
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            if not key:
                raise mlmf.MissingModalityError(f"row {batch['id'][rows[0]]}: no modality given")
            out = self.fusion({m: embs[m][rows] for m in key})
            if fused is None:
                fused = np.zeros((n, out.fused.shape[1]), np.float32)
            fused[rows] = out.fused
        batch["fused"] = fused
        return batch


def _done_ids(out_dir: Path) -> set:
    """Ids already written: every complete chunk file in ``out_dir``."""
    import pyarrow.parquet as pq

    done: set = set()
    for f in sorted(out_dir.glob(f"{CHUNK_PREFIX}*.parquet")):
        done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return done


def _write_chunk(out_dir: Path, index: int, batch: dict[str, np.ndarray]) -> Path:
    """One Parquet file, written under a temporary name and renamed into place, so a
    file with the final name is always complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {"id": pa.array(list(batch["id"]))}
    for name, v in batch.items():
        if name.startswith("emb_") or name == "fused":
            arr = np.asarray(v, dtype=np.float32)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    table = pa.table(cols)
    final = out_dir / f"{CHUNK_PREFIX}{index:06d}.parquet"
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def _rows(source: Union[str, os.PathLike, Iterable[dict]]) -> list[dict]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix == ".parquet" or p.is_dir():
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        with open(p, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(source)


def run_batch(
    config: Union[mlmf.MultiModalConfig, str, os.PathLike, dict],
    rows: Union[str, os.PathLike, Iterable[dict]],
    output: Union[str, os.PathLike],
    *,
    batch_size: int = 32,
    chunk_rows: int = 100,
    max_chunks: Optional[int] = None,
) -> dict[str, int]:
    """Embeds ``rows`` (dicts, a JSONL file or a Parquet file/folder; keys ``id`` and
    any of ``text``, ``image``, ``audio``, ``video``, the media as paths every node can
    open) and writes ``id``, ``emb_<modality>`` and ``fused`` to Parquet files in the
    folder ``output``, ``chunk_rows`` rows per file. Rows whose id is already written
    there are skipped, so a rerun after an interruption continues where it stopped.
    ``max_chunks`` stops after writing that many files (for tests and trial runs).
    Returns ``{"rows": total, "skipped": already written, "written": now}``."""
    ray = _ray()
    cfg = config_dict(config)
    if not ray.is_initialized():
        ray.init(address="auto")
    import ray.data

    all_rows = _rows(rows)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{CHUNK_PREFIX}*.tmp-*"):
        stale.unlink()  # left by an interrupted write
    done = _done_ids(out_dir)
    seen: set = set()
    todo = []
    for i, r in enumerate(all_rows):
        if "id" not in r:
            raise mlmf.InputError(f"row {i}: every row needs an `id` (to resume by)")
        if r["id"] in seen:
            raise mlmf.InputError(f"row {i}: id {r['id']!r} is used twice")
        seen.add(r["id"])
        unknown = set(r) - {*MODALITIES, "id"}
        if unknown:
            raise mlmf.InputError(f"row {i}: unknown keys {sorted(unknown)}")
        if r["id"] not in done:
            todo.append(r)
    result = {"rows": len(all_rows), "skipped": len(all_rows) - len(todo), "written": 0}
    if not todo:
        return result
    used = [m for m in sorted({k for r in todo for k in r if k != "id"}, key=_canonical)]
    have = set(cfg.get("modalities", {}))
    if set(used) - have:
        raise mlmf.InputError(
            f"rows carry {sorted(set(used) - have)}, which the model does not have"
        )
    # Every column present in every row (None where a row lacks the modality).
    table = [{"id": r["id"], **{m: r.get(m) for m in used}} for r in todo]
    ds = ray.data.from_items(table)
    widths = {}
    for plan in plans(cfg, ray):
        m = plan.modality
        if m not in used:
            continue
        worker_cfg = worker_config(cfg, plan)
        placement = plan.placements[0] if plan.placements else {}
        ds = ds.map_batches(
            _EncodeStage,
            fn_constructor_args=(m, worker_cfg),
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=plan.replicas,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
            runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(max(1, int(plan.num_cpus or 1)))}},
            **placement,
        )
        widths[m] = _width(cfg, m)
    ds = ds.map_batches(
        _FuseStage,
        fn_constructor_args=(cfg, widths),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
        num_cpus=0,
    )
    index = _next_index(out_dir)
    written = chunks = 0
    for chunk in ds.iter_batches(batch_size=chunk_rows, batch_format="numpy"):
        _write_chunk(out_dir, index, chunk)
        index += 1
        chunks += 1
        written += len(chunk["id"])
        if max_chunks is not None and chunks >= max_chunks:
            break
    result["written"] = written
    return result


def _width(cfg: dict, modality: str) -> int:
    """The pooled width of ``modality``'s encoder, read in the driver."""
    m = cfg["modalities"][modality]
    if m.get("dim"):
        return int(m["dim"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = mlmf.Encoder.from_pretrained(m["model"], modality=modality)
    return enc.output_dim


def _next_index(out_dir: Path) -> int:
    names = [f.stem for f in out_dir.glob(f"{CHUNK_PREFIX}*.parquet")]
    return 1 + max((int(n[len(CHUNK_PREFIX) :]) for n in names), default=-1)


def read_output(output: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """The Parquet files of ``run_batch`` as arrays: ``id``, ``fused`` ``[N, D]`` and
    ``emb_<modality>`` (NaN rows where a row had no such input), sorted by id order of
    the files."""
    import pyarrow.parquet as pq

    files = sorted(Path(output).glob(f"{CHUNK_PREFIX}*.parquet"))
    if not files:
        return {}
    tables = [pq.read_table(f) for f in files]
    out: dict[str, Any] = {"id": np.array([x for t in tables for x in t.column("id").to_pylist()])}
    names = {n for t in tables for n in t.column_names if n != "id"}
    for n in sorted(names):
        parts = []
        for t in tables:
            if n in t.column_names:
                col = t.column(n).combine_chunks()
                parts.append(np.asarray(col.flatten()).reshape(len(col), -1))
            else:
                parts.append(np.full((t.num_rows, 0), np.nan, np.float32))
        width = max(p.shape[1] for p in parts)
        out[n] = np.concatenate(
            [
                p if p.shape[1] == width else np.full((len(p), width), np.nan, np.float32)
                for p in parts
            ]
        )
    return out
