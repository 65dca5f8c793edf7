"""CLAP fixtures (part of area ``zoo``): two tiny random ``ClapModel`` checkpoints (HTSAT
Swin audio tower + RoBERTa text tower) and transformers' outputs on them.

Run through ``scripts/make_fixtures.py --only zoo`` (``make_zoo`` stores the returned
description under ``"clap"`` in ``zoo/expected.json``; the arrays go to ``zoo/clap.npz``,
the checkpoints to ``zoo/models/clap_tiny`` and ``zoo/models/clap_fused_tiny``).

Checkpoints (``ClapConfig(text_config, audio_config, projection_dim=20,
projection_hidden_act="relu")``; the root ``projection_dim`` / ``projection_hidden_act``
overwrite the sub-configs' own):

- Text tower (``ClapTextModel``, RoBERTa layout): the tokenizer files of
  ``encoders/models/roberta_tiny`` copied as they are (the tiny lower-casing WordPiece,
  ``BertTokenizer``, 162 ids, ``[PAD]`` 0, ``[CLS]`` 2, ``[SEP]`` 3), hidden 36, 2
  post-norm layers, 3 heads, MLP 50 (gelu), 65 positions, ``type_vocab_size`` 1,
  ``pad_token_id`` 0 (so position ids are ``cumsum(mask) * mask + 0``: real tokens at
  1..n, padding at 0; at most 65 - 0 - 1 = 64 tokens, the tokenizer's
  ``model_max_length``), ``layer_norm_eps`` 1e-12 (ClapTextConfig's default).  The
  pooler is BERT's: ``tanh(dense(h[:, 0]))`` on the ``[CLS]`` state.
- Audio tower (``ClapAudioModel``, HTSAT): ``spec_size`` 64, ``num_mel_bins`` 16
  (``freq_ratio = spec_size // num_mel_bins = 4``), 4x4 patches at stride 4 (no conv
  padding) into 12 channels -> a 16x16 grid, window 4, depths [2, 1, 2], heads [2, 3, 4]
  (stage widths 12, 24, 48 on grids 16x16, 8x8, 4x4), ``mlp_ratio`` 2, qkv biases,
  ``hidden_size`` 48 (= 12 * 2**(3 - 1): read only by the audio projection's first
  Linear, so it must equal the last stage's width).
- Projections: ``linear2(relu(linear1(x)))``, 36 -> 20 -> 20 (text) and 48 -> 20 -> 20
  (audio).
- ``clap_tiny`` (seed SEED + 40): ``enable_fusion`` false (the laion "unfused" layout).
  ``clap_fused_tiny`` (seed SEED + 41): ``enable_fusion`` true, ``fusion_type`` "aff_2d"
  (the laion "fused" layout): the patch embedding gains ``mel_conv2d`` (kernel 4x12,
  stride 4x12) and the attentional feature fusion block ``fusion_model`` (``local_att``
  / ``global_att``: 1x1 convs 12 -> 3 -> 12 with BatchNorms, ``aff_block_r`` 4).
- Every parameter is redrawn with fixtures_zoo's ``_redraw`` (names ending in
  ``norm.weight``: 1 + 0.1 N(0,1); everything else 0.2 N(0,1)).  As ``_redraw``'s test is
  by name and case-sensitive it leaves the text ``LayerNorm.weight``, the Swin
  ``layernorm_before/after.weight`` and the fusion BatchNorms' weights at 0.2 N(0,1), so
  afterwards the weight of EVERY ``nn.LayerNorm`` / ``nn.BatchNorm2d`` is redrawn as
  1 + 0.1 N(0,1) (a generator seeded ``seed + 500``, modules in name order), and every
  BatchNorm gets seeded running statistics (same generator): the mel ``batch_norm``
  ``running_mean`` U(-45, -15) and ``running_var`` U(50, 250) (dB scale, so the
  normalised mels are O(1)); the fusion BatchNorms ``running_mean`` 0.5 N(0,1),
  ``running_var`` U(0.5, 2).  Then ``logit_scale_a`` = ln 10 and ``logit_scale_t`` = ln 7
  (different, so ``logits_per_audio`` is not the transpose of ``logits_per_text``).

Feature extractor (``ClapFeatureExtractor(feature_size=16, sampling_rate=8000,
hop_length=80, fft_window_size=256, max_length_s=2, padding_value=0.0,
frequency_min=50, frequency_max=3800, padding="repeatpad", truncation=...)``, saved by
its ``save_pretrained``): ``truncation`` "rand_trunc" for ``clap_tiny`` (the setting
third-party code pinned to laion's released checkpoints, e.g. larger_clap_general, reports
in their preprocessor_config.json; laion/clap-htsat-unfused's own file could not be read
offline) and "fusion" for ``clap_fused_tiny``.  A wave
shorter than 16000 samples is tiled ``int(16000 / n)`` times and zero-padded to 16000
("repeatpad"; a wave longer than half the maximum is therefore only zero-padded).  The
log-mel is ``audio_utils.spectrogram(x, hann(256, periodic), frame_length=256,
hop_length=80, power=2, center=True, pad_mode="reflect", mel_filters=..., mel_floor=1e-10,
log_mel="dB")``: 10 log10(max(mel, 1e-10)), reference 1, no top_db clipping (``top_db``
is stored but never used), float64 inside, float32 out, transposed to [frames, mels]:
1 + 16000 // 80 = 201 frames.  "rand_trunc" uses ``mel_filters_slaney`` (slaney scale,
slaney norm) and returns [1, 1, 201, 16]; "fusion" uses ``mel_filters`` (HTK scale, no
norm) and stacks 4 copies: [1, 4, 201, 16].  ``is_longer`` is False for a short wave,
BUT with "fusion", if no wave of the call is longer, one index picked by
``np.random.randint`` is set True: a single wave on its own always gets True.

Inputs: WAVES, float32 mono at 8 kHz, 5000, 16000 and 9001 samples (a linear chirp at
amplitude 0.5 plus N(0, 0.02) noise, rounded to multiples of 2^-15), ``wave0..wave2``;
and ``wave_long`` (23000 samples), used only for the full-length mel (longer-than-max
input is cropped at random by the reference, so it is not fed to the models).

Reference outputs (``clap.npz``; floats float32, ints and bools int64), per checkpoint
NAME:

- ``NAME.input_features{i}`` [1, C, 201, 16] (C = 1 / 4) and ``NAME.is_longer{i}`` [1, 1]:
  the extractor on wave i alone (``return_tensors="np"``).  ``NAME.long_mel`` [288, 16]:
  ``fe._np_extract_fbank_features(wave_long, filters)`` with the checkpoint's filter bank
  (slaney for clap_tiny, htk for clap_fused_tiny), the full mel without cropping.
- The audio tower on the three features as one batch, [3, C, 201, 16], with the stacked
  ``is_longer`` [3, 1] (all False for clap_tiny, where it is ignored; all True for
  clap_fused_tiny, as each wave got alone): ``NAME.audio.pooled`` [3, 48] =
  ``audio_model(...).pooler_output``; ``NAME.audio.hidden_states`` [3, 48, 1, 16] =
  its ``last_hidden_state`` (see "pooler" below: after the final LayerNorm, channels
  first, regrouped as [B, C, c_freq_bin = 1, 16 tokens]); ``NAME.audio.embeds`` [3, 20]
  = ``audio_projection(pooled)``, NOT normalised (``get_audio_features`` returns its
  L2-normalised version as ``pooler_output``).
- ``NAME.audio.normed0`` [1, C, 201, 16]: wave 0's features after the mel batch norm;
  ``NAME.audio.image0`` [1, C, 64, 64]: after ``reshape_mel2img``, the patch embedding's
  input (checked equal to what the model's forward passes there).
- clap_fused_tiny only: ``NAME.audio.pooled_not_longer`` / ``NAME.audio.embeds_not_longer``:
  the same with ``is_longer`` all False (only channel 0 is read; checked by zeroing
  channels 1..3), i.e. what a wave gets when the extractor's random True went elsewhere.
- ``input_ids`` / ``attention_mask`` [5, T] and ``position_ids`` [5, T] (shared): the
  tokenizer on TEXTS, padded to the longest, truncated at 64.  ``NAME.text.pooled``
  [5, 36] = ``text_model(input_ids, attention_mask).pooler_output``; ``NAME.text.embeds``
  [5, 20] = ``text_projection(pooled)``, not normalised.
- ``NAME.logits_per_text`` [5, 3] / ``NAME.logits_per_audio`` [3, 5]:
  ``ClapModel(input_ids, attention_mask, input_features, is_longer)``:
  ``exp(logit_scale_t) * t_hat @ a_hat.T`` and ``exp(logit_scale_a) * a_hat @ t_hat.T``
  on the L2-normalised embeds.
- Zero-shot: LABELS put into TEMPLATE (``zero_shot.input_ids`` /
  ``zero_shot.attention_mask`` [4, T']), the same call: ``NAME.zero_shot.logits`` =
  ``logits_per_audio`` [3 waves, 4 labels], ``NAME.zero_shot.probs`` its softmax over
  the labels.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from fixtures_zoo import SEED, SRC, _redraw
from make_fixtures import save_npz

RATE = 8000
WAVE_SEED = SEED + 42
WAVE_LENGTHS = [5000, 16000, 9001]
# (start Hz, end Hz) of each wave's linear chirp.
CHIRPS = [(200.0, 3000.0), (3500.0, 120.0), (600.0, 2400.0)]
LONG_LENGTH = 23000
LONG_CHIRP = (150.0, 3700.0)

TEXTS = [
    "a dog barking",
    "rain on a tin roof",
    "a violin solo",
    "silence",
    "an engine starting up in the cold",
]
LABELS = ["dog", "rain", "violin", "engine"]
TEMPLATE = "the sound of a {}."

LOGIT_SCALE_A = math.log(10.0)
LOGIT_SCALE_T = math.log(7.0)
PROJECTION_DIM = 20
NORM_SEED_OFFSET = 500

TEXT_SIZES = {
    "hidden_size": 36,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 50,
    "hidden_act": "gelu",
    "type_vocab_size": 1,
}
AUDIO_SIZES = {
    "spec_size": 64,
    "num_mel_bins": 16,
    "window_size": 4,
    "patch_size": 4,
    "patch_stride": [4, 4],
    "patch_embeds_hidden_size": 12,
    "depths": [2, 1, 2],
    "num_attention_heads": [2, 3, 4],
    "hidden_size": 48,
    "mlp_ratio": 2.0,
    "hidden_act": "gelu",
    "qkv_bias": True,
}
FE_SETTINGS = {
    "feature_size": 16,
    "sampling_rate": RATE,
    "hop_length": 80,
    "fft_window_size": 256,
    "max_length_s": 2,
    "padding_value": 0.0,
    "frequency_min": 50,
    "frequency_max": 3800,
    "padding": "repeatpad",
}
MAX_SAMPLES = FE_SETTINGS["max_length_s"] * RATE
FRAMES = 1 + MAX_SAMPLES // FE_SETTINGS["hop_length"]
LONG_FRAMES = 1 + LONG_LENGTH // FE_SETTINGS["hop_length"]

# name: (seed, audio_config extras, truncation, mel filter bank attribute)
CHECKPOINTS = {
    "clap_tiny": (SEED + 40, {"enable_fusion": False}, "rand_trunc", "mel_filters_slaney"),
    "clap_fused_tiny": (
        SEED + 41,
        {"enable_fusion": True, "fusion_type": "aff_2d"},
        "fusion",
        "mel_filters",
    ),
}
ROBERTA = SRC / "encoders" / "models" / "roberta_tiny"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]


def _chirp(n: int, f0: float, f1: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / RATE
    dur = n / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur))
    x = 0.5 * np.sin(phase) + 0.02 * rng.standard_normal(n)
    # Multiples of 2^-15, as a decoder turns 16-bit PCM into floats.
    return (np.round(np.clip(x, -1, 1) * 32768) / 32768).astype(np.float32)


def _waves() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(WAVE_SEED)
    waves = [_chirp(n, f0, f1, rng) for n, (f0, f1) in zip(WAVE_LENGTHS, CHIRPS)]
    return waves, _chirp(LONG_LENGTH, *LONG_CHIRP, rng)


def _norms(model: torch.nn.Module, seed: int) -> dict:
    """Norm weights 1 + 0.1 N(0,1) by module type; seeded BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed + NORM_SEED_OFFSET)
    stats = {}
    with torch.no_grad():
        for name, m in sorted(model.named_modules()):
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                u_mean = torch.rand(n, generator=g)
                u_var = torch.rand(n, generator=g)
                if name.endswith("audio_encoder.batch_norm"):
                    m.running_mean.copy_(-45 + 30 * u_mean)
                    m.running_var.copy_(50 + 200 * u_var)
                    rule = "running_mean U(-45, -15), running_var U(50, 250)"
                else:
                    m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + 1.5 * u_var)
                    rule = "running_mean 0.5 N(0,1), running_var U(0.5, 2)"
                stats[name] = {"num_features": n, "eps": m.eps, "stats": rule}
    return stats


def _checkpoint(name: str, d: Path):
    from transformers import AutoFeatureExtractor, ClapConfig, ClapFeatureExtractor, ClapModel

    seed, audio_extra, truncation, _ = CHECKPOINTS[name]
    d.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(ROBERTA / f, d / f)
    src = json.loads((ROBERTA / "config.json").read_text())
    text_config = {
        **TEXT_SIZES,
        "vocab_size": src["vocab_size"],
        "max_position_embeddings": src["max_position_embeddings"],
        "pad_token_id": src["pad_token_id"],
        "bos_token_id": src["bos_token_id"],
        "eos_token_id": src["eos_token_id"],
    }
    audio_config = {**AUDIO_SIZES, **audio_extra}
    cfg = ClapConfig(
        text_config=text_config,
        audio_config=audio_config,
        projection_dim=PROJECTION_DIM,
        projection_hidden_act="relu",
    )
    assert cfg.text_config.projection_dim == cfg.audio_config.projection_dim == PROJECTION_DIM
    torch.manual_seed(seed)
    model = ClapModel(cfg).eval()
    enc = model.audio_model.audio_encoder
    assert enc.freq_ratio == 4 and enc.num_features == AUDIO_SIZES["hidden_size"]
    assert enc.input_resolutions == [(16, 16), (8, 8), (4, 4)]
    _redraw(model, seed)
    bn = _norms(model, seed)
    with torch.no_grad():
        model.logit_scale_a.fill_(LOGIT_SCALE_A)
        model.logit_scale_t.fill_(LOGIT_SCALE_T)
    model.save_pretrained(str(d), safe_serialization=True)
    fe = ClapFeatureExtractor(**FE_SETTINGS, truncation=truncation)
    fe.save_pretrained(str(d))

    loaded, info = ClapModel.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{name}: {bad}"
    loaded.eval()
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), f"{name}: {k} differs after reload"
    saved = AutoFeatureExtractor.from_pretrained(str(d))
    assert type(saved) is ClapFeatureExtractor
    assert saved.to_dict() == fe.to_dict()
    return loaded, saved, text_config, audio_config, bn


def _safetensors_keys(d: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def _mel2img_by_hand(normed: torch.Tensor) -> torch.Tensor:
    """reshape_mel2img spelled out for these sizes: [B, C, 201, 16] -> [B, C, 64, 64]."""
    b, c, _, f = normed.shape
    x = torch.nn.functional.interpolate(normed, (256, f), mode="bicubic", align_corners=True)
    x = x.reshape(b, c * 4, 64, f).permute(0, 1, 3, 2).reshape(b, c, f * 4, 64)
    return x


def _case(name: str, d: Path, ckpt, waves, long_wave, text, zs_text, arrays) -> dict:
    seed, audio_extra, truncation, filters_attr = CHECKPOINTS[name]
    model, fe, text_config, audio_config, bn = ckpt
    fused = audio_extra["enable_fusion"]
    channels = 4 if fused else 1

    # The extractor, one wave at a time.
    feats, longer = [], []
    filters = getattr(fe, filters_attr)
    for i, w in enumerate(waves):
        out = fe(w, sampling_rate=RATE, return_tensors="np")
        f, lg = out["input_features"], out["is_longer"]
        assert f.dtype == np.float32 and f.shape == (1, channels, FRAMES, 16), f.shape
        assert lg.shape == (1, 1) and bool(lg[0, 0]) == fused
        # repeatpad by hand: tile int(max / n) times, zero-pad to max.
        padded = np.tile(w, MAX_SAMPLES // len(w))
        padded = np.pad(padded, (0, MAX_SAMPLES - len(padded)))
        by_hand = fe._np_extract_fbank_features(padded, filters)
        assert all(np.array_equal(f[0, c], by_hand) for c in range(channels))
        arrays[f"{name}.input_features{i}"] = f
        arrays[f"{name}.is_longer{i}"] = lg
        feats.append(f)
        longer.append(lg)
    batch_fe = fe(waves, sampling_rate=RATE, return_tensors="np")
    assert np.array_equal(batch_fe["input_features"], np.concatenate(feats))
    batch_longer = batch_fe["is_longer"][:, 0].tolist()
    assert sum(batch_longer) == (1 if fused else 0)
    long_mel = fe._np_extract_fbank_features(long_wave, filters)
    assert long_mel.shape == (LONG_FRAMES, 16) and long_mel.dtype == np.float32
    arrays[f"{name}.long_mel"] = long_mel

    x = torch.from_numpy(np.concatenate(feats))
    is_longer = torch.from_numpy(np.concatenate(longer))
    audio_model = model.audio_model
    enc = audio_model.audio_encoder
    captured = {}
    hook = enc.patch_embed.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("image", args[0].clone())
    )
    with torch.no_grad():
        audio = audio_model(input_features=x, is_longer=is_longer)
        hook.remove()
        normed0 = enc.batch_norm(x[:1].transpose(1, 3)).transpose(1, 3)
        image0 = enc.reshape_mel2img(normed0)
        bnm = enc.batch_norm
        normed_by_hand = (x[:1] - bnm.running_mean) / torch.sqrt(
            bnm.running_var + bnm.eps
        ) * bnm.weight + bnm.bias
        image_by_hand = _mel2img_by_hand(normed0)
        # bicubic with align_corners=True at an unchanged size is the identity
        same = torch.nn.functional.interpolate(
            normed0, (FRAMES, 16), mode="bicubic", align_corners=True
        )
        pooled = audio.pooler_output
        hidden = audio.last_hidden_state
        embeds = model.audio_projection(pooled)
        features = model.get_audio_features(input_features=x, is_longer=is_longer).pooler_output
    assert torch.equal(image0, captured["image"][:1])
    assert image0.shape == (1, channels, 64, 64)
    assert torch.allclose(normed0, normed_by_hand, rtol=0, atol=1e-5)
    assert torch.equal(image0, image_by_hand)
    assert torch.equal(same, normed0)
    assert hidden.shape == (3, 48, 1, 16) and pooled.shape == (3, 48)
    assert torch.allclose(pooled, hidden.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    assert torch.allclose(features, torch.nn.functional.normalize(embeds, dim=-1), atol=1e-6)
    arrays[f"{name}.audio.normed0"] = normed0.numpy()
    arrays[f"{name}.audio.image0"] = image0.numpy()
    arrays[f"{name}.audio.pooled"] = pooled.numpy()
    arrays[f"{name}.audio.hidden_states"] = hidden.numpy()
    arrays[f"{name}.audio.embeds"] = embeds.numpy()

    not_longer = None
    if fused:
        off = torch.zeros_like(is_longer)
        x0 = x.clone()
        x0[:, 1:] = 0
        with torch.no_grad():
            a_off = audio_model(input_features=x, is_longer=off).pooler_output
            a_off0 = audio_model(input_features=x0, is_longer=off).pooler_output
            e_off = model.audio_projection(a_off)
        assert torch.equal(a_off, a_off0), "is_longer False reads channel 0 only"
        fusion_effect = float((a_off - pooled).abs().max())
        assert fusion_effect > 1e-3, "the fusion path changes the output"
        arrays[f"{name}.audio.pooled_not_longer"] = a_off.numpy()
        arrays[f"{name}.audio.embeds_not_longer"] = e_off.numpy()
        not_longer = {
            "is_longer": [False, False, False],
            "pooled": f"{name}.audio.pooled_not_longer",
            "embeds": f"{name}.audio.embeds_not_longer",
            "max_abs_change_of_pooled_vs_is_longer_true": fusion_effect,
            "channels_read": "channel 0 only (checked: zeroing channels 1..3 gives "
            "bit-identical outputs)",
        }

    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        t_out = model.text_model(input_ids=ids, attention_mask=mask)
        t_embeds = model.text_projection(t_out.pooler_output)
        t_features = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        out = model(input_ids=ids, attention_mask=mask, input_features=x, is_longer=is_longer)
        zs = model(
            input_ids=zs_text["input_ids"],
            attention_mask=zs_text["attention_mask"],
            input_features=x,
            is_longer=is_longer,
        )
    assert torch.allclose(t_features, torch.nn.functional.normalize(t_embeds, dim=-1), atol=1e-6)
    assert torch.allclose(out.audio_embeds, torch.nn.functional.normalize(embeds, dim=-1))
    ratio = math.exp(LOGIT_SCALE_A) / math.exp(LOGIT_SCALE_T)
    assert torch.allclose(out.logits_per_audio, out.logits_per_text.T * ratio, atol=1e-5)
    probs = zs.logits_per_audio.softmax(dim=1)
    arrays[f"{name}.text.pooled"] = t_out.pooler_output.numpy()
    arrays[f"{name}.text.embeds"] = t_embeds.numpy()
    arrays[f"{name}.logits_per_text"] = out.logits_per_text.numpy()
    arrays[f"{name}.logits_per_audio"] = out.logits_per_audio.numpy()
    arrays[f"{name}.zero_shot.logits"] = zs.logits_per_audio.numpy()
    arrays[f"{name}.zero_shot.probs"] = probs.numpy()

    size = (d / "model.safetensors").stat().st_size
    case = {
        "model": f"models/{name}",
        "model_class": "ClapModel",
        "seed": seed,
        "norm_seed": seed + NORM_SEED_OFFSET,
        "model_safetensors_bytes": size,
        "text_config": text_config,
        "audio_config": audio_config,
        "root_config": {"projection_dim": PROJECTION_DIM, "projection_hidden_act": "relu"},
        "text_layer_norm_eps": model.config.text_config.layer_norm_eps,
        "audio_layer_norm_eps": model.config.audio_config.layer_norm_eps,
        "text_attn_implementation": model.text_model.config._attn_implementation,
        "logit_scale_a": LOGIT_SCALE_A,
        "logit_scale_t": LOGIT_SCALE_T,
        "batch_norms": bn,
        "feature_extractor": {**FE_SETTINGS, "truncation": truncation},
        "mel_filters": f"fe.{filters_attr}: "
        + (
            "mel_filter_bank(129, 16, 50, 3800, 8000, norm='slaney', mel_scale='slaney')"
            if filters_attr == "mel_filters_slaney"
            else "mel_filter_bank(129, 16, 50, 3800, 8000, norm=None, mel_scale='htk')"
        ),
        "input_channels": channels,
        "is_longer_per_wave": [bool(lg[0, 0]) for lg in longer],
        "is_longer_when_batched": (
            "fe(waves) gives the same input_features; is_longer "
            + (
                "has exactly one True, at an index drawn by np.random.randint"
                if fused
                else "all False"
            )
        ),
        "is_longer_in_model": (
            "read: rows with is_longer True take the fusion path (see fusion); required "
            "(None raises)"
            if fused
            else "ignored (only read when enable_fusion)"
        ),
        "audio_call": "model.audio_model(input_features=x [3, C, 201, 16], is_longer [3, 1])",
        "audio_hidden_states_is": "audio_model(...).last_hidden_state [3, 48, 1, 16]: the "
        "final LayerNorm output [B, 16 tokens, 48] permuted to [B, 48, 4, 4] (grid rows, "
        "cols), then split rows into freq_ratio groups of c_freq_bin = 4 // 4 = 1 row, "
        "permuted and reshaped to [B, 48, c_freq_bin, 16]; with c_freq_bin 1 this is "
        "token order: last[b, c, 0, r * 4 + q] = norm(h)[b, r * 4 + q, c]",
        "audio_pooled_is": "pooler_output = mean of last_hidden_state over its last two "
        "axes (AdaptiveAvgPool1d(1) over all 16 tokens)",
        "audio_embeds_is": "audio_projection(pooler_output) = linear2(relu(linear1(p))), "
        "NOT normalised; get_audio_features(...).pooler_output is its L2 normalisation",
        "text_pooled_is": "text_model(input_ids, attention_mask).pooler_output = "
        "tanh(pooler.dense(last_hidden_state[:, 0]))",
        "text_embeds_is": "text_projection(text.pooled), NOT normalised; "
        "get_text_features(...).pooler_output is its L2 normalisation",
        "logits_is": "logits_per_text = exp(logit_scale_t) * t_hat @ a_hat.T [5, 3]; "
        "logits_per_audio = exp(logit_scale_a) * a_hat @ t_hat.T [3, 5] "
        f"(= logits_per_text.T * {ratio:.6g}), x_hat = x / ||x||_2",
        "zero_shot": {
            "logits": f"{name}.zero_shot.logits = logits_per_audio [3 waves, 4 labels]",
            "probabilities": "softmax over the labels",
            "probs": probs.tolist(),
            "best": [LABELS[i] for i in probs.argmax(dim=1).tolist()],
        },
        "safetensors_keys": _safetensors_keys(d),
        "call": "ClapModel.from_pretrained(dir)(input_ids, attention_mask, input_features, "
        "is_longer)",
    }
    if not_longer:
        case["not_longer"] = not_longer
    return case


FORWARD = {
    "batch_norm": "input_features [B, C, T, 16] transposed (1, 3) to [B, 16, T, C], "
    "nn.BatchNorm2d(16) in eval mode (running statistics: the channel axis is the mel bin), "
    "transposed back: (x - running_mean[f]) / sqrt(running_var[f] + 1e-5) * weight[f] + "
    "bias[f] for mel bin f",
    "reshape_mel2img": [
        "spec_width = spec_size * freq_ratio = 256, spec_height = spec_size // freq_ratio = 16",
        "if T > 256 or mels > 16: ValueError",
        "if T < 256: F.interpolate(x, (256, mels), mode='bicubic', align_corners=True) "
        "(PyTorch's bicubic, A = -0.75, taps clamped at the borders, source position "
        "dst * (T - 1) / 255; the mel axis keeps its size, and align_corners=True at an "
        "unchanged size is exactly the identity: checked bit-equal, so this is a 1-D "
        "interpolation along time per mel bin)",
        "if mels < 16: F.interpolate(x, (T, 16), bicubic, align_corners=True) where T is the "
        "ORIGINAL time length (so if both applied the time axis would go back to T); not "
        "reached here",
        "x.reshape(B, C * 4, 64, 16) (time split into 4 chunks of 64 frames)",
        ".permute(0, 1, 3, 2) -> [B, C * 4, 16, 64]",
        ".reshape(B, C, 64, 64): image[b, c, k * 16 + f, t] = interp[b, c, k * 64 + t, f] "
        "(rows: 4 time chunks of 16 mel bins each; columns: 64 frames in a chunk)",
    ],
    "patch_embed": "Conv2d(1, 12, kernel 4x4, stride 4x4, padding ((4-4)//2, (4-4)//2) = 0) "
    "on the image (fused: on channel 0 only, plus the fusion below), flatten(2).transpose "
    "-> [B, 256 tokens row-major over the 16x16 grid, 12], LayerNorm(12, eps 1e-5)",
    "fusion": "enable_fusion only, before the patch LayerNorm: global = proj(image[:, 0:1]) "
    "[B, 12, 16, 16]; for rows with is_longer True: local = image[idx, 1:4] as [n*3, 1, 64, "
    "64] -> mel_conv2d (kernel 4x12, stride 4x12, no padding) -> [n*3, 12, 16, 5] -> view "
    "[n, 3, 12, 16, 5] -> permute(0, 2, 3, 1, 4) -> flatten(3) [n, 12, 16, 15] (the 3 "
    "crops side by side along width) -> zero-padded on the right to 16 -> "
    "global[idx] = AFF(global[idx], local): a = global + local; w = sigmoid(local_att(a) + "
    "global_att(a)) with local_att = Conv1x1(12->3), BN(3), ReLU, Conv1x1(3->12), BN(12) and "
    "global_att = AdaptiveAvgPool2d(1), Conv1x1(12->3), BN(3), ReLU, Conv1x1(3->12), BN(12); "
    "out = 2 * global * w + 2 * local * (1 - w).  Rows with is_longer False use channel "
    "0 only.",
    "swin_stage": [
        "stages (dim, heads, grid): (12, 2, 16x16), (24, 3, 8x8), (48, 4, 4x4); window 4; "
        "block i has shift_size 0 if i is even else window // 2 = 2",
        "at the first forward each block calls set_shift_and_window_size: if min(grid) <= "
        "window, shift = 0 and window = min(grid) (stage 3, 4x4: one window, no shift)",
        "block: shortcut = x; x = layernorm_before(x) viewed [B, H, W, C]; (pad to a multiple "
        "of the window: not needed here); if shift: torch.roll(x, (-s, -s), dims (1, 2)); "
        "window_partition: view [B, H/w, w, W/w, w, C], permute (0, 1, 3, 2, 4, 5) -> "
        "[B * nW, w*w, C] (windows row-major, tokens row-major inside); attention; "
        "window_reverse; roll back (+s, +s); x = shortcut + attn; x = x + "
        "output.dense(gelu(intermediate.dense(layernorm_after(x))))",
        "attention per window: q, k, v Linear(C, C, bias) per head (head_dim C / heads), "
        "scores = q k^T / sqrt(head_dim) + bias[h, i, j] + mask; softmax; @ v; heads "
        "concatenated; attention.output.dense Linear(C, C)",
        "relative position bias: relative_position_bias_table [(2w-1)^2 = 49, heads]; index "
        "[w*w, w*w] = (dy + w - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = coords_i - "
        "coords_j, coords (row, col) of the token in the window; bias = table[index] "
        "permuted to [heads, w*w, w*w] (the index is also a saved buffer)",
        "shifted-window mask (shift s on the padded H x W): region per axis 0 for [0, H - w), "
        "1 for [H - w, H - s), 2 for [H - s, H); label = row_region * 3 + col_region; "
        "partitioned like the tokens; mask[win, i, j] = 0 if labels equal else -100.0; added "
        "to the scores of every head",
        "patch merging after stages 1 and 2: x viewed [B, H, W, C]; cat([x[:, 0::2, 0::2], "
        "x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1) (order: (row 0, col 0), "
        "(row 1, col 0), (row 0, col 1), (row 1, col 1)) -> [B, H/2 * W/2, 4C]; "
        "LayerNorm(4C, eps 1e-5); reduction Linear(4C, 2C, no bias)",
    ],
    "final": "LayerNorm(48, eps 1e-5) over the 16 tokens -> [B, 16, 48]; permute to [B, 48, "
    "16] and reshape [B, 48, freq_shape, temporal_shape] with freq_shape = temporal_shape = "
    "64 // 2**(3-1) // 4 = 4; c_freq_bin = 4 // freq_ratio = 1; reshape [B, 48, 4 // 1, 1, "
    "4], permute (0, 1, 3, 2, 4), reshape [B, 48, 1, 16] = last_hidden_state; "
    "pooler_output = AdaptiveAvgPool1d(1)(flatten(2)) = mean over the 16 tokens [B, 48]",
    "text": "RoBERTa embeddings: word + token_type row 0 + position (ids cumsum(input_ids != "
    "pad) * (input_ids != pad) + pad, pad = 0; computed from input_ids, not from the "
    "attention mask) -> LayerNorm(eps 1e-12); 2 post-norm BERT layers (bidirectional, "
    "padding keys masked); pooler tanh(dense(h[:, 0]))",
    "projection": "ClapProjectionLayer: linear1 Linear(hidden, 20) -> relu -> linear2 "
    "Linear(20, 20)",
}


def make_clap(models: Path) -> dict:
    from transformers import AutoTokenizer, BertTokenizer
    from transformers.models.clap.modeling_clap import ClapTextEmbeddings

    waves, long_wave = _waves()
    arrays: dict[str, np.ndarray] = {f"wave{i}": w for i, w in enumerate(waves)}
    arrays["wave_long"] = long_wave

    ckpts = {name: _checkpoint(name, models / name) for name in CHECKPOINTS}
    src = json.loads((ROBERTA / "config.json").read_text())
    max_len = src["max_position_embeddings"] - src["pad_token_id"] - 1
    prompts = [TEMPLATE.format(label) for label in LABELS]
    encoded = []
    for name in CHECKPOINTS:
        # Each checkpoint folder's own tokenizer (config.json of model_type clap beside it).
        tok = AutoTokenizer.from_pretrained(str(models / name))
        assert isinstance(tok, BertTokenizer) and tok.padding_side == "right"
        assert max_len == tok.model_max_length == 64
        kw = {"padding": True, "truncation": True, "max_length": max_len, "return_tensors": "pt"}
        encoded.append((tok(TEXTS, **kw), tok(prompts, **kw)))
    text, zs_text = encoded[0]
    for t, z in encoded[1:]:
        assert all(torch.equal(t[k], text[k]) and torch.equal(z[k], zs_text[k]) for k in text)
    positions = ClapTextEmbeddings.create_position_ids_from_input_ids(
        text["input_ids"], src["pad_token_id"]
    )
    arrays["input_ids"] = text["input_ids"].numpy()
    arrays["attention_mask"] = text["attention_mask"].numpy()
    arrays["position_ids"] = positions.numpy()
    arrays["zero_shot.input_ids"] = zs_text["input_ids"].numpy()
    arrays["zero_shot.attention_mask"] = zs_text["attention_mask"].numpy()

    # The extractor draws from np.random's global state ("fusion" picks an is_longer
    # index); leave that state as it was.
    np_state = np.random.get_state()
    cases = {
        name: _case(name, models / name, ckpts[name], waves, long_wave, text, zs_text, arrays)
        for name in CHECKPOINTS
    }
    np.random.set_state(np_state)
    for k, v in arrays.items():
        arrays[k] = np.asarray(v).astype(
            np.float32 if np.asarray(v).dtype.kind == "f" else np.int64
        )
    save_npz(models.parent / "clap.npz", arrays)

    return {
        "arrays": "clap.npz",
        "waves": [
            f"wave{i}: float32 [{n}] at 8 kHz, 0.5 * chirp {f0:g} -> {f1:g} Hz + N(0, 0.02) "
            "noise, rounded to multiples of 2^-15"
            for i, (n, (f0, f1)) in enumerate(zip(WAVE_LENGTHS, CHIRPS))
        ]
        + [
            f"wave_long: float32 [{LONG_LENGTH}], chirp {LONG_CHIRP[0]:g} -> "
            f"{LONG_CHIRP[1]:g} Hz, same recipe; only its full mel is stored"
        ],
        "wave_seed": WAVE_SEED,
        "max_samples": MAX_SAMPLES,
        "frames": FRAMES,
        "long_frames": LONG_FRAMES,
        "feature_extractor": {
            "class": "ClapFeatureExtractor",
            "init": FE_SETTINGS,
            "truncation": {k: v[2] for k, v in CHECKPOINTS.items()},
            "call": "fe(wave_i, sampling_rate=8000, return_tensors='np') one wave at a time",
            "log_mel": "spectrogram(x, window_function(256, 'hann') (periodic), "
            "frame_length=256, hop_length=80, power=2.0, center=True, pad_mode='reflect', "
            "mel_filters, mel_floor=1e-10, log_mel='dB') = 10 * log10(max(1e-10, "
            "filters.T @ |rfft|^2)), float64 inside, cast to float32, transposed to "
            "[frames, mels]; top_db unused",
            "repeatpad": "n < 16000: tile int(16000 / n) times, then zero-pad to 16000 "
            "(5000 -> 3 copies + 1000 zeros; 9001 -> 1 copy + 6999 zeros); n == 16000 "
            "unchanged",
            "rand_trunc": "short: mel of the padded wave with mel_filters_slaney, [1, 201, "
            "16]; longer than 16000: a random 16000-sample crop of the WAVE "
            "(np.random.randint), then its mel (is_longer True)",
            "fusion": "short: mel of the padded wave with mel_filters (htk), stacked 4 "
            "times [4, 201, 16]; longer: the full mel, 3 random 201-frame crops (front, "
            "middle, back thirds) and the full mel bilinearly shrunk to [201, 64] — the "
            "64 is hard-coded, so with feature_size 16 the stack fails (ValueError) for "
            "long waves; if no wave of a call is longer, one random index gets is_longer "
            "True",
            "long_mel": "NAME.long_mel = fe._np_extract_fbank_features(wave_long, filters) "
            f"[{LONG_FRAMES}, 16], no cropping",
        },
        "tokenizer": "AutoTokenizer.from_pretrained(dir): BertTokenizer (tokenizer_config's "
        "class; right padding, [CLS] ... [SEP])",
        "text_padding": f"longest, truncation at {max_len} (= max_position_embeddings 65 - "
        "pad_token_id 0 - 1); the attention_mask is passed",
        "texts": TEXTS,
        "labels": LABELS,
        "template": TEMPLATE,
        "prompts": prompts,
        "position_ids_is": "create_position_ids_from_input_ids(input_ids, padding_idx=0): "
        "cumsum(input_ids != 0) * (input_ids != 0) + 0",
        "forward": FORWARD,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "models": cases,
    }
