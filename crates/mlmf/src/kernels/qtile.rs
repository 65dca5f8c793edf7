//! The int8 register tiles under [`super::int8`], reading the quantised activations in
//! place and weights packed once at load.
//!
//! Weights are kept as 16-column panels of 4-deep groups ([`QPanels`]): for each panel
//! and each four consecutive inner indices, one 64-byte line holding the four codes of
//! column 0, then the four of column 1, and so on. A row of quantised activations
//! supplies the same four bytes to every column, as one broadcast 32-bit value, so the
//! activations need no packing: the tile reads them where [`super::int8`] quantised
//! them.
//!
//! Two tiles, chosen at run time:
//!
//! - **AVX-512 VNNI**: `vpdpbusd` multiplies four `u8 x i8` pairs and adds them to a
//!   32-bit lane in one instruction; the tile is up to 8 rows by 32 columns (two
//!   panels, 16 accumulators of the 32 registers).
//! - **AVX2** (every x86-64-v3 CPU): `vpmaddubsw` adds two `u8 x i8` products in 16
//!   bits, `vpmaddwd` against ones adds the pairs into 32 bits; the tile is up to 4
//!   rows by 16 columns (8 accumulators of the 16 registers). The 16-bit pair sums
//!   saturate past 32767, which 7-bit weights rule out (`63 * 255 * 2 = 32130`).
//!
//! Both give the exact integer product, so results do not depend on the CPU. The tile
//! then turns its accumulators into float32 (subtracting the activations' zero point
//! times each column's code sum, times the row and column scales, plus the bias, added
//! to the destination when accumulating), so no 32-bit intermediate matrix is written.
//! Where neither tile is available (other architectures) [`super::int8`] uses
//! `rten-gemm`.

use rayon::prelude::*;

/// Columns per panel.
pub(crate) const NR: usize = 16;
/// Inner indices per group: one 32-bit broadcast of activations.
pub(crate) const GROUP: usize = 4;
/// The activations' zero point: codes are `0..=255` around 128 ([`super::int8`]).
pub(crate) const ZERO_POINT: i32 = 128;

/// Rows per block: a block's activations (`MC x k` bytes; 3072-long rows: 384 KB at
/// most) stay in the L2 cache while every panel of the task passes.
const MC: usize = 96;

/// The tile this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F + BW + VNNI, 8 x 32 tiles.
    Vnni512,
    /// AVX2, 4 x 16 tiles.
    Avx2,
}

/// The environment variable that narrows the choice of kernel, to compare them on one
/// machine: `avx2` (the AVX2 tile even where AVX-512 VNNI is present) or `generic`
/// (`rten-gemm`'s kernels); unset or anything else: the best this CPU has.
pub(crate) const KERNEL_ENV: &str = "MLMF_INT8_KERNEL";

/// The tile this process runs, chosen once: the best this CPU has (or what
/// [`KERNEL_ENV`] narrows it to); `None` where there is none (then [`super::int8`]
/// uses `rten-gemm`). Weights are packed for the choice at load.
pub(crate) fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| match std::env::var(KERNEL_ENV).as_deref() {
        Ok("generic") => None,
        Ok("avx2") => Some(Isa::Avx2).filter(|&i| supports(i)),
        _ => [Isa::Vnni512, Isa::Avx2].into_iter().find(|&i| supports(i)),
    })
}

/// Whether this CPU supports `isa`.
pub(crate) fn supports(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Vnni512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// One group of one panel: 16 columns x 4 inner indices, 64-byte aligned (one cache
/// line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; NR * GROUP]);

/// `W^T` (`[k, n]`) as int8 panels of 4-deep groups (see the module docs), with each
/// column's code sum times the activations' zero point. Columns past `n` (to a whole
/// panel) and inner indices past `k` (to a whole group) are zero codes.
pub(crate) struct QPanels {
    k: usize,
    n: usize,
    groups: usize,
    lines: Vec<Line>,
    /// `ZERO_POINT * sum_l codes[l][j]`, padded to whole panels.
    corr: Vec<i32>,
}

impl QPanels {
    /// Packs codes `[k, n]` (row-major `W^T`).
    pub(crate) fn pack(codes: &[i8], k: usize, n: usize) -> Self {
        assert_eq!(codes.len(), k * n);
        let groups = k.div_ceil(GROUP);
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0; NR * GROUP]); panels * groups];
        lines
            .par_chunks_mut(groups.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for (g, line) in panel.iter_mut().enumerate() {
                    for t in 0..GROUP {
                        let l = g * GROUP + t;
                        if l >= k {
                            break;
                        }
                        let row = &codes[l * n..(l + 1) * n];
                        for c in 0..NR.min(n.saturating_sub(p * NR)) {
                            line.0[c * GROUP + t] = row[p * NR + c];
                        }
                    }
                }
            });
        let mut corr = vec![0i32; panels * NR];
        for row in codes.chunks_exact(n.max(1)) {
            for (s, &q) in corr.iter_mut().zip(row) {
                *s += i32::from(q);
            }
        }
        corr.iter_mut().for_each(|s| *s *= ZERO_POINT);
        Self {
            k,
            n,
            groups,
            lines,
            corr,
        }
    }

    /// Bytes held (codes and column sums).
    pub(crate) fn bytes(&self) -> usize {
        self.lines.len() * NR * GROUP + 4 * self.corr.len()
    }

    /// `k` rounded up to a whole group: the row stride the activations are quantised
    /// with (the padding bytes meet zero codes).
    pub(crate) fn padded_k(&self) -> usize {
        self.groups * GROUP
    }
}

/// The float32 side of a product: row scales, column scales (padded to whole panels),
/// bias and whether to add to the destination.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    /// One scale per row of the activations.
    pub(crate) row_scales: &'a [f32],
    /// One scale per column of the weight, at least to the last whole panel.
    pub(crate) col_scales: &'a [f32],
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) accumulate: bool,
    pub(crate) act: Option<super::Activation>,
}

/// `dst[0..m, 0..cols.len()] (+)= act(dequant(xq[0..m] · W^T[:, cols]) + bias[cols])`.
///
/// `xq` holds `m` rows of quantised activations, row stride `xq_rs >= w.padded_k()`
/// (padding bytes may hold anything: they meet zero codes); `cols` starts on a panel
/// boundary. The epilogue's scales and bias are indexed by weight column; its row
/// scales by row (from 0).
///
/// # Safety
/// `dst` must address `m` rows of `cols.len()` values (row stride `dst_rs`) that no one
/// else touches meanwhile; `isa` must be supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    isa: Isa,
    w: &QPanels,
    cols: std::ops::Range<usize>,
    xq: &[u8],
    xq_rs: usize,
    m: usize,
    epi: Epilogue<'_>,
    dst: *mut f32,
    dst_rs: usize,
) {
    debug_assert!(cols.start.is_multiple_of(NR) && cols.end <= w.n);
    debug_assert!(xq_rs >= w.padded_k() && xq.len() >= (m.max(1) - 1) * xq_rs + w.padded_k());
    debug_assert!(epi.row_scales.len() >= m && epi.col_scales.len() >= cols.end);
    debug_assert!(w.k <= w.padded_k());
    #[cfg(target_arch = "x86_64")]
    for r0 in (0..m).step_by(MC) {
        let rows = MC.min(m - r0);
        let block = Block {
            w,
            xq: xq.as_ptr().add(r0 * xq_rs),
            xq_rs,
            rows,
            row_scales: &epi.row_scales[r0..],
            epi,
            dst: dst.add(r0 * dst_rs),
            dst_rs,
        };
        match isa {
            Isa::Vnni512 => block.run::<8, 2>(cols.clone(), x86::vnni_tile),
            Isa::Avx2 => block.run::<4, 1>(cols.clone(), x86::avx2_tile),
        }
        if let Some(act) = epi.act {
            for i in 0..rows {
                let row = std::slice::from_raw_parts_mut(dst.add((r0 + i) * dst_rs), cols.len());
                act.apply_slice(row);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, w, cols, xq, xq_rs, m, epi, dst, dst_rs);
        unreachable!("qtile::product without an x86 tile");
    }
}

/// Where a tile reads and writes: its activations (`rows` of them, stride `a_rs`), its
/// first panel's lines (`panel_stride` lines between panels), the lines to prefetch
/// (null for none), the column sums, column scales and bias (null for none) at its
/// first column, its row scales, and its destination.
#[derive(Clone, Copy)]
struct TileArgs {
    a: *const u8,
    a_rs: usize,
    groups: usize,
    b: *const Line,
    pf: *const Line,
    corr: *const i32,
    col_scales: *const f32,
    bias: *const f32,
    row_scales: *const f32,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
}

/// A tile: `R` rows by `P` panels; `PF` prefetches as it goes.
type Tile = unsafe fn(TileArgs, usize, usize, bool);

/// One block of rows of [`product`].
struct Block<'a> {
    w: &'a QPanels,
    xq: *const u8,
    xq_rs: usize,
    rows: usize,
    row_scales: &'a [f32],
    epi: Epilogue<'a>,
    dst: *mut f32,
    dst_rs: usize,
}

impl Block<'_> {
    /// Panels `P` at a time (then one at a time), rows in tiles of as equal a height
    /// as allows at most `MR` (a tile of few rows has too few accumulators to cover
    /// the instruction latency); the first row tile on each panel step prefetches the
    /// next step's panels.
    unsafe fn run<const MR: usize, const P: usize>(
        &self,
        cols: std::ops::Range<usize>,
        tile: Tile,
    ) {
        const { assert!(MR <= 8, "the temporary for a ragged panel holds 8 rows") };
        let w = self.w;
        let tiles = self.rows.div_ceil(MR);
        let (base, extra) = (self.rows / tiles, self.rows % tiles);
        // Steps: (first column, panels); the ragged last panel is a step of its own.
        let whole_end = cols.start + (cols.end - cols.start) / NR * NR;
        let mut steps = Vec::new();
        let mut c0 = cols.start;
        while c0 < whole_end {
            let p = P.min((whole_end - c0) / NR);
            steps.push((c0, p));
            c0 += p * NR;
        }
        if whole_end < cols.end {
            steps.push((whole_end, 1));
        }
        let zero_bias = [0f32; NR];
        let mut tmp = [0f32; NR * 8];
        for (s, &(c0, panels)) in steps.iter().enumerate() {
            let ragged = c0 + NR > cols.end;
            let next = steps.get(s + 1).map_or(std::ptr::null(), |&(c, _)| {
                w.lines.as_ptr().add(c / NR * w.groups)
            });
            let mut r0 = 0;
            for t in 0..tiles {
                let rows = base + usize::from(t < extra);
                let mut args = TileArgs {
                    a: self.xq.add(r0 * self.xq_rs),
                    a_rs: self.xq_rs,
                    groups: w.groups,
                    b: w.lines.as_ptr().add(c0 / NR * w.groups),
                    pf: if r0 == 0 { next } else { std::ptr::null() },
                    corr: w.corr.as_ptr().add(c0),
                    col_scales: self.epi.col_scales.as_ptr().add(c0),
                    bias: self
                        .epi
                        .bias
                        .map_or(std::ptr::null(), |b| b.as_ptr().add(c0)),
                    row_scales: self.row_scales.as_ptr().add(r0),
                    c: self.dst.add(r0 * self.dst_rs + (c0 - cols.start)),
                    c_rs: self.dst_rs,
                    accumulate: self.epi.accumulate,
                };
                if ragged {
                    // A panel past the weight's last column: the tile writes a
                    // temporary, whose valid columns are then added to the destination.
                    args.bias = zero_bias.as_ptr();
                    args.c = tmp.as_mut_ptr();
                    args.c_rs = NR;
                    args.accumulate = false;
                }
                tile(args, rows, panels, !args.pf.is_null());
                if ragged {
                    let width = cols.end - c0;
                    for i in 0..rows {
                        let d = std::slice::from_raw_parts_mut(
                            self.dst.add((r0 + i) * self.dst_rs + (c0 - cols.start)),
                            width,
                        );
                        for (j, (o, v)) in d.iter_mut().zip(&tmp[i * NR..]).enumerate() {
                            let v = v + self.epi.bias.map_or(0.0, |b| b[c0 + j]);
                            *o = if self.epi.accumulate { *o + v } else { v };
                        }
                    }
                }
                r0 += rows;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Line, TileArgs};

    /// Dispatches a run-time row count and prefetch flag to the tile monomorphised for
    /// them and for `P` panels.
    macro_rules! dispatch {
        ($f:ident, $p:literal, $args:expr, $rows:expr, $pf:expr, [$($r:literal),*]) => {
            match ($rows, $pf) {
                $(
                    ($r, true) => $f::<$r, $p, true>($args),
                    ($r, false) => $f::<$r, $p, false>($args),
                )*
                _ => unreachable!("tile of {} rows", $rows),
            }
        };
    }

    /// The AVX-512 VNNI tile (`rows <= 8`, `panels <= 2`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `args` as [`TileArgs`] describes.
    pub(super) unsafe fn vnni_tile(args: TileArgs, rows: usize, panels: usize, pf: bool) {
        if panels == 2 {
            dispatch!(vnni, 2, args, rows, pf, [1, 2, 3, 4, 5, 6, 7, 8])
        } else {
            dispatch!(vnni, 1, args, rows, pf, [1, 2, 3, 4, 5, 6, 7, 8])
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni<const R: usize, const P: usize, const PF: bool>(t: TileArgs) {
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for g in 0..t.groups {
            if PF {
                for p in 0..P {
                    _mm_prefetch::<_MM_HINT_T1>(t.pf.add(p * t.groups + g).cast());
                }
            }
            let mut w = [_mm512_setzero_si512(); P];
            for (p, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_si512(t.b.add(p * t.groups + g).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av =
                    _mm512_set1_epi32(t.a.add(r * t.a_rs + 4 * g).cast::<i32>().read_unaligned());
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_dpbusd_epi32(*a, av, *w);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(*t.row_scales.add(r));
            for (p, a) in acc.iter().enumerate() {
                let j = p * 16;
                let v = _mm512_sub_epi32(*a, _mm512_loadu_si512(t.corr.add(j).cast()));
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
                let cs = _mm512_loadu_ps(t.col_scales.add(j));
                let mut o = if t.bias.is_null() {
                    _mm512_mul_ps(f, cs)
                } else {
                    _mm512_fmadd_ps(f, cs, _mm512_loadu_ps(t.bias.add(j)))
                };
                let cp = t.c.add(r * t.c_rs + j);
                if t.accumulate {
                    o = _mm512_add_ps(o, _mm512_loadu_ps(cp));
                }
                _mm512_storeu_ps(cp, o);
            }
        }
    }

    /// The AVX2 tile (`rows <= 4`, one panel).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `args` as [`TileArgs`] describes.
    pub(super) unsafe fn avx2_tile(args: TileArgs, rows: usize, panels: usize, pf: bool) {
        debug_assert_eq!(panels, 1);
        dispatch!(avx2, 1, args, rows, pf, [1, 2, 3, 4])
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const R: usize, const P: usize, const PF: bool>(t: TileArgs) {
        const { assert!(P == 1) };
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..t.groups {
            let line: *const Line = t.b.add(g);
            if PF {
                _mm_prefetch::<_MM_HINT_T1>(t.pf.add(g).cast());
            }
            let w0 = _mm256_load_si256(line.cast());
            let w1 = _mm256_load_si256(line.cast::<__m256i>().add(1));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av =
                    _mm256_set1_epi32(t.a.add(r * t.a_rs + 4 * g).cast::<i32>().read_unaligned());
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones);
                acc[0] = _mm256_add_epi32(acc[0], p0);
                acc[1] = _mm256_add_epi32(acc[1], p1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm256_set1_ps(*t.row_scales.add(r));
            for (h, a) in acc.iter().enumerate() {
                let j = h * 8;
                let v = _mm256_sub_epi32(*a, _mm256_loadu_si256(t.corr.add(j).cast()));
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
                let cs = _mm256_loadu_ps(t.col_scales.add(j));
                let mut o = if t.bias.is_null() {
                    _mm256_mul_ps(f, cs)
                } else {
                    _mm256_fmadd_ps(f, cs, _mm256_loadu_ps(t.bias.add(j)))
                };
                let cp = t.c.add(r * t.c_rs + j);
                if t.accumulate {
                    o = _mm256_add_ps(o, _mm256_loadu_ps(cp));
                }
                _mm256_storeu_ps(cp, o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_codes(len: usize, seed: usize, max: i32) -> Vec<i8> {
        (0..len)
            .map(|i| ((((i + seed) * 2_654_435_761) % (2 * max as usize + 1)) as i32 - max) as i8)
            .collect()
    }

    #[test]
    fn packing_places_each_code_and_column_sum() {
        let (k, n) = (7, 19);
        let codes = pseudo_codes(k * n, 1, 63);
        let p = QPanels::pack(&codes, k, n);
        assert_eq!((p.groups, p.padded_k()), (2, 8));
        for l in 0..8 {
            for j in 0..32 {
                let line = &p.lines[j / NR * p.groups + l / GROUP];
                let got = line.0[(j % NR) * GROUP + l % GROUP];
                let want = if l < k && j < n { codes[l * n + j] } else { 0 };
                assert_eq!(got, want, "({l}, {j})");
            }
        }
        for j in 0..32 {
            let sum: i32 = (0..k)
                .filter(|_| j < n)
                .map(|l| i32::from(codes[l * n + j]))
                .sum();
            assert_eq!(p.corr[j], ZERO_POINT * sum);
        }
    }

    /// Every tile this CPU has, against the exact integer product turned to float32
    /// the same way, over row counts that use every tile height and shapes with a
    /// ragged panel, a ragged group, a column range off the first panel, bias,
    /// accumulation and an activation.
    #[test]
    fn tiles_equal_the_exact_integer_product() {
        for isa in [Isa::Vnni512, Isa::Avx2] {
            if !supports(isa) {
                continue;
            }
            for &(m, k, n, c0) in &[
                (1, 4, 16, 0),
                (9, 64, 48, 0),
                (13, 131, 45, 16),
                (17, 64, 80, 32),
                (100, 37, 33, 0),
                (203, 260, 64, 16),
            ] {
                let codes = pseudo_codes(k * n, 3, 63);
                let w = QPanels::pack(&codes, k, n);
                let kp = w.padded_k() + 3;
                let xq: Vec<u8> = (0..m * kp).map(|i| ((i * 40_503) % 256) as u8).collect();
                let rs: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
                let cs: Vec<f32> = (0..n.next_multiple_of(NR))
                    .map(|j| 0.02 - j as f32 * 1e-4)
                    .collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 1.0).collect();
                let width = n - c0;
                for (accumulate, with_bias, act) in [
                    (false, true, None),
                    (true, false, None),
                    (false, false, Some(super::super::Activation::Relu)),
                ] {
                    let mut got = vec![0.5f32; m * width];
                    let epi = Epilogue {
                        row_scales: &rs,
                        col_scales: &cs,
                        bias: with_bias.then_some(&bias[..]),
                        accumulate,
                        act,
                    };
                    // SAFETY: `got` holds m x width values; `supports` checked the CPU.
                    unsafe {
                        product(isa, &w, c0..n, &xq, kp, m, epi, got.as_mut_ptr(), width);
                    }
                    for i in 0..m {
                        for j in c0..n {
                            let acc: i32 = (0..k)
                                .map(|l| {
                                    (i32::from(xq[i * kp + l]) - ZERO_POINT)
                                        * i32::from(codes[l * n + j])
                                })
                                .sum();
                            let mut want = acc as f32 * rs[i] * cs[j];
                            if with_bias {
                                want += bias[j];
                            }
                            if accumulate {
                                want += 0.5;
                            }
                            if act.is_some() {
                                want = want.max(0.0);
                            }
                            let g = got[i * width + j - c0];
                            assert!(
                                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{isa:?} {m}x{k}x{n} ({i}, {j}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
