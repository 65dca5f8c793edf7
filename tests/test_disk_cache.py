"""The on-disk cache tier: entries survive a restart, are shared by processes, and a
process killed with SIGKILL in the middle of writing never leaves a corrupt entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mlmf

MODELS = Path(__file__).parent / "fixtures" / "encoders" / "models"
BATCH = 8


def config(path: Path) -> dict:
    return {
        "modalities": {"text": {"model": str(MODELS / "st_mean_norm")}},
        "fusion": {"strategy": "late"},
        "cache": {"disk": {"path": str(path)}},
    }


def load(cfg: dict) -> mlmf.MultiModalModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmf.MultiModalModel.load(cfg)


def batch_texts(i: int) -> list[str]:
    return [f"batch {i} sentence {j} about cats and dogs" for j in range(BATCH)]


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cache.redb"
    first = load(config(path))
    a = first.infer(text=batch_texts(0))
    assert first.stats()["disk"]["writes"] == BATCH
    del first
    second = load(config(path))
    b = second.infer(text=batch_texts(0))
    assert b.stats["modalities"]["text"]["disk_hits"] == BATCH
    assert b.stats["modalities"]["text"]["encoded"] == 0
    np.testing.assert_array_equal(a.embeddings["text"], b.embeddings["text"])
    assert second.check_disk_cache() == {"entries": BATCH, "corrupt": 0}
    second.clear_cache(disk=True)
    assert second.check_disk_cache() == {"entries": 0, "corrupt": 0}


def test_two_live_processes_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.redb"
    here = load(config(path))
    here.infer(text=batch_texts(1))
    code = textwrap.dedent(
        f"""
        import warnings, mlmf
        warnings.simplefilter("ignore")
        m = mlmf.MultiModalModel.load({config(path)!r})
        out = m.infer(text={batch_texts(1)!r})
        print(out.stats["modalities"]["text"]["disk_hits"])
        m.infer(text={batch_texts(2)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(BATCH)
    # What the other process wrote is read here, while this model is still open.
    out = here.infer(text=batch_texts(2))
    assert out.stats["modalities"]["text"]["disk_hits"] == BATCH


WRITER = """
import sys, warnings, mlmf
warnings.simplefilter("ignore")
m = mlmf.MultiModalModel.load({cfg!r})
start = int(sys.argv[1])
for i in range(start, start + 100000):
    m.infer(text=[f"batch {{i}} sentence {{j}} about cats and dogs" for j in range({batch})])
    print(i, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_while_writing_never_leaves_a_corrupt_entry(tmp_path: Path) -> None:
    path = tmp_path / "cache.redb"
    code = WRITER.format(cfg=config(path), batch=BATCH)
    rng = np.random.default_rng(0)
    next_batch = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(next_batch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        done = []
        deadline = time.monotonic() + 60
        while len(done) < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            done.append(int(line))
        assert len(done) == 5, proc.stderr.read() if proc.stderr else ""
        # Kill at a random moment inside the following writes.
        time.sleep(float(rng.uniform(0.0, 0.05)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        next_batch = done[-1] + 1000

    fresh = load(config(path))
    check = fresh.check_disk_cache()
    assert check is not None and check["corrupt"] == 0
    # Each batch is one transaction: all of its entries or none.
    assert check["entries"] > 0 and check["entries"] % BATCH == 0
    # The batches reported done are all there and equal a computation without cache.
    plain = load({**config(path), "cache": {"enabled": False}})
    for i in (0, 4):
        out = fresh.infer(text=batch_texts(i))
        assert out.stats["modalities"]["text"]["disk_hits"] == BATCH
        want = plain.infer(text=batch_texts(i)).embeddings["text"]
        np.testing.assert_array_equal(out.embeddings["text"], want)
    assert fresh.stats()["disk"]["corrupt"] == 0
