"""The objectives ``mlmf.Trainer`` optimises (docs/training.md, "Objectives")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import mlmf

_LOSSES = ("infonce", "sigmoid")


@dataclass(frozen=True)
class Contrastive:
    """Align two sides over the batch: row ``i`` of one with row ``i`` of the other,
    every other row a negative.

    - ``Contrastive("text", "image")``: the two modalities' adapter outputs (the
      adapters train; ``mlmf.Trainer`` adds adapters when the config has none);
    - ``Contrastive("fused", "audio")``: the fused vector computed without audio
      against audio's adapter output;
    - ``Contrastive("text->image")``: a configured attention pair; text tokens score
      image items through the pair's attention (the pair trains).

    ``loss``: ``"infonce"`` (CLIP's symmetric InfoNCE) or ``"sigmoid"`` (SigLIP);
    ``temperature`` is the initial one (0.07 / 0.1), learned unless
    ``learn_temperature=False``; ``bias`` the sigmoid loss's initial bias (-10).
    """

    a: str
    b: Optional[str] = None
    loss: str = "infonce"
    weight: float = 1.0
    temperature: Optional[float] = None
    bias: Optional[float] = None
    learn_temperature: bool = True
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.loss not in _LOSSES:
            raise mlmf.ConfigError(
                f"Contrastive: loss {self.loss!r} is not one of {', '.join(_LOSSES)}"
            )
        if self.b is None and "->" not in self.a:
            raise mlmf.ConfigError(
                f"Contrastive({self.a!r}): name two sides (Contrastive('text', 'image')) or an "
                "attention pair (Contrastive('text->image'))"
            )

    @property
    def is_pair(self) -> bool:
        return self.b is None

    def sides(self) -> list[str]:
        """The sides (or the pair's two modalities)."""
        if self.b is None:
            return [s.strip() for s in self.a.split("->")]
        return [self.a, self.b]

    def to_config(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "contrastive",
            "loss": self.loss,
            "weight": self.weight,
            "learn_temperature": self.learn_temperature,
        }
        if self.b is None:
            d["pair"] = self.a
        else:
            d["between"] = [self.a, self.b]
        for k in ("temperature", "bias", "name"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass(frozen=True)
class Classify:
    """Classification of the fused vector over ``num_classes`` (a linear head,
    cross-entropy against each row's integer ``label``)."""

    num_classes: int
    weight: float = 1.0

    def to_config(self) -> dict[str, Any]:
        return {"type": "classify", "num_classes": self.num_classes, "weight": self.weight}


@dataclass(frozen=True)
class Regress:
    """Regression from the fused vector to each row's ``target`` (``dim`` values; a
    linear head, mean squared error)."""

    dim: int = 1
    weight: float = 1.0

    def to_config(self) -> dict[str, Any]:
        return {"type": "regress", "dim": self.dim, "weight": self.weight}


Objective = Union[Contrastive, Classify, Regress]


def from_config(d: dict[str, Any]) -> Objective:
    """The objective a ``[train]`` table entry describes."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind == "contrastive":
        pair = d.pop("pair", None)
        between = d.pop("between", None)
        a, b = (pair, None) if pair else (between[0], between[1])
        return Contrastive(a, b, **d)
    if kind == "classify":
        return Classify(**d)
    if kind == "regress":
        return Regress(**d)
    raise mlmf.ConfigError(f"unknown objective type {kind!r}: contrastive, classify or regress")


def needs_adapters(objectives: list[Objective]) -> bool:
    """Whether an objective aligns modalities' vectors (which adapters carry)."""
    return any(isinstance(o, Contrastive) and not o.is_pair for o in objectives)
