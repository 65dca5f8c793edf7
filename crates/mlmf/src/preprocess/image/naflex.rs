//! Variable-resolution patches (NaFlex), as transformers' `Siglip2ImageProcessor`
//! (PIL backend) makes them for SigLIP 2.
//!
//! Each image keeps (about) its aspect ratio: it is resized to the largest size whose
//! sides are multiples of `patch_size` and whose patch count is at most
//! `max_num_patches` (the reference's binary search over a scale factor, reproduced
//! step by step in float64), with the checkpoint's resampling filter and Pillow's
//! arithmetic, then rescaled and normalised like any image. Its patches are flattened
//! in (row, column, channel) order inside a patch, listed row by row, and the list is
//! padded with zero rows to `max_num_patches`. The batch is `[B, max_num_patches,
//! P * P * 3]`, with each image's patch grid `(rows, columns)`; the first
//! `rows * columns` patches of a row are real.

use std::path::Path;

use ndarray::Array3;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AtIndex, MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::image::{ImageProcessor, ImageProcessorConfig, ImageRef, SizeSpec};

/// Settings of a [`PatchProcessor`]: the per-image steps of an image processor (its
/// `size` and crop unused) plus the patch geometry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchProcessorConfig {
    pub patch_size: u32,
    pub max_num_patches: usize,
    /// Resampling, rescale, normalisation and RGB conversion.
    pub image: ImageProcessorConfig,
}

/// Patches of a batch.
#[derive(Debug, Clone)]
pub struct PatchBatch {
    /// `[B, max_num_patches, patch_size² * 3]` float32, padded with zeros.
    pub patches: Array3<f32>,
    /// Each image's patch grid `(rows, columns)`.
    pub shapes: Vec<(usize, usize)>,
}

/// One image's patch rows and its grid `(rows, columns)`.
type Patched = (Vec<f32>, (usize, usize));

/// The NaFlex processor.
#[derive(Debug, Clone)]
pub struct PatchProcessor {
    cfg: PatchProcessorConfig,
    /// Loads (decodes, converts) images with the configured limits.
    loader: ImageProcessor,
}

/// `(height, width)` of the NaFlex resize of a `height x width` image, as
/// `get_image_size_for_max_num_patches` computes it (eps 1e-5).
pub fn naflex_size(height: u32, width: u32, patch: u32, max_patches: usize) -> (u32, u32) {
    let p = f64::from(patch);
    let scaled = |scale: f64, size: u32| -> u32 {
        let s = ((f64::from(size) * scale / p).ceil() * p).max(p);
        s as u32
    };
    let fits = |scale: f64| {
        let (h, w) = (scaled(scale, height), scaled(scale, width));
        (f64::from(h) / p) * (f64::from(w) / p) <= max_patches as f64
    };
    let eps = 1e-5;
    let (mut lo, mut hi) = (eps / 10.0, 100.0);
    while hi - lo >= eps {
        let mid = (lo + hi) / 2.0;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (scaled(lo, height), scaled(lo, width))
}

impl PatchProcessorConfig {
    /// SigLIP 2's defaults: 16-pixel patches, at most 256, bilinear, rescale 1/255,
    /// mean = std = 0.5.
    pub fn siglip2() -> Self {
        Self {
            patch_size: 16,
            max_num_patches: 256,
            image: ImageProcessorConfig {
                resample: crate::preprocess::image::resize::Resample::Bilinear,
                image_mean: [0.5; 3],
                image_std: [0.5; 3],
                do_center_crop: false,
                crop_size: None,
                ..ImageProcessorConfig::clip()
            },
        }
    }

    /// Whether a `preprocessor_config.json` object describes a NaFlex processor.
    pub fn is_naflex(v: &Value) -> bool {
        v.get("image_processor_type")
            .and_then(Value::as_str)
            .is_some_and(|n| n.to_ascii_lowercase().starts_with("siglip2"))
            || v.get("max_num_patches").is_some()
    }

    /// Reads a `preprocessor_config.json` object (or these settings as serialised).
    /// Missing keys take SigLIP 2's defaults; errors name the key.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        if let Ok(cfg) = serde_json::from_value::<Self>(v.clone()) {
            cfg.validate()?;
            return Ok(cfg);
        }
        let obj = v.as_object().ok_or_else(|| {
            MlmfError::config("", format!("expected a JSON object of settings, got {v}"))
        })?;
        let defaults = Self::siglip2();
        let mut image = serde_json::to_value(&defaults.image)
            .map_err(|e| MlmfError::Internal(e.to_string()))?;
        // The per-image keys the file gives replace the defaults; the size is chosen
        // per image, so any `size` or crop in the file does not apply.
        for (k, val) in obj {
            if !val.is_null() && image.get(k).is_some() && !["size", "crop_size"].contains(&&**k) {
                image[k] = val.clone();
            }
        }
        image["do_center_crop"] = Value::Bool(false);
        let image = ImageProcessorConfig::from_hf_json(&image)?;
        let int = |k: &str, default: u64| -> Result<u64> {
            match obj.get(k).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(x) => x.as_u64().ok_or_else(|| {
                    MlmfError::config(k, format!("expected a positive integer, got {x}"))
                }),
            }
        };
        let cfg = Self {
            patch_size: u32::try_from(int("patch_size", 16)?).unwrap_or(u32::MAX),
            max_num_patches: int("max_num_patches", 256)? as usize,
            image,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the fields; errors name the first bad one.
    pub fn validate(&self) -> Result<()> {
        if !(1..=1024).contains(&self.patch_size) {
            return Err(MlmfError::config(
                "patch_size",
                format!("must be in 1..=1024 pixels, got {}", self.patch_size),
            ));
        }
        if !(1..=1 << 20).contains(&self.max_num_patches) {
            return Err(MlmfError::config(
                "max_num_patches",
                format!("must be in 1..=1048576, got {}", self.max_num_patches),
            ));
        }
        self.image.validate()
    }
}

impl PatchProcessor {
    pub fn new(cfg: PatchProcessorConfig) -> Result<Self> {
        cfg.validate()?;
        let loader = ImageProcessor::new(cfg.image.clone())?;
        Ok(Self { cfg, loader })
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory (or the file).
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = if dir.is_file() {
            dir.to_path_buf()
        } else {
            dir.join("preprocessor_config.json")
        };
        let what = "patch image processor";
        let text = std::fs::read_to_string(&path)
            .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| MlmfError::model_load(what, &path, format!("invalid JSON: {e}")))?;
        let cfg = PatchProcessorConfig::from_hf_json(&json)
            .map_err(|e| MlmfError::model_load(what, &path, e.to_string()))?;
        Self::new(cfg)
    }

    pub fn config(&self) -> &PatchProcessorConfig {
        &self.cfg
    }

    /// Patch rows of one image and its grid.
    fn one(&self, input: &ImageRef<'_>) -> Result<Patched> {
        let img = self.loader.load(input.clone())?;
        let (h, w) = naflex_size(
            img.height(),
            img.width(),
            self.cfg.patch_size,
            self.cfg.max_num_patches,
        );
        let resize = ImageProcessor::new(ImageProcessorConfig {
            do_resize: true,
            size: SizeSpec::Exact {
                height: h,
                width: w,
            },
            do_center_crop: false,
            crop_size: None,
            ..self.cfg.image.clone()
        })?;
        let (hu, wu, p) = (h as usize, w as usize, self.cfg.patch_size as usize);
        let mut planes = vec![0f32; 3 * hu * wu];
        resize.process_rgb_into(&img, &mut planes)?;
        let (gh, gw) = (hu / p, wu / p);
        let mut rows = Vec::with_capacity(gh * gw * p * p * 3);
        for ph in 0..gh {
            for pw in 0..gw {
                for y in 0..p {
                    for x in 0..p {
                        let at = (ph * p + y) * wu + pw * p + x;
                        for c in 0..3 {
                            rows.push(planes[c * hu * wu + at]);
                        }
                    }
                }
            }
        }
        Ok((rows, (gh, gw)))
    }

    /// Patches of a batch, images in parallel; an error names the failing image.
    pub fn process_refs(&self, inputs: &[ImageRef<'_>]) -> Result<PatchBatch> {
        let dim = (self.cfg.patch_size as usize).pow(2) * 3;
        let n = self.cfg.max_num_patches;
        let done: Vec<Result<Patched>> = inputs
            .par_iter()
            .enumerate()
            .map(|(i, x)| self.one(x).at_index(i))
            .collect();
        let mut patches = Array3::<f32>::zeros((inputs.len(), n, dim));
        let mut shapes = Vec::with_capacity(inputs.len());
        for (i, r) in done.into_iter().enumerate() {
            let (rows, shape) = r?;
            if rows.len() > n * dim {
                return Err(MlmfError::Internal(format!(
                    "image {i}: {} patches exceed max_num_patches {n}",
                    rows.len() / dim
                )));
            }
            if let Some(dst) = patches.slice_mut(ndarray::s![i, .., ..]).as_slice_mut() {
                dst[..rows.len()].copy_from_slice(&rows);
            }
            shapes.push(shape);
        }
        Ok(PatchBatch { patches, shapes })
    }
}

/// The error for a preprocessed patch batch that does not fit a model.
pub(crate) fn check_batch(
    patches: &Array3<f32>,
    shapes: &[(usize, usize)],
    dim: usize,
) -> Result<()> {
    let (b, n, d) = patches.dim();
    if b == 0 || d != dim || shapes.len() != b {
        return Err(MlmfError::input(
            Modality::Image,
            format!(
                "expected patches [B >= 1, N, {dim}] and one (rows, columns) grid per row, \
                 got {:?} and {} grids",
                patches.shape(),
                shapes.len()
            ),
        ));
    }
    for (i, &(h, w)) in shapes.iter().enumerate() {
        if h == 0 || w == 0 || h * w > n {
            return Err(MlmfError::input(
                Modality::Image,
                format!("expected a patch grid of 1 to {n} patches, got {h} x {w}"),
            )
            .at_index(i));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naflex_sizes_fit_the_patch_budget() {
        // A square image fills a square grid; wide images keep their shape.
        assert_eq!(naflex_size(224, 224, 16, 256), (256, 256));
        let (h, w) = naflex_size(23, 190, 5, 20);
        assert!(
            h % 5 == 0 && w % 5 == 0 && (h / 5) * (w / 5) <= 20,
            "{h} {w}"
        );
        assert!(w > 4 * h);
        // Tiny images still get one patch.
        assert_eq!(naflex_size(1, 1, 16, 256).0 % 16, 0);
    }

    #[test]
    fn configs_read_siglip2_files() {
        let v = serde_json::json!({
            "image_processor_type": "Siglip2ImageProcessor", "patch_size": 5,
            "max_num_patches": 20, "resample": 2, "do_resize": true,
        });
        assert!(PatchProcessorConfig::is_naflex(&v));
        let cfg = PatchProcessorConfig::from_hf_json(&v).unwrap();
        assert_eq!((cfg.patch_size, cfg.max_num_patches), (5, 20));
        assert_eq!(cfg.image.image_mean, [0.5; 3]);
        // Serialised settings read back the same.
        let back = PatchProcessorConfig::from_hf_json(&serde_json::to_value(&cfg).unwrap());
        assert_eq!(back.unwrap(), cfg);
        let e = PatchProcessorConfig::from_hf_json(&serde_json::json!({"max_num_patches": 0}))
            .unwrap_err();
        assert!(e.to_string().contains("max_num_patches"), "{e}");
    }
}
