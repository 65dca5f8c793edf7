"""VideoMAE, a native video encoder, against transformers
(tests/fixtures/zoo, made by scripts/fixtures_zoo.py)."""

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
CASE = EXPECTED["videomae"]
NAMES = sorted(CASE["models"])


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / CASE["arrays"]) as z:
        return {k: z[k] for k in z.files}


def clips(ref: dict) -> list[np.ndarray]:
    return [ref[f"clip{i}"] for i in range(len(CASE["clips"]))]


def model_dir(name: str):
    return ZOO / CASE["models"][name]["model"]


def test_the_fixture_covers_each_variant():
    assert NAMES == ["videomae_cls_tiny", "videomae_norm_tiny", "videomae_tiny"]
    classes = {CASE["models"][n]["model_class"] for n in NAMES}
    assert classes == {"VideoMAEModel", "VideoMAEForVideoClassification"}


def test_frames_equal_the_reference_processor_bit_for_bit(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("videomae_tiny"))
    image = mlmf.ImageProcessor.from_pretrained(model_dir("videomae_tiny"))
    px = mlmf.VideoProcessor(num_frames=6, image=image)(clips(ref))["pixel_values"]
    assert px.shape == ref["pixel_values"].shape == (3, 6, 3, 30, 30)
    np.testing.assert_array_equal(px, ref["pixel_values"])
    # The encoder samples the checkpoint's num_frames (6) by default.
    a = enc.encode(clips(ref))
    b = enc.encode(ref["pixel_values"])
    np.testing.assert_array_equal(a.pooled, b.pooled)


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_equal_transformers(ref, name):
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    assert (enc.model_type, enc.modality, enc.output_dim) == ("videomae", "video", 36)
    out = enc.encode(ref["pixel_values"])
    assert out.hidden_states.shape == (3, 75, 36)
    assert out.mask.all()
    np.testing.assert_allclose(out.hidden_states, ref[f"{name}.hidden_states"], atol=TOL)
    np.testing.assert_allclose(out.pooled, ref[f"{name}.pooled"], atol=TOL)


def test_through_the_model_from_raw_clips(ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the untrained fusion
        model = mlmf.MultiModalModel.load(
            {"modalities": {"video": {"model": str(model_dir("videomae_tiny"))}}}
        )
    out = model.infer(video=clips(ref))
    np.testing.assert_allclose(out.embeddings["video"], ref["videomae_tiny.pooled"], atol=TOL)
    again = model.infer(video=clips(ref)[::-1])
    np.testing.assert_array_equal(again.embeddings["video"], out.embeddings["video"][::-1])


def test_bad_inputs_name_what_was_expected(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("videomae_tiny"))
    with pytest.raises(mlmf.InputError, match=r"expected video frames \[B >= 1, 6, 3, 30, 30\]"):
        enc.encode(ref["pixel_values"][:, :4])
    with pytest.raises(mlmf.InputError, match=r"^video input.*\[B, T, 3, H, W\]"):
        enc.encode(ref["pixel_values"][:, 0])  # one image per row, not a clip
    # A clip shorter than the model's 6 frames, sampled by the default sampler.
    with pytest.raises(mlmf.InputError, match="video input 0: video has 4 frames"):
        enc.encode([ref["clip0"][:4]])
    with pytest.raises(mlmf.ModelLoadError, match="encodes video, not image"):
        mlmf.Encoder.from_pretrained(model_dir("videomae_tiny"), modality="image")


def _copy(tmp_path, name: str, **config):
    d = tmp_path / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(model_dir(name), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_checkpoints_are_named(tmp_path):
    d = _copy(tmp_path, "videomae_tiny", num_hidden_layers=4)
    with pytest.raises(
        mlmf.ModelLoadError, match=r"weight `encoder\.layer\.3\.[a-z_.]+` is missing"
    ):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "videomae_norm_tiny", qv_bias=False, use_mean_pooling=True)
    # Loads (the biases are simply not read) but no longer matches the reference.
    mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "videomae_cls_tiny", qv_bias=True)
    with pytest.raises(mlmf.ModelLoadError, match="q_bias"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "videomae_tiny", num_frames=5)
    with pytest.raises(mlmf.ConfigError, match="num_frames.*multiple of tubelet_size 2"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, "videomae_tiny", num_attention_heads=5)
    with pytest.raises(
        mlmf.ModelLoadError, match="not divisible by the number of attention heads 5"
    ):
        mlmf.Encoder.from_pretrained(d)


def test_num_frames_can_be_set_and_is_kept_when_pickled(ref):
    import pickle

    enc = mlmf.Encoder.from_pretrained(model_dir("videomae_tiny"))
    back = pickle.loads(pickle.dumps(enc))
    np.testing.assert_array_equal(back.encode(clips(ref)).pooled, enc.encode(clips(ref)).pooled)
    twelve = [np.concatenate([c, c]) for c in clips(ref)]
    # 12 frames sampled to 6 (every other frame: the first copy's frames 0, 2, 4, then
    # the second's) differ from the 6-frame clip; asked for 12 frames the model refuses.
    out = enc.encode(twelve)
    assert out.pooled.shape == (3, 36)
    wide = mlmf.Encoder.from_pretrained(model_dir("videomae_tiny"), num_frames=12)
    with pytest.raises(mlmf.InputError, match=r"expected video frames \[B >= 1, 6,"):
        wide.encode(twelve)
