"""Preprocess every image in a folder for a CLIP model and save the batch.

    python examples/preprocess_folder.py PHOTOS_DIR [--checkpoint CLIP_DIR] [-o pixels.npy]

Images are processed in batches of 64 on all cores; unreadable files are reported and
skipped instead of stopping the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import mlmf

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="directory with preprocessor_config.json")
    parser.add_argument("-o", "--output", type=Path, default=Path("pixels.npy"))
    args = parser.parse_args()

    ip = (
        mlmf.ImageProcessor.from_pretrained(args.checkpoint)
        if args.checkpoint
        else mlmf.ImageProcessor()
    )
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    batches = []
    for start in range(0, len(files), 64):
        chunk = files[start : start + 64]
        try:
            batches.append(ip(chunk))
        except mlmf.InputError as e:
            # Find the bad file(s), keep the rest.
            print(f"skipping in batch {start // 64}: {e}")
            for path in chunk:
                try:
                    batches.append(ip([path]))
                except mlmf.InputError as err:
                    print(f"  {path.name}: {err}")
    pixels = np.concatenate(batches) if batches else np.zeros((0, 3, 224, 224), np.float32)
    np.save(args.output, pixels)
    print(f"{len(pixels)} images -> {args.output} {pixels.shape} {pixels.dtype}")


if __name__ == "__main__":
    main()
