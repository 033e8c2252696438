//! Loom models of the `SingletonMap` protocol (src/singleton_map.rs over
//! src/table.rs, src/once.rs and src/wait.rs).
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_singleton_map
//! ```
//!
//! Every model is exhaustive except `three_threads_coalesce_on_one_key`,
//! which sets `preemption_bound = 2` to stay within seconds.
//!
//! The maps use a fixed hasher: loom replays each interleaving and needs the
//! same hash, hence the same shard, on every run. Each model was checked
//! against a deliberately broken protocol (scripts/loom-mutants.py); the
//! comments say which break each one catches.
#![cfg(toctou_loom)]

use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::pin::pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::task::{Context, Poll, Waker};

use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Notify};
use loom::thread;
use toctou::SingletonMap;

type Hasher = BuildHasherDefault<DefaultHasher>;
type Map<V> = SingletonMap<usize, V, Hasher>;

fn new_map<V>() -> Arc<Map<V>> {
    Arc::new(SingletonMap::with_hasher(Hasher::default()))
}

/// Same-key coalescing, the seed's bug: two chats ensure one model at once.
/// One init, and both get the same `Arc`.
///
/// Catches: releasing the shard lock between "the key is absent" and
/// "insert Pending" (check, then act): both callers insert and both start.
#[test]
fn two_threads_coalesce_on_one_key() {
    loom::model(|| {
        let map = new_map();
        let inits = Arc::new(AtomicUsize::new(0));
        let other = {
            let (map, inits) = (map.clone(), inits.clone());
            thread::spawn(move || {
                map.get_or_init(&1, |_| {
                    inits.fetch_add(1, Relaxed);
                    1
                })
            })
        };
        let mine = map.get_or_init(&1, |_| {
            inits.fetch_add(1, Relaxed);
            0
        });
        let theirs = other.join().unwrap();
        assert_eq!(inits.load(Relaxed), 1, "initialiser ran more than once");
        assert!(
            std::sync::Arc::ptr_eq(&mine, &theirs),
            "callers got different values"
        );
        assert_eq!(map.len(), 1);
    });
}

/// Three callers on one key; bounded to two preemptions, which is enough for
/// every bug the two-thread model catches to show with a third party.
#[test]
fn three_threads_coalesce_on_one_key() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let map = new_map();
        let inits = Arc::new(AtomicUsize::new(0));
        let spawn = |id: usize| {
            let (map, inits) = (map.clone(), inits.clone());
            thread::spawn(move || {
                *map.get_or_init(&7, |_| {
                    inits.fetch_add(1, Relaxed);
                    id
                })
            })
        };
        let (a, b) = (spawn(1), spawn(2));
        let mine = *map.get_or_init(&7, |_| {
            inits.fetch_add(1, Relaxed);
            0
        });
        assert_eq!(a.join().unwrap(), mine);
        assert_eq!(b.join().unwrap(), mine);
        assert_eq!(inits.load(Relaxed), 1, "initialiser ran more than once");
    });
}

/// A key that lands in the same shard as `key` (the worst case for
/// independence), found with the map's own hasher.
fn same_shard_key(map: &Map<usize>, key: usize) -> usize {
    // Mirrors src/table.rs: the shard index is taken from bits 32.. of the
    // hash, and loom builds use two shards.
    let shard = |k: usize| (map.hasher().hash_one(k) >> 32) & 1;
    (key + 1..).find(|k| shard(*k) == shard(key)).unwrap()
}

/// Two keys at once: the initialiser of key 1 cannot finish until the caller
/// of another key (in the same shard) has finished. If that caller waited for
/// key 1's initialiser, loom reports a deadlock.
///
/// Catches: holding the shard lock (even a read lock) while the initialiser
/// runs.
#[test]
fn different_keys_do_not_wait_for_each_other() {
    loom::model(|| {
        let map = new_map();
        let other_key = same_shard_key(&map, 1);
        let other_done = Arc::new(Notify::new());
        let slow = {
            let (map, other_done) = (map.clone(), other_done.clone());
            thread::spawn(move || {
                *map.get_or_init(&1, |_| {
                    other_done.wait();
                    10
                })
            })
        };
        assert_eq!(*map.get_or_init(&other_key, |_| 20), 20);
        other_done.notify();
        assert_eq!(slow.join().unwrap(), 10);
        assert_eq!(map.len(), 2);
    });
}

/// A value that counts its drops.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Relaxed);
    }
}

/// `remove` against an init of the same key. If the init had started before
/// `remove` was called, `remove` returns its value; otherwise the value is
/// either returned or still stored. Never lost, never dropped twice.
///
/// Catches: `remove` treating an in-flight init as absent instead of waiting
/// for it (shutdown misses the server that is starting).
#[test]
fn remove_against_an_init_in_flight() {
    loom::model(|| {
        let map = new_map();
        let drops = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicBool::new(false));
        let starter = {
            let (map, drops, started) = (map.clone(), drops.clone(), started.clone());
            thread::spawn(move || {
                map.get_or_init(&1, |_| {
                    // SeqCst: ordered against the load before `remove` below.
                    started.store(true, SeqCst);
                    Counted(drops)
                })
            })
        };
        let started_before_remove = started.load(SeqCst);
        let removed = map.remove(&1);
        let value = starter.join().unwrap();
        match &removed {
            Some(removed) => {
                assert!(
                    std::sync::Arc::ptr_eq(removed, &value),
                    "removed another value"
                );
                assert!(map.is_empty());
            }
            None => {
                assert!(
                    !started_before_remove,
                    "remove ignored an init that was already in flight"
                );
                let stored = map
                    .get(&1)
                    .expect("a started value is neither stored nor returned");
                assert!(std::sync::Arc::ptr_eq(&stored, &value));
            }
        }
        drop((removed, value));
        map.clear();
        assert_eq!(drops.load(Relaxed), 1, "the value must drop exactly once");
    });
}

/// A failing initialiser racing a succeeding one: errors are not stored, and
/// a caller that waited behind the failure runs its own initialiser.
///
/// Catches: a failed claim that does not remove its Pending entry (the other
/// caller finds Pending forever).
#[test]
fn failed_init_then_successful_init() {
    loom::model(|| {
        let map = new_map();
        let failing = {
            let map = map.clone();
            thread::spawn(move || map.get_or_try_init(&1, |_| Err::<usize, ()>(())))
        };
        let value = map.get_or_try_init(&1, |_| Ok::<_, ()>(5)).unwrap();
        assert_eq!(*value, 5);
        // The failing caller either failed, or arrived after the value was
        // stored and got it.
        match failing.join().unwrap() {
            Err(()) => {}
            Ok(got) => assert!(std::sync::Arc::ptr_eq(&got, &value)),
        }
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&1).as_deref(), Some(&5));
    });
}

/// Polls an async initialiser once (so that, if it got the claim, it holds
/// it) and then drops it, as a timeout would.
fn spawn_cancelled_init(map: &Arc<Map<usize>>) -> thread::JoinHandle<Poll<usize>> {
    let map = map.clone();
    thread::spawn(move || {
        let mut fut = pin!(map.get_or_init_async(&1, |_| std::future::pending::<usize>()));
        let polled = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        polled.map(|v| *v)
        // Dropping `fut` here cancels the initialiser.
    })
}

/// A cancelled async initialiser and a sync caller: the caller takes over.
///
/// Catches: a cancelled claim that removes its entry but never wakes the
/// waiters (the sync caller parks forever: loom reports the deadlock).
#[test]
fn cancelled_async_init_sync_caller_takes_over() {
    loom::model(|| {
        let map = new_map();
        let canceller = spawn_cancelled_init(&map);
        assert_eq!(*map.get_or_init(&1, |_| 3), 3);
        assert!(matches!(
            canceller.join().unwrap(),
            Poll::Pending | Poll::Ready(3)
        ));
        assert_eq!(map.len(), 1);
    });
}

/// The same with an async waiter, driven by loom's `block_on`, which only
/// re-polls when woken: a lost wake-up shows up as a deadlock.
#[test]
fn cancelled_async_init_async_waiter_takes_over() {
    loom::model(|| {
        let map = new_map();
        let canceller = spawn_cancelled_init(&map);
        let mine = loom::future::block_on(map.get_or_init_async(&1, |_| async { 4 }));
        assert_eq!(*mine, 4);
        assert!(matches!(
            canceller.join().unwrap(),
            Poll::Pending | Poll::Ready(4)
        ));
        assert_eq!(map.len(), 1);
        assert_eq!(format!("{:?}", *map), "{1: 4}", "no stray Pending entry");
    });
}

/// `clear` against an init in flight: as `remove`, it waits, so a value
/// whose init had started before `clear` is gone afterwards.
///
/// Catches: `clear` not collecting the inits in flight in a shard before it
/// filters it (it clears the shard, then the init stores a value).
#[test]
fn clear_against_an_init_in_flight() {
    clear_against_an_init_in_flight_with(|map| map.clear());
}

/// The same with `clear_async`, driven by loom's `block_on`: its wait on the
/// `Once` returns `Pending`, and the init's completion must wake it.
///
/// Catches: `retain_async` skipping its wait (the same leftover value), and
/// the in-flight collection shared with `clear` returning nothing.
#[test]
fn clear_async_against_an_init_in_flight() {
    clear_against_an_init_in_flight_with(|map| loom::future::block_on(map.clear_async()));
}

fn clear_against_an_init_in_flight_with(clear: fn(&Map<Counted>)) {
    loom::model(move || {
        let map = new_map();
        let drops = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicBool::new(false));
        let starter = {
            let (map, drops, started) = (map.clone(), drops.clone(), started.clone());
            thread::spawn(move || {
                drop(map.get_or_init(&1, |_| {
                    started.store(true, SeqCst);
                    Counted(drops)
                }))
            })
        };
        let started_before_clear = started.load(SeqCst);
        clear(&map);
        if started_before_clear {
            assert!(map.is_empty(), "clear left a value whose init it saw start");
        }
        starter.join().unwrap();
        map.clear();
        assert_eq!(drops.load(Relaxed), 1);
    });
}

/// `Hasher` must be deterministic for the models above to be sound.
#[test]
fn the_model_hasher_is_deterministic() {
    assert_eq!(
        Hasher::default().hash_one(1usize),
        Hasher::default().hash_one(1usize)
    );
}
