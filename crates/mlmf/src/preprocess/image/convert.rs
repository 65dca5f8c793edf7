//! Conversion of decoded images and `u8` arrays to 8-bit RGB, as transformers'
//! `convert_to_rgb` does before any resizing.
//!
//! * Decoded files follow the PIL path: an image with an alpha channel (RGBA, LA, or a
//!   palette / colour key made transparent by `tRNS`, which the decoder expands to
//!   alpha) is composited onto opaque white with Pillow's integer `alpha_composite`
//!   (`AlphaComposite.c`: 7 extra bits of precision, division by 255 as
//!   `((v >> 8) + v) >> 8`), then the alpha is dropped. Greyscale is repeated.
//!   16-bit samples keep their high byte (Pillow's `;16B` unpackers), except 16-bit
//!   greyscale, which Pillow opens as `I;16` and clips to 255 when converting to RGB.
//! * `u8` arrays follow the NumPy path: `HW` and `HW1` are repeated, `HW3` is taken as
//!   is, `HW4` is blended in `f64` (`a/255 * c + (1 - a/255) * 255`, rounded half to
//!   even), exactly as the reference does for arrays.
//!
//! With compositing turned off (`do_convert_rgb: false`) the alpha channel is dropped
//! instead; greyscale is still repeated since the output always has 3 channels.

use image::{DynamicImage, RgbImage};
use ndarray::ArrayViewD;

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// `SHIFTFORDIV255` of Pillow: `v / 255` rounded, for the ranges alpha compositing uses.
#[inline(always)]
fn shift_div255(v: u32) -> u32 {
    ((v >> 8) + v) >> 8
}

/// One channel of `src` (alpha `a`) composited over opaque white, as Pillow's
/// `ImagingAlphaComposite` computes it with a white RGBA destination.
#[inline(always)]
pub(crate) fn composite_on_white(c: u8, a: u8) -> u8 {
    const PRECISION: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    let dst_a = 255u32;
    let blend = dst_a * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION) / outa255;
    let coef2 = 255 * (1 << PRECISION) - coef1;
    let tmp = c * coef1 + 255 * coef2;
    (shift_div255(tmp + (0x80 << PRECISION)) >> PRECISION) as u8
}

/// Table of [`composite_on_white`] for every (alpha, value) pair: 64 KiB, built once.
fn composite_table() -> &'static [[u8; 256]; 256] {
    static TABLE: std::sync::OnceLock<Box<[[u8; 256]; 256]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([[0u8; 256]; 256]);
        for (a, row) in t.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = composite_on_white(c as u8, a as u8);
            }
        }
        t
    })
}

/// Builds an RGB image from `w x h` pixels of `n` samples each, mapping every pixel
/// with `f`.
fn map_pixels<T: Copy, const N: usize>(
    w: u32,
    h: u32,
    src: &[T],
    f: impl Fn(&[T; N]) -> [u8; 3],
) -> RgbImage {
    let mut out = RgbImage::new(w, h);
    for (o, px) in out.chunks_exact_mut(3).zip(src.chunks_exact(N)) {
        if let Ok(px) = <&[T; N]>::try_from(px) {
            o.copy_from_slice(&f(px));
        }
    }
    out
}

/// A decoded image as RGB, following Pillow's conversions (see the module docs).
pub(crate) fn dynamic_to_rgb(img: DynamicImage, composite: bool) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let t = composite_table();
    let blend = |c: u8, a: u8| {
        if composite {
            t[a as usize][c as usize]
        } else {
            c
        }
    };
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => map_pixels::<u8, 4>(w, h, i.as_raw(), |p| {
            [blend(p[0], p[3]), blend(p[1], p[3]), blend(p[2], p[3])]
        }),
        DynamicImage::ImageLuma8(i) => map_pixels::<u8, 1>(w, h, i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(i) => {
            map_pixels::<u8, 2>(w, h, i.as_raw(), |p| [blend(p[0], p[1]); 3])
        }
        DynamicImage::ImageLuma16(i) => {
            map_pixels::<u16, 1>(w, h, i.as_raw(), |p| [p[0].min(255) as u8; 3])
        }
        DynamicImage::ImageLumaA16(i) => map_pixels::<u16, 2>(w, h, i.as_raw(), |p| {
            [blend((p[0] >> 8) as u8, (p[1] >> 8) as u8); 3]
        }),
        DynamicImage::ImageRgb16(i) => map_pixels::<u16, 3>(w, h, i.as_raw(), |p| {
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageRgba16(i) => map_pixels::<u16, 4>(w, h, i.as_raw(), |p| {
            let a = (p[3] >> 8) as u8;
            [
                blend((p[0] >> 8) as u8, a),
                blend((p[1] >> 8) as u8, a),
                blend((p[2] >> 8) as u8, a),
            ]
        }),
        // Float images (TIFF) have no Pillow RGB equivalent: scale [0, 1] to [0, 255].
        DynamicImage::ImageRgb32F(i) => map_pixels::<f32, 3>(w, h, i.as_raw(), |p| {
            [unit_to_u8(p[0]), unit_to_u8(p[1]), unit_to_u8(p[2])]
        }),
        DynamicImage::ImageRgba32F(i) => map_pixels::<f32, 4>(w, h, i.as_raw(), |p| {
            let a = unit_to_u8(p[3]);
            [
                blend(unit_to_u8(p[0]), a),
                blend(unit_to_u8(p[1]), a),
                blend(unit_to_u8(p[2]), a),
            ]
        }),
        other => other.to_rgb8(),
    }
}

fn unit_to_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// NumPy-path blend of one channel onto white (transformers' `convert_to_rgb` for
/// integer arrays): `round(a/255 * c + (1 - a/255) * 255)`, ties to even.
#[inline(always)]
fn numpy_blend(c: u8, a: u8) -> u8 {
    let alpha = f64::from(a) / 255.0;
    let v = alpha * f64::from(c) + (1.0 - alpha) * 255.0;
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// A `u8` array as RGB: `HW` or `HWC` with `C` in 1, 3, 4 (channels last).
pub(crate) fn array_to_rgb(
    arr: ArrayViewD<'_, u8>,
    composite: bool,
    max_pixels: u64,
) -> Result<RgbImage> {
    let shape = arr.shape().to_vec();
    let (h, w, c) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] if matches!(c, 1 | 3 | 4) => (*h, *w, *c),
        _ => {
            return Err(MlmfError::input(
                Modality::Image,
                format!(
                    "expected a uint8 array of shape (H, W) or (H, W, C) with C in 1, 3, 4 \
                     (channels last), got shape {shape:?}"
                ),
            ))
        }
    };
    if h == 0 || w == 0 {
        return Err(MlmfError::input(
            Modality::Image,
            format!("expected a non-empty image, got shape {shape:?}"),
        ));
    }
    check_pixels(w as u64, h as u64, max_pixels)?;
    let (wu, hu) = (
        u32::try_from(w).map_err(|_| too_large(&shape))?,
        u32::try_from(h).map_err(|_| too_large(&shape))?,
    );
    let std = arr.as_standard_layout();
    let Some(src) = std.as_slice() else {
        return Err(MlmfError::Internal(
            "standard-layout array without a slice".into(),
        ));
    };
    let t = numpy_blend_table();
    Ok(match c {
        1 => map_pixels::<u8, 1>(wu, hu, src, |p| [p[0]; 3]),
        3 => map_pixels::<u8, 3>(wu, hu, src, |p| [p[0], p[1], p[2]]),
        _ => map_pixels::<u8, 4>(wu, hu, src, |p| {
            if composite {
                let row = &t[p[3] as usize];
                [row[p[0] as usize], row[p[1] as usize], row[p[2] as usize]]
            } else {
                [p[0], p[1], p[2]]
            }
        }),
    })
}

/// Table of [`numpy_blend`] for every (alpha, value) pair.
fn numpy_blend_table() -> &'static [[u8; 256]; 256] {
    static TABLE: std::sync::OnceLock<Box<[[u8; 256]; 256]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([[0u8; 256]; 256]);
        for (a, row) in t.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = numpy_blend(c as u8, a as u8);
            }
        }
        t
    })
}

fn too_large(shape: &[usize]) -> MlmfError {
    MlmfError::input(
        Modality::Image,
        format!("image of shape {shape:?} is too large: height and width must fit in 32 bits"),
    )
}

/// Refuses `w x h` images above `max_pixels` (the decompression-bomb guard).
pub(crate) fn check_pixels(w: u64, h: u64, max_pixels: u64) -> Result<()> {
    let n = w.saturating_mul(h);
    if n > max_pixels {
        return Err(MlmfError::input(
            Modality::Image,
            format!(
                "image is {w}x{h} = {n} pixels, more than max_image_pixels = {max_pixels} \
                 (decompression-bomb guard; raise max_image_pixels to accept it)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn};

    #[test]
    fn composite_extremes() {
        for c in 0..=255u8 {
            assert_eq!(composite_on_white(c, 255), c, "opaque keeps the colour");
            assert_eq!(composite_on_white(c, 0), 255, "transparent is white");
        }
        // Half-transparent black: about half of white.
        assert!((composite_on_white(0, 128) as i32 - 127).abs() <= 1);
    }

    #[test]
    fn numpy_blend_rounds_half_to_even() {
        // a = 0 -> 255 exactly; a = 255 -> c exactly.
        assert_eq!(numpy_blend(17, 0), 255);
        assert_eq!(numpy_blend(17, 255), 17);
        // 51/255 * 0 + (1 - 51/255) * 255 = 204 (exact up to float error), stays 204.
        assert_eq!(numpy_blend(0, 51), 204);
    }

    #[test]
    fn arrays_of_each_layout() {
        let grey = Array::from_shape_vec(IxDyn(&[1, 2]), vec![3u8, 200]).unwrap();
        let rgb = array_to_rgb(grey.view(), true, u64::MAX).unwrap();
        assert_eq!(rgb.as_raw(), &vec![3, 3, 3, 200, 200, 200]);
        let rgba = Array::from_shape_vec(IxDyn(&[1, 1, 4]), vec![10u8, 20, 30, 0]).unwrap();
        assert_eq!(
            array_to_rgb(rgba.view(), true, u64::MAX).unwrap().as_raw(),
            &vec![255; 3]
        );
        assert_eq!(
            array_to_rgb(rgba.view(), false, u64::MAX).unwrap().as_raw(),
            &vec![10, 20, 30]
        );
        // Non-contiguous views are accepted.
        let big = Array::from_shape_fn(IxDyn(&[4, 4, 3]), |d| (d[0] * 16 + d[1] * 3 + d[2]) as u8);
        let view = big.slice_each_axis(|ax| {
            if ax.axis.index() < 2 {
                ndarray::Slice::new(0, None, 2)
            } else {
                ndarray::Slice::new(0, None, 1)
            }
        });
        let img = array_to_rgb(view, true, u64::MAX).unwrap();
        assert_eq!(
            img.get_pixel(1, 1).0,
            [big[[2, 2, 0]], big[[2, 2, 1]], big[[2, 2, 2]]]
        );
    }

    #[test]
    fn bad_arrays_name_the_expected_shape() {
        for shape in [vec![3, 4, 5], vec![2, 2, 2, 3], vec![5]] {
            let a = Array::<u8, _>::zeros(IxDyn(&shape));
            let err = array_to_rgb(a.view(), true, u64::MAX)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("image input") && err.contains("(H, W, C)"),
                "{err}"
            );
        }
        let a = Array::<u8, _>::zeros(IxDyn(&[0, 4, 3]));
        let err = array_to_rgb(a.view(), true, u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-empty"), "{err}");
        let a = Array::<u8, _>::zeros(IxDyn(&[10, 10, 3]));
        let err = array_to_rgb(a.view(), true, 99).unwrap_err().to_string();
        assert!(err.contains("max_image_pixels = 99"), "{err}");
    }
}
