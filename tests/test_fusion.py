"""mlmf.Fusion against the PyTorch reference implementations recorded in
tests/fixtures/fusion (every strategy, missing modalities included), plus the
behaviour around it: seeded initialisation, save/load, options, custom callables and
bad input."""

from __future__ import annotations

import json
import warnings
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import mlmf

FIX = Path(__file__).parent / "fixtures" / "fusion"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
CASES = {c["id"]: c for c in MANIFEST["cases"]}
ATOL = MANIFEST["tolerance"]
STRATEGIES = ("early", "middle", "late", "attention", "gated")


@cache
def npz() -> dict[str, np.ndarray]:
    with zipfile.ZipFile(FIX / "expected.npz") as zf:
        out = {}
        for n in zf.namelist():
            with zf.open(n) as f:
                out[n[: -len(".npy")]] = np.lib.format.read_array(f)
        return out


def build(case: dict, **kw: object) -> mlmf.Fusion:
    return mlmf.Fusion(
        case["strategy"],
        {name: width for name, width in case["dims"]},
        case["out_dim"],
        weights=FIX / case["id"] / "weights.safetensors",
        required=case.get("required") or None,
        **case["options"],
        **kw,
    )


def inputs(case: dict) -> dict[str, object]:
    arrays = npz()
    out: dict[str, object] = {}
    for name, spec in case["inputs"].items():
        x = arrays[f"{case['id']}/input/{name}"]
        out[name] = (x, arrays[f"{case['id']}/mask/{name}"]) if spec["mask"] else x
    return out


def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    assert err <= ATOL, f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("cid", list(CASES))
def test_parity_with_pytorch(cid: str) -> None:
    case = CASES[cid]
    fus = build(case)
    assert not fus.untrained
    out = fus(inputs(case), return_attention=case["return_attention"])
    arrays = npz()
    close(out.fused, arrays[f"{cid}/fused"], f"{cid} fused")
    gates_key = f"{cid}/gates"
    if gates_key in arrays:
        assert out.gates is not None, cid
        close(out.gates, arrays[gates_key], f"{cid} gates")
    prefix = f"{cid}/attention/"
    want_att = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    if case["return_attention"]:
        assert sorted(out.attention) == sorted(want_att), cid
        for k, v in want_att.items():
            close(out.attention[k], v, f"{cid} attention {k}")
    else:
        assert out.attention == {}
    if case["return_attention"]:
        # Without attention weights `early` and `middle` take the packed CPU path
        # (padded tokens dropped); the fused result is the reference's all the same.
        plain = fus(inputs(case), return_attention=False)
        close(plain.fused, arrays[f"{cid}/fused"], f"{cid} fused without attention")
    if case["strategy"] == "gated":
        # `adaptive` is the same strategy under another name.
        alias = mlmf.Fusion(
            "adaptive",
            dict(case["dims"]),
            case["out_dim"],
            weights=FIX / cid / "weights.safetensors",
        )
        np.testing.assert_array_equal(alias(inputs(case)).fused, out.fused)


def test_fixtures_cover_every_strategy_with_a_missing_modality() -> None:
    for s in STRATEGIES:
        cases = [
            c for c in CASES.values() if c["strategy"] in (s, "adaptive" if s == "gated" else s)
        ]
        assert cases, s
        assert any(len(c["inputs"]) < len(c["dims"]) for c in cases), s
    modes = {c["options"].get("mode", "concat") for c in CASES.values() if c["strategy"] == "late"}
    assert modes == {"concat", "mean", "weighted", "logits"}
    gates = {c["options"].get("gate", "none") for c in CASES.values() if c["strategy"] == "middle"}
    assert gates == {"none", "tanh", "sigmoid"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """float32 tensors of a safetensors file (numpy only)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + lo : 8 + n + hi], "<f4").reshape(info["shape"])
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, object] = {}
    blobs, off = [], 0
    for name, t in tensors.items():
        data = np.ascontiguousarray(t, "<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [off, off + len(data)],
        }
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def restrict(
    w: dict[str, np.ndarray], dims: dict[str, int], keep: list[str]
) -> dict[str, np.ndarray]:
    """The weights of a fusion over `keep` only, cut out of one over `dims`: per-modality
    tensors of the others dropped, per-modality rows and column blocks selected."""
    names = list(dims)
    rows = [names.index(m) for m in keep]
    starts = np.cumsum([0, *dims.values()])
    cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in rows])
    dropped = [m for m in names if m not in keep]
    out = {}
    for k, t in w.items():
        parts = k.split(".")
        if any(m in parts[:3] for m in dropped):
            continue
        if k in ("type_embedding", "modality_logits", "gate.bias", "score.bias", "score.fc2.bias"):
            t = t[rows]
        elif k in ("gate.weight", "score.weight"):
            t = t[rows][:, cols]
        elif k == "score.fc2.weight":
            t = t[rows]
        elif k in ("score.fc1.weight", "proj.weight"):
            t = t[:, cols]
        out[k] = t
    return out


SUBSET_STRATEGIES = [
    ("late", {"mode": "concat"}),
    ("late", {"mode": "mean"}),
    ("late", {"mode": "weighted"}),
    ("late", {"mode": "logits"}),
    ("attention", {}),
    ("attention", {"attention_dim": 5}),
    ("gated", {}),
    ("early", {"num_heads": 2, "num_layers": 2}),
    ("middle", {"num_heads": 2, "num_layers": 2, "gate": "sigmoid"}),
]


@pytest.mark.parametrize(("strategy", "opts"), SUBSET_STRATEGIES)
def test_missing_modality_equals_fusing_the_present_ones(
    strategy: str, opts: dict[str, object], tmp_path: Path
) -> None:
    """Leaving a modality out of the call gives what a fusion built over the present
    modalities alone, with the same weights, gives."""
    rng = np.random.default_rng(5)
    dims = {"text": 6, "image": 5, "audio": 4}
    x: dict[str, object] = {
        "text": (rng.standard_normal((3, 4, 6)).astype(np.float32), np.array([[1, 1, 0, 0]] * 3)),
        "image": rng.standard_normal((3, 2, 5)).astype(np.float32),
        "audio": rng.standard_normal((3, 4)).astype(np.float32),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = mlmf.Fusion(strategy, dims, 8, seed=3, **opts)
    full.save(tmp_path / "full.safetensors")
    w = read_safetensors(tmp_path / "full.safetensors")
    for keep in (["text", "audio"], ["image"], ["text", "image"]):
        sub_dims = {m: dims[m] for m in keep}
        write_safetensors(tmp_path / "sub.safetensors", restrict(w, dims, keep))
        sub = mlmf.Fusion(strategy, sub_dims, 8, weights=tmp_path / "sub.safetensors", **opts)
        given = {m: x[m] for m in keep}
        got, want = full(given), sub(given)
        np.testing.assert_allclose(got.fused, want.fused, atol=1e-6, err_msg=f"{keep}")
        if want.gates is not None:
            idx = [list(dims).index(m) for m in keep]
            np.testing.assert_allclose(got.gates[:, idx], want.gates, atol=1e-6)
            others = [i for i in range(3) if i not in idx]
            assert np.all(got.gates[:, others] == 0)


def test_required_and_empty_calls_raise_missing_modality() -> None:
    case = next(c for c in CASES.values() if c.get("required"))
    fus = build(case)
    req = case["required"][0]
    partial = {k: v for k, v in inputs(case).items() if k != req}
    with pytest.raises(mlmf.MissingModalityError, match=f"missing modality `{req}`"):
        fus(partial)
    with pytest.raises(mlmf.MissingModalityError, match="no modality was given"):
        fus({})


def test_seeded_initialisation_warns_flags_and_round_trips(tmp_path: Path) -> None:
    dims = {"text": 8, "image": 6}
    x = {"text": np.ones((2, 3, 8), np.float32), "image": np.full((2, 6), 0.5, np.float32)}
    for strategy, opts in [
        ("early", {"num_heads": 2, "num_layers": 2}),
        ("middle", {"num_heads": 2, "gate": "sigmoid"}),
        ("late", {"mode": "logits"}),
        ("attention", {"attention_dim": 4}),
        ("adaptive", {}),
    ]:
        with pytest.warns(UserWarning, match="untrained"):
            a = mlmf.Fusion(strategy, dims, 8, seed=7, **opts)
        assert a.untrained
        with pytest.warns(UserWarning):
            b = mlmf.Fusion(strategy, dims, 8, seed=7, **opts)
        np.testing.assert_array_equal(a(x).fused, b(x).fused)
        path = tmp_path / f"{strategy}.safetensors"
        a.save(path)
        c = mlmf.Fusion(strategy, dims, 8, weights=path, **opts)
        assert not c.untrained
        assert c.tensor_names() == a.tensor_names()
        np.testing.assert_array_equal(a(x).fused, c(x).fused)


def test_tensor_names_are_the_documented_ones() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fus = mlmf.Fusion("middle", {"text": 8, "image": 6}, 8, num_heads=2, gate="tanh")
    shapes = fus.tensor_shapes()
    assert shapes["proj.image.weight"] == (8, 6)
    assert shapes["layers.0.text.attn.q_proj.weight"] == (8, 8)
    assert shapes["layers.0.image.attn_gate"] == (1,)
    assert shapes["layers.0.text.mlp.fc1.weight"] == (32, 8)
    assert shapes["norm.bias"] == (8,)
    doc = (Path(__file__).parents[1] / "docs" / "fusion.md").read_text()
    for name in ("norm_q", "norm_kv", "norm_mlp", "attn_gate", "mlp_gate", "type_embedding"):
        assert f"`{name}" in doc or f"{name}" in doc


def test_an_untrained_tanh_gated_middle_fusion_starts_as_the_identity() -> None:
    dims = {"text": 8, "image": 8}
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((2, 4, 8)).astype(np.float32) for k in dims}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = mlmf.Fusion("middle", dims, 8, num_heads=2, gate="tanh", num_layers=1)
        three = mlmf.Fusion("middle", dims, 8, num_heads=2, gate="tanh", num_layers=3)
    # Different depths, same projections and final norm (the seeded draws of `proj.*`
    # come first): with every gate at 0 the layers change nothing.
    np.testing.assert_allclose(one(x).fused, three(x).fused, atol=1e-6)


def test_custom_callable_and_registered_name() -> None:
    seen: list[list[str]] = []

    def fuse(inputs: dict[str, np.ndarray]) -> np.ndarray:
        seen.append(sorted(inputs))
        return inputs["text"] + inputs["image"].mean(axis=1)

    fus = mlmf.Fusion("custom", {"text": 4, "image": 4}, 4, fn=fuse)
    t = np.ones((2, 4), np.float32)
    i = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = fus({"text": t, "image": (i, np.ones((2, 3), np.int64))})
    np.testing.assert_allclose(out.fused, t + i.mean(axis=1))
    assert seen == [["image", "image_mask", "text"]]

    mlmf.register_fusion("double-text", lambda d: 2 * d["text"])
    named = mlmf.Fusion("custom", {"text": 4}, 4, name="double-text")
    np.testing.assert_allclose(named({"text": t}).fused, 2 * t)

    bad = mlmf.Fusion("custom", {"text": 4}, 3, fn=lambda d: d["text"])
    with pytest.raises(mlmf.InputError, match=r"returned shape \[2, 4\], expected \[2, 3\]"):
        bad({"text": t})

    def boom(d: dict[str, np.ndarray]) -> np.ndarray:
        raise RuntimeError("kaput")

    with pytest.raises(mlmf.InputError, match="kaput"):
        mlmf.Fusion("custom", {"text": 4}, 4, fn=boom)({"text": t})
    with pytest.raises(mlmf.ConfigError, match="no fusion component is registered as `nope`"):
        mlmf.Fusion("custom", {"text": 4}, 4, name="nope")


def test_bad_options_and_inputs_are_typed_errors(tmp_path: Path) -> None:
    dims = {"text": 8, "image": 6}
    with pytest.raises(mlmf.ConfigError, match="num_layer"):
        mlmf.Fusion("early", dims, 8, num_layer=2)
    with pytest.raises(mlmf.ConfigError, match="unknown variant `sideways`"):
        mlmf.Fusion("sideways", dims, 8)
    with pytest.raises(mlmf.ConfigError, match="gate"):
        mlmf.Fusion("early", dims, 8, gate="tanh")
    with pytest.raises(mlmf.ConfigError, match="num_heads"):
        mlmf.Fusion("early", dims, 8, num_heads=3)
    with pytest.raises(mlmf.ConfigError, match="required"):
        mlmf.Fusion("gated", dims, 8, required=["audio"])
    with pytest.raises(mlmf.ConfigError, match="dims"):
        mlmf.Fusion("gated", [8, 6], 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fus = mlmf.Fusion("gated", dims, 8)
        mlmf.Fusion("attention", dims, 8).save(tmp_path / "a.safetensors")
        mlmf.Fusion("gated", dims, 4).save(tmp_path / "g4.safetensors")
    with pytest.raises(mlmf.ModelLoadError, match="tensor `gate.weight` is missing"):
        mlmf.Fusion("gated", dims, 8, weights=tmp_path / "a.safetensors")
    with pytest.raises(mlmf.ModelLoadError, match=r"has shape \[4, 8\], expected \[8, 8\]"):
        mlmf.Fusion("gated", dims, 8, weights=tmp_path / "g4.safetensors")
    t = np.zeros((2, 8), np.float32)
    nan = np.zeros((2, 3, 6), np.float32)
    nan[1, 2, 0] = np.nan
    cases = [
        ({"text": np.zeros((2, 7), np.float32)}, mlmf.InputError, "text input: expected width 8"),
        ({"text": t, "image": np.zeros((3, 6), np.float32)}, mlmf.InputError, "batch of 3 rows"),
        (
            {"text": t, "image": nan},
            mlmf.InputError,
            "image input 1: non-finite value NaN at token 2",
        ),
        (
            {"text": t, "image": (np.zeros((2, 3, 6), np.float32), np.ones((2, 4)))},
            mlmf.InputError,
            r"expected a mask of shape \[2, 3\]",
        ),
        (
            {"text": np.zeros((2, 0, 8), np.float32)},
            mlmf.InputError,
            "at least one row and one token",
        ),
        ({"text": np.zeros(8, np.float32)}, mlmf.InputError, "expected a NumPy array"),
        ({"text": "hello"}, mlmf.InputError, "expected a NumPy array"),
        ({"video": t}, mlmf.InputError, "not one of this fusion's modalities"),
        ({"text": np.zeros((2, 8), np.complex64)}, mlmf.InputError, "numeric"),
    ]
    for value, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fus(value)
