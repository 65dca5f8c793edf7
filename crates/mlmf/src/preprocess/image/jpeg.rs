//! JPEG decoding through libjpeg-turbo (its TurboJPEG 3 API), the library Pillow links:
//! the accurate integer IDCT and "fancy" chroma upsampling, libjpeg's defaults and
//! Pillow's, so decoded pixels equal `Image.open(f).convert("RGB")`.
//!
//! Greyscale JPEGs come out with the grey value in all three channels (what Pillow's
//! `convert("RGB")` does to an `L` image). CMYK and YCCK JPEGs are left to the generic
//! decoder (TurboJPEG has no conversion from them to RGB). libjpeg warnings (e.g.
//! extraneous bytes before a marker) are ignored as Pillow ignores them, except a
//! premature end of data, which Pillow reports as a truncated file.

use std::ffi::{c_int, CStr};

use image::RgbImage;
use turbojpeg_sys as tj;

use super::convert::check_pixels;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

/// A TurboJPEG decompressor, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Result<Self> {
        // SAFETY: plain constructor; a null handle is checked below.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if h.is_null() {
            return Err(MlmfError::Internal(
                "libjpeg-turbo could not create a decompressor".into(),
            ));
        }
        Ok(Self(h))
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: `self.0` is a live handle; reading a parameter has no other effect.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    /// The message of the last failure (or warning).
    fn message(&self) -> String {
        // SAFETY: `self.0` is live; TurboJPEG returns a NUL-terminated string it owns,
        // copied here before any other call on the handle.
        unsafe {
            let p = tj::tj3GetErrorStr(self.0);
            if p.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// Whether the last failure was only a warning (the output is complete).
    fn warning_only(&self) -> bool {
        // SAFETY: `self.0` is live.
        unsafe { tj::tj3GetErrorCode(self.0) == tj::TJERR_TJERR_WARNING as c_int }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `tj3Init` and is destroyed exactly once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

fn decode_err(message: String) -> MlmfError {
    MlmfError::decode(Modality::Image, message)
}

/// Decodes a JPEG to RGB. `Ok(None)`: a colour space this path does not handle (CMYK,
/// YCCK), for the generic decoder. The pixel limit is checked on the header, before
/// any pixel memory is allocated.
pub(crate) fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<Option<RgbImage>> {
    let h = Handle::new()?;
    let len = bytes.len() as tj::size_t;
    // SAFETY: `bytes` is a live slice of `len` bytes; TurboJPEG only reads it.
    let res = unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), len) };
    if res != 0 {
        return Err(decode_err(format!("corrupt JPEG file: {}", h.message())));
    }
    let colorspace = h.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    if colorspace == tj::TJCS_TJCS_CMYK as c_int || colorspace == tj::TJCS_TJCS_YCCK as c_int {
        return Ok(None);
    }
    let (w, hgt) = (
        h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w <= 0 || hgt <= 0 {
        return Err(MlmfError::input(
            Modality::Image,
            format!("JPEG header declares an empty {w}x{hgt} image: expected at least 1x1"),
        ));
    }
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(decode_err(format!(
            "unsupported JPEG image: {precision}-bit samples (expected 8-bit)"
        )));
    }
    let (w, hgt) = (w as u32, hgt as u32);
    check_pixels(u64::from(w), u64::from(hgt), max_pixels)?;
    let pitch = w as usize * 3;
    let mut pixels = vec![0u8; pitch * hgt as usize];
    // SAFETY: `pixels` holds `pitch * height` bytes, the size TurboJPEG writes for an
    // RGB image of the header's dimensions at this pitch (no scaling is set).
    let res = unsafe {
        tj::tj3Decompress8(
            h.0,
            bytes.as_ptr(),
            len,
            pixels.as_mut_ptr(),
            pitch as c_int,
            tj::TJPF_TJPF_RGB as c_int,
        )
    };
    if res != 0 {
        let message = h.message();
        if !h.warning_only() {
            return Err(decode_err(format!("corrupt JPEG file: {message}")));
        }
        if message.contains("Premature end") {
            return Err(decode_err(format!("truncated JPEG file: {message}")));
        }
    }
    RgbImage::from_raw(w, hgt, pixels)
        .map(Some)
        .ok_or_else(|| MlmfError::Internal("decoded JPEG buffer has the wrong size".into()))
}
