"""mlmf on a Ray cluster: each modality's encoders on the nodes suited to them
(docs/distributed.md). Needs the ``ray`` extra."""

from mlmf.distributed.model import DistributedModel, DistributedOutput, ModalityWorker
from mlmf.distributed.placement import Plan, plans

__all__ = ["DistributedModel", "DistributedOutput", "ModalityWorker", "Plan", "plans"]
