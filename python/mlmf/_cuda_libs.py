"""Loading the CUDA libraries of mlmf's CUDA build, before the extension.

The CUDA build (``make wheel-cuda``) links against empty stand-ins for the NVIDIA
driver and the CUDA libraries, so it builds on machines without CUDA and records none
of them as a dependency. Its calls into them are resolved when it loads, against the
libraries already loaded into the process. So ``import mlmf`` first reads the list the
build recorded (a marker in the library file, as ``_cpu.py`` reads the target
features) and loads each library globally, looking:

1. where the dynamic loader looks (``LD_LIBRARY_PATH``, the system's folders): the
   driver's ``libcuda.so.1`` is found there;
2. in the NVIDIA wheels' folders on ``sys.path`` (``nvidia/cu13/lib``, then one folder
   per package as CUDA 12's wheels had them), where ``pip install nvidia-cuda-runtime
   nvidia-cublas nvidia-curand`` puts them.

A library found nowhere raises ``ImportError`` naming it and where it comes from,
instead of the loader's bare "undefined symbol". The CPU build records no library and
this module does nothing.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from typing import Optional

from mlmf._marker import read_list

_MARK = b"mlmf-cuda-libraries:"
_LIST = re.compile(rb"[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*")

#: Where each library comes from, for the error message.
PROVIDERS = {
    "libcuda": "the NVIDIA driver (installed with the driver, not from PyPI)",
    "libcudart": "pip install nvidia-cuda-runtime",
    "libnvrtc": "pip install nvidia-cuda-nvrtc",
    "libcublas": "pip install nvidia-cublas",
    "libcublasLt": "pip install nvidia-cublas",
    "libcurand": "pip install nvidia-curand",
}

#: Wheel folders, relative to a ``sys.path`` entry: CUDA 13's shared one, then
#: CUDA 12's per-package ones.
_WHEEL_DIRS = (
    "nvidia/cu13/lib",
    "nvidia/cuda_runtime/lib",
    "nvidia/cuda_nvrtc/lib",
    "nvidia/cublas/lib",
    "nvidia/curand/lib",
)


def recorded(library: str) -> list[str]:
    """The libraries the extension file ``library`` records (empty without any)."""
    return read_list(library, _MARK, _LIST, empty=True) or []


def stem(soname: str) -> str:
    """``libcublasLt.so.13`` -> ``libcublasLt``."""
    return soname.split(".so", 1)[0]


def candidates(soname: str, roots: Iterable[str]) -> list[str]:
    """Files that may be ``soname`` under the wheel folders of ``roots``: the exact
    name first, then the same library with another version suffix."""
    exact, other = [], []
    for root in roots:
        for sub in _WHEEL_DIRS:
            folder = os.path.join(root, sub)
            if not os.path.isdir(folder):
                continue
            path = os.path.join(folder, soname)
            if os.path.exists(path):
                exact.append(path)
            other += sorted(glob.glob(os.path.join(folder, stem(soname) + ".so.*")))
    seen, out = set(), []
    for p in exact + other:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def load(soname: str, roots: Iterable[str]) -> str:
    """Loads ``soname`` globally; returns where it came from. Raises ``ImportError``
    naming the library and its provider when no copy loads."""
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    errors = []
    for target in [soname, *candidates(soname, roots)]:
        try:
            ctypes.CDLL(target, mode=mode)
            return target
        except OSError as e:
            errors.append(str(e))
    provider = PROVIDERS.get(stem(soname), "the CUDA toolkit")
    raise ImportError(
        f"mlmf's CUDA build needs {soname}, which was not found: it comes from "
        f"{provider}. Searched the dynamic loader's path (LD_LIBRARY_PATH) and the NVIDIA "
        f"wheels' folders on sys.path ({', '.join(_WHEEL_DIRS)}). Without a GPU, install "
        f"the CPU build of mlmf instead. ({errors[0]})"
    )


def preload(library: Optional[str] = None) -> list[str]:
    """Loads every library the extension records; returns the paths loaded."""
    if library is None:
        spec = importlib.util.find_spec("mlmf._mlmf")
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            return []
        library = spec.origin
    names = recorded(library)
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    return [load(name, roots) for name in names]


preload()
