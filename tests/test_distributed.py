"""mlmf.distributed on a Ray cluster simulated on this machine (ray.cluster_utils):
placement by node labels, equality with the local model, misconfiguration, and a
node killed while requests are in flight."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import mlmf  # noqa: E402
from mlmf.distributed import DistributedModel  # noqa: E402
from mlmf.distributed.local import (  # noqa: E402
    FAST_HEALTH_CHECKS,
    node_args,
    simulated_cluster,
)

MODELS = Path(__file__).parent / "fixtures" / "encoders" / "models"
DATA = Path(mlmf.__file__).parent / "data"
NODE = node_args()


def start_cluster(modalities=("text", "image", "audio")) -> tuple[Any, dict]:
    # Audio is placed by a custom resource (the fallback), the others by label.
    specs = [
        {"resources": {"audio-node": 1}} if m == "audio" else {"labels": {"modality": m}}
        for m in modalities
    ]
    cluster, added = simulated_cluster(specs, system_config=FAST_HEALTH_CHECKS)
    return cluster, dict(zip(modalities, added))


def config(**distributed) -> dict:
    return {
        "modalities": {
            "text": {"model": str(MODELS / "st_mean_norm")},
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
        },
        "fusion": {"strategy": "attention", "attention_dim": 8, "out_dim": 16},
        "cross_modal_attention": {"num_heads": 2, "pairs": ["text->image"]},
        "distributed": {
            "sharding": {
                "strategy": "modality_specific",
                "modality_assignments": {
                    "text": ["modality=text"],
                    "image": ["modality=image"],
                    "audio": ["audio-node"],
                },
            },
            "start_timeout_s": 30,
            **distributed,
        },
    }


def local(cfg: dict) -> mlmf.MultiModalModel:
    plain = {k: v for k, v in cfg.items() if k != "distributed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmf.MultiModalModel.load(plain)


@pytest.fixture(scope="module")
def cluster():
    c, nodes = start_cluster()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


TEXTS = ["a red house on a hill", "a rising whistle"]
IMAGES = [str(DATA / "sample.jpg"), np.full((40, 30, 3), 90, np.uint8)]
AUDIO = [str(DATA / "sample.flac"), np.sin(np.arange(8000, dtype=np.float32) / 9)]


def test_replicas_run_on_their_nodes_and_match_the_local_model(cluster) -> None:
    _, nodes = cluster
    cfg = config()
    model = DistributedModel.load(cfg)
    for m, node in nodes.items():
        assert model.node_ids[m] == [node.node_id], m
        # CPU replicas run as many encoder threads as they have CPUs.
        assert model.encoders[m]["threads"] == "1", m
    got = model.infer(
        text=TEXTS, image=IMAGES, audio=AUDIO, sampling_rate=16000, return_attention=True
    )
    want = local(cfg).infer(
        text=TEXTS, image=IMAGES, audio=AUDIO, sampling_rate=16000, return_attention=True
    )
    for m in ("text", "image", "audio"):
        np.testing.assert_array_equal(got.embeddings[m], want.embeddings[m])
        np.testing.assert_array_equal(got.gates[m], want.gates[m])
    np.testing.assert_array_equal(got.fused, want.fused)
    np.testing.assert_array_equal(got.attention["text->image"], want.attention["text->image"])
    # A second call is served by the replicas' caches.
    again = model.infer(text=TEXTS, image=IMAGES)
    assert again.stats["modalities"]["image"]["hits"] == 2
    model.shutdown()


def test_many_requests_come_back_in_order_with_backpressure(cluster) -> None:
    cfg = config()
    cfg["distributed"]["sharding"]["modality_assignments"]["text"] = {
        "selectors": ["modality=text"],
        "replicas": 2,
        "num_cpus": 0.5,
        "max_in_flight": 1,
    }
    cfg["distributed"]["sharding"]["modality_assignments"]["image"] = {
        "selectors": ["modality=image"],
        "num_cpus": 1,
        "memory": "256 MiB",
    }
    model = DistributedModel.load(cfg)
    reqs = [
        {"text": [f"sentence {i}"], "image": [np.full((20, 20, 3), i, np.uint8)]} for i in range(30)
    ]
    outs = model.infer_batch(reqs)
    ref = local(cfg)
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o.fused, ref.infer(**r).fused)
    assert model.peak_in_flight["text"] <= 1
    counts = [s["calls"] for s in model.stats()["text"]]
    assert len(counts) == 2 and all(c > 0 for c in counts), counts  # both replicas worked
    model.shutdown()


def test_replicated_strategy_places_every_modality_anywhere(cluster) -> None:
    cfg = config()
    cfg["distributed"] = {"sharding": {"strategy": "replicated", "replicas": 1}}
    model = DistributedModel.load(cfg)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert all(ids[0] in alive for ids in model.node_ids.values())
    got = model.infer(text=TEXTS, image=IMAGES)
    np.testing.assert_array_equal(got.fused, local(cfg).infer(text=TEXTS, image=IMAGES).fused)
    model.shutdown()


def test_misconfiguration_fails_fast(cluster) -> None:
    cfg = config()
    cfg["distributed"]["sharding"]["modality_assignments"]["image"] = ["modality=gpu"]
    t0 = time.monotonic()
    with pytest.raises(mlmf.DistributedError, match="image: no alive node matches"):
        DistributedModel.load(cfg)
    assert time.monotonic() - t0 < 10
    cfg = config()
    del cfg["distributed"]["sharding"]["modality_assignments"]["audio"]
    with pytest.raises(mlmf.ConfigError, match="audio"):
        DistributedModel.load(cfg)
    model = DistributedModel.load(config())
    with pytest.raises(mlmf.InputError, match="no video modality"):
        model.infer(video=[str(DATA / "sample.gif")])
    # A worker's error arrives as the mlmf error it was.
    with pytest.raises(mlmf.DecodeError):
        model.infer(image=[b"not an image"])
    model.shutdown()


def test_ray_data_batch_job_writes_parquet_and_resumes(cluster, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from mlmf.distributed.batch import read_output, run_batch

    cfg = config()
    del cfg["modalities"]["audio"]
    del cfg["distributed"]["sharding"]["modality_assignments"]["audio"]
    images = [
        str(DATA / "sample.jpg"),
        str(Path(__file__).parent / "fixtures" / "image" / "inputs" / "rgb_640x480.png"),
    ]
    rows = [
        {"id": f"row-{i}", "text": f"row number {i}", **({"image": images[i % 2]} if i % 5 else {})}
        for i in range(500)
    ]
    out = tmp_path / "embeddings"
    # An interrupted run: two files written, and a half-written one left behind.
    first = run_batch(cfg, rows, out, chunk_rows=100, max_chunks=2)
    assert first == {"rows": 500, "skipped": 0, "written": 200}
    (out / ".part-000009.parquet.tmp-1").write_bytes(b"PAR1 truncated")
    again = run_batch(cfg, rows, out, chunk_rows=100)
    assert again == {"rows": 500, "skipped": 200, "written": 300}
    assert run_batch(cfg, rows, out)["written"] == 0
    got = read_output(out)
    assert sorted(got["id"]) == sorted(r["id"] for r in rows)
    assert got["fused"].shape == (500, 16)
    ref = local(cfg)
    by_id = {r["id"]: r for r in rows}
    for i in range(0, 500, 23):
        r = by_id[got["id"][i]]
        want = ref.infer(text=[r["text"]], image=[r["image"]] if "image" in r else None)
        np.testing.assert_allclose(got["fused"][i], want.fused[0], atol=1e-5)
        assert np.isnan(got["emb_image"][i]).all() == ("image" not in r)
    with pytest.raises(mlmf.InputError, match="id"):
        run_batch(cfg, [{"text": "no id"}], tmp_path / "x")


def test_a_killed_node_loses_no_request() -> None:
    if ray.is_initialized():
        ray.shutdown()
    cluster, nodes = start_cluster(("text", "image"))
    try:
        cfg = config()
        del cfg["modalities"]["audio"]
        del cfg["distributed"]["sharding"]["modality_assignments"]["audio"]
        cfg["distributed"]["max_retries"] = 5
        model = DistributedModel.load(cfg)
        rng = np.random.default_rng(0)
        reqs = [
            {
                "text": [f"request {i}"],
                "image": [rng.integers(0, 255, (160, 120, 3), dtype=np.uint8)],
            }
            for i in range(200)
        ]
        killed = threading.Event()

        def kill_at(done: int) -> None:
            if done >= 40 and not killed.is_set():
                killed.set()
                cluster.remove_node(nodes["image"], allow_graceful=False)
                cluster.add_node(**NODE, labels={"modality": "image"})

        outs = model.infer_batch(reqs, progress=kill_at, timeout=240)
        assert killed.is_set()
        assert len(outs) == 200
        ref = local(cfg)
        for r, o in zip(reqs, outs):
            want = ref.infer(**r)
            np.testing.assert_array_equal(o.embeddings["image"], want.embeddings["image"])
            np.testing.assert_array_equal(o.fused, want.fused)
        # The image replica restarted on the replacement node.
        new = model.refresh_nodes()["image"]
        assert new != [nodes["image"].node_id]
        assert new[0] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_gpu_replicas_ask_for_gpus_and_run_on_cuda_when_built_with_it(monkeypatch) -> None:
    # Placement and device choice only (this machine has no GPU to start an actor on).
    from mlmf.distributed.model import worker_config
    from mlmf.distributed.placement import plans

    cfg = config()
    cfg["distributed"]["sharding"]["modality_assignments"]["image"] = {
        "selectors": ["gpu-node"],
        "num_gpus": 0.5,
        "replicas": 2,
    }
    nodes = [
        {"Alive": True, "NodeID": "a" * 8, "Labels": {"modality": "text"}, "Resources": {}},
        {"Alive": True, "NodeID": "b" * 8, "Labels": {}, "Resources": {"gpu-node": 1, "GPU": 1}},
        {"Alive": True, "NodeID": "c" * 8, "Labels": {}, "Resources": {"audio-node": 1}},
    ]

    class FakeRay:
        @staticmethod
        def nodes():
            return nodes

    dict_cfg = mlmf.MultiModalConfig.from_dict(cfg).to_dict()
    image = next(p for p in plans(dict_cfg, FakeRay) if p.modality == "image")
    assert image.num_gpus == 0.5 and image.replicas == 2
    assert image.placements == [{"resources": {"gpu-node": 0.01}}] * 2
    monkeypatch.setattr(mlmf, "CUDA_COMPILED", True)
    assert worker_config(dict_cfg, image)["device"] == "cuda"
    text = next(p for p in plans(dict_cfg, FakeRay) if p.modality == "text")
    assert worker_config(dict_cfg, text)["device"] == "cpu"
    monkeypatch.setattr(mlmf, "CUDA_COMPILED", False)
    assert worker_config(dict_cfg, image)["device"] == "cpu"
