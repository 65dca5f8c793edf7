"""mlmf on a Ray cluster: each modality's encoder runs on the nodes labelled for it, the
fusion runs here, and the results equal the local model's.

    python examples/ray_cluster.py                                  # simulated cluster
    python examples/ray_cluster.py --address auto --config mlmf.toml  # an existing one

Without --address a cluster is simulated on this machine (ray.cluster_utils): a head
node with no CPUs and one 1-CPU node per modality, the text and image nodes labelled
`modality=text` / `modality=image`, the audio node offering the custom resource
`audio-node` (the fallback for clusters without labels). The model uses the bundled
tiny CLIP (text and image) and Whisper (audio) checkpoints, which have random weights:
the numbers show where the work runs and that nothing changes on the way, not meaning.

With --address the script joins that cluster instead (`auto`: the one this machine
belongs to). The config (--config, TOML/YAML/JSON with a `distributed` section; default
the bundled model with the selectors above) must name checkpoints that exist at the
same paths on the nodes that run their modality. See docs/distributed.md.

The script loads a `mlmf.distributed.DistributedModel`, prints where each modality's
replicas run, runs one request on the bundled media and compares it with the local
`mlmf.MultiModalModel`, sends 50 requests at once with `infer_batch`, prints every
replica's statistics and shuts the replicas down.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

import mlmf

DATA = Path(mlmf.__file__).resolve().parent / "data"
MODELS = DATA / "models"
REQUESTS = 50


def default_config() -> dict:
    """Text and image on the bundled tiny CLIP, audio on the bundled tiny Whisper; text
    and image placed by node label, audio by custom resource; two image replicas."""
    clip, whisper = str(MODELS / "clip_tiny"), str(MODELS / "whisper_tiny")
    return {
        "modalities": {
            # The tiny CLIP's text tower has 16 positions: longer texts are truncated.
            "text": {"model": clip, "preprocessing": {"max_length": 16}},
            "image": {"model": clip},
            "audio": {"model": whisper},
        },
        "fusion": {"strategy": "attention", "out_dim": 64},
        "cross_modal_attention": {"num_heads": 4, "pairs": ["text->image"]},
        "distributed": {
            "sharding": {
                "strategy": "modality_specific",
                "modality_assignments": {
                    "text": ["modality=text"],
                    # Two replicas sharing the image node's CPU, one thread each.
                    "image": {
                        "selectors": ["modality=image"],
                        "replicas": 2,
                        "num_cpus": 0.5,
                        "max_in_flight": 2,
                    },
                    "audio": ["audio-node"],
                },
            },
            "start_timeout_s": 60,
        },
    }


def local_config(config: Any) -> Any:
    """The same model on this process alone: the config without its `distributed` part."""
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if k != "distributed"}
    return config  # a file: MultiModalModel.load ignores the distributed section


def node_names() -> dict[str, str]:
    """Node id -> a short description: its id prefix, labels and custom resources."""
    import ray

    names = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = [f"{k}={v}" for k, v in n.get("Labels", {}).items() if not k.startswith("ray.io/")]
        custom = [
            k
            for k in n.get("Resources", {})
            if k not in ("CPU", "GPU", "memory", "object_store_memory")
            and not k.startswith(("node:", "accelerator_type"))
        ]
        names[n["NodeID"]] = f"node {n['NodeID'][:8]} ({', '.join(labels + custom) or 'no labels'})"
    return names


def bundled_inputs(modalities: list[str]) -> dict:
    """Two items from the bundled media, for the modalities the model has."""
    texts = [t.strip() for t in (DATA / "texts.txt").read_text("utf-8").splitlines() if t.strip()]
    pixels = mlmf.decode_image(DATA / "sample.jpg")
    samples, rate = mlmf.load_audio(DATA / "sample.flac")
    inputs: dict[str, Any] = {
        "text": texts[:2],
        "image": [str(DATA / "sample.jpg"), np.ascontiguousarray(pixels[:, ::-1])],
        "audio": [str(DATA / "sample.flac"), np.ascontiguousarray(samples[..., ::-1])],
        "video": [str(DATA / "sample.gif")] * 2,
    }
    inputs = {m: v for m, v in inputs.items() if m in modalities}
    if "audio" in inputs:
        inputs["sampling_rate"] = rate
    return inputs


def many_requests(modalities: list[str], count: int) -> list[dict]:
    """`count` one-item requests, each different: a text line with its number, a
    generated image, a short tone (16 kHz)."""
    rng = np.random.default_rng(0)
    texts = [t.strip() for t in (DATA / "texts.txt").read_text("utf-8").splitlines() if t.strip()]
    t = np.arange(8000, dtype=np.float32) / 16000
    requests = []
    for i in range(count):
        req: dict[str, Any] = {
            "text": [f"{i}: {texts[i % len(texts)]}"],
            "image": [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)],
            "audio": [(0.3 * np.sin(2 * np.pi * (220 + 10 * i) * t)).astype(np.float32)],
            "video": [str(DATA / "sample.gif")],
        }
        requests.append({m: v for m, v in req.items() if m in modalities})
    return requests


def max_abs_diff(got: Any, want: Any) -> float:
    diffs = [float(np.max(np.abs(got.fused - want.fused)))]
    for m, e in want.embeddings.items():
        diffs.append(float(np.max(np.abs(got.embeddings[m] - e))))
    return max(diffs)


def tour(args: argparse.Namespace) -> None:
    import ray

    from mlmf.distributed import DistributedModel

    cluster = None
    if args.address:
        ray.init(address=args.address, logging_level="warning")
        print(f"connected to the Ray cluster at {args.address}")
    else:
        t0 = time.perf_counter()
        from mlmf.distributed.local import simulated_cluster

        # A head with no CPUs (it runs no replica) and one 1-CPU node per modality.
        cluster, _ = simulated_cluster(
            [
                {"labels": {"modality": "text"}},
                {"labels": {"modality": "image"}},
                {"resources": {"audio-node": 1}},
            ],
            logging_level="warning",
        )
        print(
            f"simulated cluster: head + text, image and audio nodes "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    config = str(args.config) if args.config else default_config()
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fusion layers are seeded, untrained
            model = DistributedModel.load(config)
        print(f"{model} loaded in {time.perf_counter() - t0:.1f} s")
        names = node_names()
        for m, ids in model.node_ids.items():
            for i, node in enumerate(ids):
                print(f"  {m:6s} replica {i} on {names.get(node, node[:8])}")
        modalities = list(model.node_ids)

        # One request, and the same request on the local model: equal results.
        inputs = bundled_inputs(modalities)
        out = model.infer(**inputs, return_attention=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = mlmf.MultiModalModel.load(local_config(config))
        want = ref.infer(**inputs, return_attention=True)
        print("\nembeddings:", {m: e.shape for m, e in out.embeddings.items()})
        print("fused:", out.fused.shape)
        for m, g in (out.gates or {}).items():
            print(f"  weight of {m:6s} per item: " + ", ".join(f"{v:.3f}" for v in g))
        print(f"max abs diff from the local model: {max_abs_diff(out, want):.3g}")

        # Many requests at once: spread over the replicas, at most max_in_flight each.
        requests = many_requests(modalities, REQUESTS)
        parts = sum(len(r) for r in requests)

        tty = sys.stdout.isatty()

        def progress(done: int) -> None:
            # One line rewritten in a terminal; every tenth of the way otherwise.
            if tty:
                print(f"\r  infer_batch: {done}/{parts} request parts done", end="", flush=True)
            elif done == parts or done % max(1, parts // 10) == 0:
                print(f"  infer_batch: {done}/{parts} request parts done", flush=True)

        t0 = time.perf_counter()
        outs = model.infer_batch(requests, progress=progress, timeout=120)
        dt = time.perf_counter() - t0
        if tty:
            print()
        print(f"{len(outs)} requests in {dt:.2f} s ({len(outs) / dt:.0f} requests/s)")
        print("peak requests in flight per replica:", dict(sorted(model.peak_in_flight.items())))

        print("\nper-replica statistics:")
        for m, replicas in model.stats().items():
            for i, s in enumerate(replicas):
                ms = s["modalities"][m]
                cache = ms["cache"]
                node = names.get(model.node_ids[m][i], model.node_ids[m][i][:8])
                print(
                    f"  {m:6s} replica {i}: {ms['calls']} calls, {ms['items']} items, "
                    f"{ms['encoded']} encoded, {cache['hits']} cache hits, "
                    f"encode p50 {ms['encode']['p50_ms']:.2f} ms  [{node}]"
                )
        model.shutdown()
        print("replicas shut down")
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        help="join this Ray cluster (`auto`: the local one) instead of simulating one",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="model config with a `distributed` section (default: the bundled checkpoints)",
    )
    args = parser.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("this example needs Ray: pip install 'mlmf[ray]'", file=sys.stderr)
        return 2
    try:
        tour(args)
    except mlmf.MlmfError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
