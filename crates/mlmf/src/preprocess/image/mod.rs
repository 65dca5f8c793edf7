//! Images -> model-ready pixels, matching transformers' PIL-backend
//! `CLIPImageProcessor` / `SiglipImageProcessor` bit for bit.
//!
//! Input: a file path, encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) or a `u8` array
//! `HW` / `HWC` (channels last, `C` in 1, 3, 4). Output: `f32` `[B, 3, H, W]`.
//!
//! Per image: decode and convert to RGB (`decode`, `convert`), resize with Pillow's
//! arithmetic (`resize`), center crop with zero padding, rescale (`x * factor` in `f64`,
//! then `f32`) and normalise (`(x - mean) / std` in `f32`). Resize and crop are fused:
//! only the resized pixels that survive the crop are computed. Rescale and normalise
//! map each `u8` through a per-channel 256-entry table holding exactly the reference's
//! `f32` results, written straight into the channels-first output. Items of a batch
//! run in parallel (rayon); an error names the failing item's index.
//!
//! `patches` turns the output into ViT or Qwen2-VL patch sequences.

pub(crate) mod convert;
pub(crate) mod decode;
pub(crate) mod hpass;
#[cfg(feature = "jpeg-turbo")]
mod jpeg;
pub mod naflex;
pub(crate) mod patches;
pub(crate) mod resize;

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array4, ArrayD, ArrayViewD, ArrayViewMut4};
use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

pub use decode::decode_image;
pub use naflex::{PatchBatch, PatchProcessor, PatchProcessorConfig};

/// Resizes `height x width` interleaved RGB bytes to `out_w x out_h` exactly as Pillow's
/// `Image.resize` does (see [`resize`]); `3 * out_w * out_h` bytes out. Too few bytes
/// for the declared size read as an empty (black) image.
pub fn resize_rgb(
    data: &[u8],
    width: usize,
    height: usize,
    out_w: u32,
    out_h: u32,
    filter: Resample,
) -> Vec<u8> {
    let src = if data.len() >= width.saturating_mul(height).saturating_mul(3) {
        RgbView {
            data,
            width,
            height,
        }
    } else {
        RgbView {
            data: &[],
            width: 0,
            height: 0,
        }
    };
    resize::resize_view(src, out_w, out_h, filter)
}

/// `out` as slots the pipeline writes. It only ever stores initialised values through
/// them, so `out` stays initialised.
fn as_slots(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the size and alignment of `f32`; the slice covers
    // the same memory for the same lifetime, and no uninitialised value is written.
    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) }
}

/// The JPEG decoder of this build: `"libjpeg-turbo"` (Pillow's, identical pixels; the
/// default `jpeg-turbo` feature) or `"zune-jpeg"` (within a few levels).
pub const JPEG_DECODER: &str = if cfg!(feature = "jpeg-turbo") {
    "libjpeg-turbo"
} else {
    "zune-jpeg"
};

/// Whether this build's libjpeg-turbo has its SIMD code (NASM was found when it was
/// built); without it decoding is slower and the pixels the same. False for zune-jpeg.
pub const JPEG_SIMD: bool = cfg!(mlmf_jpeg_simd);
pub use patches::{extract_patches, qwen2vl_patches};
pub use resize::{resize, Resample};

use crate::error::{AtIndex, MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::share::share_with_pool;
use crate::preprocess::{Processor, Source};
use resize::{resample_window, AxisPlan, PlanCache, RgbView};

/// CLIP's normalisation constants (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), written
/// with transformers' digits and rounded to `f32` as NumPy does.
const CLIP_MEAN: [f32; 3] = to_f32([0.48145466, 0.4578275, 0.40821073]);
const CLIP_STD: [f32; 3] = to_f32([0.26862954, 0.26130258, 0.27577711]);

const fn to_f32(v: [f64; 3]) -> [f32; 3] {
    [v[0] as f32, v[1] as f32, v[2] as f32]
}

/// Default decompression-bomb limit: 2 x Pillow's `MAX_IMAGE_PIXELS` (89_478_485),
/// the size at which Pillow raises `DecompressionBombError` rather than warning, so
/// every image Pillow opens is accepted here too.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// One raw image.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// An encoded file on disk or in memory.
    Source(Source),
    /// Decoded pixels: `HW` (greyscale) or `HWC` with `C` = 1 (greyscale), 3 (RGB) or
    /// 4 (RGBA), channels last.
    Array(ArrayD<u8>),
}

/// One image of a batch, by reference: an encoded source, or decoded pixels borrowed
/// from the caller (no copy; same layouts as [`ImageInput::Array`]).
#[derive(Debug, Clone)]
pub enum ImageRef<'a> {
    /// An encoded file on disk or in memory.
    Source(&'a Source),
    /// Decoded pixels: `HW` or `HWC` with `C` = 1, 3 or 4.
    Pixels(ArrayViewD<'a, u8>),
}

impl<'a> From<&'a ImageInput> for ImageRef<'a> {
    fn from(x: &'a ImageInput) -> Self {
        match x {
            ImageInput::Source(s) => Self::Source(s),
            ImageInput::Array(a) => Self::Pixels(a.view()),
        }
    }
}

impl From<Source> for ImageInput {
    fn from(s: Source) -> Self {
        Self::Source(s)
    }
}

impl From<ArrayD<u8>> for ImageInput {
    fn from(a: ArrayD<u8>) -> Self {
        Self::Array(a)
    }
}

/// How images are resized (`size` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// `{"shortest_edge": n}`: the short side becomes `n`, the long side
    /// `int(n * long / short)` (truncated), as transformers computes it.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`: exactly this size, aspect ratio not kept.
    Exact { height: u32, width: u32 },
    /// `{"shortest_edge": s, "longest_edge": l}`: short side `s` unless the long side
    /// would exceed `l` (transformers' `get_size_with_aspect_ratio`).
    ShortestLongest {
        shortest_edge: u32,
        longest_edge: u32,
    },
}

impl SizeSpec {
    /// The resized `(height, width)` of a `height x width` image.
    pub fn resized(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let (h, w) = (u64::from(height), u64::from(width));
        let (oh, ow) = match *self {
            Self::Exact { height, width } => (u64::from(height), u64::from(width)),
            Self::ShortestEdge(s) => {
                // get_resize_output_image_size(default_to_square=False)
                let s = u64::from(s);
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = ((s * long) as f64 / short.max(1) as f64) as u64;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
            Self::ShortestLongest {
                shortest_edge,
                longest_edge,
            } => size_with_aspect_ratio(h, w, u64::from(shortest_edge), u64::from(longest_edge)),
        };
        let fits = |v: u64| u32::try_from(v).ok().filter(|&v| v > 0);
        match (fits(oh), fits(ow)) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(MlmfError::input(
                Modality::Image,
                format!(
                    "a {width}x{height} image resizes to {ow}x{oh} under size {self:?}: expected \
                     both sides between 1 and 2^32 - 1"
                ),
            )),
        }
    }

    fn to_json(self) -> Value {
        match self {
            Self::ShortestEdge(s) => serde_json::json!({ "shortest_edge": s }),
            Self::Exact { height, width } => {
                serde_json::json!({ "height": height, "width": width })
            }
            Self::ShortestLongest {
                shortest_edge,
                longest_edge,
            } => {
                serde_json::json!({ "shortest_edge": shortest_edge, "longest_edge": longest_edge })
            }
        }
    }

    /// Parses the forms transformers accepts: an int (shortest edge, or a square when
    /// `default_to_square`), `[height, width]`, or a dict.
    fn from_json(v: &Value, default_to_square: bool) -> std::result::Result<Self, String> {
        const EXPECTED: &str = "expected an int, [height, width], {\"shortest_edge\": n}, \
             {\"height\": h, \"width\": w} or {\"shortest_edge\": s, \"longest_edge\": l}";
        let int = |v: &Value| -> std::result::Result<u32, String> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("expected a non-negative integer, got {v}"))
        };
        match v {
            Value::Number(_) => {
                let n = int(v)?;
                Ok(if default_to_square {
                    Self::Exact {
                        height: n,
                        width: n,
                    }
                } else {
                    Self::ShortestEdge(n)
                })
            }
            Value::Array(a) if a.len() == 2 => Ok(Self::Exact {
                height: int(&a[0])?,
                width: int(&a[1])?,
            }),
            Value::Object(m) => {
                let get = |k: &str| m.get(k).filter(|v| !v.is_null());
                match (
                    get("shortest_edge"),
                    get("longest_edge"),
                    get("height"),
                    get("width"),
                ) {
                    (Some(s), None, None, None) => Ok(Self::ShortestEdge(int(s)?)),
                    (Some(s), Some(l), None, None) => Ok(Self::ShortestLongest {
                        shortest_edge: int(s)?,
                        longest_edge: int(l)?,
                    }),
                    (None, None, Some(h), Some(w)) => Ok(Self::Exact {
                        height: int(h)?,
                        width: int(w)?,
                    }),
                    _ => Err(format!("unsupported size {v}: {EXPECTED}")),
                }
            }
            _ => Err(format!("unsupported size {v}: {EXPECTED}")),
        }
    }
}

/// transformers' `get_size_with_aspect_ratio((h, w), size, max_size)`, with Python's
/// float operation order and round-half-to-even.
fn size_with_aspect_ratio(h: u64, w: u64, size: u64, max_size: u64) -> (u64, u64) {
    let (hf, wf) = (h as f64, w as f64);
    let mut size = size;
    let mut raw_size: Option<f64> = None;
    let min_o = hf.min(wf);
    let max_o = hf.max(wf);
    if max_o / min_o * size as f64 > max_size as f64 {
        let raw = max_size as f64 * min_o / max_o;
        raw_size = Some(raw);
        size = raw.round_ties_even() as u64;
    }
    if (h <= w && h == size) || (w <= h && w == size) {
        (h, w)
    } else if w < h {
        let oh = match raw_size {
            Some(raw) => (raw * hf / wf) as u64,
            None => ((size * h) as f64 / wf) as u64,
        };
        (oh, size)
    } else {
        let ow = match raw_size {
            Some(raw) => (raw * wf / hf) as u64,
            None => ((size * w) as f64 / hf) as u64,
        };
        (size, ow)
    }
}

impl Serialize for SizeSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for SizeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json(&v, false).map_err(serde::de::Error::custom)
    }
}

/// Image preprocessing settings, with the key names of Hugging Face's
/// `preprocessor_config.json`. Missing keys take CLIP's defaults when deserialised
/// directly; [`ImageProcessorConfig::from_hf_json`] picks the defaults of the
/// processor type the file names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: SizeSpec,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// `(height, width)`; `{"height": h, "width": w}` in JSON.
    #[serde(with = "crop_serde")]
    pub crop_size: Option<(u32, u32)>,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(deserialize_with = "de_triplet")]
    pub image_mean: [f32; 3],
    #[serde(deserialize_with = "de_triplet")]
    pub image_std: [f32; 3],
    /// Composite transparency onto white (the reference's `convert_to_rgb`). When
    /// false the alpha channel is dropped instead; greyscale is always repeated to RGB.
    pub do_convert_rgb: bool,
    /// Decompression-bomb guard: images (decoded or arrays) and outputs with more
    /// pixels are refused. Default [`DEFAULT_MAX_IMAGE_PIXELS`].
    pub max_image_pixels: u64,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self::clip()
    }
}

mod crop_serde {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        v: &Option<(u32, u32)>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some((h, w)) => serde_json::json!({ "height": h, "width": w }).serialize(s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<(u32, u32)>, D::Error> {
        let v = Value::deserialize(d)?;
        parse_crop(&v).map_err(serde::de::Error::custom)
    }
}

/// `crop_size` forms: null, an int (square), `[height, width]`, `{"height", "width"}`.
fn parse_crop(v: &Value) -> std::result::Result<Option<(u32, u32)>, String> {
    match v {
        Value::Null => Ok(None),
        _ => match SizeSpec::from_json(v, true)? {
            SizeSpec::Exact { height, width } => Ok(Some((height, width))),
            _ => Err(format!(
                "unsupported crop_size {v}: expected an int, [height, width] or \
                 {{\"height\": h, \"width\": w}}"
            )),
        },
    }
}

/// A mean / std: one number for all channels or a list of three.
fn parse_triplet(v: &Value) -> std::result::Result<[f32; 3], String> {
    let num = |v: &Value| v.as_f64().map(|x| x as f32);
    match v {
        Value::Number(_) => num(v)
            .map(|x| [x; 3])
            .ok_or_else(|| format!("not a number: {v}")),
        Value::Array(a) if a.len() == 3 => match (num(&a[0]), num(&a[1]), num(&a[2])) {
            (Some(r), Some(g), Some(b)) => Ok([r, g, b]),
            _ => Err(format!("expected three numbers, got {v}")),
        },
        Value::Array(a) if a.len() == 1 => num(&a[0])
            .map(|x| [x; 3])
            .ok_or_else(|| format!("expected a number, got {v}")),
        _ => Err(format!(
            "expected a number or a list of 3 numbers (RGB), got {v}"
        )),
    }
}

fn de_triplet<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[f32; 3], D::Error> {
    let v = Value::deserialize(d)?;
    parse_triplet(&v).map_err(serde::de::Error::custom)
}

/// Which reference processor a `preprocessor_config.json` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Clip,
    Siglip,
    Other,
}

fn family_of(obj: &serde_json::Map<String, Value>) -> (Family, Option<String>) {
    let name = [
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
    ]
    .iter()
    .find_map(|k| obj.get(*k).and_then(Value::as_str))
    .map(str::to_string);
    let family = match name.as_deref().map(str::to_ascii_lowercase) {
        // SigLIP 2 (NaFlex) patchifies at variable resolution: not this pipeline.
        Some(n) if n.starts_with("siglip") && !n.starts_with("siglip2") => Family::Siglip,
        Some(n) if n.starts_with("clip") => Family::Clip,
        _ => Family::Other,
    };
    (family, name)
}

impl ImageProcessorConfig {
    /// transformers' `CLIPImageProcessor` defaults: shortest edge 224, bicubic, center
    /// crop 224x224, rescale 1/255, CLIP mean/std.
    pub fn clip() -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: Some((224, 224)),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_convert_rgb: true,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }

    /// transformers' `SiglipImageProcessor` defaults: 224x224 bicubic (aspect not
    /// kept), no crop, rescale 1/255, mean = std = 0.5.
    pub fn siglip() -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::Exact {
                height: 224,
                width: 224,
            },
            resample: Resample::Bicubic,
            do_center_crop: false,
            crop_size: None,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_convert_rgb: true,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }

    /// Reads a `preprocessor_config.json` object. Missing keys take the defaults of the
    /// type it names (`image_processor_type`, else `feature_extractor_type`, else
    /// `processor_class`): CLIP or SigLIP. Other types are accepted when they give a
    /// `size`; their missing keys take CLIP's values, except that they do not crop
    /// unless `do_center_crop` says so. Unknown keys are ignored; `null` means missing.
    /// Errors name the offending key.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            MlmfError::config(
                "",
                format!("expected a JSON object of processor settings, got {v}"),
            )
        })?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let (family, name) = family_of(obj);
        let mut cfg = match family {
            Family::Clip => Self::clip(),
            Family::Siglip => Self::siglip(),
            Family::Other => {
                if get("size").is_none() {
                    return Err(MlmfError::config(
                        "size",
                        format!(
                            "processor type {} is not one mlmf knows (CLIP, SigLIP) and the \
                             file has no size: expected a `size` key",
                            name.as_deref().unwrap_or("(none given)")
                        ),
                    ));
                }
                Self {
                    do_center_crop: false,
                    crop_size: None,
                    ..Self::clip()
                }
            }
        };
        let bool_at = |k: &str| -> Result<Option<bool>> {
            get(k)
                .map(|v| {
                    v.as_bool().ok_or_else(|| {
                        MlmfError::config(k, format!("expected true or false, got {v}"))
                    })
                })
                .transpose()
        };
        let default_to_square = bool_at("default_to_square")?.unwrap_or(false);
        if let Some(b) = bool_at("do_resize")? {
            cfg.do_resize = b;
        }
        if let Some(v) = get("size") {
            cfg.size = SizeSpec::from_json(v, default_to_square)
                .map_err(|m| MlmfError::config("size", m))?;
        }
        if bool_at("use_square_size")? == Some(true) {
            // transformers' KOSMOS-2 compatibility switch: a square of the shortest edge.
            if let SizeSpec::ShortestEdge(s) = cfg.size {
                cfg.size = SizeSpec::Exact {
                    height: s,
                    width: s,
                };
            }
        }
        if let Some(v) = get("resample") {
            cfg.resample = Resample::deserialize(v)
                .map_err(|e| MlmfError::config("resample", e.to_string()))?;
        }
        if let Some(b) = bool_at("do_center_crop")? {
            cfg.do_center_crop = b;
        }
        if let Some(v) = get("crop_size") {
            cfg.crop_size = parse_crop(v).map_err(|m| MlmfError::config("crop_size", m))?;
        }
        if let Some(b) = bool_at("do_rescale")? {
            cfg.do_rescale = b;
        }
        if let Some(v) = get("rescale_factor") {
            cfg.rescale_factor = v.as_f64().ok_or_else(|| {
                MlmfError::config("rescale_factor", format!("expected a number, got {v}"))
            })?;
        }
        if let Some(b) = bool_at("do_normalize")? {
            cfg.do_normalize = b;
        }
        if let Some(v) = get("image_mean") {
            cfg.image_mean = parse_triplet(v).map_err(|m| MlmfError::config("image_mean", m))?;
        }
        if let Some(v) = get("image_std") {
            cfg.image_std = parse_triplet(v).map_err(|m| MlmfError::config("image_std", m))?;
        }
        if let Some(b) = bool_at("do_convert_rgb")? {
            cfg.do_convert_rgb = b;
        }
        if let Some(v) = get("max_image_pixels") {
            cfg.max_image_pixels = v.as_u64().ok_or_else(|| {
                MlmfError::config(
                    "max_image_pixels",
                    format!("expected a positive integer, got {v}"),
                )
            })?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; errors name the field (`size`, `crop_size`, ...).
    pub fn validate(&self) -> Result<()> {
        match self.size {
            SizeSpec::ShortestEdge(0) => {
                return Err(MlmfError::config("size", "shortest_edge must be > 0"));
            }
            SizeSpec::Exact { height, width } if height == 0 || width == 0 => {
                return Err(MlmfError::config(
                    "size",
                    format!("height and width must be > 0, got {height}x{width}"),
                ));
            }
            SizeSpec::ShortestLongest {
                shortest_edge,
                longest_edge,
            } if shortest_edge == 0 || longest_edge < shortest_edge => {
                return Err(MlmfError::config(
                    "size",
                    format!(
                        "expected 0 < shortest_edge <= longest_edge, got {shortest_edge} and \
                         {longest_edge}"
                    ),
                ));
            }
            _ => {}
        }
        match self.crop_size {
            None if self.do_center_crop => {
                return Err(MlmfError::config(
                    "crop_size",
                    "do_center_crop is true but no crop_size is set: expected {\"height\": h, \"width\": w}",
                ));
            }
            Some((h, w)) if h == 0 || w == 0 => {
                return Err(MlmfError::config(
                    "crop_size",
                    format!("height and width must be > 0, got {h}x{w}"),
                ));
            }
            _ => {}
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return Err(MlmfError::config(
                "rescale_factor",
                format!("expected a finite number > 0, got {}", self.rescale_factor),
            ));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(MlmfError::config(
                "image_mean",
                format!("expected finite numbers, got {:?}", self.image_mean),
            ));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(MlmfError::config(
                "image_std",
                format!("expected finite non-zero numbers, got {:?}", self.image_std),
            ));
        }
        if self.max_image_pixels == 0 {
            return Err(MlmfError::config("max_image_pixels", "must be > 0"));
        }
        Ok(())
    }

    /// The `(height, width)` of every output when it does not depend on the input:
    /// the crop size when cropping, an exact resize size otherwise; `None` when it
    /// varies with the image.
    pub fn output_size(&self) -> Option<(u32, u32)> {
        if self.do_center_crop {
            return self.crop_size;
        }
        match (self.do_resize, self.size) {
            (true, SizeSpec::Exact { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// The `(height, width)` of the output for a `height x width` input.
    pub fn output_size_for(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        if let (true, Some(hw)) = (self.do_center_crop, self.crop_size) {
            return Ok(hw);
        }
        if self.do_resize {
            self.size.resized(height, width)
        } else {
            Ok((height, width))
        }
    }
}

/// The work for one image: its output size, which part of the output comes from the
/// resized image (the rest is crop padding), and how to produce that part.
struct ImagePlan {
    out_h: usize,
    out_w: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    h: AxisPlan,
    v: AxisPlan,
    /// What `v` was built from, to plan bands of rows: source height, resized
    /// height, and the resized rows of the window.
    in_h: u32,
    resized_h: u32,
    ywin: Range<u32>,
}

/// Output indices of one axis that land inside the resized image, and the resized
/// indices they read: transformers' center crop puts resized index
/// `i + floor((resized - out) / 2)` at output index `i` (zero padding outside).
fn crop_axis(resized: u32, out: u32, crop: bool) -> (Range<usize>, Range<u32>) {
    let off = if crop {
        (i64::from(resized) - i64::from(out)).div_euclid(2)
    } else {
        0
    };
    let lo = (-off).max(0);
    let hi = (i64::from(out)).min(i64::from(resized) - off).max(lo);
    (
        lo as usize..hi as usize,
        (lo + off) as u32..(hi + off) as u32,
    )
}

/// Preprocesses images as transformers' PIL-backend CLIP / SigLIP processors do.
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
    /// `lut[c][v]`: the final `f32` of channel `c` for pixel value `v`.
    lut: Box<[[f32; 256]; 3]>,
    plans: PlanCache,
}

impl fmt::Debug for ImageProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageProcessor")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Clone for ImageProcessor {
    fn clone(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            lut: self.lut.clone(),
            plans: PlanCache::default(),
        }
    }
}

/// The reference's rescale + normalise of every `u8` value, per channel:
/// `f32(f64(v) * factor)`, then `(x - f32(mean)) / f32(std)` in `f32`.
fn build_lut(cfg: &ImageProcessorConfig) -> Box<[[f32; 256]; 3]> {
    let mut lut = Box::new([[0f32; 256]; 3]);
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (v as f64 * cfg.rescale_factor) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            *out = x;
        }
    }
    lut
}

impl ImageProcessor {
    /// A processor for a validated `cfg`.
    pub fn new(cfg: ImageProcessorConfig) -> Result<Self> {
        cfg.validate()?;
        let lut = build_lut(&cfg);
        Ok(Self {
            cfg,
            lut,
            plans: PlanCache::default(),
        })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or the JSON file
    /// itself). Falls back to the `image_processor` entry of `processor_config.json`.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let what = "image processor";
        let (path, nested): (PathBuf, bool) = if dir.is_file() {
            (dir.to_path_buf(), false)
        } else if dir.join("preprocessor_config.json").is_file() {
            (dir.join("preprocessor_config.json"), false)
        } else if dir.join("processor_config.json").is_file() {
            (dir.join("processor_config.json"), true)
        } else {
            return Err(MlmfError::model_load(
                what,
                dir,
                "no preprocessor_config.json (or processor_config.json) found: expected a \
                 Hugging Face checkpoint directory",
            ));
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| MlmfError::model_load(what, &path, format!("invalid JSON: {e}")))?;
        let json = if nested {
            json.get("image_processor").cloned().ok_or_else(|| {
                MlmfError::model_load(
                    what,
                    &path,
                    "no `image_processor` entry in processor_config.json",
                )
            })?
        } else {
            json
        };
        Self::new(ImageProcessorConfig::from_hf_json(&json)?)
    }

    /// The settings.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// Decodes (or takes) one input and converts it to RGB, enforcing the pixel limit.
    pub fn load<'a>(&self, input: impl Into<ImageRef<'a>>) -> Result<image::RgbImage> {
        match input.into() {
            ImageRef::Source(src) => {
                let bytes = src.bytes(Modality::Image)?;
                decode::decode_image_with(
                    &bytes,
                    self.cfg.max_image_pixels,
                    self.cfg.do_convert_rgb,
                )
            }
            ImageRef::Pixels(a) => {
                convert::array_to_rgb(a, self.cfg.do_convert_rgb, self.cfg.max_image_pixels)
            }
        }
    }

    fn plan(&self, in_w: u32, in_h: u32) -> Result<ImagePlan> {
        if in_w == 0 || in_h == 0 {
            return Err(MlmfError::input(
                Modality::Image,
                format!("expected a non-empty image, got {in_w}x{in_h}"),
            ));
        }
        let (rh, rw) = if self.cfg.do_resize {
            self.cfg.size.resized(in_h, in_w)?
        } else {
            (in_h, in_w)
        };
        let crop = self.cfg.do_center_crop;
        let (oh, ow) = match (crop, self.cfg.crop_size) {
            (true, Some(hw)) => hw,
            _ => (rh, rw),
        };
        convert::check_pixels(u64::from(ow), u64::from(oh), self.cfg.max_image_pixels)?;
        let (rows, ywin) = crop_axis(rh, oh, crop);
        let (cols, xwin) = crop_axis(rw, ow, crop);
        let f = self.cfg.resample;
        Ok(ImagePlan {
            out_h: oh as usize,
            out_w: ow as usize,
            rows,
            cols,
            h: self.plans.axis(in_w, rw, f, xwin),
            v: self.plans.axis(in_h, rh, f, ywin.clone()),
            in_h,
            resized_h: rh,
            ywin,
        })
    }

    /// Processes one RGB image into `out`, channels first (`3 * H * W` values for the
    /// output size of this image, see [`ImageProcessorConfig::output_size_for`]).
    pub fn process_rgb_into(&self, img: &image::RgbImage, out: &mut [f32]) -> Result<()> {
        self.process_view(RgbView::of(img), as_slots(out), 1)
    }

    /// Processes one image into `out` (three planes), its rows split into `bands`
    /// bands computed in parallel (1: on the calling thread). Each output row depends
    /// only on its own weights, so banding gives identical values.
    ///
    /// On `Ok`, every value of `out` has been written: the callers rely on this to hand
    /// out arrays that were never zeroed.
    fn process_view(
        &self,
        img: RgbView<'_>,
        out: &mut [MaybeUninit<f32>],
        bands: usize,
    ) -> Result<()> {
        let (w, h) = (
            u32::try_from(img.width).unwrap_or(u32::MAX),
            u32::try_from(img.height).unwrap_or(u32::MAX),
        );
        let p = self.plan(w, h)?;
        let plane = p.out_h * p.out_w;
        if out.len() != 3 * plane {
            return Err(MlmfError::input(
                Modality::Image,
                format!(
                    "output buffer holds {} values, expected 3 x {} x {} = {}",
                    out.len(),
                    p.out_h,
                    p.out_w,
                    3 * plane
                ),
            ));
        }
        let (o0, rest) = out.split_at_mut(plane);
        let (o1, o2) = rest.split_at_mut(plane);
        if p.rows.len() != p.out_h || p.cols.len() != p.out_w {
            // Crop padding: transformers pads with 0 before rescaling and normalising.
            let [l0, l1, l2] = &*self.lut;
            o0.fill(MaybeUninit::new(l0[0]));
            o1.fill(MaybeUninit::new(l1[0]));
            o2.fill(MaybeUninit::new(l2[0]));
        }
        // Bands of at least 16 window rows; the last may be shorter.
        let (w, rows) = (p.out_w, p.rows.len());
        let band_rows = rows.div_ceil(bands.clamp(1, (rows / 16).max(1))).max(1);
        let window = p.rows.start * w..p.rows.end * w;
        let [c0, c1, c2] = [o0, o1, o2].map(|o| {
            o.get_mut(window.clone())
                .unwrap_or_default()
                .chunks_mut((band_rows * w).max(1))
        });
        let jobs: Vec<(usize, [&mut [MaybeUninit<f32>]; 3])> = c0
            .zip(c1)
            .zip(c2)
            .map(|((d0, d1), d2)| [d0, d1, d2])
            .enumerate()
            .collect();
        let incomplete = AtomicBool::new(false);
        let run = |(i, parts): (usize, [&mut [MaybeUninit<f32>]; 3])| {
            let band = i * band_rows..(i * band_rows + band_rows).min(rows);
            let v = if band.len() == rows {
                p.v.clone()
            } else {
                let y = p.ywin.start;
                let window = y + band.start as u32..y + band.end as u32;
                self.plans
                    .axis(p.in_h, p.resized_h, self.cfg.resample, window)
            };
            if !self.emit_band(img, &p, &v, parts) {
                incomplete.store(true, Ordering::Relaxed);
            }
        };
        share_with_pool(jobs, || (), |_, job| run(job));
        if incomplete.into_inner() {
            return Err(MlmfError::Internal(format!(
                "the resampler left rows of a {}x{} output unwritten",
                p.out_h, p.out_w
            )));
        }
        Ok(())
    }

    /// Resamples the window rows `v` covers into `parts` (one slice per plane, rows of
    /// `p.out_w` values from the band's first row), mapping pixels through the LUT.
    /// Returns whether every window row of the band was written.
    fn emit_band(
        &self,
        img: RgbView<'_>,
        p: &ImagePlan,
        v: &AxisPlan,
        parts: [&mut [MaybeUninit<f32>]; 3],
    ) -> bool {
        let [l0, l1, l2] = &*self.lut;
        let [o0, o1, o2] = parts;
        let (w, x0, n) = (p.out_w, p.cols.start, p.cols.len());
        let expected = o0.len() / w.max(1);
        let mut written = 0;
        resample_window(img, &p.h, v, &mut |r, rgb| {
            let s = r * w + x0;
            let (Some(d0), Some(d1), Some(d2)) = (
                o0.get_mut(s..s + n),
                o1.get_mut(s..s + n),
                o2.get_mut(s..s + n),
            ) else {
                return;
            };
            if rgb.len() < 3 * n {
                return;
            }
            for (((px, a), b), c) in rgb.chunks_exact(3).zip(d0).zip(d1).zip(d2) {
                a.write(l0[px[0] as usize]);
                b.write(l1[px[1] as usize]);
                c.write(l2[px[2] as usize]);
            }
            written += 1;
        });
        written == expected
    }

    /// Processes one input into `out`: contiguous `HW3` arrays are read in place,
    /// everything else is loaded (decoded / converted) first.
    fn process_input_into(
        &self,
        input: &ImageRef<'_>,
        out: &mut [MaybeUninit<f32>],
        bands: usize,
    ) -> Result<()> {
        if let ImageRef::Pixels(a) = input {
            if let (&[h, w, 3], Some(data)) = (a.shape(), a.to_slice()) {
                if h > 0 && w > 0 {
                    convert::check_pixels(w as u64, h as u64, self.cfg.max_image_pixels)?;
                    return self.process_view(
                        RgbView {
                            data,
                            width: w,
                            height: h,
                        },
                        out,
                        bands,
                    );
                }
            }
        }
        let img = self.load(input.clone())?;
        self.process_view(RgbView::of(&img), out, bands)
    }

    /// Processes a batch into `[B, 3, H, W]`. All outputs must share one size (always
    /// true with a crop or an exact size). Errors name the failing item's index.
    pub fn process(&self, inputs: &[ImageInput]) -> Result<Array4<f32>> {
        let refs: Vec<ImageRef<'_>> = inputs.iter().map(ImageRef::from).collect();
        self.process_refs(&refs)
    }

    /// [`process`](Self::process) for inputs given by reference, e.g. pixels borrowed
    /// from the caller's arrays.
    pub fn process_refs(&self, inputs: &[ImageRef<'_>]) -> Result<Array4<f32>> {
        if let Some((h, w)) = self.cfg.output_size() {
            let shape = (inputs.len(), 3, h as usize, w as usize);
            return self.fresh_output(shape, inputs.par_iter().map(|x| (Some(x), None)));
        }
        // The output size depends on the input: decode everything first.
        let images: Vec<Result<image::RgbImage>> =
            inputs.par_iter().map(|x| self.load(x.clone())).collect();
        let mut first: Option<(u32, u32)> = None;
        let mut failed: Option<usize> = None;
        for (i, img) in images.iter().enumerate() {
            let Ok(img) = img else {
                failed = Some(i);
                break;
            };
            let hw = self
                .cfg
                .output_size_for(img.height(), img.width())
                .at_index(i)?;
            match first {
                None => first = Some(hw),
                Some(f) if f != hw => {
                    return Err(MlmfError::input(
                        Modality::Image,
                        format!(
                            "output would be {}x{} (HxW) but earlier inputs give {}x{}: a batch \
                             needs one output size (set do_center_crop with crop_size, or an \
                             exact size)",
                            hw.0, hw.1, f.0, f.1
                        ),
                    )
                    .at_index(i));
                }
                Some(_) => {}
            }
        }
        if let Some(i) = failed {
            let err = images.into_iter().nth(i).and_then(|r| r.err());
            return Err(err
                .unwrap_or_else(|| MlmfError::Internal("lost a decode error".into()))
                .at_index(i));
        }
        let (h, w) = first.unwrap_or((0, 0));
        let shape = (inputs.len(), 3, h as usize, w as usize);
        self.fresh_output(shape, images.into_par_iter().map(|img| (None, img.ok())))
    }

    /// A new `[B, 3, H, W]` array filled by [`fill`](Self::fill). It is not zeroed
    /// first: `fill` writes every value or fails, and zeroing a batch's output (19 MB
    /// for 32 images at 224x224) is a serial pass over memory that took about a fifth
    /// of a SigLIP batch call.
    fn fresh_output<'a, 'b: 'a, I>(
        &self,
        shape: (usize, usize, usize, usize),
        items: I,
    ) -> Result<Array4<f32>>
    where
        I: IndexedParallelIterator<Item = (Option<&'a ImageRef<'b>>, Option<image::RgbImage>)>,
    {
        let mut out = Array4::<f32>::uninit(shape);
        let slots = out
            .as_slice_mut()
            .ok_or_else(|| MlmfError::Internal("fresh output array is not contiguous".into()))?;
        self.fill(slots, shape.1 * shape.2 * shape.3, items)?;
        // SAFETY: `fill` returned `Ok`, so it wrote every value of `out` (see `fill`).
        Ok(unsafe { out.assume_init() })
    }

    /// [`process`](Self::process) into a caller-owned contiguous `[B, 3, H, W]` array
    /// (`B = inputs.len()`), e.g. one reused across batches: fresh multi-megabyte
    /// outputs cost a page fault per 4 KiB on first write.
    pub fn process_into(&self, inputs: &[ImageInput], out: ArrayViewMut4<'_, f32>) -> Result<()> {
        let refs: Vec<ImageRef<'_>> = inputs.iter().map(ImageRef::from).collect();
        self.process_refs_into(&refs, out)
    }

    /// [`process_into`](Self::process_into) for inputs given by reference.
    pub fn process_refs_into(
        &self,
        inputs: &[ImageRef<'_>],
        mut out: ArrayViewMut4<'_, f32>,
    ) -> Result<()> {
        let (b, c, h, w) = out.dim();
        if b != inputs.len() || c != 3 {
            return Err(MlmfError::input(
                Modality::Image,
                format!(
                    "output array has shape [{b}, {c}, {h}, {w}]: expected [{}, 3, H, W]",
                    inputs.len()
                ),
            ));
        }
        let slice = out.as_slice_mut().ok_or_else(|| {
            MlmfError::input(
                Modality::Image,
                "output array must be contiguous (standard layout)",
            )
        })?;
        self.fill(
            as_slots(slice),
            c * h * w,
            inputs.par_iter().map(|x| (Some(x), None)),
        )
    }

    /// Writes each item (indexed like the batch; a raw input or an already loaded
    /// image) into its slot of `out`. The first failing item's error is returned; on
    /// `Ok`, every value of `slice` has been written.
    fn fill<'a, 'b: 'a, I>(
        &self,
        slice: &mut [MaybeUninit<f32>],
        item: usize,
        items: I,
    ) -> Result<()>
    where
        I: IndexedParallelIterator<Item = (Option<&'a ImageRef<'b>>, Option<image::RgbImage>)>,
    {
        if slice.len() != item * items.len() {
            return Err(MlmfError::Internal(format!(
                "output holds {} values for {} items of {item}",
                slice.len(),
                items.len()
            )));
        }
        if item == 0 {
            // Zero-area outputs cannot come from a validated config; nothing to write.
            return Ok(());
        }
        // Fewer items than threads: split each image's rows into bands, two per spare
        // thread, which the threads take as they become free (see `share`).
        let spare = rayon::current_num_threads() / items.len().max(1);
        let bands = if spare > 1 { 2 * spare } else { 1 };
        let results: Vec<Result<()>> = slice
            .par_chunks_mut(item)
            .zip(items)
            .enumerate()
            .map(|(i, (dst, item))| {
                match item {
                    (_, Some(img)) => self.process_view(RgbView::of(&img), dst, bands),
                    (Some(input), None) => self.process_input_into(input, dst, bands),
                    (None, None) => Err(MlmfError::Internal("batch item without input".into())),
                }
                .at_index(i)
            })
            .collect();
        results.into_iter().collect()
    }
}

impl Processor for ImageProcessor {
    type Input = ImageInput;
    type Output = Array4<f32>;

    fn modality(&self) -> Modality {
        Modality::Image
    }

    fn process(&self, inputs: &[ImageInput]) -> Result<Array4<f32>> {
        ImageProcessor::process(self, inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
        })
    }

    #[test]
    fn clip_sizes_follow_transformers() {
        let s = SizeSpec::ShortestEdge(224);
        assert_eq!(s.resized(480, 640).unwrap(), (224, 298));
        assert_eq!(s.resized(640, 480).unwrap(), (298, 224));
        assert_eq!(s.resized(500, 3).unwrap(), (37333, 224));
        assert_eq!(s.resized(224, 224).unwrap(), (224, 224));
        let sl = SizeSpec::ShortestLongest {
            shortest_edge: 800,
            longest_edge: 1333,
        };
        // get_size_with_aspect_ratio((480, 640), 800, 1333) = (800, 1066)
        assert_eq!(sl.resized(480, 640).unwrap(), (800, 1066));
        // long side capped: raw = 1333 * 300 / 1000 = 399.9 -> 400 (values from transformers)
        assert_eq!(sl.resized(300, 1000).unwrap(), (400, 1333));
        assert_eq!(sl.resized(1000, 300).unwrap(), (1333, 400));
    }

    #[test]
    fn bands_give_identical_values() {
        // Horizontal-first, vertical-first (tall source) and crop-padding cases.
        for (w, h, cfg) in [
            (640, 480, ImageProcessorConfig::clip()),
            (300, 1500, ImageProcessorConfig::clip()),
            (100, 60, ImageProcessorConfig::siglip()),
            (
                150,
                90,
                ImageProcessorConfig {
                    do_resize: false,
                    ..ImageProcessorConfig::clip()
                },
            ),
        ] {
            let p = ImageProcessor::new(cfg).unwrap();
            let img = gradient(w, h);
            let (oh, ow) = p.config().output_size_for(h, w).unwrap();
            let n = 3 * oh as usize * ow as usize;
            let mut one = vec![0f32; n];
            p.process_view(RgbView::of(&img), as_slots(&mut one), 1)
                .unwrap();
            for bands in [2, 3, 7, 1000] {
                let mut many = vec![-1f32; n];
                p.process_view(RgbView::of(&img), as_slots(&mut many), bands)
                    .unwrap();
                assert_eq!(one, many, "{w}x{h}, {bands} bands");
            }
        }
    }

    #[test]
    fn crop_axis_places_padding_like_transformers() {
        // Larger: plain crop at floor((r - o) / 2).
        assert_eq!(crop_axis(298, 224, true), (0..224, 37..261));
        // Smaller by an odd amount: transformers pads ceil((o - r) / 2) before.
        assert_eq!(crop_axis(223, 224, true), (1..224, 0..223));
        assert_eq!(crop_axis(100, 224, true), (62..162, 0..100));
        assert_eq!(crop_axis(50, 50, true), (0..50, 0..50));
        assert_eq!(crop_axis(50, 50, false), (0..50, 0..50));
    }

    #[test]
    fn center_crop_and_pad_values() {
        let cfg = ImageProcessorConfig {
            do_resize: false,
            crop_size: Some((4, 2)),
            do_rescale: false,
            do_normalize: false,
            ..ImageProcessorConfig::clip()
        };
        let p = ImageProcessor::new(cfg).unwrap();
        // 3 wide, 1 tall: width cropped at floor((3-2)/2) = 0, height padded 2 above
        // (ceil(3/2)) and 1 below.
        let img = image::RgbImage::from_fn(3, 1, |x, _| image::Rgb([10 * (x as u8 + 1), 0, 0]));
        let mut out = vec![-1f32; 3 * 4 * 2];
        p.process_rgb_into(&img, &mut out).unwrap();
        let red = &out[..8];
        assert_eq!(red, &[0., 0., 0., 0., 10., 20., 0., 0.]);
    }

    #[test]
    fn lut_matches_reference_float_ops() {
        let p = ImageProcessor::new(ImageProcessorConfig::clip()).unwrap();
        for v in [0u8, 1, 127, 128, 254, 255] {
            let x = (f64::from(v) * (1.0 / 255.0)) as f32;
            assert_eq!(p.lut[1][v as usize], (x - CLIP_MEAN[1]) / CLIP_STD[1]);
        }
    }

    #[test]
    fn hf_json_defaults_and_forms() {
        let clip = serde_json::json!({
            "crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224
        });
        let c = ImageProcessorConfig::from_hf_json(&clip).unwrap();
        assert_eq!(c, ImageProcessorConfig::clip());
        let siglip = serde_json::json!({
            "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor",
            "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"height": 384, "width": 384}
        });
        let s = ImageProcessorConfig::from_hf_json(&siglip).unwrap();
        assert_eq!(
            s.size,
            SizeSpec::Exact {
                height: 384,
                width: 384
            }
        );
        assert!(!s.do_center_crop);
        assert_eq!(s.output_size(), Some((384, 384)));
        // Unknown type with usable keys: accepted, no crop unless asked.
        let vit = serde_json::json!({"image_processor_type": "ViTImageProcessor",
            "size": {"height": 32, "width": 48}, "resample": 2, "image_mean": 0.5, "image_std": 0.5});
        let v = ImageProcessorConfig::from_hf_json(&vit).unwrap();
        assert_eq!(
            (v.resample, v.image_mean, v.output_size()),
            (Resample::Bilinear, [0.5; 3], Some((32, 48)))
        );
        assert!(ImageProcessorConfig::from_hf_json(
            &serde_json::json!({"image_processor_type": "X"})
        )
        .is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "size": {"max_height": 3}}),
                "`size`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "size": 0}),
                "`size`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "resample": 1}),
                "`resample`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 0, "width": 2}}),
                "`crop_size`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "image_std": [1, 0, 1]}),
                "`image_std`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "image_mean": [1, 2]}),
                "`image_mean`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "do_resize": "yes"}),
                "`do_resize`",
            ),
            (
                serde_json::json!({"image_processor_type": "CLIPImageProcessor", "rescale_factor": -1.0}),
                "`rescale_factor`",
            ),
        ];
        for (json, field) in cases {
            let err = ImageProcessorConfig::from_hf_json(&json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn serde_round_trip_uses_hf_names() {
        let c = ImageProcessorConfig::clip();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["size"], serde_json::json!({"shortest_edge": 224}));
        assert_eq!(
            json["crop_size"],
            serde_json::json!({"height": 224, "width": 224})
        );
        assert_eq!(json["resample"], serde_json::json!(3));
        let back: ImageProcessorConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        let partial: ImageProcessorConfig = serde_json::from_str(r#"{"size": [32, 48]}"#).unwrap();
        assert_eq!(
            partial.size,
            SizeSpec::Exact {
                height: 32,
                width: 48
            }
        );
        assert_eq!(partial.crop_size, Some((224, 224)));
    }

    #[test]
    fn batch_errors_name_the_index() {
        let p = ImageProcessor::new(ImageProcessorConfig::clip()).unwrap();
        let good = ImageInput::Array(ArrayD::from_elem(IxDyn(&[5, 7, 3]), 9u8));
        let bad_shape = ImageInput::Array(ArrayD::from_elem(IxDyn(&[5, 7, 2]), 9u8));
        let garbage = ImageInput::Source(Source::Bytes(b"definitely not pixels".to_vec()));
        let err = p
            .process(&[good.clone(), bad_shape])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("image input 1:") && err.contains("(H, W, C)"),
            "{err}"
        );
        let err = p
            .process(&[good.clone(), good.clone(), garbage])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("image input 2: cannot decode"), "{err}");
        let missing = ImageInput::Source(Source::Path("/nonexistent/x.png".into()));
        let err = p.process(&[missing]).unwrap_err().to_string();
        assert!(err.starts_with("image input 0: cannot read"), "{err}");
        let out = p.process(&[good.clone(), good]).unwrap();
        assert_eq!(out.dim(), (2, 3, 224, 224));
        assert_eq!(p.process(&[]).unwrap().dim(), (0, 3, 224, 224));
    }

    #[test]
    fn varying_output_sizes_need_one_size() {
        let cfg = ImageProcessorConfig {
            do_center_crop: false,
            ..ImageProcessorConfig::clip()
        };
        let p = ImageProcessor::new(cfg).unwrap();
        let a = ImageInput::Array(ArrayD::from_elem(IxDyn(&[480, 640, 3]), 1u8));
        let b = ImageInput::Array(ArrayD::from_elem(IxDyn(&[640, 480, 3]), 1u8));
        assert_eq!(
            p.process(&[a.clone(), a.clone()]).unwrap().dim(),
            (2, 3, 224, 298)
        );
        let err = p.process(&[a, b]).unwrap_err().to_string();
        assert!(
            err.starts_with("image input 1:") && err.contains("one output size"),
            "{err}"
        );
    }

    #[test]
    fn process_into_reuses_a_buffer() {
        let p = ImageProcessor::new(ImageProcessorConfig::siglip()).unwrap();
        let img = ImageInput::Array(ArrayD::from_elem(IxDyn(&[30, 40, 3]), 200u8));
        let mut buf = Array4::<f32>::from_elem((2, 3, 224, 224), f32::NAN);
        p.process_into(&[img.clone(), img.clone()], buf.view_mut())
            .unwrap();
        assert_eq!(buf, p.process(&[img.clone(), img.clone()]).unwrap());
        let err = p
            .process_into(&[img], buf.view_mut())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected [1, 3, H, W]"), "{err}");
    }

    /// Batch outputs are not zeroed before they are filled, so every path must write
    /// every value: crop padding, no crop, identity and nearest axes, banded rows.
    #[test]
    fn every_value_is_written() {
        let configs = [
            ImageProcessorConfig::clip(),
            ImageProcessorConfig::siglip(),
            ImageProcessorConfig {
                do_center_crop: false,
                resample: Resample::Nearest,
                ..ImageProcessorConfig::clip()
            },
            ImageProcessorConfig {
                do_resize: false,
                ..ImageProcessorConfig::clip()
            },
        ];
        for cfg in configs {
            let p = ImageProcessor::new(cfg).unwrap();
            for (h, w) in [(1, 1), (3, 500), (100, 150), (224, 224), (479, 641)] {
                let img = gradient(w, h);
                let (oh, ow) = p.config().output_size_for(h, w).unwrap();
                let n = 3 * oh as usize * ow as usize;
                for bands in [1, 3] {
                    let mut out = vec![f32::NAN; n];
                    p.process_view(RgbView::of(&img), as_slots(&mut out), bands)
                        .unwrap();
                    let left = out.iter().filter(|v| v.is_nan()).count();
                    assert_eq!(left, 0, "{:?} {w}x{h}, {bands} bands", p.config().size);
                }
            }
        }
    }

    #[test]
    fn process_rgb_into_checks_the_buffer() {
        let p = ImageProcessor::new(ImageProcessorConfig::siglip()).unwrap();
        let mut small = vec![0f32; 10];
        let err = p
            .process_rgb_into(&gradient(5, 5), &mut small)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 3 x 224 x 224"), "{err}");
    }

    #[test]
    fn from_pretrained_reads_the_directory() {
        let dir = std::env::temp_dir().join(format!("mlmf-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("preprocessor_config.json"),
            r#"{"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}}"#,
        )
        .unwrap();
        let p = ImageProcessor::from_pretrained(&dir).unwrap();
        assert_eq!(p.config().output_size(), Some((64, 64)));
        let err = ImageProcessor::from_pretrained(dir.join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("preprocessor_config.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
