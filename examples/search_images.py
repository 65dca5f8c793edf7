"""Search a folder of images by text with a CLIP checkpoint, the embeddings cached.

    python examples/search_images.py [FOLDER] [--model CLIP_DIR] [--query TEXT ...]
                                     [--top 3] [--batch 16]

The folder is embedded in batches through mlmf.MultiModalModel, each query is embedded
with the same checkpoint's text tower, and the images are ranked by cosine similarity.
The folder is then embedded a second time: every image is served from the model's
cache, not decoded or encoded again.

Without FOLDER a few generated images (solid colours and gradients) are written to a
temporary folder. Without --model the bundled tiny CLIP is used; it is untrained
(random weights), so its rankings are arbitrary: give a real CLIP / SigLIP folder
(e.g. clip-vit-base-patch32) for meaningful ones.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

import mlmf

BUNDLED_CLIP = Path(mlmf.__file__).resolve().parent / "data" / "models" / "clip_tiny"
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] array as a PNG: Pillow when installed, else zlib."""
    try:
        from PIL import Image

        Image.fromarray(rgb, "RGB").save(path)
    except ImportError:
        write_png_stdlib(path, rgb)


def write_png_stdlib(path: Path, rgb: np.ndarray) -> None:
    """A minimal PNG encoder: 8-bit RGB, no interlacing, filter 0 on every row."""
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def demo_images(folder: Path, size: int = 64) -> None:
    """Solid colours and gradients, named after what they show."""
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    solid = {
        "red": (220, 30, 30),
        "green": (30, 180, 60),
        "blue": (30, 60, 220),
        "yellow": (240, 220, 40),
        "white": (255, 255, 255),
        "black": (0, 0, 0),
    }
    images = {n: np.broadcast_to(np.array(c, np.uint8), (size, size, 3)) for n, c in solid.items()}
    gray = np.broadcast_to(ramp[None, :, None], (size, size, 3))
    images["gray-gradient"] = gray
    # Red at the top fading to blue at the bottom.
    t = ramp[:, None].astype(np.float32) / 255
    sunset = np.stack([255 * (1 - t), np.zeros_like(t), 255 * t], axis=-1)
    images["red-to-blue-gradient"] = np.broadcast_to(sunset, (size, size, 3)).astype(np.uint8)
    for name, rgb in images.items():
        write_png(folder / f"{name}.png", np.ascontiguousarray(rgb))


def load_model(clip_dir: Path) -> mlmf.MultiModalModel:
    # Queries longer than the text tower's positions are truncated to them.
    text: dict = {"model": str(clip_dir)}
    config = {
        # One checkpoint for both: its image and text embeddings share one space.
        "modalities": {"text": text, "image": {"model": str(clip_dir)}},
        # Search only uses the per-modality embeddings, but a model has a fusion.
        "fusion": {"strategy": "late", "mode": "mean"},
        "cache": {"enabled": True, "max_memory": "512 MiB"},
    }
    with warnings.catch_warnings():
        # The fusion layer is seeded, not trained, and says so; search does not use it.
        warnings.filterwarnings("ignore", message="MultiModalModel: the `late` fusion")
        return mlmf.MultiModalModel.load(config)


def progress(batches: list, label: str):
    """tqdm when installed, else one line per batch (printed by the caller)."""
    try:
        from tqdm import tqdm

        return tqdm(batches, desc=label, unit="batch"), False
    except ImportError:
        return batches, True


def embed(model: mlmf.MultiModalModel, files: list[Path], batch: int, label: str):
    """L2-normalised image embeddings [N, D], cache hits, encoded count, seconds."""
    batches = [[str(p) for p in files[i : i + batch]] for i in range(0, len(files), batch)]
    chunks, hits, encoded = [], 0, 0
    t0 = time.perf_counter()
    it, verbose = progress(batches, label)
    for i, paths in enumerate(it):
        out = model.infer(image=paths)
        s = out.stats["modalities"]["image"]
        hits, encoded = hits + s["hits"], encoded + s["encoded"]
        chunks.append(out.embeddings["image"])
        if verbose:
            print(
                f"  {label} batch {i + 1}/{len(batches)}: {len(paths)} images, "
                f"{s['encoded']} encoded, {s['hits']} from the cache, "
                f"{out.stats['total_ms']:.1f} ms"
            )
    seconds = time.perf_counter() - t0
    emb = np.concatenate(chunks)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb, hits, encoded, seconds


def search(args: argparse.Namespace, folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise SystemExit(f"no images in {folder}")
    model = load_model(args.model)
    print(f"{model}: {args.model}")
    if args.model == BUNDLED_CLIP:
        print("NOTE: the bundled tiny CLIP is untrained: the rankings below are arbitrary.")

    print(f"\nembedding {len(files)} images from {folder}")
    images, _, _, first_s = embed(model, files, args.batch, "first pass")
    print(f"first pass: {len(files)} images in {first_s * 1e3:.1f} ms")

    for q in args.query:
        v = model.infer(text=[q]).embeddings["text"][0]
        v = v / max(float(np.linalg.norm(v)), 1e-12)
        scores = images @ v
        print(f"\nquery {q!r}:")
        for rank, j in enumerate(np.argsort(-scores, kind="stable")[: args.top], start=1):
            print(f"  {rank}. {files[j].name:30s} {scores[j]:+.3f}")

    print()
    again, hits, encoded, second_s = embed(model, files, args.batch, "second pass")
    print(
        f"second pass: {len(files)} images in {second_s * 1e3:.1f} ms "
        f"({first_s / max(second_s, 1e-9):.0f}x faster), {hits}/{len(files)} from the cache, "
        f"{encoded} encoded; identical embeddings: {np.array_equal(images, again)}"
    )
    c = model.stats()["modalities"]["image"]["cache"]
    print(
        f"image cache: {c['entries']} entries, {c['bytes'] / 1024:.1f} KiB, "
        f"{c['hits']} hits, {c['misses']} misses"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", type=Path, nargs="?", help="images to search (default: generated demo images)"
    )
    parser.add_argument(
        "--model", type=Path, default=BUNDLED_CLIP, help="CLIP / SigLIP checkpoint folder"
    )
    parser.add_argument(
        "--query", action="append", help="text to search for (repeatable; default: two queries)"
    )
    parser.add_argument("--top", type=int, default=3, help="results per query")
    parser.add_argument("--batch", type=int, default=16, help="images per model call")
    args = parser.parse_args()
    args.query = args.query or ["a red square", "a smooth gradient"]
    if args.top < 1 or args.batch < 1:
        parser.error("--top and --batch must be at least 1")

    try:
        if args.folder is not None:
            search(args, args.folder)
            return
        with tempfile.TemporaryDirectory(prefix="mlmf-search-") as tmp:
            demo_images(Path(tmp))
            search(args, Path(tmp))
    except mlmf.MlmfError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
