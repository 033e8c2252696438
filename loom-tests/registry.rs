//! Loom models of the `RegistryCell` protocol (src/registry.rs).
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_registry
//! ```
//!
//! Build functions are plain `fn`s, so the models pass their probes (loom
//! atomics) in through the settings.
#![cfg(toctou_loom)]

use std::sync::atomic::Ordering::SeqCst;

use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Mutex, Notify};
use loom::thread;
use toctou::RegistryCell;

/// Settings that carry probes: how many builds ran, whether one is running,
/// and a flag the instance sets when it is dropped.
#[derive(Clone, Default)]
struct Probe {
    value: usize,
    builds: Option<Arc<AtomicUsize>>,
    building: Option<Arc<AtomicBool>>,
    dropped: Option<Arc<AtomicBool>>,
    order: Option<Arc<Mutex<Vec<usize>>>>,
}

impl PartialEq for Probe {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// An instance. It is plain memory: the crate keeps it in a `std::sync::Arc`,
/// whose reference counting loom does not see, so a model cannot check the
/// happens-before between a reader's last use and the drop through a loom
/// `UnsafeCell` here (every cross-thread `Arc` drop would look like a race).
/// The models check the hand-shake through the `dropped` flag instead, read
/// before any use; the `Release`/`Acquire` pair on a block's reference count
/// that orders the last use before the give-back is argued in
/// `src/registry/cache.rs`, not model-checked.
struct Instance {
    value: usize,
    dropped: Option<Arc<AtomicBool>>,
}

impl Instance {
    fn value(&self) -> usize {
        self.value
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(dropped) = &self.dropped {
            dropped.store(true, SeqCst);
        }
    }
}

fn build(p: &Probe) -> Instance {
    if let Some(building) = &p.building {
        assert!(!building.swap(true, SeqCst), "two builds overlapped");
    }
    if let Some(builds) = &p.builds {
        builds.fetch_add(1, SeqCst);
    }
    if let Some(order) = &p.order {
        order.lock().unwrap().push(p.value);
    }
    if let Some(building) = &p.building {
        building.store(false, SeqCst);
    }
    Instance {
        value: p.value,
        dropped: p.dropped.clone(),
    }
}

/// A one-shot signal between two threads (loom's `Notify` may wake up
/// spuriously, so the waiter re-checks a flag).
#[derive(Default)]
struct Signal {
    sent: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn send(&self) {
        self.sent.store(true, SeqCst);
        self.notify.notify();
    }

    fn wait(&self) {
        while !self.sent.load(SeqCst) {
            self.notify.wait();
        }
    }
}

fn probe(value: usize) -> Probe {
    Probe {
        value,
        ..Probe::default()
    }
}

/// A race on the lazy first init: one instance, seen by both.
///
/// Catches: `init_first` not re-checking `current` under the builder lock
/// (both callers build and publish).
#[test]
fn first_init_race() {
    loom::model(|| {
        let cell = Arc::new(RegistryCell::new(build));
        let other = {
            let cell = cell.clone();
            thread::spawn(move || cell.get_arc())
        };
        let mine = cell.get_arc();
        let theirs = other.join().unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&mine, &theirs),
            "two first instances"
        );
        assert_eq!(cell.generation(), 1);
    });
}

/// `get` racing `reinit`: the reader sees the old instance or the new one,
/// with a matching generation.
#[test]
fn get_races_reinit() {
    loom::model(|| {
        let cell = Arc::new(RegistryCell::new(build));
        assert_eq!(cell.get().value(), 0);
        let writer = {
            let cell = cell.clone();
            thread::spawn(move || cell.reinit(probe(1)))
        };
        let seen = cell.get();
        match (seen.generation(), seen.value()) {
            (1, 0) | (2, 1) => {}
            other => panic!("reader saw {other:?}"),
        }
        drop(seen);
        let published = writer.join().unwrap();
        assert_eq!(published.value(), 1);
        // After the writer is joined, a new read sees its instance.
        assert_eq!((cell.get().generation(), cell.get().value()), (2, 1));
    });
}

/// Two concurrent `reinit`s on an empty cell: the builds do not overlap, the
/// generation ends at 2, and the final instance is the one built (hence
/// published) last.
///
/// Catches: publishing after releasing the builder lock (an earlier build
/// can then publish over a later one).
#[test]
fn two_reinits() {
    loom::model(|| {
        let building = Arc::new(AtomicBool::new(false));
        let order = Arc::new(Mutex::new(Vec::new()));
        let cell = Arc::new(RegistryCell::new(build));
        let settings = |value| Probe {
            value,
            building: Some(building.clone()),
            order: Some(order.clone()),
            ..Probe::default()
        };
        let other = {
            let (cell, s) = (cell.clone(), settings(2));
            thread::spawn(move || drop(cell.reinit(s)))
        };
        drop(cell.reinit(settings(1)));
        other.join().unwrap();
        assert_eq!(cell.generation(), 2);
        let last_built = *order.lock().unwrap().last().unwrap();
        assert_eq!(
            cell.get().value(),
            last_built,
            "an earlier build was published last"
        );
    });
}

/// `reinit_if_changed` with equal settings from two threads: one build.
///
/// Catches: comparing the settings and building under different locks
/// (check, then act): both callers build.
#[test]
fn reinit_if_changed_with_equal_settings_builds_once() {
    loom::model(|| {
        let builds = Arc::new(AtomicUsize::new(0));
        let cell = Arc::new(RegistryCell::new(build));
        let settings = Probe {
            value: 7,
            builds: Some(builds.clone()),
            ..Probe::default()
        };
        let other = {
            let (cell, s) = (cell.clone(), settings.clone());
            thread::spawn(move || cell.reinit_if_changed(s))
        };
        let mine = cell.reinit_if_changed(settings);
        let theirs = other.join().unwrap();
        assert_eq!(builds.load(SeqCst), 1, "equal settings built twice");
        assert!(std::sync::Arc::ptr_eq(&mine, &theirs));
    });
}

/// A cell whose published instance has value 1 and sets the returned flag
/// when it is dropped.
fn cell_at_value_1() -> (Arc<RegistryCell<Instance, Probe>>, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    let cell = Arc::new(RegistryCell::new(build));
    cell.reinit(Probe {
        value: 1,
        dropped: Some(dropped.clone()),
        ..Probe::default()
    });
    (cell, dropped)
}

/// A thread that reinitialises `cell` to value 2.
fn spawn_reinit_to_2(cell: &Arc<RegistryCell<Instance, Probe>>) -> thread::JoinHandle<()> {
    let cell = cell.clone();
    thread::spawn(move || drop(cell.reinit(probe(2))))
}

/// A reader holding a `RegistryRef` across a `reinit` keeps the old instance
/// alive until it drops the reference.
#[test]
fn a_held_ref_keeps_the_old_instance_alive() {
    loom::model(|| {
        let (cell, dropped) = cell_at_value_1();
        let held = cell.get();
        let writer = spawn_reinit_to_2(&cell);
        writer.join().unwrap();
        assert_eq!(held.value(), 1);
        assert!(!dropped.load(SeqCst), "dropped while a reader held it");
        drop(held);
        // Gone with its last reader, before this thread reads again: its
        // cache does not keep it.
        assert!(
            dropped.load(SeqCst),
            "not dropped after its last reader let go"
        );
        assert_eq!(cell.get().value(), 2);
    });
}

/// A reader whose cache holds generation 1 reads again while a `reinit`
/// replaces it: its `get` may be anywhere between the generation check and
/// the deref when the writer's sweep looks at its cache. The writer must
/// never give back an instance the reader is about to use, and once both are
/// done the old instance is gone (the reader holds nothing; it exits only
/// after the check, so its cache is still there).
///
/// Catches: the writer taking an instance back without the barrier; the
/// reader skipping its re-check after announcing itself; a sweep that takes
/// back a block a reference holds.
///
/// Bounded to 3 preemptions: unbounded, the model runs for minutes (the
/// sweep takes several locks), and every mutant above is caught within 2.
#[test]
fn a_reader_between_its_check_and_its_deref_races_a_reinit() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let (cell, dropped) = cell_at_value_1();
        let signals = || Arc::new(Signal::default());
        let (cached, checked, exit) = (signals(), signals(), signals());
        let reader = {
            let (cell, dropped) = (cell.clone(), dropped.clone());
            let (cached, checked, exit) = (cached.clone(), checked.clone(), exit.clone());
            thread::spawn(move || {
                // Caches generation 1 before the race (racing the fill is
                // the next model's business).
                drop(cell.get());
                cached.send();
                let seen = cell.get();
                if seen.generation() == 1 {
                    // Checked through the flag, before any deref.
                    assert!(!dropped.load(SeqCst), "dropped while a reader held it");
                    assert_eq!(seen.value(), 1);
                } else {
                    assert_eq!(seen.value(), 2);
                }
                drop(seen);
                checked.send();
                exit.wait();
            })
        };
        cached.wait();
        drop(cell.reinit(probe(2)));
        checked.wait();
        assert!(
            dropped.load(SeqCst),
            "generation 1 kept alive by an idle reader's cache"
        );
        exit.send();
        reader.join().unwrap();
    });
}

/// A thread reads the cell once, while a `reinit` runs, and then idles with
/// the cell in its cache: after both, the replaced instance is gone, however
/// the read and the sweep interleaved.
///
/// Catches: a last reference that drops without checking `doomed`; a cache
/// fill that does not re-check the generation under its record's lock (it
/// can then cache a block the sweep has already passed).
#[test]
fn an_idle_cached_thread_does_not_keep_a_replaced_instance() {
    loom::model(|| {
        let (cell, dropped) = cell_at_value_1();
        let (read, exit) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
        let reader = {
            let cell = cell.clone();
            let (read, exit) = (read.clone(), exit.clone());
            thread::spawn(move || {
                let seen = cell.get();
                assert!(matches!(seen.value(), 1 | 2), "reader saw {}", seen.value());
                drop(seen);
                read.send();
                exit.wait();
            })
        };
        drop(cell.reinit(probe(2)));
        read.wait();
        assert!(
            dropped.load(SeqCst),
            "generation 1 kept alive by an idle reader's cache"
        );
        exit.send();
        reader.join().unwrap();
    });
}

/// A reader that holds a `RegistryRef` while its own next `get` races a
/// `reinit`: if that `get` sees the new instance, it replaces the old one in
/// the reader's cache while the held reference still points at it. The old
/// instance must live exactly until the held reference drops.
///
/// Catches: the cache freeing a replaced instance that references still
/// count; a cache hit on the cell alone, ignoring the generation (a stale
/// read after the reinit); a refresh that never lets go of the replaced
/// instance (a leak).
#[test]
fn a_ref_held_across_its_own_threads_refresh() {
    loom::model(|| {
        let (cell, dropped) = cell_at_value_1();
        let held = cell.get();
        let writer = spawn_reinit_to_2(&cell);
        let seen = cell.get();
        assert!(matches!(seen.value(), 1 | 2), "reader saw {}", seen.value());
        assert!(!dropped.load(SeqCst), "dropped while a reader held it");
        assert_eq!(held.value(), 1);
        drop(seen);
        writer.join().unwrap();
        let now = cell.get();
        assert_eq!((now.value(), now.generation()), (2, 2), "a stale read");
        assert!(!dropped.load(SeqCst), "dropped while a reader held it");
        assert_eq!(held.value(), 1);
        drop(held);
        assert!(
            dropped.load(SeqCst),
            "not dropped when its last reader let go"
        );
    });
}

/// The sweep's count and the cache's own count of one block are given back
/// exactly once however a reader's get and drop interleave with a `reinit`:
/// two spare `Arc`s of the replaced instance see its strong count end at 2.
///
/// Catches: a freed block giving its count back although a sweep stole it
/// (a double give-back).
#[test]
fn counts_are_given_back_exactly_once() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let (cell, _dropped) = cell_at_value_1();
        let spares = (cell.get_arc(), cell.get_arc());
        let signals = || Arc::new(Signal::default());
        let (cached, exit) = (signals(), signals());
        let reader = {
            let cell = cell.clone();
            let (cached, exit) = (cached.clone(), exit.clone());
            thread::spawn(move || {
                drop(cell.get());
                cached.send();
                drop(cell.get());
                exit.wait();
            })
        };
        cached.wait();
        drop(cell.reinit(probe(2)));
        exit.send();
        reader.join().unwrap();
        let count = std::sync::Arc::strong_count(&spares.0);
        if count != 2 {
            // After a double give-back the count is 1, and the spares' drops
            // would free the instance while the other still points at it,
            // corrupting the heap while this panic unwinds: leak them, so
            // that the failure is this panic and nothing else.
            std::mem::forget(spares);
            panic!("a count was given back twice, or never: strong count {count}, not 2");
        }
    });
}

/// A reader caches the instance and exits while a `reinit` sweeps: its
/// thread's exit and the sweep agree on who gives the count back, and the
/// replaced instance is gone once both are done.
#[test]
fn a_readers_exit_races_a_sweep() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let (cell, dropped) = cell_at_value_1();
        let reader = {
            let cell = cell.clone();
            thread::spawn(move || {
                let seen = cell.get();
                assert!(matches!(seen.value(), 1 | 2));
            })
        };
        drop(cell.reinit(probe(2)));
        reader.join().unwrap();
        assert!(dropped.load(SeqCst), "generation 1 outlived every holder");
    });
}

/// A cell dropped while another (idle) thread caches its instance: the
/// instance drops with the cell.
#[test]
fn dropping_the_cell_takes_its_instance_back_from_idle_caches() {
    loom::model(|| {
        let (cell, dropped) = cell_at_value_1();
        let signals = || Arc::new(Signal::default());
        let (cached, exit) = (signals(), signals());
        let reader = {
            let cell = cell.clone();
            let (cached, exit) = (cached.clone(), exit.clone());
            thread::spawn(move || {
                assert_eq!(cell.get().value(), 1);
                drop(cell);
                cached.send();
                exit.wait();
            })
        };
        cached.wait();
        drop(cell);
        assert!(dropped.load(SeqCst), "the instance outlived its cell");
        exit.send();
        reader.join().unwrap();
    });
}
