//! Parallel work of the training ops on candle's CPU worker pool.
//!
//! candle runs its own elementwise ops on a pool of its own (the calling thread plus
//! `CANDLE_NUM_THREADS - 1` workers). A training step mixes those ops with the fused
//! ops of this crate; running both on the same threads keeps them from competing for
//! the cores (measured on two cores: a `middle` step took ~1.3x longer when the fused
//! ops ran on rayon's pool beside candle's). Work here never nests: a task never
//! starts parallel work of its own.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Mutex;

/// Threads of the pool (the caller included).
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f` over `0..n`, in ranges spread over the pool.
pub(crate) fn for_ranges(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if n <= 1 {
        f(0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f);
}

/// `f(i)` for every `i` in `0..n`, in parallel; the results in order.
pub(crate) fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    for_ranges(n, |r| {
        for i in r {
            let v = f(i);
            if let Ok(mut s) = slots[i].lock() {
                *s = Some(v);
            }
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .ok()
                .flatten()
                .expect("every unit of a parallel map runs once")
        })
        .collect()
}

/// A pointer that may cross to the pool's threads; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);

/// A read-only pointer that may cross to the pool's threads.
#[derive(Clone, Copy)]
pub(crate) struct SharedConst(pub(crate) *const f32);

// SAFETY: only used to hand disjoint sub-slices of one buffer to tasks (or, for
// `SharedConst`, to read one buffer nobody writes meanwhile).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}

impl Shared {
    /// The raw pointer (a method, so that closures capture the `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

impl SharedConst {
    pub(crate) fn get(self) -> *const f32 {
        self.0
    }
}

/// `f(i, chunk_i)` over the consecutive `chunk`-long pieces of `out` (the last may be
/// shorter), in parallel; the results in order.
pub(crate) fn chunks_mut<R: Send>(
    out: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    let len = out.len();
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk);
    let base = Shared(out.as_mut_ptr());
    map(n, |i| {
        let start = i * chunk;
        let end = len.min(start + chunk);
        // SAFETY: the pieces are disjoint and inside `out`, which outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, piece)
    })
}

/// A vector of `n` values written chunk by chunk by `f(i, chunk_i)` in parallel, with
/// no zeroing first; `f`'s results in order.
///
/// # Safety
/// `f` must write every element of every chunk it is given.
pub(crate) unsafe fn filled<R: Send>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let chunk = chunk.max(1);
    let base = Shared(v.as_mut_ptr());
    let results = map(n.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = n.min(start + chunk);
        // SAFETY: disjoint pieces of the vector's capacity, viewed as uninitialised.
        let piece = unsafe {
            std::slice::from_raw_parts_mut(
                base.get().add(start).cast::<MaybeUninit<f32>>(),
                end - start,
            )
        };
        f(i, piece)
    });
    // SAFETY: `f` wrote all n values (the caller's promise).
    unsafe { v.set_len(n) };
    (v, results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_maps_cover_everything_once_in_order() {
        let mut v = vec![0f32; 1000];
        let lens = chunks_mut(&mut v, 64, |i, c| {
            c.iter_mut().for_each(|x| *x += i as f32 + 1.0);
            c.len()
        });
        assert_eq!(lens.iter().sum::<usize>(), 1000);
        assert_eq!(lens.len(), 16);
        assert!(v
            .iter()
            .enumerate()
            .all(|(j, &x)| x == (j / 64) as f32 + 1.0));
        assert_eq!(map(5, |i| i * i), vec![0, 1, 4, 9, 16]);
        assert!(threads() >= 1);
    }
}
