//! Whisper log-mel spectrogram of one chunk: samples at the model rate in, float32
//! `[n_mels, frames]` out.
//!
//! Follows transformers' `WhisperFeatureExtractor._torch_extract_fbank_features` (the path
//! `__call__` takes whenever torch is installed): `torch.stft` with a periodic Hann window,
//! centred frames with reflect padding of `n_fft / 2`, power spectrum, the last frame
//! dropped, projection on a Slaney mel filter bank, `log10(max(mel, 1e-10))`, then per
//! chunk `max(x, x.max() - 8)` and `(x + 4) / 4`.
//!
//! The FFT is planned once per processor; frames are processed in blocks shared between
//! the calling thread and the pool, each thread with its own scratch buffers. Two real
//! frames share one complex FFT (one as the real part, the next as the imaginary part;
//! see `split_pairs`), which costs about half of two real FFTs. Each mel filter covers a
//! few adjacent bins only, so the projection stores one contiguous run of weights per
//! filter and runs it on eight frames at a time (one SIMD lane per frame). A block's mel
//! energies collect in a small per-thread tile where the logarithm runs while they are
//! in cache; each output row then receives the block's values in one store.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayViewMut2, Axis};
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::error::{MlmfError, Result};
use crate::preprocess::share::share_with_pool;

/// Frames per parallel task: large enough to amortise task overhead, small enough to
/// spread a single 30 s chunk (3000 frames) over many threads.
const FRAMES_PER_TASK: usize = 64;
const _: () = assert!(FRAMES_PER_TASK.is_multiple_of(LANES));
/// Frames projected together; each filter weight multiplies one frame per lane.
const LANES: usize = 8;
/// Floor applied to mel energies before the logarithm (transformers' `clamp(min=1e-10)`).
const MEL_FLOOR: f32 = 1e-10;
/// Dynamic range kept below the chunk's maximum, in log10 units (80 dB).
const DYNAMIC_RANGE: f32 = 8.0;

/// Slaney mel scale (Auditory Toolbox): linear below 1 kHz, logarithmic above.
pub(crate) fn hertz_to_mel(freq: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if freq >= MIN_LOG_HERTZ {
        MIN_LOG_MEL + (freq / MIN_LOG_HERTZ).ln() * logstep
    } else {
        3.0 * freq / 200.0
    }
}

/// Inverse of [`hertz_to_mel`].
pub(crate) fn mel_to_hertz(mel: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HERTZ * (logstep * (mel - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// `numpy.linspace(start, stop, n)`: `start + i * step`, the last point exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// Slaney-style mel filter bank, `[n_freqs, n_mels]`, as transformers'
/// `audio_utils.mel_filter_bank(..., norm="slaney", mel_scale="slaney")`.
///
/// Filter centres are evenly spaced on the Slaney mel scale between `f_min` and `f_max`
/// (`n_mels + 2` points, the outer two being the edges); each filter is a triangle over
/// the FFT bin frequencies `linspace(0, sampling_rate // 2, n_freqs)`, scaled by
/// `2 / (f[i + 2] - f[i])` so every filter has about the same area. Computed in f64 and
/// rounded to f32 at the end, as the reference does before its float32 matmul.
/// Degenerate requests (`n_freqs < 2`, `n_mels == 0`, `f_min >= f_max`) give filters of
/// zeros rather than NaN.
pub fn mel_filter_bank(
    n_freqs: usize,
    n_mels: usize,
    sampling_rate: u32,
    f_min: f64,
    f_max: f64,
) -> Array2<f32> {
    let mut bank = Array2::<f32>::zeros((n_freqs, n_mels));
    if n_freqs < 2 || n_mels == 0 || f_min.is_nan() || f_max.is_nan() || f_min >= f_max {
        return bank;
    }
    let mel_points = linspace(hertz_to_mel(f_min), hertz_to_mel(f_max), n_mels + 2);
    let filter_freqs: Vec<f64> = mel_points.into_iter().map(mel_to_hertz).collect();
    let fft_freqs = linspace(0.0, f64::from(sampling_rate / 2), n_freqs);
    for m in 0..n_mels {
        let (lo, centre, hi) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
        let (down_width, up_width) = (centre - lo, hi - centre);
        if down_width <= 0.0 || up_width <= 0.0 {
            continue;
        }
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            // The same two slopes as transformers' `_create_triangular_filter_bank`.
            let down = (f - lo) / down_width;
            let up = (hi - f) / up_width;
            let w = down.min(up).max(0.0);
            bank[[k, m]] = (w * enorm) as f32;
        }
    }
    bank
}

/// Periodic Hann window of length `n` (`torch.hann_window(n)`, `np.hanning(n + 1)[:-1]`).
pub(crate) fn hann_window(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let phase = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
            (0.5 - 0.5 * phase.cos()) as f32
        })
        .collect()
}

/// One mel filter as the run of FFT bins where its weight is non-zero.
struct SparseFilter {
    first_bin: usize,
    weights: Vec<f32>,
}

/// Everything needed to turn one chunk into its log-mel spectrogram, built once.
pub(crate) struct LogMel {
    n_fft: usize,
    hop_length: usize,
    n_samples: usize,
    n_frames: usize,
    n_mels: usize,
    padding_value: f32,
    window: Vec<f32>,
    /// Complex FFT of length `n_fft`; each call transforms two real frames packed as
    /// one complex signal (see [`split_pairs`]).
    fft: Arc<dyn Fft<f32>>,
    filters: Vec<SparseFilter>,
}

/// Per-task buffers, reused across the frames of a task.
struct Scratch {
    /// `LANES / 2` packed frame pairs of `n_fft` values each: frame `2p` in the real
    /// parts and frame `2p + 1` in the imaginary parts of pair `p`, then their spectra.
    pairs: Vec<Complex<f32>>,
    /// The spectra of `pairs` (the FFT runs out of place, saving a copy back).
    spectra: Vec<Complex<f32>>,
    fft_scratch: Vec<Complex<f32>>,
    /// Power spectra of `LANES` frames, bin-major: `power[bin * LANES + lane]`.
    power: Vec<f32>,
    /// Mel energies, then their logarithms, of one block: `n_mels` rows of
    /// `FRAMES_PER_TASK` values.
    tile: Vec<f32>,
}

impl LogMel {
    /// Plans the FFT and builds the window and filters. The caller has validated the
    /// sizes (`n_fft >= 2`, `hop_length >= 1`, `n_samples >= n_fft`).
    pub(crate) fn new(
        n_fft: usize,
        hop_length: usize,
        n_samples: usize,
        n_mels: usize,
        sampling_rate: u32,
        padding_value: f32,
    ) -> Self {
        let n_freqs = n_fft / 2 + 1;
        // transformers fixes the band at 0..8000 Hz for every Whisper checkpoint.
        let bank = mel_filter_bank(n_freqs, n_mels, sampling_rate, 0.0, 8000.0);
        let filters = (0..n_mels)
            .map(|m| {
                let column = bank.column(m);
                let first = column.iter().position(|&w| w != 0.0);
                let last = column.iter().rposition(|&w| w != 0.0);
                match (first, last) {
                    (Some(a), Some(b)) => SparseFilter {
                        first_bin: a,
                        weights: column.iter().skip(a).take(b + 1 - a).copied().collect(),
                    },
                    _ => SparseFilter {
                        first_bin: 0,
                        weights: Vec::new(),
                    },
                }
            })
            .collect();
        let fft = FftPlanner::<f32>::new().plan_fft_forward(n_fft);
        let pad = n_fft / 2;
        // torch.stft(center=True) yields 1 + (L + 2 pad - n_fft) / hop frames; the
        // reference drops the last one.
        let n_frames = (n_samples + 2 * pad - n_fft) / hop_length;
        Self {
            n_fft,
            hop_length,
            n_samples,
            n_frames,
            n_mels,
            padding_value,
            window: hann_window(n_fft),
            fft,
            filters,
        }
    }

    /// Frames per chunk (`n_samples / hop_length` for even `n_fft`).
    pub(crate) fn n_frames(&self) -> usize {
        self.n_frames
    }

    /// Samples per chunk.
    pub(crate) fn n_samples(&self) -> usize {
        self.n_samples
    }

    /// Number of mel filters.
    pub(crate) fn n_mels(&self) -> usize {
        self.n_mels
    }

    fn scratch(&self) -> Scratch {
        let zero = Complex::new(0.0, 0.0);
        Scratch {
            pairs: vec![zero; self.n_fft * LANES / 2],
            spectra: vec![zero; self.n_fft * LANES / 2],
            fft_scratch: vec![
                zero;
                self.fft
                    .get_inplace_scratch_len()
                    .max(self.fft.get_outofplace_scratch_len())
            ],
            power: vec![0.0; (self.n_fft / 2 + 1) * LANES],
            tile: vec![0.0; self.n_mels * FRAMES_PER_TASK],
        }
    }

    /// Log-mel spectrogram of one chunk into `out` (`[n_mels, n_frames]`, standard
    /// layout). `samples` longer than a chunk are truncated.
    pub(crate) fn compute_into(
        &self,
        samples: &[f32],
        mut out: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        if out.dim() != (self.n_mels, self.n_frames) || !out.is_standard_layout() {
            return Err(MlmfError::Internal(format!(
                "log-mel output is {:?}, expected ({}, {}) in standard layout",
                out.dim(),
                self.n_mels,
                self.n_frames
            )));
        }
        let chunk = Chunk {
            x: &samples[..samples.len().min(self.n_samples)],
            n: self.n_samples,
            padding_value: self.padding_value,
        };
        // Frames made only of padding are all equal: compute that frame once.
        let mut constant = vec![0.0f32; self.n_mels];
        self.constant_frame_into(&chunk, &mut self.scratch(), &mut constant);

        // Pass 1: log10 of the mel energies (clamped at 1e-10), and the largest energy.
        // Blocks are shared between the calling thread and the pool (see `share`).
        // Energies are positive, so their bit patterns order like their values.
        let max_bits = AtomicU32::new(MEL_FLOOR.to_bits());
        let failure: Mutex<Option<MlmfError>> = Mutex::new(None);
        let blocks: Vec<_> = out
            .axis_chunks_iter_mut(Axis(1), FRAMES_PER_TASK)
            .enumerate()
            .collect();
        share_with_pool(
            blocks,
            || self.scratch(),
            |scratch, (task, mut block)| match self.block_into(
                &chunk,
                task * FRAMES_PER_TASK,
                &constant,
                &mut block,
                scratch,
            ) {
                Ok(m) if !m.is_nan() => {
                    max_bits.fetch_max(m.to_bits(), Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                }
            },
        );
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        let max = f32::from_bits(max_bits.into_inner());
        // Pass 2: the dynamic range floor and scaling. log10 is monotonic, so the
        // maximum of the logs is the log of the maximum (same function, same input).
        let floor = log10(max) - DYNAMIC_RANGE;
        let rows: Vec<_> = out.outer_iter_mut().collect();
        share_with_pool(
            rows,
            || (),
            |_, mut row| {
                if let Some(row) = row.as_slice_mut() {
                    for v in row.iter_mut() {
                        *v = (v.max(floor) + 4.0) / 4.0;
                    }
                }
            },
        );
        Ok(())
    }

    /// Window frame `t` into the real (`imag == false`) or imaginary parts of `z`.
    /// Returns false, with that part zeroed, when `t` is `None` or the frame holds
    /// padding only.
    fn frame_part_into(
        &self,
        chunk: &Chunk<'_>,
        t: Option<usize>,
        z: &mut [Complex<f32>],
        imag: bool,
    ) -> bool {
        if imag {
            self.frame_part_into_impl(chunk, t, z, |c| &mut c.im)
        } else {
            self.frame_part_into_impl(chunk, t, z, |c| &mut c.re)
        }
    }

    #[inline]
    fn frame_part_into_impl(
        &self,
        chunk: &Chunk<'_>,
        t: Option<usize>,
        z: &mut [Complex<f32>],
        part: impl Fn(&mut Complex<f32>) -> &mut f32,
    ) -> bool {
        let pad = (self.n_fft / 2) as isize;
        let lo = t.map_or(0, |t| (t * self.hop_length) as isize - pad);
        let hi = lo + self.n_fft as isize;
        if t.is_none() || chunk.is_padding(lo, hi) {
            z.iter_mut().for_each(|c| *part(c) = 0.0);
            return false;
        }
        if let Some(src) = chunk.interior(lo, hi) {
            for ((c, &v), &w) in z.iter_mut().zip(src).zip(&self.window) {
                *part(c) = v * w;
            }
        } else {
            for ((c, j), &w) in z.iter_mut().zip(lo..hi).zip(&self.window) {
                *part(c) = chunk.at(j) * w;
            }
        }
        true
    }

    /// Windowed frames `t` and `t + 1` packed into `z` as `frame_t + i * frame_t+1`.
    /// Returns false (leaving `z` alone) unless both lie inside the real samples, the
    /// common case, done in one pass.
    fn interior_pair_into(&self, chunk: &Chunk<'_>, t: usize, z: &mut [Complex<f32>]) -> bool {
        let lo = (t * self.hop_length) as isize - (self.n_fft / 2) as isize;
        let (a, b) = (
            chunk.interior(lo, lo + self.n_fft as isize),
            chunk.interior(
                lo + self.hop_length as isize,
                lo + (self.hop_length + self.n_fft) as isize,
            ),
        );
        let (Some(a), Some(b)) = (a, b) else {
            return false;
        };
        for (((c, &u), &v), &w) in z.iter_mut().zip(a).zip(b).zip(&self.window) {
            *c = Complex::new(u * w, v * w);
        }
        true
    }

    /// Windows the frames `first..first + lanes` (`lanes <= LANES`) into `s.pairs`,
    /// transforms them and leaves their power spectra in `s.power`. Returns which lanes
    /// hold a computed frame (the others are padding-only or past `lanes`).
    fn group_power(
        &self,
        chunk: &Chunk<'_>,
        first: usize,
        lanes: usize,
        s: &mut Scratch,
    ) -> [bool; LANES] {
        let mut computed = [false; LANES];
        let live = |lane: usize| (lane < lanes).then_some(first + lane);
        for (p, z) in s.pairs.chunks_exact_mut(self.n_fft).enumerate() {
            let (a, b) = (2 * p, 2 * p + 1);
            if b < lanes && self.interior_pair_into(chunk, first + a, z) {
                (computed[a], computed[b]) = (true, true);
            } else {
                computed[a] = self.frame_part_into(chunk, live(a), z, false);
                computed[b] = self.frame_part_into(chunk, live(b), z, true);
            }
        }
        if computed.iter().any(|&c| c) {
            // One call transforms every pair: rustfft runs the `n_fft`-long FFTs of the
            // buffer back to back (out of place; `pairs` is left as scratch).
            self.fft.process_outofplace_with_scratch(
                &mut s.pairs,
                &mut s.spectra,
                &mut s.fft_scratch,
            );
            split_pairs(&s.spectra, self.n_fft, &mut s.power);
        }
        computed
    }

    /// Mel energies (clamped at 1e-10) of a frame made only of `padding_value`.
    fn constant_frame_into(&self, chunk: &Chunk<'_>, s: &mut Scratch, dst: &mut [f32]) {
        s.pairs.fill(Complex::new(0.0, 0.0));
        for (c, &w) in s.pairs.iter_mut().zip(&self.window) {
            *c = Complex::new(chunk.padding_value * w, 0.0);
        }
        self.fft
            .process_outofplace_with_scratch(&mut s.pairs, &mut s.spectra, &mut s.fft_scratch);
        split_pairs(&s.spectra, self.n_fft, &mut s.power);
        let mut acc = [0.0f32; LANES];
        for (m, d) in dst.iter_mut().enumerate() {
            self.project(&s.power, m, &mut acc);
            *d = acc[0].max(MEL_FLOOR);
        }
    }

    /// Mel energies of filter `m` for the `LANES` frames in `power`.
    #[inline]
    fn project(&self, power: &[f32], m: usize, acc: &mut [f32; LANES]) {
        *acc = [0.0; LANES];
        let filter = &self.filters[m];
        let bins = power[filter.first_bin * LANES..].chunks_exact(LANES);
        for (&w, bin) in filter.weights.iter().zip(bins) {
            for (a, &p) in acc.iter_mut().zip(bin) {
                *a += w * p;
            }
        }
    }

    /// `log10(max(mel, 1e-10))` of the frames starting at `first` into `block`
    /// (`[n_mels, frames]`, rows contiguous); returns the largest `max(mel, 1e-10)`.
    fn block_into(
        &self,
        chunk: &Chunk<'_>,
        first: usize,
        constant: &[f32],
        block: &mut ArrayViewMut2<'_, f32>,
        s: &mut Scratch,
    ) -> Result<f32> {
        let count = block.ncols();
        // Lane-wise running maximum; `if a > b` (not `f32::max`) keeps it a plain
        // vector max, the values being finite or +inf, never NaN.
        let mut max = [MEL_FLOOR; LANES];
        let mut group = 0;
        while group < count {
            let lanes = LANES.min(count - group);
            let computed = self.group_power(chunk, first + group, lanes, s);
            // Lanes past `lanes` (end of the block) hold zeros and are ignored.
            let all = computed[..lanes].iter().all(|&c| c);
            let none = !computed[..lanes].iter().any(|&c| c);
            for (m, row) in s.tile.chunks_exact_mut(FRAMES_PER_TASK).enumerate() {
                let mut vals = [constant[m]; LANES];
                if !none {
                    let mut acc = [0.0f32; LANES];
                    self.project(&s.power, m, &mut acc);
                    for ((v, &a), &c) in vals.iter_mut().zip(&acc).zip(&computed) {
                        if all || c {
                            *v = if a > MEL_FLOOR { a } else { MEL_FLOOR };
                        }
                    }
                }
                for (mx, &v) in max.iter_mut().zip(&vals).take(lanes) {
                    *mx = if v > *mx { v } else { *mx };
                }
                // Tile rows hold whole groups (`FRAMES_PER_TASK` is a multiple of
                // `LANES`): a fixed-size store, the lanes past `lanes` being ignored.
                if let Some(dst) = row
                    .get_mut(group..group + LANES)
                    .and_then(|d| <&mut [f32; LANES]>::try_from(d).ok())
                {
                    *dst = vals;
                }
            }
            group += lanes;
        }
        // The logarithm on the tile, over whole rows so that it runs as a vector loop,
        // then each row of the block written once (rows of the output lie a page or more
        // apart; storing a few values at a time into each costs TLB misses).
        for (mut dst, src) in block
            .outer_iter_mut()
            .zip(s.tile.chunks_exact_mut(FRAMES_PER_TASK))
        {
            let (Some(dst), Some(src)) = (dst.as_slice_mut(), src.get_mut(..count)) else {
                return Err(MlmfError::Internal(
                    "log-mel block rows are not contiguous".into(),
                ));
            };
            for v in src.iter_mut() {
                *v = log10(*v);
            }
            dst.copy_from_slice(src);
        }
        Ok(max
            .iter()
            .fold(MEL_FLOOR, |a, &b| if b > a { b } else { a }))
    }
}

/// Power spectra of the `LANES` real frames packed in pairs in `spectra` (pair `p`, the
/// FFT of `frame_2p + i frame_2p+1`, at `spectra[p * n..(p + 1) * n]`) into `power`
/// (`power[bin * LANES + lane]`, bins `0..=n / 2`).
///
/// With `Z = A + iB` and `A`, `B` the spectra of real signals (so `A[n-k] = conj(A[k])`,
/// likewise `B`): `conj(Z[n-k]) = A[k] - iB[k]`, hence `A[k] = (Z[k] + conj(Z[n-k])) / 2`
/// and `B[k] = (Z[k] - conj(Z[n-k])) / 2i`. Only the squared magnitudes are kept, so the
/// division by `i` drops out and the halving becomes an exact factor 1/4. Bin 0 (and
/// `n / 2` for even `n`) pairs with itself: `A = Re Z`, `B = Im Z`, which the same
/// formula gives.
///
/// In vector form, for the pairs' values `c = Z[k]` and `d = Z[n-k]` laid out as
/// `[re, im]` per pair: with `s = c + d` and `t = c - d`, `|A|^2 = s.re^2 + t.im^2` and
/// `|B|^2 = t.re^2 + s.im^2`, so the eight lanes of a bin are `(s^2 + swap(t^2)) / 4`,
/// `swap` exchanging the two values of each pair: one vector expression per bin.
fn split_pairs(spectra: &[Complex<f32>], n: usize, power: &mut [f32]) {
    const PAIRS: usize = LANES / 2;
    let Some(spectra) = spectra.get(..n * PAIRS) else {
        return;
    };
    let pairs: [&[Complex<f32>]; PAIRS] = std::array::from_fn(|p| &spectra[p * n..(p + 1) * n]);
    for (k, bin) in power.chunks_exact_mut(LANES).take(n / 2 + 1).enumerate() {
        let j = if k == 0 { 0 } else { n - k };
        let (mut c, mut d) = ([0.0f32; LANES], [0.0f32; LANES]);
        for (p, z) in pairs.iter().enumerate() {
            if let (Some(&zk), Some(&zj)) = (z.get(k), z.get(j)) {
                (c[2 * p], c[2 * p + 1]) = (zk.re, zk.im);
                (d[2 * p], d[2 * p + 1]) = (zj.re, zj.im);
            }
        }
        let mut s = [0.0f32; LANES];
        let mut t = [0.0f32; LANES];
        for l in 0..LANES {
            s[l] = c[l] + d[l];
            t[l] = c[l] - d[l];
        }
        for l in 0..LANES {
            bin[l] = 0.25 * (s[l] * s[l] + t[l ^ 1] * t[l ^ 1]);
        }
    }
}

/// One chunk's samples as the STFT sees them: `x` right-padded with `padding_value` to
/// `n` samples, then reflected at both ends (`torch.stft(center=True)`, reflect mode).
struct Chunk<'a> {
    x: &'a [f32],
    n: usize,
    padding_value: f32,
}

impl Chunk<'_> {
    /// Sample at position `j` of the padded signal's coordinates (`0..n` is the chunk).
    /// Reflection excludes the edge sample: `[a b c d]` padded by 2 is `[c b a b c d c b]`.
    #[inline]
    fn at(&self, j: isize) -> f32 {
        let n = self.n as isize;
        let i = if j < 0 {
            -j
        } else if j >= n {
            2 * n - 2 - j
        } else {
            j
        };
        usize::try_from(i)
            .ok()
            .and_then(|i| self.x.get(i))
            .copied()
            .unwrap_or(self.padding_value)
    }

    /// `lo..hi` when it lies inside the real samples (no padding, no reflection).
    #[inline]
    fn interior(&self, lo: isize, hi: isize) -> Option<&[f32]> {
        let lo = usize::try_from(lo).ok()?;
        let hi = usize::try_from(hi).ok()?;
        self.x.get(lo..hi)
    }

    /// Whether every sample of `lo..hi` comes from the padding.
    fn is_padding(&self, lo: isize, hi: isize) -> bool {
        let len = self.x.len() as isize;
        let n = self.n as isize;
        // Left reflection maps j < 0 to -j, right reflection maps j >= n to 2n - 2 - j:
        // both must land at or after the end of the real samples.
        let left_ok = lo >= len || (len == 0);
        let left_reflect_ok = lo >= 0 || 1 - hi.min(0) >= len;
        let right_ok = hi - 1 < n || 2 * n - 2 - (hi - 1) >= len;
        left_ok && left_reflect_ok && right_ok
    }
}

/// `log10(max(x, 1e-10))`, branch-free so that loops over it vectorise.
///
/// Natural logarithm after Cephes `logf` (S. Moshier): split off the binary exponent,
/// fold the mantissa into [sqrt(1/2), sqrt(2)), evaluate a degree-9 polynomial; within
/// about 1 ulp of the exact value. `+inf` stays `+inf`.
#[inline(always)]
fn log10(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const LOG10_E: f32 = std::f32::consts::LOG10_E;
    let v = x.max(MEL_FLOOR);
    let bits = v.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < SQRT_HALF;
    let e = if small { e - 1 } else { e };
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2f32;
    y = y * m - 1.151_461_1e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_5e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y = y * m * z;
    let fe = e as f32;
    y += -2.121_944_4e-4 * fe;
    y += -0.5 * z;
    let ln = m + y + 0.693_359_4 * fe;
    if v == f32::INFINITY {
        v
    } else {
        ln * LOG10_E
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hann_window_is_periodic() {
        let w = hann_window(400);
        assert_eq!(w.len(), 400);
        assert_eq!(w[0], 0.0);
        assert!((w[200] - 1.0).abs() < 1e-7);
        // Periodic: symmetric around n/2, w[i] == w[n - i].
        for i in 1..200 {
            assert!((w[i] - w[400 - i]).abs() < 1e-7, "{i}");
        }
        assert!((w[100] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn slaney_scale_round_trips_and_is_linear_below_1khz() {
        for f in [0.0, 200.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hertz(hertz_to_mel(f)) - f).abs() < 1e-9);
        }
        assert!((hertz_to_mel(500.0) - 7.5).abs() < 1e-12);
        assert!((hertz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        // 6.4 kHz is 27 mels above 1 kHz by construction.
        assert!((hertz_to_mel(6400.0) - 42.0).abs() < 1e-12);
    }

    #[test]
    fn filter_bank_properties() {
        let bank = mel_filter_bank(201, 80, 16000, 0.0, 8000.0);
        assert_eq!(bank.dim(), (201, 80));
        assert!(bank.iter().all(|&w| w >= 0.0 && w.is_finite()));
        for m in 0..80 {
            let col = bank.column(m);
            // Every filter is non-empty, and its support is one contiguous run.
            let nz: Vec<usize> = (0..201).filter(|&k| col[k] > 0.0).collect();
            assert!(!nz.is_empty(), "filter {m} empty");
            assert_eq!(
                nz.len(),
                nz[nz.len() - 1] - nz[0] + 1,
                "filter {m} not contiguous"
            );
            // Triangles rise then fall: a single peak.
            let peak = nz
                .iter()
                .copied()
                .fold(nz[0], |a, k| if col[k] > col[a] { k } else { a });
            assert!(nz
                .windows(2)
                .all(|p| p[1] <= peak || col[p[1]] <= col[p[0]]));
            assert!(nz.windows(2).all(|p| p[1] > peak || col[p[1]] >= col[p[0]]));
        }
        // Filter peaks move up in frequency.
        let peaks: Vec<usize> = (0..80)
            .map(|m| {
                let c = bank.column(m);
                (0..201).fold(0, |a, k| if c[k] > c[a] { k } else { a })
            })
            .collect();
        assert!(peaks.windows(2).all(|p| p[1] >= p[0]));
        // Each bin is covered by at most two neighbouring filters.
        for k in 0..201 {
            assert!(bank.row(k).iter().filter(|&&w| w > 0.0).count() <= 2);
        }
        // Slaney normalisation: sum over Hz of each triangle is about 1 (area 1 per Hz,
        // bins are 40 Hz apart); the lowest filters are too narrow for a good estimate.
        let areas: Vec<f32> = (20..80).map(|m| bank.column(m).sum() * 40.0).collect();
        assert!(areas.iter().all(|a| (a - 1.0).abs() < 0.1), "{areas:?}");
        let mean = areas.iter().sum::<f32>() / areas.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "mean area {mean}");
    }

    #[test]
    fn filter_bank_degenerate_requests_are_zero() {
        assert!(mel_filter_bank(1, 10, 16000, 0.0, 8000.0)
            .iter()
            .all(|&w| w == 0.0));
        assert_eq!(mel_filter_bank(201, 0, 16000, 0.0, 8000.0).dim(), (201, 0));
        assert!(mel_filter_bank(201, 10, 16000, 8000.0, 8000.0)
            .iter()
            .all(|&w| w == 0.0));
    }

    fn padded(x: &[f32], n: usize, pad: isize) -> (Vec<f32>, Vec<bool>) {
        let c = Chunk {
            x,
            n,
            padding_value: 0.0,
        };
        let vals = (-pad..n as isize + pad).map(|j| c.at(j)).collect();
        // Padding-only test of every window of 2 * pad samples.
        let windows = (-pad..=n as isize - pad)
            .map(|lo| c.is_padding(lo, lo + 2 * pad))
            .collect();
        (vals, windows)
    }

    #[test]
    fn reflect_padding_matches_torch() {
        // Right-padded to 6 with zeros, then reflected by 2 (the padding included).
        let (v, w) = padded(&[1.0, 2.0, 3.0, 4.0], 6, 2);
        assert_eq!(v, vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 4.0]);
        assert_eq!(w, vec![false, false, false, false, false, false, false]);
        let (v, _) = padded(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 6, 2);
        assert_eq!(v, vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 5.0, 4.0]);
        // Windows of 4 over [1 0 0 0 0 0 0 0] padded by 2: [0 0 1 0 0 0 0 0 0 0 0 0].
        let (v, w) = padded(&[1.0], 8, 2);
        assert_eq!(v[2], 1.0);
        assert_eq!(v.iter().filter(|&&x| x != 0.0).count(), 1);
        assert_eq!(
            w,
            vec![false, false, false, true, true, true, true, true, true]
        );
        let (_, w) = padded(&[], 8, 2);
        assert!(w.iter().all(|&p| p));
        // The brute-force check agrees with `is_padding` for every short input.
        for len in 0..8 {
            let x: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            let (v, w) = padded(&x, 8, 2);
            for (k, &p) in w.iter().enumerate() {
                assert_eq!(
                    p,
                    v[k..k + 4].iter().all(|&s| s == 0.0),
                    "len {len} window {k}"
                );
            }
        }
    }

    #[test]
    fn fast_log10_matches_std() {
        let mut worst = 0.0f32;
        let mut x = 1e-12f32;
        while x < 1e12 {
            let want = f64::from(x.max(MEL_FLOOR)).log10() as f32;
            worst = worst.max((log10(x) - want).abs());
            x *= 1.0137;
        }
        assert!(worst < 2e-6, "worst {worst}");
        assert_eq!(log10(f32::INFINITY), f32::INFINITY);
        assert_eq!(log10(0.0), -10.0);
        assert_eq!(log10(1.0), 0.0);
    }

    /// Power spectrum of a real signal by the direct DFT, in f64.
    fn dft_power(x: &[f32]) -> Vec<f64> {
        let n = x.len();
        (0..=n / 2)
            .map(|k| {
                let (mut re, mut im) = (0.0f64, 0.0f64);
                for (j, &v) in x.iter().enumerate() {
                    let phase = -2.0 * std::f64::consts::PI * (k * j % n) as f64 / n as f64;
                    re += f64::from(v) * phase.cos();
                    im += f64::from(v) * phase.sin();
                }
                re * re + im * im
            })
            .collect()
    }

    #[test]
    fn paired_fft_equals_two_real_ffts() {
        // Even and odd lengths; every lane of the power layout.
        for n in [400, 17, 2] {
            let frames: Vec<Vec<f32>> = (0..LANES)
                .map(|l| {
                    (0..n)
                        .map(|i| ((i * (l + 2) * 37 % 101) as f32 * 0.37).sin() + 0.1 * l as f32)
                        .collect()
                })
                .collect();
            let mut z: Vec<Complex<f32>> = frames
                .chunks_exact(2)
                .flat_map(|ab| ab[0].iter().zip(&ab[1]).map(|(&u, &v)| Complex::new(u, v)))
                .collect();
            let fft = FftPlanner::<f32>::new().plan_fft_forward(n);
            for pair in z.chunks_exact_mut(n) {
                fft.process(pair);
            }
            let mut power = vec![f32::NAN; (n / 2 + 1) * LANES];
            split_pairs(&z, n, &mut power);
            for (lane, frame) in frames.iter().enumerate() {
                for (k, p) in dft_power(frame).into_iter().enumerate() {
                    let got = power[k * LANES + lane];
                    let scale = 1e-5 * (1.0 + p);
                    assert!(
                        (f64::from(got) - p).abs() < scale,
                        "n {n} lane {lane} bin {k}: {got} vs {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn frames_match_a_direct_stft() {
        // Mel energies of every frame against a direct f64 STFT, covering reflected edges,
        // interior pairs and frames past the real samples (padding value 0.3).
        let (n_fft, hop, n) = (16, 4, 64);
        let lm = LogMel::new(n_fft, hop, n, 4, 16000, 0.3);
        let x: Vec<f32> = (0..50).map(|i| (i as f32 * 0.9).cos() * 0.5).collect();
        let mut out = Array2::zeros((4, lm.n_frames()));
        lm.compute_into(&x, out.view_mut()).unwrap();
        let chunk = Chunk {
            x: &x,
            n,
            padding_value: 0.3,
        };
        let window = hann_window(n_fft);
        let bank = mel_filter_bank(n_fft / 2 + 1, 4, 16000, 0.0, 8000.0);
        let mut want = Array2::<f64>::zeros((4, lm.n_frames()));
        for t in 0..lm.n_frames() {
            let lo = (t * hop) as isize - (n_fft / 2) as isize;
            let frame: Vec<f32> = (0..n_fft)
                .map(|j| chunk.at(lo + j as isize) * window[j])
                .collect();
            let power = dft_power(&frame);
            for m in 0..4 {
                let mel: f64 = (0..power.len())
                    .map(|k| power[k] * f64::from(bank[[k, m]]))
                    .sum();
                want[[m, t]] = mel.max(1e-10).log10();
            }
        }
        let max = want.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        want.mapv_inplace(|v| (v.max(max - 8.0) + 4.0) / 4.0);
        for ((m, t), &w) in want.indexed_iter() {
            let got = f64::from(out[[m, t]]);
            assert!((got - w).abs() < 1e-5, "mel {m} frame {t}: {got} vs {w}");
        }
    }

    #[test]
    fn padding_value_only_counts_where_padding_is() {
        // 100 frames of a 16000-sample chunk, the last lane group partial. A loud padding
        // value must change nothing when no frame holds padding.
        let lm = LogMel::new(400, 160, 16000, 80, 16000, 0.9);
        let quiet: Vec<f32> = (0..16000).map(|i| 1e-3 * (i as f32 * 0.05).sin()).collect();
        let mut out = Array2::zeros((80, lm.n_frames()));
        lm.compute_into(&quiet, out.view_mut()).unwrap();
        let reference = LogMel::new(400, 160, 16000, 80, 16000, 0.0);
        let mut want = Array2::zeros((80, lm.n_frames()));
        reference.compute_into(&quiet, want.view_mut()).unwrap();
        assert_eq!(out, want);
        // With padding present, its frames are the constant frame's values.
        lm.compute_into(&quiet[..8000], out.view_mut()).unwrap();
        let last = out.column(99).to_owned();
        assert_eq!(out.column(80), last);
    }

    #[test]
    fn silence_is_flat_and_tone_peaks_in_its_band() {
        let lm = LogMel::new(400, 160, 16000, 80, 16000, 0.0);
        let mut out = Array2::zeros((80, lm.n_frames()));
        lm.compute_into(&[], out.view_mut()).unwrap();
        assert_eq!(lm.n_frames(), 100);
        // log10(1e-10) = -10 everywhere -> (-10 + 4) / 4.
        assert!(out.iter().all(|&v| (v + 1.5).abs() < 1e-6));

        let tone: Vec<f32> = (0..16000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin())
            .collect();
        lm.compute_into(&tone, out.view_mut()).unwrap();
        let col = out.column(50);
        let best = (0..80).fold(0, |a, m| if col[m] > col[a] { m } else { a });
        // 1 kHz is 15 Slaney mels; the bank spans 0..~57.6 mels over 81 steps.
        let centre = mel_to_hertz((best + 1) as f64 * hertz_to_mel(8000.0) / 81.0);
        assert!(
            (centre - 1000.0).abs() < 100.0,
            "peak filter centre {centre}"
        );
        // Nothing falls more than 8 log10 units (+ scaling) below the max.
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = out.iter().copied().fold(f32::INFINITY, f32::min);
        assert!((max - min - 2.0).abs() < 1e-5);
    }
}
