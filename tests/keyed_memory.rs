//! The keyed maps' memory bound, measured by the allocator: idle entries are
//! kept for reuse, but at most a bounded number per shard, so a million
//! distinct keys leave memory near where it started.
//!
//! Its own test binary (one test, one global allocator that counts live
//! bytes), so that no other test allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use toctou::{KeyedLocks, KeyedRwLocks};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to `System`, only counting sizes on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: forwarded; `ptr` came from `alloc` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The number of shards a map has on this machine (as `src/table.rs`
/// computes it): four per core, rounded up to a power of two.
fn shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).next_power_of_two()
}

#[test]
#[cfg_attr(
    miri,
    ignore = "a bound on memory, not a question for miri; sweeps run under miri in tests/keyed_locks.rs"
)]
fn a_million_distinct_keys_keep_at_most_the_documented_slack() {
    let keys: u64 = 1_000_000;
    // Per shard: at most 256 idle entries kept (one or two live ones here),
    // of about 64 bytes each, an index array for them, and retired entries
    // not yet freed. Without sweeping, a million entries take 64 MB.
    let bound = shards() as isize * 64 * 1024;
    let locks = KeyedLocks::<u64>::new();
    let rw = KeyedRwLocks::<u64>::new();
    drop(locks.lock(&0));
    drop(rw.write(&0));
    let before = LIVE.load(Relaxed);
    for key in 1..keys {
        drop(locks.lock(&key));
        drop(rw.read(&key));
    }
    let grown = LIVE.load(Relaxed) - before;
    eprintln!(
        "{keys} distinct keys: {grown} bytes still allocated (bound {})",
        2 * bound
    );
    assert_eq!(locks.len() + rw.len(), 0);
    assert!(
        grown < 2 * bound,
        "{keys} distinct keys left {grown} bytes allocated; the bound is {}",
        2 * bound
    );
    drop(locks);
    drop(rw);
    let left = LIVE.load(Relaxed) - before;
    assert!(
        left < 4096,
        "dropping the maps frees their entries: {left} bytes left"
    );
}
