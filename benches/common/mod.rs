//! The harness the bench files share for their multi-threaded groups.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `work(t)` on `threads` threads released together, and returns the
/// time from their release to the moment the last of them finished.
///
/// The threads are started first and wait (yielding) on a flag, so thread
/// start-up is not timed: what is timed is the work, run concurrently.
pub fn released_together(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let started = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (started, go, work) = (&started, &go, &work);
                s.spawn(move || {
                    started.fetch_add(1, SeqCst);
                    while !go.load(SeqCst) {
                        thread::yield_now();
                    }
                    work(t);
                    Instant::now()
                })
            })
            .collect();
        while started.load(SeqCst) < threads {
            thread::yield_now();
        }
        let start = Instant::now();
        go.store(true, SeqCst);
        let last = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap();
        last - start
    })
}
