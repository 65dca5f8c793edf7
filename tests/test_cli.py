"""The `mlmf` command: --version, demo, preprocess."""

from __future__ import annotations

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


def test_demo_reports_every_modality(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for line in (
        "pixel_values    float32[8, 3, 224, 224]",
        "input_features  float32[1, 80, 3000]",
        "pixel_values    float32[1, 8, 3, 224, 224]",
        "input_ids       int64[4,",
        "All four modalities preprocessed.",
    ):
        assert line in out, out


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
