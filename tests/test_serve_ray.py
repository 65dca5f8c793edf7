"""The HTTP API on Ray Serve (mlmf.serving.ray) over a simulated cluster of labelled
nodes: deployments placed by the config's modality_assignments, answers equal to the
local model's, and errors in the same JSON as `mlmf serve`."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import requests

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import mlmf  # noqa: E402
from mlmf.distributed.local import simulated_cluster  # noqa: E402
from serving import IMAGES, MODELS, TEXTS, arr, b64, error_of, load, start_cli  # noqa: E402

TOL = 1e-6


def config() -> dict:
    clip = str(MODELS / "clip_tiny")
    return {
        "modalities": {"text": {"model": clip}, "image": {"model": clip}},
        "fusion": {"strategy": "gated", "out_dim": 16},
        "distributed": {
            "sharding": {
                "strategy": "modality_specific",
                "modality_assignments": {
                    "text": {"selectors": ["modality=text"]},
                    "image": {"selectors": ["image-node"]},
                },
            }
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app() -> Any:
    from mlmf.serving.ray import serve_ray

    cluster, nodes = simulated_cluster(
        [{"labels": {"modality": "text"}}, {"resources": {"image-node": 1}}]
    )
    try:
        url = serve_ray(
            config(), port=free_port(), block=False, model_name="clip", max_batch_size=8
        )
        yield url, nodes
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_deployments_run_on_their_nodes(app):
    _, (text_node, image_node) = app
    for m, node in (("text", text_node), ("image", image_node)):
        h = serve.get_deployment_handle(f"mlmf-{m}", app_name="mlmf")
        assert h.info.remote().result()["node_id"] == node.node_id


def test_infer_and_embeddings_equal_the_local_model(app):
    url, _ = app
    local = load({k: v for k, v in config().items() if k != "distributed"})
    images = [str(p) for p in IMAGES]
    want = local.infer(text=TEXTS, image=images, return_tokens=True)
    r = requests.post(
        url + "/v1/infer",
        json={"text": TEXTS, "image": [b64(p) for p in IMAGES], "return_tokens": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    j = r.json()
    np.testing.assert_allclose(arr(j["fused"]), want.fused, rtol=0, atol=TOL)
    for m in ("text", "image"):
        np.testing.assert_allclose(arr(j["embeddings"][m]), want.embeddings[m], rtol=0, atol=TOL)
        np.testing.assert_allclose(arr(j["gates"][m]), want.gates[m], rtol=0, atol=TOL)
        np.testing.assert_allclose(
            arr(j["tokens"][m]["hidden_states"]), want.tokens[m]["hidden_states"], rtol=0, atol=TOL
        )
    r = requests.post(url + "/v1/embeddings", json={"model": "clip", "input": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got, want.embeddings["text"], rtol=0, atol=TOL)
    assert r.json()["usage"]["prompt_tokens"] == sum(local.count_tokens(TEXTS))


def test_similarity_and_zero_shot_equal_the_local_model(app):
    url, _ = app
    local = load({k: v for k, v in config().items() if k != "distributed"})
    images = [str(p) for p in IMAGES]
    s = local.similarity(TEXTS, image=images)
    r = requests.post(
        url + "/v1/similarity", json={"text": TEXTS, "image": [b64(p) for p in IMAGES]}, timeout=60
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        arr(r.json()["logits_per_text"]), s.logits_per_text, rtol=0, atol=1e-5
    )
    z = local.zero_shot(image=images, labels=["cat", "lake"])
    r = requests.post(
        url + "/v1/zero-shot",
        json={"image": [b64(p) for p in IMAGES], "labels": ["cat", "lake"]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(arr(r.json()["probs"]), z.probs, rtol=0, atol=1e-5)
    assert r.json()["best"] == z.best


def test_errors_are_json_and_name_the_item(app):
    url, _ = app
    corrupt = b64(IMAGES[0])[:200]
    cases = [
        ("/v1/infer", "{", 400, "invalid JSON"),
        (
            "/v1/infer",
            {"text": ["a"], "image": [b64(IMAGES[0]), corrupt]},
            400,
            "every modality carries one item per row",
        ),
        ("/v1/infer", {"image": [b64(IMAGES[0]), corrupt]}, 400, "image input 1"),
        ("/v1/infer", {"audio": ["aGk="]}, 400, "no audio modality"),
        ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "not served here"),
        ("/v1/zero-shot", {"image": [b64(IMAGES[0])], "labels": []}, 400, "at least one label"),
        ("/v1/nothing", {}, 404, "no route"),
    ]
    for path, body, status, part in cases:
        if isinstance(body, str):
            r = requests.post(url + path, data=body, timeout=60)
        else:
            r = requests.post(url + path, json=body, timeout=60)
        assert r.status_code == status, (path, r.text)
        assert part in error_of(r)["message"], r.text
    # A valid request after them is answered.
    assert (
        requests.post(url + "/v1/embeddings", json={"input": "ok"}, timeout=60).status_code == 200
    )
    assert requests.get(url + "/ready", timeout=10).json()["modalities"] == ["text", "image"]


def test_placement_that_matches_no_node_is_refused(app):
    from mlmf.serving.ray import build_app

    cfg = config()
    cfg["distributed"]["sharding"]["modality_assignments"]["image"] = {"selectors": ["gpu=a100"]}
    with pytest.raises(mlmf.DistributedError, match="no alive node matches"):
        build_app(cfg)


def test_deployment_options_follow_the_plan(app):
    from mlmf.distributed.model import config_dict
    from mlmf.distributed.placement import plans
    from mlmf.serving.ray import deployment_options

    cfg = config_dict(config())
    cfg["distributed"]["sharding"]["modality_assignments"]["text"].update(
        {"replicas": 2, "num_cpus": 0.5, "memory": "1 GiB"}
    )
    by = {p.modality: p for p in plans(cfg, ray)}
    text = deployment_options(by["text"], 16, None)
    assert text["name"] == "mlmf-text" and text["num_replicas"] == 2
    assert text["max_ongoing_requests"] == 16
    actor = text["ray_actor_options"]
    assert actor["label_selector"] == {"modality": "text"}
    assert (actor["num_cpus"], actor["memory"]) == (0.5, 2**30)
    image = deployment_options(by["image"], 8, {"min_replicas": 1, "max_replicas": 3})
    assert image["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert "num_replicas" not in image
    assert image["ray_actor_options"]["resources"] == {"image-node": 0.01}


def test_the_command_line_serves_on_ray(app, tmp_path):
    """`mlmf serve --ray` joins the cluster, replaces the application, drains on SIGTERM
    (last in this module: it deletes the application)."""
    import signal

    url, _ = app
    address = ray.get_runtime_context().gcs_address
    port = url.rsplit(":", 1)[1]
    args = ["--ray", "--ray-address", address, "--port", port, "--model-name", "from-cli"]
    proc = start_cli(config(), tmp_path / "ray.json", *args)
    try:
        line = proc.stdout.readline()
        assert line.startswith("mlmf: serving from-cli on Ray Serve at http://127.0.0.1:"), line
        names = [m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"]]
        assert names[0] == "from-cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "mlmf: stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
