"""What a video that cannot be decoded raises, with and without PyAV.

A file or bytes that are not a decodable video are a ``DecodeError`` naming the input;
only a real container (MP4, WebM, ...) that needs PyAV asks for PyAV when it is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mlmf
from conftest import FIXTURES

MP4 = FIXTURES / "video" / "inputs" / "clip_30f_64x48.mp4"
GIF = FIXTURES / "video" / "inputs" / "anim_12f_64x48.gif"


@pytest.fixture
def no_av(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV made unimportable (``import av`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "av", None)


@pytest.fixture
def vp() -> mlmf.VideoProcessor:
    return mlmf.VideoProcessor(num_frames=2)


def _garbage(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


NOT_VIDEOS = {
    "bytes": lambda tmp: b"this is not a video at all" * 20,
    "mp4_named": lambda tmp: _garbage(tmp, "x.mp4", b"\x00garbage" * 40),
    "no_extension": lambda tmp: _garbage(tmp, "clip", b"\x00garbage" * 40),
    "gif_named": lambda tmp: _garbage(tmp, "x.gif", b"\x00garbage" * 40),
    "corrupt_gif": lambda tmp: GIF.read_bytes()[:6] + bytes(range(60)),
    "corrupt_gif_file": lambda tmp: _garbage(tmp, "c.gif", GIF.read_bytes()[:40]),
    "three_bytes": lambda tmp: b"GIF",
}


@pytest.mark.parametrize("case", sorted(NOT_VIDEOS))
def test_a_non_video_is_a_decode_error_without_pyav(case, tmp_path, no_av, vp):
    src = NOT_VIDEOS[case](tmp_path)
    good = GIF.read_bytes()
    with pytest.raises(mlmf.DecodeError, match=r"video input 1: cannot"):
        vp([good, src])


@pytest.mark.parametrize("case", sorted(NOT_VIDEOS))
def test_a_non_video_is_a_decode_error_with_pyav(case, tmp_path, vp):
    pytest.importorskip("av", reason="needs PyAV (the `video` extra)")
    src = NOT_VIDEOS[case](tmp_path)
    with pytest.raises(mlmf.DecodeError, match=r"video input 0: cannot"):
        vp([src])


def test_a_real_container_asks_for_pyav(tmp_path, no_av, vp):
    for src in (MP4, MP4.read_bytes(), str(MP4)):
        with pytest.raises(ImportError, match=r"MP4/MOV video with PyAV.*mlmf\[video\]"):
            vp([src])
    webm = _garbage(tmp_path, "v.webm", b"\x1a\x45\xdf\xa3" + bytes(200))
    with pytest.raises(ImportError, match="Matroska/WebM"):
        vp([webm])


def test_gif_and_webp_need_no_pyav(no_av, vp):
    out = vp([GIF, FIXTURES / "video" / "inputs" / "anim_8f_64x48.webp"])
    assert out["pixel_values"].shape[:2] == (2, 2)


def test_a_missing_container_file_is_named(tmp_path, no_av, vp):
    with pytest.raises(mlmf.DecodeError, match=r"video input 0: cannot read .*nothing\.mp4"):
        vp([tmp_path / "nothing.mp4"])
