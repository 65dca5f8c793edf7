"""Container video (MP4, WebM, MKV, AVI, MOV, ...) -> sampled RGB frames, with PyAV.

The Rust core decodes animated GIF/WebP and frame directories itself. Other containers
are decoded here: :class:`mlmf.VideoProcessor` calls :func:`read_sampled` for them, which
asks the processor's own sampler (``VideoProcessor.sample_indices``, the same code that
samples GIFs and arrays) which frames to take, decodes the stream in order up to the last
of them, converts only those to arrays and stops. PyAV is an optional dependency:
``pip install mlmf[video]``.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any, BinaryIO, Optional, Union

from mlmf._mlmf import DecodeError, InputError, VideoProcessor

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["read_sampled", "read_video"]


def _import_av(source: Any = None, index: int = 0) -> Any:
    """PyAV, or an error that says why it is needed: an ``ImportError`` when ``source``
    looks like a video container, a ``DecodeError`` when it is not a video at all."""
    try:
        import av
    except ImportError as e:
        if source is not None:
            container = _container_name(_head(source, index))
            if container is None:
                raise DecodeError(
                    f"video input {index}: cannot decode: not an animated GIF or WebP and not "
                    "a video container (MP4, MOV, WebM, MKV, AVI, FLV, MPEG, Ogg, ASF)"
                ) from None
            what = f"this {container} video"
        else:
            what = "container video"
        raise ImportError(
            f"mlmf decodes {what} with PyAV, which is not installed: pip install mlmf[video]"
        ) from e
    return av


#: Leading bytes of the containers PyAV (FFmpeg) opens, as ``(offset, magic, name)``.
_CONTAINERS = (
    (4, b"ftyp", "MP4/MOV"),
    (4, b"moov", "MOV"),
    (4, b"mdat", "MOV"),
    (4, b"wide", "MOV"),
    (4, b"free", "MOV"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"FLV", "FLV"),
    (0, b"OggS", "Ogg"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x00\x00\x01\xb3", "MPEG video"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMV"),
)


def _container_name(head: Optional[bytes]) -> Optional[str]:
    """The container ``head`` (a file's first bytes) starts, or None; unknown (a
    stream that cannot be peeked) counts as a container."""
    if head is None:
        return "container"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "AVI"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "MPEG-TS"
    for offset, magic, name in _CONTAINERS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _head(source: Any, index: int) -> Optional[bytes]:
    """The first bytes of a video source (None for a stream that cannot seek back)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:512])
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return f.read(512)
        except OSError as e:
            raise DecodeError(f"video input {index}: cannot read {os.fspath(source)}: {e}") from e
    if hasattr(source, "read") and getattr(source, "seekable", lambda: False)():
        pos = source.tell()
        head = source.read(512)
        source.seek(pos)
        return bytes(head)
    return None


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


def _open(av: Any, source: Union[str, os.PathLike[str], bytes, BinaryIO], index: int) -> Any:
    src: Any = source
    if isinstance(source, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(source))
    elif isinstance(source, os.PathLike):
        src = os.fspath(source)
    try:
        return av.open(src)
    except Exception as e:  # PyAV raises several error types for unreadable input
        raise DecodeError(f"video input {index}: cannot decode: {e}") from e


def read_sampled(
    source: Union[str, os.PathLike[str], bytes, BinaryIO],
    processor: VideoProcessor,
    index: int = 0,
) -> tuple[npt.NDArray[np.uint8], list[int], int, Optional[float]]:
    """Decodes the frames ``processor`` samples from a container video.

    Returns ``(frames, indices, total, fps)``: uint8 ``[N, H, W, 3]`` RGB frames, the frame
    numbers they are (ascending, each once), the stream's frame count and its frame rate
    (``None`` when the container does not say). ``index`` is the input's position in its
    batch, for error messages.
    """
    av = _import_av(source, index)
    import numpy as np

    with _open(av, source, index) as container:
        if not container.streams.video:
            raise InputError(
                f"video input {index}: the container has no video stream: expected a video file "
                "(MP4, WebM, MKV, AVI, MOV, ...), an animated GIF/WebP or a frame directory"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else None
        try:
            total = _count_frames(container, stream)
        except av.error.FFmpegError as e:
            raise DecodeError(f"video input {index}: cannot decode: {e}") from e
        if total == 0:
            raise InputError(
                f"video input {index}: the video stream has no frames: expected at least one"
            )
        plan = processor.sample_indices(total, video_fps)
        flat = [i for w in plan for i in w] if plan and isinstance(plan[0], list) else plan
        wanted = sorted(set(flat))
        decoded: list[Any] = []
        n_seen = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                n_seen = i + 1
                if i == wanted[len(decoded)]:
                    decoded.append(frame.to_ndarray(format="rgb24"))
                    if len(decoded) == len(wanted):
                        break
        except av.error.FFmpegError as e:
            raise DecodeError(f"video input {index}: cannot decode: frame {n_seen}: {e}") from e
        if len(decoded) < len(wanted):
            raise DecodeError(
                f"video input {index}: cannot decode: the stream ended after {n_seen} frames, "
                f"frame {wanted[len(decoded)]} was sampled (the container reports {total} frames)"
            )
    return np.stack(decoded), wanted, total, video_fps


def read_video(
    source: Union[str, os.PathLike[str], bytes, BinaryIO],
    processor: Optional[VideoProcessor] = None,
) -> tuple[npt.NDArray[np.uint8], list[int], dict[str, Any]]:
    """Decodes the frames a sampler takes from a container video, without preprocessing.

    ``processor`` supplies the sampler (default: ``VideoProcessor()``, 8 frames spread
    uniformly). Returns ``(frames, indices, meta)``: uint8 ``[N, H, W, 3]`` in sampling
    order (a frame sampled twice appears twice), the sampled frame numbers, and ``meta``
    with ``total_frames``, ``fps``, ``width``, ``height``.
    """
    processor = processor or VideoProcessor()
    frames, wanted, total, fps = read_sampled(source, processor)
    plan = processor.sample_indices(total, fps)
    flat = [i for w in plan for i in w] if plan and isinstance(plan[0], list) else plan
    rows = {f: r for r, f in enumerate(wanted)}
    ordered = frames[[rows[i] for i in flat]]
    meta = {
        "total_frames": total,
        "fps": fps,
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
    }
    return ordered, list(flat), meta
