"""mlmf.CrossModalAttention against PyTorch references recorded in
tests/fixtures/attention (torch.nn.MultiheadAttention where it applies, a written-out
implementation of the same formula for every case)."""

from __future__ import annotations

import json
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlmf

FIX = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIX / "attention" / "manifest.json").read_text())
# Single-layer cases, plus each direction of the bidirectional case as one of its own.
CASES = {c["id"]: c for c in MANIFEST["cases"] if "directions" not in c}
BIDIRECTIONAL = [c for c in MANIFEST["cases"] if "directions" in c]
for _case in BIDIRECTIONAL:
    for _name, _direction in _case["directions"].items():
        CASES[f"{_case['id']}/{_name}"] = _direction
ATOL = 1e-5
# Constructor switches of the attention variants, as the manifest names them.
VARIANT_KEYS = (
    "qk_norm",
    "qk_norm_eps",
    "softcap",
    "sliding_window",
    "top_k",
    "sparsity_ratio",
    "rope_base",
    "rope_scale",
    "adaptive",
    "adaptive_target_std",
    "adaptive_min_temperature",
    "adaptive_max_temperature",
    "adaptive_max_sparsity",
)


@cache
def npz() -> dict[str, np.ndarray]:
    with zipfile.ZipFile(FIX / "attention" / "expected.npz") as zf:
        out = {}
        for n in zf.namelist():
            with zf.open(n) as f:
                out[n[: -len(".npy")]] = np.lib.format.read_array(f)
        return out


def stored(entry: dict | None) -> np.ndarray | None:
    return None if entry is None else npz()[entry["key"]]


def layer(case: dict) -> mlmf.CrossModalAttention:
    c = case["config"]
    variants = {k: c[k] for k in VARIANT_KEYS if k in c}
    return mlmf.CrossModalAttention(
        c["dim"],
        c["num_heads"],
        c["kv_dim"],
        head_dim=c["head_dim"],
        num_kv_heads=c["num_kv_heads"],
        temperature=c["temperature"],
        weights=FIX / case["weights"],
        **variants,
    )


@pytest.mark.parametrize("cid", list(CASES))
def test_parity_with_pytorch(cid: str) -> None:
    case = CASES[cid]
    ins, outs = case["inputs"], case["outputs"]
    att = layer(case)
    assert not att.untrained
    args = (stored(ins["query"]), stored(ins["key_value"]))
    masks = {"query_mask": stored(ins["query_mask"]), "kv_mask": stored(ins["kv_mask"])}
    out, per_head = att(*args, **masks, return_weights=True)
    _, mean = att(*args, **masks, return_weights=True, average_weights=True)
    only = att(*args, **masks)
    for name, got, want in (
        ("out", out, stored(outs["out"])),
        ("weights_per_head", per_head, stored(outs["weights_per_head"])),
        ("weights_mean", mean, stored(outs["weights_mean"])),
        ("out without weights", only, stored(outs["out"])),
    ):
        assert got.shape == want.shape, f"{cid} {name}: {got.shape} != {want.shape}"
        err = float(np.abs(got - want).max())
        assert err <= ATOL, f"{cid} {name}: max abs diff {err:.3g}"


def test_every_variant_has_a_case() -> None:
    cfgs = [c["config"] for c in CASES.values()]
    for key in VARIANT_KEYS:
        if key == "qk_norm_eps" or key.startswith("adaptive_"):  # parameters, not switches
            continue
        default = {"qk_norm": False, "rope_scale": 1.0, "adaptive": False}.get(key)
        assert any(c.get(key, default) != default for c in cfgs), key
    assert BIDIRECTIONAL, "no bidirectional case"
    assert any(c["num_kv_heads"] == 1 for c in cfgs)  # multi-query
    assert any(c["num_kv_heads"] not in (None, 1) for c in cfgs)  # grouped-query
    assert any(c["head_dim"] is not None for c in cfgs)
    assert any(c["temperature"] != 1.0 for c in cfgs)
    assert any("torch.nn.MultiheadAttention" in c["references"] for c in CASES.values())


def test_untrained_layer_warns_and_is_deterministic(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="untrained"):
        a = mlmf.CrossModalAttention(16, 4, 12, seed=3)
    with pytest.warns(UserWarning):
        b = mlmf.CrossModalAttention(16, 4, 12, seed=3)
    assert a.untrained and (a.num_heads, a.head_dim, a.kv_dim) == (4, 4, 12)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 16)).astype(np.float32)
    kv = rng.standard_normal((2, 5, 12)).astype(np.float32)
    np.testing.assert_array_equal(a(q, kv), b(q, kv))
    a.save(tmp_path / "w.safetensors")
    c = mlmf.CrossModalAttention(16, 4, 12, weights=tmp_path / "w.safetensors")
    assert not c.untrained
    np.testing.assert_array_equal(a(q, kv), c(q, kv))


@pytest.fixture
def att() -> mlmf.CrossModalAttention:
    return layer(CASES["plain"])


def inputs(b: int = 2, tq: int = 5, tk: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (
        rng.standard_normal((b, tq, 24)).astype(np.float32),
        rng.standard_normal((b, tk, 20)).astype(np.float32),
    )


def test_width_mismatch_names_the_side(att: mlmf.CrossModalAttention) -> None:
    q, kv = inputs()
    with pytest.raises(mlmf.InputError, match="text input: query: expected width 24, got 23"):
        att(q[..., :23], kv)
    with pytest.raises(mlmf.InputError, match="image input: key_value: expected width 20"):
        att(q, kv[..., :19])


def test_mask_of_the_wrong_shape(att: mlmf.CrossModalAttention) -> None:
    q, kv = inputs()
    with pytest.raises(mlmf.InputError, match=r"kv_mask: expected a mask of shape \[2, 7\]"):
        att(q, kv, kv_mask=np.ones((2, 6), dtype=np.int64))
    with pytest.raises(mlmf.InputError, match="query_mask: mask values must be 0 or 1"):
        att(q, kv, query_mask=np.full((2, 5), 2))


def test_zero_length_and_nan(att: mlmf.CrossModalAttention) -> None:
    q, kv = inputs()
    with pytest.raises(mlmf.InputError, match="at least one row and one token"):
        att(q[:, :0], kv)
    kv[1, 3, 4] = np.nan
    with pytest.raises(mlmf.InputError, match="image input 1: key_value: non-finite value NaN"):
        att(q, kv)


def test_wrong_rank_and_dtype(att: mlmf.CrossModalAttention) -> None:
    q, kv = inputs()
    with pytest.raises(mlmf.InputError, match="query: expected 3 dimensions"):
        att(q[0], kv)
    with pytest.raises(mlmf.InputError, match="key_value: expected a NumPy array"):
        att(q, kv.tolist())


def test_bad_configuration() -> None:
    with pytest.raises(mlmf.ConfigError, match="num_kv_heads"):
        mlmf.CrossModalAttention(24, 4, 20, num_kv_heads=3, seed=0)
    with pytest.raises(mlmf.ConfigError, match="head_dim"):
        mlmf.CrossModalAttention(25, 4, 20, seed=0)


def test_weights_of_the_wrong_shape_name_the_tensor() -> None:
    case = CASES["plain"]
    with pytest.raises(mlmf.ModelLoadError, match="k_proj.weight.*shape"):
        mlmf.CrossModalAttention(24, 4, 21, weights=FIX / case["weights"])


@pytest.mark.parametrize("case", BIDIRECTIONAL, ids=lambda c: c["id"])
def test_bidirectional_layer(case: dict) -> None:
    t2i, i2t = case["directions"]["text_to_image"], case["directions"]["image_to_text"]
    assert t2i["config"]["num_heads"] == i2t["config"]["num_heads"]
    att = mlmf.BidirectionalCrossAttention(
        t2i["config"]["dim"],
        i2t["config"]["dim"],
        t2i["config"]["num_heads"],
        weights=(FIX / t2i["weights"], FIX / i2t["weights"]),
    )
    assert not att.untrained
    ins = case["inputs"]
    (text_out, text_w), (image_out, image_w) = att(
        stored(ins["text"]),
        stored(ins["image"]),
        a_mask=stored(ins["text_mask"]),
        b_mask=stored(ins["image_mask"]),
        return_weights=True,
    )
    for got, want in (
        (text_out, t2i["outputs"]["out"]),
        (text_w, t2i["outputs"]["weights_per_head"]),
        (image_out, i2t["outputs"]["out"]),
        (image_w, i2t["outputs"]["weights_per_head"]),
    ):
        assert float(np.abs(got - stored(want)).max()) <= ATOL


def test_head_entropy_bounds() -> None:
    tk = 8
    uniform = np.full((2, 3, tk), 1 / tk)
    one_hot = np.zeros((2, 3, tk))
    one_hot[..., 5] = 1.0
    np.testing.assert_allclose(mlmf.head_entropy(uniform), np.log(tk))
    np.testing.assert_allclose(mlmf.head_entropy(uniform, base=2), 3.0)
    assert np.all(mlmf.head_entropy(one_hot) == 0)
    # A masked (all-zero) row: 0, not NaN.
    assert mlmf.head_entropy(np.zeros((1, tk)))[0] == 0
    with pytest.raises(ValueError, match="Tq, Tk"):
        mlmf.head_entropy(np.ones(3))


def test_top_attended_orders_keys_by_weight() -> None:
    w = np.array([[0.1, 0.6, 0.05, 0.25], [0.4, 0.0, 0.35, 0.25]])
    idx, val = mlmf.top_attended(w, k=2)
    np.testing.assert_array_equal(idx, [[1, 3], [0, 2]])
    np.testing.assert_allclose(val, [[0.6, 0.25], [0.4, 0.35]])
    assert mlmf.top_attended(w, k=10)[0].shape == (2, 4)
    with pytest.raises(ValueError, match="at least 1"):
        mlmf.top_attended(w, k=0)


def test_attention_heatmap_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import mlmf.viz

    case = CASES["kv_mask"]
    att = layer(case)
    _, w = att(
        stored(case["inputs"]["query"]),
        stored(case["inputs"]["key_value"]),
        kv_mask=stored(case["inputs"]["kv_mask"]),
        return_weights=True,
        average_weights=True,
    )
    path = mlmf.viz.attention_heatmap(
        w[1],
        tmp_path / "att.png",
        query_labels=[f"tok{i}" for i in range(w.shape[1])],
        key_labels=[f"patch{j}" for j in range(w.shape[2])],
        title="text x image (head mean)",
        size=(640, 480),
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (640, 480)
    with pytest.raises(ValueError, match="labels for"):
        mlmf.viz.attention_heatmap(w[1], tmp_path / "x.png", key_labels=["a"])
