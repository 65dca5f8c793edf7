"""The ``mlmf`` command line.

``mlmf --version``
    print the version.
``mlmf demo``
    a multimodal model with trained fusion, adapters and text->image attention on
    generated scenes (text, image, audio, video): embeddings, fusion weights, held-out
    retrieval and attention against the untrained model, a heatmap PNG, timings, and a
    second call served from the cache.
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
``mlmf serve mlmf.toml [--port 8080] [--api-key KEY] [--allow-path DIR]``
    an HTTP server over the model: OpenAI-compatible ``/v1/embeddings``, ``/v1/infer``,
    ``/v1/similarity``, ``/v1/zero-shot``, ``/health``, ``/ready``, ``/metrics``, with
    dynamic batching; SIGTERM or Ctrl-C drains it (docs/serving.md).
``mlmf bench``
    time the demo model: uncached and cached calls, per-modality stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import mlmf
from mlmf._build import jpeg_decoder
from mlmf._progress import Progress

DATA = Path(__file__).resolve().parent / "data"
MODELS = DATA / "models"


def _demo_text_dir() -> Path:
    from mlmf import demo as _demo

    return _demo.text_model()[0]


def _describe(a: np.ndarray) -> str:
    rng = f", range [{a.min():.3f}, {a.max():.3f}]" if a.size and a.dtype.kind == "f" else ""
    return f"{a.dtype}{list(a.shape)}{rng}"


def demo(args: argparse.Namespace) -> int:
    from mlmf import demo as _demo

    return _demo.run(Path(args.heatmap))


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
        proc = mlmf.TextProcessor.from_pretrained(args.model or _demo_text_dir())
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


#: Tensors that make a dual encoder's towers comparable: the projection heads and the
#: learned logit scale (and SigLIP's bias), as CLIPModel / SiglipModel store them.
ALIGNED_HEADS = (
    "logit_scale",
    "logit_bias",
    "logit_scale_t",
    "logit_scale_a",
    "text_projection.weight",
    "visual_projection.weight",
    "prompts_generator.alpha",
)


def _safetensors_names(file: Path) -> list[str]:
    """Tensor names in a safetensors file's header (empty when it cannot be read)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2**20:
                return []
            return [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    except (OSError, ValueError):
        return []


def _aligned_heads(path: Path, weights: list[str]) -> list[str]:
    """Which of ALIGNED_HEADS the checkpoint's safetensors hold."""
    names = {n for w in weights for n in _safetensors_names(path / w)}
    return [h for h in ALIGNED_HEADS if h in names]


def _checkpoint_summary(path: Path, dtype: str = "float32") -> dict:
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
    info["jpeg_decoder"] = jpeg_decoder()
    info["aligned_heads"] = _aligned_heads(path, weights)
    # What MultiModalModel.similarity / zero_shot do with them (docs/aligned.md).
    family = info.get("model_type") or ""
    probabilities = {
        "clip": "softmax",
        "siglip": "sigmoid",
        "siglip2": "sigmoid",
        "clap": "softmax",
        "xclip": "softmax",
    }.get(family)
    other = {"clap": "audio", "xclip": "video"}.get(family, "image")
    has_scale = any(h.startswith("logit_scale") for h in info["aligned_heads"])
    info["similarity"] = (
        {"towers": ["text", other], "probabilities": probabilities}
        if probabilities and has_scale
        else None
    )
    encoders = {}
    for modality in (None, *MODALITIES[:3]):
        try:
            enc = mlmf.Encoder.from_pretrained(path, modality=modality, dtype=dtype)
        except mlmf.MlmfError as e:
            if modality is None:
                info["error"] = str(e)
            continue
        encoders[enc.modality] = {
            "model_type": enc.model_type,
            "hidden_size": enc.hidden_size,
            "output_dim": enc.output_dim,
            "dtype": enc.dtype,
            "weight_bytes": enc.weight_bytes,
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
        naflex = name.lower().startswith("siglip2") or "max_num_patches" in kind
        if "image" in encoders and naflex:
            # Variable resolution: each image keeps its aspect ratio, cut into patches.
            cfg = mlmf.PatchImageProcessor.from_pretrained(path).config
            processors["image"] = {
                "processor": "PatchImageProcessor",
                "reference": name,
                "patch_size": cfg["patch_size"],
                "max_num_patches": cfg["max_num_patches"],
                **cfg["image"],
            }
        elif "image" in encoders:
            processors["image"] = {
                "processor": "ImageProcessor",
                "reference": name,
                **mlmf.ImageProcessor.from_pretrained(path).config,
            }
        if "video" in encoders:
            # A native video model (VideoMAE, X-CLIP): its clip length is the sampler's
            # default.
            frames = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if family == "xclip":
                num_frames = frames.get("vision_config", {}).get("num_frames", 8)
            else:
                num_frames = frames.get("num_frames", 16)
            processors["video"] = {
                "processor": "VideoProcessor",
                "reference": name,
                "num_frames": num_frames,
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


def quantize(args: argparse.Namespace) -> int:
    """Writes a pre-quantised int8 copy of a checkpoint folder."""
    report = mlmf.quantize(args.src, args.dst)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    n = len(report["quantized"])
    before, after = report["bytes_before"] / 2**20, report["bytes_after"] / 2**20
    print(f"{report['path']}: {n} linear weights in int8, {before:.1f} MiB -> {after:.1f} MiB")
    print(f'  load it with dtype="int8": mlmf inspect {report["path"]} --dtype int8')
    return 0


def inspect(args: argparse.Namespace) -> int:
    info = _checkpoint_summary(Path(args.path), args.dtype)
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
            f"embedding width {e['output_dim']}, "
            f"{e['weight_bytes'] / 2**20:.1f} MiB of weights in {e['dtype']}"
        )
    for m, p in info["processors"].items():
        extra = {k: v for k, v in p.items() if k not in ("processor",)}
        shown = ", ".join(f"{k}={v}" for k, v in list(extra.items())[:8])
        print(f"  processor      {m}: {p['processor']} ({shown})")
    heads = info["aligned_heads"]
    if any(h.startswith("logit_") for h in heads):
        print(f"  aligned heads  {', '.join(heads)} (the towers' vectors are comparable)")
    sim = info["similarity"]
    if sim:
        print(
            f"  similarity     {' and '.join(sim['towers'])}, zero-shot by "
            f"{sim['probabilities']}: mlmf zero-shot --model {info['path']} "
            f"--{sim['towers'][1]} FILE --labels a,b"
        )
    else:
        print("  aligned heads  none (no logit_scale: the towers are not trained together)")
    if "image" in info["processors"] or "video" in info["processors"]:
        print(f"  jpeg decoder   {info['jpeg_decoder']}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Timings of the demo model on this machine: uncached and cached calls (no
    competitor here: `make bench` runs the side-by-side comparisons)."""
    from mlmf import demo as _demo

    model, _, _ = _demo.load()
    inputs = _demo.inputs(_demo.sample())
    cold = []
    for _ in range(args.rounds):
        model.clear_cache()
        t0 = time.perf_counter()
        model.infer(**inputs)
        cold.append(time.perf_counter() - t0)
    model.infer(**inputs)
    n = args.iterations
    t0 = time.perf_counter()
    for _ in range(n):
        model.infer(**inputs)
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


def _aligned_model(args: argparse.Namespace, other: str) -> mlmf.MultiModalModel:
    """The model of --config, or one made for the aligned checkpoint --model."""
    if bool(args.config) == bool(args.model):
        raise mlmf.ConfigError(
            "give exactly one of --config (a model config) or --model (a folder)"
        )
    if args.config:
        return mlmf.MultiModalModel.load(args.config)
    return mlmf.MultiModalModel.load(
        {
            "modalities": {"text": {"model": args.model}, other: {"model": args.model}},
            "fusion": {"strategy": "late", "mode": "similarity"},
        }
    )


def zero_shot(args: argparse.Namespace) -> int:
    given = [(m, getattr(args, m)) for m in ("image", "audio", "video") if getattr(args, m)]
    if len(given) != 1:
        raise mlmf.InputError(
            "zero-shot classifies the inputs of one modality: give --image, --audio or --video "
            "(repeat it for several inputs)"
        )
    other, inputs = given[0]
    labels = [x.strip() for group in args.labels for x in group.split(",") if x.strip()]
    model = _aligned_model(args, other)
    # MultiModalModel.zero_shot's own defaults, spelled out so they can be printed.
    template = (
        args.template
        or {
            "image": "a photo of a {}.",
            "audio": "the sound of a {}.",
            "video": "a video of a {}.",
        }[other]
    )
    result = model.zero_shot(**{other: inputs}, labels=labels, template=template)
    probs = result.probs
    top = min(args.top, len(labels)) if args.top else len(labels)
    rows = []
    for i, src in enumerate(inputs):
        order = np.argsort(-probs[i], kind="stable")[:top]
        rows.append(
            {
                "input": src,
                "best": result.best[i],
                "labels": [labels[j] for j in order],
                "probs": [float(probs[i, j]) for j in order],
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "family": result.family,
                    "probabilities": result.probabilities,
                    "template": template,
                    "results": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"zero-shot with a {result.family} checkpoint ({result.probabilities} over "
        f"{len(labels)} labels, template {template!r})"
    )
    for r in rows:
        print(f"{r['input']}: {r['best']}")
        for label, p in zip(r["labels"], r["probs"]):
            print(f"  {p:7.4f}  {label}")
    return 0


def _serve_ray(args: argparse.Namespace, name: str, api_key: str | None) -> int:
    from mlmf.serving.ray import serve_ray, wait_and_delete

    autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    url = serve_ray(
        args.config,
        host=args.host,
        port=args.port or 8000,
        address=args.ray_address,
        block=False,
        max_batch_size=args.max_batch_items,
        batch_wait_timeout_s=args.max_wait_ms / 1000,
        autoscaling=autoscaling,
        model_name=name,
        api_key=api_key,
    )
    print(f"mlmf: serving {name} on Ray Serve at {url}", flush=True)
    wait_and_delete()
    print("mlmf: stopped", flush=True)
    return 0


def serve(args: argparse.Namespace) -> int:
    from mlmf.serving import API_KEY_ENV, wait_until_stopped
    from mlmf.serving import serve as start

    name = args.model_name or Path(args.config).stem
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.ray:
        return _serve_ray(args, name, api_key)
    model = mlmf.MultiModalModel.load(args.config)
    server = start(
        model,
        host=args.host,
        port=args.port,
        api_key=api_key,
        allow_path=args.allow_path or (),
        max_body_mb=args.max_body_mb,
        max_concurrent_requests=args.max_concurrent,
        request_timeout=args.timeout,
        batching=not args.no_batching,
        max_batch_items=args.max_batch_items,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        drain_timeout=args.drain_timeout,
        model_name=name,
        http_threads=args.http_threads,
        block=False,
        handle_signals=True,
    )
    modalities = ", ".join(m.name for m in model.modalities)
    print(f"mlmf: serving {name} ({modalities}) on {server.url}", flush=True)
    wait_until_stopped(server)
    print("mlmf: stopped", flush=True)
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    d = mlmf.serving.serve.__kwdefaults__ or {}
    p = sub.add_parser("serve", help="an HTTP server over a model (OpenAI-compatible embeddings)")
    p.add_argument("config", help="mlmf.toml / .yaml / .json")
    p.add_argument("--host", default=d["host"], help="address to bind (default: %(default)s)")
    p.add_argument(
        "--port", type=int, default=d["port"], help="0 picks a free port (default: %(default)s)"
    )
    p.add_argument("--api-key", help="bearer token requests must carry (default: $MLMF_API_KEY)")
    p.add_argument(
        "--allow-path",
        action="append",
        metavar="DIR",
        help="a directory whose files requests may name by path (repeatable; default: none)",
    )
    # (flag, type, mlmf.serve keyword, help); each default is mlmf.serve's.
    numbers = [
        ("--max-body-mb", float, "max_body_mb", "largest request body"),
        ("--max-concurrent", int, "max_concurrent_requests", "requests in flight before 429"),
        ("--timeout", float, "request_timeout", "seconds per request"),
        ("--max-batch-items", int, "max_batch_items", "largest encoder batch"),
        ("--max-batch-tokens", int, "max_batch_tokens", "largest text batch, in tokens"),
        ("--max-wait-ms", float, "max_wait_ms", "how long a batch waits for more items"),
        ("--drain-timeout", float, "drain_timeout", "seconds SIGTERM waits for requests"),
        ("--http-threads", int, "http_threads", "threads for HTTP and JSON"),
    ]
    for flag, kind, key, text in numbers:
        p.add_argument(flag, type=kind, default=d[key], help=f"{text} (default: %(default)s)")
    p.add_argument("--no-batching", action="store_true", help="encode each request on its own")
    p.add_argument(
        "--model-name", help="the name /v1/models lists (default: the config's file name)"
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: a deployment per modality placed by the config's "
        "modality_assignments, and an ingress that fuses (port 8000 unless --port)",
    )
    p.add_argument("--ray-address", help="with --ray: the cluster to join (default: auto)")
    p.add_argument(
        "--autoscaling",
        help="with --ray: Serve's autoscaling_config for every modality, as JSON, e.g. "
        '\'{"min_replicas": 1, "max_replicas": 4}\'',
    )
    p.set_defaults(func=serve)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlmf", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"mlmf {mlmf.__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="a trained multimodal model on generated scenes")
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
    p = sub.add_parser(
        "quantize",
        help="write a copy of a checkpoint with int8 linear weights (loads with no "
        "quantisation work)",
    )
    p.add_argument("src", help="checkpoint folder (float32, bfloat16 or float16 safetensors)")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=quantize)
    p = sub.add_parser("inspect", help="what a checkpoint folder is and how mlmf loads it")
    p.add_argument("path", help="checkpoint folder (config.json, *.safetensors, ...)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--dtype",
        default="float32",
        help="load the encoders in this precision to report their weight memory "
        "(float32, bfloat16, float16, int8)",
    )
    p.set_defaults(func=inspect)
    p = sub.add_parser(
        "zero-shot", help="classify images among text labels with an aligned checkpoint"
    )
    p.add_argument("--config", help="a model config whose text and image load one checkpoint")
    p.add_argument(
        "--model", help="an aligned checkpoint folder (CLIP, SigLIP) instead of --config"
    )
    for m in ("image", "audio", "video"):
        p.add_argument(f"--{m}", action="append", help=f"a {m} input (repeat for several)")
    p.add_argument(
        "--labels",
        action="append",
        required=True,
        help="comma-separated labels (repeatable), e.g. cat,dog",
    )
    p.add_argument(
        "--template",
        default=None,
        help='prompt each label is put into (default: "a photo of a {}." for images, '
        '"the sound of a {}." for audio, "a video of a {}." for video)',
    )
    p.add_argument("--top", type=int, default=5, help="labels shown per input (0: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=zero_shot)
    _serve_parser(sub)
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
