//! Audio preprocessing: raw audio to the features an audio encoder takes — Whisper
//! log-mel chunks by default, the normalised waveform for wav2vec 2.0 / HuBERT, or
//! Kaldi filter banks for the Audio Spectrogram Transformer ([`AudioFeatureKind`], from
//! the checkpoint's `feature_extractor_type`). The Whisper path is described here; the
//! others differ only in what a chunk becomes (see [`kind`] and [`fbank`]).
//!
//! Input per item ([`AudioInput`]): an encoded file (path or bytes: WAV, FLAC, MP3, Ogg
//! Vorbis) or float32 samples `[channels, samples]` with an optional sampling rate.
//! Each item is decoded (`decode`), averaged over channels, resampled to the configured
//! rate (`resample`), split into chunks of `chunk_length` seconds, and each chunk turned
//! into a log-mel spectrogram (`mel`) exactly as transformers' `WhisperFeatureExtractor`
//! computes it.
//!
//! Output ([`AudioFeatures`]): float32 `[total_chunks, n_mels, frames]` (frames =
//! `chunk_length * sampling_rate / hop_length`, 3000 for Whisper) and the number of
//! chunks each input produced, in input order.
//!
//! Chunking: an input no longer than one chunk gives exactly one chunk, right-padded with
//! `padding_value` (identical to the reference). Longer inputs are cut into consecutive
//! windows of `chunk_length` seconds starting every `chunk_length - 2 * stride_length_s`
//! seconds (the overlap scheme of transformers' ASR pipeline), the last one padded.
//!
//! Differences from the reference: inputs at another sampling rate are resampled rather
//! than refused, multi-channel audio is averaged to mono, and dithering (a training-time
//! option, 0 in released checkpoints) is not applied.

pub mod clap;
mod decode;
pub mod fbank;
pub mod kind;
pub(crate) mod mel;
mod resample;

use std::borrow::Cow;
use std::path::Path;

use ndarray::{Array2, Array3, ArrayView2, Axis};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{AtIndex, MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::{Processor, Source};

pub use decode::decode_audio;
pub use kind::AudioFeatureKind;
pub use mel::mel_filter_bank;
pub use resample::resample;

use clap::ClapMel;
use fbank::Fbank;
use mel::LogMel;
use resample::{check_rate, MAX_SAMPLING_RATE, MIN_SAMPLING_RATE};

/// One raw audio item.
#[derive(Debug, Clone)]
pub enum AudioInput {
    /// An encoded file (WAV, FLAC, MP3, Ogg Vorbis); its header gives the sampling rate.
    Source(Source),
    /// Decoded samples, `[channels, samples]`. `sampling_rate: None` falls back to the
    /// rate given to the call, then to the processor's own rate.
    Samples {
        data: Array2<f32>,
        sampling_rate: Option<u32>,
    },
}

/// One audio input of a batch, by reference: an encoded source, or samples borrowed
/// from the caller (no copy).
#[derive(Debug, Clone)]
pub enum AudioRef<'a> {
    /// An encoded file (WAV, FLAC, MP3, Ogg Vorbis); its header gives the sampling rate.
    Source(&'a Source),
    /// Decoded samples, `[channels, samples]`, as in [`AudioInput::Samples`].
    Samples {
        data: ArrayView2<'a, f32>,
        sampling_rate: Option<u32>,
    },
}

impl<'a> From<&'a AudioInput> for AudioRef<'a> {
    fn from(x: &'a AudioInput) -> Self {
        match x {
            AudioInput::Source(s) => Self::Source(s),
            AudioInput::Samples {
                data,
                sampling_rate,
            } => Self::Samples {
                data: data.view(),
                sampling_rate: *sampling_rate,
            },
        }
    }
}

/// Settings of [`AudioProcessor`]. Field names are those of a Hugging Face
/// `preprocessor_config.json` for `WhisperFeatureExtractor`; missing keys take the Whisper
/// defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AudioProcessorConfig {
    /// Number of mel filters (80; 128 for large-v3).
    pub feature_size: usize,
    /// Rate the model expects; inputs are resampled to it.
    pub sampling_rate: u32,
    /// STFT hop in samples.
    pub hop_length: usize,
    /// Chunk length in seconds.
    pub chunk_length: usize,
    /// STFT window and FFT length in samples.
    pub n_fft: usize,
    /// Value used to pad chunks shorter than `chunk_length`.
    pub padding_value: f32,
    /// Overlap in seconds on each side between consecutive chunks of long audio.
    pub stride_length_s: f64,
    /// Inputs longer than this many seconds are refused (`None`: no limit).
    pub max_duration_s: Option<f64>,
    /// What a chunk becomes (Whisper log-mel unless the checkpoint's
    /// `feature_extractor_type` says otherwise). Left out of the serialised settings
    /// when it is the Whisper default.
    #[serde(skip_serializing_if = "AudioFeatureKind::is_whisper")]
    pub features: AudioFeatureKind,
}

impl Default for AudioProcessorConfig {
    fn default() -> Self {
        Self::whisper()
    }
}

fn get_key<T: DeserializeOwned>(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    expected: &str,
) -> Result<Option<T>> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| MlmfError::config(key, format!("expected {expected}, got {v}"))),
    }
}

impl AudioProcessorConfig {
    /// The `openai/whisper-*` (except large-v3) settings: 80 mels, 16 kHz, hop 160,
    /// 30 s chunks, n_fft 400, no stride, no duration limit.
    pub fn whisper() -> Self {
        Self {
            feature_size: 80,
            sampling_rate: 16000,
            hop_length: 160,
            chunk_length: 30,
            n_fft: 400,
            padding_value: 0.0,
            stride_length_s: 0.0,
            max_duration_s: None,
            features: AudioFeatureKind::WhisperLogMel,
        }
    }

    /// Reads a parsed `preprocessor_config.json` (or these settings as serialised).
    /// Unknown keys are ignored. `feature_extractor_type` picks the features:
    /// `WhisperFeatureExtractor` (the default), `Wav2Vec2FeatureExtractor` or
    /// `ASTFeatureExtractor` (its `num_mel_bins` becomes `feature_size`); any other is
    /// refused, since it computes features mlmf does not. The result is validated.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            MlmfError::config(
                "preprocessor_config",
                format!("expected a JSON object, got {v}"),
            )
        })?;
        let mut cfg = Self::whisper();
        let mut fixed_bins = None;
        if let Some(name) = obj.get("feature_extractor_type") {
            (cfg.features, fixed_bins) = AudioFeatureKind::from_hf(name, obj)?;
        } else if let Some(features) = obj.get("features") {
            cfg.features = serde_json::from_value(features.clone())
                .map_err(|e| MlmfError::config("features", format!("{e}, got {features}")))?;
        }
        let uint = "a non-negative integer";
        if let Some(x) = fixed_bins {
            cfg.feature_size = x;
        } else if let Some(x) = get_key(obj, "feature_size", uint)? {
            cfg.feature_size = x;
        }
        if let Some(x) = get_key(obj, "sampling_rate", uint)? {
            cfg.sampling_rate = x;
        }
        if let Some(x) = get_key(obj, "hop_length", uint)? {
            cfg.hop_length = x;
        }
        if let Some(x) = get_key(obj, "chunk_length", uint)? {
            cfg.chunk_length = x;
        }
        if let Some(x) = get_key(obj, "n_fft", uint)? {
            cfg.n_fft = x;
        }
        if matches!(cfg.features, AudioFeatureKind::ClapMel { .. }) && fixed_bins.is_some() {
            // ClapFeatureExtractor's own names, and its defaults (48 kHz, 10 s, hop 480,
            // window 1024) where the file has none.
            cfg.sampling_rate = get_key(obj, "sampling_rate", uint)?.unwrap_or(48_000);
            cfg.hop_length = get_key(obj, "hop_length", uint)?.unwrap_or(480);
            cfg.chunk_length = get_key(obj, "max_length_s", uint)?.unwrap_or(10);
            cfg.n_fft = get_key(obj, "fft_window_size", uint)?.unwrap_or(1024);
        }
        if let Some(x) = get_key(obj, "padding_value", "a number")? {
            cfg.padding_value = x;
        }
        if let Some(x) = get_key(obj, "stride_length_s", "a number")? {
            cfg.stride_length_s = x;
        }
        if let Some(x) = get_key(obj, "max_duration_s", "a number or null")? {
            cfg.max_duration_s = x;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Samples per chunk (call after `validate`): `chunk_length * sampling_rate`, or
    /// for filter banks the samples `max_length` frames span.
    fn n_samples(&self) -> usize {
        match self.features {
            AudioFeatureKind::KaldiFbank { max_length, .. } => (max_length - 1)
                .saturating_mul(self.hop_length)
                .saturating_add(self.n_fft),
            _ => self
                .chunk_length
                .saturating_mul(self.sampling_rate as usize),
        }
    }

    /// Overlap per side in samples.
    fn stride_samples(&self) -> usize {
        (self.stride_length_s * f64::from(self.sampling_rate)).round() as usize
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.features.validate()?;
        if self.feature_size == 0 || self.feature_size > 1024 {
            return Err(MlmfError::config(
                "feature_size",
                format!("must be in 1..=1024 mel filters, got {}", self.feature_size),
            ));
        }
        if !(MIN_SAMPLING_RATE..=MAX_SAMPLING_RATE).contains(&self.sampling_rate) {
            return Err(MlmfError::config(
                "sampling_rate",
                format!(
                    "must be in {MIN_SAMPLING_RATE}..={MAX_SAMPLING_RATE} Hz, got {}",
                    self.sampling_rate
                ),
            ));
        }
        if self.n_fft < 2 {
            return Err(MlmfError::config(
                "n_fft",
                format!("must be at least 2, got {}", self.n_fft),
            ));
        }
        if self.hop_length == 0 {
            return Err(MlmfError::config("hop_length", "must be at least 1, got 0"));
        }
        // One chunk must hold at least one FFT window; the product is also bounded so a
        // single chunk stays within a sane size (an hour at the highest rate).
        let n_samples = (self.chunk_length as u64) * u64::from(self.sampling_rate);
        let fbank = matches!(self.features, AudioFeatureKind::KaldiFbank { .. });
        if !fbank
            && (self.chunk_length == 0 || n_samples < self.n_fft as u64 || self.chunk_length > 3600)
        {
            return Err(MlmfError::config(
                "chunk_length",
                format!(
                    "must be 1..=3600 s and hold at least n_fft = {} samples at {} Hz, got {}",
                    self.n_fft, self.sampling_rate, self.chunk_length
                ),
            ));
        }
        if self.hop_length > self.n_samples() {
            return Err(MlmfError::config(
                "hop_length",
                format!(
                    "must not exceed the {} samples of a chunk, got {}",
                    self.n_samples(),
                    self.hop_length
                ),
            ));
        }
        if !self.padding_value.is_finite() {
            return Err(MlmfError::config(
                "padding_value",
                format!("must be finite, got {}", self.padding_value),
            ));
        }
        if !(self.stride_length_s.is_finite() && self.stride_length_s >= 0.0)
            || 2 * self.stride_samples() >= self.n_samples()
        {
            return Err(MlmfError::config(
                "stride_length_s",
                format!(
                    "must be >= 0 and less than half of chunk_length ({} s), got {}",
                    self.chunk_length, self.stride_length_s
                ),
            ));
        }
        if let Some(d) = self.max_duration_s {
            if !(d.is_finite() && d > 0.0) {
                return Err(MlmfError::config(
                    "max_duration_s",
                    format!("must be a positive number of seconds or null, got {d}"),
                ));
            }
        }
        Ok(())
    }
}

/// Features of a batch: every chunk of every input, in input order.
#[derive(Debug, Clone)]
pub struct AudioFeatures {
    /// `[total_chunks, n_mels, frames]` float32.
    pub input_features: Array3<f32>,
    /// Chunks per input; sums to `total_chunks`.
    pub num_chunks: Vec<usize>,
    /// Per chunk, how many leading frames hold real audio (the rest is padding): frame
    /// `t` starts at sample `t * hop_length`, so this is `ceil(samples / hop_length)`,
    /// the frames transformers' `return_attention_mask=True` marks with 1.
    pub valid_frames: Vec<usize>,
}

/// Audio feature extractor: raw audio to feature chunks (Whisper log-mel, normalised
/// waveform or Kaldi filter banks). Cheap to share across threads; FFT plans and filter
/// banks are built once in [`AudioProcessor::new`].
pub struct AudioProcessor {
    cfg: AudioProcessorConfig,
    extractor: Extractor,
    /// Distance between chunk starts in samples.
    step: usize,
}

/// What turns one chunk of samples into features.
enum Extractor {
    LogMel(LogMel),
    /// Chunks of at most `n_samples` samples, padded to the batch's longest.
    Waveform {
        n_samples: usize,
        normalise: bool,
    },
    Fbank(Fbank),
    ClapMel(ClapMel),
}

impl Extractor {
    /// Samples a chunk holds at most.
    fn n_samples(&self) -> usize {
        match self {
            Self::LogMel(m) => m.n_samples(),
            Self::Waveform { n_samples, .. } => *n_samples,
            Self::Fbank(f) => f.n_samples(),
            Self::ClapMel(c) => c.n_samples(),
        }
    }

    /// The fewest samples the last chunk of a long input may hold (a shorter tail is
    /// dropped): one analysis frame, except for Whisper, which pads any tail.
    fn min_tail(&self, frame: usize) -> usize {
        match self {
            Self::LogMel(_) | Self::ClapMel(_) => 1,
            Self::Waveform { .. } => frame,
            Self::Fbank(f) => f.min_samples(),
        }
    }
}

impl std::fmt::Debug for AudioProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioProcessor")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn input_error(message: impl Into<String>) -> MlmfError {
    MlmfError::input(Modality::Audio, message)
}

/// Index of the first NaN or infinity in `x`. Scans blocks with a branch-free test
/// (which vectorises) and looks closer only at a block that has one.
fn first_non_finite(x: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    x.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        let any = chunk.iter().fold(false, |acc, v| {
            acc | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        });
        if any {
            chunk
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| b * BLOCK + i)
        } else {
            None
        }
    })
}

/// Checks channels (all of one length) and averages them to mono; a single channel is
/// borrowed as is.
fn downmix<'a>(channels: &[&'a [f32]]) -> Result<Cow<'a, [f32]>> {
    let samples = channels.first().map_or(0, |c| c.len());
    if samples == 0 {
        return Err(input_error("expected at least one sample, got empty audio"));
    }
    for (c, row) in channels.iter().enumerate() {
        if let Some(t) = first_non_finite(row) {
            return Err(input_error(format!(
                "expected finite samples, got {} at channel {c}, sample {t}",
                row[t]
            )));
        }
    }
    if let [only] = channels {
        return Ok(Cow::Borrowed(only));
    }
    let scale = 1.0 / channels.len() as f32;
    let mut mono = vec![0.0f32; samples];
    for row in channels {
        for (m, &v) in mono.iter_mut().zip(row.iter()) {
            *m += v;
        }
    }
    mono.iter_mut().for_each(|m| *m *= scale);
    Ok(Cow::Owned(mono))
}

/// Mono samples of a `[channels, samples]` array.
fn downmix_array(data: ArrayView2<'_, f32>) -> Result<Cow<'_, [f32]>> {
    let (channels, samples) = data.dim();
    if channels == 0 {
        return Err(input_error(
            "expected audio shaped [channels, samples] with at least one channel, got 0 channels",
        ));
    }
    if samples == 0 {
        return Err(input_error("expected at least one sample, got empty audio"));
    }
    match data.to_slice() {
        Some(flat) => downmix(&flat.chunks_exact(samples).collect::<Vec<_>>()),
        None => {
            let owned = data.as_standard_layout().into_owned();
            let flat = owned.as_slice().ok_or_else(|| {
                MlmfError::Internal("standard-layout audio is not contiguous".into())
            })?;
            let rows: Vec<&[f32]> = flat.chunks_exact(samples).collect();
            Ok(Cow::Owned(downmix(&rows)?.into_owned()))
        }
    }
}

impl AudioProcessor {
    /// Validates `cfg`, plans the FFT and builds the mel filter bank.
    pub fn new(cfg: AudioProcessorConfig) -> Result<Self> {
        cfg.validate()?;
        let extractor = match &cfg.features {
            AudioFeatureKind::WhisperLogMel => Extractor::LogMel(LogMel::new(
                cfg.n_fft,
                cfg.hop_length,
                cfg.n_samples(),
                cfg.feature_size,
                cfg.sampling_rate,
                cfg.padding_value,
            )),
            AudioFeatureKind::Waveform { do_normalize } => Extractor::Waveform {
                n_samples: cfg.n_samples(),
                normalise: *do_normalize,
            },
            AudioFeatureKind::KaldiFbank {
                max_length,
                do_normalize,
                mean,
                std,
            } => Extractor::Fbank(Fbank::new(
                cfg.n_fft,
                cfg.hop_length,
                cfg.feature_size,
                *max_length,
                cfg.sampling_rate,
                do_normalize.then_some((*mean, *std)),
            )),
            AudioFeatureKind::ClapMel {
                frequency_min,
                frequency_max,
                htk,
                padding,
            } => Extractor::ClapMel(ClapMel::new(
                cfg.n_fft,
                cfg.hop_length,
                cfg.n_samples(),
                cfg.feature_size,
                cfg.sampling_rate,
                (*frequency_min, *frequency_max),
                *htk,
                *padding,
            )),
        };
        let step = cfg.n_samples() - 2 * cfg.stride_samples();
        Ok(Self {
            cfg,
            extractor,
            step,
        })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or that file itself).
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = if dir.is_file() {
            dir.to_path_buf()
        } else {
            dir.join("preprocessor_config.json")
        };
        let what = "audio preprocessor config";
        let text = std::fs::read_to_string(&path)
            .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| MlmfError::model_load(what, &path, format!("invalid JSON: {e}")))?;
        let cfg = AudioProcessorConfig::from_hf_json(&json)
            .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
        Self::new(cfg)
    }

    /// The settings this processor was built with.
    pub fn config(&self) -> &AudioProcessorConfig {
        &self.cfg
    }

    /// Mono samples at the configured rate: decodes a source, averages channels and
    /// resamples. `sampling_rate` is the rate of [`AudioInput::Samples`] that carry none
    /// (an encoded file's header always wins); with neither, samples are taken to be at
    /// the configured rate already. Errors if the audio is empty, holds NaN or infinity,
    /// or is longer than `max_duration_s`.
    pub fn load<'a>(
        &self,
        input: impl Into<AudioRef<'a>>,
        sampling_rate: Option<u32>,
    ) -> Result<Vec<f32>> {
        self.load_mono(&input.into(), sampling_rate)
            .map(Cow::into_owned)
    }

    /// [`AudioProcessor::load`], borrowing mono input that needs no conversion.
    fn load_mono<'a>(
        &self,
        input: &AudioRef<'a>,
        sampling_rate: Option<u32>,
    ) -> Result<Cow<'a, [f32]>> {
        if let Some(r) = sampling_rate {
            check_rate(r, "sampling_rate")?;
        }
        let (mono, rate) = match input {
            AudioRef::Source(src) => {
                let bytes = src.bytes(Modality::Audio)?;
                let mut decoded = decode::decode_planes(&bytes, self.cfg.max_duration_s)?;
                check_rate(decoded.rate, "the file's sampling rate")?;
                let mono = if decoded.planes.len() == 1 && decoded.frames > 0 {
                    // Moved, not copied; checked like any other input.
                    let only = decoded.planes.swap_remove(0);
                    downmix(&[&only])?;
                    only
                } else {
                    let rows: Vec<&[f32]> = decoded.planes.iter().map(Vec::as_slice).collect();
                    downmix(&rows)?.into_owned()
                };
                (Cow::Owned(mono), decoded.rate)
            }
            AudioRef::Samples {
                data,
                sampling_rate: own,
            } => {
                let rate = own.or(sampling_rate).unwrap_or(self.cfg.sampling_rate);
                check_rate(rate, "sampling_rate")?;
                (downmix_array(*data)?, rate)
            }
        };
        if let Some(max) = self.cfg.max_duration_s {
            let seconds = mono.len() as f64 / f64::from(rate);
            if seconds > max {
                return Err(input_error(format!(
                    "expected at most max_duration_s = {max} s of audio, got {seconds:.3} s"
                )));
            }
        }
        if rate == self.cfg.sampling_rate {
            Ok(mono)
        } else {
            resample(&mono, rate, self.cfg.sampling_rate).map(Cow::Owned)
        }
    }

    /// Chunks a `len`-sample input is split into (at least 1).
    fn chunk_count(&self, len: usize) -> usize {
        let n = self.extractor.n_samples();
        if len <= n {
            return 1;
        }
        let mut count = 1 + (len - n).div_ceil(self.step);
        let tail = self.extractor.min_tail(self.cfg.n_fft);
        while count > 1 && len - (count - 1) * self.step < tail {
            count -= 1;
        }
        count
    }

    /// Samples of chunk `k` (possibly shorter than a chunk; the extractor pads it).
    fn chunk<'a>(&self, samples: &'a [f32], k: usize) -> &'a [f32] {
        let start = (k * self.step).min(samples.len());
        let end = (start + self.extractor.n_samples()).min(samples.len());
        &samples[start..end]
    }

    /// Features of a batch, items and chunks in parallel. An error names the first
    /// failing input's index.
    pub fn process(&self, inputs: &[AudioInput]) -> Result<AudioFeatures> {
        let refs: Vec<AudioRef<'_>> = inputs.iter().map(AudioRef::from).collect();
        self.process_refs(&refs)
    }

    /// [`process`](Self::process) for inputs given by reference, e.g. samples borrowed
    /// from the caller's arrays.
    pub fn process_refs(&self, inputs: &[AudioRef<'_>]) -> Result<AudioFeatures> {
        let loaded: Vec<Result<Cow<'_, [f32]>>> = inputs
            .par_iter()
            .enumerate()
            .map(|(i, x)| self.load_mono(x, None).at_index(i))
            .collect();
        let loaded = loaded.into_iter().collect::<Result<Vec<_>>>()?;
        self.features(&loaded)
    }

    /// Features of mono inputs already at the configured rate.
    fn features(&self, items: &[Cow<'_, [f32]>]) -> Result<AudioFeatures> {
        let num_chunks: Vec<usize> = items.iter().map(|x| self.chunk_count(x.len())).collect();
        let jobs: Vec<&[f32]> = items
            .iter()
            .zip(&num_chunks)
            .flat_map(|(x, &n)| (0..n).map(move |k| self.chunk(x, k)))
            .collect();
        let (input_features, valid_frames) = match &self.extractor {
            Extractor::LogMel(m) => {
                let mut feats = Array3::<f32>::zeros((jobs.len(), m.n_mels(), m.n_frames()));
                feats
                    .axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .zip(jobs.par_iter())
                    .try_for_each(|(out, samples)| m.compute_into(samples, out))?;
                let hop = self.cfg.hop_length;
                let valid = jobs
                    .iter()
                    .map(|x| x.len().div_ceil(hop).min(m.n_frames()))
                    .collect();
                (feats, valid)
            }
            Extractor::Waveform { normalise, .. } => {
                let width = jobs.iter().map(|x| x.len()).max().unwrap_or(0);
                let pad = self.cfg.padding_value;
                let mut feats = Array3::<f32>::from_elem((jobs.len(), 1, width), pad);
                feats
                    .axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .zip(jobs.par_iter())
                    .for_each(|(mut out, samples)| {
                        if let Some(row) = out.as_slice_mut() {
                            let row = &mut row[..samples.len()];
                            row.copy_from_slice(samples);
                            if *normalise {
                                kind::normalise_waveform(row);
                            }
                        }
                    });
                (feats, jobs.iter().map(|x| x.len()).collect())
            }
            Extractor::Fbank(f) => {
                let mut feats = Array3::<f32>::zeros((jobs.len(), f.n_mels(), f.n_frames()));
                feats
                    .axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .zip(jobs.par_iter())
                    .enumerate()
                    .try_for_each(|(i, (out, samples))| {
                        f.compute_into(samples, out).map_err(|e| {
                            // Name the input, not the chunk.
                            let item = chunk_owner(&num_chunks, i);
                            e.at_index(item)
                        })
                    })?;
                let valid = jobs
                    .iter()
                    .map(|x| f.frames_of(x.len()).min(f.n_frames()))
                    .collect();
                (feats, valid)
            }
            Extractor::ClapMel(c) => {
                let mut feats = Array3::<f32>::zeros((jobs.len(), c.n_mels(), c.n_frames()));
                feats
                    .axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .zip(jobs.par_iter())
                    .for_each(|(out, samples)| c.compute_into(samples, out));
                (feats, vec![c.n_frames(); jobs.len()])
            }
        };
        Ok(AudioFeatures {
            input_features,
            num_chunks,
            valid_frames,
        })
    }

    /// Log-mel spectrogram `[n_mels, frames]` of one chunk of samples at the configured
    /// rate, right-padded with `padding_value` or truncated to `chunk_length` seconds.
    pub fn log_mel(&self, samples_at_rate: &[f32]) -> Result<Array2<f32>> {
        if let Some(t) = first_non_finite(samples_at_rate) {
            return Err(input_error(format!(
                "expected finite samples, got {} at sample {t}",
                samples_at_rate[t]
            )));
        }
        let Extractor::LogMel(m) = &self.extractor else {
            return Err(MlmfError::config(
                "features",
                format!(
                    "log_mel is Whisper's feature; this processor computes {}'s",
                    self.cfg.features.extractor_type()
                ),
            ));
        };
        let mut out = Array2::zeros((m.n_mels(), m.n_frames()));
        m.compute_into(samples_at_rate, out.view_mut())?;
        Ok(out)
    }
}

/// The input chunk `i` of a batch came from, given each input's chunk count.
fn chunk_owner(num_chunks: &[usize], i: usize) -> usize {
    let mut end = 0;
    for (item, n) in num_chunks.iter().enumerate() {
        end += n;
        if i < end {
            return item;
        }
    }
    num_chunks.len().saturating_sub(1)
}

impl Processor for AudioProcessor {
    type Input = AudioInput;
    type Output = AudioFeatures;

    fn modality(&self) -> Modality {
        Modality::Audio
    }

    fn process(&self, inputs: &[AudioInput]) -> Result<AudioFeatures> {
        AudioProcessor::process(self, inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn processor(stride: f64) -> AudioProcessor {
        AudioProcessor::new(AudioProcessorConfig {
            stride_length_s: stride,
            ..AudioProcessorConfig::whisper()
        })
        .unwrap()
    }

    fn samples(seconds: f64, rate: u32) -> AudioInput {
        let n = (seconds * f64::from(rate)).round() as usize;
        let data = Array2::from_shape_fn((1, n), |(_, i)| ((i as f32) * 0.01).sin() * 0.5);
        AudioInput::Samples {
            data,
            sampling_rate: Some(rate),
        }
    }

    #[test]
    fn chunk_counts() {
        let p = processor(0.0);
        for (secs, want) in [
            (0.1, 1),
            (7.0, 1),
            (30.0, 1),
            (30.01, 2),
            (60.0, 2),
            (65.0, 3),
        ] {
            let n = (secs * 16000.0) as usize;
            assert_eq!(p.chunk_count(n), want, "{secs} s");
        }
        let feats = p
            .process(&[
                samples(0.1, 16000),
                samples(7.0, 16000),
                samples(30.0, 16000),
                samples(65.0, 16000),
            ])
            .unwrap();
        assert_eq!(feats.num_chunks, vec![1, 1, 1, 3]);
        assert_eq!(feats.input_features.dim(), (6, 80, 3000));
    }

    #[test]
    fn stride_overlaps_chunks() {
        // 5 s per side: chunks start every 20 s.
        let p = processor(5.0);
        assert_eq!(p.step, 320_000);
        for (secs, want) in [
            (30.0, 1),
            (50.0, 2),
            (50.01, 3),
            (65.0, 3),
            (70.0, 3),
            (70.01, 4),
        ] {
            let n = (secs * 16000.0_f64).round() as usize;
            assert_eq!(p.chunk_count(n), want, "{secs} s");
        }
        let x: Vec<f32> = (0..65 * 16000).map(|i| i as f32).collect();
        assert_eq!(p.chunk(&x, 1)[0], 320_000.0);
        assert_eq!(p.chunk(&x, 2).len(), 65 * 16000 - 640_000);
        // Overlapping chunks see the same audio: chunk 1's start is inside chunk 0.
        let feats = p.process(&[samples(50.0, 16000)]).unwrap();
        assert_eq!(feats.num_chunks, vec![2]);
    }

    #[test]
    fn single_chunk_equals_log_mel() {
        let p = processor(0.0);
        let input = samples(7.0, 16000);
        let mono = p.load(&input, None).unwrap();
        let feats = p.process(&[input]).unwrap();
        let direct = p.log_mel(&mono).unwrap();
        assert_eq!(feats.input_features.index_axis(Axis(0), 0), direct);
    }

    #[test]
    fn downmix_is_channel_mean_and_resampling_happens() {
        let p = processor(0.0);
        let data = Array2::from_shape_vec((2, 3), vec![1.0, 0.0, -1.0, 0.0, 1.0, 1.0]).unwrap();
        let mono = p
            .load(
                &AudioInput::Samples {
                    data: data.clone(),
                    sampling_rate: None,
                },
                None,
            )
            .unwrap();
        assert_eq!(mono, vec![0.5, 0.5, 0.0]);
        let at_8k = p
            .load(
                &AudioInput::Samples {
                    data,
                    sampling_rate: None,
                },
                Some(8000),
            )
            .unwrap();
        assert_eq!(at_8k.len(), 6);
        let long = p.load(&samples(1.0, 44100), None).unwrap();
        assert_eq!(long.len(), 16000);
    }

    #[test]
    fn bad_inputs_name_modality_index_and_expectation() {
        let p = processor(0.0);
        let good = samples(0.5, 16000);
        let cases: Vec<(AudioInput, &str)> = vec![
            (
                AudioInput::Samples {
                    data: Array2::zeros((1, 0)),
                    sampling_rate: None,
                },
                "expected at least one sample",
            ),
            (
                AudioInput::Samples {
                    data: Array2::zeros((0, 10)),
                    sampling_rate: None,
                },
                "at least one channel",
            ),
            (
                AudioInput::Samples {
                    data: Array2::from_shape_vec((1, 3), vec![0.0, f32::NAN, 0.0]).unwrap(),
                    sampling_rate: None,
                },
                "expected finite samples, got NaN at channel 0, sample 1",
            ),
            (
                AudioInput::Samples {
                    data: Array2::from_elem((2, 3), f32::INFINITY),
                    sampling_rate: None,
                },
                "expected finite samples, got inf",
            ),
            (
                AudioInput::Samples {
                    data: Array2::zeros((1, 10)),
                    sampling_rate: Some(0),
                },
                "sampling_rate must be in 1000..=768000 Hz, got 0",
            ),
        ];
        for (bad, want) in cases {
            let e = p.process(&[good.clone(), bad]).unwrap_err();
            assert!(matches!(e, MlmfError::Input { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.starts_with("audio input 1: "), "{msg}");
            assert!(msg.contains(want), "{msg} lacks {want}");
        }
        for bytes in [vec![], b"RIFF....WAVEjunk".to_vec(), vec![7u8; 1000]] {
            let e = p
                .process(&[AudioInput::Source(Source::Bytes(bytes)), good.clone()])
                .unwrap_err();
            assert!(matches!(e, MlmfError::Decode { .. }), "{e}");
            assert!(
                e.to_string().starts_with("audio input 0: cannot decode"),
                "{e}"
            );
        }
        let e = p
            .process(&[AudioInput::Source(Source::Path(
                "/nonexistent/a.wav".into(),
            ))])
            .unwrap_err();
        assert!(matches!(e, MlmfError::Io { index: Some(0), .. }), "{e}");
        let e = p.log_mel(&[0.0, f32::NAN]).unwrap_err();
        assert!(e.to_string().contains("expected finite samples"), "{e}");
        let e = p.load(&good, Some(0)).unwrap_err();
        assert!(e.to_string().contains("sampling_rate"), "{e}");
    }

    #[test]
    fn max_duration_is_enforced() {
        let p = AudioProcessor::new(AudioProcessorConfig {
            max_duration_s: Some(2.0),
            ..AudioProcessorConfig::whisper()
        })
        .unwrap();
        assert!(p.process(&[samples(2.0, 16000)]).is_ok());
        let e = p
            .process(&[samples(1.0, 16000), samples(2.5, 44100)])
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("audio input 1: expected at most max_duration_s"),
            "{e}"
        );
    }

    #[test]
    fn config_from_hf_json_and_validation() {
        let v = serde_json::json!({
            "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": 128, "hop_length": 160, "n_fft": 400, "n_samples": 480000,
            "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
            "processor_class": "WhisperProcessor", "return_attention_mask": false,
            "sampling_rate": 16000
        });
        let cfg = AudioProcessorConfig::from_hf_json(&v).unwrap();
        assert_eq!(cfg.feature_size, 128);
        assert_eq!(
            cfg,
            AudioProcessorConfig {
                feature_size: 128,
                ..AudioProcessorConfig::whisper()
            }
        );
        // serde round trip keeps every field.
        let back: AudioProcessorConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        let bad = [
            (serde_json::json!({"feature_size": 0}), "feature_size"),
            (serde_json::json!({"feature_size": "x"}), "feature_size"),
            (serde_json::json!({"sampling_rate": 0}), "sampling_rate"),
            (serde_json::json!({"hop_length": 0}), "hop_length"),
            (serde_json::json!({"n_fft": 1}), "n_fft"),
            (serde_json::json!({"chunk_length": 0}), "chunk_length"),
            (
                serde_json::json!({"stride_length_s": 15.0}),
                "stride_length_s",
            ),
            (
                serde_json::json!({"stride_length_s": -1.0}),
                "stride_length_s",
            ),
            (serde_json::json!({"max_duration_s": 0.0}), "max_duration_s"),
            (
                serde_json::json!({"feature_extractor_type": "SeamlessM4TFeatureExtractor"}),
                "feature_extractor_type",
            ),
        ];
        for (json, field) in bad {
            let e = AudioProcessorConfig::from_hf_json(&json).unwrap_err();
            assert!(matches!(e, MlmfError::Config { .. }), "{e}");
            assert!(e.to_string().contains(&format!("`{field}`")), "{e}");
        }
        assert!(AudioProcessorConfig::from_hf_json(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn from_pretrained_reads_the_directory() {
        let dir = std::env::temp_dir().join(format!("mlmf-audio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("preprocessor_config.json"),
            r#"{"feature_size": 128}"#,
        )
        .unwrap();
        let p = AudioProcessor::from_pretrained(&dir).unwrap();
        assert_eq!(p.config().feature_size, 128);
        assert_eq!(p.log_mel(&[0.0; 100]).unwrap().dim(), (128, 3000));
        std::fs::write(dir.join("preprocessor_config.json"), r#"{"hop_length": 0}"#).unwrap();
        let e = AudioProcessor::from_pretrained(&dir).unwrap_err();
        assert!(matches!(e, MlmfError::ModelLoad { .. }), "{e}");
        assert!(e.to_string().contains("hop_length"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            AudioProcessor::from_pretrained(&dir).unwrap_err(),
            MlmfError::ModelLoad { .. }
        ));
    }

    #[test]
    fn processor_trait_and_empty_batch() {
        let p = processor(0.0);
        assert_eq!(Processor::modality(&p), Modality::Audio);
        let f = Processor::process(&p, &[]).unwrap();
        assert_eq!(f.input_features.dim(), (0, 80, 3000));
        assert!(f.num_chunks.is_empty());
    }
}
