"""Container video (MP4, WebM, MKV, AVI, ...) -> sampled RGB frames, with PyAV.

The Rust core decodes animated GIF/WebP and frame directories itself; every other
container is decoded here and handed to :class:`mlmf.VideoProcessor` as a uint8
``[T, H, W, 3]`` array. PyAV is an optional dependency: ``pip install mlmf[video]``.

Frame selection uses the same rules as the Rust samplers (``FrameSampler`` in
``crates/mlmf/src/preprocess/video/sample.rs``), which for ``uniform`` and ``fps`` equal
transformers' ``default_sample_indices_fn``:

* uniform: index ``i`` is ``i * total // n`` for ``i in range(n)``;
* fps: ``n = max(1, int(total / video_fps * fps))`` frames, then uniform;
* windows: windows of ``L`` frames every ``S`` frames, ``K`` uniform frames in each
  (the full rule is in :func:`window_indices`);
* all: every frame.

Only what is needed is decoded: packets are decoded in order up to the last sampled
frame and decoding stops there; only sampled frames are converted to arrays.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any, BinaryIO, Optional, Union

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

try:  # the package's exception hierarchy, when the native module is built
    from mlmf._mlmf import ConfigError, DecodeError, InputError
except ImportError:  # pragma: no cover - pure-Python use of the helpers

    class InputError(ValueError):  # type: ignore[no-redef]
        """A bad input (stand-in when the native module is unavailable)."""

    class DecodeError(InputError):  # type: ignore[no-redef]
        """Undecodable input (stand-in when the native module is unavailable)."""

    class ConfigError(ValueError):  # type: ignore[no-redef]
        """An invalid setting (stand-in when the native module is unavailable)."""


__all__ = [
    "fps_indices",
    "read_video",
    "sample_indices",
    "uniform_indices",
    "window_indices",
]

_SHORT_VIDEO = ("error", "repeat", "pad_last")


def _input_error(message: str) -> InputError:
    return InputError(f"video input: {message}")


def _too_few(total: int, n: int) -> InputError:
    return _input_error(f"video has {total} frames, sampler asked for {n}")


def uniform_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread over ``total`` frames: ``i * total // n``.

    Equals transformers' ``np.arange(n, dtype=int) * total // n``. ``n == 0`` gives
    ``[]``; ``n > total`` raises :class:`mlmf.InputError`.
    """
    total, n = int(total), int(n)
    if total < 0 or n < 0:
        raise _input_error(f"frame counts must be >= 0, got total={total}, n={n}")
    if n > total:
        raise _too_few(total, n)
    return [i * total // n for i in range(n)]


def _fps_frame_count(total: int, video_fps: float, fps: float) -> int:
    video_fps, fps = float(video_fps), float(fps)
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise _input_error(f"video frame rate must be a positive finite number, got {video_fps}")
    if not (math.isfinite(fps) and fps > 0):
        raise ConfigError(
            f"invalid config at `sampler.fps`: must be a positive finite number, got {fps}"
        )
    # float64 division then multiplication, truncated: transformers' rule.
    return max(1, int(int(total) / video_fps * fps))


def fps_indices(total: int, video_fps: float, fps: float) -> list[int]:
    """Indices for a target rate: ``uniform_indices(total, max(1, int(total / video_fps * fps)))``."""
    return uniform_indices(total, _fps_frame_count(total, video_fps, fps))


def _counted(total: int, n: int, short_video: str) -> list[int]:
    if n <= total:
        return uniform_indices(total, n)
    if total == 0 or short_video == "error":
        raise _too_few(total, n)
    if short_video == "repeat":
        return [i * total // n for i in range(n)]
    return [min(i, total - 1) for i in range(n)]


def _round_half_away(x: float) -> float:
    # Rust's f64::round (half away from zero), not Python's round-half-even.
    r = math.floor(x)
    return r + 1 if x - r >= 0.5 else r


def _seconds_to_frames(seconds: float, fps: Optional[float], field: str) -> int:
    if fps is None:
        raise _input_error(
            f"sampler.{field} needs the video's frame rate, which is unknown: "
            "pass fps with the frames or set default_fps"
        )
    frames = _round_half_away(float(seconds) * float(fps))
    if not math.isfinite(frames):
        raise _input_error(
            f"sampler.{field} = {seconds} s at {fps} fps is not a usable frame count"
        )
    return max(1, int(frames))


def window_indices(
    total: int,
    fps: Optional[float],
    *,
    frames_per_window: int,
    window_frames: Optional[int] = None,
    window_seconds: Optional[float] = None,
    stride_frames: Optional[int] = None,
    stride_seconds: Optional[float] = None,
    max_windows: Optional[int] = None,
    short_video: str = "error",
) -> list[list[int]]:
    """Frame indices per temporal window (the Rust ``FrameSampler::Windows`` rule).

    1. Window length ``L``: ``window_frames``, or ``round(window_seconds * fps)`` (>= 1).
    2. Stride ``S``: ``stride_frames``, or ``round(stride_seconds * fps)`` (>= 1), else ``L``.
    3. Windows start at ``0, S, 2S, ...`` and must fit: ``(total - L) // S + 1`` of them.
       A video shorter than ``L`` is an error unless ``short_video`` allows repeats; then
       it is one window over the whole video.
    4. With ``max_windows = m`` and more candidates, windows ``j * count // m`` are kept.
    5. Window at ``s``: frames ``s + i * L // K`` for ``i in range(K)``,
       ``K = frames_per_window``.

    Rounding is half away from zero.
    """
    if (window_frames is None) == (window_seconds is None):
        raise ConfigError(
            "invalid config at `sampler`: set exactly one of window_frames and window_seconds"
        )
    if stride_frames is not None and stride_seconds is not None:
        raise ConfigError(
            "invalid config at `sampler`: set at most one of stride_frames and stride_seconds"
        )
    if frames_per_window < 1 or (max_windows is not None and max_windows < 1):
        raise ConfigError(
            "invalid config at `sampler`: frames_per_window and max_windows must be >= 1"
        )
    length = (
        int(window_frames)
        if window_frames is not None
        else _seconds_to_frames(float(window_seconds or 0.0), fps, "window_seconds")
    )
    if stride_frames is not None:
        stride = int(stride_frames)
    elif stride_seconds is not None:
        stride = _seconds_to_frames(stride_seconds, fps, "stride_seconds")
    else:
        stride = length
    if length < 1 or stride < 1:
        raise ConfigError(
            "invalid config at `sampler`: window length and stride must be >= 1 frame"
        )
    if total <= 0:
        raise _input_error("video has no frames")
    if total < length:
        if short_video == "error":
            raise _input_error(f"video has {total} frames, a window needs {length}")
        length = total
    count = (total - length) // stride + 1
    chosen = (
        uniform_indices(count, max_windows)
        if max_windows is not None and count > max_windows
        else list(range(count))
    )
    out = []
    for w in chosen:
        start = w * stride
        try:
            inner = _counted(length, frames_per_window, short_video)
        except InputError:
            raise _input_error(
                f"window has {length} frames, sampler asked for {frames_per_window} per window"
            ) from None
        out.append([start + i for i in inner])
    return out


def sample_indices(
    total: int,
    video_fps: Optional[float] = None,
    *,
    sampler: Optional[str] = None,
    num_frames: Optional[int] = None,
    fps: Optional[float] = None,
    default_fps: Optional[float] = None,
    max_frames: int = 512,
    short_video: str = "error",
    **window: Any,
) -> list[list[int]]:
    """Index lists for a video of ``total`` frames: one per window, else a single list.

    ``sampler`` is ``"uniform"`` (needs ``num_frames``), ``"fps"`` (needs ``fps``),
    ``"windows"`` (keywords of :func:`window_indices`) or ``"all"``. Left out, it is
    inferred: ``num_frames`` -> uniform, ``fps`` -> fps, window keywords -> windows,
    nothing -> all (as transformers' ``load_video``). ``video_fps`` falls back to
    ``default_fps``. ``max_frames`` bounds the frames taken; ``short_video`` is
    ``"error"`` (default, as transformers), ``"repeat"`` or ``"pad_last"``.
    """
    if short_video not in _SHORT_VIDEO:
        raise ConfigError(
            f"invalid config at `short_video`: expected one of {', '.join(_SHORT_VIDEO)}, got {short_video!r}"
        )
    if sampler is None:
        if num_frames is not None and fps is not None:
            raise ConfigError(
                "invalid config at `sampler`: num_frames and fps are mutually exclusive"
            )
        sampler = (
            "uniform"
            if num_frames is not None
            else "fps"
            if fps is not None
            else "windows"
            if window
            else "all"
        )
    if window and sampler != "windows":
        raise ConfigError(
            f"invalid config at `sampler`: {', '.join(sorted(window))} only apply to the windows sampler"
        )
    total = int(total)
    if total <= 0:
        raise _input_error("video has no frames")
    rate = video_fps if video_fps is not None else default_fps
    if sampler == "uniform":
        if num_frames is None or int(num_frames) < 1:
            raise ConfigError(
                f"invalid config at `sampler.num_frames`: must be at least 1, got {num_frames}"
            )
        plan = [_counted(total, int(num_frames), short_video)]
    elif sampler == "fps":
        if fps is None:
            raise ConfigError("invalid config at `sampler.fps`: the fps sampler needs fps")
        if rate is None:
            raise _input_error(
                "the fps sampler needs the video's frame rate, which is unknown: "
                "pass fps with the frames or set default_fps"
            )
        plan = [_counted(total, _fps_frame_count(total, rate, fps), short_video)]
    elif sampler == "windows":
        if "frames_per_window" not in window:
            raise ConfigError(
                "invalid config at `sampler.frames_per_window`: required by the windows sampler"
            )
        plan = window_indices(total, rate, short_video=short_video, **window)
    elif sampler == "all":
        plan = [list(range(total))]
    else:
        raise ConfigError(
            f"invalid config at `sampler`: expected uniform, fps, windows or all, got {sampler!r}"
        )
    taken = sum(len(p) for p in plan)
    if taken > max_frames:
        raise _input_error(
            f"sampler takes {taken} frames from a video of {total}, more than max_frames = {max_frames}"
        )
    return plan


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "mlmf.video.read_video decodes container video with PyAV, which is not installed: "
            "pip install mlmf[video]"
        ) from e
    return av


def _count_frames(container: Any, stream: Any) -> int:
    """Frames in ``stream``: the header's count when set, else one per demuxed packet
    (no decoding). The container is rewound afterwards."""
    if stream.frames:
        return int(stream.frames)
    n = 0
    for packet in container.demux(stream):
        # The demuxer ends with an empty flush packet, which holds no frame.
        if packet.size > 0:
            n += 1
    container.seek(0)
    return n


def read_video(
    path: Union[str, os.PathLike[str], bytes, BinaryIO],
    sampler: Optional[str] = None,
    num_frames: Optional[int] = None,
    fps: Optional[float] = None,
    *,
    default_fps: Optional[float] = None,
    max_frames: int = 512,
    short_video: str = "error",
    **window: Any,
) -> tuple[npt.NDArray[np.uint8], list[int], dict[str, Any]]:
    """Decodes the sampled frames of a container video.

    Returns ``(frames, indices, meta)``: ``frames`` uint8 ``[N, H, W, 3]`` RGB, one per
    entry of ``indices`` (the sampled frame numbers, windows one after another; a frame
    sampled twice appears twice), and ``meta`` with ``total_frames``, ``fps``, ``width``,
    ``height``, ``duration`` (seconds), ``windows`` (the index list per window) and
    ``backend``. Sampling arguments are those of :func:`sample_indices`.

    The returned frames are already sampled: pass them on with their indices, or give
    a processor whose sampler is ``all`` if it must not sample again.
    """
    av = _import_av()
    import numpy as np

    source: Any = path
    if isinstance(path, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(path))
    elif isinstance(path, os.PathLike):
        source = os.fspath(path)
    try:
        container = av.open(source)
    except Exception as e:  # PyAV raises several error types for unreadable input
        raise DecodeError(f"video input: cannot decode: {e}") from e
    with container:
        if not container.streams.video:
            raise _input_error("the container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else None
        try:
            total = _count_frames(container, stream)
        except av.error.FFmpegError as e:
            raise DecodeError(f"video input: cannot decode: {e}") from e
        plan = sample_indices(
            total,
            video_fps,
            sampler=sampler,
            num_frames=num_frames,
            fps=fps,
            default_fps=default_fps,
            max_frames=max_frames,
            short_video=short_video,
            **window,
        )
        flat = [i for w in plan for i in w]
        wanted = sorted(set(flat))
        last = wanted[-1]
        decoded: dict[int, Any] = {}
        next_pos = 0
        n_seen = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                n_seen = i + 1
                if i == wanted[next_pos]:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                    next_pos += 1
                if i >= last:
                    break
        except av.error.FFmpegError as e:
            raise DecodeError(f"video input: cannot decode: frame {n_seen}: {e}") from e
        if len(decoded) < len(wanted):
            raise DecodeError(
                f"video input: cannot decode: the stream ended after {n_seen} frames, "
                f"frame {wanted[len(decoded)]} was sampled (the container reports {total} frames)"
            )
    frames = np.stack([decoded[i] for i in flat])
    height, width = int(frames.shape[1]), int(frames.shape[2])
    meta = {
        "total_frames": total,
        "fps": video_fps if video_fps is not None else default_fps,
        "width": width,
        "height": height,
        "duration": total / video_fps if video_fps else None,
        "windows": plan,
        "backend": "pyav",
    }
    return frames, flat, meta
