//! Pillow-exact resampling of 8-bit RGB images.
//!
//! * Bilinear and bicubic follow Pillow 13's `Resample.c`: a separable convolution whose
//!   per-axis weights are computed in `f64`, normalised to sum 1, then turned into
//!   fixed point with 22 fractional bits. The two passes go through a `u8`
//!   intermediate, so their order matters: horizontal first, except when the height
//!   shrinks by more than twice as many pixels as the width
//!   (`out_h < in_h && in_h - out_h > 2 * (in_w - out_w)`), where Pillow 13 runs the
//!   vertical pass first (Pillow's "resize vertically first" change; the rule was
//!   checked against Pillow 13 on 1,400+ random size pairs, boundary included).
//!   An axis whose size does not change is not resampled at all (Pillow skips that pass
//!   too).
//! * Nearest follows Pillow's affine scale (`Geometry.c`, `ImagingScaleAffine`): the
//!   source coordinate starts at `0.5 * in / out` and is advanced by `in / out` per
//!   output pixel (accumulated, not multiplied), then truncated.
//!
//! The engine computes any rectangular *window* of the resized image, so a resize
//! followed by a center crop only computes the pixels that survive the crop; each
//! output pixel depends only on its own weights, so the window gives bit-identical
//! values. Images are interleaved RGB `u8`, rows top to bottom.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::hpass::{horizontal_strip, StripScratch, STRIP};
use crate::error::{MlmfError, Result};

/// Fractional bits of the fixed-point weights (Pillow: `32 - 8 - 2`).
pub(crate) const PRECISION_BITS: u32 = 22;
/// Rounding term added to every accumulator before the shift.
pub(crate) const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Resampling filter, with the codes of `PIL.Image.Resampling` (used by Hugging Face
/// `preprocessor_config.json` files: `"resample": 3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resample {
    /// PIL code 0.
    Nearest,
    /// PIL code 2.
    Bilinear,
    /// PIL code 3.
    Bicubic,
}

impl Resample {
    /// The filter for a PIL / Hugging Face integer code (0 nearest, 2 bilinear, 3 bicubic).
    pub fn from_pil_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Self::Nearest),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    /// The PIL integer code.
    pub fn pil_code(self) -> u8 {
        match self {
            Self::Nearest => 0,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
        }
    }

    /// Lower-case name (`"bicubic"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nearest => "nearest",
            Self::Bilinear => "bilinear",
            Self::Bicubic => "bicubic",
        }
    }

    fn unsupported(what: &str) -> MlmfError {
        MlmfError::config(
            "resample",
            format!(
                "unsupported resample filter {what}: expected 0/\"nearest\", 2/\"bilinear\" \
                 or 3/\"bicubic\" (PIL codes; lanczos, box and hamming are not implemented)"
            ),
        )
    }
}

impl fmt::Display for Resample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Resample {
    type Err = MlmfError;

    /// Accepts the names (any case, with or without a `PIL.Image.` / `Resampling.`
    /// prefix) and the integer codes written as text.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if let Ok(code) = t.parse::<i64>() {
            return Self::from_pil_code(code).ok_or_else(|| Self::unsupported(&code.to_string()));
        }
        let lower = t.to_ascii_lowercase();
        let name = lower.rsplit('.').next().unwrap_or(&lower);
        match name {
            "nearest" => Ok(Self::Nearest),
            "bilinear" | "linear" => Ok(Self::Bilinear),
            "bicubic" | "cubic" => Ok(Self::Bicubic),
            _ => Err(Self::unsupported(&format!("{s:?}"))),
        }
    }
}

impl Serialize for Resample {
    /// Serialised as the PIL code, as in `preprocessor_config.json`.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u8(self.pil_code())
    }
}

impl<'de> Deserialize<'de> for Resample {
    /// Reads a PIL code or a name.
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(i64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Code(c) => Self::from_pil_code(c)
                .ok_or_else(|| serde::de::Error::custom(Self::unsupported(&c.to_string()))),
            Raw::Name(n) => n.parse().map_err(serde::de::Error::custom),
        }
    }
}

// ---------------------------------------------------------------------------------
// Weights

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Keys cubic with a = -0.5, written with Pillow's operation order.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one axis for a window of output indices.
#[derive(Debug)]
pub(crate) struct Coeffs {
    /// First source index of each output index in the window.
    pub(crate) first: Vec<u32>,
    /// Number of taps of each output index.
    pub(crate) count: Vec<u32>,
    /// Stride of `k` (the largest possible tap count).
    pub(crate) ksize: usize,
    /// `window.len() * ksize` weights, zero beyond `count`.
    pub(crate) k: Vec<i32>,
}

/// The source extent of one axis as Pillow sees it: the box edge is a C `float`.
fn box_extent(in_size: u32) -> f64 {
    f64::from(in_size as f32)
}

impl Coeffs {
    /// Weights for output indices `window` of a resize from `in_size` to `out_size`,
    /// as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` compute them.
    pub(crate) fn new(in_size: u32, out_size: u32, filter: Resample, window: Range<u32>) -> Self {
        let (support0, kernel): (f64, fn(f64) -> f64) = match filter {
            Resample::Bilinear => (1.0, bilinear_filter),
            // Nearest never reaches here; bicubic weights are a harmless fallback.
            Resample::Bicubic | Resample::Nearest => (2.0, bicubic_filter),
        };
        let scale = box_extent(in_size) / f64::from(out_size.max(1));
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = support0 * filterscale;
        let ksize = (support.ceil() as usize) * 2 + 1;
        let n = window.len();
        let mut first = Vec::with_capacity(n);
        let mut count = Vec::with_capacity(n);
        let mut k = vec![0i32; n * ksize];
        let mut w = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        let in_size = i64::from(in_size);
        for (i, xx) in window.enumerate() {
            let center = (f64::from(xx) + 0.5) * scale;
            // C `(int)` truncates toward zero; `as` does the same.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size);
            let taps = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(taps) {
                let v = kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *wx = v;
                ww += v;
            }
            let row = &mut k[i * ksize..(i + 1) * ksize];
            for (dst, &wx) in row.iter_mut().zip(&w[..taps]) {
                let wx = if ww != 0.0 { wx / ww } else { wx };
                let scaled = wx * f64::from(1u32 << PRECISION_BITS);
                *dst = if wx < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            first.push(xmin as u32);
            count.push(taps as u32);
        }
        Self {
            first,
            count,
            ksize,
            k,
        }
    }

    /// The weights of window index `i`.
    pub(crate) fn taps(&self, i: usize) -> (usize, &[i32]) {
        let first = self.first.get(i).copied().unwrap_or(0) as usize;
        let count = self.count.get(i).copied().unwrap_or(0) as usize;
        let k = self
            .k
            .get(i * self.ksize..i * self.ksize + count)
            .unwrap_or(&[]);
        (first, k)
    }

    /// Source indices `[lo, hi)` that the window reads.
    pub(crate) fn source_span(&self) -> Range<usize> {
        let lo = self.first.iter().copied().min().unwrap_or(0) as usize;
        let hi = self
            .first
            .iter()
            .zip(&self.count)
            .map(|(&f, &c)| (f + c) as usize)
            .max()
            .unwrap_or(lo);
        lo..hi.max(lo)
    }
}

#[inline(always)]
pub(crate) fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Columns (bytes) of the vertical pass kept in registers at once.
const VBLOCK: usize = 32;

/// Vertical pass for one output row: `out[j] = clip(sum_t rows[first + t][j] * k[t])`
/// where source row `r` is `base[r * stride + col_off ..][..out.len()]`. Works in blocks
/// of `VBLOCK` bytes so the accumulators stay in registers across all taps; the tail
/// goes through `acc`.
fn vertical_row(
    base: &[u8],
    stride: usize,
    col_off: usize,
    first: usize,
    taps: &[i32],
    acc: &mut [i32],
    out: &mut [u8],
) {
    let n = out.len();
    let row_at = |t: usize| (first + t) * stride + col_off;
    let mut blocks = out.chunks_exact_mut(VBLOCK);
    for (b, dst) in (&mut blocks).enumerate() {
        let j = b * VBLOCK;
        let mut a = [ROUND; VBLOCK];
        for (t, &k) in taps.iter().enumerate() {
            if let Some(src) = base
                .get(row_at(t) + j..)
                .and_then(|r| r.first_chunk::<VBLOCK>())
            {
                for l in 0..VBLOCK {
                    a[l] += i32::from(src[l]) * k;
                }
            }
        }
        for (d, &v) in dst.iter_mut().zip(a.iter()) {
            *d = clip8(v);
        }
    }
    let tail = blocks.into_remainder();
    let (j0, m) = (n - tail.len(), tail.len());
    let acc = &mut acc[..m];
    acc.fill(ROUND);
    for (t, &k) in taps.iter().enumerate() {
        let s = row_at(t) + j0;
        for (a, &p) in acc.iter_mut().zip(base.get(s..s + m).unwrap_or(&[])) {
            *a += i32::from(p) * k;
        }
    }
    for (o, &a) in tail.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

// ---------------------------------------------------------------------------------
// Plans

/// How one axis of a window is produced.
#[derive(Debug, Clone)]
pub(crate) enum AxisPlan {
    /// The axis keeps its size: window index `i` is source index `offset + i`.
    Identity { offset: usize, len: usize },
    /// Nearest neighbour: the source index of each window index (`None`: outside the
    /// source, black as in Pillow).
    Nearest(Arc<Vec<Option<u32>>>),
    /// Filtered with these weights.
    Filter(Arc<AxisKernel>),
}

impl AxisPlan {
    fn len(&self) -> usize {
        match self {
            Self::Identity { len, .. } => *len,
            Self::Nearest(ix) => ix.len(),
            Self::Filter(k) => k.coeffs.first.len(),
        }
    }
}

/// Weights of one axis.
#[derive(Debug)]
pub(crate) struct AxisKernel {
    in_size: u32,
    out_size: u32,
    coeffs: Coeffs,
}

/// Pillow's nearest source indices for window `window` of a resize `in_size -> out_size`.
fn nearest_indices(in_size: u32, out_size: u32, window: Range<u32>) -> Vec<Option<u32>> {
    let a = box_extent(in_size) / f64::from(out_size.max(1));
    let mut xo = a * 0.5;
    let mut out = Vec::with_capacity(window.len());
    for x in 0..window.end {
        if x >= window.start {
            let xin = if xo < 0.0 { -1 } else { xo as i64 };
            out.push((xin >= 0 && xin < i64::from(in_size)).then_some(xin as u32));
        }
        xo += a;
    }
    out
}

/// Key of a cached axis plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AxisKey {
    in_size: u32,
    out_size: u32,
    filter: Resample,
    start: u32,
    end: u32,
}

/// A small cache of axis weights, shared by the items of a batch and across calls
/// (frames of a video and images of a data set usually share their size).
#[derive(Debug, Default)]
pub(crate) struct PlanCache {
    map: RwLock<HashMap<AxisKey, AxisPlan>>,
}

/// Entries kept before the cache is emptied (weights are cheap to rebuild).
const CACHE_CAPACITY: usize = 256;

impl PlanCache {
    /// The plan of one axis: window `window` of a resize `in_size -> out_size`.
    pub(crate) fn axis(
        &self,
        in_size: u32,
        out_size: u32,
        filter: Resample,
        window: Range<u32>,
    ) -> AxisPlan {
        if in_size == out_size {
            return AxisPlan::Identity {
                offset: window.start as usize,
                len: window.len(),
            };
        }
        let key = AxisKey {
            in_size,
            out_size,
            filter,
            start: window.start,
            end: window.end,
        };
        if let Ok(map) = self.map.read() {
            if let Some(p) = map.get(&key) {
                return p.clone();
            }
        }
        let plan = build_axis(in_size, out_size, filter, window);
        if let Ok(mut map) = self.map.write() {
            if map.len() >= CACHE_CAPACITY {
                map.clear();
            }
            map.insert(key, plan.clone());
        }
        plan
    }
}

fn build_axis(in_size: u32, out_size: u32, filter: Resample, window: Range<u32>) -> AxisPlan {
    if in_size == out_size {
        return AxisPlan::Identity {
            offset: window.start as usize,
            len: window.len(),
        };
    }
    match filter {
        Resample::Nearest => {
            AxisPlan::Nearest(Arc::new(nearest_indices(in_size, out_size, window)))
        }
        _ => {
            let coeffs = Coeffs::new(in_size, out_size, filter, window);
            AxisPlan::Filter(Arc::new(AxisKernel {
                in_size,
                out_size,
                coeffs,
            }))
        }
    }
}

/// Reusable per-thread buffers of the engine.
#[derive(Default)]
struct Scratch {
    tmp: Vec<u8>,
    row: Vec<u8>,
    pad: Vec<u8>,
    acc: Vec<i32>,
    strip: StripScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A source image borrowed as interleaved RGB bytes.
#[derive(Clone, Copy)]
pub(crate) struct RgbView<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) width: usize,
    pub(crate) height: usize,
}

impl<'a> RgbView<'a> {
    pub(crate) fn of(img: &'a image::RgbImage) -> Self {
        Self {
            data: img.as_raw(),
            width: img.width() as usize,
            height: img.height() as usize,
        }
    }

    fn stride(&self) -> usize {
        self.width * 3
    }

    /// Row `y` from column `x0`, `n` pixels; empty when out of range.
    fn row(&self, y: usize, x0: usize, n: usize) -> &'a [u8] {
        let s = y * self.stride() + x0 * 3;
        self.data.get(s..s + n * 3).unwrap_or(&[])
    }
}

/// Produces the window described by `h` (columns) and `v` (rows) of a resize of `src`,
/// calling `emit(window_row, rgb_bytes)` once per window row, top to bottom, with
/// `3 * h.len()` interleaved bytes.
pub(crate) fn resample_window(
    src: RgbView<'_>,
    h: &AxisPlan,
    v: &AxisPlan,
    emit: &mut dyn FnMut(usize, &[u8]),
) {
    let (ncols, nrows) = (h.len(), v.len());
    if ncols == 0 || nrows == 0 || src.width == 0 || src.height == 0 {
        return;
    }
    SCRATCH.with(|cell| {
        // A re-entrant call (an `emit` that resamples) gets fresh buffers.
        let mut fresh = Scratch::default();
        let mut guard = cell.try_borrow_mut().ok();
        let scratch = guard.as_deref_mut().unwrap_or(&mut fresh);
        run(src, h, v, ncols, nrows, scratch, emit);
    });
}

fn run(
    src: RgbView<'_>,
    h: &AxisPlan,
    v: &AxisPlan,
    ncols: usize,
    nrows: usize,
    s: &mut Scratch,
    emit: &mut dyn FnMut(usize, &[u8]),
) {
    let wbytes = ncols * 3;
    match (h, v) {
        (AxisPlan::Nearest(_), _) | (_, AxisPlan::Nearest(_)) => {
            let xs = nearest_or_identity(h);
            let ys = nearest_or_identity(v);
            s.row.resize(wbytes, 0);
            for (r, y) in ys.iter().enumerate() {
                match y {
                    Some(y) => {
                        let src_row = src.row(*y as usize, 0, src.width);
                        for (o, x) in s.row.chunks_exact_mut(3).zip(xs.iter()) {
                            let px =
                                x.and_then(|x| src_row.get(x as usize * 3..x as usize * 3 + 3));
                            o.copy_from_slice(px.unwrap_or(&[0, 0, 0]));
                        }
                    }
                    None => s.row.fill(0),
                }
                emit(r, &s.row);
            }
        }
        (AxisPlan::Identity { offset: x0, .. }, AxisPlan::Identity { offset: y0, .. }) => {
            for r in 0..nrows {
                emit(r, src.row(y0 + r, *x0, ncols));
            }
        }
        (AxisPlan::Identity { offset: x0, .. }, AxisPlan::Filter(vk)) => {
            s.acc.resize(wbytes, 0);
            s.row.resize(wbytes, 0);
            for r in 0..nrows {
                let (first, taps) = vk.coeffs.taps(r);
                vertical_row(
                    src.data,
                    src.stride(),
                    x0 * 3,
                    first,
                    taps,
                    &mut s.acc,
                    &mut s.row,
                );
                emit(r, &s.row);
            }
        }
        (AxisPlan::Filter(hk), AxisPlan::Identity { offset: y0, .. }) => {
            s.tmp.resize(STRIP * wbytes, 0);
            for r0 in (0..nrows).step_by(STRIP) {
                let n = STRIP.min(nrows - r0);
                let rows: Vec<&[u8]> = (0..n).map(|l| src.row(y0 + r0 + l, 0, src.width)).collect();
                horizontal_strip(&rows, 0, &hk.coeffs, &mut s.strip, &mut s.tmp, wbytes);
                for (l, row) in s.tmp.chunks_exact(wbytes).take(n).enumerate() {
                    emit(r0 + l, row);
                }
            }
        }
        (AxisPlan::Filter(hk), AxisPlan::Filter(vk)) if vertical_first(hk, vk) => {
            // Per strip of output rows: the vertical pass over the source columns the
            // horizontal windows read, then the horizontal pass over those rows.
            let cols = hk.coeffs.source_span();
            let cbytes = cols.len() * 3;
            s.acc.resize(cbytes, 0);
            s.pad.resize(STRIP * cbytes, 0);
            s.tmp.resize(STRIP * wbytes, 0);
            for r0 in (0..nrows).step_by(STRIP) {
                let n = STRIP.min(nrows - r0);
                for (l, dst) in s.pad.chunks_exact_mut(cbytes).take(n).enumerate() {
                    let (first, taps) = vk.coeffs.taps(r0 + l);
                    vertical_row(
                        src.data,
                        src.stride(),
                        cols.start * 3,
                        first,
                        taps,
                        &mut s.acc,
                        dst,
                    );
                }
                let rows: Vec<&[u8]> = s.pad.chunks_exact(cbytes).take(n).collect();
                horizontal_strip(
                    &rows,
                    cols.start,
                    &hk.coeffs,
                    &mut s.strip,
                    &mut s.tmp,
                    wbytes,
                );
                for (l, row) in s.tmp.chunks_exact(wbytes).take(n).enumerate() {
                    emit(r0 + l, row);
                }
            }
        }
        (AxisPlan::Filter(hk), AxisPlan::Filter(vk)) => {
            // Horizontal pass over every source row the vertical windows read, then the
            // vertical pass.
            let span = vk.coeffs.source_span();
            let rows = span.len();
            s.tmp.resize(rows * wbytes, 0);
            for i0 in (0..rows).step_by(STRIP) {
                let n = STRIP.min(rows - i0);
                let strip: Vec<&[u8]> = (0..n)
                    .map(|l| src.row(span.start + i0 + l, 0, src.width))
                    .collect();
                if let Some(out) = s.tmp.get_mut(i0 * wbytes..) {
                    horizontal_strip(&strip, 0, &hk.coeffs, &mut s.strip, out, wbytes);
                }
            }
            s.acc.resize(wbytes, 0);
            s.row.resize(wbytes, 0);
            for r in 0..nrows {
                let (first, taps) = vk.coeffs.taps(r);
                vertical_row(
                    &s.tmp,
                    wbytes,
                    0,
                    first.saturating_sub(span.start),
                    taps,
                    &mut s.acc,
                    &mut s.row,
                );
                emit(r, &s.row);
            }
        }
    }
}

/// Pillow 13's pass order: vertical first when the height loses more than twice as
/// many pixels as the width.
fn vertical_first(h: &AxisKernel, v: &AxisKernel) -> bool {
    let (iw, ow) = (i64::from(h.in_size), i64::from(h.out_size));
    let (ih, oh) = (i64::from(v.in_size), i64::from(v.out_size));
    oh < ih && ih - oh > 2 * (iw - ow)
}

fn nearest_or_identity(p: &AxisPlan) -> Vec<Option<u32>> {
    match p {
        AxisPlan::Nearest(ix) => ix.as_ref().clone(),
        AxisPlan::Identity { offset, len } => {
            (*offset..offset + len).map(|i| Some(i as u32)).collect()
        }
        // Filters never mix with nearest; reading the window start keeps this total.
        AxisPlan::Filter(k) => k.coeffs.first.iter().map(|&f| Some(f)).collect(),
    }
}

/// Resizes `img` to `width x height` exactly as Pillow's
/// `Image.resize((width, height), resample, reducing_gap=None)` does for an RGB image.
/// A zero target size gives an empty image; an empty source gives a black one.
pub fn resize(img: &image::RgbImage, width: u32, height: u32, filter: Resample) -> image::RgbImage {
    let pixels = resize_view(RgbView::of(img), width, height, filter);
    image::RgbImage::from_raw(width, height, pixels)
        .unwrap_or_else(|| image::RgbImage::new(width, height))
}

/// [`resize`] of borrowed interleaved RGB bytes: `3 * width * height` bytes out.
pub(crate) fn resize_view(src: RgbView<'_>, width: u32, height: u32, filter: Resample) -> Vec<u8> {
    let stride = width as usize * 3;
    let mut out = vec![0u8; stride * height as usize];
    if width == 0 || height == 0 || src.width == 0 || src.height == 0 {
        return out;
    }
    let (iw, ih) = (
        u32::try_from(src.width).unwrap_or(u32::MAX),
        u32::try_from(src.height).unwrap_or(u32::MAX),
    );
    let h = build_axis(iw, width, filter, 0..width);
    let v = build_axis(ih, height, filter, 0..height);
    resample_window(src, &h, &v, &mut |r, row| {
        if let Some(dst) = out.get_mut(r * stride..(r + 1) * stride) {
            dst.copy_from_slice(row);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: u32, h: u32, seed: u64) -> image::RgbImage {
        let mut s = seed;
        image::RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for c in &mut px {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *c = (s >> 56) as u8;
            }
            image::Rgb(px)
        })
    }

    #[test]
    fn fixed_point_weights_sum_to_one() {
        for filter in [Resample::Bilinear, Resample::Bicubic] {
            for (i, o) in [
                (640, 298),
                (298, 640),
                (7, 3),
                (3, 7),
                (1, 224),
                (4000, 224),
            ] {
                let c = Coeffs::new(i, o, filter, 0..o);
                for j in 0..o as usize {
                    let (_, k) = c.taps(j);
                    let sum: i32 = k.iter().sum();
                    // Each weight is rounded on its own: the sum is 2^22 within one unit per tap.
                    assert!(
                        (sum - (1 << 22)).abs() <= k.len() as i32,
                        "{filter} {i}->{o} out {j}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img = noise(37, 23, 1);
        for f in [Resample::Nearest, Resample::Bilinear, Resample::Bicubic] {
            assert_eq!(resize(&img, 37, 23, f), img);
        }
    }

    #[test]
    fn upscale_of_constant_is_constant() {
        let img = image::RgbImage::from_pixel(5, 4, image::Rgb([10, 200, 255]));
        for f in [Resample::Nearest, Resample::Bilinear, Resample::Bicubic] {
            let out = resize(&img, 13, 11, f);
            assert!(out.pixels().all(|p| p.0 == [10, 200, 255]), "{f}");
        }
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        // (in, out, window): the second case takes Pillow's vertical-first order.
        let cases = [
            ((61, 47), (29, 33), (5..20, 3..31)),
            ((20, 90), (18, 30), (2..17, 4..25)),
            ((3, 50), (40, 9), (0..40, 1..8)),
        ];
        for ((iw, ih), (ow, oh), (xs, ys)) in cases {
            let img = noise(iw, ih, 7);
            for f in [Resample::Nearest, Resample::Bilinear, Resample::Bicubic] {
                let full = resize(&img, ow, oh, f);
                let cache = PlanCache::default();
                let h = cache.axis(iw, ow, f, xs.clone());
                let v = cache.axis(ih, oh, f, ys.clone());
                let mut rows = 0;
                resample_window(RgbView::of(&img), &h, &v, &mut |r, row| {
                    rows += 1;
                    for (j, px) in row.chunks_exact(3).enumerate() {
                        let want = full.get_pixel(xs.start + j as u32, ys.start + r as u32).0;
                        assert_eq!(px, &want, "{f} {iw}x{ih}->{ow}x{oh}");
                    }
                });
                assert_eq!(rows, ys.len());
            }
        }
    }

    #[test]
    fn pass_order_changes_rounding() {
        // Pillow 13 runs the vertical pass first here; the other order rounds the
        // intermediate differently, so the two results must not coincide.
        let img = noise(3, 500, 11);
        let direct = resize(&img, 224, 224, Resample::Bicubic);
        let h_then_v = resize(
            &resize(&img, 224, 500, Resample::Bicubic),
            224,
            224,
            Resample::Bicubic,
        );
        let v_then_h = resize(
            &resize(&img, 3, 224, Resample::Bicubic),
            224,
            224,
            Resample::Bicubic,
        );
        assert_eq!(direct, v_then_h);
        assert_ne!(direct, h_then_v);
    }

    #[test]
    fn tiny_and_degenerate_sizes() {
        let img = noise(1, 1, 3);
        let out = resize(&img, 4, 3, Resample::Bicubic);
        assert!(out.pixels().all(|p| p == img.get_pixel(0, 0)));
        assert_eq!(resize(&img, 0, 5, Resample::Bicubic).dimensions(), (0, 5));
        let empty = image::RgbImage::new(0, 0);
        assert_eq!(
            resize(&empty, 2, 2, Resample::Bilinear).dimensions(),
            (2, 2)
        );
    }

    #[test]
    fn resample_codes_and_names() {
        assert_eq!(Resample::from_pil_code(3), Some(Resample::Bicubic));
        assert_eq!(Resample::from_pil_code(1), None);
        assert_eq!("BILINEAR".parse::<Resample>().unwrap(), Resample::Bilinear);
        assert_eq!(
            "Resampling.NEAREST".parse::<Resample>().unwrap(),
            Resample::Nearest
        );
        assert_eq!("3".parse::<Resample>().unwrap(), Resample::Bicubic);
        let err = "lanczos".parse::<Resample>().unwrap_err().to_string();
        assert!(
            err.contains("`resample`") && err.contains("bicubic"),
            "{err}"
        );
        let r: Resample = serde_json::from_str("2").unwrap();
        assert_eq!(r, Resample::Bilinear);
        assert_eq!(serde_json::to_string(&Resample::Bicubic).unwrap(), "3");
        assert!(serde_json::from_str::<Resample>("5").is_err());
    }
}
