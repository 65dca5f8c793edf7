"""mlmf on a Ray cluster: each modality's encoders on the nodes suited to them
(docs/distributed.md). Needs the ``ray`` extra."""

from mlmf.distributed.batch import read_output, run_batch
from mlmf.distributed.model import (
    DistributedModel,
    DistributedOutput,
    ModalityWorker,
    build_fusion,
)
from mlmf.distributed.placement import Plan, plans

__all__ = [
    "DistributedModel",
    "DistributedOutput",
    "ModalityWorker",
    "Plan",
    "build_fusion",
    "plans",
    "read_output",
    "run_batch",
]
