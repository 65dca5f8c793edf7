"""Every stage on `device="cuda"` against the same stage on the CPU in float32.

Marked `cuda` (`pytest -m cuda` runs only these). They need a build with the `cuda`
feature (`maturin develop --release --features python,cuda`) and a GPU whose driver and
CUDA libraries load; elsewhere each is skipped with the reason.
`scripts/device_check.sh` runs them on the GPU machine.

`MLMF_TEST_GPU=cpu` runs them with the CPU standing in for the GPU (the comparisons
then hold trivially; what it checks is that every test's own steps work, before they
run on a GPU); `scripts/device_check.sh --device cpu` does so. Tests of what only a GPU
refuses are skipped then.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import mlmf
from test_encoders import CASES, TINY, cosines, encoder_inputs, model_dir, stored

pytestmark = pytest.mark.cuda

# The device under test: "cuda", or "cpu" standing in for it (see the module docs).
GPU = os.environ.get("MLMF_TEST_GPU", "cuda")
DRY_RUN = GPU == "cpu"

FIX = Path(__file__).parent / "fixtures"
MODELS = FIX / "encoders" / "models"

# CPU float32 against CUDA float32 (the bound: both are float32, only the order of
# the sums differs).
ATOL = 1e-4
# CUDA 16-bit against CPU float32 on the tiny fixtures: the bounds the CPU's own 16-bit
# weights are held to (tests/test_encoders.py), where candle runs the whole forward in
# 16 bits on the GPU.
HALF_ATOL = {"float16": 2e-2, "bfloat16": 1e-1}


@functools.cache
def gpu_missing() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can."""
    if DRY_RUN:
        return None
    if not mlmf.CUDA_COMPILED:
        return "this build of mlmf has no CUDA support (build it with `--features python,cuda`)"
    try:
        mlmf.Encoder.from_pretrained(MODELS / "bert_tiny", device="cuda")
    except mlmf.DeviceError as exc:
        return f"no usable GPU: {exc}"
    return None


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    reason = gpu_missing()
    if reason:
        pytest.skip(reason)


def on(cid: str, device: str, dtype: str = "float32") -> mlmf.Encoder:
    case = CASES[cid]
    return mlmf.Encoder.from_pretrained(
        model_dir(case), modality=case["modality"], device=device, dtype=dtype
    )


def close(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol}"
    return err


@pytest.mark.parametrize("cid", TINY)
def test_each_family_on_cuda_equals_the_cpu(cid: str) -> None:
    x = encoder_inputs(CASES[cid])
    cpu = on(cid, "cpu").encode(x)
    gpu_enc = on(cid, GPU)
    assert gpu_enc.device.startswith(GPU)
    gpu = gpu_enc.encode(x)
    close(f"{cid} pooled", gpu.pooled, cpu.pooled, ATOL)
    close(f"{cid} hidden states", gpu.hidden_states, cpu.hidden_states, ATOL)
    np.testing.assert_array_equal(gpu.mask, cpu.mask)
    # And the GPU against transformers, as the CPU is in tests/test_encoders.py.
    assert cosines(gpu.pooled, stored(CASES[cid]["outputs"]["pooled"])).min() > 0.99999


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cid", ["bert_tiny", "clip_vision_tiny", "whisper_tiny", "vit_tiny"])
def test_sixteen_bit_weights_on_cuda_stay_close_to_cpu_float32(cid: str, dtype: str) -> None:
    x = encoder_inputs(CASES[cid])
    want = on(cid, "cpu").encode(x).pooled
    enc = on(cid, GPU, dtype)
    assert enc.dtype == dtype
    got = enc.encode(x).pooled
    assert got.dtype == np.float32
    close(f"{cid} {dtype}", got, want, HALF_ATOL[dtype])
    assert cosines(got, want).min() > 0.999


def test_int8_is_refused_on_cuda() -> None:
    if DRY_RUN:
        pytest.skip("int8 runs on the CPU")
    with pytest.raises(mlmf.ConfigError, match="int8 runs on the CPU only"):
        mlmf.Encoder.from_pretrained(MODELS / "bert_tiny", device="cuda", dtype="int8")


TEXTS = CASES["st_mean_norm"]["raw"]["texts"][:2]
IMAGES = [str(FIX / f) for f in CASES["clip_tiny_jpeg"]["raw"]["files"]]
AUDIO = [str(FIX / f) for f in CASES["whisper_tiny"]["raw"]["files"]]

FUSIONS = [
    ("late", {"mode": "concat"}),
    ("late", {"mode": "weighted"}),
    ("attention", {"attention_dim": 16}),
    ("gated", {}),
    ("early", {"num_heads": 2, "num_layers": 2}),
    ("middle", {"num_heads": 2, "num_layers": 2}),
]


def model_config(device: str, strategy: str, opts: dict, cache: dict | None = None) -> dict:
    return {
        "device": device,
        "modalities": {
            "text": {"model": str(MODELS / "st_mean_norm")},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
        },
        "fusion": {"strategy": strategy, "out_dim": 24, "seed": 3, **opts},
        "cross_modal_attention": {"num_heads": 2, "pairs": ["text->image"], "seed": 4},
        "cache": cache or {"enabled": False},
    }


def model(device: str, strategy: str, opts: dict, cache: dict | None = None):
    cfg = model_config(device, strategy, opts, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained fusion / attention
        return mlmf.MultiModalModel.load(cfg)


@pytest.mark.parametrize(("strategy", "opts"), FUSIONS)
def test_the_whole_model_on_cuda_equals_the_cpu(strategy: str, opts: dict) -> None:
    """Encoders, cross-modal attention and every fusion strategy, end to end."""
    inputs = {"text": TEXTS, "image": IMAGES, "audio": AUDIO}
    cpu = model("cpu", strategy, opts).infer(**inputs)
    gpu = model(GPU, strategy, opts).infer(**inputs)
    for m in ("text", "image", "audio"):
        close(f"{strategy} {m} embedding", gpu.embeddings[m], cpu.embeddings[m], ATOL)
    close(f"{strategy} fused", gpu.fused, cpu.fused, ATOL)
    for pair, weights in cpu.attention.items():
        close(f"{strategy} attention {pair}", gpu.attention[pair], weights, ATOL)


def test_cache_keys_are_the_same_on_every_device(tmp_path: Path) -> None:
    """What the CPU wrote to the disk cache, the GPU model reads back."""
    disk = {"disk": {"path": str(tmp_path / "cache")}}
    first = model("cpu", "late", {"mode": "concat"}, cache=disk).infer(text=TEXTS)
    again = model(GPU, "late", {"mode": "concat"}, cache=disk).infer(text=TEXTS)
    assert again.stats["modalities"]["text"]["disk_hits"] == len(TEXTS)
    assert again.stats["modalities"]["text"]["encoded"] == 0
    np.testing.assert_array_equal(again.embeddings["text"], first.embeddings["text"])


def test_a_bfloat16_model_with_adapters_and_token_fusion_on_cuda() -> None:
    """16-bit encoders' states through the adapters, the attention and an early fusion
    (the model reads them as float32 and returns float32 arrays)."""
    inputs = {"text": TEXTS, "image": IMAGES, "audio": AUDIO}
    cfgs = {}
    for device, dtype in (("cpu", "float32"), (GPU, "bfloat16")):
        cfg = model_config(device, "early", {"num_heads": 2, "num_layers": 1})
        cfg["dtype"] = dtype
        cfg["adapters"] = {"dim": 16, "seed": 5}
        cfgs[dtype] = cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = mlmf.MultiModalModel.load(cfgs["float32"]).infer(**inputs)
        gpu = mlmf.MultiModalModel.load(cfgs["bfloat16"]).infer(**inputs)
    for m in ("text", "image", "audio"):
        assert gpu.embeddings[m].dtype == np.float32
        assert cosines(gpu.embeddings[m], cpu.embeddings[m]).min() > 0.99, m
        assert cosines(gpu.projected[m], cpu.projected[m]).min() > 0.99, m
    assert gpu.fused.shape == cpu.fused.shape and np.isfinite(gpu.fused).all()
    assert cosines(gpu.fused, cpu.fused).min() > 0.98


def test_given_token_states_and_their_mask_on_cuda() -> None:
    """A host mask beside token states that the model moves to the GPU."""
    rng = np.random.default_rng(2)
    tokens = rng.standard_normal((2, 5, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    outs = []
    for device in ("cpu", GPU):
        cfg = model_config(device, "attention", {"attention_dim": 16})
        cfg["modalities"]["custom:3"] = {"dim": 6}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = mlmf.MultiModalModel.load(cfg)
        outs.append(m.infer(text=TEXTS, embeddings={"custom:3": (tokens, mask)}))
    cpu, gpu = outs
    close("given tokens", gpu.embeddings["custom:3"], cpu.embeddings["custom:3"], ATOL)
    close("fused", gpu.fused, cpu.fused, ATOL)


def test_a_python_encoder_inside_a_cuda_model(tmp_path: Path) -> None:
    """An encoder registered from Python returns host arrays; the model moves them."""
    d = tmp_path / "toy"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "toy_mean_pixels_cuda"}')
    vit = MODELS / "vit_tiny"
    (d / "model.safetensors").write_bytes((vit / "model.safetensors").read_bytes())
    (d / "preprocessor_config.json").write_bytes((vit / "preprocessor_config.json").read_bytes())
    mlmf.register_encoder(
        "toy_mean_pixels_cuda",
        lambda path, config: lambda px: px.mean(axis=(2, 3)),
        modality="image",
        dim=3,
    )
    outs = {}
    for name, device in (("cpu", "cpu"), ("gpu", GPU)):
        cfg = model_config(device, "late", {"mode": "concat"})
        cfg["modalities"]["image"] = {"model": str(d)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[name] = mlmf.MultiModalModel.load(cfg).infer(text=TEXTS, image=IMAGES)
    close("python encoder", outs["gpu"].embeddings["image"], outs["cpu"].embeddings["image"], ATOL)
    close("fused", outs["gpu"].fused, outs["cpu"].fused, ATOL)


def test_training_is_refused_on_cuda() -> None:
    if DRY_RUN:
        pytest.skip("training runs on the CPU")
    config = {
        "device": "cuda",
        "modalities": {"text": {"dim": 12}, "image": {"dim": 10}},
        "fusion": {"strategy": "late", "out_dim": 16},
    }
    rng = np.random.default_rng(0)
    data = {
        "text": rng.standard_normal((8, 12)).astype(np.float32),
        "image": rng.standard_normal((8, 10)).astype(np.float32),
        "label": np.arange(8) % 2,
    }
    with pytest.raises(mlmf.ConfigError, match="training runs on the CPU only"):
        objectives = [mlmf.Classify(num_classes=2)]
        mlmf.Trainer(config, objectives=objectives, epochs=1, progress=False).fit(data)
