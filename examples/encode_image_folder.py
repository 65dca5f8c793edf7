"""Encode every image in a folder with a CLIP / SigLIP / ViT checkpoint and list each
image's nearest neighbour.

    python examples/encode_image_folder.py <checkpoint_dir> <image_folder> [--batch 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import mlmf

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise SystemExit(f"no images in {args.folder}")
    enc = mlmf.Encoder.from_pretrained(args.checkpoint, modality="image")
    print(enc)
    chunks = []
    for start in range(0, len(files), args.batch):
        batch = [str(p) for p in files[start : start + args.batch]]
        chunks.append(enc.encode(batch).pooled)
    emb = np.concatenate(chunks)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    for i, p in enumerate(files):
        j = int(np.argmax(sim[i])) if len(files) > 1 else i
        print(f"{p.name:40s} nearest: {files[j].name} ({sim[i, j]:.3f})")


if __name__ == "__main__":
    main()
