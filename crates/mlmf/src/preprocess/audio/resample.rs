//! Sample-rate conversion of mono float32 audio with rubato's synchronous FFT resampler.
//!
//! `resample(x, from, to)` returns `ceil(len * to / from)` samples (the length
//! `scipy.signal.resample_poly` gives), with output sample `k` at time `k / to`: the
//! resampler's start-up delay is trimmed, so the result lines up with the input.
//! The anti-aliasing filter is a windowed sinc (Blackman-Harris²) applied by FFT
//! overlap-add, its cutoff just below the lower Nyquist frequency of the two rates
//! (7.95 kHz for 16 kHz output). Work is in f32: on band-limited input the result is
//! within about 1e-6 of the exact resampled signal away from the ends (where both this
//! and scipy treat the signal as zero outside).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler, WindowFunction};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// Highest sampling rate accepted on either side.
pub(crate) const MAX_SAMPLING_RATE: u32 = 768_000;
/// Lowest sampling rate accepted on either side.
pub(crate) const MIN_SAMPLING_RATE: u32 = 1_000;

/// FFT block length on the shorter side (input when upsampling, output when
/// downsampling). Longer blocks put the filter cutoff nearer Nyquist: 2048 gives
/// ~0.993 of the lower Nyquist (7.95 kHz for 16 kHz output).
const MIN_BLOCK: usize = 2048;

/// Upper bound on the longer FFT block; only reached for rates with a small gcd.
const MAX_BLOCK: usize = 1 << 21;

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Checks that a sampling rate is in `MIN_SAMPLING_RATE..=MAX_SAMPLING_RATE`; `what`
/// names it.
pub(crate) fn check_rate(rate: u32, what: &str) -> Result<()> {
    if !(MIN_SAMPLING_RATE..=MAX_SAMPLING_RATE).contains(&rate) {
        return Err(MlmfError::input(
            Modality::Audio,
            format!("{what} must be in {MIN_SAMPLING_RATE}..={MAX_SAMPLING_RATE} Hz, got {rate}"),
        ));
    }
    Ok(())
}

/// Resamples mono `x` from `from` Hz to `to` Hz. Equal rates return a copy; empty input
/// returns an empty vector. Rates must be in `1000..=768000` Hz.
pub fn resample(x: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    check_rate(from, "input sampling rate")?;
    check_rate(to, "output sampling rate")?;
    if from == to || x.is_empty() {
        return Ok(x.to_vec());
    }
    let (from_u, to_u) = (from as usize, to as usize);
    // Exact integer ceil(len * to / from); float rounding could add a sample.
    let out_len = ((x.len() as u128 * to_u as u128).div_ceil(from_u as u128)) as usize;

    let g = gcd(from_u, to_u);
    let (min_in, min_out) = (from_u / g, to_u / g);
    // Number of minimal blocks per FFT block: enough for MIN_BLOCK frames on the
    // shorter side, and even, so that both block lengths are even and the filter
    // centre (half the input block) maps to exactly half the output block, the delay
    // rubato trims (an odd count would leave a half-sample shift). A power of two
    // keeps the FFT lengths free of extra odd factors.
    // Rates sharing no large factor make the blocks long (they are multiples of the
    // rates over their gcd): cap the longer side near MAX_BLOCK samples, which bounds
    // memory at the cost of a lower cutoff for such odd pairs.
    let (shorter, longer) = (min_in.min(min_out), min_in.max(min_out));
    let wanted = MIN_BLOCK.div_ceil(shorter).max(2).next_power_of_two();
    let affordable = (MAX_BLOCK / longer).max(2);
    let blocks = wanted.min(1 << affordable.ilog2());
    let chunk = blocks * min_in;

    let mut resampler = Fft::<f32>::new_custom(
        from_u,
        to_u,
        chunk,
        1,
        1,
        WindowFunction::BlackmanHarris2,
        FixedSync::Both,
    )
    .map_err(|e| MlmfError::Internal(format!("cannot build resampler {from}->{to} Hz: {e}")))?;

    let adapter = InterleavedSlice::new(x, 1, x.len())
        .map_err(|e| MlmfError::Internal(format!("resampler input: {e}")))?;
    let mut output = vec![0.0f32; resampler.process_all_needed_output_len(x.len())];
    let capacity = output.len();
    let (_, produced) = {
        let mut out_adapter = InterleavedSlice::new_mut(&mut output, 1, capacity)
            .map_err(|e| MlmfError::Internal(format!("resampler output: {e}")))?;
        resampler
            .process_all_into_buffer(&adapter, &mut out_adapter, x.len(), None)
            .map_err(|e| MlmfError::Internal(format!("resampling {from}->{to} Hz failed: {e}")))?
    };
    // rubato rounds its own length with floats; trust the exact count, and never read
    // past what it wrote (any shortfall would be silence).
    let valid = produced.min(capacity);
    output.truncate(valid.min(out_len));
    output.resize(out_len, 0.0);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, rate: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin() as f32)
            .collect()
    }

    #[test]
    fn length_is_ceil_of_ratio() {
        for (from, to, n, want) in [
            (44100, 16000, 44100, 16000),
            (44100, 16000, 1, 1),
            (44100, 16000, 100, 37),
            (8000, 16000, 3, 6),
            (48000, 16000, 10, 4),
            (22050, 16000, 22051, 16001),
        ] {
            let x = vec![0.25f32; n];
            assert_eq!(
                resample(&x, from, to).unwrap().len(),
                want,
                "{from}->{to} n={n}"
            );
        }
    }

    #[test]
    fn same_rate_and_empty_are_identity() {
        let x = vec![0.1f32, -0.2, 0.3];
        assert_eq!(resample(&x, 16000, 16000).unwrap(), x);
        assert!(resample(&[], 44100, 16000).unwrap().is_empty());
    }

    #[test]
    fn tone_survives_with_correct_phase() {
        for from in [8000u32, 22050, 44100, 48000] {
            let n = from as usize; // one second
            let y = resample(&tone(1000.0, from, n), from, 16000).unwrap();
            let want = tone(1000.0, 16000, 16000);
            // Away from the edges the tone is reproduced sample for sample, so the
            // output is aligned (no delay left).
            let err = y[2000..14000]
                .iter()
                .zip(&want[2000..14000])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-3, "{from}: max err {err}");
        }
    }

    #[test]
    fn awkward_rate_pairs_stay_bounded() {
        // Coprime and extreme pairs: the blocks are capped, the length still exact.
        for (from, to) in [
            (44101, 16000),
            (767_999, 16000),
            (1000, 768_000),
            (16000, 11025),
        ] {
            let x = vec![0.5f32; 3000];
            let y = resample(&x, from, to).unwrap();
            assert_eq!(
                y.len(),
                (3000 * to as usize).div_ceil(from as usize),
                "{from}->{to}"
            );
            assert!(y.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn bad_rates_are_input_errors() {
        for (from, to) in [(0, 16000), (16000, 0), (999, 16000), (1_000_000, 16000)] {
            let e = resample(&[0.0; 10], from, to).unwrap_err();
            assert!(matches!(e, MlmfError::Input { .. }), "{e}");
            assert!(e.to_string().starts_with("audio input"), "{e}");
        }
    }
}
