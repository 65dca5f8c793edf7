"""The HTTP server (`mlmf.serve`, `mlmf serve`): every endpoint's answers against
`MultiModalModel.infer` / `similarity` / `zero_shot` on a separately loaded model,
the OpenAI client, batching, and faults (malformed requests, disconnects, overflow,
timeouts, SIGTERM). Servers bind 127.0.0.1 on free ports."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

import mlmf
from serving import (
    AUDIO,
    FIX,
    IMAGES,
    MODELS,
    TEXTS,
    aligned_config,
    arr,
    b64,
    error_of,
    load,
    metric,
    multimodal_config,
    post,
    start_cli,
)

# Where a request's batch differs from the reference call's (other rows, padding).
BATCH_TOL = 1e-6


@pytest.fixture(scope="module")
def reference() -> mlmf.MultiModalModel:
    return load(multimodal_config())


@pytest.fixture(scope="module")
def server():
    with mlmf.serve(load(multimodal_config()), port=0, block=False) as s:
        yield s


@pytest.fixture(scope="module")
def aligned():
    with mlmf.serve(load(aligned_config()), port=0, block=False, model_name="clip") as s:
        yield s


def test_embeddings_equal_the_model(server, reference):
    r = post(server.url, "/v1/embeddings", {"input": TEXTS, "model": "text"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "list" and [d["index"] for d in j["data"]] == [0, 1]
    got = np.array([d["embedding"] for d in j["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, reference.infer(text=TEXTS).embeddings["text"])
    # Tokens as the encoder sees them: sentence_bert_config.json truncates at 16.
    proc = mlmf.TextProcessor.from_pretrained(
        MODELS / "st_mean_norm", max_length=16, truncation=True
    )
    tokens = proc(TEXTS)["attention_mask"].sum()
    assert tokens == 11 + 16
    assert j["usage"] == {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}
    # One string is one item; base64 decodes to the same float32 values.
    one = post(server.url, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"})
    v = np.frombuffer(__import__("base64").b64decode(one.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(v, got[0])
    # dimensions: the first N values, L2-normalised again.
    d = post(server.url, "/v1/embeddings", {"input": TEXTS, "dimensions": 5}).json()["data"]
    want = got[:, :5] / np.linalg.norm(got[:, :5].astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose([x["embedding"] for x in d], want, rtol=0, atol=1e-7)


def test_media_embeddings_by_value(server, reference):
    body = {
        "modality": "image",
        "input": [b64(IMAGES[0]), "data:image/png;base64," + b64(IMAGES[1])],
    }
    r = post(server.url, "/v1/embeddings", body)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want = reference.infer(image=[str(p) for p in IMAGES]).embeddings["image"]
    np.testing.assert_allclose(got, want, rtol=0, atol=BATCH_TOL)
    # The checkpoint's folder name selects the modality too.
    r = post(server.url, "/v1/embeddings", {"model": "whisper_tiny", "input": [b64(AUDIO[0])]})
    assert r.status_code == 200, r.text
    want = reference.infer(audio=[str(AUDIO[0])]).embeddings["audio"]
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], want[0], rtol=0, atol=BATCH_TOL)


def infer_body(fmt: str = "float") -> dict:
    return {
        "text": TEXTS,
        "image": [b64(p) for p in IMAGES],
        "audio": [b64(p) for p in AUDIO],
        "return_attention": True,
        "return_tokens": True,
        "encoding_format": fmt,
    }


def check_infer(j: dict, ref) -> None:
    assert j["object"] == "infer" and j["skipped"] == []
    for m, e in ref.embeddings.items():
        np.testing.assert_allclose(arr(j["embeddings"][m]), e, rtol=0, atol=BATCH_TOL)
    np.testing.assert_allclose(arr(j["fused"]), ref.fused, rtol=0, atol=BATCH_TOL)
    assert set(j["gates"]) == set(ref.gates)
    for m, g in ref.gates.items():
        np.testing.assert_allclose(arr(j["gates"][m]), g, rtol=0, atol=BATCH_TOL)
    assert set(j["attention"]) == set(ref.attention)
    for name, a in ref.attention.items():
        np.testing.assert_allclose(arr(j["attention"][name]), a, rtol=0, atol=BATCH_TOL)
    for m, t in ref.tokens.items():
        np.testing.assert_allclose(
            arr(j["tokens"][m]["hidden_states"]), t["hidden_states"], rtol=0, atol=BATCH_TOL
        )
        np.testing.assert_array_equal(np.array(j["tokens"][m]["mask"]), t["mask"])
    assert set(j["stats"]["modalities"]) == {"text", "image", "audio"}


def full_infer(model: mlmf.MultiModalModel):
    """The in-process call the /v1/infer tests compare with."""
    return model.infer(
        text=TEXTS,
        image=[str(p) for p in IMAGES],
        audio=[str(p) for p in AUDIO],
        return_attention=True,
        return_tokens=True,
    )


def test_infer_equals_model_infer(server, reference):
    ref = full_infer(reference)
    for fmt in ("float", "base64"):
        r = post(server.url, "/v1/infer", infer_body(fmt))
        assert r.status_code == 200, r.text
        check_infer(r.json(), ref)


def test_infer_multipart_equals_json(server, reference):
    files = [("text", (None, t)) for t in TEXTS]
    files += [("image", (p.name, p.read_bytes())) for p in IMAGES]
    files += [("audio", (p.name, p.read_bytes())) for p in AUDIO]
    files.append(("options", (None, json.dumps({"return_attention": True, "return_tokens": True}))))
    r = requests.post(server.url + "/v1/infer", files=files, timeout=60)
    assert r.status_code == 200, r.text
    check_infer(r.json(), full_infer(reference))
    bad = requests.post(server.url + "/v1/infer", files=[("smell", (None, "x"))], timeout=60)
    assert bad.status_code == 400 and "smell" in error_of(bad)["message"]


def test_similarity_and_zero_shot_equal_the_model(aligned):
    model = load(aligned_config())
    images = [str(p) for p in IMAGES]
    r = post(aligned.url, "/v1/similarity", {"text": TEXTS, "image": [b64(p) for p in IMAGES]})
    assert r.status_code == 200, r.text
    s = model.similarity(TEXTS, image=images)
    np.testing.assert_allclose(
        arr(r.json()["logits_per_text"]), s.logits_per_text, rtol=0, atol=BATCH_TOL
    )
    np.testing.assert_allclose(
        arr(r.json()["logits_per_image"]), s.logits_per_image, rtol=0, atol=BATCH_TOL
    )
    labels = ["cat", "mountain", "red car"]
    r = post(aligned.url, "/v1/zero-shot", {"image": [b64(p) for p in IMAGES], "labels": labels})
    assert r.status_code == 200, r.text
    z = model.zero_shot(image=images, labels=labels)
    j = r.json()
    np.testing.assert_allclose(arr(j["probs"]), z.probs, rtol=0, atol=1e-6)
    assert j["best"] == z.best and j["prompts"] == z.prompts
    # A late `similarity` model's infer carries the same logits.
    r = post(aligned.url, "/v1/infer", {"text": TEXTS, "image": [b64(p) for p in IMAGES]})
    np.testing.assert_allclose(
        arr(r.json()["similarity"]["logits_per_text"]), s.logits_per_text, rtol=0, atol=BATCH_TOL
    )
    for body, want in [
        ({"image": [b64(IMAGES[0])], "labels": []}, "at least one label"),
        ({"image": [b64(IMAGES[0])], "labels": ["a"], "template": "no slot"}, "exactly once"),
        ({"text": ["a"]}, "image, audio or video"),
    ]:
        path = "/v1/similarity" if "text" in body else "/v1/zero-shot"
        bad = post(aligned.url, path, body)
        assert bad.status_code == 400 and want in error_of(bad)["message"], bad.text


def test_similarity_on_a_model_without_aligned_heads(server):
    r = post(server.url, "/v1/similarity", {"text": ["a"], "image": [b64(IMAGES[0])]})
    assert r.status_code == 400
    assert "aligned" in error_of(r)["message"]


def test_the_openai_client_works_unchanged(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = reference.infer(text=TEXTS).embeddings["text"]
    # The client asks for base64 by default and decodes it itself.
    got = client.embeddings.create(model="mlmf", input=TEXTS)
    np.testing.assert_array_equal(np.array([d.embedding for d in got.data], np.float32), want)
    assert got.usage.prompt_tokens > 0
    got = client.embeddings.create(model="text", input=TEXTS[1], encoding_format="float")
    np.testing.assert_array_equal(np.array(got.data[0].embedding, np.float32), want[1])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-4o", input="x")
    names = [m.id for m in client.models.list().data]
    assert names[0] == "mlmf" and {"text", "image", "audio", "st_mean_norm"} <= set(names)


def test_concurrent_requests_share_batches(reference):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(32)]
    want = reference.infer(text=texts).embeddings["text"]
    with mlmf.serve(load(multimodal_config()), port=0, block=False, max_wait_ms=50) as s:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda t: post(s.url, "/v1/embeddings", {"input": t}), texts))
        got = np.array([a.json()["data"][0]["embedding"] for a in answers], np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=BATCH_TOL)
        text = requests.get(s.url + "/metrics", timeout=10).text
    batches = metric(text, "mlmf_batch_items_count", modality="text")
    assert metric(text, "mlmf_batch_items_sum", modality="text") == 32
    assert 1 <= batches < 32, text
    assert metric(text, "mlmf_requests_total", endpoint="/v1/embeddings", status="200") == 32


def test_health_ready_models_metrics_and_openapi(server):
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(server.url + "/ready", timeout=10).json()
    assert ready == {"status": "ready", "modalities": ["text", "image", "audio"]}
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    for path, ops in spec["paths"].items():
        for method in ops:
            r = requests.request(method, server.url + path, json={}, timeout=10)
            assert r.status_code not in (404, 405), (method, path, r.text)
    post(server.url, "/v1/embeddings", {"input": "warm"})
    post(server.url, "/v1/embeddings", {"input": "warm"})
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in [
        "mlmf_requests_total",
        "mlmf_request_errors_total",
        "mlmf_request_duration_seconds_bucket",
        "mlmf_stage_duration_seconds_bucket",
        "mlmf_batch_items_bucket",
        "mlmf_queue_depth",
        "mlmf_requests_in_flight",
        "mlmf_cache_hits",
        "mlmf_cache_bytes",
    ]:
        assert name in text, name
    assert metric(text, "mlmf_cache_hits", modality="text") >= 1
    assert metric(text, "mlmf_cache_bytes", modality="text") > 0


def test_paths_only_under_allowed_directories(tmp_path, reference):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "a.jpg").write_bytes(IMAGES[0].read_bytes())
    (inside / "link.jpg").symlink_to(IMAGES[1])  # resolves outside: refused
    body = lambda p: {"modality": "image", "input": [{"path": str(p)}]}  # noqa: E731
    with mlmf.serve(load(multimodal_config()), port=0, block=False) as s:
        r = post(s.url, "/v1/embeddings", body(inside / "a.jpg"))
        assert r.status_code == 400 and "--allow-path" in error_of(r)["message"]
    with mlmf.serve(load(multimodal_config()), port=0, block=False, allow_path=[inside]) as s:
        r = post(s.url, "/v1/embeddings", body(inside / "a.jpg"))
        assert r.status_code == 200, r.text
        want = reference.infer(image=[str(IMAGES[0])]).embeddings["image"][0]
        np.testing.assert_array_equal(np.float32(r.json()["data"][0]["embedding"]), want)
        for p in [inside / "link.jpg", inside / ".." / "x.jpg", "/etc/passwd"]:
            r = post(s.url, "/v1/embeddings", body(p))
            assert r.status_code == 400 and "image input 0" in error_of(r)["message"], r.text


def test_api_key(reference):
    with mlmf.serve(load(multimodal_config()), port=0, block=False, api_key="s3cret") as s:
        assert post(s.url, "/v1/embeddings", {"input": "x"}).status_code == 401
        r = post(s.url, "/v1/embeddings", {"input": "x"}, key="wrong")
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        assert post(s.url, "/v1/embeddings", {"input": "x"}, key="s3cret").status_code == 200
        assert requests.get(s.url + "/metrics", timeout=10).status_code == 401
        assert requests.get(s.url + "/health", timeout=10).status_code == 200
        assert requests.get(s.url + "/ready", timeout=10).status_code == 200


def malformed(n: int) -> list[tuple[str, object, int, str]]:
    """`n` bad requests, cycling through the kinds: (path, body, status, message part)."""
    corrupt = b64(IMAGES[0])[:200]  # a truncated JPEG
    kinds = [
        ("/v1/infer", "{not json", 400, "invalid JSON"),
        ("/v1/infer", "[1, 2]", 400, "expected a JSON object"),
        ("/v1/infer", "", 400, "empty body"),
        ("/v1/infer", {"text": "x", "image": 5}, 400, "image: expected an array"),
        ("/v1/infer", {"text": [1]}, 400, "text input 0: expected a string"),
        ("/v1/infer", {"text": []}, 400, "empty list"),
        ("/v1/infer", {}, 400, "no inputs"),
        ("/v1/infer", {"smell": ["x"]}, 400, "unknown field `smell`"),
        (
            "/v1/infer",
            {"text": ["a", "b"], "image": [b64(IMAGES[0])]},
            400,
            "every modality carries one item per row",
        ),
        ("/v1/infer", {"image": ["%%%not base64"]}, 400, "image input 0: not valid base64"),
        ("/v1/infer", {"image": [b64(IMAGES[0]), corrupt]}, 400, "image input 1: cannot decode"),
        ("/v1/infer", {"audio": ["aGVsbG8gd29ybGQ="]}, 400, "audio input 0: cannot decode"),
        ("/v1/infer", {"video": [b64(IMAGES[0])]}, 400, "video"),
        (
            "/v1/infer",
            {"text": ["a"], "return_tokens": "yes"},
            400,
            "`return_tokens`: expected true or false",
        ),
        ("/v1/embeddings", {"input": 7}, 400, "expected an array"),
        ("/v1/embeddings", {"input": [[1, 2]]}, 400, "token id arrays"),
        ("/v1/embeddings", {}, 400, "`input` is required"),
        ("/v1/embeddings", {"input": "x", "modality": "smell"}, 400, "unknown modality"),
        ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "is not served here"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "`dimensions`"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ("/v1/embeddings", {"input": "x" * 70000}, 413, "length limit"),
        ("/v1/embeddings", {"input": "x"}, 401, "API key"),  # sent without the key
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


SMALL = [IMAGES[0], FIX / "image" / "inputs" / "exif_orient6_64x48.jpg"]


def test_a_thousand_malformed_requests_between_valid_ones(reference):
    want = reference.infer(text=TEXTS, image=[str(p) for p in SMALL])
    with mlmf.serve(
        load(multimodal_config()), port=0, block=False, api_key="k", max_body_mb=0.0625
    ) as s:
        session = requests.Session()
        valid = {"text": TEXTS, "image": [b64(p) for p in SMALL]}
        for i, (path, body, status, part) in enumerate(malformed(1000)):
            key = None if status == 401 else "k"
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            if isinstance(body, str):
                r = session.post(s.url + path, data=body, headers=headers, timeout=60)
            else:
                r = session.post(s.url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == status, (
                i,
                path,
                body if len(str(body)) < 300 else "...",
                r.text,
            )
            assert part in error_of(r)["message"], (i, r.text)
            if i % 50 == 0:
                ok = session.post(
                    s.url + "/v1/infer",
                    data=json.dumps(valid),
                    headers={"Authorization": "Bearer k"},
                    timeout=60,
                )
                assert ok.status_code == 200, ok.text
                np.testing.assert_allclose(
                    arr(ok.json()["fused"]), want.fused, rtol=0, atol=BATCH_TOL
                )
        text = session.get(
            s.url + "/metrics", headers={"Authorization": "Bearer k"}, timeout=10
        ).text
    errors = sum(
        metric(text, "mlmf_requests_total", endpoint=e, status=str(c))
        for e in ("/v1/infer", "/v1/embeddings")
        for c in (400, 401, 404, 413)
    )
    assert errors == 1000


def test_a_bad_item_fails_only_its_own_request(reference):
    """Requests batched together: the one with a corrupt image fails alone."""
    good = [b64(IMAGES[0]), b64(IMAGES[1])]
    want = reference.infer(image=[str(p) for p in IMAGES]).embeddings["image"]
    with mlmf.serve(load(multimodal_config()), port=0, block=False, max_wait_ms=200) as s:
        bodies = [{"modality": "image", "input": [good[i % 2]]} for i in range(6)]
        bodies[3] = {"modality": "image", "input": [good[0], good[0][:100]]}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda b: post(s.url, "/v1/embeddings", b), bodies))
    for i, a in enumerate(answers):
        if i == 3:
            assert a.status_code == 400 and "image input 1: cannot decode" in error_of(a)["message"]
        else:
            assert a.status_code == 200, a.text
            np.testing.assert_allclose(
                a.json()["data"][0]["embedding"], want[i % 2], rtol=0, atol=BATCH_TOL
            )


def test_queue_overflow_gives_429_and_timeouts_503():
    model = load(multimodal_config())
    with mlmf.serve(model, port=0, block=False, max_concurrent_requests=1, max_wait_ms=1500) as s:
        slow = threading.Thread(target=post, args=(s.url, "/v1/embeddings", {"input": "slow"}))
        slow.start()
        time.sleep(0.3)
        r = post(s.url, "/v1/embeddings", {"input": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert error_of(r)["type"] == "rate_limit_error"
        slow.join()
    with mlmf.serve(model, port=0, block=False, request_timeout=0.3, max_wait_ms=1500) as s:
        r = post(s.url, "/v1/embeddings", {"input": "late"})
        assert r.status_code == 503 and error_of(r)["type"] == "timeout"
        time.sleep(1.5)
        text = requests.get(s.url + "/metrics", timeout=10).text
        assert (
            metric(text, "mlmf_dropped_requests_total", modality="text", reason="disconnected") == 1
        )


def test_a_disconnected_client_has_its_work_dropped():
    with mlmf.serve(load(multimodal_config()), port=0, block=False, max_wait_ms=800) as s:
        body = json.dumps({"input": "gone"}).encode()
        c = socket.create_connection((s.host, s.port))
        c.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.2)
        c.close()
        time.sleep(1.2)
        text = requests.get(s.url + "/metrics", timeout=10).text
    assert metric(text, "mlmf_dropped_requests_total", modality="text", reason="disconnected") == 1
    assert metric(text, "mlmf_batch_items_count", modality="text") == 0


def test_settings_are_checked(tmp_path):
    model = load(aligned_config())
    for kw, part in [
        ({"max_batch_items": 0}, "serve.max_batch_items"),
        ({"allow_path": [tmp_path / "none"]}, "serve.allow_paths"),
        ({"api_key": "has space"}, "serve.api_key"),
        ({"max_body_mb": 0}, "serve.max_body_bytes"),
        ({"host": "256.1.1.1"}, "cannot bind"),
    ]:
        with pytest.raises(mlmf.ConfigError, match=part):
            mlmf.serve(model, port=0, block=False, **kw)
    with mlmf.serve(model, port=0, block=False) as s:
        with pytest.raises(mlmf.ConfigError, match="cannot bind"):
            mlmf.serve(model, port=s.port, block=False)
    assert s.stopped and "stopped" in repr(s)


def test_cli_serve_drains_on_sigterm(tmp_path):
    proc = start_cli(
        multimodal_config(), tmp_path / "demo.json", "--port", "0", "--max-wait-ms", "1500"
    )
    try:
        line = proc.stdout.readline()
        assert "mlmf: serving demo (text, image, audio) on http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[1].strip()
        out: dict = {}
        t = threading.Thread(
            target=lambda: out.update(r=post(url, "/v1/embeddings", {"input": "in flight"}))
        )
        t.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = post(url, "/v1/embeddings", {"input": "too late"})
        assert late.status_code == 503 and error_of(late)["type"] == "unavailable"
        assert requests.get(url + "/ready", timeout=10).status_code == 503
        t.join(30)
        assert out["r"].status_code == 200, out["r"].text
        assert proc.wait(30) == 0
        assert "mlmf: stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_checkpoint_that_cannot_take_raw_media_is_refused_at_start(tmp_path):
    ckpt = tmp_path / "clip_no_processor"
    ckpt.mkdir()
    for f in (MODELS / "clip_tiny").iterdir():
        if f.name != "preprocessor_config.json":
            (ckpt / f.name).symlink_to(f)
    model = load({"modalities": {"image": {"model": str(ckpt)}}})
    with pytest.raises(mlmf.ConfigError, match="modalities.image.model.*raw image inputs"):
        mlmf.serve(model, port=0, block=False)
