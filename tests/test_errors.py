"""Bad input across modalities: typed errors whose messages say where and what was expected.

Every bad item sits at index 2 of a batch whose first two items are good, so each message
must name the modality, that index and the expectation. Also: fuzzing with random bytes
(only mlmf.MlmfError subclasses may come out), panics surfacing as InternalError,
pickling and concurrent calls.
"""

from __future__ import annotations

import pickle
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlmf
from conftest import FIXTURES, load_manifest

IMAGE = load_manifest("image")
AUDIO = load_manifest("audio")

GOOD_IMAGE = str(FIXTURES / "image/inputs/rgb_64x48.png")
GOOD_AUDIO = str(FIXTURES / "audio/inputs/wav16_16000_mono.wav")
GOOD_GIF = str(FIXTURES / "video/inputs/anim_12f_64x48.gif")
VIDEO_NPZ = np.load(FIXTURES / "video" / "expected.npz")
GOOD_FRAMES = VIDEO_NPZ["frames__frames_10"]  # uint8 [10, 48, 64, 3]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _msg(excinfo) -> str:
    return str(excinfo.value)


def _png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG with a valid signature and IHDR (RGB8) declaring width x height."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat or zlib.compress(b"\x00" * 4))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("case", IMAGE["bad"], ids=lambda c: c["path"].rsplit("/", 1)[1])
def test_bad_image_files(case):
    path = FIXTURES / case["path"]
    ip = mlmf.ImageProcessor()
    with pytest.raises(mlmf.InputError) as e:
        ip([GOOD_IMAGE, GOOD_IMAGE, str(path)])
    msg = _msg(e)
    assert msg.startswith("image input 2: "), msg
    name = path.name
    if name.startswith("huge"):
        # Refused from the header, before any pixel is decoded (Pillow: DecompressionBombError).
        assert not isinstance(e.value, mlmf.DecodeError)
        # The expectation is the limit itself.
        assert "100000x100000" in msg and "max_image_pixels = 178956970" in msg, msg
    elif name.startswith("zero_width"):
        # Must say the image is empty (0 x 48) and that at least 1x1 is expected.
        assert "0x48" in msg or "empty" in msg, msg
        assert "expected" in msg, msg
    else:
        # Pillow refuses these too (UnidentifiedImageError / "image file is truncated").
        assert not case["pillow_load"]["ok"]
        assert isinstance(e.value, mlmf.DecodeError), msg
        assert "cannot decode" in msg, msg
        if name.startswith("truncated"):
            # "truncated <format> file": a complete file was expected.
            assert "truncated" in msg.lower(), msg
        else:
            assert "expected JPEG, PNG" in msg, msg
    # The free function raises the same class, without a batch index.
    with pytest.raises(type(e.value)) as e1:
        mlmf.decode_image(path.read_bytes())
    # A single input is input 0.
    assert _msg(e1).startswith("image input 0: "), _msg(e1)


def test_max_image_pixels_changes_the_outcome():
    # Just above the default limit (178956970 px): refused from the header ...
    bomb = _png(14000, 13000)
    with pytest.raises(mlmf.InputError, match=r"^image input 2: .*max_image_pixels") as e:
        mlmf.ImageProcessor()([GOOD_IMAGE, GOOD_IMAGE, bomb])
    assert not isinstance(e.value, mlmf.DecodeError)
    # ... with the limit raised, decoding is attempted and fails on the missing pixel data.
    ip = mlmf.ImageProcessor(max_image_pixels=200_000_000)
    with pytest.raises(mlmf.DecodeError, match=r"^image input 2: cannot decode: ") as e:
        ip([GOOD_IMAGE, GOOD_IMAGE, bomb])
    assert "max_image_pixels" not in _msg(e)
    with pytest.raises(mlmf.DecodeError):
        mlmf.decode_image(bomb, max_pixels=200_000_000)
    # A lowered limit refuses a small real image, which decodes under the default.
    # (No resize: the limit also applies to the resized output.)
    small = mlmf.ImageProcessor(max_image_pixels=64 * 48 - 1, do_resize=False, do_center_crop=False)
    with pytest.raises(mlmf.InputError, match=r"^image input 2: .*64x48.*max_image_pixels"):
        small([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), GOOD_IMAGE])
    exact = mlmf.ImageProcessor(max_image_pixels=64 * 48, do_resize=False, do_center_crop=False)
    assert exact(GOOD_IMAGE).shape == (1, 3, 48, 64)
    with pytest.raises(mlmf.InputError, match="max_image_pixels"):
        mlmf.decode_image(GOOD_IMAGE, max_pixels=100)


def test_unsupported_image_format():
    wav = (FIXTURES / "audio/inputs/wav16_8000_mono.wav").read_bytes()
    with pytest.raises(mlmf.DecodeError, match=r"^image input 2: cannot decode: .*expected JPEG"):
        mlmf.ImageProcessor()([GOOD_IMAGE, GOOD_IMAGE, wav])
    # A format the decoder could identify but mlmf does not accept (ICO).
    ico = b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00" + b"\x00" * 64
    with pytest.raises(mlmf.DecodeError, match=r"^image input 2: cannot decode: .*expected"):
        mlmf.ImageProcessor()([GOOD_IMAGE, GOOD_IMAGE, ico])


def test_missing_image_file():
    with pytest.raises(mlmf.InputError, match=r"^image input 2: cannot read .*no_such\.png"):
        mlmf.ImageProcessor()([GOOD_IMAGE, GOOD_IMAGE, str(FIXTURES / "no_such.png")])


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.int64), "uint8"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros((8,), np.uint8), "shape"),
        (np.zeros((8, 8, 2), np.uint8), "C in 1, 3, 4"),
        (np.zeros((0, 8, 3), np.uint8), "non-empty"),
        (3.5, "expected"),
    ],
    ids=["float32", "int64", "rank4", "rank1", "two_channels", "empty", "float_scalar"],
)
def test_bad_image_arrays(bad, what):
    with pytest.raises(mlmf.InputError) as e:
        mlmf.ImageProcessor()([GOOD_IMAGE, np.zeros((4, 4, 3), np.uint8), bad])
    msg = _msg(e)
    assert msg.startswith("image input 2: "), msg
    assert "expected" in msg and what in msg, msg


def test_empty_image_batch():
    with pytest.raises(mlmf.InputError, match=r"image.*expected"):
        mlmf.ImageProcessor()([])


# ----------------------------------------------------------------------------- audio


@pytest.mark.parametrize("case", AUDIO["bad"], ids=lambda c: c["path"].rsplit("/", 1)[1])
def test_bad_audio_files(case):
    path = FIXTURES / case["path"]
    ap = mlmf.AudioProcessor()
    with pytest.raises(mlmf.InputError) as e:
        ap([GOOD_AUDIO, GOOD_AUDIO, str(path)])
    msg = _msg(e)
    assert msg.startswith("audio input 2: cannot decode: "), msg
    # Unreadable (soundfile fails too) or incomplete: the two truncated files and
    # header_only.wav (its data chunk promises 8000 bytes, none follow) hold fewer frames
    # than their headers promise, which soundfile silently accepts.
    assert isinstance(e.value, mlmf.DecodeError), msg
    if "truncated" in path.name or "header_only" in path.name:
        assert "truncated" in msg, msg
    else:
        assert re.search(r"expected (a )?WAV, FLAC, MP3 or Ogg Vorbis", msg), msg
    with pytest.raises(mlmf.DecodeError) as e1:
        mlmf.load_audio(path.read_bytes())
    assert _msg(e1).startswith("audio input 0: "), _msg(e1)


def test_unsupported_audio_format():
    png = (FIXTURES / "image/inputs/rgb_64x48.png").read_bytes()
    with pytest.raises(mlmf.DecodeError, match=r"^audio input 2: cannot decode: .*expected WAV"):
        mlmf.AudioProcessor()([GOOD_AUDIO, GOOD_AUDIO, png])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_audio(value):
    x = np.zeros(1600, np.float32)
    x[7] = value
    with pytest.raises(mlmf.InputError) as e:
        mlmf.AudioProcessor()([np.zeros(100, np.float32), np.ones(100, np.float32) / 2, x])
    msg = _msg(e)
    assert msg.startswith("audio input 2: "), msg
    assert "expected finite samples" in msg and "sample 7" in msg, msg


def test_empty_audio():
    with pytest.raises(mlmf.InputError) as e:
        mlmf.AudioProcessor()(
            [np.zeros(10, np.float32), np.zeros(10, np.float32), np.zeros(0, np.float32)]
        )
    msg = _msg(e)
    assert msg.startswith("audio input 2: ") and "expected at least one sample" in msg, msg


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (np.zeros(100, np.int16), "float32"),
        (np.zeros(100, np.complex64), "float32"),
        (np.zeros((1, 2, 100), np.float32), "[channels, samples]"),
        (np.zeros((), np.float32), "[channels, samples]"),
    ],
    ids=["int16", "complex64", "rank3", "rank0"],
)
def test_bad_audio_arrays(bad, what):
    with pytest.raises(mlmf.InputError) as e:
        mlmf.AudioProcessor()([np.zeros(10, np.float32), np.zeros(10, np.float32), bad])
    msg = _msg(e)
    assert msg.startswith("audio input 2: "), msg
    assert "expected" in msg and (what in msg or "float" in msg), msg


def test_bad_resample_rates():
    with pytest.raises(mlmf.InputError, match=r"^audio input.*must be in \d+\.\.=\d+ Hz, got 0"):
        mlmf.resample_audio(np.zeros(10, np.float32), 0, 16000)


# ----------------------------------------------------------------------------- video


def test_video_with_too_few_frames():
    vp = mlmf.VideoProcessor(num_frames=11)
    twelve = np.zeros((12, 48, 64, 3), np.uint8)
    with pytest.raises(mlmf.InputError) as e:
        vp([twelve, twelve, GOOD_FRAMES])
    msg = _msg(e)
    assert msg.startswith("video input 2: "), msg
    assert "10 frames" in msg and "11" in msg, msg


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (np.zeros((2, 48, 64, 3), np.float32), "uint8"),
        (np.zeros((48, 64, 3), np.uint8), "[T, H, W, C]"),
        (np.zeros((1, 2, 48, 64, 3), np.uint8), "[T, H, W, C]"),
        (np.zeros((2, 48, 64, 2), np.uint8), "C in 1, 3, 4"),
        (np.zeros((0, 48, 64, 3), np.uint8), "non-empty"),
    ],
    ids=["float32", "rank3", "rank5", "two_channels", "no_frames"],
)
def test_bad_video_arrays(bad, what):
    vp = mlmf.VideoProcessor(num_frames=2)
    with pytest.raises(mlmf.InputError) as e:
        vp([GOOD_FRAMES, GOOD_FRAMES, bad])
    msg = _msg(e)
    assert msg.startswith("video input 2: "), msg
    assert "expected" in msg and what in msg, msg


def test_bad_video_bytes_and_sources(tmp_path):
    vp = mlmf.VideoProcessor(num_frames=2)
    gif = (FIXTURES / "video/inputs/anim_12f_64x48.gif").read_bytes()
    with pytest.raises(mlmf.DecodeError, match=r"^video input 2: cannot decode: "):
        vp([GOOD_GIF, GOOD_GIF, gif[: len(gif) // 2]])
    with pytest.raises(mlmf.InputError, match=r"^video input 2: .*expected"):
        vp([GOOD_GIF, GOOD_GIF, (FIXTURES / "audio/inputs/wav16_8000_mono.wav").read_bytes()])
    (tmp_path / "notes.txt").write_text("not a frame")
    with pytest.raises(mlmf.InputError, match=r"^video input 2: .*expected"):
        vp([GOOD_GIF, GOOD_GIF, str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mlmf.InputError, match=r"^video input 2: .*expected"):
        vp([GOOD_GIF, GOOD_GIF, str(empty)])


def test_mixed_frame_sizes_in_a_batch():
    vp = mlmf.VideoProcessor(
        num_frames=2, image=mlmf.ImageProcessor(do_resize=False, do_center_crop=False)
    )
    with pytest.raises(mlmf.InputError, match=r"^video input 2: .*expected"):
        vp([GOOD_FRAMES, GOOD_FRAMES, np.zeros((4, 20, 30, 3), np.uint8)])


# ------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sizee": 224}, "sizee"),
        ({"size": {"shortest_edge": 0}}, "size"),
        ({"resample": "sideways"}, "resample"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std"),
        ({"crop_size": "big"}, "crop_size"),
    ],
    ids=["image_unknown_key", "image_zero_size", "image_resample", "image_std_zero", "image_crop"],
)
def test_image_processor_config_errors(kwargs, field):
    with pytest.raises(mlmf.ConfigError) as e:
        mlmf.ImageProcessor(**kwargs)
    assert field in _msg(e), _msg(e)
    assert "expected" in _msg(e) or "must" in _msg(e) or "unknown" in _msg(e), _msg(e)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_mel": 80}, "n_mel"),
        ({"feature_size": 0}, "feature_size"),
        ({"sampling_rate": 0}, "sampling_rate"),
        ({"hop_length": 0}, "hop_length"),
    ],
    ids=["audio_unknown_key", "audio_zero_mels", "audio_zero_rate", "audio_zero_hop"],
)
def test_audio_processor_config_errors(kwargs, field):
    with pytest.raises(mlmf.ConfigError) as e:
        mlmf.AudioProcessor(**kwargs)
    assert field in _msg(e), _msg(e)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": None, "fps": -1.0}, "fps"),
        ({"window_frames": 4, "frames_per_window": 0}, "frames_per_window"),
    ],
    ids=["video_zero_frames", "video_negative_fps", "video_zero_per_window"],
)
def test_video_processor_config_errors(kwargs, field):
    with pytest.raises(mlmf.ConfigError) as e:
        mlmf.VideoProcessor(**kwargs)
    assert field in _msg(e), _msg(e)


def test_video_processor_unknown_keyword_is_a_type_error():
    # VideoProcessor has an explicit signature, so Python itself rejects a misspelt
    # keyword (the image and audio processors take Hugging Face keys as **kwargs and
    # raise ConfigError instead).
    with pytest.raises(TypeError, match="num_frame"):
        mlmf.VideoProcessor(num_frame=8)


@pytest.mark.parametrize("cls", ["ImageProcessor", "AudioProcessor"])
def test_missing_preprocessor_config(cls, tmp_path):
    with pytest.raises(mlmf.ModelLoadError) as e:
        getattr(mlmf, cls).from_pretrained(tmp_path)
    assert "preprocessor_config.json" in _msg(e), _msg(e)
    assert str(tmp_path) in _msg(e), _msg(e)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(mlmf.ModelLoadError, match="JSON"):
        getattr(mlmf, cls).from_pretrained(tmp_path)


# -------------------------------------------------------------------------- fuzzing


def _seeds() -> list[bytes]:
    names = [
        "image/inputs/rgb_64x48.png",
        "image/inputs/jpeg420_81x61.jpg",
        "image/inputs/rgb_64x48.bmp",
        "image/inputs/rgb_64x48_lzw.tiff",
        "image/inputs/rgb_64x48_lossless.webp",
        "image/inputs/palette_64x48.gif",
        "video/inputs/anim_8f_64x48.webp",
        "audio/inputs/wav16_8000_mono.wav",
        "audio/inputs/flac_8000_mono.flac",
        "audio/inputs/mp3_8000_mono.mp3",
        "audio/inputs/ogg_8000_mono.ogg",
    ]
    return [(FIXTURES / n).read_bytes() for n in names]


SEEDS = _seeds()


@st.composite
def hostile_bytes(draw) -> bytes:
    """Random bytes, or a real file truncated and with a few bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    cut = draw(st.integers(min_value=0, max_value=len(data)))
    data = data[:cut]
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        if not data:
            break
        pos = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[pos] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


def _only_mlmf_errors(fn, data: bytes) -> None:
    try:
        fn(data)
    except mlmf.MlmfError as e:
        assert not isinstance(e, mlmf.InternalError), str(e)
        assert str(e)


@FUZZ
@given(hostile_bytes())
def test_fuzz_image(data):
    ip = mlmf.ImageProcessor(size={"height": 16, "width": 16})
    _only_mlmf_errors(ip, data)
    _only_mlmf_errors(mlmf.decode_image, data)


@FUZZ
@given(hostile_bytes())
def test_fuzz_audio(data):
    _only_mlmf_errors(mlmf.AudioProcessor(), data)
    _only_mlmf_errors(mlmf.load_audio, data)


@FUZZ
@given(hostile_bytes())
def test_fuzz_video(data):
    vp = mlmf.VideoProcessor(
        num_frames=1, image=mlmf.ImageProcessor(size={"height": 16, "width": 16})
    )
    _only_mlmf_errors(vp, data)


# ------------------------------------------------- panics, pickling, threads


def test_rust_panic_is_internal_error():
    with pytest.raises(mlmf.InternalError, match="panic") as e:
        mlmf._mlmf._panic_for_test()
    assert isinstance(e.value, mlmf.MlmfError)


def test_pickle_image_processor():
    ip = mlmf.ImageProcessor.from_pretrained(FIXTURES / "image/configs/siglip_small")
    ip2 = pickle.loads(pickle.dumps(ip))
    assert ip2.config == ip.config
    inputs = [GOOD_IMAGE, str(FIXTURES / "image/inputs/rgba_64x48.png")]
    np.testing.assert_array_equal(ip2(inputs), ip(inputs))


def test_pickle_audio_processor():
    ap = mlmf.AudioProcessor.from_pretrained(FIXTURES / "audio/configs/whisper_128")
    ap2 = pickle.loads(pickle.dumps(ap))
    a, b = ap(GOOD_AUDIO), ap2(GOOD_AUDIO)
    assert a["input_features"].shape == (1, 128, 3000)
    np.testing.assert_array_equal(a["input_features"], b["input_features"])
    np.testing.assert_array_equal(a["num_chunks"], b["num_chunks"])


def test_pickle_video_processor():
    ip = mlmf.ImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    vp = mlmf.VideoProcessor(window_frames=4, frames_per_window=2, image=ip)
    vp2 = pickle.loads(pickle.dumps(vp))
    a, b = vp(GOOD_GIF), vp2(GOOD_GIF)
    assert a["pixel_values"].shape == (1, 3, 2, 3, 32, 32)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert a["indices"] == b["indices"]
    assert vp2.sample_indices(10) == vp.sample_indices(10)


def test_threads_give_sequential_results():
    ip = mlmf.ImageProcessor.from_pretrained(FIXTURES / "image/configs/clip_small")
    names = [
        "rgb_640x480.png",
        "rgb_641x479.png",
        "rgba_64x48.png",
        "jpeg420_81x61.jpg",
        "grey_64x48.png",
        "palette_trns_64x48.png",
        "rgb_3x500.png",
        "rgb_64x48_lzw.tiff",
    ]
    paths = [str(FIXTURES / "image/inputs" / n) for n in names] * 2
    sequential = [ip(p) for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(ip, paths))
    for p, a, b in zip(paths, sequential, concurrent):
        np.testing.assert_array_equal(a, b, err_msg=p)
