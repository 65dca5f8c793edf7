//! bfloat16 products on CPUs with the AVX-512 BF16 dot-product instruction.
//!
//! Elsewhere a bfloat16 weight is widened to float32 in the tile's registers and the
//! product runs at the float32 rate ([`super::panel`]). `vdpbf16ps` multiplies two
//! pairs of bfloat16 values and adds both products to a float32 lane in one
//! instruction: twice the multiply-adds of a float32 FMA of the same width, measured at
//! 234 against 117 GFLOP/s on one core of an AMD EPYC (Zen 4). It needs the
//! activations in bfloat16 too, so each call rounds its rows of activations to
//! bfloat16 (to nearest, ties to even) once; products add up in float32, and the
//! output, bias, activation and residual stay float32. This is what PyTorch's CPU
//! bfloat16 does (oneDNN), and it costs accuracy: the activations keep 8 bits of
//! mantissa (docs/encoders.md, "Precision", gives the measured effect).
//!
//! Weights are packed once at load as 16-column panels of pairs ([`BPanels`]): for
//! each panel and each two consecutive inner indices, one 64-byte line holding both
//! values of column 0, then both of column 1, and so on; a pair of activations is
//! broadcast to every column as one 32-bit value, as the int8 tile of [`super::qtile`]
//! broadcasts four codes. The tile is up to 8 rows by 32 columns (two panels: 16
//! accumulators of the 32 registers).
//!
//! `MLMF_BF16_KERNEL=widen` at load keeps the widening kernels on such a CPU, for
//! results that do not depend on the CPU or to compare the two.

/// Columns per panel.
pub(crate) const NR: usize = 16;

/// Rows per block: a block's bfloat16 activations (3072-long rows: 384 KB at most) stay
/// in the L2 cache while every panel of the call passes.
const MC: usize = 64;

/// The environment variable that keeps the widening kernels: `widen`.
pub(crate) const KERNEL_ENV: &str = "MLMF_BF16_KERNEL";

/// Whether a bfloat16 weight loaded now is packed for this tile: the CPU has AVX-512 F
/// and BF16 and [`KERNEL_ENV`] does not say `widen`. Read at every load, so that one
/// process can hold both kinds (the benchmarks compare them); a weight's packing then
/// decides the kernel that multiplies it.
pub(crate) fn chosen() -> bool {
    supported() && std::env::var(KERNEL_ENV).as_deref() != Ok("widen")
}

/// Whether this CPU has the instructions (detected once).
pub(crate) fn supported() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// One pair of inner indices of one panel: 16 columns x 2 bfloat16 values (as bits),
/// 64-byte aligned (one cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; NR * 2]);

/// `W^T` (`[k, n]`, `n` a multiple of [`NR`]) as bfloat16 panels of pairs (see the
/// module docs). An odd `k` ends on a pair whose second value is zero.
#[derive(Clone)]
pub(crate) struct BPanels {
    k: usize,
    n: usize,
    pairs: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for BPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BPanels({} x {})", self.k, self.n)
    }
}

impl BPanels {
    /// Packs `W^T` whose element `(kk, c)` is `at(kk, c)`.
    pub(crate) fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> half::bf16) -> Self {
        assert!(n.is_multiple_of(NR), "{n} columns: not whole panels");
        let pairs = k.div_ceil(2);
        let mut lines = vec![Line([0; NR * 2]); n / NR * pairs];
        for (i, line) in lines.iter_mut().enumerate() {
            let (p, g) = (i / pairs.max(1), i % pairs.max(1));
            for t in 0..2 {
                let kk = 2 * g + t;
                if kk < k {
                    for c in 0..NR {
                        line.0[2 * c + t] = at(kk, p * NR + c).to_bits();
                    }
                }
            }
        }
        Self { k, n, pairs, lines }
    }

    /// Packs `W^T = X^T` for `rows` rows of `k` values at `x` (row stride `rs`):
    /// column `c` is row `c`, columns `rows..n` are zero. A row's consecutive values
    /// are a pair, so each row is rounded in one pass ([`to_pairs`]) and its pairs are
    /// spread over the panel's lines: an attention's keys as `K^T`.
    ///
    /// # Safety
    /// `x` must address `rows` rows of `k` values with row stride `rs`.
    pub(crate) unsafe fn pack_rows_as_columns(
        x: *const f32,
        rs: usize,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Self {
        assert!(n.is_multiple_of(NR) && rows <= n, "{rows} of {n} columns");
        let pairs = k.div_ceil(2);
        let mut lines = vec![Line([0; NR * 2]); n / NR * pairs];
        let mut row = vec![0u32; pairs];
        for c in 0..rows {
            to_pairs(std::slice::from_raw_parts(x.add(c * rs), k), 0, &mut row);
            let (p, j) = (c / NR, c % NR);
            for (line, &v) in lines[p * pairs..(p + 1) * pairs].iter_mut().zip(&row) {
                line.0[2 * j] = v as u16;
                line.0[2 * j + 1] = (v >> 16) as u16;
            }
        }
        Self { k, n, pairs, lines }
    }

    /// Packs `W^T = X` for `k` rows of `n` values at `x` (row stride `rs`): each two
    /// rows are rounded in one pass and interleaved into their lines. An attention's
    /// values.
    ///
    /// # Safety
    /// `x` must address `k` rows of `n` values with row stride `rs`.
    pub(crate) unsafe fn pack_rows(x: *const f32, rs: usize, k: usize, n: usize) -> Self {
        assert!(n.is_multiple_of(NR), "{n} columns: not whole panels");
        let pairs = k.div_ceil(2);
        let mut lines = vec![Line([0; NR * 2]); n / NR * pairs];
        let (mut r0, mut r1) = (vec![0u32; n / 2], vec![0u32; n / 2]);
        for g in 0..pairs {
            to_pairs(std::slice::from_raw_parts(x.add(2 * g * rs), n), 0, &mut r0);
            if 2 * g + 1 < k {
                to_pairs(
                    std::slice::from_raw_parts(x.add((2 * g + 1) * rs), n),
                    0,
                    &mut r1,
                );
            } else {
                r1.fill(0);
            }
            // r0[j] holds row 2g's columns 2j and 2j + 1; a line wants column c's two
            // rows side by side.
            for p in 0..n / NR {
                let line = &mut lines[p * pairs + g].0;
                let (a, b) = (&r0[p * NR / 2..][..NR / 2], &r1[p * NR / 2..][..NR / 2]);
                for j in 0..NR / 2 {
                    line[4 * j] = a[j] as u16;
                    line[4 * j + 1] = b[j] as u16;
                    line[4 * j + 2] = (a[j] >> 16) as u16;
                    line[4 * j + 3] = (b[j] >> 16) as u16;
                }
            }
        }
        Self { k, n, pairs, lines }
    }

    /// Element `(kk, c)` of `W^T`.
    pub(crate) fn get(&self, kk: usize, c: usize) -> half::bf16 {
        let line = &self.lines[c / NR * self.pairs + kk / 2];
        half::bf16::from_bits(line.0[2 * (c % NR) + kk % 2])
    }

    /// Every value through `f` (zero padding stays zero when `f(0) == 0`).
    pub(crate) fn map(&self, f: impl Fn(half::bf16) -> half::bf16) -> Self {
        let mut out = self.clone();
        for line in &mut out.lines {
            for v in &mut line.0 {
                *v = f(half::bf16::from_bits(*v)).to_bits();
            }
        }
        out
    }

    /// Resident bytes.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.lines[..])
    }
}

thread_local! {
    /// The pairs of activations of the product running on this thread.
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rounds the inner indices `lo..lo + x.len()` (the values `x`) to bfloat16 pairs
/// aligned on even inner indices: pair `j` holds indices `2 (lo / 2 + j)` and the one
/// after, in its low and high half; indices outside the span are zero.
fn to_pairs(x: &[f32], lo: usize, out: &mut [u32]) {
    let (g0, hi) = (lo / 2, lo + x.len());
    debug_assert_eq!(out.len(), hi.div_ceil(2) - g0);
    let bits = |i: usize| {
        if (lo..hi).contains(&i) {
            u32::from(half::bf16::from_f32(x[i - lo]).to_bits())
        } else {
            0
        }
    };
    let pair = |g: usize| bits(2 * g) | bits(2 * g + 1) << 16;
    // The whole pairs inside the span, 16 at a time with the CPU's conversion.
    let mut g = g0;
    while g < lo.div_ceil(2) {
        out[g - g0] = pair(g);
        g += 1;
    }
    #[cfg(target_arch = "x86_64")]
    if supported() {
        let whole = (hi / 2).saturating_sub(g) / 16 * 16;
        // SAFETY: `supported` checked the CPU; reads the indices `2g..2(g + whole)`
        // (inside the span), writes `out[g - g0..g - g0 + whole]`.
        unsafe {
            x86::round_pairs(
                x.as_ptr().add(2 * g - lo),
                whole,
                out.as_mut_ptr().add(g - g0),
            )
        };
        g += whole;
    }
    while g < g0 + out.len() {
        out[g - g0] = pair(g);
        g += 1;
    }
}

/// `dst (+)= lhs · W^T[k0..k0 + kn, cols]` for `m` rows of `lhs` (row stride `lhs_rs`,
/// starting at inner index `k0`), the activations rounded to bfloat16; `cols` whole
/// panels.
///
/// # Safety
/// `lhs` must address `m` rows of `kn` values, `dst` `m` rows of `cols.len()` values
/// (row stride `dst_rs`) that no one else touches meanwhile; `k0 + kn <= k`, `cols`
/// inside `0..n` on panel boundaries; the CPU must be [`supported`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    w: &BPanels,
    m: usize,
    (k0, kn): (usize, usize),
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
) {
    debug_assert!(k0 + kn <= w.k && cols.end <= w.n);
    debug_assert!(cols.start.is_multiple_of(NR) && cols.end.is_multiple_of(NR));
    if m == 0 || cols.is_empty() {
        return;
    }
    let (g0, g1) = (k0 / 2, (k0 + kn).div_ceil(2));
    let np = g1 - g0;
    let run = |pairs: &mut Vec<u32>| {
        pairs.resize(MC.min(m) * np, 0);
        for r0 in (0..m).step_by(MC) {
            let rows = MC.min(m - r0);
            for i in 0..rows {
                let row = std::slice::from_raw_parts(lhs.add((r0 + i) * lhs_rs), kn);
                to_pairs(row, k0, &mut pairs[i * np..(i + 1) * np]);
            }
            #[cfg(target_arch = "x86_64")]
            x86::block(
                w,
                g0,
                np,
                cols.clone(),
                &pairs[..rows * np],
                rows,
                dst.add(r0 * dst_rs),
                dst_rs,
                accumulate,
            );
        }
    };
    PAIRS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut pairs) => run(&mut pairs),
        Err(_) => run(&mut Vec::new()),
    });
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, dst_rs, accumulate);
        unreachable!("btile::product without the x86 tile");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BPanels, Line, NR};

    /// Rounds `2 * pairs` floats at `x` (`pairs` a multiple of 16) to bfloat16 pairs.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `x` readable and `out` writable for the
    /// extents.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_pairs(x: *const f32, pairs: usize, out: *mut u32) {
        for j in (0..pairs).step_by(16) {
            let p = x.add(2 * j);
            // Low half from the second operand: values 0..16, then 16..32.
            let h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
            _mm512_storeu_si512(
                out.add(j).cast(),
                std::mem::transmute::<__m512bh, __m512i>(h),
            );
        }
    }

    /// One block of `rows` rows (their pairs `np` per row) by the panels of `cols`,
    /// inner pairs from `g0`.
    ///
    /// # Safety
    /// As [`super::product`], for this block.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        w: &BPanels,
        g0: usize,
        np: usize,
        cols: std::ops::Range<usize>,
        pairs: &[u32],
        rows: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
    ) {
        let tiles = rows.div_ceil(8);
        let (base, extra) = (rows / tiles, rows % tiles);
        let mut c0 = cols.start;
        while c0 < cols.end {
            let panels = if c0 + 2 * NR <= cols.end { 2 } else { 1 };
            let next = c0 + panels * NR;
            let t = Tile {
                b: w.lines.as_ptr().add(c0 / NR * w.pairs + g0),
                panel_stride: w.pairs,
                pf: if next < cols.end {
                    w.lines.as_ptr().add(next / NR * w.pairs + g0)
                } else {
                    std::ptr::null()
                },
                np,
                a: pairs.as_ptr(),
                c: dst.add(c0 - cols.start),
                c_rs: dst_rs,
                accumulate,
            };
            let mut r0 = 0;
            for i in 0..tiles {
                let r = base + usize::from(i < extra);
                let at = Tile {
                    a: t.a.add(r0 * np),
                    c: t.c.add(r0 * dst_rs),
                    pf: if r0 == 0 { t.pf } else { std::ptr::null() },
                    ..t
                };
                tile(at, r, panels);
                r0 += r;
            }
            c0 = next;
        }
    }

    /// Where one tile reads and writes: its first panel's first line (`panel_stride`
    /// lines to the next panel), lines to prefetch (null for none), `np` pairs of
    /// activations per row from `a`, and its destination.
    #[derive(Clone, Copy)]
    struct Tile {
        b: *const Line,
        panel_stride: usize,
        pf: *const Line,
        np: usize,
        a: *const u32,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
    }

    unsafe fn tile(t: Tile, rows: usize, panels: usize) {
        macro_rules! go {
            ($p:literal, [$($r:literal),*]) => {
                match rows {
                    $($r => dot::<$r, $p>(t),)*
                    _ => unreachable!("tile of {rows} rows"),
                }
            };
        }
        if panels == 2 {
            go!(2, [1, 2, 3, 4, 5, 6, 7, 8])
        } else {
            go!(1, [1, 2, 3, 4, 5, 6, 7, 8])
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot<const R: usize, const P: usize>(t: Tile) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for g in 0..t.np {
            if !t.pf.is_null() {
                for p in 0..P {
                    _mm_prefetch::<_MM_HINT_T1>(t.pf.add(p * t.panel_stride + g).cast());
                }
            }
            let mut w = [_mm512_setzero_si512(); P];
            for (p, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_si512(t.b.add(p * t.panel_stride + g).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(*t.a.add(r * t.np + g) as i32);
                let av = std::mem::transmute::<__m512i, __m512bh>(av);
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_dpbf16_ps(*a, av, std::mem::transmute::<__m512i, __m512bh>(*w));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, a) in acc.iter().enumerate() {
                let cp = t.c.add(r * t.c_rs + p * NR);
                let o = if t.accumulate {
                    _mm512_add_ps(*a, _mm512_loadu_ps(cp))
                } else {
                    *a
                };
                _mm512_storeu_ps(cp, o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        super::super::test_values(len, seed, 1.3)
    }

    #[test]
    fn packing_places_each_value() {
        let (k, n) = (7, 32);
        let wt = values(k * n, 1);
        let p = BPanels::pack(k, n, |kk, c| bf16::from_f32(wt[kk * n + c]));
        assert_eq!((p.pairs, p.bytes()), (4, 2 * 4 * 64));
        for kk in 0..8 {
            for c in 0..n {
                let want = if kk < k {
                    bf16::from_f32(wt[kk * n + c])
                } else {
                    bf16::ZERO
                };
                assert_eq!(p.get(kk, c), want, "({kk}, {c})");
            }
        }
        let doubled = p.map(|v| bf16::from_f32(v.to_f32() * 2.0));
        assert_eq!(doubled.get(3, 17).to_f32(), 2.0 * p.get(3, 17).to_f32());
        assert_eq!(doubled.get(7, 5), bf16::ZERO);
    }

    /// The row packers place what the element-wise packer places: keys as columns
    /// (ragged last panel, odd width) and rows (odd count), from strided rows.
    #[test]
    fn row_packers_equal_the_element_packer() {
        let rs = 70;
        let x = values(40 * rs, 4);
        for &(rows, k, n) in &[(37, 64, 48), (16, 17, 16), (1, 2, 16)] {
            // SAFETY: `rows` rows of `k <= rs` values fit in `x`.
            let got = unsafe { BPanels::pack_rows_as_columns(x.as_ptr(), rs, rows, k, n) };
            let want = BPanels::pack(k, n, |kk, c| {
                if c < rows {
                    bf16::from_f32(x[c * rs + kk])
                } else {
                    bf16::ZERO
                }
            });
            assert_eq!((got.k, got.n, got.pairs), (want.k, want.n, want.pairs));
            assert!(
                got.lines.iter().zip(&want.lines).all(|(a, b)| a.0 == b.0),
                "{rows}x{k}"
            );
        }
        for &(k, n) in &[(37, 64), (40, 16), (1, 32)] {
            // SAFETY: `k` rows of `n <= rs` values fit in `x`.
            let got = unsafe { BPanels::pack_rows(x.as_ptr().add(3), rs, k, n) };
            let want = BPanels::pack(k, n, |kk, c| bf16::from_f32(x[kk * rs + 3 + c]));
            assert_eq!((got.k, got.n, got.pairs), (want.k, want.n, want.pairs));
            assert!(
                got.lines.iter().zip(&want.lines).all(|(a, b)| a.0 == b.0),
                "{k}x{n}"
            );
        }
    }

    /// The CPU's conversion rounds as `half` does (to nearest, ties to even), and the
    /// pairs hold exactly the indices of the span, in place.
    #[test]
    fn activations_round_to_the_nearest_bfloat16_in_pairs() {
        let mut x = values(101, 5);
        // Exact ties: 1 + 2^-8 (to 1) and 1 + 3 * 2^-8 (to 1 + 2^-7).
        x[40] = 1.0 + 1.0 / 256.0;
        x[41] = 1.0 + 3.0 / 256.0;
        for (lo, hi) in [(0usize, 101usize), (3, 100), (1, 2), (38, 95), (4, 4)] {
            let g0 = lo / 2;
            let mut out = vec![7u32; hi.div_ceil(2) - g0];
            to_pairs(&x[lo..hi], lo, &mut out);
            for (j, &p) in out.iter().enumerate() {
                for (t, bits) in [(0, p & 0xffff), (1, p >> 16)] {
                    let i = 2 * (g0 + j) + t;
                    let want = if (lo..hi).contains(&i) {
                        bf16::from_f32(x[i])
                    } else {
                        bf16::ZERO
                    };
                    assert_eq!(bits as u16, want.to_bits(), "span {lo}..{hi}, index {i}");
                }
            }
        }
        assert_eq!(bf16::from_f32(x[40]).to_f32(), 1.0);
        assert_eq!(bf16::from_f32(x[41]).to_f32(), 1.0 + 2.0 / 128.0);
    }

    /// The tile against the float64 product of the rounded activations and weights:
    /// every tile height, one and two panels, an odd inner start and length, a column
    /// range off the first panel, more rows than a block, accumulation.
    #[test]
    fn products_equal_the_product_of_the_rounded_values() {
        if !supported() {
            return;
        }
        for &(m, k, n, k0, kn, c0) in &[
            (1, 4, 16, 0, 4, 0),
            (9, 64, 48, 0, 64, 16),
            (13, 131, 48, 3, 127, 0),
            (70, 96, 80, 1, 94, 32),
            (133, 37, 32, 0, 37, 0),
        ] {
            let wt = values(k * n, 3);
            let x = values(m * k, 9);
            let w = BPanels::pack(k, n, |kk, c| bf16::from_f32(wt[kk * n + c]));
            let round = |v: f32| f64::from(bf16::from_f32(v).to_f32());
            let width = n - c0;
            for accumulate in [false, true] {
                let mut got = vec![0.5f32; m * width];
                // SAFETY: the buffers hold the extents passed; `supported` holds.
                unsafe {
                    product(
                        &w,
                        m,
                        (k0, kn),
                        c0..n,
                        got.as_mut_ptr(),
                        width,
                        accumulate,
                        x.as_ptr().add(k0),
                        k,
                    );
                }
                for i in 0..m {
                    for j in c0..n {
                        let mut want = if accumulate { 0.5 } else { 0.0 };
                        for l in k0..k0 + kn {
                            want += round(x[i * k + l]) * round(wt[l * n + j]);
                        }
                        let g = f64::from(got[i * width + j - c0]);
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{k}x{n} k0 {k0} ({i}, {j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
