//! Randomness of a run, as a function of the seed and where the run is: the shuffle of
//! epoch `e` comes from `(seed, e)`, the modality dropout of step `t` from
//! `(seed, t)`. Nothing carries over from one step to the next, so a run resumed at
//! any step draws exactly what an uninterrupted run draws there.

/// splitmix64: a small, well-mixed generator.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

/// What a stream of numbers is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Shuffle = 1,
    Dropout = 2,
    Split = 3,
    Init = 4,
}

impl Rng {
    pub(crate) fn new(seed: u64, stream: Stream, index: u64) -> Self {
        let mut r = Self(seed ^ 0x6a09_e667_f3bc_c909);
        r.0 ^= r
            .next_u64()
            .wrapping_add((stream as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.0 ^= r
            .next_u64()
            .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        Self(r.next_u64())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A Fisher-Yates shuffle of `v`.
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::new(7, Stream::Shuffle, 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Rng::new(7, Stream::Shuffle, 3);
        let mut y = Rng::new(7, Stream::Shuffle, 4);
        let mut z = Rng::new(7, Stream::Dropout, 3);
        let (x, y, z) = (x.next_u64(), y.next_u64(), z.next_u64());
        assert!(x != y && x != z && y != z);
        let mut v: Vec<usize> = (0..100).collect();
        Rng::new(1, Stream::Shuffle, 0).shuffle(&mut v);
        let mut w = v.clone();
        w.sort_unstable();
        assert_eq!(w, (0..100).collect::<Vec<_>>());
        assert_ne!(v, w);
        let mut r = Rng::new(2, Stream::Dropout, 0);
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02);
    }
}
