//! Kaldi-style log mel filter banks, as transformers' `ASTFeatureExtractor` computes
//! them (its numpy path, which follows `torchaudio.compliance.kaldi.fbank` with
//! `window_type="hanning"`, no dither, `snip_edges=True`).
//!
//! Per frame of `frame_length` samples, one every `hop_length` (`1 + (n - frame) / hop`
//! frames, none running past the end): the frame's mean removed, pre-emphasis 0.97
//! (`x[i] -= 0.97 x[i - 1]`, `x[0] *= 0.03`), a symmetric Hann window, a zero-padded FFT
//! of the next power of two, the power spectrum, a mel bank of triangles laid out on
//! the Kaldi mel scale (`1127 ln(1 + f / 700)`) between 20 Hz and Nyquist without
//! normalisation, `ln(max(energy, f32::EPSILON))`. Computed in float64 with the
//! spectrum rounded to complex float32 as the reference stores it, then rounded to
//! float32.
//!
//! A chunk gives `[n_mels, max_length]` (mel bins by frames, the layout the model's
//! patch embedding reads): frames past the audio are zero before normalisation,
//! frames past `max_length` are cut (the processor starts another chunk there).

use std::sync::Arc;

use ndarray::ArrayViewMut2;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Pre-emphasis coefficient of Kaldi's default.
const PREEMPHASIS: f64 = 0.97;
/// Lowest mel filter edge in Hz (Kaldi's `low_freq`).
const LOW_FREQ: f64 = 20.0;
/// Floor before the logarithm: float32's machine epsilon, as the reference uses.
const MEL_FLOOR: f64 = 1.192_092_955_078_125e-7;

/// One mel filter as the run of FFT bins where its weight is non-zero.
pub(crate) struct Filter {
    pub(crate) first_bin: usize,
    pub(crate) weights: Vec<f64>,
}

impl Filter {
    /// The non-zero run of a filter given over every FFT bin.
    pub(crate) fn sparse(w: &[f64]) -> Self {
        match (
            w.iter().position(|&x| x != 0.0),
            w.iter().rposition(|&x| x != 0.0),
        ) {
            (Some(a), Some(b)) => Self {
                first_bin: a,
                weights: w[a..=b].to_vec(),
            },
            _ => Self {
                first_bin: 0,
                weights: Vec::new(),
            },
        }
    }

    /// The filter's energy over a power spectrum.
    pub(crate) fn energy(&self, power: &[f64]) -> f64 {
        self.weights
            .iter()
            .zip(&power[self.first_bin..])
            .map(|(w, p)| w * p)
            .sum()
    }
}

/// Kaldi mel energy on frequency `f` Hz.
fn kaldi_mel(f: f64) -> f64 {
    1127.0 * (1.0 + f / 700.0).ln()
}

/// The Kaldi mel bank `[n_mels]` of filters over `n_bins` FFT bins (`n_bins - 1` bins
/// span `0..sampling_rate / 2`), triangles in mel space between `LOW_FREQ` and
/// `sampling_rate // 2`, as `mel_filter_bank(..., norm=None, mel_scale="kaldi",
/// triangularize_in_mel_space=True)`.
fn kaldi_bank(n_bins: usize, n_mels: usize, sampling_rate: u32) -> Vec<Filter> {
    let (lo, hi) = (kaldi_mel(LOW_FREQ), kaldi_mel(f64::from(sampling_rate / 2)));
    // numpy.linspace(lo, hi, n_mels + 2).
    let n = n_mels + 2;
    let step = (hi - lo) / (n - 1) as f64;
    let mut centres: Vec<f64> = (0..n).map(|i| lo + i as f64 * step).collect();
    centres[n - 1] = hi;
    let width = f64::from(sampling_rate) / ((n_bins - 1) * 2) as f64;
    let bins: Vec<f64> = (0..n_bins).map(|k| kaldi_mel(width * k as f64)).collect();
    (0..n_mels)
        .map(|m| {
            let (down, up) = (centres[m + 1] - centres[m], centres[m + 2] - centres[m + 1]);
            let w: Vec<f64> = bins
                .iter()
                .map(|&f| {
                    let a = -(centres[m] - f) / down;
                    let b = (centres[m + 2] - f) / up;
                    a.min(b).max(0.0)
                })
                .collect();
            Filter::sparse(&w)
        })
        .collect()
}

/// Everything needed for the filter banks of one chunk, built once per processor.
pub(crate) struct Fbank {
    frame: usize,
    hop: usize,
    n_mels: usize,
    max_frames: usize,
    /// `(mean, 2 std)` of the normalisation, when on.
    normalise: Option<(f32, f32)>,
    window: Vec<f64>,
    fft: Arc<dyn Fft<f64>>,
    filters: Vec<Filter>,
}

impl Fbank {
    /// Plans the FFT and builds the window and filters (`frame >= 2`, `hop >= 1`,
    /// `n_mels >= 1` checked by the caller).
    pub(crate) fn new(
        frame: usize,
        hop: usize,
        n_mels: usize,
        max_frames: usize,
        sampling_rate: u32,
        normalise: Option<(f32, f32)>,
    ) -> Self {
        let fft_len = frame.next_power_of_two();
        // numpy.hanning(frame): symmetric.
        let window = (0..frame)
            .map(|i| {
                let phase = 2.0 * std::f64::consts::PI * i as f64 / (frame - 1) as f64;
                0.5 - 0.5 * phase.cos()
            })
            .collect();
        Self {
            frame,
            hop,
            n_mels,
            max_frames,
            normalise: normalise.map(|(mean, std)| (mean, ((f64::from(std)) * 2.0) as f32)),
            window,
            fft: FftPlanner::<f64>::new().plan_fft_forward(fft_len),
            filters: kaldi_bank(fft_len / 2 + 1, n_mels, sampling_rate),
        }
    }

    /// Samples one chunk covers: `max_length` frames.
    pub(crate) fn n_samples(&self) -> usize {
        (self.max_frames - 1) * self.hop + self.frame
    }

    pub(crate) fn n_frames(&self) -> usize {
        self.max_frames
    }

    pub(crate) fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Frames `n` samples give (before the cut at `max_length`); 0 when shorter than
    /// one frame.
    pub(crate) fn frames_of(&self, n: usize) -> usize {
        if n < self.frame {
            0
        } else {
            1 + (n - self.frame) / self.hop
        }
    }

    /// The fewest samples a chunk may hold.
    pub(crate) fn min_samples(&self) -> usize {
        self.frame
    }

    /// Filter banks of one chunk into `out` (`[n_mels, max_length]`, standard layout).
    pub(crate) fn compute_into(
        &self,
        samples: &[f32],
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        if out.dim() != (self.n_mels, self.max_frames) {
            return Err(MlmfError::Internal(format!(
                "filter bank output is {:?}, expected ({}, {})",
                out.dim(),
                self.n_mels,
                self.max_frames
            )));
        }
        if samples.len() < self.frame {
            return Err(MlmfError::input(
                Modality::Audio,
                format!(
                    "expected at least {} samples (one {}-sample analysis frame), got {}",
                    self.frame,
                    self.frame,
                    samples.len()
                ),
            ));
        }
        let frames = self.frames_of(samples.len()).min(self.max_frames);
        let n_fft = self.window.len().next_power_of_two();
        let mut buf = vec![Complex::new(0.0f64, 0.0); n_fft];
        let mut scratch = vec![Complex::new(0.0f64, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = vec![0.0f64; n_fft / 2 + 1];
        let norm = |x: f32| match self.normalise {
            Some((mean, two_std)) => (x - mean) / two_std,
            None => x,
        };
        for t in 0..frames {
            let x = &samples[t * self.hop..t * self.hop + self.frame];
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / self.frame as f64;
            let mut prev = f64::from(x[0]) - mean;
            buf[0] = Complex::new(prev * (1.0 - PREEMPHASIS) * self.window[0], 0.0);
            for i in 1..self.frame {
                let cur = f64::from(x[i]) - mean;
                buf[i] = Complex::new((cur - PREEMPHASIS * prev) * self.window[i], 0.0);
                prev = cur;
            }
            for z in &mut buf[self.frame..] {
                *z = Complex::new(0.0, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, z) in power.iter_mut().zip(&buf) {
                // The reference keeps the spectrum as complex64.
                let (re, im) = (f64::from(z.re as f32), f64::from(z.im as f32));
                // Not `hypot`: it links a glibc 2.35 symbol, above the wheel's
                // manylinux_2_34 floor.
                *p = re * re + im * im;
            }
            for (m, f) in self.filters.iter().enumerate() {
                out[[m, t]] = norm(f.energy(&power).max(MEL_FLOOR).ln() as f32);
            }
        }
        let pad = norm(0.0);
        for m in 0..self.n_mels {
            for t in frames..self.max_frames {
                out[[m, t]] = pad;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn the_mel_bank_is_triangles_in_kaldi_mel_space() {
        let bank = kaldi_bank(257, 23, 16000);
        assert_eq!(bank.len(), 23);
        for f in &bank {
            assert!(!f.weights.is_empty());
            let peak = f.weights.iter().cloned().fold(0.0, f64::max);
            assert!(peak > 0.5 && peak <= 1.0, "{peak}");
        }
        // Filters start above 20 Hz and move up.
        assert!(bank[0].first_bin >= 1);
        assert!(bank.windows(2).all(|w| w[0].first_bin <= w[1].first_bin));
    }

    #[test]
    fn frames_pad_and_cut() {
        let fb = Fbank::new(400, 160, 8, 5, 16000, Some((-4.0, 4.0)));
        assert_eq!(fb.n_samples(), 4 * 160 + 400);
        assert_eq!(fb.frames_of(399), 0);
        assert_eq!(fb.frames_of(400 + 160 + 159), 2);
        let x: Vec<f32> = (0..719).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let mut out = Array2::zeros((8, 5));
        fb.compute_into(&x, out.view_mut()).unwrap();
        // Two real frames, then normalised zeros: (0 - (-4)) / 8.
        assert!(out.column(1).iter().all(|v| v.is_finite() && *v != 0.5));
        assert!(out.column(2).iter().all(|v| *v == 0.5));
        let e = fb.compute_into(&x[..100], out.view_mut()).unwrap_err();
        assert!(e.to_string().contains("at least 400 samples"), "{e}");
    }
}
