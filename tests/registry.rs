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
    assert_eq!(DROPS.load(SeqCst), 0, "an Arc still holds generation 1");
    drop(first_arc);
    // Gone with its last holder: this thread's cache does not keep it,
    // although this thread has not read the cell since.
    assert_eq!(DROPS.load(SeqCst), 1, "generation 1 dropped");
    assert_eq!(cell.get().generation(), 2);

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

/// Settings and an instance that record which settings it was built from
/// and count its drops per settings value.
mod lifecycle {
    use super::*;

    pub(super) static BUILT: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
    pub(super) static DROPPED: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

    pub(super) struct Registry {
        pub(super) settings: usize,
    }

    impl Drop for Registry {
        fn drop(&mut self) {
            DROPPED[self.settings].fetch_add(1, SeqCst);
        }
    }

    pub(super) fn build(settings: &usize) -> Registry {
        BUILT[*settings].fetch_add(1, SeqCst);
        Registry {
            settings: *settings,
        }
    }
}

/// The sequence from the issue that found the pinning bug: a thread that
/// read generation `b` once, and holds nothing, must not keep `b` alive
/// after `c` replaces it.
#[test]
fn an_instance_read_once_is_not_kept_alive_by_the_readers_cache() {
    use lifecycle::{DROPPED, Registry, build};
    let (a, b, c) = (1, 2, 3);
    let cell: RegistryCell<Registry, usize> = RegistryCell::new(build);
    cell.reinit(a);
    let old = cell.get_arc();
    let new = cell.reinit(b);
    assert_eq!(cell.get().settings, b, "this thread reads b once");
    drop(old);
    assert_eq!(DROPPED[a].load(SeqCst), 1, "a is gone with its last Arc");
    cell.reinit(c);
    assert_eq!(DROPPED[b].load(SeqCst), 0, "`new` still holds b");
    drop(new);
    assert_eq!(
        DROPPED[b].load(SeqCst),
        1,
        "nobody holds b: this thread's cache must not keep it alive"
    );
    assert_eq!(cell.get().settings, c);
}

/// Another thread reads the cell once and then parks: a `reinit` with no
/// reference alive drops the old instance before it returns.
#[test]
fn a_parked_readers_cache_does_not_delay_the_drop() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cell: Arc<RegistryCell<(u8, Counted), u8>> =
        Arc::new(RegistryCell::new(|s| (*s, Counted(&DROPS))));
    let (read, done) = (Arc::new(Barrier::new(2)), Arc::new(AtomicBool::new(false)));
    let reader = thread::spawn({
        let (cell, read, done) = (cell.clone(), read.clone(), done.clone());
        move || {
            assert_eq!(cell.get().0, 0);
            read.wait();
            // Idle, with the cell cached, until the main thread is done.
            while !done.load(SeqCst) {
                thread::park_timeout(Duration::from_secs(1));
            }
        }
    });
    read.wait();
    cell.reinit(1);
    assert_eq!(
        DROPS.load(SeqCst),
        1,
        "generation 1 dropped before reinit returned, although the parked reader cached it"
    );
    done.store(true, SeqCst);
    reader.thread().unpark();
    reader.join().unwrap();
    assert_eq!(DROPS.load(SeqCst), 1, "generation 2 is current");
}

/// A cell that is dropped takes its instance with it, although idle threads
/// cached it.
#[test]
fn dropping_the_cell_drops_its_instance_despite_idle_caches() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cell: Arc<RegistryCell<Counted, u8>> = Arc::new(RegistryCell::new(|_| Counted(&DROPS)));
    let (read, done) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let reader = thread::spawn({
        let (cell, read, done) = (cell.clone(), read.clone(), done.clone());
        move || {
            drop(cell.get());
            drop(cell);
            read.wait();
            done.wait();
        }
    });
    drop(cell.get());
    read.wait();
    drop(cell);
    assert_eq!(DROPS.load(SeqCst), 1, "dropped with the cell");
    done.wait();
    reader.join().unwrap();
}

/// Reader threads that read until told to stop, then stay alive (idle, with
/// whatever they cached) until released: what a sweep must cope with.
struct IdleReaders {
    stop: Arc<AtomicBool>,
    stopped: Arc<Barrier>,
    exit: Arc<Barrier>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// A reader's loop counter: the next read's index until the readers are
/// told to stop, with a short sleep now and then (to leave the cores to the
/// writer and to the timing test beside these ones).
struct Reads {
    stop: Arc<AtomicBool>,
    i: usize,
}

impl Iterator for Reads {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.stop.load(SeqCst) {
            return None;
        }
        self.i += 1;
        if cfg!(miri) || self.i % 64 == 0 {
            thread::sleep(Duration::from_micros(50));
        }
        Some(self.i - 1)
    }
}

impl IdleReaders {
    /// `readers` threads, thread `r` running `reader(r)` over its `Reads`.
    /// A reader keeps the references it holds in its own frame and drops
    /// them when it returns; then its thread idles.
    fn spawn<R: FnOnce(Reads) + Send + 'static>(
        readers: usize,
        reader: impl Fn(usize) -> R,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, exit) = (
            Arc::new(Barrier::new(readers + 1)),
            Arc::new(Barrier::new(readers + 1)),
        );
        let threads = (0..readers)
            .map(|r| {
                let read = reader(r);
                let reads = Reads {
                    stop: stop.clone(),
                    i: 0,
                };
                let (stopped, exit) = (stopped.clone(), exit.clone());
                thread::spawn(move || {
                    read(reads);
                    stopped.wait();
                    exit.wait();
                })
            })
            .collect();
        Self {
            stop,
            stopped,
            exit,
            threads,
        }
    }

    /// Stops the readers and returns once every one of them has dropped its
    /// references and is idle (alive, its cache intact).
    fn stop_and_wait_idle(&self) {
        self.stop.store(true, SeqCst);
        self.stopped.wait();
    }

    /// Lets the idle readers exit, and joins them.
    fn release(self) {
        self.exit.wait();
        self.threads.into_iter().for_each(|t| t.join().unwrap());
    }
}

/// Readers on many threads, some holding a `RegistryRef` across reinits,
/// while one writer reinitialises: once the readers stop (and before they
/// exit), exactly the current instance is alive.
#[test]
fn after_readers_stop_only_the_current_instance_is_alive() {
    const READERS: usize = 16;
    const REINITS: usize = if cfg!(miri) { 5 } else { 200 };
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cell: Arc<RegistryCell<(usize, Counted), usize>> = Arc::new(RegistryCell::new(|s| {
        BUILDS.fetch_add(1, SeqCst);
        (*s, Counted(&DROPS))
    }));
    drop(cell.get());
    let readers = IdleReaders::spawn(READERS, |r| {
        let cell = cell.clone();
        move |reads: Reads| {
            let mut held = None;
            for i in reads {
                let seen = cell.get();
                assert!(seen.0 <= REINITS);
                // Every few reads, hold one across the next reads (and so
                // across reinits), or let the held one go.
                if (i + r) % 7 == 0 {
                    held = held.is_none().then_some(seen);
                }
            }
            drop(held);
        }
    });
    for settings in 1..=REINITS {
        cell.reinit(settings);
        thread::yield_now();
    }
    readers.stop_and_wait_idle();
    let (builds, drops) = (BUILDS.load(SeqCst), DROPS.load(SeqCst));
    assert_eq!(builds, REINITS + 1);
    assert_eq!(
        builds,
        drops + 1,
        "exactly one instance alive (the current one) while {READERS} readers idle"
    );
    readers.release();
}

/// More cells than a thread's cache has slots, read in turn by several
/// threads while reinits run: once the readers stop, exactly one instance
/// per cell is alive.
#[test]
fn cells_sharing_slots_under_reinits_keep_exact_accounting() {
    const CELLS: usize = 24;
    const READERS: usize = 4;
    const ROUNDS: usize = if cfg!(miri) { 2 } else { 50 };
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    let cells: Arc<Vec<RegistryCell<(usize, Counted), usize>>> = Arc::new(
        (0..CELLS)
            .map(|_| {
                RegistryCell::new(|s| {
                    BUILDS.fetch_add(1, SeqCst);
                    (*s, Counted(&DROPS))
                })
            })
            .collect(),
    );
    cells.iter().for_each(|cell| drop(cell.get()));
    let readers = IdleReaders::spawn(READERS, |r| {
        let cells = cells.clone();
        move |reads: Reads| {
            let mut held = Vec::new();
            for i in reads.map(|i| i + r) {
                let cell = &cells[i % CELLS];
                if i % 5 == 0 {
                    held.push(cell.get());
                    if held.len() > 3 {
                        drop(held.remove(0));
                    }
                } else {
                    assert!(cell.get_arc().0 <= ROUNDS);
                }
            }
            drop(held);
        }
    });
    for round in 1..=ROUNDS {
        for cell in cells.iter() {
            cell.reinit(round);
        }
        thread::yield_now();
    }
    readers.stop_and_wait_idle();
    let (builds, drops) = (BUILDS.load(SeqCst), DROPS.load(SeqCst));
    assert_eq!(builds, CELLS * (ROUNDS + 1));
    assert_eq!(
        builds,
        drops + CELLS,
        "exactly one instance per cell alive while the readers idle"
    );
    readers.release();
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
