//! Integration tests for `SingletonMap`: the seed's model-server scenario,
//! parallel keys, `remove` against an in-flight init, retry after error, panic
//! and cancellation, reentrancy, and drop accounting.

use std::cell::Cell;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, mpsc};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use toctou::SingletonMap;

mod common;

/// A value that counts its drops in a shared counter.
struct Counted {
    id: usize,
    drops: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => (*payload.downcast::<&str>().unwrap()).to_owned(),
    }
}

/// The seed: `threads` chats call `ensure("phi-4")` at once; the start takes
/// 20 ms. Exactly one start, and everyone gets the same server.
fn seed_scenario(threads: usize) {
    let servers: SingletonMap<String, Counted> = SingletonMap::new();
    let starts = AtomicUsize::new(0);
    let drops = Arc::new(AtomicUsize::new(0));
    let barrier = Barrier::new(threads);
    let ptrs: Vec<usize> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let server = servers.get_or_init("phi-4", |model| {
                        assert_eq!(model, "phi-4");
                        let id = starts.fetch_add(1, SeqCst);
                        thread::sleep(Duration::from_millis(20));
                        Counted {
                            id,
                            drops: drops.clone(),
                        }
                    });
                    Arc::as_ptr(&server) as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(starts.load(SeqCst), 1, "servers started");
    assert!(
        ptrs.iter().all(|p| *p == ptrs[0]),
        "callers got different servers"
    );
    assert_eq!(servers.len(), 1);
    assert_eq!(servers.get("phi-4").unwrap().id, 0);
    drop(servers);
    assert_eq!(
        drops.load(SeqCst),
        1,
        "the one server is dropped with the map"
    );
}

#[test]
fn seed_scenario_10_threads() {
    seed_scenario(10);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "200 threads take minutes under miri; the 10-thread run covers it"
)]
fn seed_scenario_200_threads() {
    seed_scenario(200);
}

#[test]
#[cfg_attr(miri, ignore = "wall-clock check; miri's clock is not the machine's")]
fn different_keys_initialise_in_parallel() {
    let servers: SingletonMap<&str, u16> = SingletonMap::new();
    let barrier = Barrier::new(2);
    let start = Instant::now();
    thread::scope(|s| {
        for (model, port) in [("phi-4", 8001), ("nemotron", 8002)] {
            let (servers, barrier) = (&servers, &barrier);
            s.spawn(move || {
                barrier.wait();
                servers.get_or_init(&model, |_| {
                    thread::sleep(Duration::from_millis(200));
                    port
                })
            });
        }
    });
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_millis(350),
        "two 200 ms starts took {elapsed:?}: they were serialised"
    );
    assert_eq!(servers.len(), 2);
}

#[test]
fn a_caller_for_another_key_does_not_wait_for_a_running_init() {
    let map: SingletonMap<u32, u32> = SingletonMap::new();
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    thread::scope(|s| {
        // Owned by the scope's closure: if an assertion below fails, the
        // sender drops, the initialiser's `recv` fails, and the test ends
        // instead of hanging.
        let release_tx = release_tx;
        let map = &map;
        let slow = s.spawn(move || {
            *map.get_or_init(&1, |_| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                10
            })
        });
        started_rx.recv().unwrap();
        // Key 1 is in flight and will stay so until we release it: if key 2
        // waited for it, this would hang (and the scope would never end).
        let (done_tx, done_rx) = mpsc::channel();
        s.spawn(move || done_tx.send(*map.get_or_init(&2, |_| 20)).unwrap());
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(20));
        assert_eq!(map.get(&1), None, "get never waits for an init in flight");
        assert!(!map.contains_key(&1));
        assert_eq!(map.len(), 1, "len counts stored values only");
        release_tx.send(()).unwrap();
        assert_eq!(slow.join().unwrap(), 10);
    });
    assert_eq!(map.len(), 2);
}

/// Starts an init of `key` on another thread that signals when it has begun
/// and finishes only when released. Returns (release, handle).
fn in_flight<'s>(
    s: &'s thread::Scope<'s, '_>,
    map: &'s SingletonMap<String, Counted>,
    drops: &Arc<AtomicUsize>,
    id: usize,
) -> (mpsc::Sender<()>, thread::ScopedJoinHandle<'s, Arc<Counted>>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let drops = drops.clone();
    let handle = s.spawn(move || {
        map.get_or_init("phi-4", move |_| {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            Counted { id, drops }
        })
    });
    started_rx.recv().unwrap();
    (release_tx, handle)
}

#[test]
fn remove_waits_for_an_init_in_flight_and_removes_its_result() {
    let map = SingletonMap::new();
    let drops = Arc::new(AtomicUsize::new(0));
    thread::scope(|s| {
        let (release, starter) = in_flight(s, &map, &drops, 7);
        let remover = s.spawn(|| map.remove("phi-4"));
        // Let the remover find the init in flight and wait for it.
        thread::sleep(Duration::from_millis(30));
        assert!(!remover.is_finished(), "remove must wait for the start");
        release.send(()).unwrap();
        let started = starter.join().unwrap();
        let removed = remover
            .join()
            .unwrap()
            .expect("remove got the started value");
        assert!(Arc::ptr_eq(&started, &removed));
        assert_eq!(removed.id, 7);
    });
    assert!(map.is_empty(), "nothing left behind");
    assert_eq!(
        drops.load(SeqCst),
        1,
        "the removed value dropped with its last Arc"
    );
}

#[test]
fn remove_racing_get_or_init_never_loses_a_value() {
    let rounds = if cfg!(miri) { 5 } else { 300 };
    let drops = Arc::new(AtomicUsize::new(0));
    let created = AtomicUsize::new(0);
    for round in 0..rounds {
        let map: SingletonMap<String, Counted> = SingletonMap::new();
        let barrier = Barrier::new(2);
        let (got, removed) = thread::scope(|s| {
            let init = s.spawn(|| {
                barrier.wait();
                map.get_or_init("phi-4", |_| {
                    created.fetch_add(1, SeqCst);
                    Counted {
                        id: round,
                        drops: drops.clone(),
                    }
                })
            });
            let remove = s.spawn(|| {
                barrier.wait();
                map.remove("phi-4")
            });
            (init.join().unwrap(), remove.join().unwrap())
        });
        match removed {
            // remove ran after the value was stored: it got that value.
            Some(removed) => {
                assert!(
                    Arc::ptr_eq(&got, &removed),
                    "round {round}: removed another value"
                );
                assert!(map.is_empty(), "round {round}: removed, yet still stored");
            }
            // remove ran first: the value must still be tracked by the map.
            None => {
                let stored = map.get("phi-4").unwrap_or_else(|| {
                    panic!("round {round}: a started value is neither stored nor returned")
                });
                assert!(Arc::ptr_eq(&got, &stored));
            }
        }
    }
    assert_eq!(
        drops.load(SeqCst),
        created.load(SeqCst),
        "every value dropped exactly once"
    );
    assert_eq!(created.load(SeqCst), rounds, "one init per round");
}

#[test]
fn failed_init_is_not_stored_and_a_waiter_runs_its_own() {
    let map: SingletonMap<String, u32> = SingletonMap::new();
    let second_runs = AtomicUsize::new(0);
    let (started_tx, started_rx) = mpsc::channel();
    thread::scope(|s| {
        let first = s.spawn(|| {
            map.get_or_try_init("db", |_| {
                started_tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(50)); // the waiter parks
                Err("backend down")
            })
        });
        started_rx.recv().unwrap();
        let second = s.spawn(|| {
            map.get_or_try_init("db", |_| {
                second_runs.fetch_add(1, SeqCst);
                Ok::<u32, &str>(2)
            })
        });
        assert_eq!(first.join().unwrap().unwrap_err(), "backend down");
        assert_eq!(*second.join().unwrap().unwrap(), 2);
    });
    assert_eq!(second_runs.load(SeqCst), 1);
    assert_eq!(map.len(), 1);
}

#[test]
fn failed_init_leaves_no_entry() {
    let map: SingletonMap<u8, u8> = SingletonMap::new();
    assert_eq!(map.get_or_try_init(&1, |_| Err(())), Err(()));
    assert!(map.is_empty());
    assert_eq!(map.get(&1), None);
    assert_eq!(map.remove(&1), None, "no stray Pending to wait for");
    assert_eq!(format!("{map:?}"), "{}");
}

#[test]
fn panicking_init_is_retryable_and_a_waiter_takes_over() {
    let map: SingletonMap<String, u32> = SingletonMap::new();
    let (started_tx, started_rx) = mpsc::channel();
    thread::scope(|s| {
        let first = s.spawn(|| {
            catch_unwind(AssertUnwindSafe(|| {
                map.get_or_init("phi-4", |_| {
                    started_tx.send(()).unwrap();
                    thread::sleep(Duration::from_millis(50));
                    panic!("port in use");
                })
            }))
        });
        started_rx.recv().unwrap();
        let second = s.spawn(|| *map.get_or_init("phi-4", |_| 3));
        let payload = first
            .join()
            .unwrap()
            .expect_err("the panic reaches its caller");
        assert_eq!(panic_message(payload), "port in use");
        assert_eq!(second.join().unwrap(), 3);
    });
    assert_eq!(map.get("phi-4").as_deref(), Some(&3), "no poisoning");
}

/// Runs `f` on its own thread and returns its result, or fails the test if
/// it has not finished within 10 s: a deadlock is a failure, not a hang.
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} deadlocked (no result after 10 s)"))
}

#[test]
fn reentrant_init_of_the_same_key_panics_with_a_message() {
    let map: Arc<SingletonMap<String, u32>> = Arc::new(SingletonMap::new());
    let payload = within_10s("reentrant get_or_init", {
        let map = map.clone();
        move || {
            catch_unwind(AssertUnwindSafe(|| {
                map.get_or_init("phi-4", |_| *map.get_or_init("phi-4", |_| 1))
            }))
            .map(|v| *v)
        }
    })
    .expect_err("reentrancy must panic");
    let message = panic_message(payload);
    assert!(message.contains("reentrant initialisation"), "{message}");
    assert!(
        message.contains("toctou::SingletonMap<alloc::string::String, u32>"),
        "{message}"
    );
    assert!(
        message.contains("singleton_map.rs"),
        "names the creation site: {message}"
    );
    assert!(
        map.is_empty(),
        "the outer init unwound and released the key"
    );
    assert_eq!(*map.get_or_init("phi-4", |_| 2), 2, "still usable");
}

#[test]
fn reentrant_remove_or_clear_of_the_key_being_initialised_panics() {
    let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
    for (what, op) in [
        (
            "remove",
            (|m: &SingletonMap<u8, u8>| drop(m.remove(&1))) as fn(&SingletonMap<u8, u8>),
        ),
        ("clear", |m| m.clear()),
        ("retain", |m| m.retain(|_, _| true)),
    ] {
        let payload = within_10s(what, {
            let map = map.clone();
            move || {
                catch_unwind(AssertUnwindSafe(|| {
                    *map.get_or_init(&1, |_| {
                        op(&map);
                        1
                    })
                }))
            }
        })
        .expect_err("it would wait for itself");
        let message = panic_message(payload);
        assert!(
            message.contains("reentrant initialisation"),
            "{what}: {message}"
        );
        assert!(map.is_empty(), "{what}");
    }
}

#[test]
fn initialising_a_different_key_inside_an_initialiser_is_fine() {
    let map: Arc<SingletonMap<&str, u32>> = Arc::new(SingletonMap::new());
    let outer = within_10s("initialising another key from an initialiser", {
        let map = map.clone();
        move || *map.get_or_init(&"outer", |_| *map.get_or_init(&"inner", |_| 1) + 1)
    });
    assert_eq!(outer, 2);
    assert_eq!(map.len(), 2);
}

#[test]
fn waiting_for_another_threads_key_from_inside_an_initialiser_is_not_reentrancy() {
    let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
    let (started_tx, started_rx) = mpsc::channel();
    let other = thread::spawn({
        let map = map.clone();
        move || {
            *map.get_or_init(&2, |_| {
                started_tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(30));
                20
            })
        }
    });
    started_rx.recv().unwrap();
    // This thread initialises key 1 and, inside, waits for key 2, which the
    // other thread is initialising: a wait, not a reentrant call.
    let one = within_10s("waiting for another thread's key", {
        let map = map.clone();
        move || *map.get_or_init(&1, |_| *map.get_or_init(&2, |_| 0) / 2)
    });
    assert_eq!(one, 10);
    assert_eq!(other.join().unwrap(), 20);
}

#[test]
fn retain_predicate_calling_back_into_its_shard_panics_instead_of_deadlocking() {
    let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
    map.get_or_init(&1, |_| 1);
    let payload = within_10s("a retain predicate reading its own key", {
        let map = map.clone();
        move || {
            catch_unwind(AssertUnwindSafe(|| {
                // The key being visited is certainly in the locked shard.
                map.retain(|k, _| map.get(k).is_some());
            }))
        }
    })
    .expect_err("the predicate must not deadlock on its own shard");
    let message = panic_message(payload);
    assert!(message.contains("toctou::SingletonMap"), "{message}");
    assert!(message.contains("retain"), "{message}");
    assert_eq!(map.len(), 1, "the map is intact after the panic");
    assert_eq!(map.get(&1).as_deref(), Some(&1));
}

#[test]
fn a_retain_predicate_may_wait_for_a_shard_that_another_thread_holds() {
    let a: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
    let b: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
    a.get_or_init(&1, |_| 1);
    b.get_or_init(&2, |_| 2);
    let (started_tx, started_rx) = mpsc::channel();
    // Another thread holds the shard of b's key 2 (its retain predicate runs
    // under that shard's write lock) for a while.
    let holder = thread::spawn({
        let b = b.clone();
        move || {
            b.retain(|_, _| {
                started_tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(50));
                true
            })
        }
    });
    started_rx.recv().unwrap();
    // a's predicate runs under a's shard lock and reads b: it must wait for
    // the other thread, not mistake that wait for a reentrant call.
    let seen = within_10s("a retain predicate reading another map", {
        let (a, b) = (a.clone(), b.clone());
        move || {
            let mut seen = None;
            a.retain(|_, _| {
                seen = b.get(&2).map(|v| *v);
                true
            });
            seen
        }
    });
    assert_eq!(seen, Some(2));
    holder.join().unwrap();
}

#[test]
fn retain_and_clear_drop_what_they_remove_and_keep_len_exact() {
    let drops = Arc::new(AtomicUsize::new(0));
    let map: SingletonMap<usize, Counted> = SingletonMap::new();
    for id in 0..100 {
        map.get_or_init(&id, |_| Counted {
            id,
            drops: drops.clone(),
        });
    }
    assert_eq!(map.len(), 100);
    map.retain(|k, v| {
        assert_eq!(*k, v.id);
        k % 2 == 0
    });
    assert_eq!(map.len(), 50);
    assert_eq!(drops.load(SeqCst), 50);
    assert!(map.contains_key(&2) && !map.contains_key(&3));

    // A predicate that panics part-way leaves `len` consistent.
    let mut seen = 0;
    let _ = catch_unwind(AssertUnwindSafe(|| {
        map.retain(|_, _| {
            seen += 1;
            assert!(seen < 10, "give up");
            false
        })
    }));
    let left = (0..100).filter(|k| map.contains_key(k)).count();
    assert_eq!(map.len(), left);
    assert_eq!(drops.load(SeqCst), 100 - left);

    map.clear();
    assert!(map.is_empty());
    assert_eq!(drops.load(SeqCst), 100);
}

#[test]
fn clear_waits_for_an_init_in_flight() {
    let map = SingletonMap::new();
    let drops = Arc::new(AtomicUsize::new(0));
    thread::scope(|s| {
        let (release, starter) = in_flight(s, &map, &drops, 1);
        let clearer = s.spawn(|| map.clear());
        thread::sleep(Duration::from_millis(30));
        assert!(!clearer.is_finished(), "clear must wait for the start");
        release.send(()).unwrap();
        clearer.join().unwrap();
        drop(starter.join().unwrap());
    });
    assert!(map.is_empty());
    assert_eq!(drops.load(SeqCst), 1);
}

/// A key whose `Hash` panics for key 0 while this thread has armed it with
/// [`with_hash_of_zero_panicking`]: hostile user code that the map calls.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fragile(u64);

thread_local! {
    static HASH_OF_ZERO_PANICS: Cell<bool> = const { Cell::new(false) };
}

impl Hash for Fragile {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.0 == 0 && HASH_OF_ZERO_PANICS.get() {
            panic!("the Hash of key 0 panics");
        }
        state.write_u64(self.0);
    }
}

/// Runs `f` with key 0's `Hash` panicking on this thread, and catches the
/// panic if one escapes.
fn with_hash_of_zero_panicking<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    HASH_OF_ZERO_PANICS.set(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    HASH_OF_ZERO_PANICS.set(false);
    result
}

/// Hashes a `u64` to itself, so that which bucket a key lands in, and when
/// the table rehashes in place, are deterministic.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("Fragile hashes one u64")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdentityHash = BuildHasherDefault<Identity>;

/// The keys that survive the table set-up below: 0 and 41..56.
fn survivors() -> impl Iterator<Item = u64> {
    std::iter::once(0).chain(41..56)
}

#[test]
fn a_panicking_hash_during_a_rehash_does_not_lose_other_keys_values() {
    // 56 keys fill a 64-bucket table (capacity 56); removing 40 of them
    // leaves 40 tombstones and no growth left, so the next insert rehashes
    // in place. If that rehash called `Hash` on the stored keys, key 0's
    // panic would drop every entry not yet rehashed: here, all 16.
    let map: SingletonMap<Fragile, u64, IdentityHash> = SingletonMap::default();
    let runs = AtomicUsize::new(0);
    let init = |k: &Fragile| {
        runs.fetch_add(1, SeqCst);
        k.0
    };
    for k in 0..56 {
        map.get_or_init(&Fragile(k), init);
    }
    for k in 1..=40 {
        assert_eq!(map.remove(&Fragile(k)).as_deref(), Some(&k));
    }
    assert_eq!(map.len(), 16);

    let inserted = with_hash_of_zero_panicking(|| *map.get_or_init(&Fragile(60), init));
    for k in survivors() {
        assert_eq!(
            map.get(&Fragile(k)).as_deref(),
            Some(&k),
            "key {k}'s value survived"
        );
    }
    assert_eq!(*map.get_or_init(&Fragile(41), init), 41);
    assert_eq!(runs.load(SeqCst), 57, "no key is initialised twice");
    assert_eq!(
        inserted.ok(),
        Some(60),
        "growing the table calls no user Hash, so key 0's cannot panic"
    );
    assert_eq!(map.len(), 17);
}

#[test]
fn a_panicking_hash_during_a_rehash_does_not_lose_inits_in_flight() {
    // The same table shape, in `pending`: 56 async inits are suspended, 40
    // are cancelled, and a 57th claim rehashes the in-flight table in place.
    let map: SingletonMap<Fragile, u64, IdentityHash> = SingletonMap::default();
    let open = Cell::new(false);
    let runs = Cell::new(0);
    let gated = |k: &Fragile| {
        runs.set(runs.get() + 1);
        let k = k.0;
        let open = &open;
        async move {
            std::future::poll_fn(|_| {
                if open.get() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            k
        }
    };
    let keys: Vec<Fragile> = (0..=60).map(Fragile).collect();
    let mut cx = Context::from_waker(Waker::noop());
    let mut inits: Vec<_> = keys[..56]
        .iter()
        .map(|k| Box::pin(map.get_or_init_async(k, gated)))
        .collect();
    for init in &mut inits {
        assert!(init.as_mut().poll(&mut cx).is_pending(), "suspended");
    }
    // Cancelled: each gives its claim back, leaving a tombstone.
    drop(inits.drain(1..=40));

    let mut sixty = Box::pin(map.get_or_init_async(&keys[60], gated));
    let claimed = with_hash_of_zero_panicking(|| sixty.as_mut().poll(&mut cx).is_pending());

    // Every surviving claim is still in the map: a newcomer for its key
    // waits for it instead of claiming the key a second time.
    for k in survivors() {
        let mut newcomer = Box::pin(map.get_or_init_async(&keys[k as usize], gated));
        assert!(newcomer.as_mut().poll(&mut cx).is_pending());
        assert_eq!(runs.get(), 57, "key {k}'s initialiser ran twice");
    }
    assert_eq!(
        claimed.ok(),
        Some(true),
        "growing the table calls no user Hash, so key 0's cannot panic"
    );

    open.set(true);
    inits.push(sixty);
    for (init, k) in inits.iter_mut().zip(survivors().chain([60])) {
        let published = catch_unwind(AssertUnwindSafe(|| init.as_mut().poll(&mut cx)));
        match published {
            Ok(Poll::Ready(value)) => assert_eq!(*value, k),
            Ok(Poll::Pending) => panic!("key {k}'s init is still pending"),
            Err(_) => panic!("publishing key {k} panicked: its pending entry was lost"),
        }
    }
    assert_eq!(map.len(), 17);
    assert_eq!(format!("{map:?}").matches("<initializing>").count(), 0);
}

#[test]
fn borrowed_keys_and_values_behave_like_a_map() {
    let map: SingletonMap<String, String> = SingletonMap::default();
    assert!(map.is_empty());
    let v = map.get_or_init("a", |k| k.to_uppercase());
    assert_eq!(*v, "A");
    assert!(!map.is_empty());
    assert_eq!(map.len(), 1);
    assert!(map.contains_key("a"));
    assert_eq!(map.get("a").as_deref().map(String::as_str), Some("A"));
    assert_eq!(format!("{map:?}"), r#"{"a": "A"}"#);
    assert_eq!(map.remove("a").as_deref().map(String::as_str), Some("A"));
    assert!(map.is_empty());
}

#[test]
fn debug_shows_keys_in_flight_without_waiting() {
    let map: SingletonMap<u8, u8> = SingletonMap::new();
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    thread::scope(|s| {
        let release_tx = release_tx; // dropped if an assertion fails
        let map = &map;
        s.spawn(move || {
            map.get_or_init(&1, |_| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                1
            })
        });
        started_rx.recv().unwrap();
        assert_eq!(format!("{map:?}"), "{1: <initializing>}");
        release_tx.send(()).unwrap();
    });
    assert_eq!(format!("{map:?}"), "{1: 1}");
}

#[test]
fn thread_safety_bounds() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<SingletonMap<String, Vec<u8>>>();
    let map: SingletonMap<String, u32> = SingletonMap::new();
    // The async futures can be spawned on a multi-threaded runtime.
    assert_send(&map.get_or_init_async("k", |_| async { 1 }));
    assert_send(&map.get_or_try_init_async("k", |_| async { Ok::<_, ()>(1) }));
    assert_send(&map.remove_async("k"));
    assert_send(&map.retain_async(|_, _| true));
    assert_send(&map.clear_async());
}

mod without_a_runtime {
    //! Async paths driven by a minimal thread-parking executor, so that miri
    //! (which does not run the tokio tests) checks them too.
    use super::*;
    use std::task::{Context, Waker};

    use crate::common::block_on;

    #[test]
    fn dropped_async_initialiser_hands_over_to_a_parked_sync_waiter() {
        let map: SingletonMap<u8, u8> = SingletonMap::new();
        let mut init = Box::pin(map.get_or_init_async(&1, |_| std::future::pending::<u8>()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(init.as_mut().poll(&mut cx).is_pending(), "holds the claim");
        assert_eq!(format!("{map:?}"), "{1: <initializing>}");
        thread::scope(|s| {
            let waiter = s.spawn(|| *map.get_or_init(&1, |_| 9));
            thread::sleep(Duration::from_millis(20)); // let the waiter park
            drop(init); // cancellation: the claim is given back
            assert_eq!(waiter.join().unwrap(), 9);
        });
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn cancelled_initialiser_with_no_waiters_leaves_nothing() {
        let map: SingletonMap<u8, u8> = SingletonMap::new();
        let mut init = Box::pin(map.get_or_init_async(&1, |_| std::future::pending::<u8>()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(init.as_mut().poll(&mut cx).is_pending());
        drop(init);
        assert_eq!(format!("{map:?}"), "{}", "no stray Pending entry");
        assert_eq!(
            block_on(map.get_or_init_async(&1, |_| async { 2 })),
            Arc::new(2)
        );
    }

    #[test]
    fn dropped_async_waiters_and_removers_leave_nothing_behind() {
        let map: SingletonMap<u8, u8> = SingletonMap::new();
        let (in_init_tx, in_init_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            let release_tx = release_tx; // dropped if an assertion fails
            let map = &map;
            let initialiser = s.spawn(move || {
                *map.get_or_init(&1, |_| {
                    in_init_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    4
                })
            });
            in_init_rx.recv().unwrap();
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..3 {
                let mut waiter = Box::pin(map.get_or_init_async(&1, |_| async { 5 }));
                assert!(
                    waiter.as_mut().poll(&mut cx).is_pending(),
                    "queued behind the init"
                );
                drop(waiter);
                let mut remover = Box::pin(map.remove_async(&1));
                assert!(
                    remover.as_mut().poll(&mut cx).is_pending(),
                    "waits for the init"
                );
                drop(remover); // a cancelled remove removes nothing
            }
            release_tx.send(()).unwrap();
            assert_eq!(initialiser.join().unwrap(), 4);
        });
        assert_eq!(map.get(&1).as_deref(), Some(&4));
        assert_eq!(block_on(map.remove_async(&1)).as_deref(), Some(&4));
        assert!(map.is_empty());
    }

    /// Counts how often it is woken.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn dropped_clear_async_and_retain_async_leave_no_waiter_and_no_entry_behind() {
        let map: SingletonMap<u8, u8> = SingletonMap::new();
        for k in 2..40 {
            map.get_or_init(&k, |k| *k);
        }
        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let (in_init_tx, in_init_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            let release_tx = release_tx; // dropped if an assertion fails
            let map = &map;
            let initialiser = s.spawn(move || {
                *map.get_or_init(&1, |_| {
                    in_init_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    1
                })
            });
            in_init_rx.recv().unwrap();
            let mut cx = Context::from_waker(&waker);
            let mut clear = Box::pin(map.clear_async());
            assert!(clear.as_mut().poll(&mut cx).is_pending(), "waits for key 1");
            drop(clear);
            let mut retain = Box::pin(map.retain_async(|_, _| false));
            assert!(
                retain.as_mut().poll(&mut cx).is_pending(),
                "waits for key 1"
            );
            drop(retain);
            release_tx.send(()).unwrap();
            assert_eq!(initialiser.join().unwrap(), 1);
        });
        // A waiter left queued on key 1's init would have been woken when
        // it finished.
        assert_eq!(wakes.0.load(SeqCst), 0, "no waiter left behind");
        assert_eq!(
            map.get(&1).as_deref(),
            Some(&1),
            "a cancelled clear leaves the shard it waited in untouched"
        );
        let left = (1..40).filter(|k| map.contains_key(k)).count();
        assert_eq!(map.len(), left, "len agrees with the keys present");
        assert!(!format!("{map:?}").contains("<initializing>"));
        // No stale claim either: a new init of key 1 runs at once.
        block_on(map.clear_async());
        assert!(map.is_empty());
        let mut again = Box::pin(map.get_or_init_async(&1, |_| async { 2 }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(again.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn clear_async_or_retain_async_inside_the_keys_own_initialiser_panics() {
        let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
        for op in ["clear_async", "retain_async"] {
            let payload = within_10s(op, {
                let map = map.clone();
                move || {
                    catch_unwind(AssertUnwindSafe(|| {
                        *block_on(map.get_or_init_async(&1, |_| async {
                            match op {
                                "clear_async" => map.clear_async().await,
                                _ => map.retain_async(|_, _| true).await,
                            }
                            1
                        }))
                    }))
                }
            })
            .expect_err("it would wait for itself");
            let message = panic_message(payload);
            assert!(
                message.contains("reentrant initialisation"),
                "{op}: {message}"
            );
            assert!(map.is_empty(), "{op}");
        }
    }

    #[test]
    fn async_waiter_is_woken_by_a_sync_initialiser() {
        let map: SingletonMap<u8, u8> = SingletonMap::new();
        let (started_tx, started_rx) = mpsc::channel();
        thread::scope(|s| {
            let first = s.spawn(|| {
                *map.get_or_init(&1, |_| {
                    started_tx.send(()).unwrap();
                    thread::sleep(Duration::from_millis(30));
                    1
                })
            });
            started_rx.recv().unwrap();
            let second = s.spawn(|| *block_on(map.get_or_init_async(&1, |_| async { 2 })));
            assert_eq!((first.join().unwrap(), second.join().unwrap()), (1, 1));
        });
    }
}

#[cfg(not(miri))]
mod with_tokio {
    //! Async tests on tokio's multi-threaded runtime (a dev-dependency only).
    use super::*;
    use tokio::time::{sleep, timeout};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_async_initialiser_is_taken_over_by_an_async_waiter() {
        let map: Arc<SingletonMap<String, &str>> = Arc::new(SingletonMap::new());
        let slow = timeout(
            Duration::from_millis(30),
            map.get_or_init_async("phi-4", |_| async {
                sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        );
        let waiter = tokio::spawn({
            let map = map.clone();
            async move {
                // Arrive while the slow initialiser holds the claim.
                sleep(Duration::from_millis(10)).await;
                *map.get_or_init_async("phi-4", |_| async { "taken over" })
                    .await
            }
        });
        assert!(slow.await.is_err(), "the slow initialiser timed out");
        assert_eq!(waiter.await.unwrap(), "taken over");
        assert_eq!(map.get("phi-4").as_deref(), Some(&"taken over"));
        assert_eq!(map.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn async_and_sync_callers_coalesce_on_one_key() {
        let map: Arc<SingletonMap<String, usize>> = Arc::new(SingletonMap::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (map, runs) = (map.clone(), runs.clone());
            if i % 2 == 0 {
                tasks.push(tokio::spawn(async move {
                    let v = map
                        .get_or_init_async("k", |_| async move {
                            runs.fetch_add(1, SeqCst);
                            sleep(Duration::from_millis(20)).await;
                            i
                        })
                        .await;
                    Arc::as_ptr(&v) as usize
                }));
            } else {
                tasks.push(tokio::task::spawn_blocking(move || {
                    let v = map.get_or_init("k", |_| {
                        runs.fetch_add(1, SeqCst);
                        thread::sleep(Duration::from_millis(20));
                        i
                    });
                    Arc::as_ptr(&v) as usize
                }));
            }
        }
        let mut ptrs = Vec::new();
        for t in tasks {
            ptrs.push(t.await.unwrap());
        }
        assert_eq!(runs.load(SeqCst), 1);
        assert!(ptrs.iter().all(|p| *p == ptrs[0]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_tasks_on_the_initialising_thread_wait_without_a_false_reentrancy_panic() {
        let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
        let initialiser = tokio::spawn({
            let map = map.clone();
            async move {
                *map.get_or_init_async(&1, |_| async {
                    sleep(Duration::from_millis(20)).await;
                    1
                })
                .await
            }
        });
        let waiter = tokio::spawn({
            let map = map.clone();
            async move {
                tokio::task::yield_now().await;
                *map.get_or_init_async(&1, |_| async { 2 }).await
            }
        });
        assert_eq!(initialiser.await.unwrap(), 1);
        assert_eq!(waiter.await.unwrap(), 1);
    }

    /// On a current-thread runtime, an async init suspended on the runtime's
    /// one thread finishes only if that thread keeps polling it: a `clear`
    /// or `retain` that parks the thread to wait for it never returns. The
    /// `_async` forms wait by returning `Pending`, so the init finishes and
    /// they complete. Run under a watchdog, so a deadlock fails the test.
    #[test]
    fn clear_and_retain_async_wait_for_an_init_suspended_on_the_same_thread() {
        for op in ["clear", "retain"] {
            let (value_of_1, value_of_2) = within_10s(op, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
                    map.get_or_init(&2, |_| 2);
                    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
                    let init = tokio::spawn({
                        let map = map.clone();
                        async move {
                            *map.get_or_init_async(&1, |_| async move {
                                started_tx.send(()).unwrap();
                                sleep(Duration::from_millis(20)).await;
                                1
                            })
                            .await
                        }
                    });
                    // The init is now suspended in its sleep, on this thread.
                    started_rx.await.unwrap();
                    match op {
                        "clear" => map.clear_async().await,
                        _ => map.retain_async(|k, _| *k == 2).await,
                    }
                    assert_eq!(init.await.unwrap(), 1, "the init finished");
                    (map.get(&1), map.get(&2))
                })
            });
            // It waited for the init and then acted on its result.
            assert_eq!(value_of_1, None, "{op} removed the init's value");
            let kept = (op == "retain").then_some(2);
            assert_eq!(value_of_2.as_deref().copied(), kept, "{op}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_async_waits_for_an_async_init() {
        let map: Arc<SingletonMap<u8, u8>> = Arc::new(SingletonMap::new());
        let init = tokio::spawn({
            let map = map.clone();
            async move {
                map.get_or_init_async(&1, |_| async {
                    sleep(Duration::from_millis(30)).await;
                    1
                })
                .await
            }
        });
        sleep(Duration::from_millis(10)).await;
        let removed = map.remove_async(&1).await.expect("waited for the init");
        assert!(Arc::ptr_eq(&removed, &init.await.unwrap()));
        assert!(map.is_empty());
    }
}
