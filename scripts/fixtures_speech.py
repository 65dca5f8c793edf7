"""Speech/audio-encoder fixtures (part of area ``zoo``): tiny random wav2vec2, HuBERT and
Audio Spectrogram Transformer checkpoints, and transformers' outputs on them.

Run through ``scripts/make_fixtures.py --only zoo`` (``make_zoo`` stores the returned
description under ``"speech"`` in ``zoo/expected.json``; the arrays go to
``zoo/speech.npz``, the checkpoints to ``zoo/models/<name>``).

Inputs: WAVES, three mono 16 kHz float32 signals of 3203, 4801 and 1234 samples (a
linear chirp at amplitude 0.5 plus N(0, 0.02) noise, rounded to multiples of 2^-15 as
decoded 16-bit PCM would be), stored as ``wave0..wave2``.

- ``wav2vec2_tiny``: ``Wav2Vec2Model`` in the wav2vec2-base layout
  (``feat_extract_norm: group``, ``do_stable_layer_norm: false``): a three-layer
  feature encoder (channels 24/20/20, kernels 10/3/2, strides 5/2/2, no conv bias,
  GroupNorm with one group per channel on the first layer only, GELU), a feature
  projection (LayerNorm 20 -> Linear 36), a weight-normed grouped positional
  convolution (kernel 12, 4 groups; the kernel is even, so the "same pad" layer drops
  the last output frame), then post-norm layers (hidden 36, 3 heads, MLP 50, 2 layers)
  after a LayerNorm on the embeddings.
- ``wav2vec2_stable_tiny``: the wav2vec2-large-lv60 layout (``feat_extract_norm:
  layer``, ``do_stable_layer_norm: true``): a LayerNorm over channels in every conv
  layer, conv biases, pre-norm layers with the final LayerNorm after the last layer;
  positional kernel 7 (odd: nothing dropped), 3 groups.  Its model.safetensors is
  rewritten after ``save_pretrained`` so that the positional convolution's weight norm
  uses the hub checkpoints' legacy names ``encoder.pos_conv_embed.conv.weight_g`` /
  ``weight_v`` (transformers saves ``...conv.parametrizations.weight.original0`` /
  ``original1``); reloading it is checked to give the same outputs (the "legacy"
  renaming in transformers' conversion_mapping maps them back).
- ``hubert_tiny``: ``HubertModel`` with the wav2vec2_tiny sizes (group norm, not
  stable, kernel 12, 4 groups) and ``feat_proj_layer_norm: false`` (the feature
  projection is the Linear alone).
  Their preprocessor_config.json is a ``Wav2Vec2FeatureExtractor`` (to_dict:
  16 kHz, do_normalize, padding 0.0; ``return_attention_mask`` false for the group-norm
  checkpoints, true for the stable one).  Reference: the extractor on EACH wave alone
  (no padding), whose ``input_values`` is ``(x - x.mean()) / sqrt(x.var() + 1e-7)`` in
  float32 numpy (``w2v.input_values{i}``); then the model on that one clip (batch of 1,
  no attention mask): ``{name}.hidden{i}`` = ``last_hidden_state[0]`` [T_i, 36] with
  T_i = 159, 239, 61 frames, and ``{name}.pooled{i}`` = its mean over frames.
- ``ast_tiny`` / ``ast_cls_tiny``: Audio Spectrogram Transformer at odd shapes (20 mel
  bins, 27 frames, hidden 36, 3 heads, MLP 50, 2 layers).  ``ast_tiny`` is an
  ``ASTModel`` with 6x6 patches at strides 4 (frequency) x 5 (time): 4 x 5 patches +
  CLS + distillation = 22 tokens; ``ast_cls_tiny`` an ``ASTForAudioClassification``
  (5 labels, weights under ``audio_spectrogram_transformer.``) with 5x5 patches at
  strides 3 x 4: 6 x 6 + 2 = 38 tokens.  Patches are numbered frequency-major (the
  conv runs on the [mel, frame] transpose of the features).  Their
  preprocessor_config.json is an ``ASTFeatureExtractor`` (to_dict: 20 mel bins,
  max_length 27, AudioSet mean -4.2677393 / std 4.5689974).  Without torchaudio (as
  here) the extractor takes its numpy path: ``audio_utils.spectrogram`` with 400-sample
  frames every 160 samples (no centring, frames = 1 + (len - 400) // 160), per frame the
  DC offset removed, pre-emphasis 0.97 (``y[0] *= 0.03``; ``y[n] -= 0.97 x[n-1]``), a
  symmetric 400-point Hann window, a 512-point rFFT stored as complex64, the power
  ``|X|^2`` in float64, a Kaldi mel bank (257 bins, 20..8000 Hz, mel = 1127 ln(1 +
  f / 700), triangles in mel space, no normalisation), ``log(max(mel, 2^-23))``, cast
  to float32; no 2^15 scaling and no dither.  The fbank is zero-padded (or truncated)
  to 27 frames and then normalised as ``(fbank - mean) / (2 * std)``, so padded rows
  hold ``-mean / (2 * std)``.  Reference: ``ast.fbank{i}`` (the raw fbank of each wave
  alone, its true 18/28/6 frames), ``ast.features{i}`` (the extractor's
  ``input_values`` [27, 20]: waves 0 and 2 padded, wave 1's 28 frames truncated), and
  the model on the three features as one batch: ``{name}.hidden_states`` =
  ``last_hidden_state`` (after the final LayerNorm) and ``{name}.pooled`` = the
  pooler_output ``(hidden[:, 0] + hidden[:, 1]) / 2``.
  All parameters are redrawn like the other zoo checkpoints (``_redraw``: norm weights
  1 + 0.1 N(0,1), everything else 0.2 N(0,1), the weight-norm magnitude included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fixtures_zoo import SEED, _redraw
from make_fixtures import save_npz, write_json

RATE = 16000
WAVE_LENGTHS = [3203, 4801, 1234]
# (start Hz, end Hz) of each wave's linear chirp.
CHIRPS = [(220.0, 3400.0), (3000.0, 300.0), (900.0, 6500.0)]

W2V_SIZES = {
    "hidden_size": 36,
    "num_attention_heads": 3,
    "num_hidden_layers": 2,
    "intermediate_size": 50,
    "conv_dim": [24, 20, 20],
    "conv_kernel": [10, 3, 2],
    "conv_stride": [5, 2, 2],
    "hidden_act": "gelu",
    "feat_extract_activation": "gelu",
}
AST_SIZES = {
    "hidden_size": 36,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 50,
    "num_mel_bins": 20,
    "max_length": 27,
    "hidden_act": "gelu",
}
AST_FE = {
    "feature_size": 1,
    "sampling_rate": RATE,
    "num_mel_bins": 20,
    "max_length": 27,
    "padding_value": 0.0,
    "do_normalize": True,
    "mean": -4.2677393,
    "std": 4.5689974,
}


def _waves() -> list[np.ndarray]:
    rng = np.random.default_rng(SEED + 2)
    waves = []
    for n, (f0, f1) in zip(WAVE_LENGTHS, CHIRPS):
        t = np.arange(n) / RATE
        dur = n / RATE
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur))
        x = 0.5 * np.sin(phase) + 0.02 * rng.standard_normal(n)
        # Multiples of 2^-15, as a decoder turns 16-bit PCM into floats.
        waves.append((np.round(np.clip(x, -1, 1) * 32768) / 32768).astype(np.float32))
    return waves


def _frames(n: int, kernels: list[int], strides: list[int]) -> int:
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


def _save_checkpoint(model, d: Path, fe) -> None:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    write_json(d / "preprocessor_config.json", fe.to_dict())


def _load(cls, d: Path):
    model, info = cls.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d.name}: {bad}"
    return model.eval()


def _legacy_weight_norm_names(path: Path) -> list[str]:
    """Renames the positional conv's weight-norm tensors to the hub's weight_g/weight_v."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    renamed = {}
    for k, v in tensors.items():
        k2 = k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        )
        renamed[k2] = v
    changed = sorted(set(renamed) - set(tensors))
    assert len(changed) == 2, changed
    save_file(renamed, str(path), metadata={"format": "pt"})
    return changed


def _wav2vec2_family(models: Path, waves: list[np.ndarray], arrays: dict) -> tuple[dict, dict]:
    from transformers import (
        HubertConfig,
        HubertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    variants = {
        "wav2vec2_tiny": (
            Wav2Vec2Model,
            Wav2Vec2Config,
            {
                "feat_extract_norm": "group",
                "do_stable_layer_norm": False,
                "conv_bias": False,
                "num_conv_pos_embeddings": 12,
                "num_conv_pos_embedding_groups": 4,
            },
            False,
        ),
        "wav2vec2_stable_tiny": (
            Wav2Vec2Model,
            Wav2Vec2Config,
            {
                "feat_extract_norm": "layer",
                "do_stable_layer_norm": True,
                "conv_bias": True,
                "num_conv_pos_embeddings": 7,
                "num_conv_pos_embedding_groups": 3,
            },
            True,
        ),
        "hubert_tiny": (
            HubertModel,
            HubertConfig,
            {
                "feat_extract_norm": "group",
                "do_stable_layer_norm": False,
                "conv_bias": False,
                "feat_proj_layer_norm": False,
                "num_conv_pos_embeddings": 12,
                "num_conv_pos_embedding_groups": 4,
            },
            False,
        ),
    }

    # The extractor's output does not depend on return_attention_mask without padding.
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    )
    inputs = []
    for i, w in enumerate(waves):
        iv = fe(w, sampling_rate=RATE, return_tensors="np")["input_values"][0]
        assert iv.dtype == np.float32 and iv.shape == w.shape
        by_hand = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
        assert np.array_equal(iv, by_hand), "zero-mean unit-variance, eps 1e-7, float32"
        arrays[f"w2v.input_values{i}"] = iv
        inputs.append(iv)
    processor = {
        "class": "Wav2Vec2FeatureExtractor",
        "init": {
            "feature_size": 1,
            "sampling_rate": RATE,
            "padding_value": 0.0,
            "do_normalize": True,
            "return_attention_mask": "false (wav2vec2_tiny, hubert_tiny), "
            "true (wav2vec2_stable_tiny)",
        },
        "call": "fe(wave_i, sampling_rate=16000, return_tensors='np')['input_values'][0], "
        "one wave at a time (no padding)",
        "input_values_is": "(x - x.mean()) / np.sqrt(x.var() + 1e-7) over the whole clip, "
        "float32 numpy (checked equal)",
        "outputs": "w2v.input_values{i}: float32 [len_i]",
    }

    cases = {}
    for k, (name, (cls, cfg_cls, extra, mask)) in enumerate(variants.items()):
        seed = SEED + 20 + k
        d = models / name
        cfg = cfg_cls(**W2V_SIZES, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        _redraw(model, seed)
        fe_k = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=RATE,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=mask,
        )
        _save_checkpoint(model, d, fe_k)
        model = _load(cls, d)

        def run(m):
            with torch.no_grad():
                return [m(torch.from_numpy(iv[None])).last_hidden_state[0] for iv in inputs]

        hidden = run(model)
        legacy = None
        if name == "wav2vec2_stable_tiny":
            legacy = _legacy_weight_norm_names(d / "model.safetensors")
            again = run(_load(cls, d))
            for a, b in zip(hidden, again):
                diff = float((a - b).abs().max())
                assert diff < 1e-6, f"legacy weight_g/weight_v reload differs by {diff}"
        frames = []
        for i, h in enumerate(hidden):
            t = _frames(len(inputs[i]), W2V_SIZES["conv_kernel"], W2V_SIZES["conv_stride"])
            assert h.shape == (t, 36), (name, h.shape, t)
            frames.append(t)
            arrays[f"{name}.hidden{i}"] = h.numpy().astype(np.float32)
            arrays[f"{name}.pooled{i}"] = h.mean(0).numpy().astype(np.float32)
        cases[name] = {
            "model": f"models/{name}",
            "model_class": cls.__name__,
            "seed": seed,
            "config": {**W2V_SIZES, **extra},
            "preprocessor_return_attention_mask": mask,
            "frames": frames,
            "hidden_is": "last_hidden_state[0] of the model on w2v.input_values{i}[None] "
            "(one clip at a time, no attention mask)",
            "pooled_is": "last_hidden_state.mean over frames (one clip at a time, no padding)",
        }
        if legacy:
            cases[name]["weight_norm_names"] = (
                f"legacy {legacy} in model.safetensors (renamed after save_pretrained from "
                "...parametrizations.weight.original0/original1; the reload gives the same "
                "outputs)"
            )
    return cases, processor


def _ast(models: Path, waves: list[np.ndarray], arrays: dict) -> tuple[dict, dict]:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel
    from transformers.utils import is_speech_available

    # torchaudio would switch the extractor to ta_kaldi.fbank; these fixtures pin the
    # numpy path.
    assert not is_speech_available(), "expected the numpy fbank path (no torchaudio)"
    fe = ASTFeatureExtractor(**AST_FE)
    feats = []
    raw_frames = []
    for i, w in enumerate(waves):
        f = fe(w, sampling_rate=RATE, return_tensors="np")["input_values"][0]
        assert f.shape == (27, 20), f.shape
        feats.append(f.astype(np.float32))
        arrays[f"ast.features{i}"] = feats[-1]
        n = 1 + (len(w) - 400) // 160
        full = fe._extract_fbank_features(w, max_length=10**6)
        assert not full[n:].any()
        arrays[f"ast.fbank{i}"] = full[:n].astype(np.float32)
        raw_frames.append(n)
        expect = np.zeros((27, 20), np.float32)
        expect[: min(n, 27)] = full[: min(n, 27)]
        expect = (expect - AST_FE["mean"]) / (AST_FE["std"] * 2)
        assert np.allclose(f, expect, rtol=0, atol=1e-6)
    processor = {
        "class": "ASTFeatureExtractor",
        "init": AST_FE,
        "fbank_path": "numpy",
        "fbank_is": "transformers.audio_utils.spectrogram(x, hann(400, symmetric), "
        "frame_length=400, hop_length=160, fft_length=512, power=2.0, center=False, "
        "preemphasis=0.97, remove_dc_offset=True, mel_filters=mel_filter_bank(257, 20, 20, "
        "8000, 16000, norm=None, mel_scale='kaldi', triangularize_in_mel_space=True), "
        "log_mel='log', mel_floor=1.192092955078125e-07).T; the rFFT is stored as "
        "complex64, power/mel/log in float64, result cast to float32; no dither, no 2^15 "
        "scaling",
        "call": "fe(wave_i, sampling_rate=16000, return_tensors='np')['input_values'][0] "
        "(one wave at a time); ast.fbank{i} = fe._extract_fbank_features(wave_i, "
        "max_length=10**6)[:frames_i]",
        "features_is": "fbank zero-padded or truncated to 27 frames, then "
        "(fbank - mean) / (2 * std)",
        "fbank_frames": raw_frames,
        "outputs": "ast.fbank{i}: float32 [frames_i, 20]; ast.features{i}: float32 [27, 20]",
    }

    batch = torch.from_numpy(np.stack(feats))
    variants = {
        "ast_tiny": (ASTModel, {"patch_size": 6, "frequency_stride": 4, "time_stride": 5}),
        "ast_cls_tiny": (
            ASTForAudioClassification,
            {"patch_size": 5, "frequency_stride": 3, "time_stride": 4, "num_labels": 5},
        ),
    }
    cases = {}
    for k, (name, (cls, extra)) in enumerate(variants.items()):
        seed = SEED + 23 + k
        d = models / name
        cfg = ASTConfig(**AST_SIZES, **extra)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        _redraw(model, seed)
        _save_checkpoint(model, d, fe)
        model = _load(cls, d)
        base = model if cls is ASTModel else model.audio_spectrogram_transformer
        f_out, t_out = base.embeddings.get_shape(cfg)
        tokens = f_out * t_out + 2
        with torch.no_grad():
            out = base(input_values=batch)
        hidden, pooled = out.last_hidden_state, out.pooler_output
        assert hidden.shape == (3, tokens, 36), hidden.shape
        assert torch.equal(pooled, (hidden[:, 0] + hidden[:, 1]) / 2)
        arrays[f"{name}.hidden_states"] = hidden.numpy().astype(np.float32)
        arrays[f"{name}.pooled"] = pooled.numpy().astype(np.float32)
        cases[name] = {
            "model": f"models/{name}",
            "model_class": cls.__name__,
            "seed": seed,
            "config": {**AST_SIZES, **extra},
            "patches": [f_out, t_out],
            "tokens": tokens,
            "hidden_states_is": "last_hidden_state (after the final layernorm) of "
            + ("the model" if cls is ASTModel else "model.audio_spectrogram_transformer")
            + " on the stacked ast.features{0,1,2} [3, 27, 20]; tokens: CLS, distillation, "
            "then patches frequency-major",
            "pooled_is": "pooler_output = (last_hidden_state[:, 0] + last_hidden_state[:, 1]) / 2",
        }
    return cases, processor


def make_speech(models: Path) -> dict:
    waves = _waves()
    arrays: dict[str, np.ndarray] = {f"wave{i}": w for i, w in enumerate(waves)}
    w2v_cases, w2v_proc = _wav2vec2_family(models, waves, arrays)
    ast_cases, ast_proc = _ast(models, waves, arrays)
    assert all(v.dtype == np.float32 for v in arrays.values())
    save_npz(models.parent / "speech.npz", arrays)
    return {
        "arrays": "speech.npz",
        "waves": [
            f"wave{i}: float32 [{n}] at 16 kHz, 0.5 * chirp {f0:g} -> {f1:g} Hz + N(0, 0.02) "
            "noise, rounded to multiples of 2^-15"
            for i, (n, (f0, f1)) in enumerate(zip(WAVE_LENGTHS, CHIRPS))
        ],
        "processors": {"wav2vec2": w2v_proc, "ast": ast_proc},
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "models": {**w2v_cases, **ast_cases},
    }
