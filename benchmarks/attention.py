"""Cross-modal attention speed: mlmf.CrossModalAttention against PyTorch, side by side.

One attention layer, fp32, two threads for everyone, batch 8, 8 heads, width 512:
77 text tokens attending over 197 image tokens (a CLIP ViT-B/16 grid plus CLS), and
256 query tokens attending over 1500 audio frames (a Whisper encoder's 30 s output).
mlmf.CrossModalAttention and torch.nn.MultiheadAttention(batch_first=True) run with the
same weights: the torch module is built from a fixed seed (random biases added) and
its projections are saved to a safetensors file that mlmf loads. Each workload is
timed twice: output only (mlmf `return_weights=False`, torch `need_weights=False`) and
with the per-head weights returned (mlmf `return_weights=True`, torch
`need_weights=True, average_attn_weights=False`). Contenders alternate within one
process for several rounds; the table reports medians per call, torch_time /
mlmf_time, effective GFLOP/s and the largest difference between the outputs.

Usage (from the repository root, with torch and safetensors installed into the same
environment as mlmf)::

    python benchmarks/attention.py --out docs/benchmarks.md [--rounds 7] [--quick]

The script owns the section between `<!-- attention:begin -->` and
`<!-- attention:end -->` of the output file (created if missing). It writes no plot.
The harness (threads, timing, report) is harness.py.
"""

from __future__ import annotations

import functools
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import harness  # first: sets the thread variables before numpy or torch can start a pool
import numpy as np
import synthetic

TARGET = 1.0  # mlmf at least as fast as PyTorch eager
TORCH = "PyTorch eager"
SEED = synthetic.SEED
BATCH = 8
HEADS = 8
DIM = 512  # query width, key/value width and inner width (8 heads of 64)

# (key, label, query tokens, key/value tokens)
WORKLOADS = (
    ("text_image", "text 77 tok over image 197 tok", 77, 197),
    ("audio", "256 queries over audio 1500 frames", 256, 1500),
)


def gflop(tq: int, tk: int, batch: int = BATCH, dim: int = DIM, kv_dim: int = DIM) -> float:
    """GFLOP of one call (multiply-adds counted as two): the four projections and the
    two attention matmuls (q k^T and w v). Softmax, scaling and bias adds are left out."""
    inner = dim  # num_heads * head_dim
    q_proj = 2 * batch * tq * dim * inner
    kv_proj = 2 * (2 * batch * tk * kv_dim * inner)
    out_proj = 2 * batch * tq * inner * dim
    attention = 2 * (2 * batch * tq * tk * inner)  # summed over heads: H * hd = inner
    return (q_proj + kv_proj + out_proj + attention) / 1e9


def build_layers(path: Path) -> tuple[Any, Any]:
    """torch.nn.MultiheadAttention from SEED and the mlmf layer loading the same weights.

    MultiheadAttention initialises its biases to zero; they are filled with small seeded
    random values so that the comparison covers them too.
    """
    import torch
    from safetensors.torch import save_file

    import mlmf

    torch.manual_seed(SEED)
    mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    with torch.no_grad():
        torch.nn.init.uniform_(mha.in_proj_bias, -0.1, 0.1)
        torch.nn.init.uniform_(mha.out_proj.bias, -0.1, 0.1)
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    tensors = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        # Row blocks of in_proj_weight and in_proj_bias; cloned, since safetensors
        # refuses tensors that share storage.
        tensors[f"{name}.weight"] = w[i * DIM : (i + 1) * DIM].clone().contiguous()
        tensors[f"{name}.bias"] = b[i * DIM : (i + 1) * DIM].clone().contiguous()
    tensors["out_proj.weight"] = mha.out_proj.weight.detach().clone().contiguous()
    tensors["out_proj.bias"] = mha.out_proj.bias.detach().clone().contiguous()
    save_file(tensors, str(path))
    att = mlmf.CrossModalAttention(DIM, HEADS, DIM, weights=str(path))
    if att.untrained:
        raise RuntimeError("mlmf did not load the weights file")
    return mha, att


@dataclass
class Row(harness.Row):
    gflop: float = 0.0  # per call


class Attention(harness.Suite):
    """Builds the layers, the inputs and the rows."""

    name = "attention"
    groups = tuple(k for k, *_ in WORKLOADS)
    rounds_help = "timed rounds for every row (default: 9 output only, 7 with weights)"
    closing = {"spread_unit": "ms/call"}
    columns = (
        harness.WORKLOAD,
        harness.COMPETITOR,
        *harness.time_columns("ms/call", harness.fmt_ms),
        harness.RATIO,
        *harness.gflops_columns(lambda ln: ln.row.gflop),
        harness.met_column("Target (no slower than PyTorch eager)"),
        harness.diff_column("max abs diff (output / weights)"),
    )

    def rows_for(self, key: str, label: str, tq: int, tk: int, mha: Any, att: Any) -> list[Row]:
        import torch

        rng = np.random.default_rng(SEED + tq + tk)
        query = rng.standard_normal((BATCH, tq, DIM), dtype=np.float32)
        kv = rng.standard_normal((BATCH, tk, DIM), dtype=np.float32)
        # Shared memory with the numpy inputs; key and value are the same tensor, as in
        # cross-attention (torch then projects keys and values in one matmul).
        q_t, kv_t = torch.from_numpy(query), torch.from_numpy(kv)

        def torch_plain() -> Any:
            with torch.inference_mode():
                return mha(q_t, kv_t, kv_t, need_weights=False)[0]

        def torch_weights() -> Any:
            with torch.inference_mode():
                return mha(q_t, kv_t, kv_t, need_weights=True, average_attn_weights=False)

        def compare_weights(ours: Any, theirs: Any) -> str:
            return harness.abs_diffs((ours[0], theirs[0]), (ours[1], theirs[1]))

        rows = []
        for mode, mlmf_fn, torch_fn, compare, rounds in (
            (
                "output only",
                lambda: att(query, kv, return_weights=False),
                torch_plain,
                harness.max_abs_diff,
                9,
            ),
            (
                "+ per-head weights",
                lambda: att(query, kv, return_weights=True),
                torch_weights,
                compare_weights,
                7,
            ),
        ):
            row = Row(
                key=key,
                workload=f"{label}, batch {BATCH}, {mode}",
                rounds=self.rounds_for(rounds),
                mlmf=harness.Contender("mlmf", mlmf_fn),
                # The same module with one torch thread: on a busy two-core machine
                # torch's OpenMP pool can lose much of its time to a descheduled worker.
                competitors=harness.with_one_thread(
                    [harness.Contender(TORCH, torch_fn, target=TARGET)]
                ),
                compare=compare,
                gflop=gflop(tq, tk),
            )
            rows.append(row)
        return rows

    def build(self, only: Optional[list[str]]) -> list[Row]:
        try:
            mha, att = build_layers(self.dir / "cross_attention.safetensors")
        except Exception as exc:
            traceback.print_exc()
            self.notes.append(f"no rows: building the layers failed: {type(exc).__name__}: {exc}")
            return []
        builders = [
            (key, functools.partial(self.rows_for, key, label, tq, tk, mha, att))
            for key, label, tq, tk in WORKLOADS
        ]
        return self.build_rows(builders, only)

    # report --------------------------------------------------------------------

    def spread(self, row: Row) -> str:
        return harness.spread(row, harness.fmt_ms)

    def section(
        self, lines: list[harness.Line], rows: list[Any], env: dict[str, str], png: bool
    ) -> str:
        rounds = ", ".join(dict.fromkeys(f"{r.workload.split(', ')[-1]} {r.rounds}" for r in rows))
        min_time = self.args.min_time
        counts = ", ".join(f"{label} {gflop(tq, tk):.2f}" for _, label, tq, tk in WORKLOADS)
        method = [
            "Method: one attention layer in fp32 on the CPU, batch "
            f"{BATCH}, {HEADS} heads, query and key/value width {DIM} (head width "
            f"{DIM // HEADS}), no masks. `torch.nn.MultiheadAttention({DIM}, {HEADS}, "
            f"batch_first=True)` is built from seed {SEED}, its two biases filled with seeded "
            "uniform values in ±0.1 (it initialises them to zero), and its projections are "
            "saved to a safetensors file (`q_proj`/`k_proj`/`v_proj` from the row blocks of "
            "`in_proj_weight` and `in_proj_bias`, `out_proj` as is) that "
            f"`mlmf.CrossModalAttention({DIM}, {HEADS}, {DIM}, weights=...)` loads. Inputs: "
            "standard-normal queries and keys/values (numpy, fixed seeds); torch gets the "
            "same arrays via `torch.from_numpy`, with the key/value tensor passed as both key "
            "and value, and runs under `torch.inference_mode()`. *output only*: mlmf "
            "`return_weights=False` against torch `need_weights=False`; *+ per-head weights*: "
            "mlmf `return_weights=True` against torch `need_weights=True, "
            "average_attn_weights=False`, both returning `[B, H, Tq, Tk]` weights. Each "
            "contender is warmed up, then the contenders alternate for several rounds "
            f"({rounds}; order reversed every other round); each timed sample repeats the call "
            f"until it lasts at least {min_time:g} s. Figures are medians over the rounds, "
            "per call (the whole batch). Ratio = competitor time / mlmf time. Effective "
            "GFLOP/s = GFLOP per call / time per call, with the four projections and the two "
            "attention matmuls (q kᵀ, w v) counted, multiply-adds as two operations, softmax "
            f"left out (GFLOP per call: {counts}). *max abs diff* compares mlmf's output (and "
            "weights) with torch's.",
        ]
        notes = [  # the fixed notes, then the run's
            f"Target: mlmf no slower than PyTorch eager (ratio ≥ {TARGET:g}x) on every row.",
            "torch.nn.MultiheadAttention takes its fused fast path only for self-attention "
            "(query, key and value the same tensor); cross-attention goes through "
            "`F.multi_head_attention_forward`, which projects the query and the shared "
            "key/value tensor in two matmuls and then, with `need_weights=False`, calls "
            "`scaled_dot_product_attention`, and with `need_weights=True` materialises the "
            "weights with `baddbmm` + softmax + `bmm`. That is the eager path measured here.",
            harness.one_thread_note("module"),
            *self.notes,
        ]
        return harness.section_text(
            "Cross-modal attention",
            "attention.py",
            self.quick,
            method,
            env,
            self.table(lines),
            notes,
        )


if __name__ == "__main__":
    sys.exit(Attention.main())
