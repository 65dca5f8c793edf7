"""The PEP 517 backend's JPEG decision (build-backend/mlmf_build.py), without building:
CMake is requested from PyPI when missing, and without it the build drops the
`jpeg-turbo` feature with a warning. (`make wheel-smoke` and the from-source install
in the README exercise real builds.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("maturin")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build-backend"))
import mlmf_build  # noqa: E402


@pytest.fixture
def no_tools(monkeypatch):
    monkeypatch.setattr(mlmf_build.shutil, "which", lambda name: None)
    # Set, so that teardown restores it: _configure writes os.environ.
    monkeypatch.setenv("MATURIN_PEP517_ARGS", "")
    monkeypatch.delenv("MLMF_JPEG", raising=False)


def test_cmake_comes_from_pypi_when_missing(no_tools):
    assert mlmf_build.CMAKE_REQUIREMENT in mlmf_build.get_requires_for_build_wheel()


def test_cmake_is_not_requested_when_present(monkeypatch):
    monkeypatch.setattr(mlmf_build.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("MLMF_JPEG", raising=False)
    assert mlmf_build.CMAKE_REQUIREMENT not in mlmf_build.get_requires_for_build_wheel()


def test_without_cmake_the_build_falls_back_with_a_warning(no_tools, capsys):
    mlmf_build._configure()
    assert "--no-default-features" in mlmf_build.os.environ["MATURIN_PEP517_ARGS"]
    assert "zune-jpeg" in capsys.readouterr().err


def test_the_choice_can_be_forced(no_tools, monkeypatch, capsys):
    monkeypatch.setenv("MLMF_JPEG", "turbo")
    mlmf_build._configure()
    assert mlmf_build.os.environ["MATURIN_PEP517_ARGS"] == ""
    assert "NASM not found" in capsys.readouterr().err
    monkeypatch.setenv("MLMF_JPEG", "rust")
    assert mlmf_build.CMAKE_REQUIREMENT not in mlmf_build.get_requires_for_build_wheel()
    monkeypatch.setenv("MLMF_JPEG", "fast")
    with pytest.raises(ValueError, match="MLMF_JPEG"):
        mlmf_build._configure()
