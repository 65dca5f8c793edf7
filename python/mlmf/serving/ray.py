"""mlmf's HTTP API on Ray Serve (docs/serving.md): one deployment per modality, placed
by the config's ``distributed.sharding.modality_assignments`` (node labels or custom
resources), each batching its own requests (``serve.batch``) with optional
autoscaling, and an ingress deployment that parses requests, fans them out per
modality and fuses with the layers a local model builds.

    from mlmf.serving.ray import build_app, serve_ray
    serve_ray("mlmf.toml", port=8000)          # or: serve.run(build_app("mlmf.toml"))
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

import mlmf
from mlmf.distributed.model import Fuser, ModalityWorker, config_dict, worker_config
from mlmf.distributed.placement import plans
from mlmf.serving import _requests as rq

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ImportError as e:  # pragma: no cover - depends on the environment
    raise mlmf.DistributedError(
        "mlmf.serving.ray needs Ray Serve: pip install 'mlmf[ray]' (ray[serve])"
    ) from e

APP_NAME = "mlmf"


def _trim(hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token states cut to the rows' longest real length (a batch pads to its own)."""
    real = np.flatnonzero(mask.any(axis=0))
    n = int(real[-1]) + 1 if real.size else 1
    return hidden[:, :n], mask[:, :n]


class ModalityEncoder:
    """One modality's processor, encoder and cache; concurrent calls are encoded as one
    batch. A batch that fails runs its calls again one by one, so a bad item fails
    only its own call."""

    def __init__(
        self, modality: str, config: dict, max_batch_size: int, batch_wait_timeout_s: float
    ) -> None:
        warnings.simplefilter("ignore")
        self.modality = modality
        self.worker = ModalityWorker(modality, config)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict:
        return self.worker.info()

    def stats(self) -> dict:
        return self.worker.stats()

    def _run(self, items: list, tokens: bool) -> dict:
        return self.worker.encode(items, None, tokens, {})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def encode(self, items: list[list], tokens: list[bool]) -> list[dict]:
        want = any(tokens)
        flat = [x for call in items for x in call]
        try:
            res = await asyncio.to_thread(self._run, flat, want)
        except mlmf.MlmfError:
            out = []
            for call, t in zip(items, tokens):
                try:
                    part = await asyncio.to_thread(self._run, call, t)
                    if self.modality == "text":
                        part["tokens"] = int(sum(self.worker.model.count_tokens(call)))
                    out.append(part)
                except mlmf.MlmfError as e:
                    out.append({"error": e})
            return out
        counts = self.worker.model.count_tokens(flat) if self.modality == "text" else None
        out, start = [], 0
        for call, t in zip(items, tokens):
            n = len(call)
            part = {"pooled": res["pooled"][start : start + n], "stats": res["stats"]}
            if counts is not None:
                part["tokens"] = int(sum(counts[start : start + n]))
            if t:
                part["hidden_states"], part["mask"] = _trim(
                    res["hidden_states"][start : start + n], res["mask"][start : start + n]
                )
            out.append(part)
            start += n
        return out


class Ingress:
    """The HTTP API: parses and checks requests, encodes each modality on its deployment
    (concurrently), fuses, answers in the same JSON as ``mlmf serve``."""

    def __init__(
        self, config: dict, encoders: dict[str, Any], model_name: str, api_key: Optional[str]
    ) -> None:
        warnings.simplefilter("ignore")
        self.config = config
        # In the model's order (text, image, audio, video), whatever order Serve kept.
        order = {m: i for i, m in enumerate(rq.MODALITIES)}
        self.encoders = dict(sorted(encoders.items(), key=lambda kv: order.get(kv[0], 99)))
        # Built on the first request: the encoders' widths come from their replicas.
        self._fuser: Optional[Fuser] = None
        self._aligned: Any = None
        self._lock = asyncio.Lock()
        self.model_name = model_name
        self.api_key = api_key
        self.dirs = {
            m: Path(c["model"]).resolve()
            for m, c in config["modalities"].items()
            if m in encoders and c.get("model")
        }

    async def fuser(self) -> Fuser:
        async with self._lock:
            if self._fuser is None:
                names = list(self.encoders)
                got = await asyncio.gather(*(self.encoders[m].info.remote() for m in names))
                infos = dict(zip(names, got))
                self._fuser = await asyncio.to_thread(Fuser.build, self.config, infos)
        return self._fuser

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Exception as e:  # noqa: BLE001 - every error becomes a JSON answer
            err = rq.from_exception(_unwrap(e))
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if path == "/health" and method == "GET":
            return JSONResponse({"status": "ok"})
        if path == "/ready" and method == "GET":
            return JSONResponse({"status": "ready", "modalities": list(self.encoders)})
        routes = {
            "/v1/embeddings": self.embeddings,
            "/v1/infer": self.infer,
            "/v1/similarity": self.similarity,
            "/v1/zero-shot": self.zero_shot,
        }
        if path == "/v1/models" or path in routes:
            key = self.api_key
            if key and request.headers.get("authorization", "") != f"Bearer {key}":
                raise rq.ApiError(
                    401,
                    "authentication_error",
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                )
            if path == "/v1/models":
                if method != "GET":
                    raise rq.ApiError(
                        405, "invalid_request_error", f"{method} is not allowed on {path}"
                    )
                data = [
                    {"id": n, "object": "model", "owned_by": "mlmf", "created": 0}
                    for n in self._names()
                ]
                return JSONResponse({"object": "list", "data": data})
            if method != "POST":
                raise rq.ApiError(
                    405, "invalid_request_error", f"{method} is not allowed on {path}"
                )
            return JSONResponse(await routes[path](rq.json_object(await request.body())))
        raise rq.ApiError(404, "not_found_error", f"no route {method} {path}")

    def _names(self) -> list[str]:
        names = [self.model_name]
        for m in self.encoders:
            names.append(m)
            if m in self.dirs:
                names.append(self.dirs[m].name)
        return list(dict.fromkeys(names))

    def _check_has(self, m: str) -> None:
        if m not in self.encoders:
            raise rq.bad(
                f"{m} input: this model has no {m} modality (it has: {', '.join(self.encoders)})"
            )

    async def _encode(self, m: str, items: list, tokens: bool) -> dict:
        self._check_has(m)
        res = await self.encoders[m].encode.remote(items, tokens)
        if "error" in res:
            raise res["error"]
        return res

    async def _encode_all(self, parts: dict[str, list], tokens: dict[str, bool]) -> dict[str, dict]:
        got = await asyncio.gather(
            *(self._encode(m, v, tokens.get(m, False)) for m, v in parts.items())
        )
        return dict(zip(parts, got))

    async def embeddings(self, obj: dict) -> dict:
        rq.only_keys(obj, ("model", "input", "encoding_format", "dimensions", "user", "modality"))
        name, modality = rq.string(obj, "model"), rq.string(obj, "modality")
        if modality is not None and modality not in rq.MODALITIES:
            raise rq.bad(
                f"`modality`: unknown modality {modality!r}: expected text, image, audio or video"
            )
        m = modality
        if name is not None and name != self.model_name:
            by = next(
                (x for x in self.encoders if name in (x, self.dirs.get(x, Path()).name)), None
            )
            if by is None:
                raise rq.ApiError(
                    404,
                    "not_found_error",
                    f"model {name!r} is not served here: expected one of "
                    f"{', '.join(self._names())}",
                )
            m = m or by
        m = m or "text"
        fmt = rq.encoding_format(obj)
        if "input" not in obj:
            raise rq.bad("`input` is required: a string or a list of them")
        inp = obj["input"]
        if isinstance(inp, list) and inp and isinstance(inp[0], (int, float, list)):
            raise rq.bad("`input`: token id arrays are not accepted: send the texts")
        items = rq.items(m, inp)
        res = await self._encode(m, items, False)
        width = res["pooled"].shape[1]
        dims = obj.get("dimensions")
        if dims is not None and (
            not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= width
        ):
            raise rq.bad(
                f"`dimensions`: expected a whole number in 1..={width} "
                f"(this {m} model's width), got {dims}"
            )
        data = []
        for i, row in enumerate(res["pooled"]):
            v = np.asarray(row, dtype=np.float32)
            if dims is not None:
                v = v[:dims].astype(np.float64)
                n = np.linalg.norm(v)
                v = (v / n if n > 0 else v).astype(np.float32)
            emb = rq.array(v, "base64")["data"] if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = res.get("tokens", 0)
        return {
            "object": "list",
            "data": data,
            "model": name or self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def infer(self, obj: dict) -> dict:
        rq.only_keys(obj, (*rq.MODALITIES, "return_attention", "return_tokens", "encoding_format"))
        att, tok, fmt = (
            rq.flag(obj, "return_attention"),
            rq.flag(obj, "return_tokens"),
            rq.encoding_format(obj),
        )
        parts = {m: rq.items(m, obj[m]) for m in rq.MODALITIES if m in obj}
        if not parts:
            raise rq.bad(
                "no inputs: expected at least one of text, image, audio, video "
                f"(this model takes {', '.join(self.encoders)})"
            )
        for m in parts:
            self._check_has(m)
        sizes = {m: len(v) for m, v in parts.items()}
        first = next(iter(sizes))
        for m, n in sizes.items():
            if n != sizes[first]:
                raise rq.bad(
                    f"{m}: {n} items, but {first} has {sizes[first]}: "
                    "every modality carries one item per row"
                )
        fuser = await self.fuser()
        want = fuser.wants_tokens(tok, att)
        results = await self._encode_all(parts, {m: want for m in parts})
        out = await asyncio.to_thread(fuser.fuse, results, [], att, tok)
        answer: dict[str, Any] = {
            "object": "infer",
            "embeddings": {m: rq.array(e, fmt) for m, e in out.embeddings.items()},
            "fused": rq.array(out.fused, fmt),
            "gates": None
            if out.gates is None
            else {m: rq.array(g, fmt) for m, g in out.gates.items()},
            "skipped": out.skipped,
            "stats": out.stats,
        }
        if out.attention:
            answer["attention"] = {k: rq.array(v, fmt) for k, v in out.attention.items()}
        if out.tokens:
            answer["tokens"] = {
                m: {
                    "hidden_states": rq.array(t["hidden_states"], fmt),
                    "mask": np.asarray(t["mask"]).tolist(),
                }
                for m, t in out.tokens.items()
            }
        return answer

    def _other(self, obj: dict) -> str:
        others = [m for m in rq.MEDIA if m in obj]
        if len(others) != 1:
            raise rq.bad(
                "expected the items to compare with the texts: image, audio or video"
                if not others
                else "expected one of image, audio or video, not several"
            )
        m = others[0]
        if "text" not in self.encoders:
            raise rq.bad(
                f"similarity and zero-shot compare {m} with texts, "
                "and this model has no text modality"
            )
        self._check_has(m)
        if self.dirs.get("text") != self.dirs.get(m):
            raise rq.bad(
                f"similarity needs the text and {m} towers of one aligned checkpoint: text "
                f"loads {self.dirs.get('text')}, {m} loads {self.dirs.get(m)}"
            )
        return m

    async def _head(self) -> Any:
        """The aligned checkpoint's heads, read on first use."""
        if self._aligned is None:
            self._aligned = await asyncio.to_thread(mlmf._mlmf._AlignedHead, self.dirs["text"])
        return self._aligned

    async def _similarity(self, texts: list[str], m: str, items: list) -> Any:
        head = await self._head()
        res = await self._encode_all({"text": texts, m: items}, {m: head.needs_tokens})
        tokens = res[m].get("hidden_states") if head.needs_tokens else None
        return await asyncio.to_thread(
            head.similarity,
            np.ascontiguousarray(res["text"]["pooled"], dtype=np.float32),
            np.ascontiguousarray(res[m]["pooled"], dtype=np.float32),
            None if tokens is None else np.ascontiguousarray(tokens, dtype=np.float32),
        )

    async def similarity(self, obj: dict) -> dict:
        rq.only_keys(obj, (*rq.MODALITIES, "encoding_format"))
        fmt = rq.encoding_format(obj)
        if "text" not in obj:
            raise rq.bad("`text` is required: the texts to compare")
        texts = rq.items("text", obj["text"])
        m = self._other(obj)
        s = await self._similarity(texts, m, rq.items(m, obj[m]))
        return {
            "object": "similarity",
            "other": m,
            "logits_per_text": rq.array(s.logits_per_text, fmt),
            f"logits_per_{m}": rq.array(s.logits_per_other, fmt),
        }

    async def zero_shot(self, obj: dict) -> dict:
        rq.only_keys(obj, (*rq.MEDIA, "labels", "template", "encoding_format"))
        fmt = rq.encoding_format(obj)
        if "labels" not in obj:
            raise rq.bad("`labels` is required: a list of label texts")
        m = self._other(obj)
        template = rq.string(obj, "template") or rq.DEFAULT_TEMPLATES[m]
        labels = obj["labels"]
        prompts = rq.prompts(labels, template, m)
        s = await self._similarity(prompts, m, rq.items(m, obj[m]))
        z = mlmf._mlmf._zero_shot_from(s, labels, prompts)
        return {
            "object": "zero_shot",
            "other": m,
            "labels": z.labels,
            "prompts": z.prompts,
            "logits": rq.array(z.logits, fmt),
            "probs": rq.array(z.probs, fmt),
            "best": z.best,
            "best_index": z.best_index,
        }


def _unwrap(e: BaseException) -> BaseException:
    """The mlmf error a Ray exception carries, when it carries one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def deployment_options(plan: Any, max_batch_size: int, autoscaling: Optional[dict]) -> dict:
    """Serve options of one modality's deployment from its replica plan: CPUs, GPUs,
    memory and placement (``label_selector`` or a custom resource) as
    ``ray_actor_options``, the encoder's thread count, and ``autoscaling_config`` when
    given, else the plan's fixed replica count."""
    actor: dict[str, Any] = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus}
    if plan.memory:
        actor["memory"] = plan.memory
    if plan.placements and plan.placements[0]:
        actor.update(plan.placements[0])
    threads = str(max(1, int(plan.num_cpus or 1)))
    actor["runtime_env"] = {"env_vars": {"RAYON_NUM_THREADS": threads}}
    opts: dict[str, Any] = {
        "name": f"mlmf-{plan.modality}",
        "ray_actor_options": actor,
        "max_ongoing_requests": max(plan.max_in_flight, max_batch_size),
    }
    if autoscaling:
        opts["autoscaling_config"] = dict(autoscaling)
    else:
        opts["num_replicas"] = plan.replicas
    return opts


def build_app(
    config: Union[mlmf.MultiModalConfig, str, os.PathLike, dict],
    *,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.0,
    autoscaling: Optional[dict] = None,
    model_name: str = "mlmf",
    api_key: Optional[str] = None,
) -> Any:
    """The Serve application: a ``mlmf-<modality>`` deployment per enabled modality
    (replicas, CPUs, GPUs, memory and placement from ``modality_assignments``; with
    ``autoscaling``, Serve's ``autoscaling_config`` instead of a fixed replica count)
    and the ``mlmf-ingress`` deployment bound to them. Needs a Ray connection (the
    placement is checked against the cluster's nodes)."""
    import ray

    cfg = config_dict(config)
    encoders = {}
    for plan in plans(cfg, ray):
        dep = serve.deployment(ModalityEncoder).options(
            **deployment_options(plan, max_batch_size, autoscaling)
        )
        encoders[plan.modality] = dep.bind(
            plan.modality, worker_config(cfg, plan), max_batch_size, batch_wait_timeout_s
        )
    ingress = serve.deployment(Ingress).options(
        name="mlmf-ingress", ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(cfg, encoders, model_name, api_key)


def serve_ray(
    config: Union[mlmf.MultiModalConfig, str, os.PathLike, dict],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: Optional[str] = None,
    block: bool = True,
    **app_options: Any,
) -> str:
    """Starts Serve's HTTP proxy on ``host:port`` (connecting to the Ray cluster at
    ``address``, default ``auto``, unless this process is connected) and runs the
    application of ``build_app``; returns its URL. With ``block``, waits for SIGTERM or
    Ctrl-C, then deletes the application."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, **app_options), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if block:
        wait_and_delete()
    return url


def wait_and_delete() -> None:
    """Waits for SIGTERM or Ctrl-C, then deletes the application."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
