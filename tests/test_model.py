"""MultiModalModel: the whole pipeline on the tiny fixture checkpoints.

Per-modality embeddings are checked against the transformers / sentence-transformers
outputs stored by scripts/make_fixtures.py (tests/fixtures/encoders), and the fused
output against the stages run one by one.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import warnings
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlmf

FIX = Path(__file__).parent / "fixtures"
ENC = FIX / "encoders"
MODELS = ENC / "models"
MANIFEST = __import__("json").loads((ENC / "manifest.json").read_text())
CASES = {c["id"]: c for c in MANIFEST["cases"]}
DATA = Path(mlmf.__file__).parent / "data"

# Acceptance bound of the end-to-end parity with the reference libraries.
ATOL = 1e-4


@cache
def expected() -> dict[str, np.ndarray]:
    with zipfile.ZipFile(ENC / "expected.npz") as zf:
        out = {}
        for n in zf.namelist():
            with zf.open(n) as f:
                out[n[: -len(".npy")]] = np.lib.format.read_array(f)
        return out


def reference(cid: str, what: str = "pooled") -> np.ndarray:
    return expected()[CASES[cid]["outputs"][what]["key"]]


def config(**fusion) -> dict:
    return {
        "modalities": {
            "text": {"model": str(MODELS / "st_mean_norm")},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
        },
        "fusion": {"strategy": "attention", "attention_dim": 16, "out_dim": 24, **fusion},
        "cross_modal_attention": {"num_heads": 2, "pairs": ["text->image"]},
    }


def load(cfg: dict | None = None) -> mlmf.MultiModalModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained fusion / attention
        return mlmf.MultiModalModel.load(cfg or config())


TEXTS = CASES["st_mean_norm"]["raw"]["texts"][:2]
IMAGES = [str(FIX / f) for f in CASES["clip_tiny_jpeg"]["raw"]["files"]]
AUDIO = [str(FIX / f) for f in CASES["whisper_tiny"]["raw"]["files"]]


def test_embeddings_match_the_reference_libraries() -> None:
    model = load()
    out = model.infer(text=TEXTS, image=IMAGES, audio=AUDIO)
    for modality, cid in [
        ("text", "st_mean_norm"),
        ("image", "clip_tiny_jpeg"),
        ("audio", "whisper_tiny"),
    ]:
        want = reference(cid)[: len(TEXTS)]
        got = out.embeddings[modality]
        assert got.shape == want.shape, modality
        err = float(np.abs(got - want).max())
        assert err <= ATOL, f"{modality}: max abs diff {err:.3g}"
    assert out.fused.shape == (2, 24)
    assert set(out.gates) == {"text", "image", "audio"}
    np.testing.assert_allclose(sum(out.gates.values()), 1.0, atol=1e-6)


def test_minilm_through_the_model(minilm_dir: Path) -> None:
    case = CASES["minilm_real"]
    model = load(
        {"modalities": {"text": {"model": str(minilm_dir)}}, "fusion": {"strategy": "late"}}
    )
    out = model.infer(text=case["raw"]["texts"])
    err = float(np.abs(out.embeddings["text"] - reference("minilm_real")).max())
    assert err <= ATOL, err


def test_infer_equals_the_stages_run_one_by_one() -> None:
    model = load()
    out = model.infer(text=TEXTS, image=IMAGES, audio=AUDIO, return_tokens=True)
    pooled = {}
    for modality, name in [
        ("text", "st_mean_norm"),
        ("image", "clip_tiny"),
        ("audio", "whisper_tiny"),
    ]:
        enc = mlmf.Encoder.from_pretrained(MODELS / name, modality=modality)
        raw = {"text": TEXTS, "image": IMAGES, "audio": AUDIO}[modality]
        e = enc.encode(raw)
        np.testing.assert_array_equal(out.embeddings[modality], e.pooled)
        # Token states: cut after the longest item's last real position (Whisper's
        # 1500 frames hold 65 of signal here); the real positions are equal.
        got = out.tokens[modality]
        width = got["mask"].shape[1]
        assert not e.mask[:, width:].any()
        np.testing.assert_array_equal(got["mask"], e.mask[:, :width])
        real = got["mask"].astype(bool)
        np.testing.assert_array_equal(got["hidden_states"][real], e.hidden_states[:, :width][real])
        assert not got["hidden_states"][~real].any()
        pooled[modality] = e.pooled
    dims = {m: v.shape[1] for m, v in pooled.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fusion = mlmf.Fusion("attention", dims, 24, attention_dim=16)
    want = fusion(pooled)
    np.testing.assert_array_equal(out.fused, want.fused)


def test_a_repeated_call_is_served_from_the_caches() -> None:
    model = load()
    first = model.infer(text=TEXTS, image=IMAGES, audio=AUDIO, return_attention=True)
    second = model.infer(text=TEXTS, image=IMAGES, audio=AUDIO, return_attention=True)
    for m in ("text", "image", "audio"):
        assert second.stats["modalities"][m]["hits"] == 2
        assert second.stats["modalities"][m]["encoded"] == 0
        np.testing.assert_array_equal(first.embeddings[m], second.embeddings[m])
    assert second.stats["fusion_cached"]
    np.testing.assert_array_equal(first.fused, second.fused)
    np.testing.assert_array_equal(first.attention["text->image"], second.attention["text->image"])
    stats = model.stats()
    assert stats["calls"] == 2
    image = stats["modalities"]["image"]
    assert image["items"] == 4 and image["encoded"] == 2
    assert image["cache"]["hits"] == 2 and image["cache"]["misses"] == 2
    assert image["encode"]["count"] == 1 and image["encode"]["p50_ms"] > 0
    assert stats["attention_cache"]["hits"] == 2
    assert stats["cached_bytes"] > 0
    model.reset_stats()
    assert model.stats()["calls"] == 0
    model.clear_cache()
    third = model.infer(image=IMAGES)
    assert third.stats["modalities"]["image"]["encoded"] == 2


def test_caller_ids_key_the_cache() -> None:
    model = load()
    model.infer(image=IMAGES[:1], ids={"image": ["photo-1"]})
    # The same id with other bytes is a hit: the id is the key.
    out = model.infer(image=IMAGES[1:], ids={"image": ["photo-1"]})
    assert out.stats["modalities"]["image"]["hits"] == 1
    with pytest.raises(mlmf.InputError, match="1 ids for 2 items"):
        model.infer(image=IMAGES, ids={"image": ["x"]})


def test_disabling_a_modality_at_run_time() -> None:
    model = load()
    full = model.infer(text=TEXTS, image=IMAGES)
    model.disable("image")
    assert [m.name for m in model.enabled_modalities] == ["text", "audio"]
    out = model.infer(text=TEXTS, image=IMAGES)
    assert out.skipped == ["image"]
    assert "image" not in out.embeddings
    np.testing.assert_array_equal(out.fused, model.infer(text=TEXTS).fused)
    model.enable(mlmf.Modality.IMAGE)
    np.testing.assert_array_equal(model.infer(text=TEXTS, image=IMAGES).fused, full.fused)
    model.disable("text")
    model.disable("image")
    with pytest.raises(mlmf.MissingModalityError, match="disabled"):
        model.infer(text=TEXTS, image=IMAGES)


def test_required_modality() -> None:
    model = load(config(required=["image"]))
    with pytest.raises(mlmf.MissingModalityError, match="image"):
        model.infer(text=TEXTS)


def test_bad_calls_raise_typed_errors() -> None:
    model = load()
    with pytest.raises(mlmf.InputError, match="1 items, but text has 2"):
        model.infer(text=TEXTS, image=IMAGES[:1])
    with pytest.raises(mlmf.InputError, match="no video modality"):
        model.infer(video=[str(DATA / "sample.gif")])
    with pytest.raises(mlmf.DecodeError) as e:
        model.infer(image=[IMAGES[0], b"not an image"])
    assert "image" in str(e.value) and "1" in str(e.value)
    with pytest.raises(mlmf.InputError, match="float32"):
        model.infer(image=[np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(mlmf.InputError, match="uint8"):
        model.infer(audio=[np.zeros(100, np.uint8)])
    with pytest.raises(mlmf.InputError, match="empty"):
        model.infer(text=[])
    with pytest.raises(mlmf.MissingModalityError):
        model.infer()
    with pytest.raises(mlmf.ConfigError, match="modalities.text.model"):
        mlmf.MultiModalModel.load({"modalities": {"text": {}}})
    with pytest.raises(mlmf.ModelLoadError):
        mlmf.MultiModalModel.load({"modalities": {"text": {"model": "/no/such/dir"}}})
    with pytest.raises(mlmf.ConfigError, match="cross_modal_attention.pairs"):
        load(
            {
                "modalities": {"text": {"model": str(MODELS / "st_mean_norm")}},
                "cross_modal_attention": {"pairs": ["text->video"]},
            }
        )


def test_config_file_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "models").symlink_to(MODELS)
    path = tmp_path / "mlmf.toml"
    path.write_text(
        """
[modalities.text]
model = "models/st_mean_norm"
preprocessing = { max_length = 5 }

[modalities.image]
model = "models/clip_tiny"

[fusion]
strategy = "late"
mode = "mean"
out_dim = 8
seed = 3
""",
        encoding="utf-8",
    )
    model = load(str(path))
    assert model.out_dim == 8
    out = model.infer(
        text=["a long sentence with many more than five tokens in it"], return_tokens=True
    )
    assert out.tokens["text"]["mask"].shape == (1, 5)
    with pytest.raises(mlmf.ConfigError, match="modalities.text.preprocessing"):
        mlmf.MultiModalModel.load(
            {
                "modalities": {
                    "text": {
                        "model": str(MODELS / "st_mean_norm"),
                        "preprocessing": {"max_lenght": 3},
                    }
                }
            }
        )


def test_paths_in_a_config_dict() -> None:
    cfg = {
        "modalities": {"text": {"model": MODELS / "st_mean_norm"}},
        "fusion": {"strategy": "late"},
    }
    assert load(cfg).infer(text=["x"]).embeddings["text"].shape == (1, 32)
    with pytest.raises(mlmf.ConfigError):
        mlmf.MultiModalModel.load({"modalities": object()})


def test_loader_with_modality_paths() -> None:
    loader = (
        mlmf.MultiModalLoader({"fusion": {"strategy": "gated"}})
        .with_modality_path(mlmf.Modality.TEXT, MODELS / "bert_tiny")
        .with_modality_path("image", MODELS / "vit_tiny")
    )
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = loader.load()
    assert any("untrained" in str(x.message) for x in w)
    assert model.untrained
    assert sorted(model.encoders) == ["image", "text"]
    out = model.infer(text=["x", "y"], image=[np.zeros((30, 30, 3), np.uint8)] * 2)
    assert out.fused.shape == (2, model.out_dim)


def test_video_through_the_model() -> None:
    model = load(
        {
            "modalities": {
                "video": {
                    "model": str(MODELS / "clip_vision_tiny"),
                    "preprocessing": {"sampler": {"type": "uniform", "num_frames": 4}},
                }
            },
            "fusion": {"strategy": "late"},
        }
    )
    gif = DATA / "sample.gif"
    out = model.infer(video=[str(gif), gif.read_bytes()])
    np.testing.assert_array_equal(out.embeddings["video"][0], out.embeddings["video"][1])
    assert out.stats["modalities"]["video"]["encoded"] == 1
    frames = np.random.default_rng(0).integers(0, 255, (6, 20, 20, 3), dtype=np.uint8)
    assert model.infer(video=[frames]).embeddings["video"].shape == (1, 32)


def test_many_threads_share_one_model() -> None:
    model = load()
    texts = [f"sentence number {i}" for i in range(20)]
    images = [np.full((30 + i, 40, 3), 20 * i, np.uint8) for i in range(6)]

    def call(kind: int, i: int, j: int) -> mlmf.MultiModalOutput:
        if kind == 0:
            return model.infer(text=[texts[i]])
        if kind == 1:
            return model.infer(image=[images[j]])
        return model.infer(text=[texts[i], texts[-1 - i]], image=[images[j], images[-1 - j]])

    # Single-threaded results of every call, with a cold cache each time.
    want = {}
    for kind in range(3):
        for i in range(len(texts)):
            for j in range(len(images)):
                model.clear_cache()
                want[kind, i, j] = call(kind, i, j).fused
    model.clear_cache()
    model.reset_stats()
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for n in range(500):
                kind, i, j = int(rng.integers(3)), int(rng.integers(20)), int(rng.integers(6))
                got = call(kind, i, j).fused
                np.testing.assert_allclose(got, want[kind, i, j], rtol=0, atol=1e-6)
                if n % 100 == 99:
                    model.clear_cache()  # back to misses now and then
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors[0]
    stats = model.stats()
    assert stats["calls"] == 8 * 500
    assert stats["modalities"]["text"]["encoded"] < stats["modalities"]["text"]["items"]


def test_other_preprocessing_settings_miss(tmp_path: Path) -> None:
    def model(max_length: int) -> mlmf.MultiModalModel:
        text = {"model": str(MODELS / "st_mean_norm"), "preprocessing": {"max_length": max_length}}
        return load(
            {
                "modalities": {"text": text},
                "fusion": {"strategy": "late"},
                "cache": {"disk": {"path": str(tmp_path / "c.redb")}},
            }
        )

    long = ["a sentence that is longer than five tokens for sure"]
    first = model(5).infer(text=long)
    other = model(8).infer(text=long)
    assert other.stats["modalities"]["text"]["disk_hits"] == 0
    assert not np.array_equal(first.embeddings["text"], other.embeddings["text"])
    same = model(5).infer(text=long)
    assert same.stats["modalities"]["text"]["disk_hits"] == 1
    np.testing.assert_array_equal(first.embeddings["text"], same.embeddings["text"])


def test_concurrent_identical_calls_compute_once() -> None:
    model = load()
    barrier = threading.Barrier(8)
    outs = []

    def work() -> None:
        barrier.wait()
        outs.append(model.infer(image=IMAGES).embeddings["image"])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.stats()["modalities"]["image"]["encoded"] == 2
    for o in outs:
        np.testing.assert_array_equal(o, outs[0])


def test_ainfer() -> None:
    model = load()

    async def main():
        return await asyncio.gather(*(model.ainfer(text=[t]) for t in TEXTS))

    outs = asyncio.run(main())
    for t, o in zip(TEXTS, outs):
        np.testing.assert_array_equal(
            o.embeddings["text"], model.infer(text=[t]).embeddings["text"]
        )


def test_pickle_round_trip() -> None:
    model = load()
    model.disable("audio")
    again = pickle.loads(pickle.dumps(model))
    assert [m.name for m in again.enabled_modalities] == ["text", "image"]
    a = model.infer(text=TEXTS, image=IMAGES)
    b = again.infer(text=TEXTS, image=IMAGES)
    np.testing.assert_array_equal(a.fused, b.fused)
    assert again.stats()["calls"] == 1


def test_cache_budgets_change_at_run_time_by_priority() -> None:
    cfg = config()
    cfg["cache"] = {
        "max_memory": "1 MiB",
        "modalities": {"image": {"priority": 10}},
    }
    model = load(cfg)
    before = model.cache_budgets()
    assert set(before) == {"text", "image", "audio", "fusion", "attention"}
    assert sum(before.values()) <= 1 << 20
    model.infer(text=TEXTS, image=IMAGES, audio=AUDIO)
    # Shrink to a tenth: text and audio (priority 0) give up their memory first.
    model.set_cache_budget(100_000)
    after = model.cache_budgets()
    assert sum(after.values()) <= 100_000
    assert after["image"] == before["image"] or after["text"] == after["audio"] == 0
    assert after["text"] < before["text"] and after["audio"] < before["audio"]
    stats = model.stats()
    for m in ("text", "image", "audio"):
        c = stats["modalities"][m]["cache"]
        assert c["bytes"] <= c["budget"] == after[m]
    # The image entries survived; a repeated image call is still served from the cache.
    assert model.infer(image=IMAGES).stats["modalities"]["image"]["hits"] == 2
    model.set_modality_budget("text", "2 KiB")
    assert model.cache_budgets()["text"] == 2048
    with pytest.raises(mlmf.ConfigError):
        model.set_cache_budget("lots")


def test_custom_modalities_take_embeddings() -> None:
    cfg = config()
    cfg["modalities"]["custom:3"] = {"dim": 6}
    model = load(cfg)
    assert model.encoders["custom:3"] == ("given", 6, 6)
    emb = np.arange(12, dtype=np.float32).reshape(2, 6)
    out = model.infer(text=TEXTS, custom_3=emb)
    np.testing.assert_array_equal(out.embeddings["custom:3"], emb)
    same = model.infer(text=TEXTS, embeddings={"custom:3": emb})
    np.testing.assert_array_equal(out.fused, same.fused)
    assert same.stats["fusion_cached"]
    # Token states with a mask: pooled by the masked mean.
    tokens = np.ones((2, 4, 6), np.float32)
    tokens[:, 2:] = 100.0
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    got = model.infer(custom_3=(tokens, mask)).embeddings["custom:3"]
    np.testing.assert_allclose(got[0], 1.0)
    np.testing.assert_allclose(got[1], 34.0)
    # Precomputed image embeddings bypass the image encoder.
    pooled = model.infer(image=IMAGES).embeddings["image"]
    again = model.infer(text=TEXTS, embeddings={"image": pooled})
    np.testing.assert_array_equal(again.embeddings["image"], pooled)
    with pytest.raises(mlmf.InputError, match="6 wide"):
        model.infer(custom_3=np.zeros((2, 5), np.float32))
    with pytest.raises(mlmf.ConfigError, match="custom_N"):
        model.infer(text=TEXTS, colour=emb)
    with pytest.raises(mlmf.InputError, match="ids were given"):
        model.infer(text=TEXTS, custom_3=emb, ids={"custom:3": ["a", "b"]})
    loader = mlmf.MultiModalLoader({"fusion": {"strategy": "late"}})
    only = loader.with_given_modality(mlmf.Modality.custom(1), 4).load()
    assert only.infer(custom_1=np.ones((3, 4), np.float32)).fused.shape == (3, 4)
