"""mlmf.torch (the optional PyTorch versions of mlmf's layers) against mlmf itself.

The first part needs no torch: the fusion modules that tests/fixtures/train/interop
holds (trained a few steps with torch and saved with ``mlmf.torch.save_mlmf``) load into
``mlmf.Fusion`` and give the outputs torch gave.  The second part, with torch installed,
converts layers both ways (``from_mlmf`` / ``to_mlmf``) and compares the outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlmf

FIX = Path(__file__).parent / "fixtures" / "train"
ATOL = 1e-5
DTYPES = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}


def manifest() -> dict:
    return json.loads((FIX / "manifest.json").read_text())


def interop_cases() -> list[dict]:
    return [c for c in manifest()["cases"] if c["kind"] == "interop"]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (numpy only)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        data = np.frombuffer(raw[8 + n + lo : 8 + n + hi], DTYPES[info["dtype"]])
        out[name] = data.reshape(info["shape"])
    return out


def close(got: np.ndarray, want: np.ndarray, what: str, atol: float = ATOL) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
    assert err <= atol, f"{what}: max abs diff {err:.3g}"


# ---------------------------------------------------------------------------
# Without torch: the interop fixtures
# ---------------------------------------------------------------------------


def test_interop_fixtures_cover_every_strategy() -> None:
    strategies = {c["strategy"] for c in interop_cases()}
    assert strategies == {"late", "attention", "gated", "early", "middle"}


@pytest.mark.parametrize("case", interop_cases(), ids=lambda c: c["id"])
def test_torch_trained_weights_load_into_mlmf(case: dict) -> None:
    options = {k: v for k, v in case["options"].items() if v is not None}
    fus = mlmf.Fusion(
        case["strategy"],
        {name: width for name, width in case["dims"]},
        case["out_dim"],
        weights=FIX / case["file"],
        **options,
    )
    assert not fus.untrained
    io = read_safetensors(FIX / case["io_file"])
    inputs: dict[str, Any] = {}
    for name, spec in case["inputs"].items():
        x = io[f"input.{name}"]
        inputs[name] = (x, io[f"mask.{name}"]) if spec["mask"] else x
    out = fus(inputs)
    close(out.fused, io["fused"], f"{case['id']} fused")
    if "gates" in io:
        assert out.gates is not None
        close(out.gates, io["gates"], f"{case['id']} gates")
    else:
        assert out.gates is None


def test_import_without_torch_names_the_extra() -> None:
    code = "import sys; sys.modules['torch'] = None; import mlmf.torch"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "pip install 'mlmf[torch]'" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# With torch: conversions both ways
# ---------------------------------------------------------------------------

DIMS = {"text": 12, "image": 10, "audio": 8}
OUT = 16
FUSIONS: list[tuple[str, dict[str, Any]]] = [
    ("late", {}),
    ("late", {"mode": "mean"}),
    ("late", {"mode": "weighted"}),
    ("late", {"mode": "logits"}),
    ("attention", {}),
    ("attention", {"attention_dim": 6}),
    ("gated", {}),
    ("adaptive", {}),
    ("early", {"num_layers": 2, "num_heads": 4}),
    ("early", {"num_heads": 2, "mlp": "swiglu", "mlp_ratio": 2.5, "norm": "rms"}),
    ("middle", {"num_heads": 4, "mlp_ratio": 2.0}),
    ("middle", {"num_layers": 2, "num_heads": 2, "gate": "tanh"}),
    ("middle", {"num_heads": 4, "gate": "sigmoid", "mlp": "swiglu", "norm": "rms"}),
]


def fusion_id(item: tuple[str, dict]) -> str:
    strategy, opts = item
    return "-".join([strategy, *(f"{k}={v}" for k, v in opts.items())])


def random_inputs(seed: int, names: list[str]) -> dict[str, Any]:
    """text tokens with a mask (a row with one real token), image pooled, audio tokens."""
    rng = np.random.default_rng(seed)
    b = 3
    out: dict[str, Any] = {}
    if "text" in names:
        mask = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], np.float32)
        out["text"] = (rng.standard_normal((b, 5, DIMS["text"]), dtype=np.float32), mask)
    if "image" in names:
        out["image"] = rng.standard_normal((b, DIMS["image"]), dtype=np.float32)
    if "audio" in names:
        out["audio"] = rng.standard_normal((b, 4, DIMS["audio"]), dtype=np.float32)
    return out


def to_torch(inputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(torch.from_numpy(x) for x in v)
        return torch.from_numpy(v)

    return {k: conv(v) for k, v in inputs.items()}


def compare(ours: Any, torch_module: Any, names: list[str], seed: int, what: str) -> None:
    """mlmf and the torch module on the same inputs: fused, gates, attention weights."""
    import torch

    inputs = random_inputs(seed, names)
    want_attention = torch_module.strategy in ("early", "middle")
    got = ours(inputs, return_attention=want_attention)
    with torch.no_grad():
        ref = torch_module(to_torch(inputs), return_attention=want_attention)
    close(got.fused, ref.fused.numpy(), f"{what} fused {names}")
    assert (got.gates is None) == (ref.gates is None), what
    if ref.gates is not None:
        close(got.gates, ref.gates.numpy(), f"{what} gates {names}")
    assert sorted(got.attention) == sorted(ref.attention), what
    for k, v in ref.attention.items():
        close(got.attention[k], v.numpy(), f"{what} attention {k}")


def perturb(module: Any, seed: int) -> None:
    """Move every parameter away from its initial value (tanh gates and modality logits
    start at 0, where they hide what they gate)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def mt() -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import mlmf.torch

    return mlmf.torch


def seeded_fusion(strategy: str, opts: dict, seed: int) -> mlmf.Fusion:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained
        return mlmf.Fusion(strategy, DIMS, OUT, seed=seed, **opts)


@pytest.mark.parametrize("item", FUSIONS, ids=fusion_id)
def test_fusion_from_mlmf(mt: Any, item: tuple[str, dict]) -> None:
    strategy, opts = item
    fus = seeded_fusion(strategy, opts, seed=7)
    module = mt.from_mlmf(fus)
    assert module.strategy == ("gated" if strategy == "adaptive" else strategy)
    assert sorted(module.state_dict()) == sorted(fus.tensor_names())
    for names in (list(DIMS), ["text", "audio"], ["image"]):
        compare(fus, module, names, seed=11, what=fusion_id(item))


@pytest.mark.parametrize("item", FUSIONS, ids=fusion_id)
def test_fusion_to_mlmf(mt: Any, item: tuple[str, dict], tmp_path: Path) -> None:
    import torch

    strategy, opts = item
    torch.manual_seed(3)
    module = mt.Fusion(strategy, DIMS, OUT, **opts)
    perturb(module, seed=5)
    ours = mt.to_mlmf(module)  # through a temporary file
    assert not ours.untrained
    for names in (list(DIMS), ["image", "audio"], ["text"]):
        compare(ours, module, names, seed=13, what=fusion_id(item))
    path = tmp_path / "fusion.safetensors"
    again = mt.to_mlmf(module, path)
    assert path.exists()
    compare(again, module, list(DIMS), seed=17, what=fusion_id(item))
    # And back: the file loads into a fresh torch module with the same outputs.
    fresh = mt.load_mlmf(mt.Fusion(strategy, DIMS, OUT, **opts), path)
    compare(again, fresh, list(DIMS), seed=19, what=fusion_id(item))


def test_late_similarity_both_ways(mt: Any) -> None:
    """The weightless `similarity` mode: the mean of unit vectors, the same in both."""
    import torch

    dims = {"text": OUT, "image": OUT, "audio": OUT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fus = mlmf.Fusion("late", dims, OUT, mode="similarity")
    module = mt.from_mlmf(fus)
    assert module.mode == "similarity" and not list(module.parameters())
    assert mt.to_mlmf(mt.Fusion("late", dims, OUT, mode="similarity")).strategy == "late"
    rng = np.random.default_rng(23)
    for names in (list(dims), ["text", "audio"], ["image"]):
        inputs = {m: rng.standard_normal((3, OUT), dtype=np.float32) for m in names}
        got = fus(inputs).fused
        with torch.no_grad():
            ref = module(to_torch(inputs)).fused.numpy()
        close(got, ref, f"late similarity {names}")
        units = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in inputs.values()]
        close(got, np.mean(units, axis=0), f"late similarity {names} by hand")
    with pytest.raises(ValueError, match="must equal out_dim"):
        mt.Fusion("late", DIMS, OUT, mode="similarity")


def test_load_mlmf_is_strict(mt: Any, tmp_path: Path) -> None:
    path = tmp_path / "gated.safetensors"
    mt.save_mlmf(mt.Fusion("gated", DIMS, OUT), path)
    with pytest.raises(RuntimeError):
        mt.load_mlmf(mt.Fusion("gated", {"text": 12, "image": 10}, OUT), path)
    with pytest.raises(RuntimeError):
        mt.load_mlmf(mt.Fusion("attention", DIMS, OUT), path)


ATTENTIONS: list[dict[str, Any]] = [
    {},
    {"num_kv_heads": 2, "qk_norm": True},
    {"temperature": 0.5, "head_dim": 6},
    {"rope_base": 10000.0, "softcap": 2.0},
    {"sliding_window": 2, "top_k": 2},
    {"sparsity_ratio": 0.5, "rope_base": 500.0, "rope_scale": 2.0},
]
# What mlmf.CrossModalAttention's getters carry over when it has no `config`.
FROM_GETTERS = {"num_kv_heads", "qk_norm", "temperature", "head_dim"}


def attention_id(opts: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "plain"


def attention_inputs(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 5, 16), dtype=np.float32)
    kv = rng.standard_normal((2, 7, 12), dtype=np.float32)
    qm = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], np.float32)
    km = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0]], np.float32)
    return q, kv, qm, km


def compare_attention(ours: Any, module: Any, seed: int, what: str) -> None:
    import torch

    q, kv, qm, km = attention_inputs(seed)
    out, weights = ours(q, kv, query_mask=qm, kv_mask=km, return_weights=True)
    with torch.no_grad():
        ref, ref_w = module(*(torch.from_numpy(a) for a in (q, kv, qm, km)), return_weights=True)
    close(out, ref.numpy(), f"{what} output")
    close(weights, ref_w.numpy(), f"{what} weights")


@pytest.mark.parametrize("opts", ATTENTIONS, ids=attention_id)
def test_attention_from_mlmf(mt: Any, opts: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained
        att = mlmf.CrossModalAttention(16, 4, 12, seed=9, **opts)
    if getattr(att, "config", None) is None and set(opts) - FROM_GETTERS:
        pytest.skip("this mlmf.CrossModalAttention has no `config`: variants do not carry over")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the getters fallback warns
        module = mt.from_mlmf(att)
    compare_attention(att, module, seed=21, what=attention_id(opts))


@pytest.mark.parametrize("opts", ATTENTIONS, ids=attention_id)
def test_attention_to_mlmf(mt: Any, opts: dict) -> None:
    import torch

    torch.manual_seed(4)
    module = mt.CrossModalAttention(16, 4, 12, **opts)
    perturb(module, seed=6)
    ours = mt.to_mlmf(module)
    assert not ours.untrained
    compare_attention(ours, module, seed=23, what=attention_id(opts))


def test_attention_adaptive_is_not_implemented(mt: Any) -> None:
    with pytest.raises(NotImplementedError, match="adaptive"):
        mt.CrossModalAttention(16, 4, 12, adaptive=True)


def test_attention_selection_gets_no_gradient(mt: Any) -> None:
    """top_k picks keys from detached logits: gradients reach only the kept keys."""
    import torch

    torch.manual_seed(0)
    module = mt.CrossModalAttention(16, 4, 12, top_k=1)
    q, kv, _, _ = attention_inputs(25)
    kv_t = torch.from_numpy(kv).requires_grad_()
    out, w = module(torch.from_numpy(q), kv_t, return_weights=True)
    out.sum().backward()
    # Values reach the output through the kept keys only, and every weight is 0 or 1.
    assert set(torch.unique(w).tolist()) <= {0.0, 1.0}
    kept = (w > 0).any(dim=1).any(dim=1)  # [B, Tk]: kept by some head and query
    assert torch.isfinite(kv_t.grad).all()
    assert (kv_t.grad[~kept] == 0).all()


class WithConfig:
    """An mlmf.CrossModalAttention seen through a ``config`` dict (what from_mlmf reads
    first), whether or not this build of mlmf has one."""

    def __init__(self, att: Any, config: dict[str, Any]) -> None:
        self.att, self.config = att, {"dim": 16, "num_heads": 4, "kv_dim": 12, **config}
        self.num_heads = att.num_heads

    def save(self, path: Path) -> None:
        self.att.save(path)


@pytest.mark.parametrize("opts", ATTENTIONS, ids=attention_id)
def test_attention_from_mlmf_config(mt: Any, opts: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained
        att = mlmf.CrossModalAttention(16, 4, 12, seed=10, **opts)
    module = mt.from_mlmf(WithConfig(att, {**opts, "dropout": 0.0, "adaptive": False}))
    compare_attention(att, module, seed=27, what=attention_id(opts))
    with pytest.raises(NotImplementedError):
        mt.from_mlmf(WithConfig(att, {**opts, "adaptive": True}))
