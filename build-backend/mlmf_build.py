"""mlmf's PEP 517 build backend: maturin's, with the JPEG decoder decided first.

mlmf decodes JPEG with libjpeg-turbo, the library Pillow uses, so that pixels are
identical; the Rust build compiles it from source with CMake (and its SIMD code with
NASM when NASM is found; without NASM the pixels are the same, decoding slower).

- CMake on PATH: used.
- No CMake: ``get_requires_for_build_wheel`` asks the installer for CMake from PyPI
  (pip installs it into the isolated build environment, whose scripts are on PATH).
- Still no CMake (``--no-build-isolation``, or an index without it): the wheel is built
  without the ``jpeg-turbo`` feature, JPEG goes through zune-jpeg (pure Rust, within a
  few levels of Pillow's pixels), and the build prints a warning.

``MLMF_JPEG=turbo`` fails the build instead of falling back; ``MLMF_JPEG=rust`` always
builds the pure-Rust decoder. ``mlmf.JPEG_DECODER`` says which one a build has.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from typing import Any, Optional

import maturin

CMAKE_REQUIREMENT = "cmake>=3.16"

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_wheel",
]


def _choice() -> str:
    choice = os.environ.get("MLMF_JPEG", "auto").strip().lower()
    if choice not in ("auto", "turbo", "rust"):
        raise ValueError(f"MLMF_JPEG={choice!r}: expected auto, turbo or rust")
    return choice


def get_requires_for_build_wheel(config_settings: Optional[Mapping[str, Any]] = None) -> list:
    reqs = list(maturin.get_requires_for_build_wheel(config_settings))
    if _choice() != "rust" and shutil.which("cmake") is None:
        reqs.append(CMAKE_REQUIREMENT)
    return reqs


get_requires_for_build_editable = get_requires_for_build_wheel
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
build_sdist = maturin.build_sdist


def _configure() -> None:
    """Adds ``--no-default-features`` to maturin's arguments when libjpeg-turbo cannot
    (or should not) be built, with a warning."""
    choice = _choice()
    if choice == "turbo" or (choice == "auto" and shutil.which("cmake") is not None):
        if shutil.which("nasm") is None and shutil.which("yasm") is None:
            _warn(
                "NASM not found: libjpeg-turbo is built without its SIMD code (the same "
                "pixels, slower JPEG decoding)"
            )
        return
    if choice == "auto":
        _warn(
            "CMake not found and not installable: building without libjpeg-turbo. JPEG "
            "goes through zune-jpeg (pure Rust), within a few levels of Pillow's pixels; "
            "install CMake (pip install cmake) and rebuild for identical pixels"
        )
    args = shlex.split(os.environ.get("MATURIN_PEP517_ARGS", ""))
    if "--no-default-features" not in args:
        args.append("--no-default-features")
    os.environ["MATURIN_PEP517_ARGS"] = shlex.join(args)


def _warn(message: str) -> None:
    print(f"mlmf build warning: {message}", file=sys.stderr, flush=True)


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Mapping[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    _configure()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(
    wheel_directory: str,
    config_settings: Optional[Mapping[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    _configure()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
