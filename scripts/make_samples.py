"""Generate the sample media bundled with the package (python/mlmf/data/).

Run with the reference environment (Pillow, soundfile, transformers):
    .venv-ref/bin/python scripts/make_samples.py
The outputs are committed; `mlmf demo` reads them. Everything is synthetic and
deterministic, so rerunning gives the same bytes (up to encoder versions).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "python" / "mlmf" / "data"


def scene(width: int, height: int, t: float = 0.0) -> Image.Image:
    """A small synthetic 'photo': sky gradient, sun, hills, a house."""
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    sky = np.stack(
        [70 + 120 * y + 0 * x, 130 + 90 * y + 0 * x, 230 - 40 * y + 0 * x], axis=-1
    ).clip(0, 255)
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    sx = int(width * (0.15 + 0.7 * t))
    r = height // 10
    d.ellipse([sx - r, height // 5 - r, sx + r, height // 5 + r], fill=(255, 214, 80))
    hills = [(0, height)]
    for i in range(0, width + 1, max(1, width // 32)):
        hills.append((i, int(height * (0.62 + 0.08 * np.sin(i / width * 7.0)))))
    hills.append((width, height))
    d.polygon(hills, fill=(60, 140, 70))
    hx, hy, hw = int(width * 0.6), int(height * 0.55), int(width * 0.16)
    d.rectangle([hx, hy, hx + hw, hy + hw * 3 // 4], fill=(180, 60, 50))
    d.polygon([(hx - 8, hy), (hx + hw // 2, hy - hw // 2), (hx + hw + 8, hy)], fill=(90, 50, 40))
    d.rectangle([hx + hw // 3, hy + hw // 3, hx + hw // 2, hy + hw * 3 // 4], fill=(60, 40, 30))
    return img


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    scene(640, 480).save(DATA / "sample.jpg", quality=88)
    frames = [scene(96, 72, t / 15) for t in range(16)]
    frames[0].save(
        DATA / "sample.gif", save_all=True, append_images=frames[1:], duration=80, loop=0
    )
    sr = 44100
    t = np.arange(int(sr * 3.0)) / sr
    chirp = np.sin(2 * np.pi * (220 * t + 300 * t**2))
    vowel = sum(np.sin(2 * np.pi * f * t) / (k + 1) for k, f in enumerate([150, 700, 1200, 2600]))
    env = np.minimum(1.0, t * 8) * np.minimum(1.0, (3.0 - t) * 8)
    left = 0.3 * env * chirp
    right = 0.2 * env * vowel / 2
    sf.write(
        DATA / "sample.flac",
        np.stack([left, right], axis=1).astype(np.float32),
        sr,
        subtype="PCM_16",
    )
    (DATA / "texts.txt").write_text(
        "A red house on a green hill under a blue sky.\n"
        "The sun moves slowly across the afternoon sky.\n"
        "A rising whistle and a low hum.\n"
        "Multimodal embeddings connect pictures, sounds and words.\n",
        encoding="utf-8",
    )
    from transformers import CLIPImageProcessor

    proc_dir = DATA / "clip_processor"
    proc_dir.mkdir(exist_ok=True)
    CLIPImageProcessor().to_json_file(proc_dir / "preprocessor_config.json")
    tok_src = ROOT / "tests" / "fixtures" / "text" / "clip_bpe"
    if tok_src.is_dir():
        dst = DATA / "tokenizer"
        dst.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok_src / name).exists():
                shutil.copy(tok_src / name, dst / name)
    print(
        json.dumps(
            {p.name: p.stat().st_size for p in sorted(DATA.rglob("*")) if p.is_file()}, indent=1
        )
    )


if __name__ == "__main__":
    main()
