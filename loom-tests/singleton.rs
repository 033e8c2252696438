//! Loom models of the `Singleton` protocol (src/once.rs, src/wait.rs).
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_singleton
//! ```
//!
//! Every model here is exhaustive (no preemption bound) except
//! `three_threads_race_get_or_init`, which sets `preemption_bound = 3` to stay
//! under a minute; bugs in this protocol need at most two preemptions to show.
//!
//! Each model was checked against a deliberately broken protocol; see the
//! comments on the models for which break each one catches.
#![cfg(toctou_loom)]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker};

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::thread;
use toctou::Singleton;

/// The seed's bug: N threads race a lazy global. Exactly one init, and every
/// thread sees that one value.
///
/// Catches: replacing the `EMPTY → RUNNING` compare-exchange in
/// `Once::try_begin` with a load followed by a store (check, then act):
/// two threads pass the check and both build.
#[test]
fn two_threads_race_get_or_init() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let inits = Arc::new(AtomicUsize::new(0));
        let spawn = |id: usize| {
            let (cell, inits) = (cell.clone(), inits.clone());
            thread::spawn(move || {
                *cell.get_or_init(|| {
                    inits.fetch_add(1, Relaxed);
                    id
                })
            })
        };
        let other = spawn(1);
        let mine = *cell.get_or_init(|| {
            inits.fetch_add(1, Relaxed);
            0
        });
        let theirs = other.join().unwrap();
        assert_eq!(inits.load(Relaxed), 1, "initialiser ran more than once");
        assert_eq!(mine, theirs, "threads saw different instances");
        assert_eq!(cell.get(), Some(&mine));
    });
}

/// Three threads; bounded so the model finishes in well under a minute.
#[test]
fn three_threads_race_get_or_init() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let cell = Arc::new(Singleton::new());
        let inits = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..2)
            .map(|id| {
                let (cell, inits) = (cell.clone(), inits.clone());
                thread::spawn(move || {
                    *cell.get_or_init(|| {
                        inits.fetch_add(1, Relaxed);
                        id
                    })
                })
            })
            .collect();
        let mine = *cell.get_or_init(|| {
            inits.fetch_add(1, Relaxed);
            9
        });
        for h in handles {
            assert_eq!(h.join().unwrap(), mine);
        }
        assert_eq!(inits.load(Relaxed), 1);
    });
}

/// A failing init and a successful one race: the error is not stored, the
/// success is, and at most one init succeeds.
///
/// Catches: `InitGuard::drop` not resetting the state to EMPTY (the
/// succeeding thread then waits forever: loom reports a deadlock).
#[test]
fn failing_init_then_successful_init() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let failer = {
            let cell = cell.clone();
            thread::spawn(move || cell.get_or_try_init(|| Err::<usize, &str>("down")).copied())
        };
        let mine = cell.get_or_try_init(|| Ok::<usize, &str>(2)).copied();
        assert_eq!(mine, Ok(2), "the successful initialiser must win");
        match failer.join().unwrap() {
            Err("down") | Ok(2) => {}
            other => panic!("unexpected result {other:?}"),
        }
        assert_eq!(cell.get(), Some(&2));
    });
}

/// A panicking init with a concurrent caller: the panic reaches its caller,
/// and the other thread (waiting or arriving later) takes over and succeeds.
///
/// Catches: an unwinding initialiser that leaves the state RUNNING (deadlock),
/// or one that does not wake the parked waiter (deadlock).
#[test]
fn panicking_init_waiter_takes_over() {
    silence_panic_hook();
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let panicker = {
            let cell = cell.clone();
            thread::spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    *cell.get_or_init(|| panic!("{SILENT}"))
                }))
                .ok()
            })
        };
        let mine = *cell.get_or_init(|| 7);
        assert_eq!(mine, 7);
        // The panicker either panicked, or found our value ready.
        assert!(matches!(panicker.join().unwrap(), None | Some(7)));
        assert_eq!(cell.get(), Some(&7));
    });
}

/// A caller arrives while the init is running, so it must park (or see the
/// value already published) and be woken by `complete`.
///
/// Catches: `Once::finish` skipping `notify_all` when the WAITERS bit is set,
/// and `park_if_running` returning "park" without checking the state under
/// the queue lock (lost wake-up: loom reports a deadlock).
#[test]
fn waiter_parks_and_is_woken() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let started = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (cell, started) = (cell.clone(), started.clone());
            thread::spawn(move || {
                while !started.load(Relaxed) {
                    thread::yield_now();
                }
                *cell.get_or_init(|| unreachable!("the init was already claimed"))
            })
        };
        let mine = *cell.get_or_init(|| {
            started.store(true, Relaxed);
            thread::yield_now();
            5
        });
        assert_eq!(waiter.join().unwrap(), mine);
    });
}

/// `Singleton::wait` on a cell that may still be EMPTY: it parks without an
/// initialiser running, is woken by a failed attempt, parks again, and returns
/// the value of the successful one. Exhaustive: two threads.
///
/// Catches: the claim of an EMPTY cell with parked `wait`ers
/// (`Once::try_begin_flagged`) dropping their WAITERS bit, so that the
/// successful `complete` wakes nobody (lost wake-up: loom reports a deadlock).
#[test]
fn wait_outlasts_a_failed_init() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let waiter = {
            let cell = cell.clone();
            thread::spawn(move || *cell.wait())
        };
        assert_eq!(
            cell.get_or_try_init(|| Err::<usize, _>("down")),
            Err("down")
        );
        assert_eq!(*cell.get_or_init(|| 7), 7);
        assert_eq!(waiter.join().unwrap(), 7);
    });
}

/// `set` racing `get_or_init`: exactly one value lands, and `set` reports
/// `Err(its value)` exactly when the other thread's value won.
#[test]
fn set_races_get_or_init() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let setter = {
            let cell = cell.clone();
            thread::spawn(move || cell.set(1))
        };
        let mine = *cell.get_or_init(|| 2);
        match setter.join().unwrap() {
            Ok(()) => assert_eq!(mine, 1, "set won, so get_or_init must see its value"),
            Err(1) => assert_eq!(mine, 2, "set lost, so our value must be stored"),
            Err(other) => panic!("set returned a value it was not given: {other}"),
        }
        assert_eq!(cell.get(), Some(&mine));
    });
}

/// Spawns a thread that polls an async initialiser of `cell` once and then
/// drops it, as a timeout would. The one poll either claims the init (and
/// pends forever: `Pending`) or finds the value already published.
fn spawn_cancelled_init(cell: &Arc<Singleton<usize>>) -> thread::JoinHandle<Poll<usize>> {
    let cell = cell.clone();
    thread::spawn(move || {
        let mut fut = pin!(cell.get_or_init_async(std::future::pending::<usize>));
        let polled = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        polled.map(|v| *v)
        // Dropping `fut` here cancels the initialiser.
    })
}

/// An async initialiser is polled once (so it holds the claim) and then
/// dropped, as a timeout would. A sync caller racing it takes over.
///
/// Catches: an `InitGuard` that is not dropped with the future (the sync
/// caller waits forever: deadlock).
#[test]
fn async_init_dropped_mid_init_sync_takes_over() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let canceller = spawn_cancelled_init(&cell);
        let mine = *cell.get_or_init(|| 3);
        assert_eq!(mine, 3);
        match canceller.join().unwrap() {
            Poll::Pending | Poll::Ready(3) => {}
            other => panic!("unexpected poll result {other:?}"),
        }
        assert_eq!(cell.get(), Some(&3));
    });
}

/// The same cancellation with an async waiter, driven by loom's `block_on`,
/// which only re-polls when woken: a lost waker shows up as a deadlock.
#[test]
fn async_init_dropped_mid_init_async_takes_over() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let canceller = spawn_cancelled_init(&cell);
        let mine = loom::future::block_on(cell.get_or_init_async(|| async { 4 }));
        assert_eq!(*mine, 4);
        assert!(matches!(
            canceller.join().unwrap(),
            Poll::Pending | Poll::Ready(4)
        ));
        assert_eq!(cell.get(), Some(&4));
    });
}

/// Sync and async callers on one cell: one init, one value, and the async
/// waiter is woken by a sync initialiser.
#[test]
fn sync_and_async_callers_race() {
    loom::model(|| {
        let cell = Arc::new(Singleton::new());
        let inits = Arc::new(AtomicUsize::new(0));
        let async_caller = {
            let (cell, inits) = (cell.clone(), inits.clone());
            thread::spawn(move || {
                *loom::future::block_on(cell.get_or_init_async(|| async move {
                    inits.fetch_add(1, Relaxed);
                    1
                }))
            })
        };
        let mine = *cell.get_or_init(|| {
            inits.fetch_add(1, Relaxed);
            0
        });
        assert_eq!(async_caller.join().unwrap(), mine);
        assert_eq!(inits.load(Relaxed), 1);
    });
}

const SILENT: &str = "loom model: intentional panic";

/// Keeps the intentional panics of the models from flooding the output, and
/// forwards every other panic to the default hook.
fn silence_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let silent = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|msg| msg == SILENT);
        if !silent {
            default(info);
        }
    }));
}
