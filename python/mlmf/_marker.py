"""Reading the markers build.rs and the extension leave in the library file, before
the extension is loaded (``_cpu.py``: target features; ``_cuda_libs.py``: CUDA
libraries)."""

from __future__ import annotations

import mmap
import re
from typing import Optional


def read_list(
    library: str, mark: bytes, pattern: re.Pattern[bytes], empty: bool = False
) -> Optional[list[str]]:
    """The comma-separated names after ``mark`` in the file ``library``, up to a
    semicolon: the first copy of the marker whose text matches ``pattern`` (or is empty,
    with ``empty``). None when no copy does."""
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = m.find(mark)
        while start >= 0:
            end = m.find(b";", start, start + 4096)
            raw = m[start + len(mark) : end] if end > 0 else None
            if raw is not None and ((empty and raw == b"") or (raw and pattern.fullmatch(raw))):
                return [n for n in raw.decode("ascii").split(",") if n]
            start = m.find(mark, start + 1)
    return None
