//! Frame samplers: which frame indices of a video become model input.
//!
//! Input: a video's frame count `total` and, when known, its frame rate. Output: lists of
//! frame indices in `0..total`, ascending (one list for [`FrameSampler::Uniform`],
//! [`FrameSampler::Fps`] and [`FrameSampler::All`]; one list per window for
//! [`FrameSampler::Windows`]).
//!
//! Uniform and fps sampling follow transformers' `default_sample_indices_fn`
//! (`video_utils.py`, transformers 5.23), which is also what `BaseVideoProcessor.sample_frames`
//! calls: `indices = np.arange(n, dtype=int) * total // n` (integer arithmetic: index `i` is
//! `floor(i * total / n)`), and with a target rate `n = max(1, int(total / video_fps * fps))`
//! (float64 division and multiplication, then truncation). Asking for more frames than the
//! video has is an error there; here it is an error too unless [`ShortVideo`] says to repeat
//! frames. The older `get_uniform_frame_indices` (float `arange` step, deprecated in 5.23) is
//! not followed: its float step can yield `n + 1` indices.

use serde::{Deserialize, Serialize};

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// How frames are chosen from a video.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FrameSampler {
    /// `num_frames` frames spread evenly: index `i` is `floor(i * total / num_frames)`.
    Uniform { num_frames: usize },
    /// A target rate: `n = max(1, floor(total / video_fps * fps))` frames, then uniform.
    /// Needs the video's frame rate (its own, or the config's `default_fps`).
    Fps { fps: f64 },
    /// Temporal windows, `frames_per_window` frames each (ImageBind style: windows of
    /// 2 s, 2 frames each, 5 windows). The rule, with `T` the video's frame count:
    ///
    /// 1. Window length `L` in frames: `window_frames`, or `round(window_seconds * fps)`
    ///    (at least 1). Exactly one of the two is set.
    /// 2. Stride `S`: `stride_frames`, or `round(stride_seconds * fps)` (at least 1), or
    ///    `L` when neither is set (windows tile the video without overlap).
    /// 3. Windows start at `0, S, 2S, ...` and must fit: there are `(T - L) / S + 1` of them
    ///    (integer division). A video shorter than one window (`T < L`) is an error, unless
    ///    [`ShortVideo`] allows repeats: then it is one window covering the whole video.
    /// 4. With `max_windows = m` and more than `m` candidate windows, window number
    ///    `floor(j * count / m)` is kept for `j in 0..m` (the uniform rule again), so the
    ///    kept windows spread over the whole video instead of covering only its start.
    /// 5. Inside a window starting at `s`, frame `s + floor(i * L / K)` for `i in 0..K`,
    ///    `K = frames_per_window` (the uniform rule applied to the window).
    ///
    /// Seconds need the frame rate (the video's own or `default_fps`); rounding is half
    /// away from zero.
    Windows {
        #[serde(default)]
        window_frames: Option<usize>,
        #[serde(default)]
        window_seconds: Option<f64>,
        #[serde(default)]
        stride_frames: Option<usize>,
        #[serde(default)]
        stride_seconds: Option<f64>,
        frames_per_window: usize,
        #[serde(default)]
        max_windows: Option<usize>,
    },
    /// Every frame, in order (bounded by the config's `max_frames`).
    All,
}

impl Default for FrameSampler {
    fn default() -> Self {
        Self::Uniform { num_frames: 8 }
    }
}

/// What to do when a sampler asks for more frames than a video (or window) has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShortVideo {
    /// Fail with an input error (what transformers does). The default.
    #[default]
    Error,
    /// Spread the frames anyway, repeating some: index `i` is `floor(i * T / n)` for
    /// `i in 0..n` (each frame used `n / T` times, rounded).
    Repeat,
    /// Every frame once, then the last frame repeated up to `n`.
    PadLast,
}

fn too_few(total: usize, n: usize) -> MlmfError {
    MlmfError::input(
        Modality::Video,
        format!("video has {total} frames, sampler asked for {n}"),
    )
}

/// `floor(i * total / n)` without overflow; `i < n`, so the result is below `total`.
fn spread(i: usize, total: usize, n: usize) -> usize {
    // usize -> u128 widening cannot lose bits; the quotient is < total, so it fits back.
    ((i as u128 * total as u128) / n as u128) as usize
}

/// `n` frame indices spread evenly over `total` frames: `floor(i * total / n)`, exactly
/// transformers' `np.arange(n, dtype=int) * total // n`.
///
/// `n == 0` gives an empty list (as transformers does); `n > total` is an input error
/// "video has T frames, sampler asked for N".
pub fn uniform_indices(total: usize, n: usize) -> Result<Vec<usize>> {
    if n > total {
        return Err(too_few(total, n));
    }
    Ok((0..n).map(|i| spread(i, total, n)).collect())
}

/// How many frames a target rate takes: `max(1, floor(total / video_fps * fps))`, in f64
/// like transformers (Python's `int()` truncates; so does the cast, for finite values).
pub(crate) fn fps_frame_count(total: usize, video_fps: f64, fps: f64) -> Result<usize> {
    if !(video_fps.is_finite() && video_fps > 0.0) {
        return Err(MlmfError::input(
            Modality::Video,
            format!("video frame rate must be a positive finite number, got {video_fps}"),
        ));
    }
    if !(fps.is_finite() && fps > 0.0) {
        return Err(MlmfError::config(
            "sampler.fps",
            format!("must be a positive finite number, got {fps}"),
        ));
    }
    // `as` saturates at usize::MAX for huge products, which then fails the length check.
    let n = (total as f64 / video_fps * fps) as usize;
    Ok(n.max(1))
}

/// Frame indices for a target rate `fps` from a video of `total` frames at `video_fps`:
/// `uniform_indices(total, max(1, floor(total / video_fps * fps)))`, exactly transformers'
/// `default_sample_indices_fn(metadata, fps=fps)`.
pub fn fps_indices(total: usize, video_fps: f64, fps: f64) -> Result<Vec<usize>> {
    uniform_indices(total, fps_frame_count(total, video_fps, fps)?)
}

/// `n` indices from `total` frames under a short-video policy.
pub(crate) fn counted_indices(total: usize, n: usize, short: ShortVideo) -> Result<Vec<usize>> {
    if n <= total {
        return uniform_indices(total, n);
    }
    if total == 0 {
        return Err(too_few(total, n));
    }
    match short {
        ShortVideo::Error => Err(too_few(total, n)),
        ShortVideo::Repeat => Ok((0..n).map(|i| spread(i, total, n)).collect()),
        ShortVideo::PadLast => Ok((0..n).map(|i| i.min(total - 1)).collect()),
    }
}

/// Seconds -> frames for window lengths and strides: `round(seconds * fps)`, at least 1.
fn seconds_to_frames(seconds: f64, fps: Option<f64>, field: &str) -> Result<usize> {
    let fps = fps.ok_or_else(|| {
        MlmfError::input(
            Modality::Video,
            format!(
                "sampler.{field} needs the video's frame rate, which is unknown: \
                 pass fps with the frames or set default_fps"
            ),
        )
    })?;
    let frames = (seconds * fps).round();
    if !frames.is_finite() || frames > usize::MAX as f64 {
        return Err(MlmfError::input(
            Modality::Video,
            format!("sampler.{field} = {seconds} s at {fps} fps is not a usable frame count"),
        ));
    }
    // Finite, non-negative (both factors are validated positive) and in range.
    Ok((frames as usize).max(1))
}

/// The parameters of [`FrameSampler::Windows`].
struct WindowSpec {
    window_frames: Option<usize>,
    window_seconds: Option<f64>,
    stride_frames: Option<usize>,
    stride_seconds: Option<f64>,
    frames_per_window: usize,
    max_windows: Option<usize>,
}

/// Window index lists for a video of `total` frames at `fps` (rule on [`FrameSampler::Windows`]).
fn window_indices(
    spec: &WindowSpec,
    total: usize,
    fps: Option<f64>,
    short: ShortVideo,
) -> Result<Vec<Vec<usize>>> {
    let mut len = match (spec.window_frames, spec.window_seconds) {
        (Some(f), _) => f,
        (None, Some(s)) => seconds_to_frames(s, fps, "window_seconds")?,
        (None, None) => {
            return Err(MlmfError::config(
                "sampler",
                "windows need window_frames or window_seconds",
            ))
        }
    };
    let stride = match (spec.stride_frames, spec.stride_seconds) {
        (Some(f), _) => f,
        (None, Some(s)) => seconds_to_frames(s, fps, "stride_seconds")?,
        (None, None) => len,
    };
    if len == 0 || stride == 0 {
        return Err(MlmfError::config(
            "sampler",
            "window length and stride must be at least 1 frame",
        ));
    }
    if total == 0 {
        return Err(MlmfError::input(
            Modality::Video,
            "video has no frames: expected at least one",
        ));
    }
    if total < len {
        if short == ShortVideo::Error {
            return Err(MlmfError::input(
                Modality::Video,
                format!("video has {total} frames, a window needs {len}"),
            ));
        }
        len = total;
    }
    let count = (total - len) / stride + 1;
    let chosen: Vec<usize> = match spec.max_windows {
        Some(m) if count > m => uniform_indices(count, m)?,
        _ => (0..count).collect(),
    };
    chosen
        .into_iter()
        .map(|w| {
            let start = w * stride;
            let inner = counted_indices(len, spec.frames_per_window, short).map_err(|_| {
                MlmfError::input(
                    Modality::Video,
                    format!(
                        "window has {len} frames, sampler asked for {} per window",
                        spec.frames_per_window
                    ),
                )
            })?;
            Ok(inner.into_iter().map(|i| start + i).collect())
        })
        .collect()
}

impl FrameSampler {
    /// Checks the parameters; errors name the field (`sampler.num_frames`, ...).
    pub(crate) fn validate(&self) -> Result<()> {
        let positive = |v: f64, field: &str| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(MlmfError::config(
                    format!("sampler.{field}"),
                    format!("must be a positive finite number, got {v}"),
                ))
            }
        };
        let nonzero = |v: usize, field: &str| -> Result<()> {
            if v > 0 {
                Ok(())
            } else {
                Err(MlmfError::config(
                    format!("sampler.{field}"),
                    "must be at least 1",
                ))
            }
        };
        match self {
            Self::Uniform { num_frames } => nonzero(*num_frames, "num_frames"),
            Self::Fps { fps } => positive(*fps, "fps"),
            Self::All => Ok(()),
            Self::Windows {
                window_frames,
                window_seconds,
                stride_frames,
                stride_seconds,
                frames_per_window,
                max_windows,
            } => {
                match (window_frames, window_seconds) {
                    (Some(f), None) => nonzero(*f, "window_frames")?,
                    (None, Some(s)) => positive(*s, "window_seconds")?,
                    _ => {
                        return Err(MlmfError::config(
                            "sampler",
                            "set exactly one of window_frames and window_seconds",
                        ))
                    }
                }
                match (stride_frames, stride_seconds) {
                    (Some(_), Some(_)) => {
                        return Err(MlmfError::config(
                            "sampler",
                            "set at most one of stride_frames and stride_seconds",
                        ))
                    }
                    (Some(f), None) => nonzero(*f, "stride_frames")?,
                    (None, Some(s)) => positive(*s, "stride_seconds")?,
                    (None, None) => {}
                }
                nonzero(*frames_per_window, "frames_per_window")?;
                if let Some(m) = max_windows {
                    nonzero(*m, "max_windows")?;
                }
                Ok(())
            }
        }
    }

    /// Index lists for a video of `total` frames at `fps` (`None`: unknown).
    pub(crate) fn indices(
        &self,
        total: usize,
        fps: Option<f64>,
        short: ShortVideo,
    ) -> Result<Vec<Vec<usize>>> {
        if total == 0 {
            return Err(MlmfError::input(
                Modality::Video,
                "video has no frames: expected at least one",
            ));
        }
        match self {
            Self::Uniform { num_frames } => Ok(vec![counted_indices(total, *num_frames, short)?]),
            Self::Fps { fps: target } => {
                let video_fps = fps.ok_or_else(|| {
                    MlmfError::input(
                        Modality::Video,
                        "the fps sampler needs the video's frame rate, which is unknown: \
                         pass fps with the frames or set default_fps",
                    )
                })?;
                let n = fps_frame_count(total, video_fps, *target)?;
                Ok(vec![counted_indices(total, n, short)?])
            }
            Self::All => Ok(vec![(0..total).collect()]),
            Self::Windows {
                window_frames,
                window_seconds,
                stride_frames,
                stride_seconds,
                frames_per_window,
                max_windows,
            } => {
                let spec = WindowSpec {
                    window_frames: *window_frames,
                    window_seconds: *window_seconds,
                    stride_frames: *stride_frames,
                    stride_seconds: *stride_seconds,
                    frames_per_window: *frames_per_window,
                    max_windows: *max_windows,
                };
                window_indices(&spec, total, fps, short)
            }
        }
    }

    /// Whether the output keeps a window axis (`[B, W, K, 3, H, W]`).
    pub(crate) fn is_windowed(&self) -> bool {
        matches!(self, Self::Windows { .. })
    }
}
