"""examples/ray_cluster.py runs end to end on a cluster it simulates on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_cluster.py"


def test_ray_cluster_example_on_a_simulated_cluster() -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=EXAMPLE.parent.parent,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert "simulated cluster: head + text, image and audio nodes" in out, out
    assert "DistributedModel(audio x1, image x2, text x1; fusion='attention')" in out, out
    # Each modality's replicas on the node its selector names.
    assert re.search(r"text   replica 0 on node \w{8} \(modality=text\)", out), out
    for i in (0, 1):
        assert re.search(rf"image  replica {i} on node \w{{8}} \(modality=image\)", out), out
    assert re.search(r"audio  replica 0 on node \w{8} \(audio-node\)", out), out
    assert "embeddings: {'text': (2, 24), 'image': (2, 24), 'audio': (2, 32)}" in out, out
    assert "fused: (2, 64)" in out, out
    # The fused rows and embeddings equal the local model's.
    assert "max abs diff from the local model: 0\n" in out, out
    assert "infer_batch: 150/150 request parts done" in out, out
    assert re.search(r"\n50 requests in [\d.]+ s \(\d+ requests/s\)", out), out
    # Per-replica statistics: every request part counted once, both image replicas used.
    calls = {
        (m, int(i)): int(n)
        for m, i, n in re.findall(r"  (\w+) +replica (\d): \d+ calls, (\d+) items", out)
    }
    assert calls[("text", 0)] == 52 and calls[("audio", 0)] == 52, out
    assert calls[("image", 0)] + calls[("image", 1)] == 52, out
    assert calls[("image", 0)] > 0 and calls[("image", 1)] > 0, out
    assert "replicas shut down" in out, out
