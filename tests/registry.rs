//! Integration tests for `RegistryCell`: the seed's table (10 and 200
//! workers), `reinit_if_changed` coalescing, readers during a slow reinit,
//! drop accounting, and the per-thread read cache's edge cases (references
//! held across a refresh, cells sharing a cache slot, references outliving
//! their thread's cache).

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use toctou::{RegistryCell, RegistryRef};

/// The seed's registry: built from settings, slowly.
struct Registry {
    region: String,
}

/// `workers` threads, released together, each call `call` on `cell` and
/// report the instance's address.
fn race<T: Send + Sync + 'static, S: Send + Sync + 'static>(
    cell: &'static RegistryCell<T, S>,
    workers: usize,
    call: fn(&'static RegistryCell<T, S>) -> Arc<T>,
) -> HashSet<usize> {
    let barrier = Arc::new(Barrier::new(workers));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                Arc::as_ptr(&call(cell)) as usize
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

macro_rules! seed_table {
    ($(#[$attr:meta])* $name:ident, $workers:expr, $call:expr) => {
        #[test]
        $(#[$attr])*
        fn $name() {
            static BUILDS: AtomicUsize = AtomicUsize::new(0);
            static CELL: RegistryCell<Registry, String> = RegistryCell::new(|region| {
                BUILDS.fetch_add(1, SeqCst);
                thread::sleep(Duration::from_millis(10));
                Registry {
                    region: region.clone(),
                }
            });
            let instances = race(&CELL, $workers, $call);
            assert_eq!(BUILDS.load(SeqCst), 1, "registries built");
            assert_eq!(instances.len(), 1, "distinct instances seen");
        }
    };
}

seed_table!(seed_table_get_10_workers, 10, |c| c.get_arc());
seed_table!(
    #[cfg_attr(miri, ignore = "hundreds of threads take minutes under miri")]
    seed_table_get_200_workers,
    200,
    |c| c.get_arc()
);
seed_table!(seed_table_reinit_if_changed_10_workers, 10, |c| c
    .reinit_if_changed("eu".to_owned()));
seed_table!(seed_table_reinit_if_changed_200_workers, 200, |c| c
    .reinit_if_changed("eu".to_owned()));

#[test]
fn first_build_uses_default_settings() {
    static CELL: RegistryCell<Registry, String> = RegistryCell::new(|region| Registry {
        region: region.clone(),
    });
    assert_eq!(CELL.get().region, "");
    assert_eq!(*CELL.settings(), "");
    assert_eq!(CELL.reinit("us".to_owned()).region, "us");
    assert_eq!(*CELL.settings(), "us");
    assert_eq!(CELL.get().region, "us");
}

#[test]
#[cfg_attr(
    miri,
    ignore = "wall-clock latency check; miri's clock is not the machine's"
)]
fn readers_never_wait_for_a_reinit_and_never_go_back() {
    static REBUILDING: AtomicBool = AtomicBool::new(false);
    static CELL: RegistryCell<u64, u64> = RegistryCell::new(|generation_hint| {
        if *generation_hint == 2 {
            REBUILDING.store(true, SeqCst);
            thread::sleep(Duration::from_millis(50)); // the slow rebuild
            REBUILDING.store(false, SeqCst);
        }
        *generation_hint
    });
    const READERS: usize = 4;
    assert_eq!(*CELL.get(), 0); // generation 1, built from the default
    // Every reader has seen generation 1 before the rebuild starts.
    let all_reading = Arc::new(Barrier::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let all_reading = all_reading.clone();
            thread::spawn(move || {
                let mut seen = vec![CELL.get().generation()];
                all_reading.wait();
                let (mut slowest, mut during) = (Duration::ZERO, 0);
                let deadline = Instant::now() + Duration::from_secs(10);
                // Read until generation 2 has been seen 1,000 times (or give
                // up at the deadline, which the assertions then report).
                let mut after = 0;
                while after < 1_000 && Instant::now() < deadline {
                    let start = Instant::now();
                    let rebuilding = REBUILDING.load(SeqCst);
                    let generation = CELL.get().generation();
                    // Began and ended inside the rebuild: did not wait for it.
                    if rebuilding && REBUILDING.load(SeqCst) {
                        during += 1;
                    }
                    slowest = slowest.max(start.elapsed());
                    if seen.last() != Some(&generation) {
                        seen.push(generation);
                    }
                    if generation == 2 {
                        after += 1;
                    }
                }
                (seen, slowest, during)
            })
        })
        .collect();
    all_reading.wait();
    assert_eq!(*CELL.reinit(2), 2);
    for reader in readers {
        let (seen, slowest, during) = reader.join().unwrap();
        assert_eq!(seen, [1, 2], "generations seen, in order");
        // Not a latency bound (a busy test machine can preempt a reader for
        // longer than a few ms): a reader that waited for the 50 ms build
        // could not complete a single read inside it.
        assert!(
            during > 0,
            "no get() completed during the 50 ms rebuild (slowest: {slowest:?}): readers waited for it"
        );
    }
}

/// A value that counts its drops.
struct Counted(&'static AtomicUsize);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[test]
fn replaced_instances_drop_when_their_last_reader_lets_go() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cell: Arc<RegistryCell<Counted, u8>> = Arc::new(RegistryCell::new(|_| Counted(&DROPS)));
    let first = cell.get();
    let first_arc = cell.get_arc();
    cell.reinit(1);
    assert_eq!(DROPS.load(SeqCst), 0, "readers still hold generation 1");
    drop(first);
    drop(first_arc);
    // This thread's cache still points at generation 1 until it reads again.
    assert_eq!(cell.get().generation(), 2);
    assert_eq!(DROPS.load(SeqCst), 1, "generation 1 dropped");

    // Another thread reads generation 2, then exits: its cache goes with it.
    // (`thread::spawn` + `join`, not a scoped thread: `join` returns after
    // the thread's thread-local destructors have run.)
    let reader = thread::spawn({
        let cell = cell.clone();
        move || assert_eq!(cell.get().generation(), 2)
    });
    reader.join().unwrap();
    cell.reinit(2);
    assert_eq!(cell.get().generation(), 3);
    assert_eq!(DROPS.load(SeqCst), 2, "generation 2 dropped");
}

#[test]
fn a_ref_held_across_its_own_threads_refresh_lives_until_it_drops() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cell: RegistryCell<(u8, Counted), u8> = RegistryCell::new(|s| (*s, Counted(&DROPS)));
    let old = cell.get();
    let old_clone = old.clone();
    cell.reinit(1);
    // This read replaces generation 1 in the thread's cache while two
    // references of this thread still point at it.
    let new = cell.get();
    assert_eq!((new.0, new.generation()), (1, 2));
    assert_eq!((old.0, old.generation()), (0, 1));
    drop(old);
    assert_eq!(old_clone.0, 0);
    assert_eq!(DROPS.load(SeqCst), 0, "a clone still holds generation 1");
    let arc = old_clone.to_arc();
    drop(old_clone);
    assert_eq!((arc.0, DROPS.load(SeqCst)), (0, 0), "an Arc still holds it");
    drop(arc);
    assert_eq!(
        DROPS.load(SeqCst),
        1,
        "dropped with its last reader, with no further read"
    );
    drop(new);
    assert_eq!(cell.get().0, 1);
    assert_eq!(DROPS.load(SeqCst), 1, "generation 2 is current");
}

#[test]
fn cells_sharing_a_cache_slot_stay_correct() {
    // More cells than a thread's cache has slots (16), read in turn, with a
    // reference to each held throughout: every read evicts another cell's
    // entry that a reference still points at.
    const CELLS: usize = 40;
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    // On a thread of its own, so that its cache's exit is part of the test.
    thread::spawn(|| {
        let cells: Vec<RegistryCell<(usize, Counted), usize>> = (0..CELLS)
            .map(|_| RegistryCell::new(|s| (*s, Counted(&DROPS))))
            .collect();
        for (i, cell) in cells.iter().enumerate() {
            cell.reinit(i);
        }
        let held: Vec<RegistryRef<'_, _>> = cells.iter().map(|c| c.get()).collect();
        for _ in 0..3 {
            for (i, cell) in cells.iter().enumerate() {
                assert_eq!(cell.get().0, i);
                assert_eq!(cell.get_arc().0, i);
            }
        }
        for (i, cell) in cells.iter().enumerate() {
            cell.reinit(i + CELLS);
        }
        for (i, (cell, held)) in cells.iter().zip(&held).enumerate() {
            assert_eq!((held.0, held.generation()), (i, 1));
            assert_eq!((cell.get().0, cell.get().generation()), (i + CELLS, 2));
        }
        assert_eq!(DROPS.load(SeqCst), 0, "every generation 1 is still held");
        drop(held);
        assert_eq!(
            DROPS.load(SeqCst),
            CELLS,
            "every generation 1 dropped with its last reader"
        );
    })
    .join()
    .unwrap();
    assert_eq!(
        DROPS.load(SeqCst),
        2 * CELLS,
        "the thread's exit released every generation 2"
    );
}

#[test]
fn a_ref_may_outlive_its_threads_cache() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static CELL: RegistryCell<Counted, u8> = RegistryCell::new(|_| Counted(&DROPS));
    thread_local! {
        static HELD: RefCell<Option<RegistryRef<'static, Counted>>> = const { RefCell::new(None) };
    }
    // Thread-local destructors run in an order std does not promise, so
    // the reference is stored both before and after the thread's first
    // read: in one of the two threads it outlives the cache's emptying.
    thread::spawn(|| {
        HELD.with(|held| *held.borrow_mut() = Some(CELL.get()));
    })
    .join()
    .unwrap();
    thread::spawn(|| {
        let _ = CELL.get();
        HELD.with(|held| *held.borrow_mut() = Some(CELL.get()));
    })
    .join()
    .unwrap();
    assert_eq!(DROPS.load(SeqCst), 0, "generation 1 is current");
    CELL.reinit(1);
    assert_eq!(
        DROPS.load(SeqCst),
        1,
        "the exited threads' references and caches let go of generation 1"
    );
}

#[test]
fn a_thread_local_destructor_may_read_a_cell() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static CELL: RegistryCell<Counted, u8> = RegistryCell::new(|_| Counted(&DROPS));
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    struct ReadsOnExit;
    impl Drop for ReadsOnExit {
        fn drop(&mut self) {
            let read = CELL.get();
            SEEN.store(read.generation() as usize, SeqCst);
        }
    }
    thread_local! {
        static READER: ReadsOnExit = const { ReadsOnExit };
    }
    // As above, the reader's destructor runs before or after the cache is
    // emptied, depending on the platform; two threads cover both orders.
    thread::spawn(|| READER.with(|_| drop(CELL.get())))
        .join()
        .unwrap();
    thread::spawn(|| {
        let _ = CELL.get();
        READER.with(|_| ());
    })
    .join()
    .unwrap();
    assert_eq!(SEEN.load(SeqCst), 1, "the destructor read generation 1");
    CELL.reinit(1);
    assert_eq!(DROPS.load(SeqCst), 1, "nothing kept generation 1 alive");
}

#[test]
fn failed_or_panicking_builds_change_nothing() {
    static CELL: RegistryCell<u16, String> = RegistryCell::new(|s| s.parse().unwrap());
    CELL.reinit("80".to_owned());
    assert!(
        CELL.try_reinit("x".to_owned(), |s| s.parse::<u16>())
            .is_err()
    );
    let panicked = catch_unwind(AssertUnwindSafe(|| CELL.reinit("not a port".to_owned())));
    assert!(panicked.is_err(), "the build's panic reaches the caller");
    assert_eq!((*CELL.get(), CELL.generation()), (80, 1));
    assert_eq!(*CELL.settings(), "80");
    assert_eq!(*CELL.reinit("81".to_owned()), 81, "no poisoning");
}

#[test]
fn reentrant_build_panics_with_a_message() {
    static CELL: RegistryCell<u8, u8> = RegistryCell::new(|_| *CELL.get());
    let payload = catch_unwind(|| *CELL.get()).expect_err("reentrancy must panic, not deadlock");
    let message = match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(_) => String::new(),
    };
    assert!(
        message.contains("reentrant first initialisation"),
        "{message}"
    );
    assert!(
        message.contains("toctou::RegistryCell<u8, u8>"),
        "{message}"
    );
    assert_eq!(CELL.generation(), 0);
}

#[test]
fn reading_the_current_instance_inside_a_reinit_build_is_fine() {
    // Each build adds its settings to the instance published before it.
    static CELL: RegistryCell<u32, u32> = RegistryCell::new(|add| {
        let previous = if CELL.generation() == 0 {
            0
        } else {
            *CELL.get()
        };
        previous + add
    });
    assert_eq!(CELL.reinit(5).as_ref(), &5);
    assert_eq!(CELL.reinit(1).as_ref(), &6);
}

#[test]
fn reentrant_reinit_panics_with_a_message() {
    static CELL: RegistryCell<u8, u8> =
        RegistryCell::new(|s| if *s == 1 { *CELL.reinit(2) } else { *s });
    let _ = CELL.get();
    let payload =
        catch_unwind(|| *CELL.reinit(1)).expect_err("reentrancy must panic, not deadlock");
    let message = payload.downcast::<String>().map(|s| *s).unwrap_or_default();
    assert!(message.contains("reentrant reinit"), "{message}");
    assert_eq!(
        (*CELL.get(), CELL.generation()),
        (0, 1),
        "nothing published"
    );
}

#[test]
fn an_instance_whose_drop_reads_a_registry_can_be_replaced() {
    static OTHER: RegistryCell<u8> = RegistryCell::new(|()| 7);
    static READ_IN_DROP: AtomicUsize = AtomicUsize::new(0);
    struct ReadsOnDrop;
    impl Drop for ReadsOnDrop {
        fn drop(&mut self) {
            READ_IN_DROP.fetch_add(usize::from(*OTHER.get()), SeqCst);
        }
    }
    static CELL: RegistryCell<ReadsOnDrop, u8> = RegistryCell::new(|_| ReadsOnDrop);
    let _ = OTHER.get();
    let _ = CELL.get();
    drop(CELL.reinit(1));
    // Refreshing this thread's cache releases the last reference to
    // generation 1, whose drop reads OTHER through the same cache.
    assert_eq!(CELL.get().generation(), 2);
    assert_eq!(READ_IN_DROP.load(SeqCst), 7);
}

#[test]
fn thread_safety_bounds() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RegistryCell<Vec<String>, String>>();
}
