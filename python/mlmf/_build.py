"""What this build of mlmf has, in words (printed by ``mlmf demo`` and ``mlmf inspect``)."""

from __future__ import annotations


def jpeg_decoder() -> str:
    """The JPEG decoder of this build: libjpeg-turbo (Pillow's, identical pixels) with
    or without its SIMD code, or the pure-Rust zune-jpeg fallback."""
    from mlmf._mlmf import JPEG_DECODER, JPEG_SIMD

    if JPEG_DECODER == "libjpeg-turbo":
        simd = "SIMD" if JPEG_SIMD else "no SIMD: NASM was missing at build time, slower"
        return f"libjpeg-turbo ({simd}; pixels identical to Pillow)"
    return f"{JPEG_DECODER} (pure Rust fallback: within a few levels of Pillow's pixels)"
