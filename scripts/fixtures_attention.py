"""Cross-modal attention fixtures (area ``attention``): seeded layers and their reference outputs.

Run through ``scripts/make_fixtures.py --only attention``, which calls
:func:`make_attention` and provides the shared helpers (``Arrays``,
``write_json``, ...).  Layout and manifest schema: tests/fixtures/README.md.

The layer is mlmf's ``CrossModalAttention(dim, num_heads, kv_dim, head_dim=None
-> dim // num_heads, num_kv_heads=None -> num_heads, temperature=1.0, bias=True)``
(float32, batch first), with the weights ``q_proj.{weight,bias}``
``[H*hd, dim]``, ``k_proj.*`` / ``v_proj.*`` ``[Hkv*hd, kv_dim]`` and
``out_proj.*`` ``[dim, H*hd]`` in one ``weights.safetensors`` per case:

    q = q_proj(query) -> [B, H, Tq, hd];  k, v = k_proj(kv), v_proj(kv) -> [B, Hkv, Tk, hd]
    query head h reads kv head h // (H // Hkv)
    logits = q k^T / (temperature * sqrt(hd));  keys with kv_mask 0 -> -inf
    weights = softmax(logits) [B, H, Tq, Tk];  out = out_proj(merge(weights v)) [B, Tq, dim]
    a query row whose keys are all masked: weights 0 and output row 0 (not out_proj.bias)
    a query row with query_mask 0: weights 0 and output row 0
    weights_mean = weights.mean(over heads) [B, Tq, Tk]

Weights are drawn in float32 from a seeded generator (0.2 N(0,1) for matrices,
0.25 N(0,1) for biases), inputs are N(0,1) draws rounded to multiples of 1/32
(exact in float32, and they compress); both are stored as float32.  The
references run in float64 on those float32 values and their outputs are cast
to float32:

- ``written-out``: the formula above with matmul/einsum (no
  nn.MultiheadAttention), for every case;
- ``torch.nn.MultiheadAttention``: for the plain cases (num_kv_heads ==
  num_heads, num_heads * head_dim == dim, temperature 1, no query mask), with
  ``q/k/v_proj_weight``, ``in_proj_bias`` and ``out_proj`` set from the same
  tensors and ``key_padding_mask = (kv_mask == 0)``.  The two must agree to
  1e-6 (asserted); the stored arrays are MultiheadAttention's, except where it
  gives NaN (a row whose keys are all masked), where they are the written-out
  ones.

Other cases also record how far the written-out result is from
MultiheadAttention run on an equivalent layer (kv heads repeated, q scaled by
1 / temperature, query rows zeroed afterwards) where one exists.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from make_fixtures import SCHEMA_VERSION, Arrays, write_json
from torch import nn

# Inputs: N(0,1) rounded to this grid (exact in float32).
INPUT_STEP = 1 / 32
WEIGHT_STD = 0.2
BIAS_STD = 0.25
# Plain cases must agree with nn.MultiheadAttention to this (float64 computations).
REFERENCE_TOL = 1e-6

MHA = "torch.nn.MultiheadAttention"
WRITTEN = "written-out"

BASE = {"dim": 24, "num_heads": 4, "kv_dim": 20, "batch": 2, "tq": 5, "tk": 7}

# One spec per case.  ``config`` holds the constructor arguments as passed
# (None = the default); masks are per batch row, None = no mask.
# Weights come from Generator(seed), inputs from Generator(seed + 1000).
CASES: list[dict[str, Any]] = [
    {
        "id": "plain",
        "seed": 301,
        "description": "no masks",
    },
    {
        "id": "kv_mask",
        "seed": 302,
        "description": "kv_mask: batch row 1 has keys 2, 5 and 6 masked",
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0]],
    },
    {
        "id": "query_mask",
        "seed": 303,
        "description": "query_mask: batch row 0 has its last two queries masked, row 1 query 1",
        "query_mask": [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]],
    },
    {
        "id": "kv_all_masked",
        "seed": 304,
        "description": "kv_mask: batch row 1 has every key masked (weights and output rows 0), "
        "row 0 key 3",
        "kv_mask": [[1, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
    },
    {
        "id": "gqa",
        "seed": 305,
        "description": "grouped-query attention: 4 query heads over 2 kv heads (heads 0-1 read "
        "kv head 0, heads 2-3 kv head 1); kv_mask: batch row 0 has its last two keys masked",
        "config": {"num_kv_heads": 2},
        "kv_mask": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
    },
    {
        "id": "mqa",
        "seed": 306,
        "description": "multi-query attention: 4 query heads over 1 kv head; no masks",
        "config": {"num_kv_heads": 1},
    },
    {
        "id": "head_dim_8",
        "seed": 307,
        "description": "head_dim 8 with dim 24 and 4 heads (q width 32 != dim); both masks: "
        "kv_mask row 0 keys 0 and 6, query_mask row 1 query 4",
        "config": {"head_dim": 8},
        "kv_mask": [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]],
        "query_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
    },
    {
        "id": "temperature_0.5",
        "seed": 308,
        "description": "temperature 0.5 (logits / (0.5 * sqrt(hd))); no masks",
        "config": {"temperature": 0.5},
    },
    {
        "id": "tq1",
        "seed": 309,
        "description": "a single query (Tq = 1); kv_mask: batch row 1 has its last two keys masked",
        "tq": 1,
        "kv_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
    },
]

WEIGHT_NAMES = [
    f"{p}.{s}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for s in ("weight", "bias")
]


# ---------------------------------------------------------------------------
# Layer description, weights, inputs
# ---------------------------------------------------------------------------


def constructor_args(spec: dict) -> dict:
    """All constructor arguments as passed (None where the default applies)."""
    args = {
        "dim": BASE["dim"],
        "num_heads": BASE["num_heads"],
        "kv_dim": BASE["kv_dim"],
        "head_dim": None,
        "num_kv_heads": None,
        "temperature": 1.0,
        "bias": True,
    }
    args.update(spec.get("config", {}))
    return args


def resolve(args: dict) -> dict:
    head_dim = (
        args["head_dim"] if args["head_dim"] is not None else args["dim"] // args["num_heads"]
    )
    kv_heads = args["num_kv_heads"] if args["num_kv_heads"] is not None else args["num_heads"]
    assert args["num_heads"] % kv_heads == 0
    return {
        "head_dim": head_dim,
        "num_kv_heads": kv_heads,
        "q_width": args["num_heads"] * head_dim,
        "kv_width": kv_heads * head_dim,
        "scale": 1.0 / (args["temperature"] * math.sqrt(head_dim)),
    }


def is_plain(args: dict, res: dict, query_mask: Any) -> bool:
    return (
        res["num_kv_heads"] == args["num_heads"]
        and res["q_width"] == args["dim"]
        and args["temperature"] == 1.0
        and query_mask is None
    )


def draw_weights(args: dict, res: dict, seed: int) -> dict[str, torch.Tensor]:
    """float32 weights in WEIGHT_NAMES order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (res["q_width"], args["dim"]),
        "k_proj": (res["kv_width"], args["kv_dim"]),
        "v_proj": (res["kv_width"], args["kv_dim"]),
        "out_proj": (args["dim"], res["q_width"]),
    }
    w: dict[str, torch.Tensor] = {}
    for name in WEIGHT_NAMES:
        proj, kind = name.split(".")
        shape = shapes[proj] if kind == "weight" else shapes[proj][:1]
        std = WEIGHT_STD if kind == "weight" else BIAS_STD
        w[name] = std * torch.randn(shape, generator=gen, dtype=torch.float32)
    return w


def draw_inputs(args: dict, batch: int, tq: int, tk: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def grid(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        return torch.round(x / INPUT_STEP) * INPUT_STEP

    return {
        "query": grid((batch, tq, args["dim"])),
        "key_value": grid((batch, tk, args["kv_dim"])),
    }


# ---------------------------------------------------------------------------
# References (float64)
# ---------------------------------------------------------------------------


def written_out(
    w: dict[str, torch.Tensor],
    args: dict,
    res: dict,
    query: torch.Tensor,
    key_value: torch.Tensor,
    query_mask: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The layer's formula, step by step (float64 in, float64 out)."""
    b, tq, _ = query.shape
    tk = key_value.shape[1]
    h, hkv, hd = args["num_heads"], res["num_kv_heads"], res["head_dim"]
    q = (query @ w["q_proj.weight"].T + w["q_proj.bias"]).reshape(b, tq, h, hd).transpose(1, 2)
    k = key_value @ w["k_proj.weight"].T + w["k_proj.bias"]
    v = key_value @ w["v_proj.weight"].T + w["v_proj.bias"]
    k = k.reshape(b, tk, hkv, hd).transpose(1, 2)
    v = v.reshape(b, tk, hkv, hd).transpose(1, 2)
    # Query head i reads kv head i // (H // Hkv).
    kv_head = torch.arange(h) // (h // hkv)
    k, v = k[:, kv_head], v[:, kv_head]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / (args["temperature"] * math.sqrt(hd))
    if kv_mask is not None:
        logits = logits.masked_fill(kv_mask[:, None, None, :] == 0, -math.inf)
    # Softmax that gives 0 (not NaN) on a row of -inf.
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, e / torch.where(total > 0, total, 1.0), 0.0)
    if query_mask is not None:
        weights = weights * query_mask[:, None, :, None]
    ctx = torch.einsum("bhqk,bhkd->bhqd", weights, v).transpose(1, 2).reshape(b, tq, h * hd)
    out = ctx @ w["out_proj.weight"].T + w["out_proj.bias"]
    # Output rows are 0 where the query is masked or every key is.
    keep = torch.ones(b, tq, dtype=out.dtype)
    if kv_mask is not None:
        keep = keep * (kv_mask.sum(dim=-1) > 0).to(out.dtype)[:, None]
    if query_mask is not None:
        keep = keep * query_mask
    out = out * keep[..., None]
    return {"out": out, "weights_per_head": weights, "weights_mean": weights.mean(dim=1)}


def mha_reference(
    w: dict[str, torch.Tensor],
    dim: int,
    num_heads: int,
    kv_dim: int,
    query: torch.Tensor,
    key_value: torch.Tensor,
    kv_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention (float64) with its projections set from ``w``."""
    mha = nn.MultiheadAttention(
        embed_dim=dim, num_heads=num_heads, kdim=kv_dim, vdim=kv_dim, bias=True, batch_first=True
    )
    mha = mha.to(torch.float64).eval()
    with torch.no_grad():
        mha.q_proj_weight.copy_(w["q_proj.weight"])
        mha.k_proj_weight.copy_(w["k_proj.weight"])
        mha.v_proj_weight.copy_(w["v_proj.weight"])
        mha.in_proj_bias.copy_(torch.cat([w["q_proj.bias"], w["k_proj.bias"], w["v_proj.bias"]]))
        mha.out_proj.weight.copy_(w["out_proj.weight"])
        mha.out_proj.bias.copy_(w["out_proj.bias"])
        kpm = None if kv_mask is None else kv_mask == 0
        out, per_head = mha(
            query,
            key_value,
            key_value,
            key_padding_mask=kpm,
            need_weights=True,
            average_attn_weights=False,
        )
        out2, mean = mha(
            query,
            key_value,
            key_value,
            key_padding_mask=kpm,
            need_weights=True,
            average_attn_weights=True,
        )
    # The averaging call recomputes the output (same math, not always the same bits).
    assert torch.allclose(out, out2, rtol=0, atol=1e-12, equal_nan=True)
    return {"out": out, "weights_per_head": per_head, "weights_mean": mean}


MHA_CALL = (
    "mha = torch.nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, kdim=kv_dim, "
    "vdim=kv_dim, bias=True, batch_first=True).double().eval(); "
    "mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight = q_proj.weight, k_proj.weight, "
    "v_proj.weight; mha.in_proj_bias = cat([q_proj.bias, k_proj.bias, v_proj.bias]); "
    "mha.out_proj.weight, mha.out_proj.bias = out_proj.weight, out_proj.bias; "
    "out, weights_per_head = mha(query, key_value, key_value, "
    "key_padding_mask=None if kv_mask is None else kv_mask == 0, need_weights=True, "
    "average_attn_weights=False); "
    "weights_mean = mha(..., need_weights=True, average_attn_weights=True)[1]"
)
WRITTEN_CALL = (
    "q = (query @ Wq.T + bq) -> [B,H,Tq,hd]; k, v = (kv @ Wk.T + bk), (kv @ Wv.T + bv) -> "
    "[B,Hkv,Tk,hd], indexed with arange(H) // (H // Hkv); "
    "logits = einsum('bhqd,bhkd->bhqk', q, k) / (temperature * sqrt(hd)), "
    "masked_fill(kv_mask == 0, -inf); weights = exp(logits - rowmax) / rowsum (0 on an "
    "all -inf row) * query_mask; out = merge(einsum('bhqk,bhkd->bhqd', weights, v)) @ Wo.T + bo, "
    "rows with query_mask 0 or no unmasked key set to 0; weights_mean = weights.mean(1)"
)


def mha_equivalent(
    w: dict[str, torch.Tensor],
    args: dict,
    res: dict,
    query: torch.Tensor,
    key_value: torch.Tensor,
    query_mask: torch.Tensor | None,
    kv_mask: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """MultiheadAttention on an equivalent plain layer, or None where there is none."""
    if res["q_width"] != args["dim"]:
        return None
    how = []
    w = dict(w)
    group = args["num_heads"] // res["num_kv_heads"]
    if group > 1:
        hd = res["head_dim"]
        for p in ("k_proj", "v_proj"):
            wt = w[f"{p}.weight"].reshape(res["num_kv_heads"], hd, -1)
            w[f"{p}.weight"] = wt.repeat_interleave(group, dim=0).reshape(-1, args["kv_dim"])
            w[f"{p}.bias"] = (
                w[f"{p}.bias"]
                .reshape(res["num_kv_heads"], hd)
                .repeat_interleave(group, 0)
                .reshape(-1)
            )
        how.append(f"k_proj/v_proj rows of each kv head repeated {group} times")
    if args["temperature"] != 1.0:
        w["q_proj.weight"] = w["q_proj.weight"] / args["temperature"]
        w["q_proj.bias"] = w["q_proj.bias"] / args["temperature"]
        how.append("q_proj weight and bias divided by temperature")
    r = mha_reference(w, args["dim"], args["num_heads"], args["kv_dim"], query, key_value, kv_mask)
    if query_mask is not None:
        m = query_mask
        r = {
            "out": r["out"] * m[..., None],
            "weights_per_head": r["weights_per_head"] * m[:, None, :, None],
            "weights_mean": r["weights_mean"] * m[..., None],
        }
        how.append("out, weights_per_head and weights_mean rows with query_mask 0 set to 0")
    return r, how


def max_abs_diffs(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rows: torch.Tensor | None = None
) -> dict[str, float]:
    """Largest |a - b| per output (optionally over batch rows ``rows`` only)."""
    out = {}
    for k in ("out", "weights_per_head", "weights_mean"):
        x, y = a[k], b[k]
        if rows is not None:
            x, y = x[rows], y[rows]
        out[k] = float((x - y).abs().max())
    return out


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def check_result(case_id: str, r: dict[str, np.ndarray], qm: Any, km: Any) -> float:
    """Sanity of a stored result; returns the mean row maximum of the live weight rows."""
    out, wph, wm = r["out"], r["weights_per_head"], r["weights_mean"]
    for k, v in r.items():
        assert np.isfinite(v).all(), f"{case_id}/{k}"
    b, h, tq, tk = wph.shape
    qm = np.ones((b, tq)) if qm is None else np.asarray(qm)
    km = np.ones((b, tk)) if km is None else np.asarray(km)
    live = (qm > 0) & (km.sum(axis=1, keepdims=True) > 0)  # [B, Tq]
    sums = wph.astype(np.float64).sum(axis=-1)  # [B, H, Tq]
    assert np.allclose(sums, np.broadcast_to(live[:, None, :], sums.shape), atol=1e-6), case_id
    assert (wph[np.broadcast_to((km == 0)[:, None, None, :], wph.shape)] == 0).all(), case_id
    assert (out[~live] == 0).all(), case_id
    assert np.allclose(wm, wph.astype(np.float64).mean(axis=1), atol=1e-7), case_id
    assert float(out[live].std()) > 0.05, case_id
    row_max = float(wph.transpose(0, 2, 1, 3)[live].max(axis=-1).mean())
    assert 1.0 / tk < row_max < 0.9, f"{case_id}: attention row max {row_max}"
    return row_max


def make_case(spec: dict, out: Path, arrays: Arrays) -> dict:
    from safetensors.torch import save_file

    cid = spec["id"]
    args = constructor_args(spec)
    res = resolve(args)
    batch, tq, tk = BASE["batch"], spec.get("tq", BASE["tq"]), BASE["tk"]
    w32 = draw_weights(args, res, spec["seed"])
    x32 = draw_inputs(args, batch, tq, tk, spec["seed"] + 1000)
    qm_list, km_list = spec.get("query_mask"), spec.get("kv_mask")

    wdir = out / cid
    wdir.mkdir(parents=True)
    save_file(w32, str(wdir / "weights.safetensors"))
    (wdir / "weights.safetensors").chmod(0o644)  # safetensors writes 0600

    w64 = {k: v.to(torch.float64) for k, v in w32.items()}
    query, key_value = x32["query"].to(torch.float64), x32["key_value"].to(torch.float64)
    qm = None if qm_list is None else torch.tensor(qm_list, dtype=torch.float64)
    km = None if km_list is None else torch.tensor(km_list, dtype=torch.float64)

    written = written_out(w64, args, res, query, key_value, qm, km)
    references = [WRITTEN]
    stored = written
    diffs = None
    extra: dict[str, Any] = {}
    if is_plain(args, res, qm_list):
        mha = mha_reference(
            w64, args["dim"], args["num_heads"], args["kv_dim"], query, key_value, km
        )
        references = [MHA, WRITTEN]
        nan_rows = [i for i in range(batch) if not torch.isfinite(mha["out"][i]).all()]
        if nan_rows:
            # MultiheadAttention gives NaN on a row whose keys are all masked: compare the
            # other rows, store the written-out result.
            assert km is not None and all(km[i].sum() == 0 for i in nan_rows), cid
            ok_rows = torch.tensor([i for i in range(batch) if i not in nan_rows])
            diffs = max_abs_diffs(mha, written, ok_rows)
            extra["mha_nan_batch_rows"] = nan_rows
            extra["mha_nan_note"] = (
                "nn.MultiheadAttention returns NaN (out and weights) for batch rows whose keys "
                "are all masked; the max diff is over the other rows and the stored arrays are "
                "the written-out ones (zeros there)"
            )
            stored_from = WRITTEN
        else:
            diffs = max_abs_diffs(mha, written)
            stored = mha
            stored_from = MHA
        assert max(diffs.values()) < REFERENCE_TOL, (cid, diffs)
    else:
        stored_from = WRITTEN
        eq = mha_equivalent(w64, args, res, query, key_value, qm, km)
        if eq is not None:
            r, how = eq
            d = max_abs_diffs(r, written)
            assert max(d.values()) < REFERENCE_TOL, (cid, d)
            extra["mha_equivalent"] = {"how": how, "max_abs_diff_vs_written_out": d}
        else:
            extra["mha_equivalent"] = None
            extra["mha_equivalent_note"] = (
                "none: nn.MultiheadAttention needs num_heads * head_dim == dim"
            )

    result = {k: v.to(torch.float32).numpy() for k, v in stored.items()}
    if diffs is not None:
        other = {k: v.to(torch.float32).numpy() for k, v in written.items()}
        extra["float32_max_abs_diff_between_references"] = {
            k: float(np.abs(result[k].astype(np.float64) - other[k]).max()) for k in result
        }
    row_max = check_result(cid, result, qm_list, km_list)

    if km_list is not None:
        fully = [i for i, row in enumerate(km_list) if sum(row) == 0]
        if fully:
            extra["fully_masked_batch_rows"] = fully
            extra["fully_masked_note"] = (
                "out rows there are 0, not out_proj(0) = out_proj.bias; weights 0"
            )

    inputs = {
        "query": arrays.add(f"{cid}/query", x32["query"].numpy()),
        "key_value": arrays.add(f"{cid}/key_value", x32["key_value"].numpy()),
        "query_mask": None
        if qm_list is None
        else arrays.add(f"{cid}/query_mask", np.asarray(qm_list, dtype=np.int64)),
        "kv_mask": None
        if km_list is None
        else arrays.add(f"{cid}/kv_mask", np.asarray(km_list, dtype=np.int64)),
    }
    outputs = {k: arrays.add(f"{cid}/{k}", v) for k, v in result.items()}
    return {
        "id": cid,
        "description": spec["description"],
        "config": args,
        "resolved": {k: res[k] for k in ("head_dim", "num_kv_heads", "q_width", "kv_width")},
        "weights": f"attention/{cid}/weights.safetensors",
        "weight_shapes": {k: list(v.shape) for k, v in w32.items()},
        "seeds": {"weights": spec["seed"], "inputs": spec["seed"] + 1000},
        "inputs": inputs,
        "outputs": outputs,
        "references": references,
        "stored_from": stored_from,
        "max_abs_diff_between_references": diffs,
        **extra,
        "attention_row_max": row_max,
    }


def make_attention(out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on CPU, whatever the machine
    try:
        _make_attention(out)
    finally:
        torch.set_num_threads(threads)


def _make_attention(out: Path) -> None:
    import safetensors

    arrays = Arrays(out)
    cases = [make_case(spec, out, arrays) for spec in CASES]
    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "attention",
            "schema_version": SCHEMA_VERSION,
            "torch_version": torch.__version__,
            "safetensors_version": safetensors.__version__,
            "layer": "CrossModalAttention(dim, num_heads, kv_dim, head_dim=None -> dim // "
            "num_heads, num_kv_heads=None -> num_heads, temperature=1.0, bias=True), "
            "float32, batch first, no dropout",
            "weight_names": WEIGHT_NAMES,
            "dtype": "float32 weights, inputs and outputs; references computed in float64 on "
            "the float32 values, outputs cast to float32",
            "init": f"weights {WEIGHT_STD} N(0,1), biases {BIAS_STD} N(0,1), float32, drawn "
            "in q_proj.weight, q_proj.bias, k_proj.weight, ... order from "
            "torch.Generator().manual_seed(seeds.weights); inputs N(0,1) rounded to "
            "multiples of 1/32 (query then key_value) from seeds.inputs",
            "masks": "int64 [B, T], 1 = real token; masked positions hold ordinary random inputs",
            "semantics": {
                "kv_head_of_query_head": "h // (num_heads // num_kv_heads)",
                "logits": "q k^T / (temperature * sqrt(head_dim)), keys with kv_mask 0 -> -inf",
                "all_keys_masked": "weights 0 and out row 0 (not out_proj.bias)",
                "query_mask_0": "weights 0 and out row 0",
                "weights_mean": "weights_per_head.mean(over heads), masked rows included as 0",
                "k_proj_bias_note": "k_proj.bias adds q . b_k to every logit of a query row, "
                "so it cannot change any output (loaders must still read it)",
            },
            "references": {
                MHA: "plain cases only (num_kv_heads == num_heads, num_heads * head_dim == dim, "
                "temperature 1, no query_mask): " + MHA_CALL,
                WRITTEN: WRITTEN_CALL,
                "tolerance": f"the two agree to {REFERENCE_TOL} (asserted at generation)",
            },
            "cases": cases,
        },
    )
