"""Where a modality's replicas go: node selectors from the config turned into Ray actor
options, checked against the nodes the cluster has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import mlmf

# A replica that asks for a custom resource takes this much of it, so that several
# replicas fit on a node that offers one unit.
RESOURCE_SHARE = 0.01


@dataclass
class Plan:
    """One modality's replicas: how many, what each asks for, where each may go."""

    modality: str
    replicas: int
    num_cpus: float
    num_gpus: float
    memory: Optional[int]
    max_in_flight: int
    # One entry per replica: Ray options that place it (label_selector or resources).
    placements: list[dict[str, Any]] = field(default_factory=list)
    selectors: list[str] = field(default_factory=list)


def parse_selector(selector: str) -> tuple[str, Optional[str]]:
    """``key=value`` -> (key, value): a node label; ``name`` -> (name, None): a custom
    resource."""
    if "=" in selector:
        key, value = (s.strip() for s in selector.split("=", 1))
        if not key or not value:
            raise mlmf.ConfigError(f"node selector {selector!r}: expected key=value or a name")
        return key, value
    return selector.strip(), None


def node_matches(node: dict, selector: str) -> bool:
    key, value = parse_selector(selector)
    if value is None:
        return float(node.get("Resources", {}).get(key, 0)) > 0
    return node.get("Labels", {}).get(key) == value


def alive_nodes(ray: Any) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _describe_nodes(nodes: list[dict]) -> str:
    parts = []
    for n in nodes:
        labels = {k: v for k, v in n.get("Labels", {}).items() if not k.startswith("ray.io/")}
        res = sorted(
            k for k in n.get("Resources", {}) if not k.startswith(("node:", "accelerator_type"))
        )
        parts.append(f"{n['NodeID'][:8]} labels={labels} resources={res}")
    return "; ".join(parts) or "none"


def plans(config: dict, ray: Any) -> list[Plan]:
    """The replica plan of every enabled modality, checked against the cluster: a
    selector that matches no alive node raises ``mlmf.DistributedError`` at once
    (Ray would leave such an actor pending forever)."""
    dist = config.get("distributed") or {}
    sharding = dist.get("sharding", {"strategy": "replicated"})
    modalities = [m for m, c in config.get("modalities", {}).items() if c.get("enabled", True)]
    nodes = alive_nodes(ray)
    out = []
    for m in modalities:
        if sharding.get("strategy") == "modality_specific":
            a = sharding["modality_assignments"].get(m)
            if a is None:
                raise mlmf.ConfigError(
                    f"invalid config at `distributed.sharding.modality_assignments`: "
                    f"modality `{m}` has no node assignment"
                )
            plan = Plan(
                modality=m,
                replicas=int(a.get("replicas", 1)),
                num_cpus=float(a.get("num_cpus", 1.0)),
                num_gpus=float(a.get("num_gpus", 0.0)),
                memory=_bytes(a.get("memory")),
                max_in_flight=int(a.get("max_in_flight", 4)),
                selectors=list(a["selectors"]),
            )
            usable = [s for s in plan.selectors if any(node_matches(n, s) for n in nodes)]
            if not usable:
                raise mlmf.DistributedError(
                    f"{m}: no alive node matches the selectors {plan.selectors} "
                    f"(`key=value` is a node label, a bare name a custom resource); "
                    f"the cluster's nodes: {_describe_nodes(nodes)}"
                )
            for r in range(plan.replicas):
                key, value = parse_selector(usable[r % len(usable)])
                if value is None:
                    plan.placements.append({"resources": {key: RESOURCE_SHARE}})
                else:
                    plan.placements.append({"label_selector": {key: value}})
        else:
            replicas = int(sharding.get("replicas", 1))
            plan = Plan(
                modality=m,
                replicas=replicas,
                num_cpus=1.0,
                num_gpus=0.0,
                memory=None,
                max_in_flight=4,
                placements=[{} for _ in range(replicas)],
            )
        out.append(plan)
    return out


def _bytes(v: Any) -> Optional[int]:
    """A config byte size (``"2 GiB"`` or an int) as an int."""
    if v is None or isinstance(v, int):
        return v
    units = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}
    num, _, unit = str(v).strip().partition(" ")
    return int(float(num) * units.get(unit.lower() or "b", 1))
