//! Integration tests for `Singleton` and `Lazy`: the seed scenario, retry after
//! error, panic and cancellation, reentrancy, and sync/async races.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use toctou::{Lazy, Singleton};

mod common;

/// The seed's orchestrator: a sessions map and one cleanup thread per instance.
struct Orchestrator {
    sessions: Mutex<HashMap<u64, String>>,
}

/// Runs the seed scenario: `threads` threads, released together by a barrier,
/// call `get_or_init` on one static cell whose initialiser sleeps 10 ms,
/// counts its runs and spawns a cleanup thread.
fn seed_scenario(cell: &'static Singleton<Orchestrator>, threads: usize) {
    // Counters per call, not `static`s: the 10- and 200-thread tests run in
    // parallel, and shared counters would count both cells' inits.
    let runs = Arc::new(AtomicUsize::new(0));
    let cleanup_threads = Arc::new(AtomicUsize::new(0));

    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let (runs, cleanup_threads) = (runs.clone(), cleanup_threads.clone());
            thread::spawn(move || {
                barrier.wait();
                let orchestrator = cell.get_or_init(|| {
                    runs.fetch_add(1, SeqCst);
                    thread::sleep(Duration::from_millis(10));
                    thread::spawn(move || {
                        cleanup_threads.fetch_add(1, SeqCst);
                    })
                    .join()
                    .unwrap();
                    Orchestrator {
                        sessions: Mutex::new(HashMap::new()),
                    }
                });
                orchestrator.sessions.lock().unwrap().insert(0, "s".into());
                orchestrator as *const Orchestrator as usize
            })
        })
        .collect();
    let addrs: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    assert_eq!(runs.load(SeqCst), 1, "orchestrators created");
    assert_eq!(cleanup_threads.load(SeqCst), 1, "cleanup threads");
    assert!(
        addrs.iter().all(|a| *a == addrs[0]),
        "callers saw different instances"
    );
    assert_eq!(cell.get().unwrap().sessions.lock().unwrap().len(), 1);
}

#[test]
fn seed_scenario_10_threads() {
    static CELL: Singleton<Orchestrator> = Singleton::new();
    seed_scenario(&CELL, 10);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "200 threads take minutes under miri; the 10-thread run covers it"
)]
fn seed_scenario_200_threads() {
    static CELL: Singleton<Orchestrator> = Singleton::new();
    seed_scenario(&CELL, 200);
}

/// Runs `first` in one thread; once it has started, a second caller arrives
/// (and parks behind it) with `second`. Returns both results.
fn first_then_waiter<R1: Send + 'static, R2: Send + 'static>(
    first: impl FnOnce(&dyn Fn()) -> R1 + Send + 'static,
    second: impl FnOnce() -> R2 + Send + 'static,
) -> (R1, R2) {
    let (started_tx, started_rx) = mpsc::channel();
    let first = thread::spawn(move || {
        first(&|| {
            started_tx.send(()).unwrap();
            // Give the second caller time to find the cell busy and park.
            thread::sleep(Duration::from_millis(50));
        })
    });
    started_rx.recv().unwrap();
    let second = thread::spawn(second);
    (first.join().unwrap(), second.join().unwrap())
}

#[test]
fn failed_init_is_not_stored_and_a_waiter_retries() {
    static CELL: Singleton<u32> = Singleton::new();
    static SECOND_RUNS: AtomicUsize = AtomicUsize::new(0);
    let (first, second) = first_then_waiter(
        |started| {
            CELL.get_or_try_init(|| {
                started();
                Err::<u32, &str>("backend down")
            })
            .copied()
        },
        || {
            CELL.get_or_try_init(|| {
                SECOND_RUNS.fetch_add(1, SeqCst);
                Ok::<u32, &str>(2)
            })
            .copied()
        },
    );
    assert_eq!(
        first,
        Err("backend down"),
        "the error goes to its own caller"
    );
    assert_eq!(second, Ok(2), "the waiter ran its own initialiser");
    assert_eq!(SECOND_RUNS.load(SeqCst), 1);
    assert_eq!(CELL.get(), Some(&2));
}

#[test]
fn panicking_init_leaves_cell_retryable_and_a_waiter_takes_over() {
    static CELL: Singleton<u32> = Singleton::new();
    let (first, second) = first_then_waiter(
        |started| {
            catch_unwind(AssertUnwindSafe(|| {
                *CELL.get_or_init(|| {
                    started();
                    panic!("init failed");
                })
            }))
        },
        || *CELL.get_or_init(|| 3),
    );
    let payload = first.expect_err("the panic propagates to the caller that ran the init");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"init failed"));
    assert_eq!(second, 3);
    assert_eq!(
        CELL.get(),
        Some(&3),
        "no poisoning: the cell works after the panic"
    );
}

#[test]
fn lazy_panic_is_retryable_not_poisoned() {
    static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);
    static LAZY: Lazy<usize> = Lazy::new(|| {
        if ATTEMPTS.fetch_add(1, SeqCst) == 0 {
            panic!("first attempt fails");
        }
        42
    });
    assert!(catch_unwind(|| *LAZY).is_err());
    assert_eq!(Lazy::get(&LAZY), None);
    assert_eq!(*LAZY, 42, "std's LazyLock would be poisoned here");
    assert_eq!(Lazy::get(&LAZY), Some(&42));
    assert_eq!(ATTEMPTS.load(SeqCst), 2);
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().unwrap().to_string(),
    }
}

#[test]
fn reentrant_get_or_init_panics_with_type_and_declaration_site() {
    static CELL: Singleton<u64> = Singleton::new();
    let declared_line = line!() - 1;
    let err = catch_unwind(|| *CELL.get_or_init(|| *CELL.get_or_init(|| 1) + 1)).unwrap_err();
    let msg = panic_message(err);
    assert!(msg.contains("reentrant"), "{msg}");
    assert!(msg.contains("toctou::Singleton<u64>"), "{msg}");
    assert!(
        msg.contains(&format!("tests/singleton.rs:{declared_line}")),
        "{msg}"
    );
    // The unwind gave the claim back: the cell still works.
    assert_eq!(*CELL.get_or_init(|| 5), 5);
}

#[test]
fn reentrant_lazy_force_panics() {
    static SELF_REFERENTIAL: Lazy<u32> = Lazy::new(|| *SELF_REFERENTIAL + 1);
    let msg = panic_message(catch_unwind(|| *SELF_REFERENTIAL).unwrap_err());
    assert!(
        msg.contains("reentrant") && msg.contains("toctou::Lazy<u32>"),
        "{msg}"
    );
    assert!(msg.contains("tests/singleton.rs"), "{msg}");
}

#[test]
fn initialising_a_different_cell_inside_an_initialiser_is_fine() {
    static INNER: Singleton<u32> = Singleton::new();
    static OUTER: Singleton<u32> = Singleton::new();
    assert_eq!(*OUTER.get_or_init(|| *INNER.get_or_init(|| 1) + 1), 2);
}

#[test]
fn waiting_for_another_threads_cell_from_inside_an_initialiser_is_not_reentrancy() {
    // Thread 1 initialises OUTER and, inside that, needs INNER, which thread 2
    // is initialising: thread 1 must wait for INNER, not panic. (The
    // reentrancy check must compare cells, not just "am I initialising?")
    static INNER: Singleton<u32> = Singleton::new();
    static OUTER: Singleton<u32> = Singleton::new();
    let (inner, outer) = first_then_waiter(
        |started| {
            *INNER.get_or_init(|| {
                started();
                1
            })
        },
        || *OUTER.get_or_init(|| *INNER.get_or_init(|| 10) + 1),
    );
    assert_eq!((inner, outer), (1, 2));
}

#[test]
fn reentrancy_is_per_thread_not_a_false_positive() {
    // While one thread initialises, another thread asking for the same cell
    // must wait, not panic.
    static CELL: Singleton<u32> = Singleton::new();
    let (first, second) = first_then_waiter(
        |started| {
            *CELL.get_or_init(|| {
                started();
                8
            })
        },
        || *CELL.get_or_init(|| 9),
    );
    assert_eq!((first, second), (8, 8));
}

/// CPU time this thread has used, in clock ticks (usually 10 ms), from
/// `/proc/thread-self/stat` (fields 14 and 15: utime and stime).
#[cfg(all(target_os = "linux", not(miri)))]
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
#[cfg(all(target_os = "linux", not(miri)))]
fn waiters_park_instead_of_spinning() {
    static CELL: Singleton<u32> = Singleton::new();
    let (_, waiter_ticks) = first_then_waiter(
        |started| {
            *CELL.get_or_init(|| {
                started();
                thread::sleep(Duration::from_millis(300));
                1
            })
        },
        || {
            let before = thread_cpu_ticks();
            assert_eq!(*CELL.get_or_init(|| 2), 1);
            thread_cpu_ticks() - before
        },
    );
    // The waiter waited ~300 ms; a spinning waiter burns ~30 ticks of CPU.
    assert!(
        waiter_ticks <= 5,
        "the waiter used {waiter_ticks} ticks of CPU while waiting"
    );
}

#[test]
fn set_get_mut_take_into_inner() {
    let mut cell = Singleton::new();
    assert_eq!(cell.get_mut(), None);
    assert_eq!(cell.set(String::from("a")), Ok(()));
    assert!(cell.is_initialized());
    assert_eq!(cell.set(String::from("b")), Err(String::from("b")));
    cell.get_mut().unwrap().push('!');
    assert_eq!(cell.get().map(String::as_str), Some("a!"));
    assert_eq!(cell.take().as_deref(), Some("a!"));
    assert!(!cell.is_initialized());
    assert_eq!(cell.take(), None);
    assert_eq!(
        *cell.get_or_init(|| "c".into()),
        "c",
        "a taken cell is reusable"
    );
    assert_eq!(cell.into_inner().as_deref(), Some("c"));
}

#[test]
fn values_drop_exactly_once() {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));

    let cell = Singleton::new();
    cell.get_or_init(|| Counted(drops.clone()));
    drop(cell);
    assert_eq!(drops.load(SeqCst), 1, "dropping the cell drops the value");

    let mut cell = Singleton::new();
    cell.get_or_init(|| Counted(drops.clone()));
    let taken = cell.take();
    drop(cell);
    assert_eq!(
        drops.load(SeqCst),
        1,
        "a taken value is not dropped by the cell"
    );
    drop(taken);
    assert_eq!(drops.load(SeqCst), 2);

    drop(Singleton::<Counted>::new());
    assert_eq!(drops.load(SeqCst), 2, "an empty cell drops nothing");
}

#[test]
fn debug_never_blocks() {
    static CELL: Singleton<u8> = Singleton::new();
    assert_eq!(format!("{CELL:?}"), "Singleton(<uninit>)");
    let (in_init_tx, in_init_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let initialiser = thread::spawn(move || {
        CELL.get_or_init(|| {
            in_init_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            1
        });
    });
    in_init_rx.recv().unwrap();
    assert_eq!(format!("{CELL:?}"), "Singleton(<initializing>)");
    release_tx.send(()).unwrap();
    initialiser.join().unwrap();
    assert_eq!(format!("{CELL:?}"), "Singleton(1)");

    let lazy = Lazy::new(|| 2);
    assert_eq!(format!("{lazy:?}"), "Lazy(<uninit>)");
    let _ = *lazy;
    assert_eq!(format!("{lazy:?}"), "Lazy(2)");
}

#[test]
fn std_like_trait_impls() {
    let cell: Singleton<i32> = Singleton::default();
    assert_eq!(cell, Singleton::new(), "empty cells compare equal");
    let full = Singleton::from(4);
    assert_eq!(full.get(), Some(&4));
    assert_eq!(full.clone().get(), Some(&4));
    assert_ne!(cell, full);
    let lazy: Lazy<Vec<u8>> = Lazy::default();
    assert!(lazy.is_empty());
    assert_eq!(Lazy::into_inner(lazy), Ok(Vec::new()));
}

/// Receives from `rx`, failing if nothing arrives within 10 s: the deadlock
/// detector for tests whose bug would hang (a lost wake-up).
fn recv_within_10s<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: nothing after 10 s (a lost wake-up?)"))
}

#[test]
fn wait_returns_the_value_of_an_initialised_cell_at_once() {
    let cell = Singleton::from(5);
    assert_eq!(*cell.wait(), 5);
    assert_eq!(*cell.wait(), 5, "wait does not consume or change the value");
}

#[test]
fn wait_outlasts_failed_and_panicking_inits_and_returns_the_successful_value() {
    // Waiters park on an EMPTY cell (no initialiser running yet), are woken by
    // a failed and a panicking attempt, park again, and all return the value
    // of the one successful init. `wait` itself never initialises.
    static CELL: Singleton<u32> = Singleton::new();
    static INITS: AtomicUsize = AtomicUsize::new(0);
    const WAITERS: usize = 4;
    let (tx, rx) = mpsc::channel();
    for _ in 0..WAITERS {
        let tx = tx.clone();
        thread::spawn(move || tx.send(*CELL.wait()).unwrap());
    }
    thread::sleep(Duration::from_millis(50)); // let the waiters park on EMPTY
    assert!(!CELL.is_initialized(), "wait must not initialise");
    assert!(
        rx.try_recv().is_err(),
        "no waiter returned from an empty cell"
    );

    assert_eq!(
        CELL.get_or_try_init(|| Err::<u32, _>("backend down")),
        Err("backend down")
    );
    thread::sleep(Duration::from_millis(20)); // woken waiters park again
    let panicked = catch_unwind(|| CELL.get_or_init(|| panic!("init failed")));
    assert!(panicked.is_err());
    assert!(!CELL.is_initialized());
    assert!(
        rx.try_recv().is_err(),
        "failed attempts do not release waiters"
    );

    // A successful init, racing the waiters that are re-parking.
    let initialiser = thread::spawn(|| {
        *CELL.get_or_init(|| {
            INITS.fetch_add(1, SeqCst);
            7
        })
    });
    for _ in 0..WAITERS {
        assert_eq!(recv_within_10s(&rx, "a waiter"), 7);
    }
    assert_eq!(initialiser.join().unwrap(), 7);
    assert_eq!(INITS.load(SeqCst), 1);
}

#[test]
fn wait_is_woken_by_an_async_initialiser() {
    static CELL: Singleton<&str> = Singleton::new();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(*CELL.wait()).unwrap());
    thread::sleep(Duration::from_millis(20)); // let the waiter park
    let value = common::block_on(CELL.get_or_init_async(|| async { "async" }));
    assert_eq!(*value, "async");
    assert_eq!(recv_within_10s(&rx, "the sync waiter"), "async");
}

#[test]
#[cfg(all(target_os = "linux", not(miri)))]
fn wait_parks_instead_of_spinning_on_an_empty_cell() {
    static CELL: Singleton<u32> = Singleton::new();
    let waiter = thread::spawn(|| {
        let before = thread_cpu_ticks();
        assert_eq!(*CELL.wait(), 1);
        thread_cpu_ticks() - before
    });
    thread::sleep(Duration::from_millis(300));
    CELL.set(1).unwrap();
    let waiter_ticks = waiter.join().unwrap();
    // The waiter waited ~300 ms; a spinning waiter burns ~30 ticks of CPU.
    assert!(
        waiter_ticks <= 5,
        "the waiter used {waiter_ticks} ticks of CPU while waiting"
    );
}

#[test]
fn wait_inside_its_own_initialiser_panics_instead_of_hanging() {
    static CELL: Singleton<u64> = Singleton::new();
    let declared_line = line!() - 1;
    let err = catch_unwind(|| *CELL.get_or_init(|| *CELL.wait() + 1)).unwrap_err();
    let msg = panic_message(err);
    assert!(msg.contains("reentrant"), "{msg}");
    assert!(
        msg.contains(&format!("tests/singleton.rs:{declared_line}")),
        "{msg}"
    );
    assert_eq!(*CELL.get_or_init(|| 5), 5, "the cell still works");
    assert_eq!(*CELL.wait(), 5);
}

#[test]
fn lazy_get_mut_force_mut_and_deref_mut() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let mut lazy = Lazy::new(|| {
        RUNS.fetch_add(1, SeqCst);
        vec![1]
    });
    assert_eq!(Lazy::get_mut(&mut lazy), None, "get_mut does not force");
    assert_eq!(RUNS.load(SeqCst), 0);
    Lazy::force_mut(&mut lazy).push(2);
    assert_eq!(Lazy::get_mut(&mut lazy).map(|v| v.len()), Some(2));
    lazy.push(3); // DerefMut
    assert_eq!(*lazy, [1, 2, 3]);
    *lazy = vec![9, 3];
    assert_eq!(RUNS.load(SeqCst), 1, "forced once");
    assert_eq!(Lazy::get(&lazy), Some(&vec![9, 3]));
    assert_eq!(Lazy::into_inner(lazy).ok(), Some(vec![9, 3]));

    // `DerefMut` on a fresh `Lazy` forces it, and the shared path agrees.
    let mut counter = Lazy::new(|| 10);
    *counter += 1;
    assert_eq!(*counter, 11);
    assert_eq!(Lazy::get(&counter), Some(&11));
}

#[test]
fn lazy_force_mut_panic_is_retryable_and_values_drop_once() {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let attempts = AtomicUsize::new(0);
    let mut lazy = Lazy::new(|| {
        if attempts.fetch_add(1, SeqCst) == 0 {
            panic!("first attempt fails");
        }
        Counted(drops.clone())
    });
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        Lazy::force_mut(&mut lazy);
    }));
    assert!(panicked.is_err());
    assert!(
        Lazy::get_mut(&mut lazy).is_none(),
        "not poisoned, not initialised"
    );
    Lazy::force_mut(&mut lazy);
    Lazy::force_mut(&mut lazy);
    assert_eq!(
        attempts.load(SeqCst),
        2,
        "the second force_mut reuses the value"
    );
    assert_eq!(drops.load(SeqCst), 0);
    drop(lazy);
    assert_eq!(
        drops.load(SeqCst),
        1,
        "a force_mut value drops exactly once"
    );
}

#[test]
#[cfg(all(target_os = "linux", target_pointer_width = "64", not(toctou_loom)))]
fn cells_stay_small() {
    // The value, the state word, the waiter queue (a mutex and a pointer to
    // a list allocated by the first waiter) and the declaration site. Before
    // the list was boxed: 72 and 80 bytes.
    use std::mem::size_of;
    assert!(
        size_of::<Singleton<u64>>() <= 40,
        "{}",
        size_of::<Singleton<u64>>()
    );
    assert!(size_of::<Lazy<u64>>() <= 48, "{}", size_of::<Lazy<u64>>());
    assert!(
        size_of::<Singleton<()>>() <= 32,
        "{}",
        size_of::<Singleton<()>>()
    );
}

#[test]
fn thread_safety_bounds() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<Singleton<String>>();
    assert_send_sync::<Lazy<String>>();
    // The async futures are `Send`, so they can be spawned on tokio.
    let cell: Singleton<String> = Singleton::new();
    assert_send(&cell.get_or_init_async(|| async { String::new() }));
    assert_send(&cell.get_or_try_init_async(|| async { Ok::<_, ()>(String::new()) }));
}

mod without_a_runtime {
    //! Async paths driven by a minimal thread-parking executor, so that miri
    //! (which does not run the tokio tests) checks them too.
    use super::*;
    use std::task::{Context, Waker};

    use crate::common::block_on;

    #[test]
    fn async_waiter_is_woken_by_a_sync_initialiser() {
        static CELL: Singleton<u32> = Singleton::new();
        let (first, second) = first_then_waiter(
            |started| {
                *CELL.get_or_init(|| {
                    started();
                    1
                })
            },
            || *block_on(CELL.get_or_init_async(|| async { 2 })),
        );
        assert_eq!((first, second), (1, 1));
    }

    #[test]
    fn dropped_async_initialiser_hands_over_to_a_parked_sync_waiter() {
        static CELL: Singleton<u32> = Singleton::new();
        let mut init = Box::pin(CELL.get_or_init_async(std::future::pending::<u32>));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(init.as_mut().poll(&mut cx).is_pending(), "holds the claim");
        let waiter = thread::spawn(|| *CELL.get_or_init(|| 9));
        thread::sleep(Duration::from_millis(20)); // let the waiter park
        drop(init); // cancellation: the claim is given back
        assert_eq!(waiter.join().unwrap(), 9);
    }

    #[test]
    fn dropped_async_waiters_do_not_disturb_later_waiters() {
        static CELL: Singleton<u32> = Singleton::new();
        let (in_init_tx, in_init_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let initialiser = thread::spawn(move || {
            *CELL.get_or_init(|| {
                in_init_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                4
            })
        });
        in_init_rx.recv().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..3 {
            let mut waiter = Box::pin(CELL.get_or_init_async(|| async { 5 }));
            assert!(
                waiter.as_mut().poll(&mut cx).is_pending(),
                "queued behind the init"
            );
            drop(waiter); // cancelled while queued
        }
        release_tx.send(()).unwrap();
        assert_eq!(block_on(CELL.get_or_init_async(|| async { 6 })), &4);
        assert_eq!(initialiser.join().unwrap(), 4);
    }
}

#[cfg(not(miri))]
mod with_tokio {
    //! Async tests on tokio's multi-threaded runtime (a dev-dependency only).
    use super::*;
    use tokio::time::{sleep, timeout};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn async_and_sync_callers_race_on_one_cell() {
        static CELL: Singleton<String> = Singleton::new();
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let barrier = Arc::new(std::sync::Barrier::new(4));

        let sync_callers: Vec<_> = (0..4)
            .map(|_| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    CELL.get_or_init(|| {
                        RUNS.fetch_add(1, SeqCst);
                        thread::sleep(Duration::from_millis(10));
                        "sync".to_owned()
                    }) as *const String as usize
                })
            })
            .collect();
        let async_callers: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(async {
                    CELL.get_or_init_async(|| async {
                        RUNS.fetch_add(1, SeqCst);
                        sleep(Duration::from_millis(10)).await;
                        "async".to_owned()
                    })
                    .await as *const String as usize
                })
            })
            .collect();

        let mut addrs = Vec::new();
        for task in async_callers {
            addrs.push(task.await.unwrap());
        }
        for t in sync_callers {
            addrs.push(t.join().unwrap());
        }
        assert_eq!(RUNS.load(SeqCst), 1, "exactly one initialiser ran");
        assert!(addrs.iter().all(|a| *a == addrs[0]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_async_initialiser_is_taken_over_by_an_async_waiter() {
        static CELL: Singleton<&str> = Singleton::new();
        let slow = timeout(
            Duration::from_millis(30),
            CELL.get_or_init_async(|| async {
                sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        );
        let waiter = tokio::spawn(async {
            // Arrive while the slow initialiser holds the claim.
            sleep(Duration::from_millis(10)).await;
            *CELL.get_or_init_async(|| async { "taken over" }).await
        });
        assert!(slow.await.is_err(), "the slow initialiser timed out");
        assert_eq!(waiter.await.unwrap(), "taken over");
        assert_eq!(CELL.get(), Some(&"taken over"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_async_initialiser_is_taken_over_by_a_sync_waiter() {
        static CELL: Singleton<&str> = Singleton::new();
        let slow = timeout(
            Duration::from_millis(30),
            CELL.get_or_init_async(|| async {
                sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        );
        let waiter = thread::spawn(|| {
            thread::sleep(Duration::from_millis(10));
            *CELL.get_or_init(|| "sync took over")
        });
        assert!(slow.await.is_err());
        assert_eq!(waiter.join().unwrap(), "sync took over");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_async_waiter_leaves_the_cell_working() {
        static CELL: Singleton<u32> = Singleton::new();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let initialiser = tokio::spawn(CELL.get_or_init_async(|| async {
            release_rx.await.unwrap();
            1
        }));
        sleep(Duration::from_millis(10)).await;
        // A waiter that gives up: its wait-queue entry must go with it.
        assert!(
            timeout(
                Duration::from_millis(10),
                CELL.get_or_init_async(|| async { 2 })
            )
            .await
            .is_err()
        );
        release_tx.send(()).unwrap();
        assert_eq!(*initialiser.await.unwrap(), 1);
        assert_eq!(*CELL.get_or_init_async(|| async { 3 }).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_async_init_is_retried_by_a_waiter() {
        static CELL: Singleton<u32> = Singleton::new();
        let failing = tokio::spawn(CELL.get_or_try_init_async(|| async {
            sleep(Duration::from_millis(30)).await;
            Err::<u32, &str>("refused")
        }));
        sleep(Duration::from_millis(10)).await;
        let retry = CELL
            .get_or_try_init_async(|| async { Ok::<u32, &str>(6) })
            .await;
        assert_eq!(failing.await.unwrap(), Err("refused"));
        assert_eq!(retry, Ok(&6));
    }

    #[tokio::test]
    async fn reentrant_async_init_panics_instead_of_hanging() {
        static CELL: Singleton<u8> = Singleton::new();
        let outcome = tokio::spawn(async {
            *CELL
                .get_or_init_async(|| async { *CELL.get_or_init_async(|| async { 1 }).await })
                .await
        })
        .await;
        let msg = panic_message(outcome.unwrap_err().into_panic());
        assert!(
            msg.contains("reentrant") && msg.contains("Singleton<u8>"),
            "{msg}"
        );
        assert_eq!(
            *CELL.get_or_init_async(|| async { 7 }).await,
            7,
            "cell still usable"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_tasks_on_the_initialising_thread_wait_without_a_false_reentrancy_panic() {
        // On a single-threaded runtime, a second task polls while the first
        // initialiser is suspended: that is waiting, not reentrancy.
        static CELL: Singleton<u8> = Singleton::new();
        let first = tokio::spawn(CELL.get_or_init_async(|| async {
            tokio::task::yield_now().await;
            sleep(Duration::from_millis(10)).await;
            1
        }));
        let second = tokio::spawn(CELL.get_or_init_async(|| async { 2 }));
        assert_eq!(*first.await.unwrap(), 1);
        assert_eq!(*second.await.unwrap(), 1);
    }
}
