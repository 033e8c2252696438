//! Loom models of a downstream crate's `static` cells (`src/lib.rs`): racing
//! first uses build each cell once per execution, and every execution starts
//! from fresh cells, as with `loom::lazy_static!`.
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release -p toctou-loom-downstream
//! ```
//!
//! Each model was checked against a broken sync layer: when a cell reuses
//! its first execution's state (`sync::PerExecution` ignoring which execution
//! built it), every model fails in the second execution, where loom rejects
//! the first one's objects. Without the per-execution state the library does
//! not compile under the cfg at all (E0015 on each `static`).
#![cfg(toctou_loom)]

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use loom::thread;
use toctou_loom_downstream as app;

/// Runs `execution` in `loom::model` and checks, across executions, that
/// each one built its own values: the serial it returns is newer than every
/// serial an earlier execution returned. Also checks that loom ran more than
/// one execution, so that the check means something.
fn check(execution: impl Fn() -> u64 + Send + Sync + 'static) {
    let newest = Arc::new(AtomicU64::new(0));
    let executions = Arc::new(AtomicU64::new(0));
    {
        let (newest, executions) = (newest.clone(), executions.clone());
        loom::model(move || {
            // Relaxed: these std atomics are only touched by the model's OS
            // thread, between executions.
            let before = newest.load(Relaxed);
            assert!(
                app::untouched(),
                "a static cell kept state from an earlier execution"
            );
            let serial = execution();
            assert!(
                serial > before,
                "an execution reused an earlier one's build"
            );
            newest.store(serial, Relaxed);
            executions.fetch_add(1, Relaxed);
        });
    }
    assert!(
        executions.load(Relaxed) > 1,
        "loom explored one execution only"
    );
}

/// Two threads race the first `config()`: a `static Singleton`.
fn config_race() -> u64 {
    let builds = app::builds_on_this_thread();
    let other = thread::spawn(|| app::config().serial);
    let mine = app::config().serial;
    assert_eq!(
        other.join().unwrap(),
        mine,
        "two threads saw different configs"
    );
    assert_eq!(
        app::builds_on_this_thread() - builds,
        1,
        "config built more than once"
    );
    mine
}

#[test]
fn racing_first_calls_build_a_static_singleton_once_per_execution() {
    check(config_race);
}

/// The same static, raced by a second model that the test harness runs in
/// parallel on another OS thread: each model has its own values.
#[test]
fn a_parallel_model_gets_its_own_values_of_the_same_static() {
    check(config_race);
}

#[test]
fn racing_first_derefs_build_a_static_lazy_once_per_execution() {
    check(|| {
        let builds = app::builds_on_this_thread();
        let other = thread::spawn(|| app::ports().serial);
        let mine = app::ports().serial;
        assert_eq!(
            other.join().unwrap(),
            mine,
            "two threads saw different tables"
        );
        assert_eq!(
            app::builds_on_this_thread() - builds,
            1,
            "table built more than once"
        );
        mine
    });
}

#[test]
fn racing_first_gets_build_a_static_registry_cell_once_per_execution() {
    check(|| {
        let builds = app::builds_on_this_thread();
        let other = thread::spawn(app::registry);
        let first = app::registry();
        assert_eq!(
            other.join().unwrap(),
            first,
            "two threads saw different registries"
        );
        assert_eq!(first.1, "", "the first build uses the default settings");
        let eu = app::switch_region("eu");
        assert_eq!(
            app::switch_region("eu"),
            eu,
            "equal settings rebuilt the registry"
        );
        assert_eq!(app::registry(), (eu, "eu"));
        assert_eq!(app::builds_on_this_thread() - builds, 2);
        eu
    });
}

#[test]
fn racing_first_calls_start_a_static_singleton_map_entry_once_per_execution() {
    check(|| {
        let builds = app::builds_on_this_thread();
        let other = thread::spawn(|| app::server("phi-4"));
        let mine = app::server("phi-4");
        assert_eq!(other.join().unwrap(), mine, "two servers for one model");
        assert_eq!(app::builds_on_this_thread() - builds, 1, "started twice");
        mine
    });
}

#[test]
fn a_static_keyed_lock_excludes_and_leaves_no_entry_in_each_execution() {
    check(|| {
        // A loom atomic: the models explore the two holders' interleavings.
        let inside = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let step = |inside: &loom::sync::atomic::AtomicBool| {
            let alone = !inside.swap(true, SeqCst);
            inside.store(false, SeqCst);
            alone
        };
        let other = {
            let inside = inside.clone();
            thread::spawn(move || app::with_workflow("wf-1", || step(&inside)))
        };
        let mine = app::with_workflow("wf-1", || step(&inside));
        assert!(other.join().unwrap() && mine, "two holders of one key");
        assert!(app::no_workflow_entries(), "an entry was left behind");
        // `check` wants a fresh serial per execution: a build stands in.
        app::server("after")
    });
}
