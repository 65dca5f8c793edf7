"""Encoders on a GPU: mlmf against PyTorch eager, float32 and 16-bit, side by side.

The CLIP ViT-B/32 image tower, the Whisper-base encoder and a MiniLM-L6-H384-shaped
BERT (random weights, built with transformers into a temporary folder at start), at
batch 1, 32 and 256 (`--batches`). Each row runs mlmf and the transformers module in
one dtype (float32, and bfloat16 or float16 with `--half`) on the same inputs; both
return the pooled vector and the last hidden state to the host, so every call ends
with the device synchronised. The notes give each contender's peak GPU memory.

With `--device cpu` the same steps run on the CPU (smaller batches by default), so that
the script is known to work before it runs on a GPU machine. Usage::

    python benchmarks/gpu.py --device cuda --out docs/benchmarks.md [--quick]

It owns the `gpu` section of the output file. The harness is harness.py; the model
shapes and FLOP counts are benchmarks/encoders.py's.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import harness  # first: sets the thread variables before numpy or torch can start a pool
import numpy as np
import synthetic
from encoders import GFLOP, MINILM_SHAPE, SEED, WHISPER_BASE, compare

TORCH = "PyTorch eager"
GROUPS = ("clip", "whisper", "minilm")
DEFAULT_BATCHES = {"cuda": "1,32,256", "cpu": "1,4"}


@dataclass
class Row(harness.Row):
    gflop_per_item: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument(
        "--half",
        choices=("bfloat16", "float16"),
        default="bfloat16",
        help="the 16-bit dtype of the second row of each workload",
    )


class Gpu(harness.Suite):
    name = "gpu"
    groups = GROUPS
    add_args = staticmethod(_options)
    rounds_help = "timed rounds for every row (default 5)"
    min_times = (0.05, 0.3)
    columns = (
        harness.WORKLOAD,
        harness.COMPETITOR,
        *harness.time_columns("ms/item", harness.fmt_ms, per_item=True),
        ("items/s (mlmf)", "r", lambda ln: f"{1000 * ln.row.items / ln.mlmf_ms:,.0f}"),
        harness.RATIO,
        *harness.gflops_columns(lambda ln: ln.row.gflop_per_item, per_item=True),
        harness.met_column("Target (≥ 1x vs PyTorch eager in the same dtype)"),
        harness.diff_column("max abs diff (hidden / pooled)"),
    )
    closing = {"spread_unit": "ms/item", "stages": "building, timing"}

    def __init__(self, args: Any, workdir: Path) -> None:
        super().__init__(args, workdir)
        import torch

        self.device = args.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
        spec = args.batches or DEFAULT_BATCHES[self.device]
        self.batches = [int(b) for b in spec.split(",")]
        self.dtypes = ["float32", args.half]
        self.memory: list[str] = []

    # -------------------------------------------------------------------- memory

    def _peak(self, fn: Callable[[], Any]) -> str:
        """Peak GPU memory of `fn()` over what was in use before it (mlmf allocates
        outside torch, so the device's used memory is polled; torch's own peak is read
        from its allocator)."""
        if self.device != "cuda":
            return "n/a on the CPU"
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free0, _ = torch.cuda.mem_get_info()
        fn()
        torch.cuda.synchronize()
        free1, _ = torch.cuda.mem_get_info()
        device_used = max(0, free0 - free1)
        torch_peak = torch.cuda.max_memory_allocated()
        return f"{max(device_used, torch_peak) / 1e9:.2f} GB"

    # -------------------------------------------------------------------- rows

    def _rows(
        self,
        key: str,
        label: str,
        path: Path,
        modality: str,
        model: Any,
        inputs: Callable[[int], tuple[Any, tuple]],
    ) -> list[Row]:
        """mlmf and the torch module `model` (returning pooled, hidden) per dtype and
        batch; `inputs(b)` gives mlmf's input and the torch inputs of batch `b`."""
        import torch

        import mlmf

        rows = []
        dev = torch.device(self.device)
        for dtype in self.dtypes:
            tdt = getattr(torch, dtype)
            # A copy per dtype: the rows are timed after all of them are built.
            module = copy.deepcopy(model).to(dev, tdt).eval()
            enc = mlmf.Encoder.from_pretrained(
                path, modality=modality, device=self.device, dtype=dtype
            )
            for b in self.batches:
                x, tin = inputs(b)
                tin = tuple(t.to(dev, tdt) if t.is_floating_point() else t.to(dev) for t in tin)

                def run_torch(module: Any = module, tin: tuple = tin) -> tuple[Any, Any]:
                    with torch.inference_mode():
                        pooled, hidden = module(*tin)
                        return pooled.float().cpu(), hidden.float().cpu()

                def run_mlmf(enc: Any = enc, x: Any = x) -> Any:
                    return enc.encode(x)

                tag = f"[{dtype}] " if dtype != "float32" else ""
                mem_m, mem_t = self._peak(run_mlmf), self._peak(run_torch)
                self.memory.append(f"{tag}{label}, batch {b}: mlmf {mem_m}, {TORCH} {mem_t}")
                rows.append(
                    Row(
                        key=f"{key}_{dtype}_b{b}",
                        workload=f"{tag}{label}, batch {b}" + (", per item" if b > 1 else ""),
                        items=b,
                        rounds=self.rounds_for(5),
                        mlmf=harness.Contender(f"mlmf {dtype}", run_mlmf),
                        competitors=[harness.Contender(f"{TORCH} {dtype}", run_torch, target=1.0)],
                        compare=compare,
                        gflop_per_item=GFLOP[key],
                    )
                )
        return rows

    def clip(self) -> list[Row]:
        import torch

        path = self.dir / "clip_vit_b32"
        model = synthetic.build_clip_vit_b32(path)

        def inputs(b: int) -> tuple[Any, tuple]:
            rng = np.random.default_rng(SEED)
            px = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
            return px, (torch.from_numpy(px),)

        label = "CLIP ViT-B/32 image tower 224x224"
        return self._rows("clip", label, path, "image", synthetic.clip_image_tower(model), inputs)

    def whisper(self) -> list[Row]:
        import torch
        from transformers import WhisperConfig, WhisperModel

        path = self.dir / "whisper_base"
        model = synthetic.random_checkpoint(WhisperModel, WhisperConfig(**WHISPER_BASE), path)
        encoder = model.get_encoder()

        def inputs(b: int) -> tuple[Any, tuple]:
            rng = np.random.default_rng(SEED)
            feats = rng.standard_normal((b, 80, 3000)).astype(np.float32) * 0.5
            return feats, (torch.from_numpy(feats),)

        label = "Whisper-base encoder, 30 s"
        tower = synthetic.whisper_audio_tower(encoder)
        return self._rows("whisper", label, path, "audio", tower, inputs)

    def minilm(self) -> list[Row]:
        import torch
        from transformers import BertConfig, BertModel

        cfg = BertConfig(**MINILM_SHAPE)
        path = self.dir / "minilm_random"
        model = synthetic.random_checkpoint(BertModel, cfg, path)

        class Tower(torch.nn.Module):
            """BertModel: its pooler (mlmf's pooled for a BERT checkpoint) and states."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.m(input_ids=input_ids, attention_mask=attention_mask)
                return out.pooler_output, out.last_hidden_state

        def inputs(b: int) -> tuple[Any, tuple]:
            rng = np.random.default_rng(SEED)
            ids = rng.integers(1000, cfg.vocab_size, (b, 128), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = np.ones_like(ids)
            x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            return x, (torch.from_numpy(ids), torch.from_numpy(mask))

        label = "MiniLM-L6-H384 shape (random weights), 128 tokens"
        return self._rows("minilm", label, path, "text", Tower(), inputs)

    def build(self, only: Optional[list[str]]) -> list[Row]:
        builders = [(g, getattr(self, g)) for g in GROUPS]
        return self.build_rows(builders, only, progress=True)

    def lines_for(self, row: Row) -> list[harness.Line]:
        return harness.lines_for(row)

    def environment(self, load_at_start: str) -> dict[str, str]:
        env = harness.environment(load_at_start, ("torch", "transformers"))
        if self.device == "cuda":
            import torch

            env["GPU"] = torch.cuda.get_device_name(0)
            env["CUDA (torch)"] = str(torch.version.cuda)
        return env

    def section(
        self, lines: list[harness.Line], rows: list[Any], env: dict[str, str], png: bool
    ) -> str:
        where = "one GPU" if self.device == "cuda" else "the CPU (--device cpu: a dry run)"
        self.notes.append("Peak memory per call: " + "; ".join(self.memory) + ".")
        method = [
            f"Method: on {where}, random-initialised models built with transformers (seed "
            f"{SEED}) and saved as safetensors for mlmf; the same inputs (random pixels, "
            "log-mel features and token ids) for both contenders; PyTorch eager runs the "
            "transformers module under `torch.inference_mode()` in the row's dtype; both "
            "return the pooled vector and the last hidden state to the host (float32). "
            f"Batches {', '.join(map(str, self.batches))}; 16-bit rows in "
            f"{self.dtypes[1]}. Figures are medians over the rounds, per item; "
            "items/s is mlmf's. Ratio = PyTorch time / mlmf time."
        ]
        title = "GPU" if self.device == "cuda" else "GPU check, dry run on the CPU"
        return harness.section_text(
            title, "gpu.py", self.quick, method, env, self.table(lines), self.notes
        )


if __name__ == "__main__":
    sys.exit(Gpu.main())
