"""The CPU check that runs before the extension is loaded.

The extension is compiled for a CPU level (x86-64-v3 by default: AVX2, FMA, BMI2, ...;
see .cargo/config.toml); on a CPU without those instructions it would die with an
illegal instruction, possibly while loading. So ``import mlmf`` first reads the features
the build assumes (a marker build.rs puts in the library file) and compares them with
the CPU's, as Linux reports them in /proc/cpuinfo, and raises an ``ImportError`` that
names what is missing and how to build for this CPU.

The check runs on Linux x86-64. ``MLMF_CPU_FLAGS`` (flags as /proc/cpuinfo spells them,
separated by spaces or commas) replaces the CPU's flags, to try the check;
``MLMF_SKIP_CPU_CHECK=1`` skips it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from typing import Optional

from mlmf._marker import read_list

_MARK = b"mlmf-target-features:"
#: What follows the marker: comma-separated feature names, up to a semicolon.
_FEATURE_LIST = re.compile(rb"[a-z0-9._-]+(,[a-z0-9._-]+)*")

#: Rust target-feature names that /proc/cpuinfo spells differently.
_CPUINFO_NAME = {
    "sse3": "pni",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "cmpxchg16b": "cx16",
    "lzcnt": "abm",
    "sha": "sha_ni",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
}

#: Features Linux lists in /proc/cpuinfo (in its spelling); others are not checked.
_LISTED = set(
    "sse sse2 pni ssse3 sse4_1 sse4_2 sse4a popcnt cx16 fxsr xsave xsaveopt xsavec xsaves "
    "avx avx2 fma f16c bmi1 bmi2 abm movbe adx aes pclmulqdq rdrand rdseed sha_ni gfni vaes "
    "vpclmulqdq avx_vnni avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni "
    "avx512ifma avx512vbmi".split()
)

BUILD_HINT = (
    'build mlmf for this CPU from source: RUSTFLAGS="-C target-cpu=native" '
    'pip install --no-binary mlmf mlmf (in a checkout: RUSTFLAGS="-C target-cpu=native" '
    "pip install .)"
)


def build_features(library: str) -> Optional[list[str]]:
    """The target features recorded in the extension file ``library`` (None without
    a marker)."""
    return read_list(library, _MARK, _FEATURE_LIST)


def cpu_flags() -> Optional[set[str]]:
    """The CPU's flags (``MLMF_CPU_FLAGS`` or /proc/cpuinfo), None when unknown."""
    override = os.environ.get("MLMF_CPU_FLAGS")
    if override is not None:
        return set(override.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing(features: list[str], flags: set[str]) -> list[str]:
    """The build's features (Rust names) that ``flags`` lack, among those Linux lists."""
    out = []
    for feat in features:
        name = _CPUINFO_NAME.get(feat, feat)
        if name in _LISTED and name not in flags:
            out.append(feat)
    return out


def check() -> None:
    """Raises ``ImportError`` when this CPU lacks features the extension assumes."""
    if os.environ.get("MLMF_SKIP_CPU_CHECK") == "1":
        return
    override = "MLMF_CPU_FLAGS" in os.environ
    if not override and (
        sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64")
    ):
        return
    spec = importlib.util.find_spec("mlmf._mlmf")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return
    features = build_features(spec.origin)
    flags = cpu_flags()
    if not features or flags is None:
        return
    lacking = missing(features, flags)
    if lacking:
        source = "MLMF_CPU_FLAGS" if override else "/proc/cpuinfo"
        raise ImportError(
            f"mlmf was compiled for CPUs with {', '.join(features)}; this CPU lacks "
            f"{', '.join(lacking)} (per {source}), and running mlmf would crash with an "
            f"illegal instruction. To use mlmf here, {BUILD_HINT}."
        )


check()
