//! Video preprocessing: choose frames, decode only those, run each through the image
//! pipeline of the encoder they feed.
//!
//! Inputs ([`VideoInput`]): an animated GIF or WebP (path or bytes), a directory of frame
//! images, or a uint8 array `[T, H, W, C]` (`C` in 1, 3, 4) with an optional frame rate.
//! Container formats (MP4, WebM, ...) are decoded on the Python side
//! (`mlmf.video.read_video`, PyAV) and arrive here as arrays.
//!
//! Output ([`VideoBatch`]): float32 `pixel_values` `[B, T, 3, H, W]`, or
//! `[B, W, K, 3, H, W]` for the windowed sampler (`W` windows of `K` frames), where
//! `3, H, W` is what [`ImageProcessor::process_rgb_into`] makes of one frame; plus the
//! sampled frame indices and a [`VideoMeta`] per video.
//!
//! Sampling rules are in [`FrameSampler`] (uniform and fps sampling equal transformers'
//! `default_sample_indices_fn`); decoding rules are in `frames.rs`.

pub(crate) mod frames;
pub(crate) mod sample;

use ndarray::{ArrayD, Ix4, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{catch_panic, AtIndex, MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::image::ImageProcessor;
use crate::preprocess::{Processor, Source};

pub use sample::{fps_indices, uniform_indices, FrameSampler, ShortVideo};

use frames::{as_video, FrameSource};

/// One raw video.
#[derive(Debug, Clone)]
pub enum VideoInput {
    /// An animated GIF or WebP (file or bytes), or the path of a directory of frame images.
    Source(Source),
    /// Decoded frames `[T, H, W, C]`, `C` in 1 (grey), 3 (RGB), 4 (RGBA), with the frame
    /// rate when known.
    Frames {
        data: ndarray::Array4<u8>,
        fps: Option<f64>,
    },
    /// Some frames of a longer video, decoded elsewhere (e.g. by PyAV from a container,
    /// after asking [`VideoProcessor::sample_indices`] which ones): row `r` of `data` is
    /// frame `indices[r]` (ascending, no repeats) of a video of `total` frames.
    Sparse {
        data: ndarray::Array4<u8>,
        indices: Vec<usize>,
        total: usize,
        fps: Option<f64>,
    },
}

impl VideoInput {
    /// Frames from an array of any rank, checked to be `[T, H, W, C]`.
    pub fn from_array(data: ArrayD<u8>, fps: Option<f64>) -> Result<Self> {
        let shape = data.shape().to_vec();
        let data = data.into_dimensionality::<Ix4>().map_err(|_| {
            MlmfError::input(
                Modality::Video,
                format!(
                    "expected a uint8 array of shape [T, H, W, C], got {} dimensions {shape:?}",
                    shape.len()
                ),
            )
        })?;
        Ok(Self::Frames { data, fps })
    }
}

/// Settings of a [`VideoProcessor`] (the image settings live in its [`ImageProcessor`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoProcessorConfig {
    /// Which frames to take. Default: 8 frames, uniform.
    pub sampler: FrameSampler,
    /// Frame rate assumed for inputs that carry none (directories, arrays without `fps`,
    /// GIFs whose delays are all 0). Needed by the fps sampler and by windows in seconds.
    pub default_fps: Option<f64>,
    /// Safety limit on the frames taken from one video (all windows together). Default 512.
    pub max_frames: usize,
    /// What to do when a video has fewer frames than the sampler asks for.
    /// Default: [`ShortVideo::Error`], as transformers does.
    pub short_video: ShortVideo,
}

impl Default for VideoProcessorConfig {
    fn default() -> Self {
        Self {
            sampler: FrameSampler::default(),
            default_fps: None,
            max_frames: 512,
            short_video: ShortVideo::Error,
        }
    }
}

impl VideoProcessorConfig {
    /// Checks every field; errors carry the field path (`sampler.num_frames`, ...).
    pub fn validate(&self) -> Result<()> {
        self.sampler.validate()?;
        if let Some(f) = self.default_fps {
            if !(f.is_finite() && f > 0.0) {
                return Err(MlmfError::config(
                    "default_fps",
                    format!("must be a positive finite number, got {f}"),
                ));
            }
        }
        if self.max_frames == 0 {
            return Err(MlmfError::config("max_frames", "must be at least 1"));
        }
        let fixed = match self.sampler {
            FrameSampler::Uniform { num_frames } => Some(num_frames),
            FrameSampler::Windows {
                frames_per_window,
                max_windows: Some(m),
                ..
            } => frames_per_window.checked_mul(m),
            _ => None,
        };
        if let Some(n) = fixed {
            if n > self.max_frames {
                return Err(MlmfError::config(
                    "sampler",
                    format!(
                        "takes {n} frames per video, more than max_frames = {}",
                        self.max_frames
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What is known of one video of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoMeta {
    /// Frames in the whole video.
    pub total_frames: usize,
    /// The frame rate sampling used: the video's own (array `fps`, mean GIF/WebP frame
    /// delay), else the config's `default_fps`, else `None`.
    pub fps: Option<f64>,
    /// Size of the decoded frames (of the first sampled frame).
    pub width: u32,
    pub height: u32,
}

/// A processed batch.
#[derive(Clone, Debug)]
pub struct VideoBatch {
    /// `[B, T, 3, H, W]`, or `[B, W, K, 3, H, W]` for windows.
    pub pixel_values: ArrayD<f32>,
    /// Sampled frame indices per video (windows one after another).
    pub indices: Vec<Vec<usize>>,
    pub meta: Vec<VideoMeta>,
}

/// Samples, decodes and preprocesses videos.
#[derive(Clone)]
pub struct VideoProcessor {
    cfg: VideoProcessorConfig,
    image: ImageProcessor,
}

impl std::fmt::Debug for VideoProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoProcessor")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Runs `f`, turning a panic (a bug here or in a decoder fed malformed data) into an error.
fn guarded<T>(index: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_panic(&format!("video input {index}: processing panicked"), f)
}

/// A video opened and planned: its frame source, the frame rate sampling used, and the
/// sampled indices (one list per window).
struct Planned<'a> {
    src: FrameSource<'a>,
    fps: Option<f64>,
    plan: Vec<Vec<usize>>,
}

impl Planned<'_> {
    fn flat(&self) -> Vec<usize> {
        self.plan.iter().flatten().copied().collect()
    }
}

/// The batch's pixel data, its per-frame `(H, W)`, and the metadata per video.
struct Rendered {
    data: Vec<f32>,
    size: (usize, usize),
    meta: Vec<VideoMeta>,
}

/// The first error in batch order (parallel collection would report an arbitrary one).
fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

impl VideoProcessor {
    /// A processor from its settings and the image pipeline frames go through.
    pub fn new(cfg: VideoProcessorConfig, image: ImageProcessor) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, image })
    }

    /// The settings.
    pub fn config(&self) -> &VideoProcessorConfig {
        &self.cfg
    }

    /// The image pipeline applied to every frame.
    pub fn image(&self) -> &ImageProcessor {
        &self.image
    }

    /// Frame indices for a video of `total` frames at `fps` (`None`: use `default_fps`):
    /// one list per window for the windowed sampler, otherwise a single list.
    pub fn sample_indices(&self, total: usize, fps: Option<f64>) -> Result<Vec<Vec<usize>>> {
        let fps = fps.or(self.cfg.default_fps);
        let plan = self.cfg.sampler.indices(total, fps, self.cfg.short_video)?;
        let taken: usize = plan.iter().map(Vec::len).sum();
        if taken > self.cfg.max_frames {
            return Err(MlmfError::input(
                Modality::Video,
                format!(
                    "sampler takes {taken} frames from a video of {total}, more than \
                     max_frames = {}",
                    self.cfg.max_frames
                ),
            ));
        }
        Ok(plan)
    }

    /// Samples, decodes and preprocesses a batch. All videos must yield the same number of
    /// frames (windows) and the same frame size after preprocessing; errors name the
    /// failing video's index.
    pub fn process(&self, inputs: &[VideoInput]) -> Result<VideoBatch> {
        if inputs.is_empty() {
            return Err(MlmfError::input(
                Modality::Video,
                "expected at least one video in the batch",
            ));
        }
        // 1. Open every video and plan its frames (no pixel decoding yet).
        let opened = first_error(
            inputs
                .par_iter()
                .enumerate()
                .map(|(i, input)| {
                    guarded(i, || {
                        let src = FrameSource::open(input, self.image.config().max_image_pixels)?;
                        let fps = src.fps().or(self.cfg.default_fps);
                        let plan = self.sample_indices(src.total(), fps)?;
                        Ok(Planned { src, fps, plan })
                    })
                    .at_index(i)
                })
                .collect(),
        )?;
        // 2. Every video must give the same layout of frames.
        let layout = |plan: &[Vec<usize>]| (plan.len(), plan.first().map_or(0, Vec::len));
        let (windows, per_window) = layout(&opened[0].plan);
        for (i, video) in opened.iter().enumerate().skip(1) {
            let (w, k) = layout(&video.plan);
            if (w, k) != (windows, per_window) {
                let what = |w: usize, k: usize| {
                    if self.cfg.sampler.is_windowed() {
                        format!("{w} windows")
                    } else {
                        format!("{k} frames")
                    }
                };
                return Err(MlmfError::input(
                    Modality::Video,
                    format!(
                        "gives {} but video 0 gives {}: every video of a batch must give the \
                         same number (process them separately, or use the uniform sampler / \
                         max_windows)",
                        what(w, k),
                        what(windows, per_window)
                    ),
                )
                .at_index(i));
            }
        }
        let n_frames = windows * per_window;
        let Rendered {
            data,
            size: (h, w),
            meta,
        } = match self.image.config().output_size() {
            Some(size) => self.render_fixed(&opened, n_frames, size)?,
            None => self.render_free(&opened, n_frames)?,
        };
        let mut shape = vec![inputs.len()];
        if self.cfg.sampler.is_windowed() {
            shape.extend([windows, per_window]);
        } else {
            shape.push(n_frames);
        }
        shape.extend([3, h, w]);
        let pixel_values = ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| MlmfError::Internal(format!("video batch shape {shape:?}: {e}")))?;
        let indices = opened.iter().map(Planned::flat).collect();
        Ok(VideoBatch {
            pixel_values,
            indices,
            meta,
        })
    }

    /// Output size known up front: every frame is written straight into the batch array.
    fn render_fixed(
        &self,
        opened: &[Planned<'_>],
        n_frames: usize,
        (h, w): (u32, u32),
    ) -> Result<Rendered> {
        let (h, w) = (h as usize, w as usize);
        let frame_len = 3 * h * w;
        let too_big = || {
            MlmfError::input(
                Modality::Video,
                format!(
                    "batch of {} videos x {n_frames} frames x 3x{h}x{w} is too large",
                    opened.len()
                ),
            )
        };
        let video_len = frame_len.checked_mul(n_frames).ok_or_else(too_big)?;
        let total_len = video_len.checked_mul(opened.len()).ok_or_else(too_big)?;
        if video_len == 0 {
            return Err(MlmfError::Internal(format!(
                "empty frame layout: {n_frames} frames of 3x{h}x{w}"
            )));
        }
        let mut data = vec![0f32; total_len];
        let meta = first_error(
            data.par_chunks_mut(video_len)
                .zip(opened.par_iter())
                .enumerate()
                .map(|(i, (out, video))| {
                    guarded(i, || {
                        let flat = video.flat();
                        let (frames, unique) = decode_unique(&video.src, &flat, &self.image)?;
                        render_frames(&self.image, &frames, &unique, &flat, out, frame_len)?;
                        Ok(meta_of(video, &frames))
                    })
                    .at_index(i)
                })
                .collect(),
        )?;
        Ok(Rendered {
            data,
            size: (h, w),
            meta,
        })
    }

    /// Output size depends on the frame (no fixed crop/size in the image config): each
    /// video is rendered on its own, and all frames of the batch must agree on the size.
    fn render_free(&self, opened: &[Planned<'_>], n_frames: usize) -> Result<Rendered> {
        let cfg = self.image.config();
        let mismatch = |what: String, (h, w): (u32, u32), (h0, w0): (u32, u32)| {
            MlmfError::input(
                Modality::Video,
                format!(
                    "{what} preprocess to {h}x{w} (HxW), {h0}x{w0} expected: all frames of a \
                     batch must produce the same output size (set do_center_crop with \
                     crop_size, or an exact size, in the image config)"
                ),
            )
        };
        let per_video: Vec<(Vec<f32>, (u32, u32), VideoMeta)> = first_error(
            opened
                .par_iter()
                .enumerate()
                .map(|(i, video)| {
                    guarded(i, || {
                        let flat = video.flat();
                        let (frames, unique) = decode_unique(&video.src, &flat, &self.image)?;
                        let first = frames
                            .first()
                            .ok_or_else(|| MlmfError::Internal("no frame decoded".into()))?;
                        let size_of = |img: &image::RgbImage, idx: usize| {
                            cfg.output_size_for(img.height(), img.width())
                                .map_err(|e| as_video(e, &format!("frame {idx}")))
                        };
                        let size = size_of(first, unique[0])?;
                        for (img, &idx) in frames.iter().zip(&unique) {
                            let s = size_of(img, idx)?;
                            if s != size {
                                return Err(mismatch(format!("frame {idx}"), s, size));
                            }
                        }
                        let frame_len = 3 * size.0 as usize * size.1 as usize;
                        let mut data = vec![0f32; frame_len * flat.len()];
                        render_frames(&self.image, &frames, &unique, &flat, &mut data, frame_len)?;
                        Ok((data, size, meta_of(video, &frames)))
                    })
                    .at_index(i)
                })
                .collect(),
        )?;
        let size = per_video[0].1;
        let frame_len = 3 * size.0 as usize * size.1 as usize;
        let mut data = Vec::with_capacity(per_video.len() * n_frames * frame_len);
        let mut meta = Vec::with_capacity(per_video.len());
        for (i, (v, s, m)) in per_video.into_iter().enumerate() {
            if s != size {
                return Err(mismatch("frames".into(), s, size).at_index(i));
            }
            data.extend_from_slice(&v);
            meta.push(m);
        }
        Ok(Rendered {
            data,
            size: (size.0 as usize, size.1 as usize),
            meta,
        })
    }
}

/// Runs every sampled frame (`flat`, windows one after another) through the image
/// pipeline into consecutive `frame_len` slices of `out`, in parallel.
fn render_frames(
    image: &ImageProcessor,
    frames: &[image::RgbImage],
    unique: &[usize],
    flat: &[usize],
    out: &mut [f32],
    frame_len: usize,
) -> Result<()> {
    if frame_len == 0 {
        return Err(MlmfError::Internal("empty frame output size".into()));
    }
    let results: Vec<Result<()>> = out
        .par_chunks_mut(frame_len)
        .zip(flat.par_iter())
        .map(|(dst, idx)| {
            let img = frame_at(frames, unique, *idx)?;
            image
                .process_rgb_into(img, dst)
                .map_err(|e| as_video(e, &format!("frame {idx}")))
        })
        .collect();
    first_error(results).map(|_| ())
}

/// Decodes each distinct sampled frame once (samplers may repeat indices).
fn decode_unique(
    src: &FrameSource<'_>,
    flat: &[usize],
    image: &ImageProcessor,
) -> Result<(Vec<image::RgbImage>, Vec<usize>)> {
    let mut unique = flat.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let frames = src.read(&unique, image)?;
    if frames.len() != unique.len() {
        return Err(MlmfError::Internal(format!(
            "decoded {} frames for {} sampled",
            frames.len(),
            unique.len()
        )));
    }
    Ok((frames, unique))
}

fn frame_at<'f>(
    frames: &'f [image::RgbImage],
    unique: &[usize],
    idx: usize,
) -> Result<&'f image::RgbImage> {
    unique
        .binary_search(&idx)
        .ok()
        .and_then(|p| frames.get(p))
        .ok_or_else(|| MlmfError::Internal(format!("frame {idx} was not decoded")))
}

fn meta_of(video: &Planned<'_>, frames: &[image::RgbImage]) -> VideoMeta {
    let (width, height) = frames.first().map_or((0, 0), |f| f.dimensions());
    VideoMeta {
        total_frames: video.src.total(),
        fps: video.fps,
        width,
        height,
    }
}

impl Processor for VideoProcessor {
    type Input = VideoInput;
    type Output = VideoBatch;

    fn modality(&self) -> Modality {
        Modality::Video
    }

    fn process(&self, inputs: &[VideoInput]) -> Result<VideoBatch> {
        VideoProcessor::process(self, inputs)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::preprocess::image::ImageInput;
    use ndarray::Array4;

    /// A CLIP-style image pipeline producing 8x8 frames, from a preprocessor_config.json.
    pub(crate) fn image_processor() -> ImageProcessor {
        image_processor_with(
            r#"{"image_processor_type": "CLIPImageProcessor", "do_resize": true,
                "size": {"shortest_edge": 8}, "do_center_crop": true,
                "crop_size": {"height": 8, "width": 8}, "do_rescale": true,
                "rescale_factor": 0.00392156862745098, "do_normalize": false,
                "do_convert_rgb": true, "resample": 3}"#,
        )
    }

    pub(crate) fn image_processor_with(json: &str) -> ImageProcessor {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        ImageProcessor::new(
            crate::preprocess::image::ImageProcessorConfig::from_hf_json(&v).unwrap(),
        )
        .unwrap()
    }

    fn processor(cfg: VideoProcessorConfig) -> VideoProcessor {
        VideoProcessor::new(cfg, image_processor()).unwrap()
    }

    fn uniform(n: usize) -> VideoProcessorConfig {
        VideoProcessorConfig {
            sampler: FrameSampler::Uniform { num_frames: n },
            ..Default::default()
        }
    }

    /// Reference values from transformers 5.23:
    /// `default_sample_indices_fn(VideoMetadata(total_num_frames=T, fps=F), num_frames=n)`
    /// and `(..., fps=f)`, run with /work/main/.venv-ref/bin/python; the full comparison
    /// (thousands of pairs) is in scripts outside the crate.
    #[test]
    fn uniform_and_fps_equal_transformers() {
        assert_eq!(uniform_indices(10, 3).unwrap(), vec![0, 3, 6]);
        assert_eq!(uniform_indices(7, 7).unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            uniform_indices(100, 8).unwrap(),
            vec![0, 12, 25, 37, 50, 62, 75, 87]
        );
        assert_eq!(uniform_indices(31, 4).unwrap(), vec![0, 7, 15, 23]);
        assert_eq!(uniform_indices(5, 0).unwrap(), Vec::<usize>::new());
        // 300 frames at 29.97 fps, 1 fps -> int(300 / 29.97 * 1) = 10 frames.
        assert_eq!(
            fps_indices(300, 29.97, 1.0).unwrap(),
            vec![0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
        );
        // Rounding trap: 49 / 24.5 * 2 = 4.0 exactly -> 4 frames.
        assert_eq!(fps_indices(49, 24.5, 2.0).unwrap(), vec![0, 12, 24, 36]);
        // Very short: at least one frame.
        assert_eq!(fps_indices(3, 30.0, 0.5).unwrap(), vec![0]);
        // 10 frames at 10 fps asked at 2.7 fps -> int(2.7000000000000006) = 2.
        assert_eq!(fps_indices(10, 10.0, 2.7).unwrap(), vec![0, 5]);
    }

    #[test]
    fn too_many_frames_is_a_typed_error_unless_allowed() {
        let err = uniform_indices(3, 8).unwrap_err();
        assert!(matches!(
            err,
            MlmfError::Input {
                modality: Modality::Video,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "video input: video has 3 frames, sampler asked for 8"
        );
        let err = fps_indices(30, 25.0, 30.0).unwrap_err().to_string();
        assert_eq!(
            err,
            "video input: video has 30 frames, sampler asked for 36"
        );

        let p = |short| {
            VideoProcessor::new(
                VideoProcessorConfig {
                    short_video: short,
                    ..uniform(8)
                },
                image_processor(),
            )
            .unwrap()
        };
        assert_eq!(
            p(ShortVideo::Repeat).sample_indices(3, None).unwrap(),
            vec![vec![0, 0, 0, 1, 1, 1, 2, 2]]
        );
        assert_eq!(
            p(ShortVideo::PadLast).sample_indices(3, None).unwrap(),
            vec![vec![0, 1, 2, 2, 2, 2, 2, 2]]
        );
        let err = p(ShortVideo::Error).sample_indices(0, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "video input: video has no frames: expected at least one"
        );
    }

    fn windows(
        window_frames: Option<usize>,
        window_seconds: Option<f64>,
        stride_frames: Option<usize>,
        k: usize,
        max_windows: Option<usize>,
    ) -> FrameSampler {
        FrameSampler::Windows {
            window_frames,
            window_seconds,
            stride_frames,
            stride_seconds: None,
            frames_per_window: k,
            max_windows,
        }
    }

    #[test]
    fn window_rules() {
        let p = |s, fps| {
            processor(VideoProcessorConfig {
                sampler: s,
                default_fps: fps,
                ..Default::default()
            })
        };
        // Tiling, 4-frame windows, 2 frames each: starts 0, 4, 8 (12 does not fit in 14).
        assert_eq!(
            p(windows(Some(4), None, None, 2, None), None)
                .sample_indices(14, None)
                .unwrap(),
            vec![vec![0, 2], vec![4, 6], vec![8, 10]]
        );
        // Overlapping stride 2.
        assert_eq!(
            p(windows(Some(4), None, Some(2), 1, None), None)
                .sample_indices(9, None)
                .unwrap(),
            vec![vec![0], vec![2], vec![4]]
        );
        // ImageBind style: 2 s windows, 2 frames, 5 windows, 60 s at 30 fps: 30 candidate
        // windows of 60 frames, windows 0, 6, 12, 18, 24 kept.
        let plan = p(windows(None, Some(2.0), None, 2, Some(5)), Some(30.0))
            .sample_indices(1800, None)
            .unwrap();
        assert_eq!(
            plan,
            vec![
                vec![0, 30],
                vec![360, 390],
                vec![720, 750],
                vec![1080, 1110],
                vec![1440, 1470]
            ]
        );
        // Seconds without a frame rate.
        let err = p(windows(None, Some(2.0), None, 2, None), None)
            .sample_indices(100, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("window_seconds needs the video's frame rate"),
            "{err}"
        );
        // The video's own fps wins over default_fps: 2 s at 5 fps = 10 frames.
        assert_eq!(
            p(windows(None, Some(2.0), None, 1, None), Some(30.0))
                .sample_indices(20, Some(5.0))
                .unwrap(),
            vec![vec![0], vec![10]]
        );
        // Shorter than a window.
        let err = p(windows(Some(10), None, None, 2, None), None)
            .sample_indices(6, None)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "video input: video has 6 frames, a window needs 10");
        let lenient = processor(VideoProcessorConfig {
            sampler: windows(Some(10), None, None, 4, None),
            short_video: ShortVideo::Repeat,
            ..Default::default()
        });
        assert_eq!(
            lenient.sample_indices(3, None).unwrap(),
            vec![vec![0, 0, 1, 2]]
        );
        // More frames per window than the window has.
        let err = p(windows(Some(2), None, None, 3, None), None)
            .sample_indices(6, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "video input: window has 2 frames, sampler asked for 3 per window"
        );
    }

    #[test]
    fn config_validation_names_fields() {
        let bad = |cfg: VideoProcessorConfig| {
            VideoProcessor::new(cfg, image_processor())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad(uniform(0)),
            "invalid config at `sampler.num_frames`: must be at least 1"
        );
        assert!(bad(VideoProcessorConfig {
            sampler: FrameSampler::Fps { fps: f64::NAN },
            ..Default::default()
        })
        .starts_with("invalid config at `sampler.fps`"));
        assert!(bad(VideoProcessorConfig {
            sampler: windows(Some(2), Some(1.0), None, 1, None),
            ..Default::default()
        })
        .contains("exactly one of window_frames and window_seconds"));
        assert!(bad(VideoProcessorConfig {
            max_frames: 4,
            ..uniform(8)
        })
        .contains("takes 8 frames per video, more than max_frames = 4"));
        assert!(bad(VideoProcessorConfig {
            default_fps: Some(-1.0),
            ..Default::default()
        })
        .starts_with("invalid config at `default_fps`"));
    }

    #[test]
    fn config_serde_roundtrip() {
        let cfg = VideoProcessorConfig {
            sampler: windows(None, Some(2.0), None, 2, Some(5)),
            default_fps: Some(30.0),
            max_frames: 64,
            short_video: ShortVideo::PadLast,
        };
        let json = serde_json::to_string(&cfg).unwrap();
        let back: VideoProcessorConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        let parsed: VideoProcessorConfig =
            serde_json::from_str(r#"{"sampler": {"type": "fps", "fps": 2.0}}"#).unwrap();
        assert_eq!(parsed.sampler, FrameSampler::Fps { fps: 2.0 });
        assert_eq!(parsed.max_frames, 512);
        assert!(serde_json::from_str::<VideoProcessorConfig>(r#"{"frames": 3}"#).is_err());
        let typo = r#"{"sampler": {"type": "windows", "frames_per_window": 2, "window_frame": 4}}"#;
        assert!(serde_json::from_str::<VideoProcessorConfig>(typo).is_err());
        let all: VideoProcessorConfig =
            serde_json::from_str(r#"{"sampler": {"type": "all"}}"#).unwrap();
        assert_eq!(all.sampler, FrameSampler::All);
    }

    /// `[T, H, W, 3]` frames whose red channel is the frame number.
    fn numbered(t: usize, h: usize, w: usize) -> Array4<u8> {
        Array4::from_shape_fn(
            (t, h, w, 3),
            |(f, _, _, c)| if c == 0 { f as u8 } else { 0 },
        )
    }

    #[test]
    fn processes_array_batches() {
        let p = processor(uniform(4));
        let batch = p
            .process(&[
                VideoInput::Frames {
                    data: numbered(10, 16, 12),
                    fps: Some(5.0),
                },
                VideoInput::Frames {
                    data: numbered(8, 8, 8),
                    fps: None,
                },
            ])
            .unwrap();
        assert_eq!(batch.pixel_values.shape(), &[2, 4, 3, 8, 8]);
        assert_eq!(batch.indices, vec![vec![0, 2, 5, 7], vec![0, 2, 4, 6]]);
        assert_eq!(
            batch.meta[0],
            VideoMeta {
                total_frames: 10,
                fps: Some(5.0),
                width: 12,
                height: 16
            }
        );
        // Each frame went through the image pipeline on its own: red = index / 255.
        for (b, idx) in batch.indices.iter().enumerate() {
            for (t, &i) in idx.iter().enumerate() {
                let v = batch.pixel_values[[b, t, 0, 4, 4].as_slice()];
                assert!((v - i as f32 / 255.0).abs() < 1e-6, "{b} {t} {v}");
            }
        }
        // Equal to processing the frames as images.
        let frame = numbered(10, 16, 12)
            .index_axis(ndarray::Axis(0), 5)
            .to_owned()
            .into_dyn();
        let single = p.image().process(&[ImageInput::Array(frame)]).unwrap();
        let got = batch
            .pixel_values
            .slice(ndarray::s![0, 2, .., .., ..])
            .to_owned();
        assert_eq!(got.as_slice().unwrap(), single.as_slice().unwrap());
    }

    #[test]
    fn windows_batch_shape() {
        let p = processor(VideoProcessorConfig {
            sampler: windows(Some(4), None, None, 2, Some(2)),
            ..Default::default()
        });
        let frames = || VideoInput::Frames {
            data: numbered(12, 8, 8),
            fps: None,
        };
        let batch = p.process(&[frames(), frames()]).unwrap();
        assert_eq!(batch.pixel_values.shape(), &[2, 2, 2, 3, 8, 8]);
        // 3 candidate windows, 2 kept: windows 0 and 1 (floor(j * 3 / 2)).
        assert_eq!(batch.indices[0], vec![0, 2, 4, 6]);
    }

    #[test]
    fn bad_inputs_name_video_index_and_expectation() {
        let p = processor(uniform(4));
        let ok = || VideoInput::Frames {
            data: numbered(6, 8, 8),
            fps: None,
        };
        let err = p
            .process(&[
                ok(),
                VideoInput::Frames {
                    data: numbered(3, 8, 8),
                    fps: None,
                },
            ])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "video input 1: video has 3 frames, sampler asked for 4"
        );
        let err = p
            .process(&[
                ok(),
                VideoInput::Frames {
                    data: Array4::zeros((5, 4, 4, 2)),
                    fps: None,
                },
            ])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "video input 1: expected frames of shape [T, H, W, C] with C in 1, 3, 4, got C = 2"
        );
        let err = p
            .process(&[VideoInput::Frames {
                data: Array4::zeros((0, 4, 4, 3)),
                fps: None,
            }])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input 0: expected a non-empty"),
            "{err}"
        );
        let err = VideoInput::from_array(ndarray::ArrayD::zeros(IxDyn(&[4, 4, 3])), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "video input: expected a uint8 array of shape [T, H, W, C], got 3 dimensions [4, 4, 3]"
        );
        let err = p
            .process(&[
                ok(),
                VideoInput::Source(Source::Bytes(b"GIF89a\x01".to_vec())),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input 1: cannot decode: truncated GIF"),
            "{err}"
        );
        let err = p
            .process(&[VideoInput::Source(Source::Bytes(
                b"\0\0\0\x18ftypmp42....".to_vec(),
            ))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("got an MP4/MOV container"), "{err}");
        assert!(err.contains("mlmf.video.read_video"), "{err}");
        let fps = processor(VideoProcessorConfig {
            sampler: FrameSampler::Fps { fps: 1.0 },
            ..Default::default()
        });
        let err = fps.process(&[ok()]).unwrap_err().to_string();
        assert!(
            err.contains("fps sampler needs the video's frame rate"),
            "{err}"
        );
        assert!(err.starts_with("video input 0:"), "{err}");
        // Different frame counts in one batch.
        let err = fps
            .process(&[
                VideoInput::Frames {
                    data: numbered(10, 8, 8),
                    fps: Some(2.0),
                },
                VideoInput::Frames {
                    data: numbered(10, 8, 8),
                    fps: Some(1.0),
                },
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input 1: gives 10 frames but video 0 gives 5"),
            "{err}"
        );
    }

    #[test]
    fn free_output_size_must_agree_across_the_batch() {
        // Shortest edge 8, no crop: a 16x12 frame becomes 10x8 (W x H), a 12x12 one 8x8.
        let ip = image_processor_with(
            r#"{"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 8},
                "do_center_crop": false, "do_normalize": false}"#,
        );
        let p = VideoProcessor::new(uniform(2), ip).unwrap();
        let ok = p
            .process(&[VideoInput::Frames {
                data: numbered(4, 12, 16),
                fps: None,
            }])
            .unwrap();
        assert_eq!(ok.pixel_values.shape(), &[1, 2, 3, 8, 10]);
        let err = p
            .process(&[
                VideoInput::Frames {
                    data: numbered(4, 12, 16),
                    fps: None,
                },
                VideoInput::Frames {
                    data: numbered(4, 12, 12),
                    fps: None,
                },
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input 1: frames preprocess to 8x8 (HxW), 8x10 expected"),
            "{err}"
        );
    }

    #[test]
    fn repeated_indices_repeat_frames() {
        let p = processor(VideoProcessorConfig {
            short_video: ShortVideo::PadLast,
            ..uniform(5)
        });
        let batch = p
            .process(&[VideoInput::Frames {
                data: numbered(3, 8, 8),
                fps: None,
            }])
            .unwrap();
        assert_eq!(batch.indices, vec![vec![0, 1, 2, 2, 2]]);
        let pv = &batch.pixel_values;
        assert_eq!(
            pv.slice(ndarray::s![0, 4, .., .., ..]),
            pv.slice(ndarray::s![0, 2, .., .., ..])
        );
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mlmf-video-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn directories_in_natural_order() {
        let dir = temp_dir("dir");
        for f in 0..12u8 {
            let img = image::RgbImage::from_pixel(10, 6, image::Rgb([f * 20, 0, 0]));
            img.save(dir.join(format!("frame{}.png", f + 1))).unwrap();
        }
        std::fs::write(dir.join(".DS_Store"), b"junk").unwrap();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let p = processor(uniform(3));
        let batch = p
            .process(&[VideoInput::Source(Source::Path(dir.clone()))])
            .unwrap();
        assert_eq!(batch.indices, vec![vec![0, 4, 8]]);
        assert_eq!((batch.meta[0].width, batch.meta[0].height), (10, 6));
        // frame1, frame5, frame9 (not frame10, as a byte sort would put second).
        for (t, want) in [0u8, 80, 160].into_iter().enumerate() {
            let v = batch.pixel_values[[0, t, 0, 0, 0].as_slice()];
            assert!((v - f32::from(want) / 255.0).abs() < 1e-6, "{t} {v}");
        }
        std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
        let err = p
            .process(&[VideoInput::Source(Source::Path(dir.clone()))])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("video input 0: frame directory"), "{err}");
        assert!(
            err.contains("\"notes.txt\", which is not an image file"),
            "{err}"
        );
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        // A corrupt frame is reported when sampled, naming the frame.
        std::fs::write(dir.join("frame5.png"), b"not a png").unwrap();
        let err = p
            .process(&[VideoInput::Source(Source::Path(dir.clone()))])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input 0: cannot decode: frame 4 ("),
            "{err}"
        );
        let empty = temp_dir("empty");
        let err = p
            .process(&[VideoInput::Source(Source::Path(empty.clone()))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no image files"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn animated_gif_end_to_end() {
        let frames: Vec<image::Frame> = (0..6u8)
            .map(|f| {
                let img = image::RgbaImage::from_pixel(9, 7, image::Rgba([f * 40, 10, 20, 255]));
                image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(50, 1))
            })
            .collect();
        let mut bytes = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut bytes);
            enc.encode_frames(frames).unwrap();
        }
        let p = processor(uniform(3));
        let batch = p
            .process(&[VideoInput::Source(Source::Bytes(bytes))])
            .unwrap();
        assert_eq!(batch.indices, vec![vec![0, 2, 4]]);
        assert_eq!(
            batch.meta[0],
            VideoMeta {
                total_frames: 6,
                fps: Some(20.0),
                width: 9,
                height: 7
            }
        );
        for (t, want) in [0u8, 80, 160].into_iter().enumerate() {
            let v = batch.pixel_values[[0, t, 0, 3, 3].as_slice()];
            assert!((v - f32::from(want) / 255.0).abs() < 0.02, "{t} {v}");
        }
    }
}
