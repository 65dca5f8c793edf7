"""wav2vec 2.0, HuBERT and the Audio Spectrogram Transformer against transformers
(tests/fixtures/zoo, made by scripts/fixtures_speech.py)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES

ZOO = FIXTURES / "zoo"
EXPECTED = json.loads((ZOO / "expected.json").read_text())
TOL = EXPECTED["tolerance"]
CASE = EXPECTED["speech"]
SPEECH = ["hubert_tiny", "wav2vec2_stable_tiny", "wav2vec2_tiny"]
AST = ["ast_cls_tiny", "ast_tiny"]
RATE = 16000


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / CASE["arrays"]) as z:
        return {k: z[k] for k in z.files}


def waves(ref: dict) -> list[np.ndarray]:
    return [ref[f"wave{i}"] for i in range(len(CASE["waves"]))]


def model_dir(name: str):
    return ZOO / CASE["models"][name]["model"]


def test_the_fixture_covers_each_variant():
    assert sorted(CASE["models"]) == sorted(SPEECH + AST)
    cfgs = {n: CASE["models"][n]["config"] for n in SPEECH}
    assert {c["feat_extract_norm"] for c in cfgs.values()} == {"group", "layer"}
    assert cfgs["hubert_tiny"]["feat_proj_layer_norm"] is False
    # Both spellings of the positional convolution's weight norm are covered.
    assert "weight_g" in CASE["models"]["wav2vec2_stable_tiny"]["weight_norm_names"]
    assert CASE["processors"]["ast"]["fbank_path"] == "numpy"


# --- wav2vec 2.0 / HuBERT -------------------------------------------------------------


def test_waveforms_are_normalised_as_the_reference_does(ref):
    proc = mlmf.AudioProcessor.from_pretrained(model_dir("wav2vec2_tiny"))
    assert proc.config["features"] == {"type": "waveform", "do_normalize": True}
    out = proc(waves(ref), sampling_rate=RATE)
    lengths = [len(w) for w in waves(ref)]
    assert out["input_features"].shape == (3, 1, max(lengths))
    assert out["valid_frames"].tolist() == lengths
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(
            out["input_features"][i, 0, :n], ref[f"w2v.input_values{i}"], atol=1e-6
        )
        assert not out["input_features"][i, 0, n:].any()


@pytest.mark.parametrize("name", SPEECH)
def test_speech_embeddings_equal_transformers(ref, name):
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    kind = "hubert" if name.startswith("hubert") else "wav2vec2"
    assert (enc.model_type, enc.modality, enc.output_dim) == (kind, "audio", 36)
    frames = CASE["models"][name]["frames"]
    # One clip at a time, as the reference ran.
    for i, w in enumerate(waves(ref)):
        out = enc.encode([w], sampling_rate=RATE)
        assert out.hidden_states.shape == (1, frames[i], 36)
        np.testing.assert_allclose(out.hidden_states[0], ref[f"{name}.hidden{i}"], atol=TOL)
        np.testing.assert_allclose(out.pooled[0], ref[f"{name}.pooled{i}"], atol=TOL)
    # Batched: each clip keeps its own result; padded frames are masked out.
    out = enc.encode(waves(ref), sampling_rate=RATE)
    assert out.hidden_states.shape == (3, max(frames), 36)
    assert out.mask.sum(1).tolist() == frames
    for i, t in enumerate(frames):
        np.testing.assert_allclose(out.hidden_states[i, :t], ref[f"{name}.hidden{i}"], atol=TOL)
        np.testing.assert_allclose(out.pooled[i], ref[f"{name}.pooled{i}"], atol=TOL)


def test_preprocessed_waveforms_are_taken_as_they_are(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("wav2vec2_tiny"))
    x = ref["w2v.input_values2"]
    out = enc.encode({"input_features": x[None, None], "valid_frames": [len(x)]})
    np.testing.assert_allclose(out.pooled[0], ref["wav2vec2_tiny.pooled2"], atol=TOL)


def test_speech_through_the_model(ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the untrained fusion
        model = mlmf.MultiModalModel.load(
            {"modalities": {"audio": {"model": str(model_dir("hubert_tiny"))}}}
        )
    items = [w[None] for w in waves(ref)]
    out = model.infer(audio=items)
    want = np.stack([ref[f"hubert_tiny.pooled{i}"] for i in range(3)])
    np.testing.assert_allclose(out.embeddings["audio"], want, atol=TOL)
    # Cached by content: another order gives the same rows.
    again = model.infer(audio=items[::-1])
    np.testing.assert_array_equal(again.embeddings["audio"], out.embeddings["audio"][::-1])


def test_long_speech_is_encoded_in_chunks(ref, tmp_path):
    d = tmp_path / "w2v"
    shutil.copytree(model_dir("wav2vec2_tiny"), d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, "chunk_length": 1}))
    enc = mlmf.Encoder.from_pretrained(d)
    long = np.concatenate([ref["wave1"]] * 5)  # 24005 samples: 1.5 s, 2 chunks of 1 s
    out = enc.encode([long], sampling_rate=RATE)
    parts = enc.encode([long[:RATE], long[RATE:]], sampling_rate=RATE)
    t = parts.mask.sum(1)
    assert out.mask.sum() == t.sum()
    joined = np.concatenate([parts.hidden_states[0, : t[0]], parts.hidden_states[1, : t[1]]])
    np.testing.assert_allclose(out.hidden_states[0][out.mask[0].astype(bool)], joined, atol=1e-6)
    np.testing.assert_allclose(out.pooled[0], joined.mean(0), atol=1e-5)


# --- AST ------------------------------------------------------------------------------


def test_filter_banks_equal_the_reference(ref, tmp_path):
    proc = mlmf.AudioProcessor.from_pretrained(model_dir("ast_tiny"))
    assert proc.config["features"]["type"] == "kaldi_fbank"
    assert proc.config["feature_size"] == 20
    out = proc(waves(ref), sampling_rate=RATE)
    assert out["input_features"].shape == (3, 20, 27)
    # 4801 samples make 28 frames: the 28th is cut, as the reference cuts it (the 241
    # samples past the first chunk are less than one 400-sample frame: no 2nd chunk).
    assert out["num_chunks"].tolist() == [1, 1, 1]
    assert out["valid_frames"].tolist() == [18, 27, 6]
    for i in range(3):
        # Measured identical; float64 logarithms may differ in the last bit elsewhere.
        np.testing.assert_allclose(
            out["input_features"][i].T, ref[f"ast.features{i}"], atol=1e-6, rtol=0
        )
    # The raw filter banks, frame by frame: no normalisation and room for every frame.
    d = tmp_path / "raw"
    d.mkdir()
    cfg = json.loads((model_dir("ast_tiny") / "preprocessor_config.json").read_text())
    cfg.update(do_normalize=False, max_length=64)
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    raw = mlmf.AudioProcessor.from_pretrained(d)(waves(ref), sampling_rate=RATE)
    for i, frames in enumerate(CASE["processors"]["ast"]["fbank_frames"]):
        got = raw["input_features"][i, :, :frames].T
        np.testing.assert_allclose(got, ref[f"ast.fbank{i}"], atol=1e-5, rtol=0)
        assert not raw["input_features"][i, :, frames:].any()


@pytest.mark.parametrize("name", AST)
def test_ast_embeddings_equal_transformers(ref, name):
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    assert (enc.model_type, enc.modality) == ("audio-spectrogram-transformer", "audio")
    out = enc.encode(waves(ref), sampling_rate=RATE)
    want = ref[f"{name}.hidden_states"]
    assert out.hidden_states.shape == want.shape
    assert out.mask.all()
    np.testing.assert_allclose(out.hidden_states, want, atol=TOL)
    np.testing.assert_allclose(out.pooled, ref[f"{name}.pooled"], atol=TOL)
    # The reference's own features give the same result.
    feats = np.stack([ref[f"ast.features{i}"].T for i in range(3)])
    direct = enc.encode(feats)
    np.testing.assert_allclose(direct.pooled, ref[f"{name}.pooled"], atol=TOL)


def test_long_audio_pools_the_mean_of_its_chunks(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("ast_tiny"))
    step = 26 * 160 + 400  # samples in 27 frames
    long = np.concatenate(waves(ref) * 2)[: 2 * step + 500]
    out = enc.encode([long], sampling_rate=RATE)
    chunks = enc.encode([long[:step], long[step : 2 * step], long[2 * step :]], sampling_rate=RATE)
    assert out.hidden_states.shape[1] == 3 * 22
    np.testing.assert_allclose(out.pooled[0], chunks.pooled.mean(0), atol=1e-6)


# --- errors -----------------------------------------------------------------------------


def test_bad_inputs_name_what_was_expected(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("wav2vec2_tiny"))
    # The tiny feature encoder needs 30 samples for one frame.
    with pytest.raises(mlmf.InputError, match=r"audio input 1: expected between 30 samples"):
        enc.encode([ref["wave0"], ref["wave0"][:20]], sampling_rate=RATE)
    with pytest.raises(mlmf.InputError, match=r"expected raw waveforms \[B >= 1, 1, samples\]"):
        enc.encode(np.zeros((2, 20, 27), np.float32))
    ast = mlmf.Encoder.from_pretrained(model_dir("ast_tiny"))
    with pytest.raises(mlmf.InputError, match="audio input 1: expected at least 400 samples"):
        ast.encode([ref["wave0"], ref["wave0"][:100]], sampling_rate=RATE)
    with pytest.raises(mlmf.InputError, match=r"expected filter banks \[B >= 1, 20, 27\]"):
        ast.encode(np.zeros((1, 20, 30), np.float32))
    with pytest.raises(mlmf.ModelLoadError, match="encodes audio, not text"):
        mlmf.Encoder.from_pretrained(model_dir("hubert_tiny"), modality="text")


def _copy(tmp_path, name: str, drop: str | None = None, **config):
    d = tmp_path / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(model_dir(name), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    if drop is not None:
        _drop_tensor(d / "model.safetensors", drop)
    return d


def _drop_tensor(path, name: str) -> None:
    """Rewrites a safetensors file without tensor `name` (header: 8-byte little-endian
    length, JSON of dtype/shape/offsets; then the data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    del header[name]
    out, body = {}, bytearray()
    for key, meta in header.items():
        if key == "__metadata__":
            out[key] = meta
            continue
        start, end = meta["data_offsets"]
        out[key] = {**meta, "data_offsets": [len(body), len(body) + end - start]}
        body += data[start:end]
    text = json.dumps(out).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(body))


def test_bad_checkpoints_are_named(tmp_path):
    d = _copy(tmp_path, "wav2vec2_stable_tiny", drop="encoder.pos_conv_embed.conv.weight_g")
    with pytest.raises(mlmf.ModelLoadError, match=r"pos_conv_embed\.conv\.weight` is missing"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "wav2vec2_tiny", conv_kernel=[10, 3])
    with pytest.raises(mlmf.ConfigError, match="one entry per layer"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "wav2vec2_tiny", feat_extract_norm="batch")
    with pytest.raises(mlmf.ConfigError, match=r"feat_extract_norm.*\"group\" or \"layer\""):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "hubert_tiny", feat_proj_layer_norm=True)
    with pytest.raises(mlmf.ModelLoadError, match=r"feature_projection\.layer_norm\.weight"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "ast_tiny", time_stride=4)
    with pytest.raises(mlmf.ModelLoadError, match=r"position_embeddings` has shape"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "ast_tiny", drop="embeddings.distillation_token")
    with pytest.raises(mlmf.ModelLoadError, match="distillation_token` is missing"):
        mlmf.Encoder.from_pretrained(d)
    (d / "preprocessor_config.json").write_text(
        json.dumps({"feature_extractor_type": "SeamlessM4TFeatureExtractor"})
    )
    with pytest.raises(mlmf.ModelLoadError, match="feature_extractor_type.*ASTFeatureExtractor"):
        mlmf.AudioProcessor.from_pretrained(d)


def test_inspect_names_the_processor(capsys):
    from mlmf import cli

    for name, what in [("wav2vec2_tiny", "Wav2Vec2FeatureExtractor"), ("ast_tiny", "ASTFeature")]:
        cli.main(["inspect", str(model_dir(name))])
        out = capsys.readouterr().out
        assert what in out, out
