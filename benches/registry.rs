//! Criterion benchmarks for `RegistryCell`, side by side with arc-swap,
//! `RwLock<Arc<T>>` and `Mutex<Arc<T>>`, so that ratios come from one run.
//!
//! - `registry_get`: one read of the published instance and one field of it.
//!   Target (issue 4): `toctou::RegistryCell::get` + deref at most 0.5x
//!   `ArcSwap::load` + deref (aim: 0.2x).
//! - `registry_get_arc`: an owned `Arc` to the instance. Target: `get_arc`
//!   no slower than `ArcSwap::load_full`.
//! - `registry_get_parallel/N`: the `registry_get` work on N threads at once,
//!   `READS` reads each; the time until all are done. Target: 2 readers reach
//!   at least 1.8x the throughput of 1. Rows above the machine's core count
//!   measure oversubscription.
//! - `registry_get_scaling/N`: the lock-free readers only (`RegistryCell::get`
//!   and `ArcSwap::load`), `SCALING_READS` reads per thread, beside a
//!   calibration row that does register-only work of about a read's length:
//!   its scaling is the most this machine and harness can show. At about 3 ns a
//!   read, `READS` is a few hundred microseconds of work per thread, the same
//!   order as the skew between threads starting; ten times the reads make the
//!   group measure reading, not starting. (The lock-based rows would take
//!   seconds per iteration at that size, so they stay in the group above.)
//!
//! - `registry_reinit`: publishing a new instance (a trivial build), beside
//!   `ArcSwap::store` and `RwLock<Arc<T>>::write`. `reinit` sweeps every
//!   thread's cache for the replaced instance; when a cache holds it (the
//!   `get + reinit` rows: this thread read it, and with `+ N idle readers`
//!   other threads did too) the sweep pays one expedited membarrier, whose
//!   bare cost is the `membarrier` row (Linux only).
//!
//! Run: `cargo bench --bench registry`.

use std::hint::black_box;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use toctou::RegistryCell;

mod common;

/// The instance: a registry with a few providers.
struct Registry {
    providers: usize,
}

fn build(n: &usize) -> Registry {
    Registry { providers: *n }
}

static CELL: RegistryCell<Registry, usize> = RegistryCell::new(build);

/// Reads per thread per iteration in the parallel group.
const READS: u64 = 100_000;
/// Reads per thread per iteration in the scaling group.
const SCALING_READS: u64 = 1_000_000;

fn get(c: &mut Criterion) {
    CELL.reinit(3);
    let swap = ArcSwap::from_pointee(build(&3));
    let rw = RwLock::new(Arc::new(build(&3)));
    let mutex = Mutex::new(Arc::new(build(&3)));

    let mut g = c.benchmark_group("registry_get");
    g.throughput(Throughput::Elements(1));
    g.bench_function("toctou::RegistryCell::get", |b| {
        b.iter(|| black_box(CELL.get().providers))
    });
    g.bench_function("arc_swap::ArcSwap::load", |b| {
        b.iter(|| black_box(black_box(&swap).load().providers))
    });
    g.bench_function("arc_swap::ArcSwap::load_full", |b| {
        b.iter(|| black_box(black_box(&swap).load_full().providers))
    });
    g.bench_function("RwLock<Arc>::read + clone", |b| {
        b.iter(|| black_box(Arc::clone(&black_box(&rw).read().unwrap()).providers))
    });
    g.bench_function("Mutex<Arc>::lock + clone", |b| {
        b.iter(|| black_box(Arc::clone(&black_box(&mutex).lock().unwrap()).providers))
    });
    g.finish();

    let mut g = c.benchmark_group("registry_get_arc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("toctou::RegistryCell::get_arc", |b| {
        b.iter(|| black_box(CELL.get_arc()))
    });
    g.bench_function("arc_swap::ArcSwap::load_full", |b| {
        b.iter(|| black_box(black_box(&swap).load_full()))
    });
    g.finish();

    let mut g = c.benchmark_group("registry_get_parallel");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    /// `threads` readers at once, `reads` reads each; the time until all are
    /// done.
    fn readers(
        iters: u64,
        threads: usize,
        reads: u64,
        read: &(dyn Fn() -> usize + Sync),
    ) -> Duration {
        (0..iters)
            .map(|_| {
                common::released_together(threads, |_| {
                    for _ in 0..reads {
                        black_box(read());
                    }
                })
            })
            .sum()
    }
    for threads in [1usize, 2, 4, 8, 16] {
        g.throughput(Throughput::Elements(threads as u64 * READS));
        g.bench_with_input(
            BenchmarkId::new("toctou::RegistryCell::get", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| readers(iters, n, READS, &|| CELL.get().providers)),
        );
        g.bench_with_input(
            BenchmarkId::new("arc_swap::ArcSwap::load", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| readers(iters, n, READS, &|| swap.load().providers)),
        );
        g.bench_with_input(
            BenchmarkId::new("RwLock<Arc>::read + clone", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    readers(iters, n, READS, &|| {
                        Arc::clone(&rw.read().unwrap()).providers
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("Mutex<Arc>::lock + clone", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    readers(iters, n, READS, &|| {
                        Arc::clone(&mutex.lock().unwrap()).providers
                    })
                })
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("registry_get_scaling");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    for threads in [1usize, 2, 4, 8, 16] {
        g.throughput(Throughput::Elements(threads as u64 * SCALING_READS));
        g.bench_with_input(
            BenchmarkId::new("toctou::RegistryCell::get", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| readers(iters, n, SCALING_READS, &|| CELL.get().providers))
            },
        );
        g.bench_with_input(
            BenchmarkId::new("arc_swap::ArcSwap::load", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| readers(iters, n, SCALING_READS, &|| swap.load().providers))
            },
        );
        // The machine's own ceiling: a loop of register-only work of about
        // the same length as one read, which shares nothing at all.
        g.bench_with_input(
            BenchmarkId::new("calibration: no memory access", threads),
            &threads,
            |b, &n| {
                b.iter_custom(|iters| {
                    readers(iters, n, SCALING_READS, &|| {
                        black_box(3usize).wrapping_mul(7).rotate_left(5) ^ 9
                    })
                })
            },
        );
    }
    g.finish();
}

fn reinit(c: &mut Criterion) {
    static CELL: RegistryCell<Registry, usize> = RegistryCell::new(build);
    CELL.reinit(1);
    let swap = ArcSwap::from_pointee(build(&1));
    let rw = RwLock::new(Arc::new(build(&1)));

    let mut g = c.benchmark_group("registry_reinit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("toctou::RegistryCell::reinit", |b| {
        b.iter(|| black_box(CELL.reinit(black_box(2))))
    });
    g.bench_function("toctou::RegistryCell::get + reinit", |b| {
        b.iter(|| {
            black_box(CELL.get().providers);
            black_box(CELL.reinit(black_box(2)))
        })
    });
    g.bench_function("arc_swap::ArcSwap::store", |b| {
        b.iter(|| swap.store(Arc::new(build(black_box(&2)))))
    });
    g.bench_function("arc_swap::ArcSwap::load + store", |b| {
        b.iter(|| {
            black_box(swap.load().providers);
            swap.store(Arc::new(build(black_box(&2))))
        })
    });
    g.bench_function("RwLock<Arc>::write + assign", |b| {
        b.iter(|| *rw.write().unwrap() = Arc::new(build(black_box(&2))))
    });
    #[cfg(target_os = "linux")]
    g.bench_function("membarrier(PRIVATE_EXPEDITED)", |b| {
        // Registration is idempotent: the cell's first read already did it.
        // SAFETY: membarrier(2) with (cmd, flags = 0, cpu_id = 0) touches no
        // memory of ours.
        let membarrier = |cmd: libc::c_int| unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        };
        assert_eq!(membarrier(1 << 4), 0, "register for the expedited command");
        b.iter(|| membarrier(1 << 3))
    });
    // The same, with idle (parked) readers whose caches the sweep must visit
    // on every reinit: they cached the first instance, which the first sweep
    // took back; the membarrier does not interrupt parked threads.
    for idle in [2usize, 8] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cached = Arc::new(std::sync::Barrier::new(idle + 1));
        let readers: Vec<_> = (0..idle)
            .map(|_| {
                let (stop, cached) = (stop.clone(), cached.clone());
                std::thread::spawn(move || {
                    black_box(CELL.get().providers);
                    cached.wait();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        std::thread::park();
                    }
                })
            })
            .collect();
        cached.wait();
        g.bench_function(
            BenchmarkId::new("toctou::RegistryCell::get + reinit, idle readers", idle),
            |b| {
                b.iter(|| {
                    black_box(CELL.get().providers);
                    black_box(CELL.reinit(black_box(2)))
                })
            },
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        readers.iter().for_each(|r| r.thread().unpark());
        readers.into_iter().for_each(|r| r.join().unwrap());
    }
    g.finish();
}

criterion_group!(benches, get, reinit);
criterion_main!(benches);
