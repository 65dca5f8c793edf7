"""Helpers of the server tests: models, media as base64, a small HTTP client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import requests

import mlmf

FIX = Path(__file__).parent / "fixtures"
MODELS = FIX / "encoders" / "models"
IMAGES = [
    FIX / "image" / "inputs" / "jpeg420_81x61.jpg",
    FIX / "image" / "inputs" / "rgb_640x480.png",
]
AUDIO = [
    FIX / "audio" / "inputs" / "flac_16000_mono.flac",
    FIX / "audio" / "inputs" / "mp3_16000_mono.mp3",
]
TEXTS = ["a cat sits on the mat", "an orchestra tunes up before the concert"]


def multimodal_config() -> dict:
    """Text, image and audio, attention fusion and a text->image attention pair."""
    return {
        "modalities": {
            "text": {"model": str(MODELS / "st_mean_norm")},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
        },
        "fusion": {"strategy": "attention", "attention_dim": 16, "out_dim": 24},
        "cross_modal_attention": {"num_heads": 2, "pairs": ["text->image"]},
    }


def aligned_config() -> dict:
    d = str(MODELS / "clip_tiny")
    return {
        "modalities": {"text": {"model": d}, "image": {"model": d}},
        "fusion": {"strategy": "late", "mode": "similarity"},
    }


def load(cfg: dict) -> mlmf.MultiModalModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained fusion / attention
        return mlmf.MultiModalModel.load(cfg)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def arr(v: Any) -> np.ndarray:
    """A float array from the answer: nested lists or the base64 form."""
    if isinstance(v, dict):
        data = np.frombuffer(base64.b64decode(v["data"]), dtype="<f4")
        return data.reshape(v["shape"])
    return np.asarray(v, dtype=np.float32)


def post(url: str, path: str, body: Any, *, key: str | None = None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return requests.post(url + path, data=body, headers=headers, timeout=60, **kw)
    return requests.post(url + path, json=body, headers=headers, timeout=60, **kw)


def error_of(r: requests.Response) -> dict:
    """The `error` object of an error answer, checking its shape."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    e = json.loads(r.text)["error"]
    assert set(e) == {"type", "message", "code"} and e["code"] == r.status_code, e
    assert "Traceback" not in e["message"] and "panicked" not in e["message"], e
    return e


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        got = head[len(name) :]
        if got in (f"{{{want}}}", "" if not want else None):
            return float(value)
        if got.startswith("{") and set(got[1:-1].split(",")) == set(want.split(",")):
            return float(value)
    return 0.0


def start_cli(config: dict, path: Path, *args: str) -> subprocess.Popen:
    """`mlmf serve` on `config` (written to `path`) in a child process; its stdout is
    a pipe (the first line names the URL)."""
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        [sys.executable, "-m", "mlmf.cli", "serve", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
