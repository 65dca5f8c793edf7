//! Keeping the rayon pool's workers awake for the length of one compute-heavy call.
//!
//! A layer stack is a chain of short parallel regions (one per matrix product, one for
//! attention) with a little sequential work between them. Rayon puts a worker to sleep
//! soon after it runs out of work, and each region then has to wake it again; on a
//! virtual machine a sleeping vCPU can take far longer to come back than the region
//! lasts. [`with_awake_pool`] runs the call on one worker while every other worker
//! polls for the call's work instead of sleeping, which is what an OpenMP runtime's
//! spinning threads do for PyTorch.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `work` on a worker of the global pool while the other workers poll for the
/// tasks it spawns until it returns. The caller waits (it is not a worker unless it
/// already was one).
pub(crate) fn with_awake_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 {
        return work();
    }
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        for _ in 0..helpers {
            s.spawn(move |_| {
                // The owner can pick a helper job up itself while it waits on a join;
                // it must not poll then, as the call it is running is below it on its
                // own stack.
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Released on return and on unwinding alike: a panic in `work` must not leave
        // the helpers polling (the scope waits for them before it propagates it).
        let _release = Release(done);
        work()
    })
}

/// Sets its flag when dropped.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn runs_the_work_and_its_parallel_tasks_once() {
        let out = with_awake_pool(|| (0..1000u64).into_par_iter().map(|i| i * i).sum::<u64>());
        assert_eq!(out, (0..1000u64).map(|i| i * i).sum::<u64>());
    }

    #[test]
    fn nested_and_concurrent_calls_finish() {
        let sums: Vec<u64> = (0..8u64)
            .into_par_iter()
            .map(|j| with_awake_pool(|| (0..100u64).into_par_iter().map(|i| i + j).sum()))
            .collect();
        for (j, s) in sums.iter().enumerate() {
            assert_eq!(*s, (0..100u64).map(|i| i + j as u64).sum::<u64>());
        }
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| with_awake_pool(|| with_awake_pool(|| 7))))
            .collect();
        for t in threads {
            assert_eq!(t.join().ok(), Some(7));
        }
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| with_awake_pool(|| panic!("inside")));
        assert!(r.is_err());
    }
}
