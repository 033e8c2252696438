//! Criterion benchmarks for `KeyedLocks`, side by side with the baselines of
//! issue 3, so that ratios come from one run:
//!
//! - `Mutex<HashMap<K, Arc<Mutex<()>>>>` that removes the key's entry on
//!   release when nobody else holds a clone (the careful hand-written map);
//! - `DashMap<K, Arc<parking_lot::Mutex<()>>>` that never removes (the
//!   leaky floor: it never pays for creating or removing an entry once a key
//!   was seen; it looks up with a shared `get` first, and only inserts on a
//!   miss, its fastest correct use);
//! - `lockmap::LockMap<K, ()>` (`entry`), which removes idle entries.
//!
//! Every map hashes with the same hasher (foldhash, lockmap's default), so
//! the comparison is of the lock protocols, not of the hash functions.
//! Keys are `u64`.
//!
//! Groups (one per scenario):
//! - `keyed_fresh_key`: one thread locks and unlocks keys that nobody else
//!   holds, cycling over 1,024 keys. For the removing maps each lock creates
//!   the key's entry and each unlock removes it; the leaky map has them all.
//!   Targets: toctou at least as fast as lockmap, and within 1.5x of the
//!   leaky DashMap floor.
//! - `keyed_beside_held_keys`: the same while 1,024 other keys are held
//!   long-term by guards, so the shards are populated (the entry of the key
//!   itself is still created and removed). Target: at least as fast as
//!   lockmap.
//! - `keyed_disjoint_parallel/N`: N threads (1, 2, 4, 8, 16), each cycling
//!   over its own 512 keys; `OPS` lock+unlock pairs per thread. Target (at 2
//!   threads): at least as fast as lockmap. A `ceiling` row has each thread
//!   lock a mutex of its own on its own cache line: what the machine allows
//!   when nothing at all is shared (issue 17 reads the others against it).
//! - `keyed_hot_key_parallel/N`: N threads lock and unlock one key; `OPS`
//!   pairs per thread. Target (at 2 threads): at least as fast as lockmap.
//!
//! Rows with more threads than the machine has cores measure
//! oversubscription, not scaling.
//!
//! Run: `cargo bench --bench keyed_locks`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use foldhash::fast::RandomState;

mod common;

/// Keys cycled over by the single-thread groups.
const KEYS: u64 = 1_024;
/// Lock+unlock pairs per thread per iteration in the parallel groups.
const OPS: u64 = 20_000;

/// The lock maps compared, behind one interface: lock `key`, run `f` while
/// holding it, unlock.
trait LockMap: Sync + Sized {
    const NAME: &'static str;
    fn new() -> Self;
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R;
}

struct Toctou(toctou::KeyedLocks<u64, RandomState>);

impl LockMap for Toctou {
    const NAME: &'static str = "toctou::KeyedLocks::lock";
    fn new() -> Self {
        Self(toctou::KeyedLocks::with_hasher(RandomState::default()))
    }
    #[inline]
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R {
        let _guard = self.0.lock(&key);
        f()
    }
}

struct Careful(Mutex<HashMap<u64, Arc<Mutex<()>>, RandomState>>);

impl LockMap for Careful {
    const NAME: &'static str = "Mutex<HashMap<K, Arc<Mutex>>> removing";
    fn new() -> Self {
        Self(Mutex::new(HashMap::with_hasher(RandomState::default())))
    }
    #[inline]
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R {
        let slot = self.0.lock().unwrap().entry(key).or_default().clone();
        let out = {
            let _held = slot.lock().unwrap();
            f()
        };
        let mut map = self.0.lock().unwrap();
        // Clones are only made under the map lock, so the count is exact:
        // the map's and ours means nobody else holds or waits for the key.
        if Arc::strong_count(&slot) == 2 {
            map.remove(&key);
        }
        out
    }
}

struct LeakyDash(dashmap::DashMap<u64, Arc<parking_lot::Mutex<()>>, RandomState>);

impl LockMap for LeakyDash {
    const NAME: &'static str = "DashMap<K, Arc<parking_lot::Mutex>> leaky";
    fn new() -> Self {
        Self(dashmap::DashMap::with_hasher(RandomState::default()))
    }
    #[inline]
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R {
        let slot = match self.0.get(&key) {
            Some(slot) => slot.clone(),
            None => self.0.entry(key).or_default().clone(),
        };
        let _held = slot.lock();
        f()
    }
}

/// Not a keyed map: each thread locks a mutex of its own (the one of its
/// key range, `key / KEYS`), on its own cache line. Nothing is shared, so
/// this is the machine's ceiling for the disjoint-keys group.
struct Ceiling(Vec<Padded>);

#[repr(align(128))]
#[derive(Default)]
struct Padded(parking_lot::Mutex<()>);

/// Threads in the parallel groups, at most.
const MAX_THREADS: usize = 16;

impl LockMap for Ceiling {
    const NAME: &'static str = "ceiling: a private mutex per thread";
    fn new() -> Self {
        Self((0..MAX_THREADS).map(|_| Padded::default()).collect())
    }
    #[inline]
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R {
        let _held = self.0[(key / KEYS) as usize % MAX_THREADS].0.lock();
        f()
    }
}

struct Lockmap(lockmap::LockMap<u64, ()>);

impl LockMap for Lockmap {
    const NAME: &'static str = "lockmap::LockMap::entry";
    fn new() -> Self {
        Self(lockmap::LockMap::new())
    }
    #[inline]
    fn with<R>(&self, key: u64, f: impl FnOnce() -> R) -> R {
        let _entry = self.0.entry(key);
        f()
    }
}

fn fresh_key<M: LockMap>(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let map = M::new();
    let mut key = 0u64;
    c.bench_function(M::NAME, |b| {
        b.iter(|| {
            key = (key + 1) % KEYS;
            map.with(black_box(key), || black_box(key))
        })
    });
}

fn beside_held_keys<M: LockMap>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let map = M::new();
    let mut key = 0u64;
    // Hold keys KEYS..2*KEYS on another thread for the whole measurement:
    // nested `with` calls, one per key, parked at the innermost.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let map = &map;
        s.spawn(move || {
            fn hold<M: LockMap>(map: &M, key: u64, end: u64, at_bottom: &dyn Fn()) {
                if key == end {
                    at_bottom();
                } else {
                    map.with(key, || hold(map, key + 1, end, at_bottom));
                }
            }
            hold(map, KEYS, 2 * KEYS, &|| {
                ready_tx.send(()).unwrap();
                done_rx.recv().unwrap();
            });
        });
        ready_rx.recv().unwrap();
        c.bench_function(M::NAME, |b| {
            b.iter(|| {
                key = (key + 1) % KEYS;
                map.with(black_box(key), || black_box(key))
            })
        });
        done_tx.send(()).unwrap();
    });
}

fn parallel<M: LockMap>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    threads: usize,
    hot: bool,
) {
    let map = M::new();
    c.bench_with_input(
        BenchmarkId::new(M::NAME, threads),
        &threads,
        |b, &threads| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += common::released_together(threads, |t| {
                        for i in 0..OPS {
                            let key = if hot {
                                0
                            } else {
                                t as u64 * KEYS + i % (KEYS / 2)
                            };
                            map.with(black_box(key), || black_box(i));
                        }
                    });
                }
                total
            })
        },
    );
}

fn bench(c: &mut Criterion) {
    {
        let mut g = c.benchmark_group("keyed_fresh_key");
        fresh_key::<Toctou>(&mut g);
        fresh_key::<Lockmap>(&mut g);
        fresh_key::<LeakyDash>(&mut g);
        fresh_key::<Careful>(&mut g);
        g.finish();
    }
    {
        let mut g = c.benchmark_group("keyed_beside_held_keys");
        beside_held_keys::<Toctou>(&mut g);
        beside_held_keys::<Lockmap>(&mut g);
        beside_held_keys::<LeakyDash>(&mut g);
        beside_held_keys::<Careful>(&mut g);
        g.finish();
    }
    for (name, hot) in [
        ("keyed_disjoint_parallel", false),
        ("keyed_hot_key_parallel", true),
    ] {
        let mut g = c.benchmark_group(name);
        g.sample_size(20);
        for threads in [1, 2, 4, 8, MAX_THREADS] {
            g.throughput(Throughput::Elements(threads as u64 * OPS));
            parallel::<Toctou>(&mut g, threads, hot);
            parallel::<Lockmap>(&mut g, threads, hot);
            parallel::<LeakyDash>(&mut g, threads, hot);
            parallel::<Careful>(&mut g, threads, hot);
            if !hot {
                parallel::<Ceiling>(&mut g, threads, hot);
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
