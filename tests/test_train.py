"""mlmf.Trainer and `mlmf train` / `mlmf eval`: learning on data with known answers,
outputs that load as a trained model, determinism, resume after kill -9, the encoders
running once, typed errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mlmf

CLIP_TINY = Path(mlmf.__file__).resolve().parent / "data" / "models" / "clip_tiny"
K = 4  # classes


def synthetic(n: int, seed: int = 0) -> dict:
    """Rows whose answers are known: a latent z per row (a class centre plus noise);
    text tokens hold z (token 0) among noise tokens, image tokens hold z at a random
    patch among noise patches (different linear views); label = the class, target =
    z[0]."""
    rng = np.random.default_rng(seed)
    maps = np.random.default_rng(1234)
    centres = maps.normal(size=(K, 8))
    at, ai = maps.normal(size=(8, 12)), maps.normal(size=(8, 10))
    c = rng.integers(0, K, n)
    z = centres[c] + 0.7 * rng.normal(size=(n, 8))
    text = (0.5 * rng.normal(size=(n, 4, 12))).astype(np.float32)
    image = (0.5 * rng.normal(size=(n, 6, 10))).astype(np.float32)
    text[:, 0] = z @ at
    image[np.arange(n), rng.integers(0, 6, n)] = z @ ai
    return {"text": text, "image": image, "label": c, "target": z[:, :1].astype(np.float32)}


def split(d: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in d.items()}


CONFIG = {
    "modalities": {"text": {"dim": 12}, "image": {"dim": 10}},
    "fusion": {"strategy": "attention", "out_dim": 16},
    "cross_modal_attention": {"num_heads": 2, "pairs": ["text->image"]},
}

OBJECTIVES = [
    mlmf.Contrastive("text", "image"),
    mlmf.Contrastive("text->image"),
    mlmf.Classify(num_classes=K),
    mlmf.Regress(dim=1),
]


def trainer(**kw) -> mlmf.Trainer:
    objectives = kw.pop("objectives", OBJECTIVES)
    settings = {"epochs": 12, "batch_size": 32, "lr": 3e-3, "progress": False}
    settings.update(kw)
    config = dict(CONFIG)
    if not any(isinstance(o, mlmf.Contrastive) and o.is_pair for o in objectives):
        config.pop("cross_modal_attention")
    return mlmf.Trainer(config, objectives=objectives, **settings)


@pytest.fixture(scope="module")
def data():
    d = synthetic(400)
    return split(d, 0, 300), split(d, 300, 400)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    train, val = data
    t = trainer()
    before = t.evaluate(val)
    out = tmp_path_factory.mktemp("run")
    history = t.fit(train, val=val, out=out)
    return t, before, history, out


def test_every_objective_learns_beyond_chance(trained, data):
    t, before, history, _ = trained
    after = t.evaluate(data[1])
    n = len(data[1]["label"])
    # Untrained: retrieval near chance (1/n), accuracy near 1/K.
    assert before["text->image R@1"] <= 3 / n and before["accuracy"] < 0.45
    assert after["text->image R@1"] >= 10 / n and after["image->text R@1"] >= 10 / n
    assert after["attention text->image R@1"] >= 5 / n
    assert after["text->image R@10"] > 0.5
    assert after["accuracy"] > 0.8 and after["macro_f1"] > 0.75
    assert after["mse"] < 0.5 * before["mse"]
    assert after["loss"] < 0.5 * before["loss"]
    # The history is per epoch, with validation metrics, and the loss went down.
    assert len(history) == 12 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"loss", "accuracy", "mean R@1"} <= set(history[-1]["val"])


def test_the_output_folder_is_a_trained_model(trained, data):
    t, _, history, out = trained
    for name in (
        "mlmf.toml",
        "fusion.safetensors",
        "adapters.safetensors",
        "heads.safetensors",
        "attention/text-image.safetensors",
        "history.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "history.json").read_text()) == history
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained model warns about nothing
        model = mlmf.MultiModalModel.load(out)
    assert not model.untrained
    val = data[1]
    res = model.infer(embeddings={"text": (val["text"], None), "image": val["image"]})
    # Retrieval with the model's own projected vectors is what evaluate measured.
    a = res.projected["text"] / np.linalg.norm(res.projected["text"], axis=1, keepdims=True)
    b = res.projected["image"] / np.linalg.norm(res.projected["image"], axis=1, keepdims=True)
    sim = a @ b.T
    r1 = float(np.mean(np.argmax(sim, axis=1) == np.arange(len(sim))))
    assert abs(r1 - t.evaluate(val)["text->image R@1"]) < 1e-9
    # Fusion weights depend on the item once trained.
    assert res.gates["text"].std() > 1e-3
    # A trainer built from the folder has the trained heads: same metrics.
    again = mlmf.Trainer(out, progress=False).evaluate(val)
    assert again["accuracy"] == pytest.approx(t.evaluate(val)["accuracy"])


def test_same_seed_same_bits_and_a_resume_after_a_stop_ends_the_same(data, tmp_path):
    train, val = data
    a, b = tmp_path / "a", tmp_path / "b"
    trainer(epochs=4, modality_dropout=0.3, checkpoint_every=3).fit(train, val=val, out=a)
    t = trainer(epochs=4, modality_dropout=0.3, checkpoint_every=3)

    def stop(e):  # in epoch 2, as Ctrl-C would
        if e["event"] == "step" and e["step"] == 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t.fit(train, val=val, out=b, callback=stop)
    assert (b / "checkpoint" / "state.json").is_file()
    resumed = trainer(epochs=4, modality_dropout=0.3, checkpoint_every=3)
    history = resumed.fit(train, val=val, out=b, resume=True)
    assert len(history) == 4
    for name in (
        "fusion.safetensors",
        "adapters.safetensors",
        "heads.safetensors",
        "attention/text-image.safetensors",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_second_run_into_the_same_folder_is_refused(data, tmp_path):
    train, _ = data
    trainer(epochs=1).fit(train, out=tmp_path)
    with pytest.raises(mlmf.TrainError, match="already holds a run"):
        trainer(epochs=1).fit(train, out=tmp_path)


def test_curriculum_stages_early_stopping_and_custom_fusion(data, tmp_path):
    train, val = data
    t = trainer(
        stages=[
            {"name": "text only", "modalities": ["text"], "steps": 5},
            {"modalities": ["text", "image"], "steps": 20},
        ],
        objectives=[mlmf.Classify(num_classes=K)],
        early_stopping="accuracy",
        patience=1,
    )
    seen: list = []
    history = t.fit(train, val=val, out=tmp_path / "s", callback=seen.append)
    stages = [e.get("stage") for e in seen if e["event"] == "step"]
    assert stages[:5] == ["text only"] * 5 and stages[5] == "stage 1"
    # The folder holds the best epoch's weights, whatever came after.
    best = max(h["val"]["accuracy"] for h in history)
    assert [h["best"] for h in history].count(True) >= 1
    assert mlmf.Trainer(tmp_path / "s", progress=False).evaluate(val)["accuracy"] == best
    assert t.evaluate(val)["accuracy"] == best
    mlmf.register_fusion("sum_for_test", lambda x: x["text"])
    cfg = dict(CONFIG, fusion={"strategy": "custom", "name": "sum_for_test", "out_dim": 12})
    with pytest.raises(mlmf.ConfigError, match="custom fusion"):
        mlmf.Trainer(cfg, objectives=[mlmf.Classify(num_classes=2)], progress=False)


def test_bad_data_is_a_typed_error_naming_the_row_or_field(data, tmp_path):
    train, _ = data
    t = trainer(objectives=[mlmf.Classify(num_classes=K)])
    bad = dict(train, label=np.where(np.arange(len(train["label"])) == 7, 9, train["label"]))
    with pytest.raises(
        mlmf.DataError, match=r"row 7 field `label`: 9 is out of range: expected 0\.\.4"
    ):
        t.fit(bad, out=tmp_path / "a")
    with pytest.raises(mlmf.DataError, match=r"text.*15 wide, expected 12"):
        t.fit(dict(train, text=np.zeros((300, 4, 15), np.float32)), out=tmp_path / "b")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": 0}\n{"text": "b", "smell": "x", "label": 1}\n')
    with pytest.raises(mlmf.DataError, match=r"rows.jsonl row 1 field `smell`"):
        t.fit(rows, out=tmp_path / "c")
    rows.write_text("")
    with pytest.raises(mlmf.DataError, match="no rows"):
        t.fit(rows, out=tmp_path / "d")
    rows.write_text('{"text": "a", "label": "cat"}\n')
    with pytest.raises(mlmf.DataError, match=r"row 0 field `label`: expected an integer"):
        t.fit(rows, out=tmp_path / "e")
    with pytest.raises(mlmf.ConfigError, match="not one of the model's attention pairs"):
        trainer(objectives=[mlmf.Contrastive("image->text")])
    with pytest.raises(mlmf.ConfigError, match="name two sides"):
        mlmf.Contrastive("text")


def test_a_nan_loss_stops_with_a_typed_error_and_keeps_the_last_checkpoint(data, tmp_path):
    train, _ = data
    t = trainer(
        objectives=[mlmf.Regress(dim=1)],
        lr=1e30,
        warmup=0,
        schedule="constant",
        clip_grad_norm=None,
        checkpoint_every=1,
        epochs=3,
    )
    with pytest.raises(mlmf.TrainError, match=r"(loss|gradient).*(nan|NaN|inf).*checkpoint"):
        t.fit(train, out=tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 1


def _rows(path: Path, n: int) -> Path:
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = f"{words[i % 8]} {words[(i // 8) % 8]} {i}"
            f.write(json.dumps({"id": f"r{i}", "text": text, "label": i % 2}) + "\n")
    return path


def _text_config(tmp_path: Path, epochs: int) -> Path:
    cfg = tmp_path / "mlmf.toml"
    cfg.write_text(
        f'[modalities.text]\nmodel = "{CLIP_TINY}"\n[fusion]\nstrategy = "late"\nout_dim = 8\n'
        f"[train]\nepochs = {epochs}\nbatch_size = 4\nlr = 0.01\ncheckpoint_every = 2\n"
        'objectives = [{ type = "classify", num_classes = 2 }]\n'
    )
    return cfg


def test_encoders_run_once_however_many_epochs(tmp_path):
    rows = _rows(tmp_path / "rows.jsonl", 24)
    t = mlmf.Trainer(_text_config(tmp_path, 5), progress=False)
    t.fit(rows, val=rows, out=tmp_path / "run")
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 5
    # 24 distinct texts, each encoded once for 5 epochs and 5 validations.
    text = t.base_model.stats()["modalities"]["text"]
    assert text["encoded"] == 24
    t.evaluate(rows)
    assert t.base_model.stats()["modalities"]["text"]["encoded"] == 24
    assert not t.model.untrained


def _mlmf(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlmf.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_cli_train_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    rows = _rows(tmp_path / "rows.jsonl", 40)
    cfg = _text_config(tmp_path, 300)
    straight = _mlmf("train", str(cfg), "--data", str(rows), "--out", str(tmp_path / "a"), "-q")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    run = _mlmf("train", str(cfg), "--data", str(rows), "--out", str(tmp_path / "b"), "-q")
    state = tmp_path / "b" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            break
        time.sleep(0.01)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    killed_at = json.loads(state.read_text())
    assert killed_at["epoch"] < 300
    resumed = _mlmf(
        "train", str(cfg), "--data", str(rows), "--out", str(tmp_path / "b"), "--resume", "-q"
    )
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    for name in ("fusion.safetensors", "heads.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert len(history) == 300


def test_cli_eval_prints_the_metrics(tmp_path, capsys):
    from mlmf import cli

    rows = _rows(tmp_path / "rows.jsonl", 16)
    assert (
        cli.main(
            [
                "train",
                str(_text_config(tmp_path, 2)),
                "--data",
                str(rows),
                "--out",
                str(tmp_path / "run"),
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(rows), "--json", "-q"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"loss", "accuracy", "macro_f1"} <= set(metrics)
    assert (
        cli.main(
            [
                "train",
                str(tmp_path / "mlmf.toml"),
                "--data",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "-q",
            ]
        )
        == 1
    )
    assert "no such file" in capsys.readouterr().err


def test_training_on_the_parquet_that_run_batch_writes(data, tmp_path):
    pytest.importorskip("pyarrow")
    from mlmf.distributed.batch import _write_chunk

    train, _ = data
    n = len(train["label"])
    ids = [f"r{i}" for i in range(n)]
    pooled = {m: train[m].mean(axis=1) for m in ("text", "image")}
    out = tmp_path / "embeddings"
    out.mkdir()
    half = n // 2
    for k, (a, b) in enumerate(((0, half), (half, n))):
        _write_chunk(
            out, k, {"id": np.array(ids[a:b]), **{f"emb_{m}": v[a:b] for m, v in pooled.items()}}
        )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"id": i, "text": "unused", "label": int(lab)}) + "\n"
            for i, lab in zip(ids, train["label"])
        )
    )
    arrays = mlmf.train.load_embeddings(out, rows=rows)
    assert arrays["text"].shape == (n, 12) and len(arrays["label"]) == n
    t = mlmf.Trainer(
        {
            "modalities": {"text": {"dim": 12}, "image": {"dim": 10}},
            "fusion": {"strategy": "gated"},
        },
        objectives=[mlmf.Classify(num_classes=K)],
        epochs=8,
        batch_size=32,
        lr=3e-3,
        progress=False,
    )
    t.fit(arrays, out=tmp_path / "run")
    assert t.evaluate(arrays)["accuracy"] > 0.6


def test_the_same_weights_whatever_the_thread_count(tmp_path):
    code = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "import mlmf\n"
        "from test_train import synthetic, CONFIG, OBJECTIVES\n"
        "mlmf.Trainer(dict(CONFIG), objectives=OBJECTIVES, epochs=2, batch_size=32,\n"
        "             modality_dropout=0.3, progress=False).fit(synthetic(200), out={out!r})\n"
    )
    tests = str(Path(__file__).resolve().parent)
    for threads in ("1", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        env.pop("CANDLE_NUM_THREADS", None)
        src = code.format(tests=tests, out=str(tmp_path / threads))
        done = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for name in ("fusion.safetensors", "adapters.safetensors", "attention/text-image.safetensors"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "3" / name).read_bytes()
