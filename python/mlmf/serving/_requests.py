"""Requests and answers of the HTTP API in Python, for the Ray Serve ingress: the same
fields, checks, array formats and error shapes as the Rust server (src/serve/)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Optional

import numpy as np

import mlmf

MEDIA = ("image", "audio", "video")
MODALITIES = ("text", *MEDIA)
DEFAULT_TEMPLATES = {
    "image": "a photo of a {}.",
    "audio": "the sound of a {}.",
    "video": "a video of a {}.",
}


class ApiError(Exception):
    """An error answer: status, type and a message naming what was wrong."""

    def __init__(
        self, status: int, kind: str, message: str, retry_after: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "code": self.status}}


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


# Exceptions that are the server's own fault; every other mlmf error is the request's.
_SERVER_FAULTS = ("InternalError", "DeviceError", "CacheError", "TrainError", "DistributedError")


def from_exception(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, mlmf.MlmfError) and type(e).__name__ not in _SERVER_FAULTS:
        return bad(str(e))
    return ApiError(500, "server_error", f"{type(e).__name__}: {e}")


def kind_of(v: Any) -> str:
    if v is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def json_object(body: bytes) -> dict:
    if not body:
        raise bad("empty body: expected a JSON object")
    try:
        v = json.loads(body)
    except ValueError as e:
        raise bad(f"invalid JSON: {e}") from None
    if not isinstance(v, dict):
        raise bad(f"expected a JSON object, got {kind_of(v)}")
    return v


def only_keys(obj: dict, allowed: tuple[str, ...]) -> None:
    for k in obj:
        if k not in allowed:
            raise bad(f"unknown field `{k}`: expected one of {', '.join(allowed)}")


def flag(obj: dict, key: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"`{key}`: expected true or false, got {kind_of(v)}")
    return v


def string(obj: dict, key: str) -> Optional[str]:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise bad(f"`{key}`: expected a string, got {kind_of(v)}")
    return v


def encoding_format(obj: dict) -> str:
    v = obj.get("encoding_format")
    if v is None:
        return "float"
    if v not in ("float", "base64"):
        raise bad(f'`encoding_format`: expected "float" or "base64", got {json.dumps(v)}')
    return v


def decode_b64(m: str, i: int, s: str) -> bytes:
    payload = s
    if s.startswith("data:"):
        meta, sep, payload = s[5:].partition(",")
        if not sep or not meta.endswith(";base64"):
            raise bad(f"{m} input {i}: a data URL must be `data:<type>;base64,<data>`")
    payload = payload.strip()
    if not payload:
        raise bad(f"{m} input {i}: empty data: expected base64 of a media file")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(
            f"{m} input {i}: not valid base64 ({e}): expected base64 of a media file"
        ) from None


def items(m: str, v: Any) -> list:
    """A modality's items: texts as str, media as bytes. Paths are refused (media only by
    value)."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise bad(f"{m}: expected an array of items, got {kind_of(v)}")
    if not v:
        raise bad(f"{m}: empty list: expected at least one item")
    out: list = []
    for i, it in enumerate(v):
        if m == "text":
            if not isinstance(it, str):
                raise bad(f"text input {i}: expected a string, got {kind_of(it)}")
            out.append(it)
        elif isinstance(it, str):
            out.append(decode_b64(m, i, it))
        elif isinstance(it, dict) and set(it) == {"data"} and isinstance(it["data"], str):
            out.append(decode_b64(m, i, it["data"]))
        elif isinstance(it, dict) and "path" in it:
            raise bad(
                f"{m} input {i}: paths are refused by this server (media only by value: "
                "send base64)"
            )
        else:
            raise bad(f'{m} input {i}: expected a base64 string or {{"data": "<base64>"}}')
    return out


def array(a: Any, fmt: str) -> Any:
    """A float array as nested lists, or ``{"shape", "dtype", "data"}`` in base64."""
    a = np.asarray(a, dtype=np.float32)
    if fmt == "base64":
        data = base64.b64encode(a.astype("<f4").tobytes()).decode()
        return {"shape": list(a.shape), "dtype": "float32", "data": data}
    return a.tolist()


def prompts(labels: Any, template: str, m: str) -> list[str]:
    if not isinstance(labels, list):
        raise bad(f"`labels`: expected a list of label texts, got {kind_of(labels)}")
    if not labels:
        raise bad(f"{m} input: zero-shot needs at least one label: expected a non-empty list")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise bad(f"`labels` item {i}: expected a string, got {kind_of(label)}")
        if not label.strip():
            raise bad(f"text input {i}: label {i} is empty: expected a label text")
    if template.count("{}") != 1:
        raise bad(f"template {template!r} must contain `{{}}` exactly once (where the label goes)")
    return [template.replace("{}", label, 1) for label in labels]
