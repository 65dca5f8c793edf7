"""Synthesise the spoken captions of the shapes dataset (python/mlmf/data/shapes/speech/).

Each of the 24 captions of `mlmf.shapes` ("red circle", ..., "orange cross") is spoken by
espeak-ng in a few voices, then sox trims the leading and trailing silence, resamples to
16 kHz mono, normalises the peak, pads 50 ms of silence at both ends, reduces the
precision (TPDF dither) so that FLAC stores few bits a sample, and writes 16-bit FLAC:

    {colour}_{shape}_{voice}.flac

Needs espeak-ng and sox on the PATH (Debian: apt-get install espeak-ng sox) and numpy
(for mlmf/shapes.py, loaded from its file so the compiled extension is not needed):

    .venv/bin/python scripts/make_demo_speech.py

The outputs are committed; rerunning with the same tool versions gives the same bytes
(sox runs in repeatable mode). The README next to the files records how they were made.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SHAPES_PY = ROOT / "python" / "mlmf" / "shapes.py"
OUT = ROOT / "python" / "mlmf" / "data" / "shapes" / "speech"

#: espeak-ng arguments of each voice, in voice-index order.
VOICES: tuple[tuple[str, ...], ...] = (
    ("-v", "en-us", "-s", "150"),  # American English, male, medium speed
    ("-v", "en-gb", "-s", "175"),  # British English, male, faster
    ("-v", "en-us+f3", "-s", "130"),  # American English, female variant, slower
)

SAMPLE_RATE = 16000
BITS = 10  # precision kept after dithering (stored in 16-bit FLAC: the low bits are free)
PEAK_DB = -1.0  # peak level after normalising
PAD_S = 0.05  # silence kept at each end
# sox `silence`: trim until 10 ms above 0.1% of full scale, at the start and (reversed) end.
TRIM = ["silence", "1", "0.01", "0.1%", "reverse", "silence", "1", "0.01", "0.1%", "reverse"]


def load_shapes() -> ModuleType:
    """mlmf/shapes.py as a module, without importing the mlmf package."""
    spec = importlib.util.spec_from_file_location("mlmf_shapes", SHAPES_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def synthesise(text: str, voice: tuple[str, ...], out: Path, tmp: Path) -> None:
    wav = tmp / "espeak.wav"
    subprocess.run(["espeak-ng", *voice, "-w", str(wav), text], check=True)
    effects = [*TRIM, "rate", "-v", str(SAMPLE_RATE), "norm", str(PEAK_DB)]
    effects += ["pad", str(PAD_S), str(PAD_S), "dither", "-a", "-p", str(BITS)]
    cmd = ["sox", "-R", "-D", str(wav), "-c", "1", "-b", "16", "-C", "8", str(out), *effects]
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument("--voices", type=int, default=len(VOICES), help="how many voices")
    args = parser.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install espeak-ng sox")
    shapes = load_shapes()
    voices = VOICES[: args.voices]
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, text in enumerate(shapes.CLASSES):
            colour, shape = text.split(" ")
            assert shapes.class_index(colour, shape) == label
            for v, voice in enumerate(voices):
                path = shapes.speech_path(args.out, colour, shape, v)
                synthesise(text, voice, path, Path(tmp))
                total += path.stat().st_size
    print(f"{len(shapes.CLASSES) * len(voices)} files, {total} bytes in {args.out}")
    print(tool_version(["espeak-ng", "--version"]))
    print(tool_version(["sox", "--version"]))


if __name__ == "__main__":
    main()
