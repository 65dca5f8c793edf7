//! Frame sources: where a video's frames come from and how the sampled ones are decoded.
//!
//! - Animated GIF and WebP (bytes or a file): the frame count and the frame delays are read
//!   from the container's block structure without decoding pixels; frames are then decoded
//!   in order, each as the full composited canvas (disposal and blending applied), and
//!   decoding stops after the last sampled frame. GIF frames come from the `image` crate's
//!   `AnimationDecoder`. WebP frames are composited here following libwebp's
//!   `WebPAnimDecoder` (what Pillow uses), each frame's bitstream decoded by the `image`
//!   crate: its own WebP animation decoder skips disposal without a background colour,
//!   clears non-alpha frames with a 3-byte stride on its 4-byte canvas, and blends opaque
//!   pixels with rounding. A still WebP is a one-frame video.
//! - A directory of image files, ordered by natural sort of the file names
//!   (`frame2.png` < `frame10.png`); only the sampled files are read and decoded.
//! - A uint8 array `[T, H, W, C]` with `C` in 1, 3, 4.
//!
//! Every frame leaves here as an RGB image, converted as the image module converts stills:
//! GIF/WebP canvases composite transparency onto white with Pillow's arithmetic (the PIL
//! `convert_to_rgb` of transformers), so a pixel no frame has painted yet is white;
//! directory frames go through the image module's decoder; array frames through its array
//! conversion (grey repeated, RGBA blended onto white in float as transformers does for
//! arrays). `do_convert_rgb: false` in the image config drops alpha instead.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{AnimationDecoder, ImageDecoder, RgbImage, RgbaImage};
use ndarray::{Array4, Axis};
use rayon::prelude::*;

use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::image::convert::composite_on_white;
use crate::preprocess::image::{ImageInput, ImageProcessor};
use crate::preprocess::Source;

use super::VideoInput;

/// Hard ceiling on a GIF/WebP canvas or frame (width * height), whatever the image
/// config's `max_image_pixels` says: RGBA canvas sizes (`w * h * 4`) then fit in 32 bits,
/// which the decoders underneath assume.
pub(crate) const MAX_CANVAS_PIXELS: u64 = (1 << 30) - 1;

/// File extensions a directory of frames may hold (the formats this build decodes).
pub(crate) const FRAME_EXTENSIONS: [&str; 8] =
    ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

fn input_err(message: impl Into<String>) -> MlmfError {
    MlmfError::input(Modality::Video, message)
}

fn decode_err(message: impl Into<String>) -> MlmfError {
    MlmfError::decode(Modality::Video, message)
}

/// Re-labels an error raised by the image module for one frame as a video error, with the
/// frame named, so the message says which modality and which frame failed.
pub(crate) fn as_video(e: MlmfError, frame: &str) -> MlmfError {
    match e {
        MlmfError::Input { message, .. } => input_err(format!("{frame}: {message}")),
        MlmfError::Decode { message, .. } => decode_err(format!("{frame}: {message}")),
        MlmfError::Io { path, source, .. } => MlmfError::Io {
            modality: Modality::Video,
            index: None,
            path,
            source,
        },
        other => other,
    }
}

/// The animated container formats decoded here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Animation {
    Gif,
    WebP,
}

/// What a container scan learns without decoding pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AnimInfo {
    pub frames: usize,
    /// Sum of the frame delays in milliseconds.
    pub duration_ms: u64,
}

impl AnimInfo {
    /// Frames per second from the mean frame delay; `None` when every delay is 0.
    pub fn fps(&self) -> Option<f64> {
        (self.duration_ms > 0 && self.frames > 0)
            .then(|| self.frames as f64 * 1000.0 / self.duration_ms as f64)
    }
}

/// A byte cursor whose reads fail (instead of panicking) past the end.
struct Reader<'b> {
    bytes: &'b [u8],
    pos: usize,
    what: &'static str,
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(decode_err(format!(
                "truncated {} (needed {n} bytes at offset {})",
                self.what, self.pos
            ))),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16le(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Skips a chain of GIF data sub-blocks (length byte, data, ..., 0).
    fn skip_sub_blocks(&mut self) -> Result<()> {
        loop {
            let n = self.u8()? as usize;
            if n == 0 {
                return Ok(());
            }
            self.take(n)?;
        }
    }
}

/// Refuses a canvas or frame above `max_pixels` (checked on the header, before the decoder
/// allocates anything).
fn check_canvas(width: u64, height: u64, max_pixels: u64, what: &str) -> Result<()> {
    let limit = max_pixels.min(MAX_CANVAS_PIXELS);
    if width * height > limit {
        return Err(input_err(format!(
            "{what} is {width}x{height} pixels, more than the limit of {limit} \
             (the image config's max_image_pixels)"
        )));
    }
    Ok(())
}

/// Walks a GIF's blocks (GIF89a spec: header, logical screen, colour tables, extensions,
/// image descriptors, trailer), counting frames and summing the Graphic Control
/// Extension delays. A missing trailer after a complete frame is tolerated, as decoders do.
pub(crate) fn scan_gif(bytes: &[u8], max_pixels: u64) -> Result<AnimInfo> {
    let mut r = Reader {
        bytes,
        pos: 0,
        what: "GIF",
    };
    let sig = r.take(6)?;
    if sig != b"GIF87a" && sig != b"GIF89a" {
        return Err(decode_err("not a GIF (bad signature)"));
    }
    let width = r.u16le()?;
    let height = r.u16le()?;
    let packed = r.u8()?;
    r.take(2)?; // background colour index, pixel aspect ratio
    if packed & 0x80 != 0 {
        r.take(3 << ((packed & 7) + 1))?;
    }
    check_canvas(
        u64::from(width),
        u64::from(height),
        max_pixels,
        "GIF canvas",
    )?;
    let mut frames = 0usize;
    let mut duration_ms = 0u64;
    let mut pending_delay: Option<u16> = None;
    while !r.at_end() {
        match r.u8()? {
            0x21 => {
                let label = r.u8()?;
                if label == 0xF9 {
                    // Graphic Control Extension: size 4, packed, delay (1/100 s), transparent index.
                    let size = r.u8()? as usize;
                    let block = r.take(size)?;
                    if size >= 3 {
                        pending_delay = Some(u16::from_le_bytes([block[1], block[2]]));
                    }
                }
                r.skip_sub_blocks()?;
            }
            0x2C => {
                r.take(4)?; // left, top
                let fw = r.u16le()?;
                let fh = r.u16le()?;
                let packed = r.u8()?;
                if packed & 0x80 != 0 {
                    r.take(3 << ((packed & 7) + 1))?;
                }
                check_canvas(u64::from(fw), u64::from(fh), max_pixels, "GIF frame")?;
                r.u8()?; // LZW minimum code size
                r.skip_sub_blocks()?;
                frames += 1;
                duration_ms += u64::from(pending_delay.take().unwrap_or(0)) * 10;
            }
            0x3B => break,
            other => {
                return Err(decode_err(format!(
                    "corrupt GIF: unexpected block 0x{other:02x} at offset {}",
                    r.pos - 1
                )))
            }
        }
    }
    Ok(AnimInfo {
        frames,
        duration_ms,
    })
}

fn u24le(b: &[u8]) -> u32 {
    u32::from(b[0]) | (u32::from(b[1]) << 8) | (u32::from(b[2]) << 16)
}

/// One `ANMF` frame of an animated WebP, borrowed from the file.
#[derive(Clone, Debug)]
pub(crate) struct WebPFrame<'b> {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    duration_ms: u32,
    /// Alpha-blend onto the previous canvas (else overwrite).
    blend: bool,
    /// Clear the frame's rectangle to transparent before the next frame.
    dispose_background: bool,
    /// `ALPH` chunk of a lossy frame.
    alpha: Option<&'b [u8]>,
    /// `VP8 ` (lossy) or `VP8L` (lossless) bitstream.
    lossless: bool,
    bitstream: &'b [u8],
}

impl WebPFrame<'_> {
    /// libwebp's `has_alpha` of a frame: an `ALPH` chunk, or the VP8L header's
    /// `alpha_is_used` bit.
    fn has_alpha(&self) -> bool {
        if self.lossless {
            self.bitstream
                .get(1..5)
                .is_some_and(|b| (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 28) & 1 == 1)
        } else {
            self.alpha.is_some()
        }
    }

    fn is_full(&self, width: u32, height: u32) -> bool {
        (self.width, self.height) == (width, height)
    }

    fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && x < self.x + self.width && y >= self.y && y < self.y + self.height
    }

    /// The frame alone as a still WebP file, for the image crate's still decoder.
    fn as_still(&self) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(fourcc);
            // Chunk sizes come from the file's own u32 fields, so they fit.
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(0);
            }
        }
        let mut body = Vec::with_capacity(self.bitstream.len() + 64);
        match (self.lossless, self.alpha) {
            (false, Some(alpha)) => {
                let mut vp8x = [0u8; 10];
                vp8x[0] = 0x10; // alpha present
                vp8x[4..7].copy_from_slice(&(self.width - 1).to_le_bytes()[..3]);
                vp8x[7..10].copy_from_slice(&(self.height - 1).to_le_bytes()[..3]);
                chunk(&mut body, b"VP8X", &vp8x);
                chunk(&mut body, b"ALPH", alpha);
                chunk(&mut body, b"VP8 ", self.bitstream);
            }
            (false, None) => chunk(&mut body, b"VP8 ", self.bitstream),
            (true, _) => chunk(&mut body, b"VP8L", self.bitstream),
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(&body);
        out
    }
}

/// An animated WebP: canvas size and frames.
#[derive(Clone, Debug)]
pub(crate) struct WebPAnim<'b> {
    width: u32,
    height: u32,
    pub(crate) frames: Vec<WebPFrame<'b>>,
}

impl WebPAnim<'_> {
    fn info(&self) -> AnimInfo {
        AnimInfo {
            frames: self.frames.len(),
            duration_ms: self.frames.iter().map(|f| u64::from(f.duration_ms)).sum(),
        }
    }
}

fn riff_chunk<'b>(r: &mut Reader<'b>) -> Result<(&'b [u8], &'b [u8])> {
    let fourcc = r.take(4)?;
    let size = r.take(4)?;
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    let payload = r.take(size)?;
    // Chunks are padded to an even size; the pad byte may be missing at the very end.
    if size % 2 == 1 && r.pos < r.bytes.len() {
        r.pos += 1;
    }
    Ok((fourcc, payload))
}

/// Walks a WebP's RIFF chunks (the WebP container spec): `VP8X` (flags, canvas size)
/// and one `ANMF` per animation frame (offset, size, duration, blend and dispose flags,
/// then its `ALPH` / `VP8 ` / `VP8L` sub-chunks). `None` for a still WebP.
pub(crate) fn parse_webp(bytes: &[u8], max_pixels: u64) -> Result<Option<WebPAnim<'_>>> {
    let mut r = Reader {
        bytes,
        pos: 0,
        what: "WebP",
    };
    let riff = r.take(4)?;
    let riff_size = r.take(4)?;
    let webp = r.take(4)?;
    if riff != b"RIFF" || webp != b"WEBP" {
        return Err(decode_err("not a WebP (bad RIFF header)"));
    }
    let riff_size = u32::from_le_bytes([riff_size[0], riff_size[1], riff_size[2], riff_size[3]]);
    let end = (riff_size as usize).saturating_add(8).min(bytes.len());
    r.bytes = &bytes[..end];
    let mut canvas: Option<(u32, u32, bool)> = None;
    let mut frames = Vec::new();
    while r.pos + 8 <= end {
        let (fourcc, payload) = riff_chunk(&mut r)?;
        match fourcc {
            b"VP8X" if canvas.is_none() => {
                if payload.len() < 10 {
                    return Err(decode_err("corrupt WebP: VP8X chunk is too short"));
                }
                let w = u24le(&payload[4..7]) + 1;
                let h = u24le(&payload[7..10]) + 1;
                check_canvas(u64::from(w), u64::from(h), max_pixels, "WebP canvas")?;
                canvas = Some((w, h, payload[0] & 0x02 != 0));
            }
            b"ANMF" => {
                let i = frames.len();
                if payload.len() < 16 {
                    return Err(decode_err(format!(
                        "corrupt WebP: frame {i} header is too short"
                    )));
                }
                let mut frame = WebPFrame {
                    x: u24le(&payload[0..3]) * 2,
                    y: u24le(&payload[3..6]) * 2,
                    width: u24le(&payload[6..9]) + 1,
                    height: u24le(&payload[9..12]) + 1,
                    duration_ms: u24le(&payload[12..15]),
                    blend: payload[15] & 0x02 == 0,
                    dispose_background: payload[15] & 0x01 != 0,
                    alpha: None,
                    lossless: false,
                    bitstream: &[],
                };
                check_canvas(
                    u64::from(frame.width),
                    u64::from(frame.height),
                    max_pixels,
                    "WebP frame",
                )?;
                let mut sub = Reader {
                    bytes: &payload[16..],
                    pos: 0,
                    what: "WebP frame",
                };
                while sub.pos + 8 <= sub.bytes.len() {
                    let (cc, data) = riff_chunk(&mut sub)?;
                    match cc {
                        b"ALPH" => frame.alpha = Some(data),
                        b"VP8 " | b"VP8L" => {
                            frame.lossless = cc == b"VP8L";
                            frame.bitstream = data;
                            break;
                        }
                        _ => {}
                    }
                }
                if frame.bitstream.is_empty() {
                    return Err(decode_err(format!(
                        "corrupt WebP: frame {i} has no image data"
                    )));
                }
                frames.push(frame);
            }
            _ => {}
        }
    }
    let Some((width, height, true)) = canvas else {
        return Ok(None);
    };
    for (i, f) in frames.iter().enumerate() {
        if u64::from(f.x) + u64::from(f.width) > u64::from(width)
            || u64::from(f.y) + u64::from(f.height) > u64::from(height)
        {
            return Err(decode_err(format!(
                "corrupt WebP: frame {i} ({}x{} at {},{}) lies outside the {width}x{height} canvas",
                f.width, f.height, f.x, f.y
            )));
        }
    }
    Ok(Some(WebPAnim {
        width,
        height,
        frames,
    }))
}

/// libwebp's non-premultiplied "src over dst" (`BlendPixelNonPremult` in
/// `src/demux/anim_decode.c`), integer arithmetic included.
fn blend_non_premult(src: [u8; 4], dst: [u8; 4]) -> [u8; 4] {
    let sa = u32::from(src[3]);
    if sa == 0 {
        return dst;
    }
    let dst_factor = (u32::from(dst[3]) * (256 - sa)) >> 8;
    let blend_a = sa + dst_factor; // < 256
    let scale = (1u32 << 24) / blend_a;
    let channel = |k: usize| {
        (((u32::from(src[k]) * sa + u32::from(dst[k]) * dst_factor) * scale) >> 24) as u8
    };
    [channel(0), channel(1), channel(2), blend_a as u8]
}

/// Composites an animated WebP frame by frame as libwebp's `WebPAnimDecoder` does (what
/// Pillow uses): key frames start from a transparent canvas, others from the previous
/// canvas after its disposal; each frame's decoded pixels overwrite its rectangle, then
/// (blend mode, not a key frame) pixels with alpha < 255 are blended over the previous
/// canvas, except inside a previous rectangle disposed to transparent. Frame bitstreams
/// are decoded by the image crate's still WebP decoder.
pub(crate) struct WebPFrames<'b> {
    anim: WebPAnim<'b>,
    next: usize,
    canvas: Vec<u8>,
    prev_disposed: Vec<u8>,
    prev_key: bool,
}

impl<'b> WebPFrames<'b> {
    pub(crate) fn new(anim: WebPAnim<'b>) -> Self {
        let n = anim.width as usize * anim.height as usize * 4;
        Self {
            anim,
            next: 0,
            canvas: vec![0; n],
            prev_disposed: vec![0; n],
            prev_key: false,
        }
    }

    fn step(&mut self) -> Result<RgbaImage> {
        let (cw, ch) = (self.anim.width, self.anim.height);
        let i = self.next;
        let f = self
            .anim
            .frames
            .get(i)
            .ok_or_else(|| MlmfError::Internal("WebP frame past the end".into()))?;
        let prev = i.checked_sub(1).and_then(|p| self.anim.frames.get(p));
        let key = match prev {
            None => true,
            Some(p) => {
                ((!f.has_alpha() || !f.blend) && f.is_full(cw, ch))
                    || (p.dispose_background && (p.is_full(cw, ch) || self.prev_key))
            }
        };
        if key {
            self.canvas.fill(0);
        } else {
            self.canvas.copy_from_slice(&self.prev_disposed);
        }
        let pixels = image::load_from_memory_with_format(&f.as_still(), image::ImageFormat::WebP)
            .map_err(|e| decode_err(format!("corrupt WebP: frame {i}: {e}")))?
            .into_rgba8();
        if pixels.dimensions() != (f.width, f.height) {
            return Err(decode_err(format!(
                "corrupt WebP: frame {i} holds a {}x{} image, its header says {}x{}",
                pixels.width(),
                pixels.height(),
                f.width,
                f.height
            )));
        }
        let row = f.width as usize * 4;
        for (y, src) in pixels.as_raw().chunks_exact(row).enumerate() {
            let at = ((f.y as usize + y) * cw as usize + f.x as usize) * 4;
            self.canvas[at..at + row].copy_from_slice(src);
        }
        if let (Some(p), true, false) = (prev, f.blend, key) {
            for y in f.y..f.y + f.height {
                for x in f.x..f.x + f.width {
                    // Inside a rectangle disposed to transparent the blend is a no-op.
                    if p.dispose_background && p.contains(x, y) {
                        continue;
                    }
                    let at = (y as usize * cw as usize + x as usize) * 4;
                    let src = [
                        self.canvas[at],
                        self.canvas[at + 1],
                        self.canvas[at + 2],
                        self.canvas[at + 3],
                    ];
                    if src[3] != 255 {
                        let dst = [
                            self.prev_disposed[at],
                            self.prev_disposed[at + 1],
                            self.prev_disposed[at + 2],
                            self.prev_disposed[at + 3],
                        ];
                        self.canvas[at..at + 4].copy_from_slice(&blend_non_premult(src, dst));
                    }
                }
            }
        }
        self.prev_key = key;
        self.prev_disposed.copy_from_slice(&self.canvas);
        if f.dispose_background {
            for y in f.y..f.y + f.height {
                let at = (y as usize * cw as usize + f.x as usize) * 4;
                self.prev_disposed[at..at + row].fill(0);
            }
        }
        self.next += 1;
        RgbaImage::from_raw(cw, ch, self.canvas.clone())
            .ok_or_else(|| MlmfError::Internal("WebP canvas size".into()))
    }
}

impl Iterator for WebPFrames<'_> {
    type Item = Result<RgbaImage>;

    fn next(&mut self) -> Option<Result<RgbaImage>> {
        if self.next >= self.anim.frames.len() {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            // A broken frame ends the animation: later frames build on it.
            self.next = self.anim.frames.len();
        }
        Some(r)
    }
}

/// Names the kind of a non-animated input, for the "unsupported" message.
fn describe(bytes: &[u8]) -> &'static str {
    let at = |off: usize, magic: &[u8]| bytes.get(off..off + magic.len()) == Some(magic);
    if bytes.is_empty() {
        "empty input"
    } else if at(4, b"ftyp") {
        "an MP4/MOV container"
    } else if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        "a Matroska/WebM container"
    } else if at(0, b"RIFF") && at(8, b"AVI ") {
        "an AVI container"
    } else if at(0, b"\x89PNG") {
        "a PNG image"
    } else if at(0, &[0xFF, 0xD8, 0xFF]) {
        "a JPEG image"
    } else {
        "an unrecognised format"
    }
}

/// Orders file names as people number frames: runs of digits compare as numbers
/// (`frame2` < `frame10`), everything else byte by byte. Equal numbers with different
/// zero padding, then the raw names, break ties so the order is total.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> impl Iterator<Item = &str> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            rest = tail;
            Some(run)
        })
    }
    let mut ra = runs(a);
    let mut rb = runs(b);
    loop {
        match (ra.next(), rb.next()) {
            (None, None) => break,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let xd = x.starts_with(|c: char| c.is_ascii_digit());
                let yd = y.starts_with(|c: char| c.is_ascii_digit());
                let ord = if xd && yd {
                    // Compare digit strings as numbers of any length: strip leading zeros,
                    // then the longer is larger, then lexicographic.
                    let xs = x.trim_start_matches('0');
                    let ys = y.trim_start_matches('0');
                    xs.len().cmp(&ys.len()).then_with(|| xs.cmp(ys))
                } else {
                    x.cmp(y)
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
    a.cmp(b)
}

/// The image files of a frame directory in natural order. Hidden entries (`.name`) and
/// subdirectories are skipped; any other file must have an image extension.
pub(crate) fn list_frame_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io_err = |path: &Path, source| MlmfError::Io {
        modality: Modality::Video,
        index: None,
        path: path.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks, so a link to a directory is skipped like a directory.
        let meta = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.is_dir() {
            continue;
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !FRAME_EXTENSIONS.contains(&ext.as_str()) {
            return Err(input_err(format!(
                "frame directory {} holds {name:?}, which is not an image file: expected only \
                 files with extensions {}",
                dir.display(),
                FRAME_EXTENSIONS.join(", ")
            )));
        }
        files.push((name, path));
    }
    if files.is_empty() {
        return Err(input_err(format!(
            "frame directory {} holds no image files (expected {})",
            dir.display(),
            FRAME_EXTENSIONS.join(", ")
        )));
    }
    files.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// An opened video: where its frames come from, how many there are, its own frame rate.
pub(crate) enum FrameSource<'a> {
    Animation {
        kind: Animation,
        bytes: Cow<'a, [u8]>,
        info: AnimInfo,
    },
    Still {
        bytes: Cow<'a, [u8]>,
    },
    Directory {
        files: Vec<PathBuf>,
    },
    Array {
        data: &'a Array4<u8>,
        fps: Option<f64>,
    },
    Sparse {
        data: &'a Array4<u8>,
        indices: &'a [usize],
        total: usize,
        fps: Option<f64>,
    },
}

/// Shape and frame-rate checks shared by array inputs.
fn check_frames(data: &Array4<u8>, fps: Option<f64>) -> Result<()> {
    let (t, h, w, c) = data.dim();
    if !matches!(c, 1 | 3 | 4) {
        return Err(input_err(format!(
            "expected frames of shape [T, H, W, C] with C in 1, 3, 4, got C = {c}"
        )));
    }
    if t == 0 || h == 0 || w == 0 {
        return Err(input_err(format!(
            "expected a non-empty [T, H, W, C] frame array, got shape [{t}, {h}, {w}, {c}]"
        )));
    }
    if let Some(f) = fps {
        if !(f.is_finite() && f > 0.0) {
            return Err(input_err(format!(
                "fps must be a positive finite number, got {f}"
            )));
        }
    }
    Ok(())
}

impl<'a> FrameSource<'a> {
    /// Reads what sampling needs (frame count, frame rate) without decoding pixels.
    /// `max_pixels` bounds GIF/WebP canvases and frames.
    pub(crate) fn open(input: &'a VideoInput, max_pixels: u64) -> Result<Self> {
        match input {
            VideoInput::Frames { data, fps } => {
                check_frames(data, *fps)?;
                Ok(Self::Array { data, fps: *fps })
            }
            VideoInput::Sparse {
                data,
                indices,
                total,
                fps,
            } => {
                check_frames(data, *fps)?;
                if indices.len() != data.dim().0 {
                    return Err(input_err(format!(
                        "{} frame indices for {} decoded frames: expected one index per frame",
                        indices.len(),
                        data.dim().0
                    )));
                }
                if indices.windows(2).any(|w| w[0] >= w[1])
                    || indices.last().is_some_and(|&l| l >= *total)
                {
                    return Err(input_err(format!(
                        "frame indices must be ascending, without repeats, and below the \
                         video's {total} frames"
                    )));
                }
                Ok(Self::Sparse {
                    data,
                    indices,
                    total: *total,
                    fps: *fps,
                })
            }
            VideoInput::Source(Source::Path(p)) if p.is_dir() => Ok(Self::Directory {
                files: list_frame_files(p)?,
            }),
            VideoInput::Source(src) => {
                let bytes = src.bytes(Modality::Video)?;
                if bytes.starts_with(b"GIF8") {
                    let info = scan_gif(&bytes, max_pixels)?;
                    if info.frames == 0 {
                        return Err(input_err("GIF has no frames"));
                    }
                    return Ok(Self::Animation {
                        kind: Animation::Gif,
                        bytes,
                        info,
                    });
                }
                if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
                    let info = parse_webp(&bytes, max_pixels)?.map(|a| a.info());
                    return Ok(match info {
                        Some(info) if info.frames == 0 => {
                            return Err(input_err("animated WebP has no frames"))
                        }
                        Some(info) => Self::Animation {
                            kind: Animation::WebP,
                            bytes,
                            info,
                        },
                        None => Self::Still { bytes },
                    });
                }
                // Content, not the kind of argument, is wrong: a decode error.
                Err(MlmfError::decode(
                    Modality::Video,
                    format!(
                        "expected an animated GIF or WebP, or a directory of frame images, \
                         got {}; decode other containers with mlmf.video.read_video (PyAV) \
                         and pass the frames as a uint8 [T, H, W, C] array",
                        describe(&bytes)
                    ),
                ))
            }
        }
    }

    /// Number of frames.
    pub(crate) fn total(&self) -> usize {
        match self {
            Self::Animation { info, .. } => info.frames,
            Self::Still { .. } => 1,
            Self::Directory { files } => files.len(),
            Self::Array { data, .. } => data.dim().0,
            Self::Sparse { total, .. } => *total,
        }
    }

    /// The video's own frame rate, when it has one.
    pub(crate) fn fps(&self) -> Option<f64> {
        match self {
            Self::Animation { info, .. } => info.fps(),
            Self::Array { fps, .. } | Self::Sparse { fps, .. } => *fps,
            Self::Still { .. } | Self::Directory { .. } => None,
        }
    }

    /// Decodes the frames at `wanted` (ascending, no repeats) as RGB, in that order.
    pub(crate) fn read(&self, wanted: &[usize], image: &ImageProcessor) -> Result<Vec<RgbImage>> {
        let total = self.total();
        if let Some(&bad) = wanted.iter().find(|&&i| i >= total) {
            return Err(MlmfError::Internal(format!(
                "frame {bad} sampled from a video of {total} frames"
            )));
        }
        match self {
            Self::Animation { kind, bytes, .. } => read_animation(*kind, bytes, wanted, image),
            Self::Still { bytes } => {
                let img = image
                    .load(&ImageInput::Source(Source::Bytes(bytes.to_vec())))
                    .map_err(|e| as_video(e, "frame 0"))?;
                Ok(wanted.iter().map(|_| img.clone()).collect())
            }
            Self::Directory { files } => wanted
                .par_iter()
                .map(|&i| {
                    let path = &files[i];
                    image
                        .load(&ImageInput::Source(Source::Path(path.clone())))
                        .map_err(|e| as_video(e, &format!("frame {i} ({})", path.display())))
                })
                .collect(),
            Self::Array { data, .. } => wanted
                .par_iter()
                .map(|&i| array_frame(data, i, image))
                .collect(),
            Self::Sparse { data, indices, .. } => wanted
                .par_iter()
                .map(|&i| match indices.binary_search(&i) {
                    Ok(row) => array_frame(data, row, image),
                    Err(_) => Err(input_err(format!(
                        "frame {i} was sampled but not among the decoded frames {indices:?}"
                    ))),
                })
                .collect(),
        }
    }
}

impl Animation {
    fn name(self) -> &'static str {
        match self {
            Self::Gif => "GIF",
            Self::WebP => "WebP",
        }
    }
}

/// The composited RGBA canvases of an animation, decoded lazily in order.
pub(crate) fn animation_frames(
    kind: Animation,
    bytes: &[u8],
    max_pixels: u64,
) -> Result<Box<dyn Iterator<Item = Result<RgbaImage>> + '_>> {
    match kind {
        Animation::Gif => {
            let open_err = |e: image::ImageError| decode_err(format!("corrupt GIF: {e}"));
            let mut d =
                image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).map_err(open_err)?;
            // The GIF decoder starts without allocation limits; bound each frame buffer.
            d.set_limits(image::Limits::default()).map_err(open_err)?;
            Ok(Box::new(d.into_frames().enumerate().map(|(i, f)| {
                f.map(image::Frame::into_buffer)
                    .map_err(|e| decode_err(format!("corrupt GIF: frame {i}: {e}")))
            })))
        }
        Animation::WebP => {
            let anim = parse_webp(bytes, max_pixels)?
                .ok_or_else(|| decode_err("corrupt WebP: not animated"))?;
            Ok(Box::new(WebPFrames::new(anim)))
        }
    }
}

/// Decodes an animation frame by frame up to the last wanted one.
pub(crate) fn read_animation(
    kind: Animation,
    bytes: &[u8],
    wanted: &[usize],
    image: &ImageProcessor,
) -> Result<Vec<RgbImage>> {
    let Some(&last) = wanted.last() else {
        return Ok(Vec::new());
    };
    let name = kind.name();
    let frames = animation_frames(kind, bytes, image.config().max_image_pixels)?;
    let mut out = Vec::with_capacity(wanted.len());
    let mut next = wanted.iter().copied().peekable();
    for (i, frame) in frames.enumerate() {
        let frame = frame?;
        if next.peek() == Some(&i) {
            out.push(rgba_to_rgb(frame, image)?);
            next.next();
        }
        if i >= last {
            break;
        }
    }
    if let Some(missing) = next.next() {
        return Err(decode_err(format!(
            "corrupt {name}: the decoder stopped after {} frames, frame {missing} was sampled",
            out.len()
        )));
    }
    Ok(out)
}

/// A composited RGBA canvas -> RGB: transparency over white (Pillow's arithmetic, as for
/// decoded still images), or alpha dropped when the image config turns `do_convert_rgb`
/// off.
pub(crate) fn rgba_to_rgb(canvas: RgbaImage, image: &ImageProcessor) -> Result<RgbImage> {
    let (w, h) = canvas.dimensions();
    let composite = image.config().do_convert_rgb;
    let rgb: Vec<u8> = canvas
        .pixels()
        .flat_map(|p| {
            let [r, g, b, a] = p.0;
            if composite && a != 255 {
                [
                    composite_on_white(r, a),
                    composite_on_white(g, a),
                    composite_on_white(b, a),
                ]
            } else {
                [r, g, b]
            }
        })
        .collect();
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| MlmfError::Internal("RGB frame buffer size".into()))
}

/// Frame `i` of a `[T, H, W, C]` array as RGB (grey and RGBA via the image module's rules).
fn array_frame(data: &Array4<u8>, i: usize, image: &ImageProcessor) -> Result<RgbImage> {
    let frame = data.index_axis(Axis(0), i);
    let (h, w, c) = frame.dim();
    let (wu, hu) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(input_err(format!("frame {i} is too large ({h}x{w})"))),
    };
    if c == 3 {
        // Frames of a standard-layout array are contiguous: one copy.
        let rgb: Vec<u8> = match frame.as_slice() {
            Some(s) => s.to_vec(),
            None => frame.iter().copied().collect(),
        };
        return RgbImage::from_raw(wu, hu, rgb)
            .ok_or_else(|| MlmfError::Internal("RGB frame buffer size".into()));
    }
    let arr = if c == 1 {
        frame.index_axis(Axis(2), 0).to_owned().into_dyn()
    } else {
        frame.to_owned().into_dyn()
    };
    image
        .load(&ImageInput::Array(arr))
        .map_err(|e| as_video(e, &format!("frame {i}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_sort_orders_numbers_by_value() {
        let mut names = vec![
            "frame10.png",
            "frame2.png",
            "frame1.png",
            "frame02.png",
            "frame100.png",
            "a.png",
            "frame9.png",
            "Frame3.png",
            "frame2b.png",
            "frame2a.png",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec![
                "Frame3.png",
                "a.png",
                "frame1.png",
                "frame02.png",
                "frame2.png",
                "frame2a.png",
                "frame2b.png",
                "frame9.png",
                "frame10.png",
                "frame100.png",
            ]
        );
        // Digit runs longer than any integer type still compare by value.
        assert_eq!(
            natural_cmp("x99999999999999999999999", "x100000000000000000000000"),
            Ordering::Less
        );
        assert_eq!(natural_cmp("", "a"), Ordering::Less);
        assert_eq!(natural_cmp("0", "00"), "0".cmp("00"));
    }

    /// A minimal GIF with `n` 1x1 frames and the given delay (1/100 s).
    fn tiny_gif(n: usize, delay_cs: u16) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // 1x1, 2-colour global table
        g.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        for _ in 0..n {
            let d = delay_cs.to_le_bytes();
            g.extend_from_slice(&[0x21, 0xF9, 4, 0, d[0], d[1], 0, 0]);
            g.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
            // LZW min code size 2: clear (4), index 0, end (5) -> 3-bit codes 100 000 101.
            g.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
        }
        g.push(0x3B);
        g
    }

    #[test]
    fn gif_scan_counts_frames_and_delays() {
        let info = scan_gif(&tiny_gif(5, 4), u64::MAX).unwrap();
        assert_eq!(info.frames, 5);
        assert_eq!(info.duration_ms, 200);
        assert_eq!(info.fps(), Some(25.0));
        assert_eq!(scan_gif(&tiny_gif(3, 0), u64::MAX).unwrap().fps(), None);
        // Missing trailer after complete frames is accepted.
        let mut g = tiny_gif(2, 10);
        g.pop();
        assert_eq!(scan_gif(&g, u64::MAX).unwrap().frames, 2);
        // Truncated inside a frame is not.
        let g = tiny_gif(2, 10);
        let err = scan_gif(&g[..g.len() - 4], u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("video input: cannot decode: truncated GIF"),
            "{err}"
        );
        let err = scan_gif(b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x99", u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected block 0x99"), "{err}");
    }

    #[test]
    fn gif_frames_decode_up_to_the_last_sampled() {
        let ip = crate::preprocess::video::tests::image_processor();
        let g = tiny_gif(4, 10);
        let frames = read_animation(Animation::Gif, &g, &[1, 3], &ip).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].get_pixel(0, 0).0, [255, 0, 0]);
        let err = read_animation(Animation::Gif, &g, &[7], &ip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stopped after 0 frames, frame 7 was sampled"),
            "{err}"
        );
    }

    #[test]
    fn describes_unsupported_inputs() {
        assert_eq!(describe(b"\0\0\0\x18ftypisom"), "an MP4/MOV container");
        assert_eq!(describe(b""), "empty input");
        assert_eq!(describe(b"\x89PNG\r\n"), "a PNG image");
    }

    /// The VP8L chunk of `img` encoded as a lossless still WebP.
    fn vp8l_of(img: &RgbaImage) -> Vec<u8> {
        let mut still = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut still)
            .encode(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgba8,
            )
            .unwrap();
        let mut pos = 12;
        while pos + 8 <= still.len() {
            let size = u32::from_le_bytes(still[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if &still[pos..pos + 4] == b"VP8L" {
                return still[pos + 8..pos + 8 + size].to_vec();
            }
            pos += 8 + size + size % 2;
        }
        panic!("no VP8L chunk");
    }

    /// An animated WebP: `(x, y, blend, dispose_background, duration_ms, pixels)` per frame.
    fn anim_webp(w: u32, h: u32, frames: &[(u32, u32, bool, bool, u32, RgbaImage)]) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, cc: &[u8], data: &[u8]) {
            out.extend_from_slice(cc);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(0);
            }
        }
        let u24 = |v: u32| v.to_le_bytes()[..3].to_vec();
        let mut body = Vec::new();
        let vp8x = [vec![0x12, 0, 0, 0], u24(w - 1), u24(h - 1)].concat();
        chunk(&mut body, b"VP8X", &vp8x);
        chunk(&mut body, b"ANIM", &[0, 0, 0, 0, 0, 0]);
        for (x, y, blend, dispose, dur, img) in frames {
            let flags = u8::from(!blend) << 1 | u8::from(*dispose);
            let mut payload = [
                u24(x / 2),
                u24(y / 2),
                u24(img.width() - 1),
                u24(img.height() - 1),
                u24(*dur),
                vec![flags],
            ]
            .concat();
            chunk(&mut payload, b"VP8L", &vp8l_of(img));
            chunk(&mut body, b"ANMF", &payload);
        }
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn webp_compositing_follows_libwebp() {
        let red = RgbaImage::from_pixel(4, 4, image::Rgba([255, 0, 0, 255]));
        let blue = RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 255, 128]));
        let clear = RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0]));
        let bytes = anim_webp(
            4,
            4,
            &[
                (0, 0, false, false, 100, red),
                (0, 0, true, true, 100, blue),
                (2, 2, true, false, 200, clear),
            ],
        );
        let anim = parse_webp(&bytes, u64::MAX).unwrap().unwrap();
        assert_eq!(
            anim.info(),
            AnimInfo {
                frames: 3,
                duration_ms: 400
            }
        );
        assert_eq!(anim.info().fps(), Some(7.5));
        let canvases: Vec<RgbaImage> = WebPFrames::new(anim).map(|f| f.unwrap()).collect();
        // Frame 1: half-transparent blue over red with libwebp's integer blend
        // (dst factor 127, alpha 255, scale 65793). Pillow 13 gives the same pixels.
        assert_eq!(canvases[1].get_pixel(0, 0).0, [126, 0, 127, 255]);
        assert_eq!(canvases[1].get_pixel(3, 3).0, [255, 0, 0, 255]);
        // Frame 2: frame 1's rectangle was disposed to transparent; a fully transparent
        // frame blended elsewhere keeps the red.
        assert_eq!(canvases[2].get_pixel(1, 1).0, [0, 0, 0, 0]);
        assert_eq!(canvases[2].get_pixel(2, 2).0, [255, 0, 0, 255]);
        // As video frames, transparency becomes white.
        let ip = crate::preprocess::video::tests::image_processor();
        let rgb = read_animation(Animation::WebP, &bytes, &[1, 2], &ip).unwrap();
        assert_eq!(rgb[1].get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb[0].get_pixel(0, 0).0, [126, 0, 127]);
        assert_eq!(blend_non_premult([9, 9, 9, 0], [1, 2, 3, 4]), [1, 2, 3, 4]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            prefix in 0usize..3,
        ) {
            let ip = crate::preprocess::video::tests::image_processor();
            let mut bytes = match prefix {
                0 => b"GIF89a".to_vec(),
                1 => {
                    let mut b = b"RIFF".to_vec();
                    b.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
                    b.extend_from_slice(b"WEBP");
                    b
                }
                _ => Vec::new(),
            };
            bytes.extend_from_slice(&body);
            let input = VideoInput::Source(Source::Bytes(bytes));
            if let Ok(src) = FrameSource::open(&input, 1 << 20) {
                let total = src.total();
                let wanted: Vec<usize> = (0..total.min(3)).collect();
                let _ = src.read(&wanted, &ip);
            }
        }

        #[test]
        fn mutated_webps_never_panic(
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..64,
        ) {
            let ip = crate::preprocess::video::tests::image_processor();
            let px = |c: u8, a: u8| RgbaImage::from_pixel(4, 2, image::Rgba([c, 9, 200, a]));
            let mut w = anim_webp(
                6,
                4,
                &[
                    (0, 0, false, false, 30, px(1, 255)),
                    (2, 2, true, true, 30, px(90, 100)),
                    (0, 2, true, false, 30, px(200, 0)),
                ],
            );
            for (at, v) in flips {
                let n = w.len();
                w[at % n] = v;
            }
            w.truncate(w.len().saturating_sub(cut));
            let input = VideoInput::Source(Source::Bytes(w));
            if let Ok(src) = FrameSource::open(&input, 1 << 20) {
                let wanted: Vec<usize> = (0..src.total().min(4)).collect();
                let _ = src.read(&wanted, &ip);
            }
        }

        #[test]
        fn mutated_gifs_never_panic(
            flips in proptest::collection::vec((0usize..64, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..64,
        ) {
            let ip = crate::preprocess::video::tests::image_processor();
            let mut g = tiny_gif(3, 7);
            for (at, v) in flips {
                let n = g.len();
                g[at % n] = v;
            }
            g.truncate(g.len().saturating_sub(cut));
            let input = VideoInput::Source(Source::Bytes(g));
            if let Ok(src) = FrameSource::open(&input, 1 << 20) {
                let wanted: Vec<usize> = (0..src.total().min(4)).collect();
                let _ = src.read(&wanted, &ip);
            }
        }
    }
}
