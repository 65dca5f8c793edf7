//! Which features an [`AudioProcessor`](super::AudioProcessor) computes, chosen by the
//! checkpoint's `feature_extractor_type`:
//!
//! - `WhisperFeatureExtractor` (and no type at all): Whisper's log-mel chunks
//!   ([`super::mel`]);
//! - `Wav2Vec2FeatureExtractor` (wav2vec 2.0, HuBERT): the waveform itself, each clip
//!   normalised to zero mean and unit variance ([`normalise_waveform`]);
//! - `ASTFeatureExtractor` (Audio Spectrogram Transformer): Kaldi-style log mel filter
//!   banks, cut or padded to `max_length` frames and normalised with the dataset's
//!   mean and standard deviation ([`super::fbank`]).

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};

/// The feature computation of an audio processor and its own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AudioFeatureKind {
    /// Whisper log-mel spectrograms, `feature_size` mel bins per frame.
    #[default]
    WhisperLogMel,
    /// The samples themselves, one channel; `do_normalize`: each clip (chunk) to zero
    /// mean and unit variance, `(x - mean) / sqrt(var + 1e-7)`.
    Waveform { do_normalize: bool },
    /// Kaldi log mel filter banks of `feature_size` bins, `max_length` frames per
    /// chunk; `do_normalize`: `(x - mean) / (2 std)`.
    KaldiFbank {
        max_length: usize,
        do_normalize: bool,
        mean: f32,
        std: f32,
    },
    /// CLAP's log-mel in dB (`ClapFeatureExtractor`): chunks of `chunk_length` seconds
    /// (`max_length_s`) filled by `padding`, `n_fft` = `fft_window_size`, mel bins
    /// between `frequency_min` and `frequency_max`, Slaney filters (`rand_trunc`) or
    /// HTK filters (`fusion`).
    ClapMel {
        frequency_min: f64,
        frequency_max: f64,
        /// `fusion` checkpoints' HTK filters, else Slaney's.
        htk: bool,
        padding: ClapPadding,
    },
}

/// How CLAP fills a chunk shorter than `max_length_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClapPadding {
    /// Whole copies of the clip, then zeros (`repeatpad`, the default).
    Repeatpad,
    /// Copies of the clip cut at the chunk's end (`repeat`).
    Repeat,
    /// Zeros (`pad`).
    Pad,
}

impl AudioFeatureKind {
    /// Whether this is the Whisper default (left out of serialised settings, so that
    /// Whisper processors keep the settings, and cache keys, they always had).
    pub fn is_whisper(&self) -> bool {
        matches!(self, Self::WhisperLogMel)
    }

    /// The feature extractor's name, as in `preprocessor_config.json`.
    pub fn extractor_type(&self) -> &'static str {
        match self {
            Self::WhisperLogMel => "WhisperFeatureExtractor",
            Self::Waveform { .. } => "Wav2Vec2FeatureExtractor",
            Self::KaldiFbank { .. } => "ASTFeatureExtractor",
            Self::ClapMel { .. } => "ClapFeatureExtractor",
        }
    }

    /// The kind a `feature_extractor_type` names, with the extractor's own defaults
    /// read from the rest of `obj`; `None` for Whisper. Also returns the number of
    /// feature bins the kind fixes (`None`: `feature_size` decides).
    pub(crate) fn from_hf(
        name: &serde_json::Value,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(Self, Option<usize>)> {
        let field = "feature_extractor_type";
        let bool_key = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    MlmfError::config(key, format!("expected true or false, got {v}"))
                }),
            }
        };
        let num_key = |key: &str, default: f64| -> Result<f32> {
            match obj.get(key) {
                None => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(|x| x as f32)
                    .ok_or_else(|| MlmfError::config(key, format!("expected a number, got {v}"))),
            }
        };
        let size_key = |key: &str, default: usize| -> Result<usize> {
            match obj.get(key) {
                None => Ok(default),
                Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    MlmfError::config(key, format!("expected a non-negative integer, got {v}"))
                }),
            }
        };
        match name.as_str() {
            Some("WhisperFeatureExtractor") => Ok((Self::WhisperLogMel, None)),
            Some("Wav2Vec2FeatureExtractor") => {
                let channels = size_key("feature_size", 1)?;
                if channels != 1 {
                    return Err(MlmfError::config(
                        "feature_size",
                        format!("a Wav2Vec2FeatureExtractor takes 1 channel, got {channels}"),
                    ));
                }
                Ok((
                    Self::Waveform {
                        do_normalize: bool_key("do_normalize", true)?,
                    },
                    Some(1),
                ))
            }
            Some("ASTFeatureExtractor") => {
                let kind = Self::KaldiFbank {
                    max_length: size_key("max_length", 1024)?,
                    do_normalize: bool_key("do_normalize", true)?,
                    // AudioSet's statistics, the extractor's defaults.
                    mean: num_key("mean", -4.267_739_3)?,
                    std: num_key("std", 4.568_997_4)?,
                };
                Ok((kind, Some(size_key("num_mel_bins", 128)?)))
            }
            Some("ClapFeatureExtractor") => {
                let text = |key: &str, default: &str| -> Result<String> {
                    match obj.get(key).filter(|v| !v.is_null()) {
                        None => Ok(default.to_string()),
                        Some(v) => v.as_str().map(str::to_string).ok_or_else(|| {
                            MlmfError::config(key, format!("expected a string, got {v}"))
                        }),
                    }
                };
                let htk = match text("truncation", "fusion")?.as_str() {
                    "fusion" => true,
                    "rand_trunc" => false,
                    other => {
                        return Err(MlmfError::config(
                            "truncation",
                            format!("expected \"fusion\" or \"rand_trunc\", got {other:?}"),
                        ))
                    }
                };
                let padding = match text("padding", "repeatpad")?.as_str() {
                    "repeatpad" => ClapPadding::Repeatpad,
                    "repeat" => ClapPadding::Repeat,
                    "pad" => ClapPadding::Pad,
                    other => {
                        return Err(MlmfError::config(
                            "padding",
                            format!("expected \"repeatpad\", \"repeat\" or \"pad\", got {other:?}"),
                        ))
                    }
                };
                let kind = Self::ClapMel {
                    frequency_min: f64::from(num_key("frequency_min", 0.0)?),
                    frequency_max: f64::from(num_key("frequency_max", 14_000.0)?),
                    htk,
                    padding,
                };
                Ok((kind, Some(size_key("feature_size", 64)?)))
            }
            _ => Err(MlmfError::config(
                field,
                format!(
                    "expected \"WhisperFeatureExtractor\", \"Wav2Vec2FeatureExtractor\", \
                     \"ASTFeatureExtractor\" or \"ClapFeatureExtractor\", got {name}"
                ),
            )),
        }
    }

    /// Checks the kind's own settings.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Self::ClapMel {
            frequency_min,
            frequency_max,
            ..
        } = self
        {
            if !(*frequency_min >= 0.0 && frequency_min < frequency_max) {
                return Err(MlmfError::config(
                    "frequency_min",
                    format!(
                        "must be >= 0 and below frequency_max {frequency_max}, got \
                         {frequency_min}"
                    ),
                ));
            }
        }
        if let Self::KaldiFbank {
            max_length, std, ..
        } = self
        {
            if *max_length == 0 || *max_length > 100_000 {
                return Err(MlmfError::config(
                    "max_length",
                    format!("must be in 1..=100000 frames, got {max_length}"),
                ));
            }
            if !(std.is_finite() && *std > 0.0) {
                return Err(MlmfError::config(
                    "std",
                    format!("must be a positive number, got {std}"),
                ));
            }
        }
        Ok(())
    }
}

/// `samples` normalised in place to zero mean and unit variance as transformers'
/// `Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm` does for one clip: statistics
/// over the clip, `(x - mean) / sqrt(var + 1e-7)` (sums in float64, arithmetic on the
/// samples in float32).
pub(crate) fn normalise_waveform(samples: &mut [f32]) {
    if samples.is_empty() {
        return;
    }
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = samples
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let (mean, var) = (mean as f32, var as f32);
    let scale = (var + 1e-7).sqrt();
    for x in samples.iter_mut() {
        *x = (*x - mean) / scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractor_types_select_the_kind() {
        let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let (k, bins) = AudioFeatureKind::from_hf(
            &"Wav2Vec2FeatureExtractor".into(),
            &obj(serde_json::json!({"do_normalize": false})),
        )
        .unwrap();
        assert_eq!(
            (k, bins),
            (
                AudioFeatureKind::Waveform {
                    do_normalize: false
                },
                Some(1)
            )
        );
        let (k, bins) = AudioFeatureKind::from_hf(
            &"ASTFeatureExtractor".into(),
            &obj(serde_json::json!({"num_mel_bins": 20, "max_length": 27})),
        )
        .unwrap();
        assert_eq!(bins, Some(20));
        assert!(matches!(
            k,
            AudioFeatureKind::KaldiFbank {
                max_length: 27,
                do_normalize: true,
                ..
            }
        ));
        let e = AudioFeatureKind::from_hf(
            &"SeamlessM4TFeatureExtractor".into(),
            &obj(serde_json::json!({})),
        )
        .unwrap_err();
        assert!(e.to_string().contains("feature_extractor_type"), "{e}");
        let e = AudioFeatureKind::from_hf(
            &"ASTFeatureExtractor".into(),
            &obj(serde_json::json!({"mean": "x"})),
        )
        .unwrap_err();
        assert!(e.to_string().contains("`mean`"), "{e}");
    }

    #[test]
    fn waveforms_are_normalised_per_clip() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        normalise_waveform(&mut x);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{x:?}");
        // A constant clip stays finite.
        let mut c = vec![0.5f32; 10];
        normalise_waveform(&mut c);
        assert!(c.iter().all(|v| *v == 0.0));
    }
}
