"""Synthetic inputs and random-initialised checkpoints shared by the benchmark scripts.

Photo-like images, speech-like audio and English-like sentences generated with numpy
from fixed seeds, and transformers checkpoints built from configs with seed SEED.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import harness  # noqa: F401  first: sets the thread variables before numpy starts a pool
import numpy as np

SEED = 0


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
    """`count` English-like sentences of 6 to 39 words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, int(rng.integers(6, 40))))
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + str(rng.choice([".", "?", "!", "..."])))
    return out


def save_pretrained(model: Any, path: Path) -> None:
    """``model.save_pretrained(path)`` as safetensors where the method has the switch."""
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {"safe_serialization": True} if "safe_serialization" in params else {}
    model.save_pretrained(str(path), **kwargs)


def random_checkpoint(model_cls: Any, config: Any, path: Path) -> Any:
    """`model_cls(config)` random-initialised from seed SEED, saved as a safetensors
    checkpoint into the folder `path`; returns the model in eval mode."""
    import torch

    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    save_pretrained(model, path)
    return model


def build_clip_vit_b32(path: Path) -> Any:
    """A random-initialised CLIP ViT-B/32 image tower,
    `CLIPVisionModelWithProjection(CLIPVisionConfig())` (see random_checkpoint)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return random_checkpoint(CLIPVisionModelWithProjection, CLIPVisionConfig(), path)


def clip_image_tower(model: Any) -> Any:
    """A torch module over a `CLIPVisionModelWithProjection` that returns what mlmf's
    `encode` does: (image_embeds, last_hidden_state)."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.m(pixel_values=pixel_values)
            return out.image_embeds, out.last_hidden_state

    return Tower().eval()


def whisper_audio_tower(encoder: Any) -> Any:
    """A torch module over a Whisper encoder that returns what mlmf's `encode` does: the
    mean of the last hidden state over the (all real) positions, and the state."""
    import torch

    class AudioTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = encoder

        def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.m(input_features).last_hidden_state
            return hidden.mean(dim=1), hidden

    return AudioTower().eval()
