"""``mlmf.Trainer``: trains a model's fusion, attention pairs, adapters and objective
heads on its frozen encoders' outputs (docs/training.md). The loop runs in the Rust
core; this class reads the data, shows progress and draws the curves."""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import mlmf
from mlmf import _mlmf
from mlmf._progress import Progress
from mlmf.train import data as _data
from mlmf.train.objectives import Objective, from_config, needs_adapters

_UNSET: Any = object()

# Settings and their defaults (the `[train]` table's, docs/configuration.md).
DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 0.05,
    "weight_decay": 0.01,
    "clip_grad_norm": 1.0,
    "modality_dropout": 0.0,
    "stages": None,
    "early_stopping": None,
    "val_fraction": 0.0,
    "seed": 0,
    "checkpoint_every": None,
    "schedule": "cosine",
    "shuffle": True,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "encode_batch_size": 32,
}

ModelOrConfig = Union["mlmf.MultiModalModel", "mlmf.MultiModalConfig", dict, str, os.PathLike]


def _config_dict(source: Any) -> tuple[dict[str, Any], Optional[Path]]:
    """The config as a dict, and the trained-model folder it came from (if one)."""
    if isinstance(source, mlmf.MultiModalConfig):
        return source.to_dict(), None
    if isinstance(source, dict):
        return mlmf.MultiModalConfig.from_dict(source).to_dict(), None
    p = Path(source)
    folder = p if p.is_dir() else None
    return mlmf.MultiModalConfig.from_file(p).to_dict(), folder


class Trainer:
    """Trains what a multimodal model learns on top of its encoders.

    >>> trainer = mlmf.Trainer("mlmf.toml", objectives=[mlmf.Contrastive("text", "image"),
    ...                        mlmf.Classify(num_classes=10)], epochs=20, batch_size=256)
    >>> history = trainer.fit("train.jsonl", val="val.jsonl", out="runs/exp1")
    >>> trainer.evaluate("test.jsonl")          # {"accuracy": ..., "text->image R@1": ...}
    >>> model = mlmf.MultiModalModel.load("runs/exp1")

    ``model_or_config``: a loaded ``MultiModalModel``, a ``MultiModalConfig``, a dict, a
    config file, or a trained model's folder (its objectives and heads come with it, for
    ``evaluate``). Settings not given come from the config's ``[train]`` table, then
    from the defaults. ``adapters``: the adapters' width (``int``) or table (``dict``);
    by default a config without adapters gets ``dim = fusion.out_dim`` (256 when unset)
    when an objective aligns modalities. ``warmup``: a fraction of the steps (< 1) or a
    number of steps.
    """

    def __init__(
        self,
        model_or_config: ModelOrConfig,
        objectives: Optional[Sequence[Objective]] = None,
        *,
        epochs: int = _UNSET,
        batch_size: int = _UNSET,
        lr: float = _UNSET,
        warmup: Union[float, int] = _UNSET,
        weight_decay: float = _UNSET,
        clip_grad_norm: Optional[float] = _UNSET,
        modality_dropout: float = _UNSET,
        stages: Optional[Sequence[dict]] = _UNSET,
        early_stopping: Optional[Union[str, dict]] = _UNSET,
        patience: int = 3,
        val_fraction: float = _UNSET,
        seed: int = _UNSET,
        checkpoint_every: Optional[int] = _UNSET,
        schedule: str = _UNSET,
        shuffle: bool = _UNSET,
        betas: tuple[float, float] = _UNSET,
        eps: float = _UNSET,
        encode_batch_size: int = _UNSET,
        adapters: Union[None, int, dict] = None,
        progress: bool = True,
    ) -> None:
        given = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "clip_grad_norm": clip_grad_norm,
            "modality_dropout": modality_dropout,
            "stages": stages,
            "early_stopping": early_stopping,
            "val_fraction": val_fraction,
            "seed": seed,
            "checkpoint_every": checkpoint_every,
            "schedule": schedule,
            "shuffle": shuffle,
            "betas": betas,
            "eps": eps,
            "encode_batch_size": encode_batch_size,
        }
        self.progress = progress
        run_dir: Optional[Path] = None
        if isinstance(model_or_config, mlmf.MultiModalModel):
            model: Optional[mlmf.MultiModalModel] = model_or_config
            config = model_or_config.config.to_dict()
        else:
            model = None
            config, run_dir = _config_dict(model_or_config)
        section = dict(config.get("train") or {})
        if objectives is None:
            objectives = [from_config(o) for o in section.get("objectives", [])]
        objectives = list(objectives)
        if not objectives:
            raise mlmf.ConfigError(
                "Trainer: no objectives (pass objectives=[mlmf.Contrastive('text', 'image'), "
                "...] or give the config a [train] table with objectives)"
            )
        settings = {k: section.get(k, v) for k, v in DEFAULTS.items()}
        settings.update({k: v for k, v in given.items() if v is not _UNSET})
        train = self._train_table(objectives, settings, patience)
        if model is None:
            if needs_adapters(objectives) and not config.get("adapters") and adapters is None:
                fusion = config.setdefault("fusion", {})
                dim = fusion.get("out_dim") or 256
                fusion["out_dim"] = dim
                config["adapters"] = {"dim": dim}
            elif isinstance(adapters, int):
                config["adapters"] = {"dim": adapters}
            elif isinstance(adapters, dict):
                config["adapters"] = dict(adapters)
            config["train"] = train
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the weights are about to be trained
                model = mlmf.MultiModalModel.load(config)
        elif adapters is not None:
            raise mlmf.ConfigError(
                "Trainer: adapters= goes with a config; a loaded model keeps its own"
            )
        # The model the data is encoded with (its caches serve every epoch and evaluate).
        self._base: mlmf.MultiModalModel = model
        self._trained: Optional[mlmf.MultiModalModel] = None
        self.objectives = objectives
        self.settings = train
        self._core = _mlmf._Trainer(model, train)
        if run_dir is not None and (run_dir / "heads.safetensors").is_file():
            self._core.load_heads(str(run_dir / "heads.safetensors"))
        for pair in self._core.untrained_pairs:
            warnings.warn(
                f"the {pair} attention pair has no objective: it keeps its weights "
                f"(add mlmf.Contrastive({pair!r}) to train it)",
                stacklevel=2,
            )
        self.history: list[dict[str, Any]] = []
        self.out: Optional[Path] = None

    @staticmethod
    def _train_table(
        objectives: list[Objective], s: dict[str, Any], patience: int
    ) -> dict[str, Any]:
        t: dict[str, Any] = {"objectives": [o.to_config() for o in objectives]}
        for k in (
            "epochs",
            "batch_size",
            "lr",
            "weight_decay",
            "modality_dropout",
            "val_fraction",
            "seed",
            "schedule",
            "shuffle",
            "eps",
            "encode_batch_size",
        ):
            t[k] = s[k]
        t["betas"] = list(s["betas"])
        w = s["warmup"]
        if isinstance(w, int) and not isinstance(w, bool) and w >= 1:
            t["warmup_steps"] = w
            t["warmup"] = 0.0
        else:
            t["warmup"] = float(w)
        for k in ("clip_grad_norm", "checkpoint_every"):
            if s[k] is not None:
                t[k] = s[k]
        if s["stages"]:
            t["stages"] = [dict(st) for st in s["stages"]]
        es = s["early_stopping"]
        if isinstance(es, str):
            t["early_stopping"] = {"metric": es, "patience": patience}
        elif es:
            t["early_stopping"] = dict(es)
        return t

    @property
    def model(self) -> mlmf.MultiModalModel:
        """The trained model (loaded from ``out``) after ``fit``; before, the model
        training starts from."""
        if self._trained is None and self.out is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pairs without an objective were warned about
                self._trained = mlmf.MultiModalModel.load(self.out)
        return self._trained or self._base

    @property
    def base_model(self) -> mlmf.MultiModalModel:
        """The model whose encoders (and caches) encode the data."""
        return self._base

    def _dataset(self, source: Any, what: str, folder: Optional[Path]) -> Any:
        return _data.build(
            self._core,
            self._base,
            source,
            dir=folder,
            batch=int(self.settings["encode_batch_size"]),
            progress=self.progress,
            what=what,
        )

    def fit(
        self,
        data: _data.Source,
        val: Optional[_data.Source] = None,
        out: Union[str, os.PathLike, None] = None,
        *,
        resume: bool = False,
        callback: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> list[dict[str, Any]]:
        """Encodes the data once (through the model's caches), trains, validates each
        epoch and writes the best model to ``out`` (``MultiModalModel.load(out)``
        loads it), with ``history.json``, ``curves.png`` (with the ``viz`` extra) and a
        checkpoint; ``resume=True`` continues the run in ``out``. ``callback(event)``
        sees every step (``{"event": "step", "epoch", "step", "total_steps", "loss",
        "lr", "items_per_second", "stage"}``) and epoch (its history entry); an exception
        it raises stops the run, keeping the last checkpoint. Returns the history: one
        dict per epoch."""
        if out is None:
            out = Path("runs") / time.strftime("mlmf-%Y%m%d-%H%M%S")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        scratch = out / ".data"
        try:
            train = self._dataset(data, "training data", scratch / "train")
            valset = None if val is None else self._dataset(val, "validation data", scratch / "val")
            history = self._run(train, valset, out, resume, callback)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.history = history
        self.out = out
        self._trained = None
        try:
            from mlmf.viz import training_curves

            training_curves(history, out / "curves.png")
        except ImportError:
            pass
        return history

    def _run(
        self,
        train: Any,
        val: Any,
        out: Path,
        resume: bool,
        callback: Optional[Callable[[dict[str, Any]], None]],
    ) -> list[dict[str, Any]]:
        bar: Optional[Progress] = None

        def on_event(e: dict[str, Any]) -> None:
            nonlocal bar
            if callback is not None:
                callback(e)
            if not self.progress:
                return
            if e["event"] == "step":
                if bar is None:
                    bar = Progress(e["total_steps"], unit="steps", desc="training")
                    bar.done = e["step"] - 1
                stage = f" {e['stage']}" if e.get("stage") else ""
                bar.note(
                    f"epoch {e['epoch'] + 1}/{e['epochs']}{stage} loss {e['loss']:.4f} "
                    f"lr {e['lr']:.2e} {e['items_per_second']:.0f} items/s"
                )
                bar.update(1)
            else:
                shown = {k: v for k, v in e["val"].items() if "/" not in k and "@5" not in k}
                vals = ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())[:6])
                mark = " (best)" if e["best"] and e["val"] else ""
                msg = f"epoch {e['epoch'] + 1}: train loss {e['train_loss']:.4f}"
                if vals:
                    msg += f"; val {vals}{mark}"
                if bar is not None:
                    bar.note(msg)
                    bar.last = -1e9  # show the epoch's line now
                    bar.update(0)
                    if bar.tty:
                        print(file=sys.stderr)

        try:
            return self._core.fit(train, str(out), val, resume, on_event)
        finally:
            if bar is not None:
                bar.close()

    def evaluate(self, data: _data.Source) -> dict[str, float]:
        """Every metric on ``data`` (same forms as ``fit``): ``loss``, ``accuracy``,
        ``macro_f1``, ``mse``, ``text->image R@1`` ... (docs/training.md)."""
        d = self._dataset(data, "evaluation data", None)
        return {k: float(v) for k, v in self._core.evaluate(d).items()}

    @property
    def tensors(self) -> list[tuple[str, list[int], bool]]:
        """``(name, shape, trained)`` of every tensor the run holds."""
        return self._core.tensors

    def __repr__(self) -> str:
        objs = ", ".join(type(o).__name__ for o in self.objectives)
        return f"Trainer({self.model!r}, objectives=[{objs}])"
