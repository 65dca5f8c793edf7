"""How `import mlmf` finds the CUDA build's libraries (python/mlmf/_cuda_libs.py).

The CUDA wheel itself is checked end to end by scripts/check_cuda_wheel.py
(`make wheel-cuda`); these tests cover the loader on any build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mlmf
from mlmf import _cuda_libs


def marked(tmp_path: Path, body: bytes) -> Path:
    lib = tmp_path / "_mlmf.so"
    lib.write_bytes(b"\x7fELF junk " + body + b" more junk")
    return lib


def test_the_recorded_list_is_read_from_the_marker(tmp_path: Path) -> None:
    lib = marked(tmp_path, b"mlmf-cuda-libraries:libcuda.so.1,libcublasLt.so.13;")
    assert _cuda_libs.recorded(str(lib)) == ["libcuda.so.1", "libcublasLt.so.13"]
    assert _cuda_libs.recorded(str(marked(tmp_path, b"mlmf-cuda-libraries:;"))) == []
    # A stray copy of the marker text without a valid list is skipped.
    lib = marked(tmp_path, b"mlmf-cuda-libraries: x y;mlmf-cuda-libraries:libm.so.6;")
    assert _cuda_libs.recorded(str(lib)) == ["libm.so.6"]
    assert _cuda_libs.recorded(str(marked(tmp_path, b"nothing"))) == []


def test_this_build_records_what_it_reports() -> None:
    import importlib.util

    spec = importlib.util.find_spec("mlmf._mlmf")
    assert spec is not None and spec.origin
    assert _cuda_libs.recorded(spec.origin) == list(mlmf.CUDA_LIBRARIES)
    if mlmf.CUDA_COMPILED:
        assert "libcuda.so.1" in mlmf.CUDA_LIBRARIES
    else:
        assert mlmf.CUDA_LIBRARIES == []


def test_wheel_folders_are_searched_exact_name_first(tmp_path: Path) -> None:
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"")
    (lib / "libcurand.so.11").write_bytes(b"")
    old = tmp_path / "site" / "nvidia" / "cublas" / "lib"
    old.mkdir(parents=True)
    (old / "libcublas.so.12").write_bytes(b"")
    roots = [str(tmp_path / "nowhere"), str(tmp_path / "site")]
    found = _cuda_libs.candidates("libcublas.so.13", roots)
    assert found[0] == str(lib / "libcublas.so.13")
    assert str(old / "libcublas.so.12") in found
    # Another version of the same library is a fallback; another library is not.
    assert _cuda_libs.candidates("libcurand.so.10", roots) == [str(lib / "libcurand.so.11")]
    assert _cuda_libs.candidates("libnvrtc.so.13", roots) == []


def _loads(soname: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def test_a_missing_driver_names_itself_and_the_cpu_build(tmp_path: Path) -> None:
    if _loads("libcuda.so.1"):
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(ImportError) as e:
        _cuda_libs.load("libcuda.so.1", [str(tmp_path)])
    msg = str(e.value)
    assert "needs libcuda.so.1" in msg and "NVIDIA driver" in msg and "CPU build" in msg


def test_a_broken_wheel_library_is_tried_and_reported(tmp_path: Path) -> None:
    if _loads("libcublas.so.13"):
        pytest.skip("this machine has cuBLAS on the loader's path")
    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"not a library")
    with pytest.raises(ImportError, match="pip install nvidia-cublas") as e:
        _cuda_libs.load("libcublas.so.13", [str(tmp_path)])
    assert "needs libcublas.so.13" in str(e.value)


def test_recorded_libraries_are_loaded_globally(tmp_path: Path) -> None:
    # The C maths library stands in for a CUDA library: found by the loader's search.
    lib = marked(tmp_path, b"mlmf-cuda-libraries:libm.so.6;")
    assert _cuda_libs.preload(str(lib)) == ["libm.so.6"]
    assert _cuda_libs.preload(str(marked(tmp_path, b"mlmf-cuda-libraries:;"))) == []
