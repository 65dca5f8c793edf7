"""Video: frame sampling and decoded frames against the fixtures.

Sampling expectations are transformers' own outputs (video/sampling.json); frames are
Pillow's (GIF, WebP, PNG folder) and PyAV's (MP4) decodes. Frames are compared through a
VideoProcessor whose image pipeline does nothing (no resize, crop, rescale or normalise),
so its pixel_values are the uint8 frames as float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES, load_manifest

MANIFEST = load_manifest("video")
SAMPLING = json.loads((FIXTURES / "video" / "sampling.json").read_text(encoding="utf-8"))
NPZ = np.load(FIXTURES / "video" / "expected.npz")
CASES = {c["id"]: c for c in MANIFEST["cases"]}


def identity_ip() -> mlmf.ImageProcessor:
    return mlmf.ImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False
    )


def as_frames(pixel_values: np.ndarray) -> np.ndarray:
    """[T, 3, H, W] float32 of whole numbers -> [T, H, W, 3] uint8 (checked lossless)."""
    assert np.all(pixel_values == np.round(pixel_values))
    assert pixel_values.min() >= 0 and pixel_values.max() <= 255
    return pixel_values.transpose(0, 2, 3, 1).astype(np.uint8)


def _needs_av(case: dict) -> None:
    if case["input"].endswith(".mp4"):
        pytest.importorskip("av", reason="MP4 decoding needs PyAV (the `video` extra)")


# ---------------------------------------------------------------------------- sampling


def _sampling_id(c: dict) -> str:
    if "fps" in c:
        return f"T{c['total_num_frames']}@{c['video_fps']}->fps{c['fps']}"
    return f"T{c['total_num_frames']}-n{c['num_frames']}"


@pytest.mark.parametrize("case", SAMPLING["default"]["cases"], ids=_sampling_id)
def test_sample_indices_equal_transformers(case):
    total = case["total_num_frames"]
    if "fps" in case:
        vp = mlmf.VideoProcessor(num_frames=None, fps=case["fps"])
        call = lambda: vp.sample_indices(total, fps=case["video_fps"])  # noqa: E731
    else:
        # num_frames=None: transformers takes every frame.
        vp = mlmf.VideoProcessor(num_frames=case["num_frames"])
        call = lambda: vp.sample_indices(total)  # noqa: E731
    if case["ok"]:
        assert call() == case["value"]
    else:
        # transformers raises ValueError; mlmf an InputError (also a ValueError) that
        # says how many frames there are and how many were asked for.
        with pytest.raises(mlmf.InputError, match=rf"^video input.*\b{total} frames") as e:
            call()
        assert isinstance(e.value, ValueError)


@pytest.mark.skip(
    reason="sampling.json's `qwen2vl` cases record Qwen2-VL's own sampler (even frame "
    "counts, float arange); mlmf offers transformers' default sampler (uniform / fps) and "
    "windows only, so these cases are information"
)
def test_qwen2vl_sampler_cases():
    pass


def test_window_indices_follow_the_rule():
    # 10 frames, windows of 4 every 4 frames, 2 frames each: windows start at 0 and 4
    # (a third would need frames 8..11), frames i * 4 // 2 inside each.
    vp = mlmf.VideoProcessor(window_frames=4, frames_per_window=2)
    assert vp.sample_indices(10) == [[0, 2], [4, 6]]
    # In seconds at 15 fps: round(0.5 * 15) = 8 frames (half away from zero), stride 8.
    vp = mlmf.VideoProcessor(window_seconds=0.5, frames_per_window=2)
    assert vp.sample_indices(30, fps=15.0) == [[0, 4], [8, 12], [16, 20]]
    # At most 2 of the 3 windows, spread by the uniform rule: windows 0 and 1.
    vp = mlmf.VideoProcessor(window_seconds=0.5, frames_per_window=2, max_windows=2)
    assert vp.sample_indices(30, fps=15.0) == [[0, 4], [8, 12]]


# ------------------------------------------------------------------------------ frames


FRAME_CASES = [c for c in MANIFEST["cases"] if "expected" in c]


@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: c["id"])
def test_all_frames_equal_reference(case):
    _needs_av(case)
    want = NPZ[case["expected"]["key"]]
    total = want.shape[0]
    vp = mlmf.VideoProcessor(num_frames=total, image=identity_ip())
    out = vp(str(FIXTURES / case["input"]))
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == (1, total, 3, want.shape[1], want.shape[2])
    assert out["indices"] == [list(range(total))]
    meta = out["meta"][0]
    assert meta["total_frames"] == total
    assert (meta["width"], meta["height"]) == (want.shape[2], want.shape[1])
    got = as_frames(out["pixel_values"][0])
    for t in range(total):
        np.testing.assert_array_equal(got[t], want[t], err_msg=f"{case['id']} frame {t}")


@pytest.mark.parametrize(
    "case",
    [c for c in FRAME_CASES if c["input"].endswith((".gif", ".webp"))],
    ids=lambda c: c["id"],
)
def test_animated_bytes_equal_path(case):
    want = NPZ[case["expected"]["key"]]
    vp = mlmf.VideoProcessor(num_frames=4, image=identity_ip())
    out = vp((FIXTURES / case["input"]).read_bytes())
    idx = out["indices"][0]
    assert idx == [i * want.shape[0] // 4 for i in range(4)]
    np.testing.assert_array_equal(as_frames(out["pixel_values"][0]), want[idx])


def test_animation_frame_rate_from_delays():
    """GIF/WebP carry per-frame delays; their mean gives the video's fps in meta."""
    for cid in ("frames__anim_12f_64x48.gif", "frames__anim_8f_64x48.webp"):
        case = CASES[cid]
        delays = [f["duration_ms"] for f in case["frames"]]
        fps = 1000.0 / (sum(delays) / len(delays))
        out = mlmf.VideoProcessor(num_frames=2, image=identity_ip())(str(FIXTURES / case["input"]))
        assert out["meta"][0]["fps"] == pytest.approx(fps, rel=1e-6), cid


@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: c["id"])
def test_frames_equal_the_image_path(case):
    """Each processed video frame equals the image processor applied to that frame."""
    _needs_av(case)
    ip = mlmf.ImageProcessor()  # CLIP: resize, crop, rescale, normalise
    vp = mlmf.VideoProcessor(num_frames=4, image=ip)
    out = vp(str(FIXTURES / case["input"]))
    frames = NPZ[case["expected"]["key"]]
    assert out["pixel_values"].shape == (1, 4, 3, 224, 224)
    for t, i in enumerate(out["indices"][0]):
        np.testing.assert_array_equal(
            out["pixel_values"][0, t], ip(frames[i])[0], err_msg=f"{case['id']} frame {i}"
        )


def test_load_video_indices_and_frames():
    av_case = CASES["load_video__clip_30f_64x48.mp4__n8"]
    _needs_av(av_case)
    full = NPZ[CASES["frames__clip_30f_64x48.mp4"]["expected"]["key"]]
    vp = mlmf.VideoProcessor(num_frames=8, image=identity_ip())
    out = vp(str(FIXTURES / av_case["input"]))
    assert out["indices"] == [av_case["frames_indices"]]
    meta = out["meta"][0]
    assert meta["total_frames"] == av_case["metadata"]["total_num_frames"]
    assert meta["fps"] == pytest.approx(av_case["metadata"]["fps"])
    np.testing.assert_array_equal(
        as_frames(out["pixel_values"][0]), full[av_case["frames_indices"]]
    )


def test_fps_sampling_on_the_mp4():
    case = CASES["frames__clip_30f_64x48.mp4"]
    _needs_av(case)
    full = NPZ[case["expected"]["key"]]
    # 30 frames at 15 fps, 4 fps wanted: n = int(30 / 15 * 4) = 8 -> i * 30 // 8.
    vp = mlmf.VideoProcessor(num_frames=None, fps=4, image=identity_ip())
    out = vp(str(FIXTURES / case["input"]))
    idx = out["indices"][0]
    assert idx == [0, 3, 7, 11, 15, 18, 22, 26]
    np.testing.assert_array_equal(as_frames(out["pixel_values"][0]), full[idx])


def test_array_input_with_fps():
    full = NPZ[CASES["frames__clip_30f_64x48.mp4"]["expected"]["key"]]
    vp = mlmf.VideoProcessor(num_frames=None, fps=4, image=identity_ip())
    out = vp(np.ascontiguousarray(full), fps=15.0)
    idx = out["indices"][0]
    assert idx == [0, 3, 7, 11, 15, 18, 22, 26]
    np.testing.assert_array_equal(as_frames(out["pixel_values"][0]), full[idx])


def test_batch_of_videos():
    gif = CASES["frames__anim_12f_64x48.gif"]
    folder = CASES["frames__frames_10"]
    vp = mlmf.VideoProcessor(num_frames=3, image=identity_ip())
    out = vp([str(FIXTURES / gif["input"]), str(FIXTURES / folder["input"])])
    assert out["pixel_values"].shape == (2, 3, 3, 48, 64)
    assert out["indices"] == [[0, 4, 8], [0, 3, 6]]
    np.testing.assert_array_equal(
        as_frames(out["pixel_values"][0]), NPZ[gif["expected"]["key"]][[0, 4, 8]]
    )
    np.testing.assert_array_equal(
        as_frames(out["pixel_values"][1]), NPZ[folder["expected"]["key"]][[0, 3, 6]]
    )


def test_windows_shape_and_frames():
    gif = CASES["frames__anim_12f_64x48.gif"]
    folder = CASES["frames__frames_10"]
    vp = mlmf.VideoProcessor(
        window_frames=4, frames_per_window=2, max_windows=2, image=identity_ip()
    )
    out = vp([str(FIXTURES / gif["input"]), str(FIXTURES / folder["input"])])
    pv = out["pixel_values"]
    assert pv.shape == (2, 2, 2, 3, 48, 64)  # [B, W, K, 3, H, W]
    # 12 frames -> 3 windows, 2 kept (0 and 1); 10 frames -> 2 windows.
    want_idx = [[[0, 2], [4, 6]], [[0, 2], [4, 6]]]
    for b, (case, windows) in enumerate(zip((gif, folder), want_idx)):
        frames = NPZ[case["expected"]["key"]]
        flat = [i for w in windows for i in w]
        assert out["indices"][b] == flat
        for w, idx in enumerate(windows):
            np.testing.assert_array_equal(as_frames(pv[b, w]), frames[idx])
