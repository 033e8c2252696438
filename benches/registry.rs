//! Criterion benchmarks for `RegistryCell`, side by side with arc-swap,
//! `RwLock<Arc<T>>` and `Mutex<Arc<T>>`, so that ratios come from one run.
//!
//! - `registry_get`: one read of the published instance and one field of it.
//!   Target (issue 4): `toctou::RegistryCell::get` + deref at most 0.5x
//!   `ArcSwap::load` + deref (aim: 0.2x).
//! - `registry_get_arc`: an owned `Arc` to the instance. Target: `get_arc`
//!   no slower than `ArcSwap::load_full`.
//! - `registry_get_2_readers`: the `registry_get` work on 2 threads at once,
//!   `READS` reads each; the time until both are done.
//!
//! Run: `cargo bench --bench registry`.

use std::hint::black_box;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use toctou::RegistryCell;

/// The instance: a registry with a few providers.
struct Registry {
    providers: usize,
}

fn build(n: &usize) -> Registry {
    Registry { providers: *n }
}

static CELL: RegistryCell<Registry, usize> = RegistryCell::new(build);

/// Reads per thread per iteration in the 2-reader group.
const READS: u64 = 100_000;

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

    let mut g = c.benchmark_group("registry_get_2_readers");
    g.throughput(Throughput::Elements(2 * READS));
    g.sample_size(20);
    fn two_readers(iters: u64, read: &(dyn Fn() -> usize + Sync)) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..READS {
                            black_box(read());
                        }
                    });
                }
            });
            total += start.elapsed();
        }
        total
    }
    g.bench_function("toctou::RegistryCell::get", |b| {
        b.iter_custom(|iters| two_readers(iters, &|| CELL.get().providers))
    });
    g.bench_function("arc_swap::ArcSwap::load", |b| {
        b.iter_custom(|iters| two_readers(iters, &|| swap.load().providers))
    });
    g.bench_function("RwLock<Arc>::read + clone", |b| {
        b.iter_custom(|iters| two_readers(iters, &|| Arc::clone(&rw.read().unwrap()).providers))
    });
    g.bench_function("Mutex<Arc>::lock + clone", |b| {
        b.iter_custom(|iters| two_readers(iters, &|| Arc::clone(&mutex.lock().unwrap()).providers))
    });
    g.finish();
}

criterion_group!(benches, get);
criterion_main!(benches);
