//! Encoded bytes -> RGB, with limits.
//!
//! Formats: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, recognised by content (not
//! by file name). Before any pixel is decoded the header's dimensions are checked:
//! zero-size images and images above `max_pixels` are refused, so a small file that
//! declares a huge image (a decompression bomb) costs nothing. Corrupt, truncated and
//! unsupported files are [`MlmfError::Decode`]; limit violations are
//! [`MlmfError::Input`]. EXIF orientation is not applied: transformers only applies it
//! when it opens a path itself (`load_image`), not to the images handed to its
//! processors, which is what the reference outputs are computed from.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use super::convert::{check_pixels, dynamic_to_rgb};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

const EXPECTED: &str = "expected JPEG, PNG, WebP, GIF, BMP or TIFF";

/// Decodes `bytes` and converts to RGB (alpha composited onto white, see
/// [`convert`](super::convert)). Refuses images whose header declares more than
/// `max_pixels` pixels.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    decode_image_with(bytes, max_pixels, true)
}

/// [`decode_image`] with compositing on (`true`) or alpha dropped (`false`).
pub(crate) fn decode_image_with(
    bytes: &[u8],
    max_pixels: u64,
    composite: bool,
) -> Result<RgbImage> {
    let img = decode_dynamic(bytes, max_pixels)?;
    Ok(dynamic_to_rgb(img, composite))
}

fn decode_err(message: impl Into<String>) -> MlmfError {
    MlmfError::decode(Modality::Image, message)
}

/// The format name used in messages.
fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        other => other.extensions_str().first().copied().unwrap_or("unknown"),
    }
}

fn map_image_error(format: &str, e: ImageError) -> MlmfError {
    match e {
        ImageError::Limits(l) => MlmfError::input(
            Modality::Image,
            format!("{format} image exceeds the decoder's limits: {l}"),
        ),
        ImageError::Unsupported(u) => decode_err(format!("unsupported {format} image: {u}")),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            decode_err(format!("truncated {format} file: {io}"))
        }
        other => decode_err(format!("corrupt {format} file: {other}")),
    }
}

/// Decodes to the decoder's own pixel type (no conversion yet).
pub(crate) fn decode_dynamic(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(decode_err(format!("empty input: {EXPECTED}")));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(format!("cannot read the header: {e}")))?;
    let Some(format) = reader.format() else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(decode_err(format!(
            "unrecognised image format (first bytes {}): {EXPECTED}",
            head.join(" ")
        )));
    };
    let name = format_name(format);
    // The PNG decoder rejects a zero-sized header with a bare "invalid dimensions";
    // read IHDR ourselves so the message says what the file declares.
    if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if w == 0 || h == 0 {
            return Err(decode_err(format!(
                "the PNG header declares a {w}x{h} image: expected both sides at least 1"
            )));
        }
    }
    if !matches!(
        format,
        ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::Tiff
    ) {
        return Err(decode_err(format!("unsupported format {name}: {EXPECTED}")));
    }
    if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // The JPEG decoder fills a truncated scan with grey and reports success;
        // Pillow refuses such files ("image file is truncated"), and so do we.
        return Err(decode_err(
            "truncated JPEG file: no end-of-image marker after the scan data",
        ));
    }

    #[cfg(feature = "jpeg-turbo")]
    if format == ImageFormat::Jpeg {
        if let Some(rgb) = super::jpeg::decode_rgb(bytes, max_pixels)? {
            return Ok(DynamicImage::ImageRgb8(rgb));
        }
    }

    // Guarded: a decoder bug must not take the process down with it.
    let decoded = std::panic::catch_unwind(move || -> Result<DynamicImage> {
        let mut reader = reader;
        let mut limits = Limits::default();
        // Room for the largest pixel type (RGBA f32) of an image at the pixel limit,
        // plus decoder working memory; the pixel check below is the real guard.
        limits.max_alloc = Some(
            max_pixels
                .saturating_mul(16)
                .saturating_add(64 << 20)
                .max(512 << 20),
        );
        reader.limits(limits);
        let decoder = reader
            .into_decoder()
            .map_err(|e| map_image_error(name, e))?;
        let (w, h) = decoder.dimensions();
        if w == 0 || h == 0 {
            return Err(MlmfError::input(
                Modality::Image,
                format!("{name} header declares an empty {w}x{h} image: expected at least 1x1"),
            ));
        }
        check_pixels(u64::from(w), u64::from(h), max_pixels)?;
        let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(name, e))?;
        if format == ImageFormat::Gif {
            fill_outside_first_gif_frame(bytes, &mut img);
        }
        Ok(img)
    });
    match decoded {
        Ok(r) => r,
        Err(_) => Err(decode_err(format!(
            "corrupt {name} file: the decoder failed"
        ))),
    }
}

/// Pillow starts the first GIF frame on a canvas of palette index 0 (or of the
/// transparent index, when the frame has one); the decoder leaves the part the frame
/// does not cover transparent, which would turn white. Paint it like Pillow does.
fn fill_outside_first_gif_frame(bytes: &[u8], img: &mut DynamicImage) {
    let (Some(f), DynamicImage::ImageRgba8(canvas)) = (first_gif_frame(bytes), img) else {
        return;
    };
    if f.transparent {
        return;
    }
    let [r, g, b] = f.index0;
    let (x1, y1) = (f.left + f.width, f.top + f.height);
    for (x, y, px) in canvas.enumerate_pixels_mut() {
        if x < f.left || y < f.top || x >= x1 || y >= y1 {
            *px = image::Rgba([r, g, b, 255]);
        }
    }
}

/// What [`fill_outside_first_gif_frame`] needs from a GIF header.
#[derive(Debug, PartialEq)]
struct GifFrame {
    left: u32,
    top: u32,
    width: u32,
    height: u32,
    /// The first frame's graphic control extension declares a transparent index.
    transparent: bool,
    /// Colour of palette index 0 of the frame's palette (local, else global; black
    /// without either).
    index0: [u8; 3],
}

/// Walks a GIF's blocks up to the first image descriptor.
fn first_gif_frame(b: &[u8]) -> Option<GifFrame> {
    let u16_at = |i: usize| -> Option<u32> {
        Some(u32::from(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?])))
    };
    let flags = *b.get(10)?;
    let mut i = 13;
    let mut palette0 = None;
    if flags & 0x80 != 0 {
        palette0 = b.get(i..i + 3).map(|c| [c[0], c[1], c[2]]);
        i += 3 << ((flags & 7) + 1);
    }
    let mut transparent = false;
    loop {
        match *b.get(i)? {
            0x21 => {
                let label = *b.get(i + 1)?;
                i += 2;
                if label == 0xF9 {
                    transparent = b.get(i + 1)? & 1 != 0;
                }
                // Skip the data sub-blocks.
                loop {
                    let n = usize::from(*b.get(i)?);
                    i += 1 + n;
                    if n == 0 {
                        break;
                    }
                }
            }
            0x2C => {
                let packed = *b.get(i + 9)?;
                if packed & 0x80 != 0 {
                    palette0 = b.get(i + 10..i + 13).map(|c| [c[0], c[1], c[2]]);
                }
                return Some(GifFrame {
                    left: u16_at(i + 1)?,
                    top: u16_at(i + 3)?,
                    width: u16_at(i + 5)?,
                    height: u16_at(i + 7)?,
                    transparent,
                    index0: palette0.unwrap_or([0, 0, 0]),
                });
            }
            _ => return None,
        }
    }
}

/// Whether a JPEG stream has an end-of-image marker after its first scan. Marker
/// segments are walked up to the first start-of-scan; entropy-coded data escapes 0xFF
/// bytes, so `FF D9` after it can only be the end marker.
fn jpeg_has_end(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let marker = b[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            0xD8 | 0x01 | 0xD0..=0xD7 => i += 2,
            0xD9 => return true,
            _ => {
                let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
                if marker == 0xDA {
                    let scan = (i + 2 + len).min(b.len());
                    return b[scan..].windows(2).any(|w| w == [0xFF, 0xD9]);
                }
                i += 2 + len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, Rgba};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn sample() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(23, 17, |x, y| {
            Rgb([(x * 11) as u8, (y * 13) as u8, ((x + y) * 5) as u8])
        }))
    }

    #[test]
    fn lossless_formats_round_trip() {
        let img = sample();
        for f in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::Tiff] {
            let back = decode_image(&encode(&img, f), 1 << 20).unwrap();
            assert_eq!(back, *img.as_rgb8().unwrap(), "{f:?}");
        }
        let jpeg = decode_image(&encode(&img, ImageFormat::Jpeg), 1 << 20).unwrap();
        assert_eq!(jpeg.dimensions(), (23, 17));
    }

    #[test]
    fn transparent_png_becomes_white() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(3, 2, Rgba([9, 9, 9, 0])));
        let rgb = decode_image(&encode(&img, ImageFormat::Png), 100).unwrap();
        assert!(rgb.pixels().all(|p| p.0 == [255, 255, 255]));
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        // A valid PNG header declaring 100000 x 100000 pixels, no pixel data.
        let mut png = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut png);
        enc.write_image(&[0u8; 3 * 4], 2, 2, image::ExtendedColorType::Rgb8)
            .unwrap();
        // Patch IHDR width/height (bytes 16..24) and let the CRC be wrong: the limit
        // check must fire first or the CRC check must reject; either way no decode.
        let mut bomb = png.clone();
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let err = decode_image(&bomb, 1 << 20).unwrap_err();
        assert!(
            matches!(err, MlmfError::Decode { .. } | MlmfError::Input { .. }),
            "{err}"
        );
        let err = decode_image(&png, 3).unwrap_err().to_string();
        assert!(err.contains("max_image_pixels = 3"), "{err}");
        assert!(err.starts_with("image input"), "{err}");
    }

    #[test]
    fn zero_size_images_are_refused() {
        // A GIF whose logical screen and only frame are 0x0.
        let mut gif = b"GIF89a\x00\x00\x00\x00\x00\x00\x00".to_vec();
        gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0x44, 0, 0x3B]);
        let err = decode_image(&gif, 100).unwrap_err();
        assert!(
            matches!(err, MlmfError::Input { .. } | MlmfError::Decode { .. }),
            "{err}"
        );
        if let MlmfError::Input { .. } = err {
            assert!(err.to_string().contains("empty 0x0"), "{err}");
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let img = sample();
        for f in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
        ] {
            let bytes = encode(&img, f);
            let cut = &bytes[..bytes.len() * 2 / 3];
            let err = decode_image(cut, 1 << 20).unwrap_err();
            assert!(matches!(err, MlmfError::Decode { .. }), "{f:?}: {err}");
        }
    }

    #[test]
    fn jpeg_warnings_grey_and_truncation() {
        let img = sample();
        let jpeg = encode(&img, ImageFormat::Jpeg);
        let clean = decode_image(&jpeg, 1 << 20).unwrap();
        // Junk between the scan data and the end marker is a libjpeg warning
        // ("extraneous bytes before marker"), which Pillow ignores: same pixels.
        let mut junk = jpeg[..jpeg.len() - 2].to_vec();
        junk.extend_from_slice(&[0x12, 0x34, 0x56, 0xFF, 0xD9]);
        assert_eq!(decode_image(&junk, 1 << 20).unwrap(), clean);
        // A greyscale JPEG comes back with its grey value in every channel.
        let grey = DynamicImage::ImageLuma8(img.to_luma8());
        let rgb = decode_image(&encode(&grey, ImageFormat::Jpeg), 1 << 20).unwrap();
        assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        // Cut inside the scan data: refused as truncated.
        let err = decode_image(&jpeg[..jpeg.len() / 2], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn garbage_and_unsupported() {
        let err = decode_image(b"not an image at all", 100)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unrecognised image format") && err.contains(EXPECTED),
            "{err}"
        );
        let err = decode_image(b"", 100).unwrap_err().to_string();
        assert!(err.contains("empty input"), "{err}");
        // An ICO header: recognised, not supported.
        let err = decode_image(&[0, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0], 100)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unsupported format") || err.contains("unrecognised"),
            "{err}"
        );
    }

    #[test]
    fn gif_header_walk() {
        // 2x1 screen, global palette of 2 (index 0 = (1, 2, 3)), a GCE without
        // transparency, then a 1x1 frame at (1, 0).
        let mut gif = b"GIF89a\x02\x00\x01\x00\x80\x00\x00".to_vec();
        gif.extend_from_slice(&[1, 2, 3, 9, 9, 9]);
        gif.extend_from_slice(&[0x21, 0xF9, 4, 0, 0, 0, 0, 0]);
        gif.extend_from_slice(&[0x2C, 1, 0, 0, 0, 1, 0, 1, 0, 0]);
        let f = first_gif_frame(&gif).unwrap();
        assert_eq!((f.left, f.top, f.width, f.height), (1, 0, 1, 1));
        assert_eq!((f.transparent, f.index0), (false, [1, 2, 3]));
        assert_eq!(first_gif_frame(&gif[..20]), None);
        assert_eq!(first_gif_frame(b"GIF89a"), None);
    }

    #[test]
    fn jpeg_end_marker_walk() {
        let jpeg = encode(&sample(), ImageFormat::Jpeg);
        assert!(jpeg_has_end(&jpeg));
        assert!(!jpeg_has_end(&jpeg[..jpeg.len() - 2]));
        assert!(!jpeg_has_end(&[0xFF, 0xD8, 0xFF]));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = decode_image(&bytes, 1 << 16);
        }

        #[test]
        fn mutated_files_never_panic(
            which in 0usize..5,
            flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8),
        ) {
            let f = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff][which];
            let mut bytes = encode(&sample(), f);
            for (pos, v) in flips {
                let n = bytes.len();
                bytes[pos % n] = v;
            }
            let _ = decode_image(&bytes, 1 << 16);
        }
    }
}
