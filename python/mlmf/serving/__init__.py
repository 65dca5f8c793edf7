"""The HTTP server (docs/serving.md): ``mlmf.serve(model)`` and ``mlmf serve CONFIG``.

The server itself lives in the Rust core (axum on tokio); this module only turns
Python arguments into its settings. Requests never take the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mlmf._mlmf import MultiModalModel, Server, _start_server

__all__ = ["Server", "serve", "wait_until_stopped", "API_KEY_ENV"]

#: The environment variable read for the bearer token when ``api_key`` is not given.
API_KEY_ENV = "MLMF_API_KEY"


def serve(
    model: MultiModalModel | str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    allow_path: Iterable[str | os.PathLike[str]] = (),
    max_body_mb: float = 32.0,
    max_concurrent_requests: int = 512,
    request_timeout: float = 60.0,
    batching: bool = True,
    max_batch_items: int = 32,
    max_batch_tokens: int = 16384,
    max_wait_ms: float = 0.0,
    drain_timeout: float = 30.0,
    model_name: str | None = None,
    http_threads: int = 2,
    block: bool = True,
    handle_signals: bool | None = None,
) -> Server:
    """Serve ``model`` (a loaded ``MultiModalModel`` or a config file) over HTTP.

    Binds ``host:port`` (loopback by default; ``port=0`` picks a free port, see
    ``Server.port``). With ``block=True`` (the default) it serves until SIGTERM or
    Ctrl-C drains it, then returns the stopped server; with ``block=False`` it returns
    the running ``Server`` at once (``shutdown()``, ``wait()``, or use it as a context
    manager). ``api_key`` (default: the ``MLMF_API_KEY`` environment variable) makes
    every ``/v1/*`` and ``/metrics`` request carry ``Authorization: Bearer <key>``.
    ``allow_path`` directories are the only places requests may name files in; without
    them media come only by value. Batching coalesces concurrent requests' items per
    modality into batches of at most ``max_batch_items`` items (``max_batch_tokens``
    tokens for text): a batch takes what is queued when the encoder is free, and waits
    up to ``max_wait_ms`` (default 0) for more after its first item.
    """
    name = model_name
    if not isinstance(model, MultiModalModel):
        path = Path(model)
        model = MultiModalModel.load(path)
        name = name or path.stem
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if max_body_mb <= 0:
        from mlmf import ConfigError

        raise ConfigError(
            "invalid config at `serve.max_body_bytes`: expected a positive size, "
            f"got {max_body_mb} MB"
        )
    server = _start_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        allow_paths=[Path(p) for p in allow_path],
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_concurrent_requests=max_concurrent_requests,
        request_timeout=request_timeout,
        batching=batching,
        max_batch_items=max_batch_items,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        drain_timeout=drain_timeout,
        model_name=name or "mlmf",
        http_threads=http_threads,
        handle_signals=block if handle_signals is None else handle_signals,
    )
    if block:
        wait_until_stopped(server)
    return server


def wait_until_stopped(server: Server) -> None:
    """Waits until `server` has stopped; a KeyboardInterrupt on the way drains it."""
    try:
        server.wait()
    except KeyboardInterrupt:
        server.shutdown()
        server.wait()
