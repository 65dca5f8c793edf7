"""``DistributedModel``: a multimodal model whose encoders run as Ray actors on the nodes
each modality is assigned to; the fusion runs in the driver."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

import mlmf
from mlmf.distributed.placement import Plan, plans

MODALITIES = ("text", "image", "audio", "video")
# Errors that mean the replica (or its node) went away, not that the request was bad.
_LOST = (
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "ActorUnschedulableError",
    "NodeDiedError",
    "OwnerDiedError",
    "ObjectLostError",
    "WorkerCrashedError",
)


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise mlmf.DistributedError("mlmf.distributed needs Ray: pip install 'mlmf[ray]'") from e
    return ray


class ModalityWorker:
    """One replica: a one-modality model (processor, encoder, cache) in a Ray actor."""

    def __init__(self, modality: str, config: dict) -> None:
        warnings.simplefilter("ignore")  # the placeholder fusion is untrained by design
        self.modality = modality
        self.model = mlmf.MultiModalModel.load(config)

    def info(self) -> dict:
        import ray

        (kind, hidden, pooled) = self.model.encoders[self.modality]
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "model_type": kind,
            "hidden_size": hidden,
            "output_dim": pooled,
            "threads": os.environ.get("RAYON_NUM_THREADS"),
        }

    def encode(self, items: list, ids: Optional[list], tokens: bool, kwargs: dict) -> dict:
        out = self.model.infer(
            **{self.modality: items},
            ids={self.modality: ids} if ids else None,
            return_tokens=tokens,
            **kwargs,
        )
        res = {
            "pooled": out.embeddings[self.modality],
            "stats": out.stats["modalities"][self.modality],
        }
        if tokens:
            t = out.tokens[self.modality]
            res["hidden_states"], res["mask"] = t["hidden_states"], t["mask"]
        return res

    def stats(self) -> dict:
        return self.model.stats()


@dataclass
class DistributedOutput:
    """What ``DistributedModel.infer`` returns: the fields of ``mlmf.MultiModalOutput``."""

    embeddings: dict[str, np.ndarray]
    fused: np.ndarray
    gates: Optional[dict[str, np.ndarray]]
    attention: dict[str, np.ndarray]
    tokens: dict[str, dict[str, np.ndarray]]
    skipped: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Replica:
    handle: Any
    plan: Plan
    index: int
    in_flight: int = 0
    node_id: str = ""


@dataclass
class _Part:
    """One modality of one request, as sent to a replica."""

    request: int
    modality: str
    items: list
    ids: Optional[list]
    kwargs: dict
    attempts: int = 0
    replica: Optional[_Replica] = None
    ref: Any = None
    result: Optional[dict] = None


def config_dict(config: Union[mlmf.MultiModalConfig, str, os.PathLike, dict]) -> dict:
    """A config (object, file path or dict), validated, as plain data."""
    if isinstance(config, dict):
        config = mlmf.MultiModalConfig.from_dict(config)
    elif not isinstance(config, mlmf.MultiModalConfig):
        config = mlmf.MultiModalConfig.from_file(config)
    return config.to_dict()


def worker_config(config: dict, plan: Plan) -> dict:
    """The config of one replica: its modality alone (a placeholder fusion), the cache
    settings, and ``cuda`` when it has a GPU and mlmf was built with CUDA."""
    device = config.get("device", "cpu")
    if plan.num_gpus > 0 and mlmf.CUDA_COMPILED:
        device = "cuda"
    return {
        "modalities": {plan.modality: config["modalities"][plan.modality]},
        "fusion": {"strategy": "late"},
        "cache": config.get("cache", {}),
        "device": device,
        "dtype": config.get("dtype", "float32"),
    }


def build_fusion(config: dict, infos: dict[str, dict]) -> tuple[Any, list, list[str], str]:
    """The fusion and attention layers a local ``MultiModalModel`` with this config
    builds, from the encoders' widths (``infos[m]``: ``hidden_size``, ``output_dim``):
    ``(fusion, [(query, key, layer)], modality order, input level)``."""
    fcfg = dict(config.get("fusion") or {"strategy": "gated"})
    strategy = fcfg.pop("strategy")
    out_dim = fcfg.pop("out_dim", None)
    weights = fcfg.pop("weights", None)
    seed = int(fcfg.pop("seed", 0))
    required = fcfg.pop("required", None)
    level = fcfg.pop("inputs", None) or ("tokens" if strategy in ("early", "middle") else "pooled")
    width = "hidden_size" if level == "tokens" else "output_dim"
    # The local model's order (text, image, audio, video, custom:N): the seeded
    # initialisation and the weight names depend on it.
    order = sorted(infos, key=_canonical)
    dims = {m: infos[m][width] for m in order}
    acfg = dict(config.get("cross_modal_attention") or {})
    pair_names = acfg.pop("pairs", [])
    att_weights = acfg.pop("weights", None)
    att_seed = int(acfg.pop("seed", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fusion = mlmf.Fusion(
            strategy,
            dims,
            out_dim or max(dims.values()),
            weights=weights,
            seed=seed,
            required=required,
            **fcfg,
        )
        pairs = []
        for i, pair in enumerate(pair_names):
            q, k = (s.strip() for s in pair.split("->"))
            layer = mlmf.CrossModalAttention(
                infos[q]["hidden_size"],
                kv_dim=infos[k]["hidden_size"],
                weights=(Path(att_weights) / f"{q}-{k}.safetensors") if att_weights else None,
                seed=att_seed + i,
                query_modality=q,
                kv_modality=k,
                **acfg,
            )
            pairs.append((q, k, layer))
    return fusion, pairs, order, level


def _read_items(modality: str, items: Any, send_bytes: bool) -> list:
    """A modality's items as they travel: texts as str, files as their bytes (or paths),
    arrays as NumPy arrays."""
    if isinstance(items, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(
        items, (list, tuple)
    ):
        items = [items]
    out = []
    for i, it in enumerate(items):
        if modality != "text" and isinstance(it, (str, os.PathLike)):
            p = Path(it)
            if send_bytes and p.is_file():
                try:
                    out.append(p.read_bytes())
                except OSError as e:
                    raise mlmf.InputError(f"{modality} input {i}: cannot read {p}: {e}") from e
                continue
            out.append(str(p))
        else:
            out.append(it)
    return out


@dataclass
class Fuser:
    """The fusion and attention layers a local ``MultiModalModel`` with a config builds
    (``build_fusion``), run on per-modality encodings computed elsewhere: Ray actors,
    Ray Serve deployments. Each result is a modality's ``{"pooled", "stats"}`` and,
    when tokens were asked for, ``"hidden_states"`` and ``"mask"``."""

    fusion: Any
    pairs: list
    order: list[str]
    level: str

    @classmethod
    def build(cls, config: dict, infos: dict[str, dict]) -> Fuser:
        return cls(*build_fusion(config, infos))

    def wants_tokens(self, return_tokens: bool, return_attention: bool) -> bool:
        """Whether the encoders must send token states back."""
        return return_tokens or self.level == "tokens" or (return_attention and bool(self.pairs))

    def fuse(
        self,
        results: dict[str, dict],
        skipped: list[str],
        return_attention: bool,
        return_tokens: bool,
        attempts: Optional[dict[str, int]] = None,
    ) -> DistributedOutput:
        t0 = time.perf_counter()
        embeddings = {m: r["pooled"] for m, r in results.items()}
        tokens = {
            m: {"hidden_states": r["hidden_states"], "mask": r["mask"]}
            for m, r in results.items()
            if "hidden_states" in r
        }
        sizes = {m: len(e) for m, e in embeddings.items()}
        if len(set(sizes.values())) > 1:
            first = min(sizes)
            other = next(m for m in sizes if sizes[m] != sizes[first])
            raise mlmf.InputError(
                f"{other} input: {sizes[other]} items, but {first} has {sizes[first]}: "
                "every modality of a call needs one item per row"
            )
        if self.level == "tokens":
            inputs = {m: (t["hidden_states"], t["mask"]) for m, t in tokens.items()}
        else:
            inputs = dict(embeddings)
        out = self.fusion(inputs, return_attention=return_attention)
        attention = {f"fusion/{k}": v for k, v in out.attention.items()}
        if return_attention:
            for q, k, layer in self.pairs:
                if q in tokens and k in tokens:
                    _, w = layer(
                        tokens[q]["hidden_states"],
                        tokens[k]["hidden_states"],
                        query_mask=tokens[q]["mask"],
                        kv_mask=tokens[k]["mask"],
                        return_weights=True,
                    )
                    attention = {f"{q}->{k}": w, **attention}
        gates = None
        if out.gates is not None:
            gates = {m: out.gates[:, j] for j, m in enumerate(self.order)}
        per = {}
        for m, r in results.items():
            per[m] = dict(r.get("stats", {}))
            if attempts is not None:
                per[m]["attempts"] = attempts.get(m, 1)
        stats = {"modalities": per, "fuse_ms": 1e3 * (time.perf_counter() - t0)}
        return DistributedOutput(
            embeddings=embeddings,
            fused=out.fused,
            gates=gates,
            attention=attention,
            tokens=tokens if return_tokens else {},
            skipped=skipped,
            stats=stats,
        )


class DistributedModel:
    """A ``MultiModalModel`` spread over a Ray cluster (docs/distributed.md).

    Each enabled modality runs as ``replicas`` Ray actors on the nodes its assignment
    selects; each actor holds the modality's processor, encoder and cache. A request
    fans out to one replica per modality (the one with the fewest requests in flight,
    at most ``max_in_flight`` each: more wait here), and the driver fuses what comes
    back with the same fusion and attention layers a local model would build, so the
    results equal the local model's. A request whose replica or node dies is sent
    again, to another replica when there is one, up to ``distributed.max_retries``
    times; actors restart on their own (a replacement node with the same labels)."""

    def __init__(self, config: dict, replicas: dict[str, list[_Replica]], infos: dict) -> None:
        self.config = config
        self._replicas = replicas
        self.node_ids = {m: [r.node_id for r in rs] for m, rs in replicas.items()}
        # The most requests one replica of each modality had in flight at once.
        self.peak_in_flight: dict[str, int] = {}
        self.encoders = infos
        dist = config.get("distributed") or {}
        self.max_retries = int(dist.get("max_retries", 3))
        self.send_file_bytes = bool(dist.get("send_file_bytes", True))
        self.fuser = Fuser.build(config, infos)
        self.fusion, self.pairs, self.order, self.level = (
            self.fuser.fusion,
            self.fuser.pairs,
            self.fuser.order,
            self.fuser.level,
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        config: Union[mlmf.MultiModalConfig, str, os.PathLike, dict],
        *,
        address: Optional[str] = None,
    ) -> DistributedModel:
        """Starts the replicas of every enabled modality on the nodes the config's
        ``distributed`` section assigns, and waits until they are up. Uses the Ray
        connection of this process (``ray.init`` first), else connects to ``address``
        (default: ``auto``)."""
        ray = _ray()
        cfg = config_dict(config)
        if not ray.is_initialized():
            ray.init(address=address or "auto")
        dist = cfg.get("distributed") or {}
        timeout = float(dist.get("start_timeout_s", 60.0))
        max_retries = int(dist.get("max_retries", 3))
        actor_cls = ray.remote(ModalityWorker)
        replicas: dict[str, list[_Replica]] = {}
        for plan in plans(cfg, ray):
            m = plan.modality
            worker_cfg = worker_config(cfg, plan)
            threads = str(max(1, int(plan.num_cpus or 1)))
            replicas[m] = []
            for i, placement in enumerate(plan.placements):
                opts: dict[str, Any] = {
                    "num_cpus": plan.num_cpus,
                    "num_gpus": plan.num_gpus,
                    "max_restarts": -1,
                    "max_task_retries": max_retries,
                    # One encode at a time: a replica uses the CPUs it asked for;
                    # up to max_in_flight requests wait in its queue.
                    "max_concurrency": 1,
                    "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": threads}},
                    **placement,
                }
                if plan.memory:
                    opts["memory"] = plan.memory
                handle = actor_cls.options(**opts).remote(m, worker_cfg)
                replicas[m].append(_Replica(handle, plan, i))
        infos = {}
        deadline = time.monotonic() + timeout
        for m, rs in replicas.items():
            refs = [r.handle.info.remote() for r in rs]
            left = max(0.1, deadline - time.monotonic())
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=left)
            if pending:
                for started in replicas.values():
                    for r in started:
                        ray.kill(r.handle)
                raise mlmf.DistributedError(
                    f"{m}: {len(pending)} of {len(refs)} replicas did not start within "
                    f"{timeout:g} s (no node with free resources matching "
                    f"{rs[0].plan.selectors or 'any node'}: CPUs {rs[0].plan.num_cpus}, "
                    f"GPUs {rs[0].plan.num_gpus})"
                )
            try:
                got = ray.get(refs)
            except Exception as e:
                raise _as_mlmf(e, m) from e
            for r, info in zip(rs, got):
                r.node_id = info["node_id"]
            infos[m] = got[0]
        return cls(cfg, replicas, infos)

    # ------------------------------------------------------------------ calls

    def infer(
        self,
        text: Any = None,
        image: Any = None,
        audio: Any = None,
        video: Any = None,
        *,
        ids: Optional[dict[str, list[str]]] = None,
        return_attention: bool = False,
        return_tokens: bool = False,
        sampling_rate: Optional[int] = None,
        fps: Optional[float] = None,
        timeout: Optional[float] = None,
    ) -> DistributedOutput:
        """The same inputs and outputs as ``MultiModalModel.infer``."""
        request = {"text": text, "image": image, "audio": audio, "video": video, "ids": ids}
        return self.infer_batch(
            [request],
            return_attention=return_attention,
            return_tokens=return_tokens,
            sampling_rate=sampling_rate,
            fps=fps,
            timeout=timeout,
        )[0]

    def infer_batch(
        self,
        requests: Sequence[dict],
        *,
        return_attention: bool = False,
        return_tokens: bool = False,
        sampling_rate: Optional[int] = None,
        fps: Optional[float] = None,
        timeout: Optional[float] = None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> list[DistributedOutput]:
        """Many requests at once, each a dict of ``infer``'s inputs (``text``, ``image``,
        ``audio``, ``video``, ``ids``); they run concurrently over the replicas and come
        back in order, each exactly once. ``progress(n)`` is called with the number of
        request parts (one modality of one request) done so far."""
        ray = _ray()
        kwargs = {k: v for k, v in (("sampling_rate", sampling_rate), ("fps", fps)) if v}
        want_tokens = self.fuser.wants_tokens(return_tokens, return_attention)
        parts: list[_Part] = []
        skipped: list[list[str]] = []
        for n, req in enumerate(requests):
            unknown = set(req) - {*MODALITIES, "ids"}
            if unknown:
                raise mlmf.InputError(f"request {n}: unknown keys {sorted(unknown)}")
            skip = []
            for m in MODALITIES:
                if req.get(m) is None:
                    continue
                if m not in self._replicas:
                    if m in (self.config.get("modalities") or {}):
                        skip.append(m)  # configured but disabled
                        continue
                    raise mlmf.InputError(
                        f"{m} input: this model has no {m} modality "
                        f"(it has: {', '.join(sorted(self._replicas))})"
                    )
                items = _read_items(m, req[m], self.send_file_bytes)
                ids = (req.get("ids") or {}).get(m)
                parts.append(_Part(n, m, items, ids, kwargs))
            skipped.append(skip)
            if not any(p.request == n for p in parts):
                raise mlmf.MissingModalityError(f"request {n}: no inputs were given")
        self._run(ray, parts, want_tokens, timeout, progress)
        outputs = []
        for n in range(len(requests)):
            mine = [p for p in parts if p.request == n]
            outputs.append(self._fuse(mine, skipped[n], return_attention, return_tokens))
        return outputs

    def _pick(self, modality: str) -> Optional[_Replica]:
        """The replica of ``modality`` with the fewest requests in flight, if one has room."""
        rs = self._replicas[modality]
        best = min(rs, key=lambda r: (r.in_flight, r.index))
        return best if best.in_flight < best.plan.max_in_flight else None

    def _submit(self, part: _Part, replica: _Replica, want_tokens: bool) -> None:
        part.replica = replica
        part.attempts += 1
        replica.in_flight += 1
        part.ref = replica.handle.encode.remote(part.items, part.ids, want_tokens, part.kwargs)
        peak = self.peak_in_flight
        peak[part.modality] = max(peak.get(part.modality, 0), replica.in_flight)

    def _run(
        self,
        ray: Any,
        parts: list[_Part],
        want_tokens: bool,
        timeout: Optional[float],
        progress: Optional[Callable[[int], None]],
    ) -> None:
        finished = 0
        queue = list(parts)
        running: dict[Any, _Part] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while queue or running:
            # Submit what fits (backpressure: at most max_in_flight per replica).
            waiting = []
            for part in queue:
                replica = self._pick(part.modality)
                if replica is None:
                    waiting.append(part)
                    continue
                self._submit(part, replica, want_tokens)
                running[part.ref] = part
            queue = waiting
            if not running:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=left)
            if not done:
                raise mlmf.DistributedError(
                    f"{len(running) + len(queue)} request parts did not finish within {timeout:g} s"
                )
            for ref in done:
                part = running.pop(ref)
                assert part.replica is not None
                part.replica.in_flight -= 1
                try:
                    part.result = ray.get(ref)
                    finished += 1
                    if progress is not None:
                        progress(finished)
                except Exception as e:  # noqa: BLE001 - sorted below
                    if type(e).__name__ not in _LOST and not _is_lost(e):
                        raise _as_mlmf(e, part.modality, part.request) from e
                    if part.attempts > self.max_retries:
                        raise mlmf.DistributedError(
                            f"{part.modality} (request {part.request}): its replica or node "
                            f"was lost {part.attempts} times; gave up after "
                            f"{self.max_retries} retries ({type(e).__name__}: {e})"
                        ) from e
                    queue.append(part)  # again, preferably on another replica
                    others = [r for r in self._replicas[part.modality] if r is not part.replica]
                    if others:
                        # Steer the retry away from the replica that failed.
                        part.replica.in_flight += 1000
                        replica = self._pick(part.modality)
                        part.replica.in_flight -= 1000
                        if replica is not None:
                            queue.remove(part)
                            self._submit(part, replica, want_tokens)
                            running[part.ref] = part

    def _fuse(
        self, parts: list[_Part], skipped: list[str], return_attention: bool, return_tokens: bool
    ) -> DistributedOutput:
        results = {p.modality: p.result for p in parts if p.result}
        attempts = {p.modality: p.attempts for p in parts if p.result}
        return self.fuser.fuse(results, skipped, return_attention, return_tokens, attempts)

    # ------------------------------------------------------------------ control

    def refresh_nodes(self) -> dict[str, list[str]]:
        """Asks every replica where it runs now (after restarts) and updates ``node_ids``."""
        ray = _ray()
        self.node_ids = {
            m: [i["node_id"] for i in ray.get([r.handle.info.remote() for r in rs])]
            for m, rs in self._replicas.items()
        }
        return self.node_ids

    def stats(self) -> dict[str, list[dict]]:
        """Every replica's model statistics, per modality."""
        ray = _ray()
        return {
            m: ray.get([r.handle.stats.remote() for r in rs]) for m, rs in self._replicas.items()
        }

    def shutdown(self) -> None:
        """Stops every replica."""
        ray = _ray()
        for rs in self._replicas.values():
            for r in rs:
                ray.kill(r.handle)
        self._replicas = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{m} x{len(rs)}" for m, rs in self._replicas.items())
        return f"DistributedModel({counts}; fusion={self.fusion.strategy!r})"


def _canonical(m: str) -> tuple[int, int]:
    if m in MODALITIES:
        return (MODALITIES.index(m), 0)
    return (len(MODALITIES), int(m.split(":", 1)[1]))


def _is_lost(e: BaseException) -> bool:
    cause = getattr(e, "cause", None)
    return cause is not None and type(cause).__name__ in _LOST


def _as_mlmf(e: BaseException, modality: str, request: Optional[int] = None) -> BaseException:
    """A worker's exception as the mlmf error it was (Ray wraps it)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, mlmf.MlmfError):
        return cause
    where = f"{modality}" + (f" (request {request})" if request is not None else "")
    return mlmf.DistributedError(f"{where}: {type(e).__name__}: {e}")
