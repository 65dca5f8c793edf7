"""Synthetic shapes: a small dataset whose right answers are known.

A scene is one coloured shape (circle, square, triangle or plus-shaped cross) on a plain
grey background at a known position. From a :class:`Scene` this module renders the image
(:func:`render`), a short clip of the shape moving (:func:`render_clip`), the fraction of
each patch the object covers (:func:`coverage`), and the caption (``"red circle"``) that
the bundled spoken captions (``mlmf/data/shapes/speech``) say aloud. :func:`write_dataset`
writes train/val/test splits as JSON lines with PNG images, GIF clips and FLAC speech.

Geometry: coordinates are fractions of the image side, ``(0, 0)`` the top-left corner.
A scene's ``cx, cy`` is the centre of the object's bounding box, ``size`` the box's side.
Every shape fills that box's width and height (the triangle points up). Images are square,
so the bundled CLIP processor (shortest edge to 30 px, centre crop 30x30, 6-px patches)
sees the whole image, and ``coverage(scene, grid=5)`` says which of its 5x5 patches hold
the object.

Rendering is anti-aliased by supersampling (4x4 samples a pixel, box-averaged);
:func:`coverage` averages the very same samples, so a pixel differs from the background
exactly where :func:`mask` is above 0. The same seed gives the same bytes. Only numpy is
needed: PNG and GIF are written by the small encoders below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

RGB = tuple[int, int, int]
_PathArg = Union[str, "os.PathLike[str]"]

#: Object colours, name -> RGB (0..255), in label order.
COLOURS: OrderedDict[str, RGB] = OrderedDict(
    red=(220, 40, 40), green=(40, 170, 60), blue=(40, 90, 220),
    yellow=(240, 210, 30), purple=(150, 60, 200), orange=(245, 140, 20),
)  # fmt: skip

#: Shapes, in label order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: The bundled spoken captions: ``{colour}_{shape}_{voice}.flac``, 16 kHz mono.
SPEECH_DIR: Path = Path(__file__).resolve().parent / "data" / "shapes" / "speech"

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # noise hash
SUPERSAMPLE = 4  # samples per pixel side
NOISE_STEP = 2  # background noise: -NOISE_STEP, 0 or +NOISE_STEP on every channel
MARGIN = 0.02  # gap kept between the object and the image border
MAX_SHIFT = 0.25  # largest motion along each axis over a clip
SIZE_RANGE = (0.3, 0.5)
LIGHT_GREYS = (190, 230)
DARK_GREYS = (25, 70)
MAX_TINT = 8


def caption(colour: str, shape: str) -> str:
    """The caption of a (colour, shape) pair: ``caption("red", "circle") == "red circle"``."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}: expected one of {list(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {list(SHAPES)}")
    return f"{colour} {shape}"


def class_index(colour: str, shape: str) -> int:
    """The label of a (colour, shape) pair: ``colour_index * len(SHAPES) + shape_index``."""
    caption(colour, shape)  # validates both names
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def _class_of(label: int) -> tuple[str, str]:
    colours = list(COLOURS)
    return colours[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


#: The 24 captions in label order: ``CLASSES[class_index(c, s)] == caption(c, s)``.
CLASSES: tuple[str, ...] = tuple(caption(*_class_of(i)) for i in range(len(COLOURS) * len(SHAPES)))


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape on a plain background.

    Attributes:
        id: unique name; also seeds the background noise and names the written files.
        colour: a key of :data:`COLOURS`.
        shape: one of :data:`SHAPES`.
        cx, cy: centre of the object's bounding box, as fractions of the image side.
        size: side of the object's bounding box, as a fraction of the image side.
        background: background RGB (light or dark grey with a small tint).
        motion: ``(dx, dy)``, how far the object travels over a clip (image fractions).
        voice: which spoken-caption variant goes with the scene.
    """

    id: str
    colour: str
    shape: str
    cx: float
    cy: float
    size: float
    background: RGB
    motion: tuple[float, float] = (0.0, 0.0)
    voice: int = 0

    @property
    def caption(self) -> str:
        """``"<colour> <shape>"``."""
        return caption(self.colour, self.shape)

    @property
    def label(self) -> int:
        """The class index, see :func:`class_index`."""
        return class_index(self.colour, self.shape)

    def at_frame(self, index: int, frames: int) -> Scene:
        """The still scene at frame ``index`` of a ``frames``-frame clip: the object has
        moved by ``index / (frames - 1)`` of ``motion``, kept inside the image."""
        if frames < 1 or not 0 <= index < frames:
            raise ValueError(f"frame {index} out of range for a clip of {frames} frames")
        f = index / (frames - 1) if frames > 1 else 0.0
        half = self.size / 2
        lo, hi = min(half, 0.5), max(1 - half, 0.5)
        cx = float(np.clip(self.cx + self.motion[0] * f, lo, hi))
        cy = float(np.clip(self.cy + self.motion[1] * f, lo, hi))
        return dataclasses.replace(self, cx=cx, cy=cy, motion=(0.0, 0.0))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` turns it back into the scene."""
        d = dataclasses.asdict(self)
        d["background"] = list(self.background)
        d["motion"] = list(self.motion)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        """The inverse of :meth:`to_dict`."""
        bg = [int(v) for v in d["background"]]
        dx, dy = (float(v) for v in d.get("motion", (0.0, 0.0)))
        fields = {k: d[k] for k in ("id", "colour", "shape", "cx", "cy", "size", "voice") if k in d}
        return Scene(**fields, background=(bg[0], bg[1], bg[2]), motion=(dx, dy))


# --- geometry -------------------------------------------------------------------------


def _samples(size: int) -> npt.NDArray[np.float64]:
    """Sample positions along one axis: ``SUPERSAMPLE`` evenly spaced points a pixel."""
    n = size * SUPERSAMPLE
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def _inside(scene: Scene, size: int) -> npt.NDArray[np.bool_]:
    """Which supersamples ``[size * S, size * S]`` (row = y) fall inside the object."""
    if size < 1:
        raise ValueError(f"image size must be at least 1, got {size}")
    if not scene.size > 0:
        raise ValueError(f"object size must be positive, got {scene.size}")
    s = _samples(size)
    u = ((s - scene.cx) / scene.size)[None, :]  # x, in units of the object's extent
    v = ((s - scene.cy) / scene.size)[:, None]  # y
    if scene.shape == "circle":
        return u * u + v * v <= 0.25
    if scene.shape == "square":
        return (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if scene.shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the box.
        return (v <= 0.5) & (np.abs(u) <= (v + 0.5) / 2)
    if scene.shape == "cross":
        bar = 1 / 6  # half the thickness of each bar
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.5) & (av <= bar)) | ((au <= bar) & (av <= 0.5))
    raise ValueError(f"unknown shape {scene.shape!r}: expected one of {list(SHAPES)}")


def mask(scene: Scene, size: int = 60) -> npt.NDArray[np.float32]:
    """The object's opacity per pixel, ``float32 [size, size]``: the fraction of the pixel's
    supersamples inside the object (a multiple of 1/16)."""
    k = SUPERSAMPLE
    inside = _inside(scene, size).reshape(size, k, size, k)
    return inside.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def coverage(scene: Scene, grid: int = 5, size: int = 60) -> npt.NDArray[np.float32]:
    """Fraction of each of ``grid x grid`` cells (row = y) covered by the object,
    ``float32 [grid, grid]``, from the same supersamples :func:`render` uses at ``size``.

    With ``grid=5`` the cells are the patches of the bundled CLIP (30x30 crop, 6-px
    patches). When ``size`` is a multiple of ``grid`` each pixel lies in one cell and a
    cell's coverage is the mean of :func:`mask` over its pixels."""
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    inside = _inside(scene, size).astype(np.float64)
    cell = np.minimum((_samples(size) * grid).astype(np.int64), grid - 1)
    onehot = (cell[None, :] == np.arange(grid)[:, None]).astype(np.float64)  # [grid, n]
    counts = onehot.sum(axis=1)
    covered = onehot @ inside @ onehot.T
    return (covered / np.outer(counts, counts)).astype(np.float32)


def _noise(scene_id: str, size: int) -> npt.NDArray[np.int64]:
    """Background noise ``[size, size]`` in {-NOISE_STEP, 0, NOISE_STEP}, a hash of the
    scene id and the pixel index (the same on every platform and numpy version)."""
    seed = np.uint64(zlib.crc32(scene_id.encode("utf-8")))
    x = np.arange(size * size, dtype=np.uint64) + (seed << np.uint64(32))
    for mul, shift in zip(_MIX, (30, 27, 31)):
        x = x * np.uint64(mul)  # a splitmix64-style mix, wrapping modulo 2**64
        x ^= x >> np.uint64(shift)
    return ((x % np.uint64(3)).astype(np.int64) - 1).reshape(size, size) * NOISE_STEP


def _background_f(scene: Scene, size: int) -> npt.NDArray[np.float64]:
    bg = np.asarray(scene.background, dtype=np.float64)
    return np.clip(bg[None, None, :] + _noise(scene.id, size)[:, :, None], 0, 255)


def background(scene: Scene, size: int = 60) -> npt.NDArray[np.uint8]:
    """The scene's background alone (its grey plus the seeded noise), ``uint8 [size,
    size, 3]``; :func:`render` equals it wherever :func:`mask` is 0."""
    return _background_f(scene, size).astype(np.uint8)


def render(scene: Scene, size: int = 60) -> npt.NDArray[np.uint8]:
    """The scene as an RGB image, ``uint8 [size, size, 3]``, anti-aliased."""
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}: expected one of {list(COLOURS)}")
    alpha = mask(scene, size).astype(np.float64)[:, :, None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    img = _background_f(scene, size) * (1 - alpha) + fg * alpha
    return np.floor(img + 0.5).astype(np.uint8)


def render_clip(scene: Scene, frames: int = 8, size: int = 60) -> npt.NDArray[np.uint8]:
    """The object moving by ``scene.motion`` over ``frames`` frames, ``uint8 [frames, size,
    size, 3]``; frame ``t`` is ``render(scene.at_frame(t, frames))`` (the background and
    its noise stay still)."""
    return np.stack([render(scene.at_frame(t, frames), size) for t in range(frames)])


# --- scenes ---------------------------------------------------------------------------


def make_scenes(
    n: int, seed: Union[int, Sequence[int]], voices: int, *, prefix: str = "scene-"
) -> list[Scene]:
    """``n`` random scenes from ``numpy.random.default_rng(seed)``.

    Classes are balanced: the 24 (colour, shape) pairs come in shuffled rounds, so every
    class appears ``n // 24`` or ``n // 24 + 1`` times. Size is uniform in ``[0.3, 0.5]``;
    the start and end positions of the motion (at most 0.25 along each axis) keep the
    object at least 0.02 inside the image. The background is a light or dark grey with a
    tint of up to 8 per channel; the voice is uniform in ``range(voices)``. Ids are
    ``f"{prefix}{i:05d}"``. Values are rounded to 4 decimals (what is written is exact).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if voices < 1:
        raise ValueError(f"voices must be at least 1, got {voices}")
    rng = np.random.default_rng(seed)
    n_classes = len(CLASSES)
    labels: list[int] = []
    while len(labels) < n:
        labels.extend(int(i) for i in rng.permutation(n_classes))
    scenes = []
    for i in range(n):
        colour, shape = _class_of(labels[i])
        size = round(float(rng.uniform(*SIZE_RANGE)), 4)
        lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
        start, end = [], []
        for _ in range(2):
            a = float(rng.uniform(lo, hi))
            b = float(rng.uniform(max(lo, a - MAX_SHIFT), min(hi, a + MAX_SHIFT)))
            start.append(round(a, 4))
            end.append(round(b - a, 4))
        light = bool(rng.random() < 0.5)
        grey = int(rng.integers(*(LIGHT_GREYS if light else DARK_GREYS), endpoint=True))
        tint = rng.integers(-MAX_TINT, MAX_TINT, size=3, endpoint=True)
        bg = (grey + int(tint[0]), grey + int(tint[1]), grey + int(tint[2]))
        voice = int(rng.integers(voices))
        cx, cy, motion = start[0], start[1], (end[0], end[1])
        scenes.append(Scene(f"{prefix}{i:05d}", colour, shape, cx, cy, size, bg, motion, voice))
    return scenes


# --- image and clip encoders ----------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """A PNG file of a ``uint8`` image: ``[H, W]`` grey, ``[H, W, 3]`` RGB or
    ``[H, W, 4]`` RGBA, 8 bits a channel, no filtering, zlib level 9."""
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or 0 in img.shape:
        raise ValueError(f"expected an image [H, W], [H, W, 3] or [H, W, 4], got {image.shape}")
    h, w, c = img.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * c)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IDAT", zlib.compress(rows.tobytes(), 9)), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(k, d) for k, d in chunks)


def _quantize(frames: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(palette ``[P, 3]``, indices ``[T, H, W]``): exact when the frames hold at most 256
    colours (rendered clips hold far fewer), else each channel cut to 3, 3 and 2 bits."""
    flat = frames.reshape(-1, 3).astype(np.uint32)
    keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    uniq, inverse = np.unique(keys, return_inverse=True)
    if len(uniq) <= 256:
        palette = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.uint8)
        return palette, inverse.reshape(frames.shape[:3]).astype(np.uint8)
    r, g, b = np.meshgrid(np.arange(8), np.arange(8), np.arange(4), indexing="ij")
    cube = np.stack([r * 32 + 16, g * 32 + 16, b * 64 + 32], axis=-1).reshape(-1, 3)
    idx = (flat[:, 0] >> 5) * 32 + (flat[:, 1] >> 5) * 4 + (flat[:, 2] >> 6)
    return cube.astype(np.uint8), idx.reshape(frames.shape[:3]).astype(np.uint8)


def _lzw(indices: bytes, min_code_size: int) -> bytes:
    """GIF's variable-width LZW of palette indices, codes packed least significant bit
    first; the table restarts (clear code) when it reaches 4096 entries."""
    clear = 1 << min_code_size
    end = clear + 1
    width = min_code_size + 1
    next_code = end + 1
    table: dict[int, int] = {}
    out = bytearray()
    acc, nbits = clear, width  # the stream starts with a clear code
    prefix = indices[0]
    for k in indices[1:]:
        key = (prefix << 8) | k
        code = table.get(key)
        if code is not None:
            prefix = code
            continue
        acc |= prefix << nbits
        nbits += width
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
        table[key] = next_code
        next_code += 1
        # The decoder learns each entry one code later, so it widens when the entry
        # before this one fills the current width.
        if next_code > (1 << width) and width < 12:
            width += 1
        if next_code == 4096:
            acc |= clear << nbits
            nbits += width
            table.clear()
            width = min_code_size + 1
            next_code = end + 1
        prefix = k
    for code in (prefix, end):
        acc |= code << nbits
        nbits += width
    while nbits > 0:
        out.append(acc & 0xFF)
        acc >>= 8
        nbits -= 8
    return bytes(out)


def encode_gif(frames: npt.NDArray[np.uint8], delay_ms: int = 100, loop: int = 0) -> bytes:
    """An animated GIF89a of ``uint8 [T, H, W, 3]`` frames: one global palette (lossless
    when the clip holds at most 256 colours), every frame full-size and opaque, shown for
    ``delay_ms`` (rounded to 10 ms), looping ``loop`` times (0: forever)."""
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h == 0 or w == 0 or h > 65535 or w > 65535:
        raise ValueError(f"cannot write a GIF of frames shaped {frames.shape}")
    palette, indices = _quantize(frames)
    bits = max(1, int(len(palette) - 1).bit_length())
    table = np.zeros((1 << bits, 3), np.uint8)
    table[: len(palette)] = palette
    min_code_size = max(2, bits)
    out = [
        b"GIF89a",
        struct.pack("<HHBBB", w, h, 0x80 | ((bits - 1) << 4) | (bits - 1), 0, 0),
        table.tobytes(),
        b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", loop) + b"\x00",
    ]
    delay = int(round(delay_ms / 10))
    for i in range(t):
        out.append(b"\x21\xf9\x04" + struct.pack("<BHB", 0x04, delay, 0) + b"\x00")
        out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + bytes([min_code_size]))
        data = _lzw(indices[i].tobytes(), min_code_size)
        for s in range(0, len(data), 255):
            block = data[s : s + 255]
            out.append(bytes([len(block)]) + block)
        out.append(b"\x00")
    out.append(b"\x3b")
    return b"".join(out)


# --- dataset --------------------------------------------------------------------------


def speech_path(speech_dir: _PathArg, colour: str, shape: str, voice: int) -> Path:
    """The spoken caption file ``{speech_dir}/{colour}_{shape}_{voice}.flac``."""
    return Path(speech_dir) / f"{colour}_{shape}_{voice}.flac"


def speech_voices(speech_dir: _PathArg) -> int:
    """How many voices ``speech_dir`` holds for every caption: the largest ``V`` such that
    ``{colour}_{shape}_{v}`` exists for all 24 classes and every ``v < V``."""
    v = 0
    while all(speech_path(speech_dir, *_class_of(i), v).is_file() for i in range(len(CLASSES))):
        v += 1
    return v


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive
        return path.resolve().as_posix()


def write_dataset(
    folder: _PathArg,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    speech_dir: Optional[_PathArg] = None,
    *,
    image_size: int = 60,
    frames: int = 8,
) -> dict[str, Path]:
    """Write the splits ``train``, ``val`` and ``test`` to ``folder``; returns
    ``{split: path of its .jsonl}``.

    Each split's scenes come from :func:`make_scenes` seeded with ``[seed, split number]``
    (a split does not depend on the sizes of the others). Files: ``images/{id}.png``
    (:func:`render`), ``clips/{id}.gif`` (:func:`render_clip`, 10 frames a second,
    lossless) and ``{split}.jsonl``, one JSON object a scene with ``id``, ``text`` (the
    caption), ``image``, ``audio`` (the spoken caption in ``speech_dir``, the bundled
    :data:`SPEECH_DIR` when None), ``video`` (paths relative to the .jsonl), ``label``
    (:func:`class_index`), ``target`` (``[cx, cy]`` at the first frame) and ``meta``
    (``colour``, ``shape``, ``voice`` and ``scene``: :meth:`Scene.to_dict`, to re-render
    it or compute :func:`coverage`; training ignores ``meta``). The voices are those
    :func:`speech_voices` finds.
    """
    root = Path(folder)
    speech = Path(speech_dir) if speech_dir is not None else SPEECH_DIR
    voices = speech_voices(speech)
    if voices == 0:
        raise FileNotFoundError(
            f"no spoken captions in {speech}: expected {{colour}}_{{shape}}_0.flac for all "
            f"{len(CLASSES)} captions"
        )
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        lines = []
        for scene in make_scenes(n, [seed, k], voices, prefix=f"{split}-"):
            image = f"images/{scene.id}.png"
            video = f"clips/{scene.id}.gif"
            (root / image).write_bytes(encode_png(render(scene, image_size)))
            (root / video).write_bytes(encode_gif(render_clip(scene, frames, image_size)))
            first = scene.at_frame(0, frames)
            audio = speech_path(speech, scene.colour, scene.shape, scene.voice)
            row = {
                "id": scene.id,
                "text": scene.caption,
                "image": image,
                "audio": _relative(audio, root),
                "video": video,
                "label": scene.label,
                "target": [first.cx, first.cy],
                "meta": {
                    "colour": scene.colour,
                    "shape": scene.shape,
                    "voice": scene.voice,
                    "scene": scene.to_dict(),
                },
            }
            lines.append(json.dumps(row) + "\n")
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(lines), encoding="utf-8")
    return paths
