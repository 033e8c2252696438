//! Criterion benchmarks for `Singleton` and `Lazy`, side by side with the std
//! and once_cell baselines, so that ratios come from one run.
//!
//! - `singleton_get_initialised`: one read of an initialised global. Target:
//!   `toctou::Singleton` and `toctou::Lazy` within 1.05x of `std::sync::OnceLock`
//!   (the floor is one `Acquire` load).
//! - `singleton_cold_start/N`: N threads released together on a fresh cell;
//!   the time until all of them hold the value (one init, N-1 waiters).
//!
//! Run: `cargo bench --bench singleton`.

use std::hint::black_box;
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod common;

/// Reads per iteration in the `singleton_get_initialised` group.
const READS: u64 = 100;

fn get_initialised(c: &mut Criterion) {
    static TOCTOU_SINGLETON: toctou::Singleton<u64> = toctou::Singleton::new();
    static TOCTOU_LAZY: toctou::Lazy<u64> = toctou::Lazy::new(|| 7);
    static STD_ONCE_LOCK: OnceLock<u64> = OnceLock::new();
    static STD_LAZY_LOCK: LazyLock<u64> = LazyLock::new(|| 7);
    static ONCE_CELL_LAZY: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| 7);
    static ONCE_CELL_ONCE_CELL: once_cell::sync::OnceCell<u64> = once_cell::sync::OnceCell::new();

    TOCTOU_SINGLETON.get_or_init(|| 7);
    STD_ONCE_LOCK.get_or_init(|| 7);
    ONCE_CELL_ONCE_CELL.get_or_init(|| 7);
    let _ = (*TOCTOU_LAZY, *STD_LAZY_LOCK, *ONCE_CELL_LAZY);

    let mut g = c.benchmark_group("singleton_get_initialised");
    // Each iteration does READS reads, so the ~1 ns read is not lost in the
    // timing loop's own overhead; reported times are per READS reads.
    //
    // `black_box(&CELL)` hides the address from the optimiser, once per
    // iteration. Every read loads the state (atomic loads are never merged
    // or hoisted) and then the value, and the values are summed in a
    // register: no store in the loop. A per-read `black_box` store made the
    // timings bimodal across runs (4K aliasing between the stack slot, which
    // ASLR moves, and the cell), swamping the differences we want to see.
    g.throughput(Throughput::Elements(READS));
    macro_rules! reads {
        ($name:expr, |$cell:ident| $read:expr, $static:expr) => {
            g.bench_function($name, |b| {
                b.iter(|| {
                    let $cell = black_box(&$static);
                    let mut sum = 0u64;
                    for _ in 0..READS {
                        sum = sum.wrapping_add($read);
                    }
                    black_box(sum)
                })
            });
        };
    }
    reads!(
        "toctou::Singleton::get",
        |c| *c.get().unwrap_or(&0),
        TOCTOU_SINGLETON
    );
    reads!(
        "toctou::Singleton::get_or_init",
        |c| *c.get_or_init(|| 0),
        TOCTOU_SINGLETON
    );
    reads!("toctou::Lazy", |c| **c, TOCTOU_LAZY);
    reads!(
        "std::sync::OnceLock::get",
        |c| *c.get().unwrap_or(&0),
        STD_ONCE_LOCK
    );
    reads!("std::sync::LazyLock", |c| **c, STD_LAZY_LOCK);
    reads!("once_cell::sync::Lazy", |c| **c, ONCE_CELL_LAZY);
    reads!(
        "once_cell::sync::OnceCell::get",
        |c| *c.get().unwrap_or(&0),
        ONCE_CELL_ONCE_CELL
    );
    g.finish();
}

/// The cells compared in the cold-start group, behind one interface.
trait Cell: Default + Sync {
    fn get_or_init(&self, f: impl FnOnce() -> u64) -> &u64;
}

impl Cell for toctou::Singleton<u64> {
    fn get_or_init(&self, f: impl FnOnce() -> u64) -> &u64 {
        toctou::Singleton::get_or_init(self, f)
    }
}

impl Cell for OnceLock<u64> {
    fn get_or_init(&self, f: impl FnOnce() -> u64) -> &u64 {
        OnceLock::get_or_init(self, f)
    }
}

impl Cell for once_cell::sync::OnceCell<u64> {
    fn get_or_init(&self, f: impl FnOnce() -> u64) -> &u64 {
        once_cell::sync::OnceCell::get_or_init(self, f)
    }
}

/// Total time, over `iters` fresh cells, from releasing `threads` threads
/// together to the last of them holding the value. The initialiser takes
/// ~2 µs, so late arrivals really wait (park) rather than find the value
/// ready.
///
/// The threads are started first and spin (yielding) on a flag, and each
/// records when it got the value, so thread start-up and barrier wake-ups
/// are not timed: what is timed is one init plus waking its waiters.
fn cold_start<C: Cell>(iters: u64, threads: usize) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let cell = C::default();
        total += common::released_together(threads, |_| {
            black_box(cell.get_or_init(|| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(2) {
                    std::hint::spin_loop();
                }
                42
            }));
        });
    }
    total
}

fn cold_start_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("singleton_cold_start");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for threads in [1, 2, 4, 8, 16] {
        g.bench_with_input(
            BenchmarkId::new("toctou::Singleton", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| cold_start::<toctou::Singleton<u64>>(iters, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("std::sync::OnceLock", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| cold_start::<OnceLock<u64>>(iters, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("once_cell::sync::OnceCell", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| cold_start::<once_cell::sync::OnceCell<u64>>(iters, n)),
        );
    }
    g.finish();
}

criterion_group!(benches, get_initialised, cold_start_group);
criterion_main!(benches);
