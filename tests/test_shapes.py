"""mlmf.shapes: the synthetic shapes dataset (geometry, balance, PNG/GIF writers, splits).

Runs with numpy alone; the checks that decode with the compiled extension skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    from mlmf import shapes
except ImportError:  # the extension is not built: load the pure-numpy module from its file
    _spec = importlib.util.spec_from_file_location("mlmf_shapes", ROOT / "python/mlmf/shapes.py")
    assert _spec is not None and _spec.loader is not None
    shapes = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = shapes
    _spec.loader.exec_module(shapes)

AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}


def one_of_each(seed: int = 1) -> list:
    """One scene of every class."""
    return shapes.make_scenes(len(shapes.CLASSES), seed, 3)


# --- decoders written independently of the module's encoders ---------------------------


def png_decode(data: bytes) -> np.ndarray:
    """8-bit grey/RGB/RGBA PNG with filter type 0 on every row; checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, comp, filt, interlace) == (8, 0, 0, 0)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    c = {0: 1, 2: 3, 6: 4}[ctype]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(h, w, c)


def lzw_decode(data: bytes, min_size: int) -> bytes:
    clear, end = 1 << min_size, (1 << min_size) + 1
    width, table, prev = min_size + 1, [], b""
    out, acc, nbits, it = bytearray(), 0, 0, iter(data)
    while True:
        while nbits < width:
            acc |= next(it) << nbits  # StopIteration: the stream ended before its end code
            nbits += 8
        code, acc, nbits = acc & ((1 << width) - 1), acc >> width, nbits - width
        if code == clear:
            table = [bytes([i]) for i in range(clear)] + [b"", b""]
            width, prev = min_size + 1, b""
            continue
        if code == end:
            return bytes(out)
        assert table, "the stream must start with a clear code"
        if prev:
            assert code <= len(table)
            entry = table[code] if code < len(table) else prev + prev[:1]
            table.append(prev + entry[:1])
            if len(table) == 1 << width and width < 12:
                width += 1
        else:
            entry = table[code]
        out += entry
        prev = entry


def gif_decode(data: bytes) -> tuple[np.ndarray, list[int]]:
    """(frames [T, H, W, 3], delays in 1/100 s) of a GIF89a whose frames are full-size,
    opaque and use the global colour table."""
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
    w, h, packed = struct.unpack("<HHB", data[6:11])
    assert packed & 0x80
    n = 2 << (packed & 7)
    palette = np.frombuffer(data[13 : 13 + 3 * n], np.uint8).reshape(n, 3)
    pos, frames, delays = 13 + 3 * n, [], []
    while data[pos] != 0x3B:
        block, pos = data[pos], pos + 1
        if block == 0x21:
            label, pos = data[pos], pos + 1
            if label == 0xF9:
                delays.append(struct.unpack("<H", data[pos + 2 : pos + 4])[0])
            while data[pos]:
                pos += data[pos] + 1
            pos += 1
        else:
            assert block == 0x2C
            assert struct.unpack("<HHHHB", data[pos : pos + 9]) == (0, 0, w, h, 0)
            min_size, pos, chunks = data[pos + 9], pos + 10, []
            while data[pos]:
                chunks.append(data[pos + 1 : pos + 1 + data[pos]])
                pos += data[pos] + 1
            pos += 1
            idx = np.frombuffer(lzw_decode(b"".join(chunks), min_size), np.uint8)
            assert idx.size == w * h
            frames.append(palette[idx].reshape(h, w, 3))
    assert pos == len(data) - 1
    return np.stack(frames), delays


# --- names and labels ----------------------------------------------------------------


def test_names_labels_and_captions():
    assert list(shapes.COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert shapes.SHAPES == ("circle", "square", "triangle", "cross")
    assert len(set(shapes.COLOURS.values())) == 6
    assert shapes.caption("red", "circle") == "red circle"
    labels = [shapes.class_index(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    assert labels == list(range(24))
    assert shapes.class_index("green", "square") == 1 * 4 + 1
    for c in shapes.COLOURS:
        for s in shapes.SHAPES:
            text = shapes.caption(c, s)
            assert shapes.CLASSES[shapes.class_index(c, s)] == text
            assert len(text) <= 15, text  # the bundled CLIP text tower has 16 positions
    assert max(len(t) for t in shapes.CLASSES) == len("yellow triangle")
    with pytest.raises(ValueError):
        shapes.class_index("pink", "circle")
    with pytest.raises(ValueError):
        shapes.caption("red", "star")


# --- scenes -------------------------------------------------------------------------


def test_make_scenes_deterministic_and_balanced():
    a = shapes.make_scenes(100, 7, 3)
    assert a == shapes.make_scenes(100, 7, 3)
    assert a != shapes.make_scenes(100, 8, 3)
    counts = Counter(s.label for s in a)
    assert set(counts) == set(range(24))
    assert set(counts.values()) <= {4, 5}
    assert set(Counter(s.label for s in shapes.make_scenes(48, 3, 1)).values()) == {2}
    assert len({s.id for s in a}) == 100
    assert {s.voice for s in a} == {0, 1, 2}
    assert {s.background[0] > 128 for s in a} == {True, False}  # light and dark
    for s in a:
        assert s.caption == shapes.caption(s.colour, s.shape)
        assert 0.3 <= s.size <= 0.5
        assert max(abs(s.motion[0]), abs(s.motion[1])) <= 0.25 + 1e-9
        for x in (s.cx, s.cy, s.cx + s.motion[0], s.cy + s.motion[1]):
            assert s.size / 2 < x < 1 - s.size / 2  # inside the frame at both ends
        assert max(s.background) - min(s.background) <= 16
        assert shapes.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_render_is_deterministic():
    for s in one_of_each()[:6]:
        img = shapes.render(s)
        assert img.dtype == np.uint8 and img.shape == (60, 60, 3)
        assert shapes.encode_png(img) == shapes.encode_png(shapes.render(s))
        assert shapes.encode_gif(shapes.render_clip(s)) == shapes.encode_gif(shapes.render_clip(s))


@pytest.mark.parametrize("size", [60, 30])
def test_render_and_coverage_agree(size: int):
    for s in one_of_each():
        img, bg = shapes.render(s, size), shapes.background(s, size)
        alpha = shapes.mask(s, size)
        # Object pixels (different from the background) are exactly where the mask is > 0,
        # and fully covered pixels are the object's colour.
        assert np.array_equal((img != bg).any(axis=-1), alpha > 0)
        assert (img[alpha == 1] == shapes.COLOURS[s.colour]).all()
        assert np.all(np.abs(bg.astype(int) - s.background) <= shapes.NOISE_STEP)
        # Coverage is the mean mask of each cell; a cell holds object pixels iff > 0.
        cov = shapes.coverage(s, grid=5, size=size)
        assert cov.dtype == np.float32 and cov.shape == (5, 5)
        c = size // 5
        cells = alpha.reshape(5, c, 5, c)
        np.testing.assert_allclose(cov, cells.mean(axis=(1, 3)), atol=1e-6)
        assert np.array_equal(cov > 0, (img != bg).any(axis=-1).reshape(5, c, 5, c).any((1, 3)))
        # The area is the shape's.
        rtol = 0.03 if size >= 60 else 0.08  # the edge's sampling error, relative to the area
        np.testing.assert_allclose(alpha.mean(), AREA[s.shape] * s.size**2, rtol=rtol)
        np.testing.assert_allclose(cov.mean(), alpha.mean(), atol=1e-6)


def test_coverage_locates_the_object():
    s = shapes.Scene("x", "red", "square", 0.3, 0.7, 0.2, (200, 200, 200))
    cov = shapes.coverage(s, grid=5)  # the square spans [0.2, 0.4] x [0.6, 0.8]
    expected = np.zeros((5, 5), np.float32)
    expected[3, 1] = 1.0  # row = y
    np.testing.assert_array_equal(cov, expected)
    assert shapes.coverage(s, grid=10).sum() == pytest.approx(4.0)
    # Any grid, even one that does not divide the image.
    cov7 = shapes.coverage(s, grid=7, size=60)
    expected = np.zeros((7, 7), bool)
    expected[4:6, 1:3] = True  # cells of 1/7: x in [0.2, 0.4] -> 1, 2; y in [0.6, 0.8] -> 4, 5
    assert np.array_equal(cov7 > 0, expected) and cov7.max() <= 1


def test_render_clip_moves_inside_the_frame():
    for s in one_of_each(2):
        clip = shapes.render_clip(s, frames=8)
        assert clip.shape == (8, 60, 60, 3) and clip.dtype == np.uint8
        assert np.array_equal(clip[0], shapes.render(s))
        last = s.at_frame(7, 8)
        assert (last.cx, last.cy) == pytest.approx((s.cx + s.motion[0], s.cy + s.motion[1]))
        assert np.array_equal(clip[7], shapes.render(last))
        for t in range(8):
            alpha = shapes.mask(s.at_frame(t, 8))
            assert alpha.sum() > 0
            assert not alpha[[0, -1], :].any() and not alpha[:, [0, -1]].any()
        # The object's centroid follows the motion.
        a0, a7 = shapes.mask(s), shapes.mask(last)
        ys, xs = np.mgrid[0:60, 0:60]
        shift = [((a7 * g).sum() / a7.sum() - (a0 * g).sum() / a0.sum()) / 60 for g in (xs, ys)]
        np.testing.assert_allclose(shift, s.motion, atol=0.01)
    # A motion that would leave the frame is clamped.
    far = shapes.Scene("y", "blue", "circle", 0.5, 0.5, 0.4, (50, 50, 50), (0.9, -0.9))
    assert (far.at_frame(3, 4).cx, far.at_frame(3, 4).cy) == pytest.approx((0.8, 0.2))


# --- PNG and GIF ----------------------------------------------------------------------


def test_png_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(5, 7, 3), (4, 3), (6, 2, 4), (1, 1, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        out = png_decode(shapes.encode_png(img))
        assert np.array_equal(out.reshape(img.shape), img)
    with pytest.raises(ValueError):
        shapes.encode_png(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        shapes.encode_png(np.zeros((4, 4, 3), np.float32))


def test_png_decodes_with_mlmf():
    core = pytest.importorskip("mlmf._mlmf")
    for s in one_of_each()[:8]:
        img = shapes.render(s)
        assert np.array_equal(core.decode_image(shapes.encode_png(img)), img)


def test_gif_round_trip():
    s = one_of_each()[5]
    clip = shapes.render_clip(s)
    frames, delays = gif_decode(shapes.encode_gif(clip, delay_ms=100))
    assert np.array_equal(frames, clip)  # lossless: a rendered clip has few colours
    assert delays == [10] * 8
    # 256 colours of random pixels: the code table fills up and restarts.
    rng = np.random.default_rng(1)
    i = np.arange(256)
    palette = np.stack([i, 255 - i, (i * 7) % 256], axis=1).astype(np.uint8)
    noisy = palette[rng.integers(0, 256, (2, 100, 90))]
    assert np.array_equal(gif_decode(shapes.encode_gif(noisy))[0], noisy)
    # Two colours (the smallest code size), one frame.
    two = palette[rng.integers(0, 2, (1, 9, 13))]
    assert np.array_equal(gif_decode(shapes.encode_gif(two))[0], two)
    # More than 256 colours: the nearest of a fixed 3-3-2 bit palette.
    many = rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    approx = gif_decode(shapes.encode_gif(many))[0].astype(int)
    assert np.all(np.abs(approx - many) <= [16, 16, 32])


def test_gif_decodes_with_mlmf(tmp_path: Path):
    core = pytest.importorskip("mlmf._mlmf")
    clip_dir = Path(shapes.__file__).resolve().parent / "data" / "models" / "clip_tiny"
    if not (clip_dir / "preprocessor_config.json").is_file():
        pytest.skip("bundled clip_tiny processor missing")
    s = one_of_each()[9]
    clip = shapes.render_clip(s)
    path = tmp_path / "clip.gif"
    path.write_bytes(shapes.encode_gif(clip))
    assert np.array_equal(core.decode_image(str(path)), clip[0])
    vp = core.VideoProcessor(num_frames=8, image=core.ImageProcessor.from_pretrained(clip_dir))
    from_gif, from_array = vp(str(path)), vp(clip)
    assert from_gif["pixel_values"].shape == (1, 8, 3, 30, 30)
    assert from_gif["meta"][0]["total_frames"] == 8
    np.testing.assert_array_equal(from_gif["pixel_values"], from_array["pixel_values"])


# --- speech and dataset ---------------------------------------------------------------


def test_bundled_speech():
    files = sorted(shapes.SPEECH_DIR.glob("*.flac"))
    assert shapes.speech_voices(shapes.SPEECH_DIR) == 3
    assert len(files) == 72
    assert sum(f.stat().st_size for f in files) < 1 << 20
    for f in files:
        assert f.read_bytes()[:4] == b"fLaC"


def test_bundled_speech_decodes_with_mlmf():
    core = pytest.importorskip("mlmf._mlmf")
    for v in range(3):
        samples, rate = core.load_audio(
            str(shapes.speech_path(shapes.SPEECH_DIR, "red", "cross", v))
        )
        assert rate == 16000 and samples.shape[0] == 1
        assert 0.5 < samples.shape[1] / rate < 2.0
        assert 0.5 < np.abs(samples).max() <= 1.0


def test_write_dataset(tmp_path: Path):
    paths = shapes.write_dataset(tmp_path / "a", 30, 6, 5, seed=3)
    assert set(paths) == {"train", "val", "test"}
    keys = {"id", "text", "image", "audio", "video", "label", "target", "meta"}
    ids = set()
    for split, n in (("train", 30), ("val", 6), ("test", 5)):
        assert paths[split] == tmp_path / "a" / f"{split}.jsonl"
        rows = [json.loads(line) for line in paths[split].read_text("utf-8").splitlines()]
        assert len(rows) == n
        for row in rows:
            assert set(row) == keys  # what mlmf.Trainer reads (meta is ignored)
            row.update(row.pop("meta"))
            assert row["id"] not in ids
            ids.add(row["id"])
            assert row["text"] == shapes.caption(row["colour"], row["shape"])
            assert row["label"] == shapes.class_index(row["colour"], row["shape"])
            for key in ("image", "audio", "video"):
                assert not Path(row[key]).is_absolute()
                assert (paths[split].parent / row[key]).is_file(), row[key]
            assert Path(row["audio"]).name == f"{row['colour']}_{row['shape']}_{row['voice']}.flac"
            scene = shapes.Scene.from_dict(row["scene"])
            assert row["target"] == [scene.cx, scene.cy]
            assert all(isinstance(x, float) for x in row["target"])
            image = png_decode((paths[split].parent / row["image"]).read_bytes())
            assert np.array_equal(image, shapes.render(scene))
            video, _ = gif_decode((paths[split].parent / row["video"]).read_bytes())
            assert np.array_equal(video, shapes.render_clip(scene))
    # Same seed, same bytes; a split does not depend on the others' sizes.
    again = shapes.write_dataset(tmp_path / "b", 30, 6, 5, seed=3)
    for name in ("train.jsonl", "images/val-00003.png", "clips/test-00004.gif"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert again["test"].read_bytes() == paths["test"].read_bytes()
    other = shapes.write_dataset(tmp_path / "c", 2, 1, 5, seed=3)
    assert other["test"].read_bytes() == paths["test"].read_bytes()
    assert shapes.write_dataset(tmp_path / "d", 2, 1, 5, seed=4)["test"].read_bytes() != (
        paths["test"].read_bytes()
    )


def test_write_dataset_speech_dir(tmp_path: Path):
    speech = tmp_path / "speech"
    speech.mkdir()
    with pytest.raises(FileNotFoundError):
        shapes.write_dataset(tmp_path / "x", 1, 1, 1, speech_dir=speech)
    for text in shapes.CLASSES:
        for v in range(2):
            (speech / f"{text.replace(' ', '_')}_{v}.flac").write_bytes(b"fLaC")
    (speech / "red_circle_2.flac").write_bytes(b"fLaC")  # voice 2 is incomplete: unused
    assert shapes.speech_voices(speech) == 2
    paths = shapes.write_dataset(tmp_path / "ds", 48, 0, 0, speech_dir=speech)
    rows = [json.loads(line) for line in paths["train"].read_text("utf-8").splitlines()]
    assert {r["meta"]["voice"] for r in rows} == {0, 1}
    assert all(r["audio"].startswith("../speech/") for r in rows)
    assert paths["val"].read_text("utf-8") == ""
