//! [`Encoder`]: a loaded [`ModalityEncoder`] together with the processor its checkpoint
//! ships (tokenizer.json, preprocessor_config.json), so raw media go in and embeddings
//! come out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::config::PreprocessingConfig;
use crate::device::DeviceSpec;
use crate::encoders::layers::{ce, masked_mean};
use crate::encoders::registry::{self, LoadRequest};
use crate::encoders::{
    bert, videomae, Checkpoint, ChunkPooling, EncoderInput, EncoderOutput, FrameEncoder,
    ModalityEncoder, Precision, ProcessorKind, VideoPooling,
};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::audio::{AudioInput, AudioProcessor, AudioRef};
use crate::preprocess::image::{ImageInput, ImageProcessor, ImageRef, PatchProcessor};
use crate::preprocess::text::{Padding, TextProcessor, TextProcessorConfig};
use crate::preprocess::video::{FrameSampler, VideoInput, VideoProcessor, VideoProcessorConfig};

/// How to load an [`Encoder`].
#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    /// Which modality to encode: needed to pick CLIP's or SigLIP's text tower, or to
    /// use an image checkpoint for video. `None`: the checkpoint's own (image for dual
    /// checkpoints).
    pub modality: Option<Modality>,
    pub device: DeviceSpec,
    pub precision: Precision,
    /// Temporal pooling when `modality` is video.
    pub video_pooling: VideoPooling,
    /// Frame sampling when `modality` is video (default: 8 frames, uniform).
    pub video: Option<VideoProcessorConfig>,
    /// Processor keys laid over the checkpoint's own settings (a config's
    /// `modalities.<m>.preprocessing`); for video, the sampler keys.
    pub preprocessing: PreprocessingConfig,
}

/// A batch after the processor, before the encoder.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    pub input: EncoderInput,
    /// For audio: how many 30 s chunks (rows of `input`) each clip became.
    pub num_chunks: Option<Vec<usize>>,
}

/// Raw inputs of one modality.
#[derive(Debug, Clone)]
pub enum RawInputs {
    Text(Vec<String>),
    Image(Vec<ImageInput>),
    Audio(Vec<AudioInput>),
    Video(Vec<VideoInput>),
}

/// The processor that prepares an encoder's inputs.
enum Prep {
    Text(TextProcessor),
    Image(ImageProcessor),
    Patches(PatchProcessor),
    Audio(AudioProcessor),
    Video(VideoProcessor),
}

/// An encoder ready for raw inputs: the model, its processor and where it came from.
#[derive(Clone)]
pub struct Encoder {
    model: Arc<dyn ModalityEncoder>,
    prep: Arc<std::result::Result<Prep, String>>,
    dir: PathBuf,
    precision: Precision,
    weight_bytes: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("dir", &self.dir)
            .field("model_type", &self.model.model_type())
            .field("modality", &self.model.modality())
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Loads the checkpoint in `dir` with the encoder its `model_type` names.
    pub fn from_pretrained(dir: impl AsRef<Path>, options: &EncoderOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let ckpt = Checkpoint::open(dir)?;
        // int8 on a GPU is refused before the device is opened (on any build).
        if options.device != DeviceSpec::Cpu && options.precision == Precision::Int8 {
            return Err(MlmfError::config(
                "dtype",
                format!(
                    "int8 runs on the CPU only, not on {}: use bfloat16 or float16 on a GPU, \
                     or device \"cpu\"",
                    options.device
                ),
            ));
        }
        let device = options.device.open()?;
        // A native video model (VideoMAE) encodes clips itself; any other checkpoint
        // asked for video loads its image tower, run per frame.
        let native = ckpt
            .model_type()
            .is_some_and(|t| videomae::NATIVE_VIDEO.contains(&t));
        let video = options.modality == Some(Modality::Video) && !native;
        let request = LoadRequest {
            checkpoint: &ckpt,
            modality: if video {
                Some(Modality::Image)
            } else {
                options.modality
            },
            device,
            precision: options.precision,
            bytes: Default::default(),
            record: None,
        };
        let model = registry::load(&request).map_err(|e| match e {
            // A video request loads the image tower: say so when that fails.
            MlmfError::ModelLoad {
                what,
                path,
                message,
            } if video => MlmfError::ModelLoad {
                what,
                path,
                message: format!("{message} (video needs an image checkpoint, run per frame)"),
            },
            other => other,
        })?;
        let model: Arc<dyn ModalityEncoder> = if video {
            Arc::new(FrameEncoder::new(model, options.video_pooling)?)
        } else {
            Arc::from(model)
        };
        let prep = load_processor(dir, model.processor(), options);
        if !options.preprocessing.is_empty() {
            if let Err(why) = &prep {
                return Err(MlmfError::config("preprocessing", why.clone()));
            }
        }
        let prep = Arc::new(prep);
        Ok(Self {
            model,
            prep,
            dir: dir.to_path_buf(),
            precision: options.precision,
            weight_bytes: request.bytes.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Wraps an encoder built in code, with no processor (preprocessed inputs only).
    pub fn from_model(model: Arc<dyn ModalityEncoder>) -> Self {
        Self {
            model,
            prep: Arc::new(Err("this encoder was built without a processor".into())),
            dir: PathBuf::new(),
            precision: Precision::F32,
            weight_bytes: 0,
        }
    }

    /// The precision its weights are kept in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes its weights occupy in memory, in the format they are kept in (0 for an
    /// encoder built in code).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The underlying model.
    pub fn model(&self) -> &Arc<dyn ModalityEncoder> {
        &self.model
    }

    pub fn modality(&self) -> Modality {
        self.model.modality()
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Encodes a preprocessed batch.
    pub fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let want = self.model.modality();
        if input.modality() != want {
            return Err(MlmfError::input(
                input.modality(),
                format!(
                    "this {} encoder ({}) takes {want} input, got {}",
                    want,
                    self.model.model_type(),
                    input.describe()
                ),
            ));
        }
        if input.is_empty() {
            return Err(MlmfError::input(
                want,
                "expected at least one item, got an empty batch",
            ));
        }
        if self.model.device().is_cpu() {
            // A layer stack is dozens of short parallel regions: keep the pool's
            // workers polling between them rather than waking them for each.
            return crate::pool::with_awake_pool(|| self.model.encode(input));
        }
        self.model.encode(input)
    }

    /// Runs the processor on raw inputs, then the model. Long audio split into several
    /// chunks comes back as one row per input: the chunks' positions one after another,
    /// padded to the longest input, and pooled over all of its real positions.
    pub fn encode_raw(&self, inputs: &RawInputs) -> Result<EncoderOutput> {
        self.encode_preprocessed(&self.preprocess(inputs)?)
    }

    /// Why raw inputs cannot be processed (no processor was found), or `None` when they
    /// can.
    pub fn processor_error(&self) -> Option<&str> {
        self.prep.as_ref().as_ref().err().map(String::as_str)
    }

    /// Each text's token count after truncation, as the encoder sees it (padding left
    /// out); `None` for an encoder that takes no text.
    pub fn count_tokens<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Option<Vec<usize>>> {
        let Ok(Prep::Text(p)) = self.prep.as_ref() else {
            return Ok(None);
        };
        if texts.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let batch = p.encode(texts)?;
        Ok(Some(
            batch
                .attention_mask
                .rows()
                .into_iter()
                .map(|r| r.iter().filter(|&&v| v != 0).count())
                .collect(),
        ))
    }

    /// Runs only the processor on raw inputs.
    pub fn preprocess(&self, inputs: &RawInputs) -> Result<Preprocessed> {
        let plain = |input| Preprocessed {
            input,
            num_chunks: None,
        };
        match inputs {
            RawInputs::Text(texts) => match self.prep_for(Modality::Text, texts.len())? {
                Prep::Text(p) => Ok(plain(EncoderInput::Text(p.encode(texts)?))),
                _ => Err(mismatch()),
            },
            RawInputs::Image(images) => match self.prep_for(Modality::Image, images.len())? {
                Prep::Image(p) => {
                    let refs: Vec<ImageRef<'_>> = images.iter().map(ImageRef::from).collect();
                    Ok(plain(EncoderInput::Image(p.process_refs(&refs)?)))
                }
                Prep::Patches(p) => {
                    let refs: Vec<ImageRef<'_>> = images.iter().map(ImageRef::from).collect();
                    Ok(plain(patch_input(p, &refs)?))
                }
                _ => Err(mismatch()),
            },
            RawInputs::Audio(clips) => match self.prep_for(Modality::Audio, clips.len())? {
                Prep::Audio(p) => {
                    let refs: Vec<AudioRef<'_>> = clips.iter().map(AudioRef::from).collect();
                    let feats = p.process_refs(&refs)?;
                    Ok(Preprocessed {
                        input: EncoderInput::Audio {
                            features: feats.input_features,
                            valid_frames: Some(feats.valid_frames),
                        },
                        num_chunks: Some(feats.num_chunks),
                    })
                }
                _ => Err(mismatch()),
            },
            RawInputs::Video(videos) => match self.prep_for(Modality::Video, videos.len())? {
                Prep::Video(p) => Ok(plain(EncoderInput::Video(video_pixels(p, videos)?))),
                _ => Err(mismatch()),
            },
        }
    }

    /// Encodes what [`preprocess`](Self::preprocess) produced: one row per input (audio
    /// chunks joined back together).
    pub fn encode_preprocessed(&self, pre: &Preprocessed) -> Result<EncoderOutput> {
        let out = self.encode(&pre.input)?;
        match &pre.num_chunks {
            Some(n) if n.iter().any(|&c| c != 1) => join_chunks(out, n, self.model.chunk_pooling()),
            _ => Ok(out),
        }
    }

    /// The processor's settings as JSON (`null` without a processor): what a cache
    /// fingerprints so that other settings give other keys.
    pub fn processor_settings(&self) -> serde_json::Value {
        let value = match self.prep.as_ref() {
            Ok(Prep::Text(p)) => serde_json::to_value(p.config()),
            Ok(Prep::Image(p)) => serde_json::to_value(p.config()),
            Ok(Prep::Patches(p)) => serde_json::to_value(p.config()),
            Ok(Prep::Audio(p)) => serde_json::to_value(p.config()),
            Ok(Prep::Video(p)) => serde_json::to_value((p.config(), p.image().config())),
            Err(_) => Ok(serde_json::Value::Null),
        };
        value.unwrap_or(serde_json::Value::Null)
    }

    /// The video processor, for a video encoder that has one.
    pub fn video_processor(&self) -> Option<&VideoProcessor> {
        match self.prep.as_ref() {
            Ok(Prep::Video(p)) => Some(p),
            _ => None,
        }
    }

    /// The processor, after checking this encoder takes `got` and the batch is not empty.
    fn prep_for(&self, got: Modality, len: usize) -> Result<&Prep> {
        let want = self.model.modality();
        if got != want {
            return Err(MlmfError::input(
                got,
                format!(
                    "this {want} encoder ({}) cannot encode {got} input",
                    self.model.model_type()
                ),
            ));
        }
        if len == 0 {
            return Err(MlmfError::input(
                want,
                "expected at least one item, got an empty batch",
            ));
        }
        self.prep.as_ref().as_ref().map_err(|why| {
            MlmfError::input(
                want,
                format!("cannot preprocess raw input: {why}; pass preprocessed arrays instead"),
            )
        })
    }

    /// Tokenises and encodes texts.
    pub fn encode_texts<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<EncoderOutput> {
        match self.prep_for(Modality::Text, texts.len())? {
            Prep::Text(p) => self.encode(&EncoderInput::Text(p.encode(texts)?)),
            _ => Err(mismatch()),
        }
    }

    /// Decodes, preprocesses and encodes images.
    pub fn encode_images(&self, images: &[ImageRef<'_>]) -> Result<EncoderOutput> {
        match self.prep_for(Modality::Image, images.len())? {
            Prep::Image(p) => self.encode(&EncoderInput::Image(p.process_refs(images)?)),
            Prep::Patches(p) => self.encode(&patch_input(p, images)?),
            _ => Err(mismatch()),
        }
    }

    /// Decodes, resamples, computes log-mel features and encodes audio clips.
    pub fn encode_audio(&self, clips: &[AudioRef<'_>]) -> Result<EncoderOutput> {
        match self.prep_for(Modality::Audio, clips.len())? {
            Prep::Audio(p) => {
                let feats = p.process_refs(clips)?;
                let out = self.encode(&EncoderInput::Audio {
                    features: feats.input_features,
                    valid_frames: Some(feats.valid_frames),
                })?;
                if feats.num_chunks.iter().all(|&n| n == 1) {
                    Ok(out)
                } else {
                    join_chunks(out, &feats.num_chunks, self.model.chunk_pooling())
                }
            }
            _ => Err(mismatch()),
        }
    }

    /// Samples frames, preprocesses and encodes videos.
    pub fn encode_videos(&self, videos: &[VideoInput]) -> Result<EncoderOutput> {
        match self.prep_for(Modality::Video, videos.len())? {
            Prep::Video(p) => self.encode(&EncoderInput::Video(video_pixels(p, videos)?)),
            _ => Err(mismatch()),
        }
    }
}

/// Frames `[B, T, 3, H, W]` of sampled videos (temporal windows are refused).
fn video_pixels(p: &VideoProcessor, videos: &[VideoInput]) -> Result<ndarray::Array5<f32>> {
    p.process(videos)?
        .pixel_values
        .into_dimensionality::<ndarray::Ix5>()
        .map_err(|_| {
            MlmfError::input(
                Modality::Video,
                "temporal windows from the video processor are not supported by the encoder; \
                 sample frames and use video_pooling=\"window:N\"",
            )
        })
}

/// NaFlex patches of `images` as encoder input.
fn patch_input(p: &PatchProcessor, images: &[ImageRef<'_>]) -> Result<EncoderInput> {
    let batch = p.process_refs(images)?;
    Ok(EncoderInput::Patches {
        patches: batch.patches,
        shapes: batch.shapes,
    })
}

fn mismatch() -> MlmfError {
    MlmfError::Internal("processor and encoder modalities disagree".into())
}

/// Puts the chunks of each input back together along the token axis; pooled as
/// `pooling` says.
fn join_chunks(
    out: EncoderOutput,
    num_chunks: &[usize],
    pooling: ChunkPooling,
) -> Result<EncoderOutput> {
    let f = ce("joining audio chunks");
    let (_, t, d) = out.hidden_states.dims3().map_err(&f)?;
    let longest = num_chunks.iter().copied().max().unwrap_or(1) * t;
    let mut hidden = Vec::with_capacity(num_chunks.len());
    let mut masks = Vec::with_capacity(num_chunks.len());
    let mut start = 0;
    for &n in num_chunks {
        let h = out
            .hidden_states
            .narrow(0, start, n)
            .and_then(|h| h.reshape((1, n * t, d)))
            .and_then(|h| h.pad_with_zeros(1, 0, longest - n * t))
            .map_err(&f)?;
        let m = out
            .mask
            .narrow(0, start, n)
            .and_then(|m| m.reshape((1, n * t)))
            .and_then(|m| m.pad_with_zeros(1, 0, longest - n * t))
            .map_err(&f)?;
        hidden.push(h);
        masks.push(m);
        start += n;
    }
    let hidden = Tensor::cat(&hidden, 0).map_err(&f)?;
    let mask = Tensor::cat(&masks, 0).map_err(&f)?;
    let pooled = match pooling {
        ChunkPooling::TokenMean => masked_mean(&hidden, &mask)?,
        ChunkPooling::MeanOfChunks => {
            let mut start = 0;
            let rows = num_chunks
                .iter()
                .map(|&n| {
                    let r = out
                        .pooled
                        .narrow(0, start, n)
                        .and_then(|p| p.to_dtype(candle_core::DType::F32))
                        .and_then(|p| p.mean_keepdim(0))
                        .and_then(|p| p.to_dtype(out.pooled.dtype()));
                    start += n;
                    r
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(&f)?;
            Tensor::cat(&rows, 0).map_err(&f)?
        }
    };
    Ok(EncoderOutput {
        hidden_states: hidden,
        mask,
        pooled,
    })
}

/// The processor for `kind` from the checkpoint's files with `options.preprocessing`
/// laid over them, or why there is none.
fn load_processor(
    dir: &Path,
    kind: ProcessorKind,
    options: &EncoderOptions,
) -> std::result::Result<Prep, String> {
    let over = &options.preprocessing;
    let hf = |p: &ImageProcessor| serde_json::to_value(p.config()).map_err(|e| e.to_string());
    let prep = match kind {
        ProcessorKind::Text {
            max_length,
            pad_to_max_length,
            max_tokens,
        } => {
            let cfg = TextProcessorConfig {
                max_length: bert::sentence_max_length(dir).or(max_length),
                padding: if pad_to_max_length {
                    Padding::MaxLength
                } else {
                    Padding::Longest
                },
                ..TextProcessorConfig::default()
            };
            let cfg = over.text_over(&cfg).map_err(|e| e.to_string())?;
            let tp = TextProcessor::from_pretrained(dir, cfg).map_err(|e| e.to_string())?;
            // Truncate to what the model takes when the tokenizer allows more.
            let limit = tp.config().max_length.or(tp.model_max_length());
            match max_tokens.filter(|&n| limit.is_none_or(|l| l > n)) {
                Some(n) => tp
                    .with_config(TextProcessorConfig {
                        max_length: Some(n),
                        ..tp.config().clone()
                    })
                    .map(Prep::Text),
                None => Ok(Prep::Text(tp)),
            }
        }
        ProcessorKind::Image { .. } => {
            let base = ImageProcessor::from_pretrained(dir).map_err(|e| e.to_string())?;
            if over.is_empty() {
                Ok(Prep::Image(base))
            } else {
                over.image(Some(&hf(&base)?))
                    .and_then(ImageProcessor::new)
                    .map(Prep::Image)
            }
        }
        ProcessorKind::Patches { .. } => {
            let base = PatchProcessor::from_pretrained(dir).map_err(|e| e.to_string())?;
            if over.is_empty() {
                Ok(Prep::Patches(base))
            } else {
                let json = serde_json::to_value(base.config()).map_err(|e| e.to_string())?;
                over.patches(&json)
                    .and_then(PatchProcessor::new)
                    .map(Prep::Patches)
            }
        }
        ProcessorKind::Video { frames, .. } => {
            // A native video model's clip length is the sampler's default.
            let mut base = VideoProcessorConfig::default();
            if let Some(num_frames) = frames {
                base.sampler = FrameSampler::Uniform { num_frames };
            }
            let video = if over.is_empty() {
                options.video.clone().unwrap_or(base)
            } else {
                over.video_over(&base).map_err(|e| e.to_string())?
            };
            ImageProcessor::from_pretrained(dir)
                .and_then(|image| VideoProcessor::new(video, image).map(Prep::Video))
        }
        ProcessorKind::Audio { .. } => {
            let base = AudioProcessor::from_pretrained(dir).map_err(|e| e.to_string())?;
            if over.is_empty() {
                Ok(Prep::Audio(base))
            } else {
                let json = serde_json::to_value(base.config()).map_err(|e| e.to_string())?;
                over.audio(Some(&json))
                    .and_then(AudioProcessor::new)
                    .map(Prep::Audio)
            }
        }
    };
    prep.map_err(|e| e.to_string())
}
