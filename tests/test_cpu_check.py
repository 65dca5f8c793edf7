"""The CPU check ``import mlmf`` runs before loading the extension (python/mlmf/_cpu.py).

``MLMF_CPU_FLAGS`` pretends the CPU has only the flags it lists.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import mlmf
from mlmf import _cpu

LIBRARY = importlib.util.find_spec("mlmf._mlmf").origin


def _import_with_flags(flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLMF_CPU_FLAGS": flags}
    env.pop("MLMF_SKIP_CPU_CHECK", None)
    return subprocess.run(
        [sys.executable, "-c", "import mlmf; print(mlmf.TARGET_FEATURES)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _flags_for(features: list[str]) -> set[str]:
    return {_cpu._CPUINFO_NAME.get(f, f) for f in features}


def test_the_library_file_records_what_the_build_assumes():
    assert _cpu.build_features(LIBRARY) == mlmf.TARGET_FEATURES
    assert "sse2" in mlmf.TARGET_FEATURES


def test_a_cpu_without_a_feature_of_the_build_is_refused_at_import():
    assumed = [f for f in mlmf.TARGET_FEATURES if _cpu._CPUINFO_NAME.get(f, f) in _cpu._LISTED]
    if len(assumed) < 2:
        pytest.skip("this build assumes no checkable feature beyond the baseline")
    dropped = assumed[-1]
    flags = _flags_for(assumed) - {_cpu._CPUINFO_NAME.get(dropped, dropped)}
    r = _import_with_flags(" ".join(sorted(flags)))
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert f"lacks {dropped} (per MLMF_CPU_FLAGS)" in r.stderr
    assert 'RUSTFLAGS="-C target-cpu=native"' in r.stderr


def test_a_cpu_with_every_feature_imports():
    r = _import_with_flags(",".join(sorted(_flags_for(mlmf.TARGET_FEATURES))))
    assert r.returncode == 0, r.stderr


def test_linux_spellings_are_used():
    flags = {"sse2", "pni", "sse4_1", "sse4_2", "cx16", "abm", "avx2", "fma"}
    assert _cpu.missing(["sse3", "sse4.1", "sse4.2", "cmpxchg16b", "lzcnt"], flags) == []
    assert _cpu.missing(["avx2", "bmi2", "crt-static"], flags) == ["bmi2"]
    if os.path.exists("/proc/cpuinfo") and "MLMF_CPU_FLAGS" not in os.environ:
        assert "sse2" in (_cpu.cpu_flags() or set())
