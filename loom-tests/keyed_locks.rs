//! Loom models of the keyed-lock entry lifecycle (src/keyed/core.rs over
//! src/table.rs and src/wait.rs), through `KeyedLocks` and `KeyedRwLocks`.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_keyed_locks
//! ```
//!
//! The models run the production lifecycle code; under `toctou_loom` only the
//! sync layer changes (the shard locks, park/unpark and thread-locals become
//! loom's), blocking calls queue at once instead of spinning (but in the
//! model of spinning itself, which lets them spin once), and a timed
//! wait yields once and then counts as expired (loom has no clock), which
//! makes every execution race the timeout against the release.
//!
//! Mutual exclusion is checked with a loom `UnsafeCell` written inside the
//! critical section: two holders at once are a causality violation that loom
//! reports. The maps use a fixed hasher so that every replay picks the same
//! shard. Models with three threads set `preemption_bound`; each says so.
//! Each model was checked against a deliberately broken protocol
//! (scripts/loom-mutants.py); the comments say which break each one catches.
#![cfg(toctou_loom)]

use std::future::Future;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use toctou::{KeyedLocks, KeyedRwLocks};

type Hasher = BuildHasherDefault<DefaultHasher>;
type Locks = KeyedLocks<usize, Hasher>;
type RwLocks = KeyedRwLocks<usize, Hasher>;

/// A std `Arc`, because `lock_owned` takes `self: &std::sync::Arc<Self>`;
/// every loom object inside the map is still tracked.
fn new_locks() -> std::sync::Arc<Locks> {
    std::sync::Arc::new(KeyedLocks::with_hasher(Hasher::default()))
}

/// Data that only a holder of the key may touch.
#[derive(Clone)]
struct Guarded(Arc<UnsafeCell<usize>>);

impl Guarded {
    fn new() -> Self {
        Self(Arc::new(UnsafeCell::new(0)))
    }

    /// A write inside the critical section: loom fails the model if another
    /// thread's access is not ordered before it by the lock.
    fn bump(&self) {
        // SAFETY: only called while holding the key; loom checks the claim.
        self.0.with_mut(|n| unsafe { *n += 1 });
    }

    fn read(&self) -> usize {
        // SAFETY: only called while holding the key (perhaps shared).
        self.0.with(|n| unsafe { *n })
    }
}

fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(Waker::noop()))
}

/// Two threads lock one key: mutual exclusion, and no entry left.
///
/// Catches: acquiring without checking the lock state (both hold), and a
/// release that forgets to wake the queued waiter (loom reports the
/// deadlock of a thread parked forever).
#[test]
fn two_threads_exclude_each_other_on_one_key() {
    loom::model(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&1);
                data.bump();
            })
        };
        {
            let _guard = locks.lock(&1);
            data.bump();
        }
        other.join().unwrap();
        assert_eq!(data.read(), 2);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
}

/// Blocking callers that spin before they queue (one spin under loom):
/// two threads lock one key while a third locks it with a timeout. The
/// keyed maps' spinners retry the lock-free acquire, counted nowhere, then
/// queue. Never two holders, no lost wake-up, and `len() == 0` at the end.
/// Bounded to two preemptions. (`FileLocks`' spinners, counted in the
/// entry, have their own models below, which catch the counting's bugs.)
#[test]
fn spinning_callers_keep_the_entry_until_they_take_the_key_or_queue() {
    toctou::__loom_spin_rounds(1);
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&1);
                data.bump();
            })
        };
        let timed = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                if let Some(_guard) = locks.try_lock_for(&1, Duration::from_millis(1)) {
                    data.bump();
                }
            })
        };
        {
            let _guard = locks.lock(&1);
            data.bump();
        }
        other.join().unwrap();
        timed.join().unwrap();
        assert!(data.read() >= 2);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
    toctou::__loom_spin_rounds(0);
}

/// The removal race: the last guard drops (and removes the entry) while
/// another thread looks the key up. Never two holders, and `len() == 0`.
///
/// Catches: removing the entry without re-checking under the shard lock
/// that nobody else holds or waits for it, which lets a newcomer lock an
/// entry that is about to vanish, and a second newcomer create another.
#[test]
fn last_release_races_a_lookup_of_the_same_key() {
    loom::model(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let held = locks.lock_owned(&1);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (locks, data) = (locks.clone(), data.clone());
                thread::spawn(move || {
                    if let Some(_guard) = locks.try_lock(&1) {
                        data.bump();
                    }
                })
            })
            .collect();
        drop(held);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(locks.len(), 0, "entry left behind");
    });
}

/// A blocked waiter and the release race: the waiter queues while the
/// holder releases; it must get the key, and the entry must go.
///
/// Catches: unlocking the shard between "the key is taken" and "queue
/// myself" (the release in between wakes nobody: a lost wake-up, which loom
/// reports as a deadlock).
#[test]
fn a_waiter_queues_while_the_holder_releases() {
    loom::model(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let held = locks.lock_owned(&1);
        let waiter = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&1);
                data.bump();
            })
        };
        data.bump();
        drop(held);
        // A newcomer after the release: if the release had detached the
        // entry the waiter is queued on, both would hold the key.
        {
            let _guard = locks.lock(&1);
            data.bump();
        }
        waiter.join().unwrap();
        assert_eq!(locks.len(), 0);
    });
}

/// An async waiter is polled once (and queued), then dropped while the
/// holder releases: the release may already have woken it. Nothing may be
/// left behind, and a later caller must get the key.
///
/// Catches: a cancelled waiter that leaves the queue without passing on a
/// wake-up it had received (the key stays free but the entry stays live),
/// and one that never leaves the queue (a ghost).
#[test]
fn an_async_waiter_is_dropped_while_the_holder_releases() {
    loom::model(|| {
        let locks = new_locks();
        let held = locks.lock_owned(&1);
        let holder = thread::spawn(move || drop(held));
        {
            let mut waiter = Box::pin(locks.lock_async(&1));
            let _ = poll_once(&mut waiter);
            // Dropped here: cancelled, or a guard released at once.
        }
        holder.join().unwrap();
        assert_eq!(locks.len(), 0, "entry or waiter left behind");
        assert!(locks.try_lock(&1).is_some(), "the key is free again");
    });
}

/// Two async waiters; the first is dropped after the holder released (it
/// may have been woken): the second must still get the key.
///
/// Catches: a cancelled, woken waiter that does not dispatch the queue
/// again; the second waiter would never be woken.
#[test]
fn a_woken_async_waiter_cancels_and_the_next_one_is_woken() {
    loom::model(|| {
        let locks = new_locks();
        let held = locks.lock_owned(&1);
        let mut first = Box::pin(locks.lock_async(&1));
        assert!(poll_once(&mut first).is_pending());
        let second = {
            let locks = locks.clone();
            thread::spawn(move || {
                // Blocking: parks until woken, which is the check.
                drop(locks.lock(&1));
            })
        };
        drop(held);
        drop(first);
        second.join().unwrap();
        assert_eq!(locks.len(), 0);
    });
}

/// `try_lock_for` times out while the holder releases: it either got the
/// key (the release won) or gave up, and then left nothing behind.
///
/// Catches: a timed-out waiter that returns `None` although the key had
/// already been handed to it (the key would stay locked forever), and one
/// that does not leave the queue.
#[test]
fn try_lock_for_times_out_while_the_holder_releases() {
    loom::model(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let held = locks.lock_owned(&1);
        let holder = {
            let data = data.clone();
            thread::spawn(move || {
                data.bump();
                drop(held);
            })
        };
        if let Some(_guard) = locks.try_lock_for(&1, Duration::from_millis(1)) {
            data.bump();
        }
        holder.join().unwrap();
        assert_eq!(locks.len(), 0, "entry left behind");
        assert!(locks.try_lock(&1).is_some(), "the key is free again");
    });
}

/// A timed waiter against a thread that re-locks the key: the key may be
/// handed to the waiter just as its deadline passes (under loom a timed
/// wait expires on its third wake-up, after it may have lost twice).
/// Bounded to three preemptions.
///
/// Catches: a timed-out waiter that returns `None` although the key had
/// been handed to it (the key would stay held by nobody, forever).
#[test]
fn try_lock_for_against_barging_with_a_handoff_at_the_deadline() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let waiter = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                if let Some(_guard) = locks.try_lock_for(&1, Duration::from_millis(1)) {
                    data.bump();
                }
            })
        };
        for _ in 0..3 {
            let _guard = locks.lock(&1);
            data.bump();
        }
        waiter.join().unwrap();
        assert_eq!(locks.len(), 0);
        assert!(locks.try_lock(&1).is_some(), "the key is free again");
    });
}

/// An async waiter, polled a few times while another thread re-locks the
/// key, is dropped: the key may have been handed to it meanwhile. Bounded
/// to three preemptions.
///
/// Catches: a dropped future that leaves the queue but does not release a
/// key handed to it.
#[test]
fn an_async_waiter_dropped_after_a_handoff_releases_the_key() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let locks = new_locks();
        let held = locks.lock_owned(&1);
        let mut waiter = Box::pin(locks.lock_async(&1));
        assert!(poll_once(&mut waiter).is_pending(), "queued behind `held`");
        let hog = {
            let locks = locks.clone();
            thread::spawn(move || {
                drop(held);
                for _ in 0..2 {
                    drop(locks.lock(&1));
                }
            })
        };
        for _ in 0..2 {
            thread::yield_now();
            if poll_once(&mut waiter).is_ready() {
                break;
            }
        }
        drop(waiter);
        hog.join().unwrap();
        assert_eq!(locks.len(), 0);
        assert!(locks.try_lock(&1).is_some(), "the key is free again");
    });
}

/// Two `lock_many` calls over overlapping keys, given in opposite orders:
/// no deadlock (loom fails a model in which every thread is blocked).
///
/// Catches: acquiring in the given order instead of the sorted order.
#[test]
fn lock_many_in_opposite_orders_does_not_deadlock() {
    loom::model(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _both = locks.lock_many(&[2, 1]);
                data.bump();
            })
        };
        {
            let _both = locks.lock_many(&[1, 2]);
            data.bump();
        }
        other.join().unwrap();
        assert_eq!(locks.len(), 0);
    });
}

/// Readers and a writer on one key: readers may overlap, the writer is
/// alone, and the entry goes at the end. Three threads: bounded to two
/// preemptions.
///
/// Catches: granting a writer while readers hold the key, or a reader
/// while the writer holds it (a causality violation on the data).
#[test]
fn readers_and_a_writer() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let files: std::sync::Arc<RwLocks> =
            std::sync::Arc::new(KeyedRwLocks::with_hasher(Hasher::default()));
        let data = Guarded::new();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (files, data) = (files.clone(), data.clone());
                thread::spawn(move || {
                    let _r = files.read(&1);
                    data.read()
                })
            })
            .collect();
        {
            let _w = files.write(&1);
            data.bump();
        }
        for r in readers {
            let seen = r.join().unwrap();
            assert!(seen <= 1);
        }
        assert_eq!(files.len(), 0);
    });
}

/// A thread that re-locks the key at once overtakes a woken waiter; after
/// two such losses the key is handed to the waiter directly. Bounded to
/// three preemptions.
///
/// Catches: a handoff that grants the waiter without recording it as the
/// holder (the next `lock` gets the key too: two holders).
#[test]
fn handoff_after_repeated_barging() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let locks = new_locks();
        let data = Guarded::new();
        let waiter = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&1);
                data.bump();
            })
        };
        for _ in 0..3 {
            let _guard = locks.lock(&1);
            data.bump();
        }
        waiter.join().unwrap();
        assert_eq!(data.read(), 4);
        assert_eq!(locks.len(), 0);
    });
}

/// A writer queued between a reader who holds the key and a reader who
/// queues behind it gives up (its future is dropped): the waiting reader
/// must now share the key with the holder, who only releases after that
/// reader is done.
///
/// Catches: a cancelled waiter that leaves the queue without dispatching it
/// again (the reader behind it stays parked behind a writer that is gone,
/// and the holder waits for that reader: a deadlock).
#[test]
fn a_cancelled_writer_lets_the_readers_behind_it_in() {
    loom::model(|| {
        let files: std::sync::Arc<RwLocks> =
            std::sync::Arc::new(KeyedRwLocks::with_hasher(Hasher::default()));
        let first = files.read(&1);
        let mut writer = Box::pin(files.write_async(&1));
        assert!(
            poll_once(&mut writer).is_pending(),
            "queued behind the reader"
        );
        let reader = {
            let files = files.clone();
            thread::spawn(move || drop(files.read(&1)))
        };
        drop(writer);
        reader.join().unwrap();
        drop(first);
        assert_eq!(files.len(), 0);
    });
}

/// Two keys that share a shard under loom (two shards, picked by bits 32 and
/// up of the hash, as `src/table.rs` does), so that inserting the second
/// makes the shard sweep the first (`SLACK` is 1 under loom).
fn same_shard_keys() -> (usize, usize) {
    use std::hash::BuildHasher;
    let shard = |k: usize| (Hasher::default().hash_one(k) >> 32) & 1;
    let b = (2..).find(|&k| shard(k) == shard(1)).unwrap();
    (1, b)
}

/// A sweep kills the idle entry of a key that another thread is locking
/// through the lock-free lookup, and a third lock of the key follows. Never
/// two holders, no freed entry read, and `len() == 0` at the end. Bounded to
/// two preemptions.
///
/// Catches: a fast acquire that takes a dead entry (its holder and the
/// holder of the key's new entry both hold it); a sweep that frees the
/// entries it killed at once, not after the lookups pinned meanwhile (the
/// lookup reads a freed entry); and a sweep that unlinks the entry *by
/// key*, which finds the key's new live entry instead of the dead one (its
/// holder is then alone with an entry nobody else can find).
#[test]
fn a_sweep_races_a_lookup_of_the_key_it_kills() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let (a, b) = same_shard_keys();
        let locks = new_locks();
        let data = Guarded::new();
        drop(locks.lock(&a));
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&a);
                data.bump();
            })
        };
        // Inserting `b` sweeps the shard: `a`'s entry dies if it is idle.
        drop(locks.lock(&b));
        {
            let _guard = locks.lock(&a);
            data.bump();
        }
        other.join().unwrap();
        assert_eq!(data.read(), 2);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
}

/// A sweep runs just after the holder of a key released it to a thread
/// queued on it (woken, not yet back to take it). The entry must survive
/// the sweep: never two holders, no freed entry read, no lost wake-up, and
/// `len()` == 0 at the end. (The keyed maps' spinners rely on no entry:
/// each try looks the key up afresh. `FileLocks`' counted spinners have
/// their own model below.) Bounded to two preemptions.
///
/// Catches: a sweep that kills an entry without holders but with waiters
/// (the waiter takes a freed entry while a newcomer makes a new one).
#[test]
fn a_sweep_beside_a_waiter_spares_its_entry() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let (a, b) = same_shard_keys();
        let locks = new_locks();
        let data = Guarded::new();
        let held = locks.lock_owned(&a);
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.lock(&a);
                data.bump();
            })
        };
        drop(held);
        drop(locks.lock(&b));
        {
            let _guard = locks.lock(&a);
            data.bump();
        }
        other.join().unwrap();
        assert_eq!(data.read(), 2);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
}

/// `FileLocks`' map: a reader-writer map whose blocking callers are counted
/// in the entry while they spin.
fn new_counting_rw_locks() -> std::sync::Arc<RwLocks> {
    std::sync::Arc::new(KeyedRwLocks::with_hasher(Hasher::default()).__loom_counting_spinners())
}

/// As `spinning_callers_keep_the_entry_until_they_take_the_key_or_queue`,
/// with writers on `FileLocks`' map, whose spinners are counted in the
/// entry (through the shard lock). Bounded to two preemptions.
///
/// Catches: a spinner that takes the key without uncounting itself, or
/// that queues without uncounting itself (the entry never goes idle:
/// `len()` stays 1).
#[test]
fn counted_spinners_keep_the_entry_until_they_take_the_key_or_queue() {
    toctou::__loom_spin_rounds(1);
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let locks = new_counting_rw_locks();
        let data = Guarded::new();
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.write(&1);
                data.bump();
            })
        };
        {
            let _guard = locks.write(&1);
            data.bump();
        }
        other.join().unwrap();
        assert_eq!(data.read(), 2);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
    toctou::__loom_spin_rounds(0);
}

/// As `a_sweep_beside_a_waiter_spares_its_entry`, with a spinner on `FileLocks`'
/// map, whose spinners are counted in the entry. Bounded to two
/// preemptions.
///
/// Catches: a release that lets the entry a counted spinner relies on go
/// idle (a sweep kills it, and the spinner's next try finds it gone).
#[test]
fn a_sweep_beside_a_counted_spinner_spares_its_entry() {
    toctou::__loom_spin_rounds(1);
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let (a, b) = same_shard_keys();
        let locks = new_counting_rw_locks();
        let data = Guarded::new();
        let held = locks.write(&a);
        let other = {
            let (locks, data) = (locks.clone(), data.clone());
            thread::spawn(move || {
                let _guard = locks.write(&a);
                data.bump();
            })
        };
        drop(held);
        drop(locks.write(&b));
        other.join().unwrap();
        assert_eq!(data.read(), 1);
        assert_eq!(locks.len(), 0, "entry left behind");
    });
    toctou::__loom_spin_rounds(0);
}
