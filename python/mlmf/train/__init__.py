"""Training of the fusion, attention pairs, adapters and objective heads
(docs/training.md): ``mlmf.Trainer`` with the objectives ``mlmf.Contrastive``,
``mlmf.Classify`` and ``mlmf.Regress``."""

from mlmf.train.data import load_embeddings, read_jsonl
from mlmf.train.objectives import Classify, Contrastive, Regress
from mlmf.train.trainer import Trainer

__all__ = ["Classify", "Contrastive", "Regress", "Trainer", "load_embeddings", "read_jsonl"]
