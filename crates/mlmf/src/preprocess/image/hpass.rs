//! The horizontal pass of the resampler, eight rows at a time.
//!
//! A horizontal output pixel is a dot product along a row, and interleaved RGB makes a
//! poor SIMD layout for that (one pixel's three channels and its few taps do not fill a
//! vector, and every pixel ends in a horizontal reduction). So the pass works on strips
//! of [`STRIP`] rows: the strip is transposed so that the eight rows' values of one
//! source byte (column and channel) sit next to each other, every output column is then
//! computed for the eight rows at once exactly like the vertical pass (one weight times
//! 24 bytes: three channels by eight rows, no reduction), and the result is transposed
//! back into rows. The transposes are 8x8 byte blocks (three rounds of unpacks on
//! x86_64). The integer arithmetic is Pillow's, so the result is bit-identical to a
//! pixel-by-pixel pass.

#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "avx2"),
    allow(unused_imports)
)]
use super::resize::{clip8, Coeffs, ROUND};

/// Rows handled together.
pub(crate) const STRIP: usize = 8;
/// Bytes of one source column (or output column) in the transposed layout: 3 channels
/// by `STRIP` rows.
const COLUMN: usize = 3 * STRIP;

/// Reusable buffers of [`horizontal_strip`].
#[derive(Default)]
pub(crate) struct StripScratch {
    /// The strip's source columns, transposed: `t[(x * 3 + c) * STRIP + row]`.
    t: Vec<u8>,
    /// The output columns in the same layout.
    u: Vec<u8>,
    /// Zeros standing in for missing rows.
    zeros: Vec<u8>,
}

/// Horizontal pass of up to [`STRIP`] rows.
///
/// `rows[l]` is source row `l`, starting at source column `col0` (byte `3 * col0` of the
/// image row); it must cover the source columns `c` reads (`c.source_span()`).
/// Output row `l` (`3 * c.first.len()` bytes) goes to
/// `out[l * out_stride..][..3 * c.first.len()]`. Rows missing from `rows` read as black
/// and are not written; so are rows that are too short or do not fit in `out`.
pub(crate) fn horizontal_strip(
    rows: &[&[u8]],
    col0: usize,
    c: &Coeffs,
    s: &mut StripScratch,
    out: &mut [u8],
    out_stride: usize,
) {
    let span = c.source_span();
    let ncols = c.first.len();
    if ncols == 0 || span.is_empty() || rows.is_empty() || span.start < col0 {
        return;
    }
    let lo = span.start;
    let in_bytes = span.len() * 3;
    let off = (lo - col0) * 3;

    // Forward transpose of the bytes the windows read. Missing rows read as zeros.
    if s.zeros.len() < in_bytes {
        s.zeros.resize(in_bytes, 0);
    }
    let src: [&[u8]; STRIP] = std::array::from_fn(|l| {
        rows.get(l)
            .and_then(|r| r.get(off..off + in_bytes))
            .unwrap_or(&s.zeros[..in_bytes])
    });
    grow(&mut s.t, in_bytes.next_multiple_of(8) * STRIP);
    rows_to_columns(&src, in_bytes, &mut s.t);

    // Every output column for the eight rows at once.
    let out_bytes = ncols * 3;
    grow(&mut s.u, out_bytes.next_multiple_of(8) * STRIP);
    let (t_cols, _) = s.t.as_chunks::<COLUMN>();
    let (u_cols, _) = s.u.as_chunks_mut::<COLUMN>();
    for (j, dst) in u_cols.iter_mut().take(ncols).enumerate() {
        let (first, taps) = c.taps(j);
        let base = first.saturating_sub(lo);
        let Some(window) = t_cols.get(base..base + taps.len()) else {
            continue;
        };
        column(window, taps, dst);
    }

    // Back into rows.
    let mut dst: Vec<&mut [u8]> = out
        .chunks_mut(out_stride.max(1))
        .take(rows.len().min(STRIP))
        .filter_map(|r| r.get_mut(..out_bytes))
        .collect();
    columns_to_rows(&s.u, out_bytes, &mut dst);
}

/// One output column for the strip's rows: `dst[i] = clip(sum_t window[t][i] * taps[t])`.
#[inline(always)]
fn column(window: &[[u8; COLUMN]], taps: &[i32], dst: &mut [u8; COLUMN]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        avx2::column(window, taps, dst);
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        column_scalar(window, taps, dst);
    }
}

/// The portable column (also the reference the AVX2 path is tested against).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn column_scalar(window: &[[u8; COLUMN]], taps: &[i32], dst: &mut [u8; COLUMN]) {
    let mut acc = [ROUND; COLUMN];
    for (src, &k) in window.iter().zip(taps) {
        for (a, &p) in acc.iter_mut().zip(src) {
            *a += i32::from(p) * k;
        }
    }
    for (d, &a) in dst.iter_mut().zip(&acc) {
        *d = clip8(a);
    }
}

/// The column with AVX2 (part of the x86-64-v3 baseline the crate is built for),
/// written out because LLVM vectorises the portable loop across taps (gathering bytes)
/// instead of across the 24 lanes. Same integer arithmetic; `packs`/`packus` saturate
/// exactly like `clip8`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, _mm256_add_epi32, _mm256_castsi256_si128, _mm256_cvtepu8_epi32,
        _mm256_extracti128_si256, _mm256_mullo_epi32, _mm256_set1_epi32, _mm256_srai_epi32,
        _mm_loadl_epi64, _mm_packs_epi32, _mm_packus_epi16, _mm_storel_epi64,
    };

    use super::super::resize::{PRECISION_BITS, ROUND};
    use super::COLUMN;

    #[inline(always)]
    pub(super) fn column(window: &[[u8; COLUMN]], taps: &[i32], dst: &mut [u8; COLUMN]) {
        // SAFETY: AVX2 is enabled for this build (cfg on the module). Loads read bytes
        // `8c..8c + 8` (c < 3) of a 24-byte array; stores write bytes `8c..8c + 8` of
        // the 24-byte `dst`. Unaligned forms throughout.
        unsafe {
            let round = _mm256_set1_epi32(ROUND);
            let mut acc = [round; 3];
            for (src, &k) in window.iter().zip(taps) {
                let k = _mm256_set1_epi32(k);
                for (c, a) in acc.iter_mut().enumerate() {
                    let p = _mm_loadl_epi64(src.as_ptr().add(8 * c).cast::<__m128i>());
                    *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(p), k));
                }
            }
            for (c, a) in acc.iter().enumerate() {
                let v = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(*a);
                let w =
                    _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let b = _mm_packus_epi16(w, w);
                _mm_storel_epi64(dst.as_mut_ptr().add(8 * c).cast::<__m128i>(), b);
            }
        }
    }
}

/// Makes `v` at least `n` long (new bytes zero; old contents are overwritten anyway).
fn grow(v: &mut Vec<u8>, n: usize) {
    if v.len() < n {
        v.resize(n, 0);
    }
}

/// `t[b * STRIP + l] = src[l][b]` for `b < n` (every `src[l]` holds `n` bytes).
fn rows_to_columns(src: &[&[u8]; STRIP], n: usize, t: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if src.iter().all(|r| r.len() >= n) && t.len() >= n * STRIP {
        done = n / 16 * 16;
        // SAFETY: every row holds at least `done` bytes and `t` at least
        // `done * STRIP`, checked just above.
        unsafe { sse2::rows_to_columns16(src, done, t) };
    }
    let full = n / 8;
    let (blocks, _) = t.as_chunks_mut::<64>();
    for (k, dst) in blocks.iter_mut().take(full).enumerate().skip(done / 8) {
        let m: [&[u8; 8]; 8] = std::array::from_fn(|l| {
            src[l]
                .get(8 * k..)
                .and_then(|r| r.first_chunk::<8>())
                .unwrap_or(&[0; 8])
        });
        transpose8x8(&m, dst);
    }
    for b in full * 8..n {
        for (l, row) in src.iter().enumerate() {
            if let (Some(d), Some(&v)) = (t.get_mut(b * STRIP + l), row.get(b)) {
                *d = v;
            }
        }
    }
}

/// `dst[l][b] = u[b * STRIP + l]` for `b < n` and the rows present in `dst`.
fn columns_to_rows(u: &[u8], n: usize, dst: &mut [&mut [u8]]) {
    let full = n / 8;
    let (blocks, _) = u.as_chunks::<64>();
    let mut tile = [0u8; 64];
    for (k, blk) in blocks.iter().take(full).enumerate() {
        let m: [&[u8; 8]; 8] =
            std::array::from_fn(|i| blk[8 * i..].first_chunk::<8>().unwrap_or(&[0; 8]));
        transpose8x8(&m, &mut tile);
        for (row, t) in dst.iter_mut().zip(tile.chunks_exact(8)) {
            if let Some(d) = row.get_mut(8 * k..8 * k + 8) {
                d.copy_from_slice(t);
            }
        }
    }
    for b in full * 8..n {
        for (l, row) in dst.iter_mut().enumerate() {
            if let (Some(d), Some(&v)) = (row.get_mut(b), u.get(b * STRIP + l)) {
                *d = v;
            }
        }
    }
}

/// `out[8 * i + j] = m[j][i]` for an 8x8 byte matrix given by its rows.
#[inline(always)]
fn transpose8x8(m: &[&[u8; 8]; 8], out: &mut [u8; 64]) {
    #[cfg(target_arch = "x86_64")]
    {
        sse2::transpose8x8(m, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        transpose8x8_scalar(m, out);
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn transpose8x8_scalar(m: &[&[u8; 8]; 8], out: &mut [u8; 64]) {
    for (i, o) in out.chunks_exact_mut(8).enumerate() {
        for (j, v) in o.iter_mut().enumerate() {
            *v = m[j][i];
        }
    }
}

/// SSE2 (part of every x86_64 target) transpose: bytes, then 16-bit, then 32-bit
/// unpacks.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_loadl_epi64, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpackhi_epi8, _mm_unpacklo_epi16, _mm_unpacklo_epi32,
        _mm_unpacklo_epi8,
    };

    use super::STRIP;

    /// [`super::rows_to_columns`] for the first `n` bytes (`n` a multiple of 16), 16
    /// bytes of every row per step.
    ///
    /// # Safety
    /// Every `src[l]` must hold at least `n` bytes and `t` at least `n * STRIP`.
    pub(super) unsafe fn rows_to_columns16(src: &[&[u8]; STRIP], n: usize, t: &mut [u8]) {
        let p: [*const u8; STRIP] = std::array::from_fn(|l| src[l].as_ptr());
        let out = t.as_mut_ptr();
        for b in (0..n).step_by(16) {
            // SAFETY: `b + 16 <= n`, so the loads stay inside the rows and the 128
            // bytes stored from `b * STRIP` inside `t` (caller's contract).
            unsafe {
                let r: [__m128i; 8] =
                    std::array::from_fn(|l| _mm_loadu_si128(p[l].add(b).cast::<__m128i>()));
                let a = [
                    _mm_unpacklo_epi8(r[0], r[1]),
                    _mm_unpacklo_epi8(r[2], r[3]),
                    _mm_unpacklo_epi8(r[4], r[5]),
                    _mm_unpacklo_epi8(r[6], r[7]),
                    _mm_unpackhi_epi8(r[0], r[1]),
                    _mm_unpackhi_epi8(r[2], r[3]),
                    _mm_unpackhi_epi8(r[4], r[5]),
                    _mm_unpackhi_epi8(r[6], r[7]),
                ];
                for h in 0..2 {
                    let pairs = [a[4 * h], a[4 * h + 1], a[4 * h + 2], a[4 * h + 3]];
                    store_columns(pairs, out.add((b + 8 * h) * STRIP));
                }
            }
        }
    }

    #[inline(always)]
    pub(super) fn transpose8x8(m: &[&[u8; 8]; 8], out: &mut [u8; 64]) {
        // SAFETY: SSE2 is part of the x86_64 baseline. Each load reads the 8 bytes of
        // one `[u8; 8]` row; store `k` writes bytes `16k..16k + 16` of the 64-byte
        // `out` (`k < 4`). Unaligned forms throughout.
        unsafe {
            let r: [__m128i; 8] =
                std::array::from_fn(|i| _mm_loadl_epi64(m[i].as_ptr().cast::<__m128i>()));
            // Rows 2k and 2k+1 interleaved by byte.
            let pairs = [
                _mm_unpacklo_epi8(r[0], r[1]),
                _mm_unpacklo_epi8(r[2], r[3]),
                _mm_unpacklo_epi8(r[4], r[5]),
                _mm_unpacklo_epi8(r[6], r[7]),
            ];
            store_columns(pairs, out.as_mut_ptr());
        }
    }

    /// The last two rounds of an 8x8 transpose: from four registers holding rows
    /// `2k, 2k+1` interleaved by byte (eight columns), writes the eight columns (8 bytes
    /// each, rows in order) to `out[0..64]`.
    ///
    /// # Safety
    /// `out` must be valid for 64 bytes of writes.
    #[inline(always)]
    unsafe fn store_columns(a: [__m128i; 4], out: *mut u8) {
        // SAFETY: register-only SSE2 operations, then four 16-byte unaligned stores
        // inside the 64 bytes the caller guarantees.
        unsafe {
            // Columns 0-3 / 4-7 of rows 0-3 and 4-7, four bytes per column.
            let b0 = _mm_unpacklo_epi16(a[0], a[1]);
            let b1 = _mm_unpackhi_epi16(a[0], a[1]);
            let b2 = _mm_unpacklo_epi16(a[2], a[3]);
            let b3 = _mm_unpackhi_epi16(a[2], a[3]);
            // Two whole columns (8 bytes each) per register.
            let c = [
                _mm_unpacklo_epi32(b0, b2),
                _mm_unpackhi_epi32(b0, b2),
                _mm_unpacklo_epi32(b1, b3),
                _mm_unpackhi_epi32(b1, b3),
            ];
            for (k, v) in c.iter().enumerate() {
                _mm_storeu_si128(out.add(16 * k).cast::<__m128i>(), *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::image::resize::Resample;

    #[test]
    fn transpose_matches_scalar() {
        let rows: [[u8; 8]; 8] =
            std::array::from_fn(|i| std::array::from_fn(|j| (i * 8 + j) as u8));
        let m: [&[u8; 8]; 8] = std::array::from_fn(|i| &rows[i]);
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        transpose8x8(&m, &mut a);
        transpose8x8_scalar(&m, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[8], 1);
        assert_eq!(a[1], 8);
    }

    #[test]
    fn simd_column_matches_scalar() {
        let window: Vec<[u8; COLUMN]> = (0..13)
            .map(|t| std::array::from_fn(|i| ((t * 37 + i * 11) % 256) as u8))
            .collect();
        let taps: Vec<i32> = (0..13).map(|t| (t * 7919 % 800_000) - 300_000).collect();
        let (mut a, mut b) = ([0u8; COLUMN], [0u8; COLUMN]);
        column(&window, &taps, &mut a);
        column_scalar(&window, &taps, &mut b);
        assert_eq!(a, b);
        // Saturation at both ends.
        let white = vec![[255u8; COLUMN]; 4];
        column(&white, &[1 << 22; 2], &mut a);
        assert_eq!(a, [255; COLUMN]);
        column(&white, &[-(1 << 22); 2], &mut a);
        assert_eq!(a, [0; COLUMN]);
    }

    /// Pixel-by-pixel horizontal pass, the definition.
    fn reference(row: &[u8], c: &Coeffs) -> Vec<u8> {
        let mut out = Vec::new();
        for j in 0..c.first.len() {
            let (first, taps) = c.taps(j);
            for ch in 0..3 {
                let mut acc = ROUND;
                for (t, &k) in taps.iter().enumerate() {
                    acc += i32::from(row[(first + t) * 3 + ch]) * k;
                }
                out.push(clip8(acc));
            }
        }
        out
    }

    #[test]
    fn strips_equal_the_pixelwise_pass() {
        let mut seed = 12345u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        };
        for &(w, ow, rows, filter) in &[
            (640usize, 298u32, 8usize, Resample::Bicubic),
            (641, 224, 5, Resample::Bilinear),
            (37, 100, 3, Resample::Bicubic),
            (4000, 224, 8, Resample::Bicubic),
            (3, 1, 1, Resample::Bicubic),
            (9, 7, 8, Resample::Bilinear),
        ] {
            let img: Vec<Vec<u8>> = (0..rows)
                .map(|_| (0..w * 3).map(|_| next()).collect())
                .collect();
            for window in [0..ow, ow / 3..ow - ow / 4] {
                let c = Coeffs::new(w as u32, ow, filter, window.clone());
                let refs: Vec<&[u8]> = img.iter().map(Vec::as_slice).collect();
                let wbytes = window.len() * 3;
                let mut out = vec![0u8; rows * wbytes];
                horizontal_strip(&refs, 0, &c, &mut StripScratch::default(), &mut out, wbytes);
                for (l, row) in img.iter().enumerate() {
                    assert_eq!(
                        &out[l * wbytes..(l + 1) * wbytes],
                        reference(row, &c).as_slice(),
                        "{w}->{ow} window {window:?} row {l}"
                    );
                }
                // Rows given from a later start column read the same pixels.
                let lo = c.source_span().start;
                let shifted: Vec<&[u8]> = img.iter().map(|r| &r[lo * 3..]).collect();
                let mut out2 = vec![0u8; rows * wbytes];
                horizontal_strip(
                    &shifted,
                    lo,
                    &c,
                    &mut StripScratch::default(),
                    &mut out2,
                    wbytes,
                );
                assert_eq!(out, out2);
            }
        }
    }
}
