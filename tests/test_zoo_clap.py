"""CLAP: the ClapFeatureExtractor's mel, the HTSAT audio tower, the RoBERTa text tower,
text-audio similarity and zero-shot against transformers (tests/fixtures/zoo, made by
scripts/fixtures_clap.py)."""

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
CASE = EXPECTED["clap"]
RATE = 8000
NAMES = ["clap_tiny", "clap_fused_tiny"]


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(ZOO / CASE["arrays"]) as z:
        return {k: z[k] for k in z.files}


def model_dir(name: str):
    return ZOO / CASE["models"][name]["model"]


def waves(ref: dict) -> list[np.ndarray]:
    return [ref[f"wave{i}"] for i in range(3)]


@pytest.mark.parametrize("name", NAMES)
def test_mel_equals_the_reference_extractor(ref, name):
    proc = mlmf.AudioProcessor.from_pretrained(model_dir(name))
    kind = proc.config["features"]
    assert kind["type"] == "clap_mel" and kind["htk"] == (name == "clap_fused_tiny")
    out = proc(waves(ref), sampling_rate=RATE)
    assert out["input_features"].shape == (3, 16, 201)
    assert out["num_chunks"].tolist() == [1, 1, 1]
    for i in range(3):
        # Channel 0 of the reference (the fused extractor stacks four copies).
        want = ref[f"{name}.input_features{i}"][0, 0]
        np.testing.assert_allclose(out["input_features"][i].T, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_long_audio_is_covered_in_chunks(ref, name):
    proc = mlmf.AudioProcessor.from_pretrained(model_dir(name))
    long = ref["wave_long"]  # 23000 samples: a 16000-sample chunk and a 7000-sample one
    out = proc([long], sampling_rate=RATE)
    assert out["num_chunks"].tolist() == [2]
    # The first chunk is the reference's full-length mel, cut where a chunk ends: the
    # frames whose window lies inside the first 16000 samples agree.
    full = ref[f"{name}.long_mel"]
    inner = 16000 // 80 - 2  # frames clear of the chunk edge's reflect padding
    np.testing.assert_allclose(out["input_features"][0].T[:inner], full[:inner], atol=1e-4)
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    whole = enc.encode([long], sampling_rate=RATE).pooled
    parts = enc.encode([long[:16000], long[16000:]], sampling_rate=RATE).pooled
    np.testing.assert_allclose(whole[0], parts.mean(0), atol=1e-5)


def test_audio_embeddings_equal_transformers(ref):
    name = "clap_tiny"
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    assert (enc.model_type, enc.modality, enc.hidden_size, enc.output_dim) == (
        "clap",
        "audio",
        48,
        20,
    )
    out = enc.encode(waves(ref), sampling_rate=RATE)
    np.testing.assert_allclose(out.pooled, ref[f"{name}.audio.embeds"], atol=TOL)
    # Token states in the reference's last_hidden_state order: [B, C, bins, time].
    h = ref[f"{name}.audio.hidden_states"]
    want = h.reshape(h.shape[0], h.shape[1], -1).transpose(0, 2, 1)
    np.testing.assert_allclose(out.hidden_states, want, atol=TOL)
    assert out.mask.all()
    np.testing.assert_allclose(out.hidden_states.mean(1), ref[f"{name}.audio.pooled"], atol=TOL)
    # The reference's own features give the same result.
    feats = np.stack([ref[f"{name}.input_features{i}"][0, 0].T for i in range(3)])
    direct = enc.encode(np.ascontiguousarray(feats))
    np.testing.assert_allclose(direct.pooled, ref[f"{name}.audio.embeds"], atol=TOL)


def test_fused_checkpoints_take_the_global_path(ref):
    # transformers marks a lone short clip `is_longer` at random (its fusion block then
    # reads three copies of the clip); mlmf never does: the result equals the
    # reference's with is_longer False.
    name = "clap_fused_tiny"
    enc = mlmf.Encoder.from_pretrained(model_dir(name))
    out = enc.encode(waves(ref), sampling_rate=RATE)
    np.testing.assert_allclose(out.pooled, ref[f"{name}.audio.embeds_not_longer"], atol=TOL)


@pytest.mark.parametrize("name", NAMES)
def test_text_embeddings_equal_transformers(ref, name):
    enc = mlmf.Encoder.from_pretrained(model_dir(name), modality="text")
    assert (enc.model_type, enc.modality, enc.output_dim) == ("clap", "text", 20)
    out = enc.encode(CASE["texts"])
    np.testing.assert_allclose(out.pooled, ref[f"{name}.text.embeds"], atol=TOL)


@pytest.fixture(scope="module")
def model() -> mlmf.MultiModalModel:
    d = str(model_dir("clap_tiny"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlmf.MultiModalModel.load(
            {
                "modalities": {"text": {"model": d}, "audio": {"model": d}},
                "fusion": {"strategy": "late", "mode": "similarity"},
            }
        )


def audio_items(ref) -> list[np.ndarray]:
    # 8 kHz samples, as the checkpoint's rate (MultiModalModel takes arrays at it).
    return [w[None] for w in waves(ref)]


def test_similarity_equals_transformers(ref, model):
    name = "clap_tiny"
    s = model.similarity(CASE["texts"], audio=audio_items(ref))
    np.testing.assert_allclose(s.logits_per_text, ref[f"{name}.logits_per_text"], atol=TOL)
    # Two temperatures: logits_per_audio is not the transpose.
    np.testing.assert_allclose(s.logits_per_audio, ref[f"{name}.logits_per_audio"], atol=TOL)
    assert s.family == "clap" and s.modality == mlmf.Modality.AUDIO
    assert s.logit_scale_other is not None and s.logit_scale_other != s.logit_scale
    with pytest.raises(AttributeError, match="logits_per_other"):
        _ = s.logits_per_image


def test_zero_shot_equals_transformers(ref, model):
    name = "clap_tiny"
    r = model.zero_shot(audio=audio_items(ref), labels=CASE["labels"], template=CASE["template"])
    assert r.prompts == CASE["prompts"]
    np.testing.assert_allclose(r.logits, ref[f"{name}.zero_shot.logits"], atol=TOL)
    np.testing.assert_allclose(r.probs, ref[f"{name}.zero_shot.probs"], atol=1e-5)
    assert r.best == CASE["models"][name]["zero_shot"]["best"]
    with pytest.raises(mlmf.InputError, match="at least one label"):
        model.zero_shot(audio=audio_items(ref), labels=[])
    # Audio prompts default to the sound of a label.
    d = model.zero_shot(audio=audio_items(ref)[:1], labels=["dog"])
    assert d.prompts == ["the sound of a dog."]


def test_zero_shot_from_the_command_line(capsys):
    from mlmf import cli

    wav = str(FIXTURES / "audio" / "inputs" / "wav16_16000_mono.wav")
    cli.main(
        ["zero-shot", "--model", str(model_dir("clap_tiny")), "--audio", wav, "--labels", "a,b"]
    )
    out = capsys.readouterr().out
    assert "clap checkpoint (softmax over 2 labels, template 'the sound of a {}.')" in out, out


def test_bad_inputs_name_what_was_expected(ref):
    enc = mlmf.Encoder.from_pretrained(model_dir("clap_tiny"))
    with pytest.raises(mlmf.InputError, match=r"expected log-mel features \[B >= 1, 16, frames"):
        enc.encode(np.zeros((1, 16, 300), np.float32))
    with pytest.raises(mlmf.ModelLoadError, match="encodes audio or text, not image"):
        mlmf.Encoder.from_pretrained(model_dir("clap_tiny"), modality="image")


def test_bad_checkpoints_are_named(tmp_path):
    d = tmp_path / "clap"
    shutil.copytree(model_dir("clap_tiny"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["audio_config"]["depths"] = [2, 1, 2, 2]
    cfg["audio_config"]["num_attention_heads"] = [2, 3, 4, 4]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ModelLoadError, match=r"layers\.2\.downsample\.norm\.weight"):
        mlmf.Encoder.from_pretrained(d)
    cfg["audio_config"]["depths"] = [2, 1, 2]
    cfg["audio_config"]["num_attention_heads"] = [2, 3]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mlmf.ConfigError, match="num_attention_heads"):
        mlmf.Encoder.from_pretrained(d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, "truncation": "crop"}))
    with pytest.raises(mlmf.ModelLoadError, match="truncation"):
        mlmf.AudioProcessor.from_pretrained(d)


def test_inspect_names_the_audio_processor(capsys):
    from mlmf import cli

    cli.main(["inspect", str(model_dir("clap_tiny"))])
    out = capsys.readouterr().out
    assert "ClapFeatureExtractor" in out and "clap" in out, out
    assert "logit_scale" in out, out
