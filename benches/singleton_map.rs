//! Criterion benchmarks for `SingletonMap`, side by side with dashmap, moka
//! and a `Mutex<HashMap>`, so that ratios come from one run.
//!
//! - `singleton_map_hit`: one lookup of a stored key (a `&str` into a map of
//!   1,000 `String` keys), returning an `Arc` to the value. Target (issue 5):
//!   `toctou::SingletonMap::get_or_init` no slower than `DashMap::get` plus an
//!   `Arc` clone (ratio <= 1.0): the work is the same.
//! - `singleton_map_hit_parallel/N`: N threads each do `LOOKUPS` hits on one
//!   shared map, keys spread over all shards; the time until all are done.
//!   Rows above the machine's core count measure oversubscription.
//!
//! Run: `cargo bench --bench singleton_map`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod common;

/// Keys in each map.
const KEYS: usize = 1_000;
/// Hits per thread per iteration in the parallel group.
const LOOKUPS: usize = 10_000;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("model-{i:04}")).collect()
}

/// The maps compared, behind one interface: look up a stored key, return the
/// shared value.
trait Map: Sync {
    fn build(keys: &[String]) -> Self;
    fn hit(&self, key: &str) -> Arc<u64>;
}

struct Toctou(toctou::SingletonMap<String, u64>);

impl Map for Toctou {
    fn build(keys: &[String]) -> Self {
        let map = toctou::SingletonMap::new();
        for (i, k) in keys.iter().enumerate() {
            map.get_or_init(k.as_str(), |_| i as u64);
        }
        Self(map)
    }
    #[inline]
    fn hit(&self, key: &str) -> Arc<u64> {
        self.0
            .get_or_init(key, |_| unreachable!("every key is stored"))
    }
}

struct Dash(dashmap::DashMap<String, Arc<u64>>);

impl Map for Dash {
    fn build(keys: &[String]) -> Self {
        let map = dashmap::DashMap::new();
        for (i, k) in keys.iter().enumerate() {
            map.insert(k.clone(), Arc::new(i as u64));
        }
        Self(map)
    }
    #[inline]
    fn hit(&self, key: &str) -> Arc<u64> {
        Arc::clone(&self.0.get(key).expect("every key is stored"))
    }
}

struct Moka(moka::sync::Cache<String, Arc<u64>>);

impl Map for Moka {
    fn build(keys: &[String]) -> Self {
        let cache = moka::sync::Cache::new(KEYS as u64 * 2);
        for (i, k) in keys.iter().enumerate() {
            cache.insert(k.clone(), Arc::new(i as u64));
        }
        cache.run_pending_tasks();
        Self(cache)
    }
    #[inline]
    fn hit(&self, key: &str) -> Arc<u64> {
        // `get_with` takes an owned key; moka's `get_with_by_ref` takes `&Q`.
        self.0
            .get_with_by_ref(key, || unreachable!("every key is stored"))
    }
}

struct MutexMap(Mutex<HashMap<String, Arc<u64>>>);

impl Map for MutexMap {
    fn build(keys: &[String]) -> Self {
        let map = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), Arc::new(i as u64)))
            .collect();
        Self(Mutex::new(map))
    }
    #[inline]
    fn hit(&self, key: &str) -> Arc<u64> {
        let map = self.0.lock().unwrap();
        Arc::clone(map.get(key).expect("every key is stored"))
    }
}

fn hit(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("singleton_map_hit");
    g.throughput(Throughput::Elements(1));
    fn bench<M: Map>(
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        keys: &[String],
    ) {
        let map = M::build(keys);
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                // Walk the keys with a stride, so consecutive lookups touch
                // different shards and buckets, as a service's would.
                i = (i + 7) % KEYS;
                black_box(map.hit(black_box(keys[i].as_str())))
            })
        });
    }
    bench::<Toctou>(&mut g, "toctou::SingletonMap::get_or_init", &keys);
    bench::<Dash>(&mut g, "dashmap::DashMap::get + Arc::clone", &keys);
    bench::<Moka>(&mut g, "moka::sync::Cache::get_with_by_ref (hit)", &keys);
    bench::<MutexMap>(&mut g, "Mutex<HashMap>::get + Arc::clone", &keys);
    g.finish();
}

/// Total time, over `iters` rounds, for `threads` threads released together
/// to do `LOOKUPS` hits each on one shared map. Threads are started before
/// the clock and spin on a flag, so thread start-up is not timed.
fn parallel_hits<M: Map>(map: &M, keys: &[String], iters: u64, threads: usize) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += common::released_together(threads, |t| {
            let mut k = t * 101;
            for _ in 0..LOOKUPS {
                k = (k + 7) % KEYS;
                black_box(map.hit(keys[k].as_str()));
            }
        });
    }
    total
}

fn hit_parallel(c: &mut Criterion) {
    let keys = keys();
    let (toctou, dash, moka, mutex) = (
        Toctou::build(&keys),
        Dash::build(&keys),
        Moka::build(&keys),
        MutexMap::build(&keys),
    );
    let mut g = c.benchmark_group("singleton_map_hit_parallel");
    g.sample_size(20);
    for threads in [1, 2, 4, 8, 16] {
        g.throughput(Throughput::Elements((threads * LOOKUPS) as u64));
        g.bench_with_input(
            BenchmarkId::new("toctou::SingletonMap::get_or_init", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| parallel_hits(&toctou, &keys, iters, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("dashmap::DashMap::get + Arc::clone", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| parallel_hits(&dash, &keys, iters, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("moka::sync::Cache::get_with_by_ref (hit)", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| parallel_hits(&moka, &keys, iters, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("Mutex<HashMap>::get + Arc::clone", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| parallel_hits(&mutex, &keys, iters, n)),
        );
    }
    g.finish();
}

criterion_group!(benches, hit, hit_parallel);
criterion_main!(benches);
