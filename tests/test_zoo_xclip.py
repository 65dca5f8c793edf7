"""X-CLIP: the video tower (cross-frame messages, the frame integration transformer), the
CLIP text tower, the video-specific prompts, similarity and zero-shot against
transformers (tests/fixtures/zoo, made by scripts/fixtures_xclip.py)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import mlmf
from conftest import FIXTURES
from mlmf import cli

ZOO = FIXTURES / "zoo"
EXPECTED = json.loads((ZOO / "expected.json").read_text())
TOL = EXPECTED["tolerance"]
CASE = EXPECTED["xclip"]
MODEL = ZOO / CASE["model"]


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / CASE["arrays"]) as z:
        return {k: z[k] for k in z.files}


def clips(ref: dict) -> list[np.ndarray]:
    return [ref[f"clip{i}"] for i in range(3)]


def load_model(**extra):
    cfg = {
        "modalities": {
            "text": {"model": str(MODEL)},
            "video": {"model": str(MODEL)},
        },
        **extra,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the untrained fusion
        return mlmf.MultiModalModel.load(cfg)


def test_frames_and_tokens_equal_the_reference_processors(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL)
    assert (enc.model_type, enc.modality, enc.output_dim) == ("xclip", "video", 20)
    image = mlmf.ImageProcessor.from_pretrained(MODEL)
    px = mlmf.VideoProcessor(num_frames=6, image=image)(clips(ref))["pixel_values"]
    np.testing.assert_array_equal(px, ref["pixel_values"])
    # The encoder samples the checkpoint's vision_config.num_frames (6) by default.
    np.testing.assert_array_equal(
        enc.encode(clips(ref)).pooled, enc.encode(ref["pixel_values"]).pooled
    )
    tp = mlmf.TextProcessor.from_pretrained(MODEL)
    out = tp(CASE["texts"])
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])


def test_video_tower_equals_get_video_features(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL, modality="video")
    out = enc.encode(ref["pixel_values"])
    np.testing.assert_allclose(out.pooled, ref["video_embeds"], atol=TOL, rtol=0)
    # hidden_states: what the prompt generator reads (projected patches, mean over frames).
    assert out.hidden_states.shape == (3, 25, 20) and out.mask.all()
    np.testing.assert_allclose(out.hidden_states, ref["img_features"], atol=TOL, rtol=0)
    # One clip at a time gives the same vectors: frames only talk within their clip.
    one = enc.encode(ref["pixel_values"][1:2])
    np.testing.assert_allclose(one.pooled[0], out.pooled[1], atol=1e-5, rtol=0)


def test_text_tower_equals_get_text_features(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL, modality="text")
    assert (enc.model_type, enc.modality, enc.output_dim) == ("xclip", "text", 20)
    out = enc.encode(CASE["texts"])
    np.testing.assert_allclose(out.pooled, ref["text_embeds"], atol=TOL, rtol=0)
    # Real-token states (padding rows depend on the reference's mask handling).
    mask = ref["attention_mask"].astype(bool)
    got = out.hidden_states[:, : mask.shape[1]]
    np.testing.assert_allclose(got[mask], ref["text_last_hidden_state"][mask], atol=TOL, rtol=0)


def test_similarity_equals_xclip_logits(ref):
    model = load_model()
    sim = model.similarity(text=CASE["texts"], video=clips(ref))
    assert sim.family == "xclip" and sim.modality == mlmf.Modality.VIDEO
    np.testing.assert_allclose(sim.logits_per_text, ref["logits_per_text"], atol=TOL, rtol=0)
    np.testing.assert_allclose(sim.logits_per_video, ref["logits_per_video"], atol=TOL, rtol=0)
    assert abs(sim.logit_scale - CASE["logit_scale"]) < 1e-6
    with pytest.raises(AttributeError, match="compared with video"):
        _ = sim.logits_per_image
    # Each video's texts are its own: one video alone scores the same.
    alone = model.similarity(text=CASE["texts"], video=clips(ref)[2:])
    np.testing.assert_allclose(
        alone.logits_per_text[:, 0], sim.logits_per_text[:, 2], atol=1e-5, rtol=0
    )


def test_zero_shot_equals_softmax_of_xclip_logits(ref):
    model = load_model()
    zs = model.zero_shot(video=clips(ref), labels=CASE["labels"], template=CASE["template"])
    assert zs.prompts == CASE["prompts"]
    np.testing.assert_allclose(zs.logits, ref["zero_shot_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(zs.probs, ref["zero_shot_probs"], atol=1e-5, rtol=0)
    assert zs.best_index == ref["zero_shot_probs"].argmax(1).tolist()
    # The default template for video.
    default = model.zero_shot(video=clips(ref), labels=CASE["labels"])
    assert default.prompts == CASE["prompts"]


def test_late_similarity_fusion_reports_the_same_scores(ref):
    model = load_model(fusion={"strategy": "late", "mode": "similarity"})
    out = model.infer(text=CASE["texts"][:3], video=clips(ref))
    np.testing.assert_allclose(
        out.similarity.logits_per_text, ref["logits_per_text"][:3], atol=TOL, rtol=0
    )
    # The token states the scores read are not returned unless asked for.
    assert "video" not in out.tokens


def test_bad_inputs_name_what_was_expected(ref):
    enc = mlmf.Encoder.from_pretrained(MODEL)
    with pytest.raises(mlmf.InputError, match=r"expected video frames \[B >= 1, 6, 3, 30, 30\]"):
        enc.encode(ref["pixel_values"][:, :4])
    with pytest.raises(mlmf.InputError, match=r"^video input.*expected float32 frames \[B, T,"):
        enc.encode(ref["pixel_values"][:, 0])  # one image per row, not a clip
    with pytest.raises(mlmf.ModelLoadError, match="encodes video or text, not image"):
        mlmf.Encoder.from_pretrained(MODEL, modality="image")
    model = load_model()
    with pytest.raises(mlmf.InputError, match="at least one label"):
        model.zero_shot(video=clips(ref), labels=[])
    with pytest.raises(mlmf.InputError, match="video"):
        model.zero_shot(image=[ref["clip0"][0]], labels=["dog"])


def _copy(tmp_path, **config):
    d = tmp_path / "xclip"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(MODEL, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in config.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_checkpoints_are_named(tmp_path):
    d = _copy(tmp_path, vision_config={"num_hidden_layers": 3})
    with pytest.raises(mlmf.ModelLoadError, match=r"vision_model\.encoder\.layers\.2\."):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, vision_config={"mit_hidden_size": 24})
    with pytest.raises(mlmf.ConfigError, match="mit_hidden_size.*projection_dim 20"):
        mlmf.Encoder.from_pretrained(d)
    d = _copy(tmp_path, prompt_layers=3)
    model = load_model(
        modalities={"text": {"model": str(d)}, "video": {"model": str(d)}},
    )
    with pytest.raises(mlmf.ModelLoadError, match=r"prompts_generator\.decoder\.2\."):
        model.similarity(text=["a"], video=[np.zeros((6, 30, 30, 3), np.uint8)])


def test_inspect_names_the_towers_and_the_prompts(capsys):
    assert cli.main(["inspect", "--json", str(MODEL)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["encoders"]) == {"video", "text"}
    assert info["similarity"] == {"towers": ["text", "video"], "probabilities": "softmax"}
    assert "prompts_generator.alpha" in info["aligned_heads"]
    assert info["processors"]["video"]["num_frames"] == 6
