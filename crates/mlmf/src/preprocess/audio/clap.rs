//! CLAP's log-mel spectrogram in decibels, as transformers' `ClapFeatureExtractor`
//! computes it (`_np_extract_fbank_features`, numpy).
//!
//! A chunk shorter than `max_length_s` is first filled as `padding` says (`repeatpad`:
//! as many whole copies of the clip as fit, then zeros). Then: a periodic Hann window of
//! `fft_window_size`, frames every `hop_length` samples centred (reflect padding of
//! half a window), the power spectrum of each frame (the spectrum rounded to complex
//! float32 as the reference stores it, the rest in float64), a mel filter bank between
//! `frequency_min` and `frequency_max` — Slaney's scale and normalisation for
//! `truncation: rand_trunc` checkpoints, HTK's unnormalised for `fusion` ones — and
//! `10 log10(max(energy, 1e-10))`, rounded to float32. The output is `[n_mels, frames]`.
//!
//! Longer audio: the reference keeps one random crop (`rand_trunc`) or three random
//! crops and a shrunk whole (`fusion`, for its fusion block); mlmf is deterministic and
//! covers the whole clip instead, in consecutive chunks of `max_length_s` seconds
//! whose pooled vectors are averaged (a last chunk is filled like a short clip).

use std::sync::Arc;

use ndarray::ArrayViewMut2;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::preprocess::audio::fbank::Filter;
use crate::preprocess::audio::kind::ClapPadding;
use crate::preprocess::audio::mel::{hertz_to_mel, linspace, mel_to_hertz};

/// A frequency-scale conversion.
type Scale = fn(f64) -> f64;

/// The reference's `mel_filter_bank(n_bins, n_mels, f_min, f_max, rate, norm, scale)`
/// with `norm="slaney", mel_scale="slaney"` (`slaney`) or `norm=None,
/// mel_scale="htk"`, in float64.
fn filters(
    n_bins: usize,
    n_mels: usize,
    rate: u32,
    (lo, hi): (f64, f64),
    slaney: bool,
) -> Vec<Filter> {
    let (to_mel, to_hz): (Scale, Scale) = if slaney {
        (hertz_to_mel, mel_to_hertz)
    } else {
        (
            |f| 2595.0 * (1.0 + f / 700.0).log10(),
            |m| 700.0 * (10f64.powf(m / 2595.0) - 1.0),
        )
    };
    let edges: Vec<f64> = linspace(to_mel(lo), to_mel(hi), n_mels + 2)
        .into_iter()
        .map(to_hz)
        .collect();
    let bins = linspace(0.0, f64::from(rate / 2), n_bins);
    (0..n_mels)
        .map(|m| {
            let (down, up) = (edges[m + 1] - edges[m], edges[m + 2] - edges[m + 1]);
            let norm = if slaney {
                2.0 / (edges[m + 2] - edges[m])
            } else {
                1.0
            };
            let w: Vec<f64> = bins
                .iter()
                .map(|&f| {
                    let a = -(edges[m] - f) / down;
                    let b = (edges[m + 2] - f) / up;
                    a.min(b).max(0.0) * norm
                })
                .collect();
            Filter::sparse(&w)
        })
        .collect()
}

/// Everything needed for one chunk's spectrogram, built once per processor.
pub(crate) struct ClapMel {
    n_fft: usize,
    hop: usize,
    n_samples: usize,
    n_mels: usize,
    padding: ClapPadding,
    window: Vec<f64>,
    fft: Arc<dyn Fft<f64>>,
    filters: Vec<Filter>,
}

impl ClapMel {
    /// `n_fft >= 2`, `hop >= 1`, `n_samples >= n_fft` and `lo < hi` checked by the
    /// caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        n_fft: usize,
        hop: usize,
        n_samples: usize,
        n_mels: usize,
        rate: u32,
        band: (f64, f64),
        htk: bool,
        padding: ClapPadding,
    ) -> Self {
        let window = (0..n_fft)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos())
            .collect();
        Self {
            n_fft,
            hop,
            n_samples,
            n_mels,
            padding,
            window,
            fft: FftPlanner::<f64>::new().plan_fft_forward(n_fft),
            filters: filters(n_fft / 2 + 1, n_mels, rate, band, !htk),
        }
    }

    pub(crate) fn n_samples(&self) -> usize {
        self.n_samples
    }

    pub(crate) fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Frames of a full chunk: `1 + n_samples / hop` (centred frames).
    pub(crate) fn n_frames(&self) -> usize {
        1 + self.n_samples / self.hop
    }

    /// A chunk filled to `n_samples` as `padding` says.
    fn filled(&self, x: &[f32]) -> Vec<f32> {
        let n = self.n_samples;
        if x.len() >= n || x.is_empty() {
            let mut v = x[..x.len().min(n)].to_vec();
            v.resize(n, 0.0);
            return v;
        }
        let copies = n / x.len();
        let mut v: Vec<f32> = match self.padding {
            ClapPadding::Repeatpad => x.repeat(copies),
            ClapPadding::Repeat => x.repeat(copies + 1),
            ClapPadding::Pad => x.to_vec(),
        };
        v.resize(n, 0.0);
        v
    }

    /// The spectrogram of one chunk into `out` `[n_mels, n_frames]`.
    pub(crate) fn compute_into(&self, samples: &[f32], mut out: ArrayViewMut2<'_, f32>) {
        let x = self.filled(samples);
        let pad = self.n_fft / 2;
        // numpy's reflect padding: mirrored without repeating the edge sample.
        let at = |i: isize| -> f64 {
            let n = x.len() as isize;
            let mut j = i;
            while j < 0 || j >= n {
                j = if j < 0 { -j } else { 2 * (n - 1) - j };
            }
            f64::from(x[j as usize])
        };
        let mut buf = vec![Complex::new(0.0f64, 0.0); self.n_fft];
        let mut scratch = vec![Complex::new(0.0f64, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = vec![0.0f64; self.n_fft / 2 + 1];
        for t in 0..self.n_frames() {
            let start = (t * self.hop) as isize - pad as isize;
            for (i, (z, w)) in buf.iter_mut().zip(&self.window).enumerate() {
                *z = Complex::new(at(start + i as isize) * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, z) in power.iter_mut().zip(&buf) {
                let (re, im) = (f64::from(z.re as f32), f64::from(z.im as f32));
                // Not `hypot`: it links a glibc 2.35 symbol, above the wheel's
                // manylinux_2_34 floor.
                *p = re * re + im * im;
            }
            for (m, f) in self.filters.iter().enumerate() {
                out[[m, t]] = (10.0 * f.energy(&power).max(1e-10).log10()) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mel(padding: ClapPadding) -> ClapMel {
        ClapMel::new(256, 80, 1000, 8, 8000, (50.0, 3800.0), false, padding)
    }

    #[test]
    fn short_chunks_are_filled_as_the_reference_fills_them() {
        let x = [1.0f32, 2.0, 3.0];
        let m = ClapMel::new(
            4,
            1,
            8,
            2,
            8000,
            (0.0, 4000.0),
            true,
            ClapPadding::Repeatpad,
        );
        assert_eq!(m.filled(&x), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 0.0, 0.0]);
        let m = ClapMel {
            padding: ClapPadding::Repeat,
            ..m
        };
        assert_eq!(m.filled(&x), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]);
        let m = ClapMel {
            padding: ClapPadding::Pad,
            ..m
        };
        assert_eq!(m.filled(&x), vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn silence_is_minus_100_db_and_frames_are_centred() {
        let m = mel(ClapPadding::Pad);
        assert_eq!(m.n_frames(), 1 + 1000 / 80);
        let mut out = ndarray::Array2::zeros((8, m.n_frames()));
        m.compute_into(&[0.0; 10], out.view_mut());
        assert!(out.iter().all(|&v| v == -100.0));
        // Slaney filters peak at 2 / width; HTK ones at 1.
        let slaney = filters(129, 8, 8000, (50.0, 3800.0), true);
        let htk = filters(129, 8, 8000, (50.0, 3800.0), false);
        assert!(htk
            .iter()
            .all(|f| f.weights.iter().cloned().fold(0.0, f64::max) <= 1.0));
        assert!(slaney[0].weights.iter().cloned().fold(0.0, f64::max) < 0.1);
    }
}
