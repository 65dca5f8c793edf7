"""A Ray cluster of labelled nodes simulated on this machine (``ray.cluster_utils``),
for examples, tests and benchmarks of ``mlmf.distributed``."""

from __future__ import annotations

import os
from typing import Any, Optional

# Settings that make a lost node noticed within about 2 s instead of about 20 s.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
    "health_check_initial_delay_ms": 0,
}

OBJECT_STORE = 100 * 2**20


def simulated_cluster(
    nodes: list[dict[str, Any]],
    *,
    system_config: Optional[dict] = None,
    node_memory: int = 2 * 2**30,
    connect: bool = True,
    logging_level: Optional[str] = None,
) -> tuple[Any, list[Any]]:
    """Starts a head with no CPUs (it runs no replica) and one 1-CPU node per entry of
    ``nodes`` (keyword arguments of ``Cluster.add_node``: ``labels``, ``resources``,
    ...), each with ``node_memory`` and a 100 MiB object store (a simulated node
    otherwise claims most of the machine). Connects this process when ``connect``.
    Returns the cluster and its added nodes."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every simulated node's memory monitor would see the whole machine's memory.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    import ray
    from ray.cluster_utils import Cluster

    head: dict[str, Any] = dict(
        num_cpus=0, include_dashboard=False, object_store_memory=OBJECT_STORE
    )
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    added = [cluster.add_node(**node_args(node_memory), **n) for n in nodes]
    if connect:
        kwargs = {"logging_level": logging_level} if logging_level else {}
        ray.init(address=cluster.address, **kwargs)
    return cluster, added


def node_args(memory: int = 2 * 2**30) -> dict[str, Any]:
    """What every simulated node gets: one CPU, ``memory``, a 100 MiB object store."""
    return dict(num_cpus=1, memory=memory, object_store_memory=OBJECT_STORE)
