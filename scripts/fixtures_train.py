"""Training fixtures (area ``train``): PyTorch-autograd gradients, losses and a short
training run that mlmf's native training is tested against.

Run through ``scripts/make_fixtures.py --only train``, which calls :func:`make_train`.
Output: ``tests/fixtures/train/`` with ``manifest.json`` (``schema`` 1, ``generator``,
``tolerance`` {rel 1e-4, abs 1e-6}: a float32 value passes when ``|got - want| <= abs +
rel * |want|``, ``cases[]``, ``loop``) and one safetensors file per case.  Layout and
manifest keys: tests/fixtures/README.md, section ``train``.

Every reference runs in float64 with torch autograd on float32-rounded values (weights,
inputs and grad_output are float32 draws, converted to float64) and is stored as float32,
except ``loss64`` / ``losses`` (float64) and integer labels (int64).  Seeds are fixed and
torch runs on one thread, so two runs give the same bytes.  Scalar parameters and losses
(``logit_scale``, ``logit_bias``, ``loss``, ``loss64``) are 0-d tensors.

Gradient checks (kinds fusion, attention, pair_scores) use ``L = sum(output *
grad_output)`` with ``grad_output`` a seeded N(0,1) float32 tensor of the output's shape
(``Generator(seeds.weights + 2000)``), so dL/doutput = grad_output.  ``grad.<name>`` is
dL/d(weight <name>) for every learned tensor (zeros where a tensor takes no part, e.g. a
missing modality's projection); ``grad_input.<input>`` is dL/d(input) as well.

kind ``fusion``: every case of fixtures_fusion.CASES (same weights and inputs: its
``weight_spec`` / ``draw_weights`` / ``draw_inputs``), plus cases with per-row presence
(``present_rows``): row b is fused exactly as if only its present modalities had been
passed, computed row by row with fixtures_fusion's present-modalities-only reference; a
row's absent inputs still hold random finite values and influence nothing (their
``grad_input`` rows are 0).  File ``fusion/<id>.safetensors``: the weights under mlmf's
names, ``input.<m>`` ([B, D] pooled or [B, T, D] tokens), ``mask.<m>`` [B, T] float32 0/1
(token inputs with a mask), ``present.<m>`` [B] float32 (per-row cases), ``grad_output``
[B, out], ``fused`` [B, out], ``gates`` [B, M] (attention, gated, late weighted; 0 for a
modality absent from a row), ``grad.<name>``, ``grad_input.<m>``.

kind ``attention``: CrossModalAttention (the written-out reference of
fixtures_attention.py), one case per variant.  top_k / sparsity_ratio / adaptive choose
their keys, and adaptive its temperature tau, from the detached logits: no gradient flows
through tau or the choice, only through the kept logits.  Selections stay away from ties
(gap between the k-th and (k+1)-th logit > fixtures_attention.MIN_TOPK_GAP).  File: the
weights (``q_proj.*``, ``k_proj.*``, ``v_proj.*``, ``out_proj.*``, with qk_norm
``q_norm.weight``, ``k_norm.weight``), ``query`` [B, Tq, dim], ``key_value`` [B, Tk,
kv_dim], ``query_mask`` / ``kv_mask`` [B, T] float32 (where set), ``grad_output``,
``output``, ``grad.<name>``, ``grad_input.query``, ``grad_input.key_value``.

kind ``pair_scores``: S[i, j] = sum_t qm[i, t] cos(X[i, t], O_ij[t]) / max(1, sum_t
qm[i, t]) with O_ij = A(X_i, Y_j; query_mask_i, kv_mask_j) (masked query rows and rows
without an allowed key give 0), cos(x, o) = x.o / (norm_eps(x) norm_eps(o)), norm_eps(v) =
sqrt(sum v^2 + 1e-12).  File: weights, ``query`` [Bq, Tq, dq], ``query_mask``,
``key_value`` [Bk, Tk, dk], ``kv_mask``, ``grad_output`` [Bq, Bk], ``scores``,
``grad.<name>``, ``grad_input.query``, ``grad_input.key_value``.

kind ``objective`` (gradients of the loss itself; ``loss`` float32 and ``loss64``
float64): normalize(x) = x / sqrt(sum(x^2, row) + 1e-12), a = normalize(u), b =
normalize(v);
    infonce:  logits = exp(min(s, ln 100)) a b^T;  loss = (CE(logits, arange B) +
              CE(logits^T, arange B)) / 2   (no gradient to s when s > ln 100)
    sigmoid:  logits = exp(s) a b^T + bias;  z = 2 eye(B) - 1;  loss = sum(softplus(-z
              logits)) / B,  softplus(x) = relu(x) + log1p(exp(-|x|))
    classify: loss = mean CE(fused W^T + b, labels);  regress: mean((fused W^T + b -
              targets)^2) over every element
    weighted: 1.0 classify(u) + 0.5 infonce(u, v): the classifier reads ``u``, so grad.u
              adds both terms
Tensors ``u``, ``v``, ``logit_scale``, ``logit_bias``, ``fused``, ``head.weight``,
``head.bias``, ``labels`` (int64), ``targets`` as the objective needs, ``grad.<name>`` of
each float input and parameter.

``loop``: 50 AdamW steps of adapters + gated fusion + classifier + InfoNCE (every setting
in the manifest's ``loop`` entry), run in float64 (``losses``, ``final.<name>``) and in
float32 from the same initial values (``losses32``).

kind ``interop``: ``mlmf.torch`` fusion modules (python/mlmf/torch, loaded from the
source tree without the compiled extension) trained 5 Adam steps on a random regression
target, saved with ``save_mlmf`` to ``interop/<id>.safetensors`` (weights only, what
``mlmf.Fusion(weights=...)`` reads); fixed inputs and the module's float32 outputs in
``interop/<id>.io.safetensors`` (``input.<m>``, ``mask.<m>``, ``fused``, ``gates``).

Cross-checks (asserted, recorded per case under ``cross_checks``): the ``mlmf.torch``
modules in float64 against every fusion and (non-adaptive) attention reference, outputs
and gradients (< 1e-10).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable

import fixtures_attention as fa
import fixtures_fusion as ff
import torch
import torch.nn.functional as F
from make_fixtures import write_json

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"rel": 1e-4, "abs": 1e-6}
# grad_output of a case comes from Generator(weights seed + GRAD_SEED_OFFSET).
GRAD_SEED_OFFSET = 2000
# mlmf.torch against the float64 references.
TORCH_CHECK_TOL = 1e-10
TORCH_CHECK = "mlmf.torch (float64)"
NORM_EPS = 1e-12
LOGIT_SCALE_MAX = math.log(100.0)

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def save(tensors: Tensors, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    path.chmod(0o644)  # safetensors writes 0600


def f32(tensors: Tensors, prefix: str = "") -> Tensors:
    return {f"{prefix}{k}": v.detach().to(torch.float32) for k, v in tensors.items()}


def leaves(tensors: Tensors) -> Tensors:
    """float64 copies that require grad."""
    return {k: v.detach().to(torch.float64).requires_grad_() for k, v in tensors.items()}


def gradients(loss: torch.Tensor, wrt: Tensors) -> Tensors:
    """d loss / d each tensor of ``wrt`` (zeros for one that takes no part)."""
    names = list(wrt)
    grads = torch.autograd.grad(loss, [wrt[n] for n in names], allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        g = torch.zeros_like(wrt[n]) if g is None else g
        assert torch.isfinite(g).all(), n
        out[n] = g
    return out


def max_diff(a: Tensors, b: Tensors) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def mlmf_torch() -> Any:
    """python/mlmf/torch as a stand-alone package (the compiled extension is not needed)."""
    name = "_mlmf_torch_reference"
    if name not in sys.modules:
        pkg = ROOT / "python" / "mlmf" / "torch"
        spec = importlib.util.spec_from_file_location(
            name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def torch_module_grads(
    module: torch.nn.Module,
    weights: Tensors,
    run: Callable[[torch.nn.Module], tuple[Tensors, torch.Tensor]],
) -> tuple[Tensors, Tensors]:
    """``module`` in float64 with ``weights``: the outputs ``run`` gives and the gradients
    of its loss with respect to every parameter."""
    module = module.to(torch.float64)
    module.load_state_dict({k: v.detach() for k, v in weights.items()}, strict=True)
    params = dict(module.named_parameters())
    out, loss = run(module)
    return out, gradients(loss, params)


# ---------------------------------------------------------------------------
# kind "fusion"
# ---------------------------------------------------------------------------

# Cases with per-row presence, in the format of fixtures_fusion.CASES plus
# `present_rows` {m: [0/1 per batch row]} for every modality in `inputs`.
ROW_CASES: list[dict[str, Any]] = [
    {
        "id": "gated_rows",
        "seed": 431,
        "description": "gated; image absent in batch row 1 (its gate 0 there)",
        "strategy": "gated",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {},
        "inputs": {"text": ff.tokens(5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), "image": ff.pooled()},
        "present_rows": {"text": [1, 1], "image": [1, 0]},
    },
    {
        "id": "late_weighted_rows",
        "seed": 432,
        "description": "late weighted; text absent in batch row 0 (softmax over image and "
        "audio there)",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "weighted"},
        "inputs": {
            "text": ff.pooled(),
            "image": ff.tokens(4, [[1, 1, 1, 1], [1, 1, 0, 0]]),
            "audio": ff.tokens(3),
        },
        "present_rows": {"text": [0, 1], "image": [1, 1], "audio": [1, 1]},
    },
    {
        "id": "late_concat_rows",
        "seed": 433,
        "description": "late concat; image absent in batch row 0 (its columns skipped there)",
        "strategy": "late",
        "dims": ["text", "image"],
        "out_dim": 16,
        "options": {"mode": "concat"},
        "inputs": {"text": ff.tokens(3, [[1, 1, 0], [1, 1, 1]]), "image": ff.pooled()},
        "present_rows": {"text": [1, 1], "image": [0, 1]},
    },
    {
        "id": "late_mean_rows",
        "seed": 434,
        "description": "late mean; audio absent in batch row 1 (mean over 2 there, 3 in row 0)",
        "strategy": "late",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"mode": "mean"},
        "inputs": {"text": ff.pooled(), "image": ff.pooled(), "audio": ff.tokens(4)},
        "present_rows": {"text": [1, 1], "image": [1, 1], "audio": [1, 0]},
    },
    {
        "id": "attention_rows",
        "seed": 435,
        "description": "attention with attention_dim 8; text absent in batch row 1",
        "strategy": "attention",
        "dims": ["text", "image", "audio"],
        "out_dim": 16,
        "options": {"attention_dim": 8},
        "inputs": {
            "text": ff.tokens(4, [[1, 1, 1, 0], [1, 1, 1, 1]]),
            "image": ff.pooled(),
            "audio": ff.pooled(),
        },
        "present_rows": {"text": [1, 0], "image": [1, 1], "audio": [1, 1]},
    },
    {
        "id": "early_rows",
        "seed": 436,
        "description": "early, out_dim 8, 1 layer, 2 heads, mlp_ratio 2; audio absent in batch "
        "row 1 (the sequence holds text and image tokens only there)",
        "strategy": "early",
        "dims": ["text", "image", "audio"],
        "out_dim": 8,
        "options": {"num_layers": 1, "num_heads": 2, "mlp_ratio": 2.0},
        "inputs": {
            "text": ff.tokens(4, [[1, 1, 1, 0], [1, 1, 1, 1]]),
            "image": ff.tokens(3),
            "audio": ff.pooled(),
        },
        "present_rows": {"text": [1, 1], "image": [1, 1], "audio": [1, 0]},
    },
    {
        "id": "middle_tanh_rows",
        "seed": 437,
        "description": "middle, out_dim 8, 1 layer, 2 heads, tanh gates, mlp_ratio 2; image "
        "absent in batch row 0 (text and audio attend over each other there)",
        "strategy": "middle",
        "dims": ["text", "image", "audio"],
        "out_dim": 8,
        "options": {"num_heads": 2, "gate": "tanh", "mlp_ratio": 2.0},
        "inputs": {
            "text": ff.tokens(4, [[1, 1, 1, 1], [1, 1, 0, 0]]),
            "image": ff.tokens(3, [[1, 1, 1], [1, 1, 0]]),
            "audio": ff.pooled(),
        },
        "present_rows": {"text": [1, 1], "image": [0, 1], "audio": [1, 1]},
    },
    {
        "id": "middle_alone_rows",
        "seed": 438,
        "description": "middle, out_dim 8, 1 layer, 2 heads, no gate, mlp_ratio 2; batch row 1 "
        "has only text (a = 0 there, the MLP still applies), row 0 all three",
        "strategy": "middle",
        "dims": ["text", "image", "audio"],
        "out_dim": 8,
        "options": {"num_heads": 2, "mlp_ratio": 2.0},
        "inputs": {
            "text": ff.tokens(5, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "image": ff.tokens(3),
            "audio": ff.tokens(4, [[1, 1, 0, 0], [1, 1, 1, 1]]),
        },
        "present_rows": {"text": [1, 1], "image": [1, 0], "audio": [1, 0]},
    },
]


def fusion_reference(
    spec: dict, w: Tensors, x: Tensors, rows: dict[str, list[int]] | None
) -> dict[str, torch.Tensor]:
    """fused (and gates): the whole batch at once, or row by row with each row's present
    modalities only (``rows``)."""
    dims = {m: ff.WIDTHS[m] for m in spec["dims"]}
    opts = ff.case_options(spec)
    fn = ff.STRATEGIES[spec["strategy"]]
    # x holds float64 leaves: as_tokens keeps them in the graph.
    inputs = {m: ff.as_tokens(x[m], form["mask"]) for m, form in spec["inputs"].items()}
    if rows is None:
        r = fn(w, dims, opts, inputs, ff.Checks())
        return {k: v for k, v in r.items() if k in ("fused", "gates")}
    per_row: dict[str, list[torch.Tensor]] = {"fused": [], "gates": []}
    for b in range(ff.BATCH):
        present = {m: (t[b : b + 1], mk[b : b + 1]) for m, (t, mk) in inputs.items() if rows[m][b]}
        r = fn(w, dims, opts, present, ff.Checks())
        for k in per_row:
            if k in r:
                per_row[k].append(r[k])
    return {k: torch.cat(v) for k, v in per_row.items() if v}


def torch_fusion_check(spec: dict, w: Tensors, x: Tensors, go: torch.Tensor, ref: Any) -> float:
    """mlmf.torch's fusion module (float64) against the reference: outputs and gradients."""
    mt = mlmf_torch()
    dims = {m: ff.WIDTHS[m] for m in spec["dims"]}
    rows = spec.get("present_rows")

    def run(module: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {"fused": [], "gates": []}
        groups = [None] if rows is None else list(range(ff.BATCH))
        for b in groups:
            sl = slice(None) if b is None else slice(b, b + 1)
            inputs = {}
            for m, form in spec["inputs"].items():
                if b is not None and not rows[m][b]:
                    continue
                xm = x[m].detach()[sl]
                mask = form["mask"]
                inputs[m] = xm if mask is None else (xm, torch.tensor(mask)[sl])
            r = module(inputs)
            outs["fused"].append(r.fused)
            if r.gates is not None:
                outs["gates"].append(r.gates)
        out = {k: torch.cat(v) for k, v in outs.items() if v}
        return out, (out["fused"] * go).sum()

    module = mt.Fusion(spec["strategy"], dims, spec["out_dim"], **ff.case_options(spec))
    out, grads = torch_module_grads(module, w, run)
    d = max(max_diff(out, ref["outputs"]), max_diff(grads, ref["grads"]))
    assert d < TORCH_CHECK_TOL, (spec["id"], d)
    return d


def make_fusion_case(spec: dict, out: Path) -> dict:
    cid, strategy = spec["id"], spec["strategy"]
    dims = {m: ff.WIDTHS[m] for m in spec["dims"]}
    opts = ff.case_options(spec)
    rows = spec.get("present_rows")
    assert rows is None or set(rows) == set(spec["inputs"]), cid
    wspec = ff.weight_spec(strategy, dims, spec["out_dim"], opts)
    w32 = ff.draw_weights(wspec, spec["seed"])
    x32 = ff.draw_inputs(spec, spec["seed"] + 1000)
    go32 = normal((ff.BATCH, spec["out_dim"]), spec["seed"] + GRAD_SEED_OFFSET)

    w, x = leaves(w32), leaves(x32)
    r = fusion_reference(spec, w, x, rows)
    loss = (r["fused"] * go32.double()).sum()
    grads = gradients(loss, {**w, **{f"input.{m}": t for m, t in x.items()}})
    gw = {k: grads[k] for k in w}
    gx = {m: grads[f"input.{m}"] for m in x}
    assert float(r["fused"].std()) > 0.05, cid
    if rows is not None:
        for m, flags in rows.items():
            for b, present in enumerate(flags):
                if not present:  # an absent row's input takes no part
                    assert (gx[m][b] == 0).all(), (cid, m, b)
                    if "gates" in r:
                        assert r["gates"][b, list(dims).index(m)] == 0, (cid, m, b)
    ref = {"outputs": {k: v.detach() for k, v in r.items()}, "grads": gw}
    check = torch_fusion_check(spec, w, x, go32.double(), ref)

    tensors: Tensors = dict(w32)
    inputs = {}
    for m, form in spec["inputs"].items():
        tensors[f"input.{m}"] = x32[m]
        if form["mask"] is not None:
            tensors[f"mask.{m}"] = torch.tensor(form["mask"], dtype=torch.float32)
        if rows is not None:
            tensors[f"present.{m}"] = torch.tensor(rows[m], dtype=torch.float32)
        inputs[m] = {
            "form": form["form"],
            "tokens": form["tokens"],
            "mask": form["mask"] is not None,
        }
    tensors["grad_output"] = go32
    tensors.update(f32({k: v for k, v in r.items()}))
    tensors.update(f32(gw, "grad."))
    tensors.update(f32(gx, "grad_input."))
    save(tensors, out / "fusion" / f"{cid}.safetensors")
    entry = {
        "id": cid,
        "kind": "fusion",
        "file": f"fusion/{cid}.safetensors",
        "description": spec["description"],
        "strategy": strategy,
        "dims": [[m, d] for m, d in dims.items()],
        "out_dim": spec["out_dim"],
        "options": opts,
        "batch": ff.BATCH,
        "inputs": inputs,
    }
    if rows is not None:
        entry["present_rows"] = rows
    entry.update(
        weights=list(w32),
        outputs=sorted(r),
        seeds={
            "weights": spec["seed"],
            "inputs": spec["seed"] + 1000,
            "grad_output": spec["seed"] + GRAD_SEED_OFFSET,
        },
        cross_checks={TORCH_CHECK: check},
    )
    return entry


# ---------------------------------------------------------------------------
# kind "attention"
# ---------------------------------------------------------------------------

ATTENTION_FROM_AREA = [
    "plain",
    "gqa",
    "qk_norm",
    "rope",
    "softcap",
    "sliding_window",
    "top_k",
    "sparsity_ratio",
    "adaptive",
]
# Cases of this area only; the others are the attention area's cases of the same id
# (same weights, inputs and masks).
ATTENTION_NEW: dict[str, dict[str, Any]] = {
    "temperature_masks": {
        "id": "temperature_masks",
        "seed": 631,
        "batch": 3,
        "description": "temperature 0.5 with both masks, batch 3: row 0 has query 2 masked "
        "and keys 3 and 6 masked, row 1 every key masked (output 0, no gradient), row 2 "
        "query 4 masked",
        "config": {"temperature": 0.5},
        "query_mask": [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
        "kv_mask": [[1, 1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
    },
}
ATTENTION_ORDER = ["plain", "gqa", "temperature_masks", *ATTENTION_FROM_AREA[2:]]


def attention_spec(cid: str) -> dict:
    if cid in ATTENTION_NEW:
        return ATTENTION_NEW[cid]
    return next(s for s in fa.CASES if s["id"] == cid)


def mask_tensor(mask: Any) -> torch.Tensor | None:
    return None if mask is None else torch.tensor(mask, dtype=torch.float64)


def selection_stats(args: dict, info: dict) -> dict | None:
    """Distances of the key selection from ties (asserted) for the manifest."""
    if args["adaptive"]:
        st = info["adaptive"]
        gap, dist = st["min_gap_kth_to_next"], st["min_distance_to_integer"]
        assert st["rows_with_dropped_keys"] > 0
        assert gap is not None and gap > fa.MIN_TOPK_GAP, gap
        assert dist is None or dist > fa.MIN_INTEGER_DISTANCE, dist
        return {
            "min_gap_kth_to_next": gap,
            "min_distance_to_integer": dist,
            "rows_with_dropped_keys": st["rows_with_dropped_keys"],
            "kept_keys_per_row_and_head": st["kept_keys_per_row_and_head"],
        }
    if "kept_keys_per_row" in info:
        gap = info["min_gap_kth_to_next"]
        assert gap is not None and gap > fa.MIN_TOPK_GAP, gap
        return {"min_gap_kth_to_next": gap, "kept_keys_per_row": info["kept_keys_per_row"]}
    return None


def torch_attention_kwargs(args: dict) -> dict:
    mt = mlmf_torch()
    accepted = set(inspect.signature(mt.CrossModalAttention.__init__).parameters)
    return {k: v for k, v in args.items() if k in accepted and k not in ("self",)}


def torch_attention_check(
    args: dict, w: Tensors, q: torch.Tensor, kv: torch.Tensor, qm: Any, km: Any, ref: dict
) -> float:
    mt = mlmf_torch()
    go = ref["grad_output"]

    def run(module: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        o, _ = module(q.detach(), kv.detach(), qm, km)
        return {"output": o}, (o * go).sum()

    module = mt.CrossModalAttention(**torch_attention_kwargs(args))
    out, grads = torch_module_grads(module, w, run)
    d = max(max_diff(out, {"output": ref["output"]}), max_diff(grads, ref["grads"]))
    assert d < TORCH_CHECK_TOL, d
    return d


def make_attention_case(cid: str, out: Path) -> dict:
    spec = attention_spec(cid)
    args = fa.constructor_args(spec)
    res = fa.resolve(args)
    batch = spec.get("batch", fa.BASE["batch"])
    tq, tk = spec.get("tq", fa.BASE["tq"]), fa.BASE["tk"]
    w32 = fa.draw_weights(args, res, spec["seed"])
    x32 = fa.draw_inputs(args, batch, tq, tk, spec["seed"] + 1000)
    go32 = normal((batch, tq, args["dim"]), spec["seed"] + GRAD_SEED_OFFSET)
    qm, km = mask_tensor(spec.get("query_mask")), mask_tensor(spec.get("kv_mask"))

    w, x = leaves(w32), leaves(x32)
    info: dict[str, Any] = {}
    o = fa.written_out(w, args, res, x["query"], x["key_value"], qm, km, info)["out"]
    grads = gradients((o * go32.double()).sum(), {**w, **x})
    gw = {k: grads[k] for k in w}
    gx = {k: grads[k] for k in x}
    selection = selection_stats(args, info)
    cross = {}
    if not args["adaptive"]:
        ref = {"output": o.detach(), "grads": gw, "grad_output": go32.double()}
        cross[TORCH_CHECK] = torch_attention_check(args, w, x["query"], x["key_value"], qm, km, ref)

    tensors: Tensors = {**w32, **x32}
    for name in ("query_mask", "kv_mask"):
        if spec.get(name) is not None:
            tensors[name] = torch.tensor(spec[name], dtype=torch.float32)
    tensors["grad_output"] = go32
    tensors["output"] = o.detach().to(torch.float32)
    tensors.update(f32(gw, "grad."))
    tensors.update(f32(gx, "grad_input."))
    save(tensors, out / "attention" / f"{cid}.safetensors")
    entry = {
        "id": cid,
        "kind": "attention",
        "file": f"attention/{cid}.safetensors",
        "description": spec["description"],
        "args": args,
        "batch": batch,
        "tq": tq,
        "tk": tk,
        "masks": [n for n in ("query_mask", "kv_mask") if spec.get(n) is not None],
        "weights": list(w32),
        "seeds": {
            "weights": spec["seed"],
            "inputs": spec["seed"] + 1000,
            "grad_output": spec["seed"] + GRAD_SEED_OFFSET,
        },
        "same_as_attention_area_case": None if cid in ATTENTION_NEW else cid,
    }
    if selection is not None:
        entry["selection"] = selection
    entry["cross_checks"] = cross
    return entry


# ---------------------------------------------------------------------------
# kind "pair_scores"
# ---------------------------------------------------------------------------

PAIR_CASES: list[dict[str, Any]] = [
    {
        "id": "pair_plain",
        "seed": 641,
        "description": "4 heads; query items 1 and 2 padded (3 and 4 real tokens of 5), key "
        "item 1 has only 2 real tokens of 6, key item 2 five",
        "config": {"dim": 24, "kv_dim": 20, "num_heads": 4},
        "query_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
        "kv_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
    },
    {
        "id": "pair_gqa_qk_norm",
        "seed": 642,
        "description": "4 query heads over 2 kv heads with qk_norm; query item 2 has one real "
        "token, key item 2 three",
        "config": {"dim": 24, "kv_dim": 20, "num_heads": 4, "num_kv_heads": 2, "qk_norm": True},
        "query_mask": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
        "kv_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
    },
]
PAIR_SHAPE = {"bq": 3, "bk": 3, "tq": 5, "tk": 6}


def norm_eps(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((x * x).sum(dim=-1) + NORM_EPS)


def pair_scores(
    w: Tensors,
    args: dict,
    res: dict,
    x: torch.Tensor,
    qm: torch.Tensor,
    y: torch.Tensor,
    km: torch.Tensor,
) -> torch.Tensor:
    """S [Bq, Bk]: pair (i, j) runs the layer on query item i and key item j."""
    bq, bk = x.shape[0], y.shape[0]
    xr, qmr = x.repeat_interleave(bk, dim=0), qm.repeat_interleave(bk, dim=0)
    yr, kmr = y.repeat(bq, 1, 1), km.repeat(bq, 1)
    o = fa.written_out(w, args, res, xr, yr, qmr, kmr)["out"]
    o = o.reshape(bq, bk, *o.shape[1:])  # [Bq, Bk, Tq, dq]
    cos = (x[:, None] * o).sum(dim=-1) / (norm_eps(x)[:, None] * norm_eps(o))
    return (qm[:, None, :] * cos).sum(dim=-1) / qm.sum(dim=-1).clamp(min=1.0)[:, None]


def make_pair_case(spec: dict, out: Path) -> dict:
    cid = spec["id"]
    args = fa.constructor_args(spec)
    res = fa.resolve(args)
    shape = PAIR_SHAPE
    assert shape["bq"] == shape["bk"]  # one draw gives both sides
    w32 = fa.draw_weights(args, res, spec["seed"])
    x32 = fa.draw_inputs(args, shape["bq"], shape["tq"], shape["tk"], spec["seed"] + 1000)
    go32 = normal((shape["bq"], shape["bk"]), spec["seed"] + GRAD_SEED_OFFSET)
    qm = torch.tensor(spec["query_mask"], dtype=torch.float64)
    km = torch.tensor(spec["kv_mask"], dtype=torch.float64)
    w, x = leaves(w32), leaves(x32)
    s = pair_scores(w, args, res, x["query"], qm, x["key_value"], km)
    grads = gradients((s * go32.double()).sum(), {**w, **x})
    assert float(s.std()) > 0.02, cid
    tensors: Tensors = {
        **w32,
        **x32,
        "query_mask": qm.to(torch.float32),
        "kv_mask": km.to(torch.float32),
        "grad_output": go32,
        "scores": s.detach().to(torch.float32),
    }
    tensors.update(f32({k: grads[k] for k in w}, "grad."))
    tensors.update(f32({k: grads[k] for k in x}, "grad_input."))
    save(tensors, out / "pair_scores" / f"{cid}.safetensors")
    return {
        "id": cid,
        "kind": "pair_scores",
        "file": f"pair_scores/{cid}.safetensors",
        "description": spec["description"],
        "args": args,
        **shape,
        "weights": list(w32),
        "seeds": {
            "weights": spec["seed"],
            "inputs": spec["seed"] + 1000,
            "grad_output": spec["seed"] + GRAD_SEED_OFFSET,
        },
    }


# ---------------------------------------------------------------------------
# kind "objective"
# ---------------------------------------------------------------------------


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + NORM_EPS)


def infonce(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    a, b = normalize(u), normalize(v)
    logits = torch.exp(torch.clamp(s, max=LOGIT_SCALE_MAX)) * (a @ b.T)
    target = torch.arange(u.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) + torch.log1p(torch.exp(-x.abs()))


def sigmoid_loss(
    u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    logits = torch.exp(s) * (normalize(u) @ normalize(v).T) + bias
    z = 2 * torch.eye(u.shape[0], dtype=u.dtype) - 1
    return softplus(-z * logits).sum() / u.shape[0]


def classify_loss(
    fused: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(fused @ weight.T + bias, labels)


def regress_loss(
    fused: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return ((fused @ weight.T + bias - targets) ** 2).mean()


OBJ_BATCH, OBJ_DIM, OBJ_CLASSES, OBJ_TARGETS = 6, 12, 5, 3
OBJECTIVE_CASES: list[dict[str, Any]] = [
    {"id": "infonce", "objective": "infonce", "seed": 701, "logit_scale": math.log(1 / 0.07)},
    {
        "id": "infonce_clamped",
        "objective": "infonce",
        "seed": 702,
        "logit_scale": LOGIT_SCALE_MAX + 0.5,
    },
    {
        "id": "sigmoid",
        "objective": "sigmoid",
        "seed": 703,
        "logit_scale": math.log(10.0),
        "logit_bias": -10.0,
    },
    {
        "id": "sigmoid_2",
        "objective": "sigmoid",
        "seed": 704,
        "logit_scale": 2.0,
        "logit_bias": -1.0,
    },
    {"id": "classify", "objective": "classify", "seed": 705},
    {"id": "regress", "objective": "regress", "seed": 706},
    {"id": "weighted", "objective": "weighted", "seed": 707, "logit_scale": math.log(1 / 0.07)},
]
WEIGHTED_TERMS = [
    {"objective": "classify", "weight": 1.0, "inputs": {"fused": "u"}},
    {"objective": "infonce", "weight": 0.5, "inputs": {"u": "u", "v": "v"}},
]


def objective_inputs(spec: dict) -> Tensors:
    """float32 inputs and parameters, in this order from Generator(seed): the N(0,1)
    inputs rounded to 1/32 (u, v / fused), then head.weight 0.2 N(0,1), head.bias
    0.25 N(0,1), then labels / targets."""
    gen = torch.Generator().manual_seed(spec["seed"])
    b, d = OBJ_BATCH, OBJ_DIM
    kind = spec["objective"]
    t: Tensors = {}
    if kind in ("infonce", "sigmoid", "weighted"):
        t["u"] = ff.grid((b, d), gen)
        t["v"] = ff.grid((b, d), gen)
        t["logit_scale"] = torch.tensor(spec["logit_scale"], dtype=torch.float32)
        if kind == "sigmoid":
            t["logit_bias"] = torch.tensor(spec["logit_bias"], dtype=torch.float32)
    if kind in ("classify", "regress"):
        t["fused"] = ff.grid((b, d), gen)
    if kind in ("classify", "regress", "weighted"):
        n = OBJ_TARGETS if kind == "regress" else OBJ_CLASSES
        t["head.weight"] = 0.2 * torch.randn((n, d), generator=gen)
        t["head.bias"] = 0.25 * torch.randn((n,), generator=gen)
    if kind in ("classify", "weighted"):
        t["labels"] = torch.randint(0, OBJ_CLASSES, (b,), generator=gen)
    if kind == "regress":
        t["targets"] = ff.grid((b, OBJ_TARGETS), gen)
    return t


def objective_loss(kind: str, p: Tensors) -> tuple[torch.Tensor, Tensors]:
    """The loss and, for ``weighted``, each term's loss."""
    if kind == "infonce":
        return infonce(p["u"], p["v"], p["logit_scale"]), {}
    if kind == "sigmoid":
        return sigmoid_loss(p["u"], p["v"], p["logit_scale"], p["logit_bias"]), {}
    if kind == "classify":
        return classify_loss(p["fused"], p["head.weight"], p["head.bias"], p["labels"]), {}
    if kind == "regress":
        return regress_loss(p["fused"], p["head.weight"], p["head.bias"], p["targets"]), {}
    assert kind == "weighted", kind
    terms = {
        "classify": classify_loss(p["u"], p["head.weight"], p["head.bias"], p["labels"]),
        "infonce": infonce(p["u"], p["v"], p["logit_scale"]),
    }
    total = sum(t["weight"] * terms[t["objective"]] for t in WEIGHTED_TERMS)
    return total, terms


def make_objective_case(spec: dict, out: Path) -> dict:
    cid, kind = spec["id"], spec["objective"]
    t32 = objective_inputs(spec)
    floats = {k: v for k, v in t32.items() if v.is_floating_point() and k != "targets"}
    p = {**t32, **leaves(floats)}
    if "targets" in p:
        p["targets"] = t32["targets"].double()
    loss, terms = objective_loss(kind, p)
    grads = gradients(loss, {k: p[k] for k in floats})
    if kind == "sigmoid":  # the written-out softplus against torch's
        logits = torch.exp(p["logit_scale"]) * (normalize(p["u"]) @ normalize(p["v"]).T)
        z = 2 * torch.eye(OBJ_BATCH, dtype=torch.float64) - 1
        x = -z * (logits + p["logit_bias"])
        assert float((softplus(x) - F.softplus(x, threshold=1e9)).abs().max()) < 1e-12
    if spec.get("logit_scale", 0.0) > LOGIT_SCALE_MAX:
        assert float(grads["logit_scale"]) == 0.0, cid
    tensors: Tensors = dict(t32)
    tensors["loss"] = loss.detach().to(torch.float32)
    tensors["loss64"] = loss.detach()
    for name, value in terms.items():
        tensors[f"loss64.{name}"] = value.detach()
    tensors.update(f32(grads, "grad."))
    save(tensors, out / "objective" / f"{cid}.safetensors")
    entry: dict[str, Any] = {
        "id": cid,
        "kind": "objective",
        "objective": kind,
        "file": f"objective/{cid}.safetensors",
        "batch": OBJ_BATCH,
        "tensors": {k: list(v.shape) for k, v in t32.items()},
        "grads": [f"grad.{k}" for k in floats],
        "loss64": float(loss),
        "seed": spec["seed"],
    }
    if kind in ("infonce", "weighted"):
        entry["logit_scale_max"] = LOGIT_SCALE_MAX
        entry["clamped"] = spec["logit_scale"] > LOGIT_SCALE_MAX
    if kind == "weighted":
        entry["terms"] = WEIGHTED_TERMS
        entry["term_losses64"] = {k: float(v) for k, v in terms.items()}
    return entry


# ---------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------

LOOP = {
    "rows": 64,
    "dims": {"text": 24, "image": 20},
    "hidden": 16,
    "classes": 5,
    "steps": 50,
    "batch": 16,
    "warmup": 5,
    "lr": 1e-2,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "weight_decay_rule": "0.01 for the rank-2 tensors (the .weight matrices), 0.0 for the "
    "others (biases, logit_scale)",
    "clip_max_norm": 1.0,
    "objective_weights": {"classify": 1.0, "objectives.text-image": 0.5},
    "init_rule": "nn.Linear-style uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) in `params` order",
    "init_seed": 1234,
    "data_seed": 4321,
    "label_seed": 4322,
    "logit_scale_init": math.log(1 / 0.07),
}
# (name, shape, fan_in) in init order; logit_scale comes last and is not drawn.
LOOP_PARAMS: list[tuple[str, tuple[int, ...], int]] = [
    ("adapters.text.weight", (16, 24), 24),
    ("adapters.text.bias", (16,), 24),
    ("adapters.image.weight", (16, 20), 20),
    ("adapters.image.bias", (16,), 20),
    ("fusion.gate.weight", (2, 32), 32),
    ("fusion.gate.bias", (2,), 32),
    ("fusion.proj.text.weight", (16, 16), 16),
    ("fusion.proj.text.bias", (16,), 16),
    ("fusion.proj.image.weight", (16, 16), 16),
    ("fusion.proj.image.bias", (16,), 16),
    ("heads.classify.weight", (5, 16), 16),
    ("heads.classify.bias", (5,), 16),
]
LOGIT_SCALE_NAME = "objectives.text-image.logit_scale"


def lr_factor(t: int) -> float:
    warmup, total = LOOP["warmup"], LOOP["steps"]
    if t < warmup:
        return t / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def loop_init() -> Tensors:
    gen = torch.Generator().manual_seed(LOOP["init_seed"])
    p = {}
    for name, shape, fan_in in LOOP_PARAMS:
        bound = 1.0 / math.sqrt(fan_in)
        p[name] = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    p[LOGIT_SCALE_NAME] = torch.tensor(LOOP["logit_scale_init"], dtype=torch.float32)
    return p


def loop_data() -> tuple[Tensors, dict]:
    gen = torch.Generator().manual_seed(LOOP["data_seed"])
    n, dims = LOOP["rows"], LOOP["dims"]
    data = {f"data.{m}": ff.grid((n, d), gen) for m, d in dims.items()}
    x = torch.cat([data["data.text"], data["data.image"]], dim=1).double()
    mix = normal((LOOP["classes"], x.shape[1]), LOOP["label_seed"]).double()
    scores = x @ mix.T
    top2 = scores.topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    assert margin > 1e-3, margin  # labels do not depend on rounding
    data["data.labels"] = scores.argmax(dim=1)
    counts = torch.bincount(data["data.labels"], minlength=LOOP["classes"]).tolist()
    assert min(counts) > 0, counts
    return data, {"label_margin_min": margin, "class_counts": counts}


def loop_loss(p: Tensors, text: torch.Tensor, image: torch.Tensor, labels: torch.Tensor):
    t = text @ p["adapters.text.weight"].T + p["adapters.text.bias"]
    i = image @ p["adapters.image.weight"].T + p["adapters.image.bias"]
    fw = {k.removeprefix("fusion."): v for k, v in p.items() if k.startswith("fusion.")}
    ones = torch.ones(t.shape[0], 1, dtype=t.dtype)
    inputs = {"text": (t[:, None, :], ones), "image": (i[:, None, :], ones)}
    dims = {"text": LOOP["hidden"], "image": LOOP["hidden"]}
    fused = ff.gated_fusion(fw, dims, {}, inputs, ff.Checks())["fused"]
    ce = classify_loss(fused, p["heads.classify.weight"], p["heads.classify.bias"], labels)
    nce = infonce(t, i, p[LOGIT_SCALE_NAME])
    w = LOOP["objective_weights"]
    return w["classify"] * ce + w["objectives.text-image"] * nce


def run_loop(init: Tensors, data: Tensors, dtype: torch.dtype) -> dict[str, Any]:
    p = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in init.items()}
    decay = [v for v in p.values() if v.dim() == 2]
    no_decay = [v for v in p.values() if v.dim() != 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": LOOP["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LOOP["lr"],
        betas=tuple(LOOP["betas"]),
        eps=LOOP["eps"],
        foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    text, image = data["data.text"].to(dtype), data["data.image"].to(dtype)
    labels = data["data.labels"]
    losses, lrs, norms = [], [], []
    grad0: Tensors = {}
    bs = LOOP["batch"]
    for t in range(LOOP["steps"]):
        lo = (t % (LOOP["rows"] // bs)) * bs
        opt.zero_grad()
        loss = loop_loss(p, text[lo : lo + bs], image[lo : lo + bs], labels[lo : lo + bs])
        loss.backward()
        if t == 0:
            grad0 = {k: v.grad.detach().clone() for k, v in p.items()}
        norm = torch.nn.utils.clip_grad_norm_(list(p.values()), LOOP["clip_max_norm"])
        lrs.append(opt.param_groups[0]["lr"])
        assert abs(lrs[-1] - LOOP["lr"] * lr_factor(t)) < 1e-15
        opt.step()
        sched.step()
        losses.append(loss.detach())
        norms.append(float(norm))
    return {
        "losses": torch.stack(losses),
        "final": {k: v.detach() for k, v in p.items()},
        "grad0": grad0,
        "lrs": lrs,
        "grad_norms": norms,
    }


def make_loop(out: Path) -> dict:
    init = loop_init()
    data, data_info = loop_data()
    r64 = run_loop(init, data, torch.float64)
    r32 = run_loop(init, data, torch.float32)
    losses, losses32 = r64["losses"], r32["losses"]
    diff = float((losses - losses32.double()).abs().max())
    final_diff = max_diff(r64["final"], {k: v.double() for k, v in r32["final"].items()})
    assert float(losses[-5:].mean()) < 0.8 * float(losses[:5].mean()), losses.tolist()
    tensors: Tensors = {**data}
    tensors.update(f32(init, "init."))
    tensors.update(f32(r64["final"], "final."))
    tensors.update(f32(r64["grad0"], "grad0."))
    tensors["losses"] = losses
    tensors["losses32"] = losses32
    tensors["lrs"] = torch.tensor(r64["lrs"], dtype=torch.float64)
    tensors["grad_norms"] = torch.tensor(r64["grad_norms"], dtype=torch.float64)
    save(tensors, out / "loop.safetensors")
    params = [name for name, _, _ in LOOP_PARAMS] + [LOGIT_SCALE_NAME]
    return {
        "file": "loop.safetensors",
        **LOOP,
        "params": params,
        "param_shapes": {k: list(v.shape) for k, v in init.items()},
        "model": "t = adapters.text(data.text), i = adapters.image(data.image) (Linear, y = x "
        "W^T + b); fused = gated fusion over {text: t, image: i} (docs/fusion.md: g = "
        "sigmoid(fusion.gate(cat(t, i))), fused = g_text fusion.proj.text(t) + g_image "
        "fusion.proj.image(i)); logits = heads.classify(fused); loss = 1.0 "
        "cross_entropy(logits, labels) + 0.5 infonce(t, i, logit_scale) (infonce as the "
        "objective kind: normalised rows, scale exp(min(s, ln 100)), symmetric mean CE)",
        "init": "nn.Linear-style: every tensor of `params` but logit_scale, in that order, "
        "(torch.rand(shape, generator=g) * 2 - 1) / sqrt(fan_in) in float32, g = "
        "torch.Generator().manual_seed(init_seed), fan_in = the in-width of the layer (biases "
        "too); logit_scale = ln(1 / 0.07) (float32)",
        "data": "data.text [64, 24] then data.image [64, 20]: N(0,1) rounded to 1/32 from "
        "Generator(data_seed); data.labels = argmax over classes of cat(text, image) @ M^T, "
        "M [5, 44] = torch.randn from Generator(label_seed) (float32), in float64",
        "batches": "step t uses rows [(t % 4) * 16, (t % 4) * 16 + 16), no shuffle",
        "optimizer": "torch.optim.AdamW(lr, betas, eps, foreach=False), two parameter "
        "groups: weight_decay 0.01 for the rank-2 tensors (the .weight matrices), 0.0 for "
        "the others (biases, logit_scale); decoupled decay p -= lr_t * wd * p, then Adam "
        "with bias correction: p -= lr_t / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + "
        "eps), n = 1, 2, ... (the moments also update at step 0, where lr_t = 0)",
        "schedule": "LambdaLR: lr_t = lr * factor(t), factor(t) = t / 5 for t < 5, else 0.5 "
        "* (1 + cos(pi * (t - 5) / 45)); step t updates with lr_t (step 0 with 0), "
        "scheduler.step() after each optimiser step",
        "clip": "torch.nn.utils.clip_grad_norm_(all params, 1.0) before each step: total = "
        "sqrt(sum of every gradient element squared), grads *= min(1, 1.0 / (total + "
        "1e-6))",
        "tensors": "data.text, data.image (float32), data.labels (int64), init.<param> / "
        "final.<param> (float32; final from the float64 run), grad0.<param> (float32: "
        "gradient at step 0 before clipping, float64 run), losses (float64 [50]: loss at "
        "step t before update t, float64 run), losses32 (float32 [50]: the same loop run in "
        "float32 from the same initial values), lrs (float64 [50]: lr_t), grad_norms "
        "(float64 [50]: the total norm before clipping)",
        "label_stats": data_info,
        "max_abs_diff_losses_vs_losses32": diff,
        "max_abs_diff_final_float64_vs_float32_run": final_diff,
        "first_last_loss": [float(losses[0]), float(losses[-1])],
    }


# ---------------------------------------------------------------------------
# kind "interop"
# ---------------------------------------------------------------------------

INTEROP_DIMS = {"text": 24, "image": 20}
INTEROP_OUT = 16
INTEROP_CASES: list[dict[str, Any]] = [
    {"strategy": "late", "seed": 801, "options": {"mode": "weighted"}, "image": "pooled"},
    {"strategy": "attention", "seed": 802, "options": {"attention_dim": 8}, "image": "pooled"},
    {"strategy": "gated", "seed": 803, "options": {}, "image": "pooled"},
    {
        "strategy": "early",
        "seed": 804,
        "options": {"num_layers": 2, "num_heads": 2},
        "image": "tokens",
    },
    {
        "strategy": "middle",
        "seed": 805,
        "options": {"num_layers": 1, "num_heads": 2, "gate": "tanh"},
        "image": "tokens",
    },
]
INTEROP_TRAIN = {"steps": 5, "lr": 1e-2, "batch": 8, "optimizer": "torch.optim.Adam"}
TEXT_T, IMAGE_T = 5, 4


def interop_inputs(spec: dict, batch: int, gen: torch.Generator) -> dict[str, Any]:
    """text tokens [B, 5, 24] with a mask (real lengths cycle 5, 1, 3, 4), image pooled
    [B, 20] or tokens [B, 4, 20] without a mask."""
    text = ff.grid((batch, TEXT_T, 24), gen)
    lengths = [[5, 1, 3, 4][b % 4] for b in range(batch)]
    mask = (torch.arange(TEXT_T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float32)
    shape = (batch, 20) if spec["image"] == "pooled" else (batch, IMAGE_T, 20)
    return {"text": (text, mask), "image": ff.grid(shape, gen)}


def make_interop_case(spec: dict, out: Path) -> dict:
    mt = mlmf_torch()
    strategy = spec["strategy"]
    torch.manual_seed(spec["seed"])
    module = mt.Fusion(strategy, INTEROP_DIMS, INTEROP_OUT, **spec["options"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    train = interop_inputs(spec, INTEROP_TRAIN["batch"], gen)
    target = torch.randn((INTEROP_TRAIN["batch"], INTEROP_OUT), generator=gen)
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}
    opt = torch.optim.Adam(module.parameters(), lr=INTEROP_TRAIN["lr"], foreach=False)
    for _ in range(INTEROP_TRAIN["steps"]):
        opt.zero_grad()
        loss = ((module(train).fused - target) ** 2).mean()
        loss.backward()
        opt.step()
    moved = max_diff(init, module.state_dict())
    assert moved > 0.02, moved
    test = interop_inputs(spec, 3, torch.Generator().manual_seed(spec["seed"] + 2000))
    with torch.no_grad():
        r = module(test)
    cid = f"interop_{strategy}"
    weights = out / "interop" / f"{strategy}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    mt.save_mlmf(module, weights)
    weights.chmod(0o644)
    io: Tensors = {"input.text": test["text"][0], "mask.text": test["text"][1]}
    io["input.image"] = test["image"]
    io["fused"] = r.fused
    if r.gates is not None:
        io["gates"] = r.gates
    save(io, out / "interop" / f"{strategy}.io.safetensors")
    return {
        "id": cid,
        "kind": "interop",
        "file": f"interop/{strategy}.safetensors",
        "io_file": f"interop/{strategy}.io.safetensors",
        "strategy": strategy,
        "dims": [[m, d] for m, d in INTEROP_DIMS.items()],
        "out_dim": INTEROP_OUT,
        "options": dict(module.options),
        "inputs": {
            "text": {"form": "tokens", "tokens": TEXT_T, "mask": True},
            "image": {
                "form": spec["image"],
                "tokens": 1 if spec["image"] == "pooled" else IMAGE_T,
                "mask": False,
            },
        },
        "outputs": sorted(k for k in io if not k.startswith(("input.", "mask."))),
        "batch": 3,
        "train": {
            **INTEROP_TRAIN,
            "loss": "mean((fused - target)^2)",
            "init": "mlmf.torch defaults after torch.manual_seed(seeds.module)",
            "max_abs_weight_change": moved,
        },
        "seeds": {
            "module": spec["seed"],
            "train_data": spec["seed"] + 1000,
            "inputs": spec["seed"] + 2000,
        },
    }


# ---------------------------------------------------------------------------
# Area
# ---------------------------------------------------------------------------


def make_train(out: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on CPU, whatever the machine
    try:
        _make_train(out)
    finally:
        torch.set_num_threads(threads)


def _make_train(out: Path) -> None:
    import safetensors

    cases = [make_fusion_case(spec, out) for spec in [*ff.CASES, *ROW_CASES]]
    cases += [make_attention_case(cid, out) for cid in ATTENTION_ORDER]
    cases += [make_pair_case(spec, out) for spec in PAIR_CASES]
    cases += [make_objective_case(spec, out) for spec in OBJECTIVE_CASES]
    cases += [make_interop_case(spec, out) for spec in INTEROP_CASES]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), ids
    loop = make_loop(out)
    write_json(
        out / "manifest.json",
        {
            "schema": 1,
            "generator": "scripts/fixtures_train.py",
            "tolerance": TOLERANCE,
            "area": "train",
            "torch_version": torch.__version__,
            "safetensors_version": safetensors.__version__,
            "conventions": {
                "tolerance": "a float32 result passes when |got - want| <= abs + rel * |want| "
                "elementwise",
                "dtype": "float32 unless noted: references in float64 (torch autograd) on "
                "the float32 values, cast to float32; loss64, losses, lrs, grad_norms "
                "float64; labels int64; scalars (logit_scale, logit_bias, loss, loss64) 0-d",
                "gradient_check": "L = sum(output * grad_output), grad_output a seeded N(0,1) "
                "float32 tensor of the output's shape (Generator(seeds.grad_output)); "
                "grad.<name> = dL/d(weight <name>) for every learned tensor (zeros where it "
                "takes no part); grad_input.<name> = dL/d(input)",
                "masks": "float32 [B, T], 1 = real token; masked positions hold ordinary "
                "random values",
                "present_rows": "fusion cases with present_rows {m: [0/1 per row]} (tensor "
                "present.<m> [B] float32): row b is fused as if only the modalities present "
                "in row b had been passed (concatenations skip an absent modality, softmaxes "
                "and means run over the present ones, token sequences leave its tokens out, "
                "its gate is 0); an absent row's input.<m> holds random values that influence "
                "nothing (grad_input 0 there)",
                "key_selection": "top_k, sparsity_ratio and adaptive choose their keys (and "
                "adaptive its tau) from the detached logits: no gradient flows through tau "
                "or the choice, only through the kept logits; selection gaps > "
                f"{fa.MIN_TOPK_GAP}",
                "pair_scores": "S[i, j] = sum_t qm[i, t] cos(X[i, t], O_ij[t]) / max(1, "
                "sum_t qm[i, t]), O_ij = A(X_i, Y_j; query_mask_i, kv_mask_j) [Tq, dq] "
                "(masked query rows and rows without an allowed key: 0), cos(x, o) = x.o / "
                "(norm_eps(x) norm_eps(o)), norm_eps(v) = sqrt(sum v^2 + 1e-12)",
                "objectives": "normalize(x) = x / sqrt(sum(x^2, row) + 1e-12); infonce: "
                "logits = exp(min(s, ln 100)) a b^T, loss = (CE(logits, arange) + "
                "CE(logits^T, arange)) / 2 (mean CE); sigmoid: logits = exp(s) a b^T + bias, "
                "loss = sum(softplus(-(2 eye - 1) * logits)) / B; classify: mean CE(fused "
                "W^T + b, labels); regress: mean((fused W^T + b - targets)^2) over every "
                "element; weighted: sum of weight * term, the classifier reading u",
                "interop": "interop/<strategy>.safetensors holds the weights only (written "
                "by mlmf.torch.save_mlmf, for mlmf.Fusion(strategy, dims, out_dim, "
                "weights=..., **options)); interop/<strategy>.io.safetensors the inputs "
                "(input.text [3, 5, 24] with mask.text, input.image) and the torch module's "
                "float32 outputs (fused, gates)",
            },
            "cases": cases,
            "loop": loop,
        },
    )
