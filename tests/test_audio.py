"""Audio: decode, downmix, resampling and Whisper log-mel against the fixtures.

Expectations come from tests/fixtures/audio (soundfile, scipy, transformers'
WhisperFeatureExtractor); long signals are rebuilt from their `signals.py` recipes and
checked against the recorded SHA-256 first, so a changed recipe fails loudly instead of
looking like a regression.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from signals import make_signal, signal_digest

import mlmf
from conftest import FIXTURES, load_manifest, subset

MANIFEST = load_manifest("audio")
NPZ = np.load(FIXTURES / "audio" / "expected.npz")

# Log-mel: WhisperFeatureExtractor (torch.stft path, float32) vs mlmf, max abs difference.
MEL_ATOL = 1e-4

# Lossy decodes. The reference decoders are mpg123 (MP3) and libvorbis (Ogg) through
# libsndfile; mlmf uses symphonia. Both are float decoders of the same bitstream, so the
# samples agree closely but not bit for bit (different synthesis filter arithmetic).
# Measured max abs difference: MP3 7.6e-7, Ogg 1.8e-7.
LOSSY_ATOL = {"MP3": 1e-5, "OGG": 1e-5}

# Resampling: mlmf's resampler vs scipy.signal.resample_poly (Kaiser window, beta 5).
# Both are band-limited interpolators with different anti-aliasing filters, so they
# differ where the test signal has energy near the band edge (its white-noise part): the
# error is spread over the whole signal, a little larger at the ends (edge handling).
# Measured max abs error over the 8 cases: 8.3e-3 overall (22.05 kHz mono), 8.3e-3 away
# from the edges, RMS at most 2.1e-3 (signals peak at about 0.6). Bounds a little above.
RESAMPLE_ATOL = 1e-2
RESAMPLE_INNER_ATOL = 9e-3
RESAMPLE_RMS = 2.5e-3
EDGE = 64


@functools.cache
def _signal(recipe: str, seconds: float, sampling_rate: int, channels: int, seed: int):
    x = make_signal(recipe, seconds, sampling_rate, channels, seed)
    x.flags.writeable = False
    return x


def signal_of(spec: dict) -> np.ndarray:
    """A recipe's samples ([n] or [n, channels]), checked against its recorded digest."""
    assert spec["fn"] == "signals.make_signal"
    x = _signal(
        spec["recipe"], spec["seconds"], spec["sampling_rate"], spec["channels"], spec["seed"]
    )
    assert signal_digest(x) == spec["digest"], "signals.py or numpy changed the recipe"
    return x


@functools.cache
def _audio_processor(config_dir: str) -> mlmf.AudioProcessor:
    return mlmf.AudioProcessor.from_pretrained(FIXTURES / config_dir)


# ------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("case", MANIFEST["decode"], ids=lambda c: c["id"])
def test_decode_equals_soundfile(case):
    path = FIXTURES / case["input"]
    samples, rate = mlmf.load_audio(str(path))
    assert rate == case["sampling_rate"]
    assert samples.dtype == np.float32
    # mlmf: [C, S]; soundfile: [frames, channels].
    assert samples.shape == (case["channels"], case["frames"]), case["id"]
    assert case["frames"] == case["source_frames"]
    got = subset(np.ascontiguousarray(samples.T), case["expected"], NPZ)
    want = NPZ[case["expected"]["key"]]
    if case["format"] in LOSSY_ATOL:
        err = float(np.abs(got - want).max())
        print(f"{case['id']}: max abs diff {err:.3g}")
        assert err <= LOSSY_ATOL[case["format"]], (case["id"], err)
    else:
        np.testing.assert_array_equal(got, want, err_msg=case["id"])


@pytest.mark.parametrize(
    "case", [c for c in MANIFEST["decode"] if c["format"] in ("WAV", "FLAC")], ids=lambda c: c["id"]
)
def test_lossless_decode_equals_written_source(case):
    """The written signal itself (rebuilt from its recipe) comes back, every sample."""
    x = signal_of(case["written_from"])
    x2 = x if x.ndim == 2 else x[:, None]
    if case.get("decoded_equals_written_int16_over_32768"):
        want = np.clip(np.round(x2.astype(np.float64) * 32768), -32768, 32767) / 32768
        want = want.astype(np.float32)
    else:
        assert case.get("decoded_equals_written_float32")
        want = x2
    samples, _ = mlmf.load_audio((FIXTURES / case["input"]).read_bytes())
    np.testing.assert_array_equal(samples.T, want, err_msg=case["id"])


@pytest.mark.parametrize(
    "case", [c for c in MANIFEST["decode"] if c["channels"] == 2], ids=lambda c: c["id"]
)
def test_load_downmixes_stereo_by_mean(case):
    """ap.load: decode, mean over channels, resample to 16 kHz."""
    ap = mlmf.AudioProcessor()
    got = ap.load(str(FIXTURES / case["input"]))
    assert got.dtype == np.float32 and got.ndim == 1
    rate = case["sampling_rate"]
    assert len(got) == -(-case["frames"] * 16000 // rate)
    if rate != 16000:
        return  # the resampled values are checked against scipy in the resample tests
    want = NPZ[case["expected"]["key"]].mean(axis=1, dtype=np.float32)
    got_sub = subset(got[:, None], case["expected"], NPZ)[:, 0]
    atol = LOSSY_ATOL.get(case["format"], 1e-7)
    assert float(np.abs(got_sub - want).max()) <= atol, case["id"]


def test_load_mono_at_rate_is_identity():
    x = signal_of(MANIFEST["whisper"][0]["signal"])
    ap = mlmf.AudioProcessor()
    np.testing.assert_array_equal(ap.load(x), x)
    np.testing.assert_array_equal(ap.load(x, sampling_rate=16000), x)
    stereo = np.stack([x, -x])
    np.testing.assert_array_equal(ap.load(stereo), np.zeros_like(x))


# ---------------------------------------------------------------------------- resample


def _resample_input(case: dict) -> np.ndarray:
    x = signal_of(case["signal"])
    if case["downmix"]:
        x = x.mean(axis=1).astype(np.float32)  # what the reference did: x.mean(axis=1)
    return np.ascontiguousarray(x)


def _inner(case: dict) -> np.ndarray:
    """Positions of the stored subset that lie EDGE samples or more from either end."""
    pos = NPZ[case["expected"]["index"]["key"]]
    n = case["output_len"]
    return (pos >= EDGE) & (pos < n - EDGE)


def _resample_errors(case: dict, got: np.ndarray) -> tuple[float, float]:
    assert got.dtype == np.float32
    assert len(got) == case["output_len"], (case["id"], len(got))
    d = np.abs(subset(got, case["expected"], NPZ) - NPZ[case["expected"]["key"]])
    rms = float(np.sqrt(np.mean(d.astype(np.float64) ** 2)))
    assert rms <= RESAMPLE_RMS, (case["id"], rms)
    return float(d.max()), float(d[_inner(case)].max())


@pytest.mark.parametrize("case", MANIFEST["resample"], ids=lambda c: c["id"])
def test_resample_close_to_scipy(case):
    x = _resample_input(case)
    rate = case["signal"]["sampling_rate"]
    got = mlmf.resample_audio(x, rate, 16000)
    assert len(got) == -(-len(x) * 16000 // rate)
    overall, inner = _resample_errors(case, got)
    print(f"{case['id']}: max abs diff {overall:.3g} overall, {inner:.3g} away from the edges")
    assert overall <= RESAMPLE_ATOL, (case["id"], overall)
    assert inner <= RESAMPLE_INNER_ATOL, (case["id"], inner)


@pytest.mark.parametrize(
    "case", [c for c in MANIFEST["resample"] if c["downmix"]], ids=lambda c: c["id"]
)
def test_load_stereo_array_downmix_and_resample(case):
    """ap.load on the [C, S] stereo array equals downmix-then-resample_poly."""
    x = signal_of(case["signal"])
    stereo = np.ascontiguousarray(x.T)  # [n, 2] -> [2, n]
    got = mlmf.AudioProcessor().load(stereo, sampling_rate=case["signal"]["sampling_rate"])
    overall, inner = _resample_errors(case, got)
    assert overall <= RESAMPLE_ATOL, (case["id"], overall)
    assert inner <= RESAMPLE_INNER_ATOL, (case["id"], inner)


# ---------------------------------------------------------------------------- log-mel


@functools.cache
def _features(config_dir: str, spec_key: tuple) -> tuple[np.ndarray, np.ndarray]:
    spec = dict(spec_key)
    out = _audio_processor(config_dir)(signal_of(spec))
    feats, chunks = out["input_features"], out["num_chunks"]
    feats.flags.writeable = False
    return feats, chunks


def _chunk_index(case: dict) -> int:
    start = case["slice_samples"][0] if case["slice_samples"] else 0
    return start // 480000


@pytest.mark.parametrize("case", MANIFEST["whisper"], ids=lambda c: c["id"])
def test_log_mel_equals_whisper(case):
    feats, chunks = _features(case["config_dir"], tuple(sorted(case["signal"].items())))
    n_samples = len(signal_of(case["signal"]))
    n_chunks = -(-n_samples // 480000)
    assert feats.dtype == np.float32
    assert feats.shape == (n_chunks, case["feature_size"], 3000)
    assert chunks.dtype == np.int64 and chunks.tolist() == [n_chunks]
    k = _chunk_index(case)
    got = feats[k : k + 1]
    err = float(np.abs(subset(got, case["expected"], NPZ) - NPZ[case["expected"]["key"]]).max())
    print(f"{case['id']}: max abs diff {err:.3g}")
    assert err <= MEL_ATOL, (case["id"], err)
    mean = got.astype(np.float64).mean(axis=2)
    want_mean = NPZ[case["mean_over_frames"]["key"]]
    assert float(np.abs(mean - want_mean).max()) <= MEL_ATOL, case["id"]
    stats = case["full_stats"]
    assert abs(float(got.min()) - stats["min"]) <= MEL_ATOL
    assert abs(float(got.max()) - stats["max"]) <= MEL_ATOL


def test_65s_gives_three_chunks():
    cases = [c for c in MANIFEST["whisper"] if c["id"].startswith("w80_65s_chunk")]
    assert len(cases) == 3
    feats, chunks = _features(cases[0]["config_dir"], tuple(sorted(cases[0]["signal"].items())))
    assert feats.shape == (3, 80, 3000)
    assert chunks.tolist() == [3]


@pytest.mark.parametrize("case", MANIFEST["whisper"], ids=lambda c: c["id"])
def test_log_mel_function_on_one_chunk(case):
    x = signal_of(case["signal"])
    if case["slice_samples"]:
        a, b = case["slice_samples"]
        x = np.ascontiguousarray(x[a:b])
    got = mlmf.log_mel_spectrogram(x, n_mels=case["feature_size"], sampling_rate=16000)
    assert got.shape == (case["feature_size"], 3000)
    err = float(
        np.abs(subset(got[None], case["expected"], NPZ) - NPZ[case["expected"]["key"]]).max()
    )
    assert err <= MEL_ATOL, (case["id"], err)


def test_batch_of_two_equals_single_calls():
    """A batch keeps the per-example max-8 clamp (transformers' batched path does too)."""
    c01 = next(c for c in MANIFEST["whisper"] if c["id"] == "w80_0.1s")
    c7 = next(c for c in MANIFEST["whisper"] if c["id"] == "w80_7s")
    ap = _audio_processor("audio/configs/whisper_80")
    out = ap([signal_of(c01["signal"]), signal_of(c7["signal"])])
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["num_chunks"].tolist() == [1, 1]
    for i, c in enumerate((c01, c7)):
        got = subset(out["input_features"][i : i + 1], c["expected"], NPZ)
        assert float(np.abs(got - NPZ[c["expected"]["key"]]).max()) <= MEL_ATOL


def test_arrays_are_read_in_place_whatever_their_layout():
    """Float32 arrays are read without a copy: a strided or Fortran-ordered
    `[channels, samples]` array and a 1-D view give the values of a contiguous copy."""
    c7 = next(c for c in MANIFEST["whisper"] if c["id"] == "w80_7s")
    ap = _audio_processor("audio/configs/whisper_80")
    x = signal_of(c7["signal"]).astype(np.float32)
    stereo = np.stack([x, x[::-1]])
    for view in (stereo[:, ::2], np.asfortranarray(stereo), stereo.T.copy().T, x[::-1]):
        got = ap([view, np.ascontiguousarray(view)])["input_features"]
        np.testing.assert_array_equal(got[0], got[1])


def test_resampled_input_is_featurised_at_16k():
    """An 8 kHz array with sampling_rate=8000 goes through the resampler first."""
    case = next(c for c in MANIFEST["resample"] if c["id"] == "resample__8000_mono")
    x = _resample_input(case)
    ap = _audio_processor("audio/configs/whisper_80")
    direct = ap(x, sampling_rate=8000)["input_features"]
    via = ap(mlmf.resample_audio(x, 8000, 16000))["input_features"]
    np.testing.assert_array_equal(direct, via)


def test_file_input_equals_decoded_array():
    path = FIXTURES / "audio/inputs/flac_16000_mono.flac"
    ap = _audio_processor("audio/configs/whisper_80")
    samples, _ = mlmf.load_audio(str(path))
    np.testing.assert_array_equal(ap(str(path))["input_features"], ap(samples[0])["input_features"])
    np.testing.assert_array_equal(
        ap(path.read_bytes())["input_features"], ap(samples[0])["input_features"]
    )
