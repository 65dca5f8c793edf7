//! Splitting one item's work between the calling thread and the rayon pool.
//!
//! A parallel iterator started from a thread outside the pool (the Python thread that
//! released the GIL) hands all the work to the pool and blocks; when the pool's workers
//! are asleep, which they are after a short pause between calls, the call first pays
//! for waking them (about 0.1 ms on a small VM). For work that is short anyway (one
//! image, one audio chunk) that is a large share. Here the caller starts on the jobs at
//! once and idle workers join in as they wake: the result never costs much more than
//! the caller doing every job alone, and splits evenly when the pool is awake.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs every job once, on the calling thread and on up to `threads - 1` pool threads,
/// each taking the next job when it is free. `init` makes a thread's scratch state
/// (once per participating thread). A panic in a job propagates to the caller.
pub(crate) fn share_with_pool<J, S, I, F>(jobs: Vec<J>, init: I, run: F)
where
    J: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, J) + Sync,
{
    let n = jobs.len();
    let slots: Vec<Mutex<Option<J>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let next = AtomicUsize::new(0);
    let work = || {
        let mut state: Option<S> = None;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(i) else { break };
            let job = slot.lock().map(|mut g| g.take()).unwrap_or(None);
            if let Some(job) = job {
                run(state.get_or_insert_with(&init), job);
            }
        }
    };
    if n <= 1 {
        work();
        return;
    }
    let helpers = rayon::current_num_threads().saturating_sub(1).min(n - 1);
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| work());
        }
        work();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_job_runs_once() {
        let hits: Vec<AtomicU64> = (0..100).map(|_| AtomicU64::new(0)).collect();
        let inits = AtomicUsize::new(0);
        share_with_pool(
            (0..100).collect(),
            || inits.fetch_add(1, Ordering::Relaxed),
            |_, j: usize| {
                hits[j].fetch_add(1, Ordering::Relaxed);
            },
        );
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        // One scratch per participating thread at most (caller + helpers).
        assert!(inits.load(Ordering::Relaxed) <= rayon::current_num_threads());
        share_with_pool(Vec::<usize>::new(), || (), |_, _| unreachable!());
    }

    #[test]
    fn a_panicking_job_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            share_with_pool(vec![1, 2, 3], || (), |_, j: i32| assert!(j != 2, "job 2"));
        });
        assert!(r.is_err());
    }
}
