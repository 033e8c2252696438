//! [`KeyedLocks<K>`]: a mutex per key, created on demand, live while
//! somebody holds or waits for it, and swept once idle.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Duration;

use super::core::{Core, SlotRef};
use super::kind::Exclusive;
use crate::LazyRandomState;

/// A map of per-key mutexes whose keys count as entries ([`len`](Self::len))
/// exactly while somebody holds or waits for them.
///
/// This is the fix for the lock-dictionary pattern
/// `if key not in locks: locks[key] = Lock()` (or `setdefault`), which can
/// create two locks for one key and never frees any. Here the lookup, the
/// creation and the acquisition are one step: no two parties ever hold the
/// same key, and once every guard is dropped and every waiter has finished
/// or given up, [`len`](Self::len) is 0, and the memory of idle keys is
/// bounded (see *Memory*).
///
/// ```
/// use toctou::KeyedLocks;
///
/// let locks = KeyedLocks::<String>::new();
/// let guard = locks.lock("wf-1"); // `&str` works for `String` keys
/// assert!(locks.is_locked("wf-1"));
/// assert!(locks.try_lock("wf-1").is_none(), "one holder per key");
/// assert!(locks.try_lock("wf-2").is_some(), "other keys are independent");
/// drop(guard);
/// assert_eq!(locks.len(), 0, "nothing is left behind");
/// ```
///
/// # Semantics
///
/// - **Blocking, async, owned.** [`lock`](Self::lock) parks the thread;
///   [`lock_async`](Self::lock_async) suspends the task and works on any
///   runtime; [`lock_owned`](Self::lock_owned) returns a `'static` guard.
///   Sync and async callers of one key exclude each other.
/// - **Timeouts.** [`try_lock`](Self::try_lock) never waits;
///   [`try_lock_for`](Self::try_lock_for) returns `None` after its timeout
///   and leaves nothing behind. For async timeouts, wrap `lock_async` in
///   your runtime's timeout: it is cancellation-safe.
/// - **Cancellation.** Dropping a `lock_async` future removes its waiter
///   (and the key from [`len`](Self::len), if nobody else needs it). If the key had just been
///   handed to it, it is released to the next waiter.
/// - **Panics.** Guards release on drop, also during unwinding. There is no
///   poisoning: the lock protects no data of its own.
/// - **Reentrancy is not detected.** A thread that waits without a timeout
///   for a key it holds itself waits forever, as with `std::sync::Mutex`.
///   Guards are `Send`, so a thread that took a guard may have moved it to
///   another thread (a scoped thread, a worker of a `static` map, a
///   channel), which will release it: such a wait ends, and nothing the map
///   can see tells the two cases apart. A check that panicked on "this
///   thread took the key" would fire on waits that succeed, so there is
///   none. Code that may re-lock on one thread can use
///   [`try_lock`](Self::try_lock) or [`try_lock_for`](Self::try_lock_for),
///   which answer `None` instead. (Initialisers are different: a
///   [`SingletonMap`](crate::SingletonMap) or [`Singleton`](crate::Singleton)
///   initialiser runs on the calling thread and cannot move, so reentrant
///   initialisation is detected and panics.) A cycle through other threads
///   is not detected either; [`lock_many`](Self::lock_many) avoids the
///   common one.
/// - **Fairness.** Waiters queue in arrival order. A release wakes the
///   front waiter and leaves the key free, so a running thread may take it
///   first (barging, as with `parking_lot::Mutex`): a hot key stays busy
///   instead of idle while a parked thread wakes up. Fairness is eventual,
///   as parking_lot's: a front waiter that has lost such a race and has
///   waited 0.5 ms gets the key handed to it directly on the next release.
/// - **Deadlock freedom for several keys.** [`lock_many`](Self::lock_many)
///   sorts and deduplicates its keys and takes them in order.
/// - **Memory.** A released key's entry is kept, idle, so that locking the
///   key again writes nothing but the entry itself (no table write, no
///   allocation, and threads on different keys share no cache line). Each
///   of the map's shards (four per core) sweeps its idle entries, and frees
///   them (and drops their keys) once no lookup can still be reading them,
///   whenever inserting a new key takes its entries past its live keys plus
///   the larger of 256 and those live keys. So memory is the keys in use
///   plus at most 256 idle entries per shard, or as many idle entries as
///   the shard had live keys at its last sweep if that was more; plus the
///   entries of the last sweeps, which wait to be freed until the lookups
///   that were in progress at the sweep have finished (usually the next
///   sweep, in any shard, frees them). A key's `Drop` runs in the call that
///   frees its entry: one that inserts a new key and sweeps (a panic there
///   reaches that caller, which then holds nothing), or the map's drop.
///
/// # Compared with
///
/// - `DashMap<K, Arc<Mutex<()>>>`: never removes entries (the map grows with
///   every key ever used), and removing them by hand has the removal race:
///   a thread that cloned the `Arc` just before the removal locks a mutex
///   that is no longer in the map, while a newcomer creates a second one.
/// - `lockmap::LockMap`: also removes idle entries correctly, and locks
///   batches of keys in sorted order; it is a key-value map with per-entry
///   locking, blocking only. `KeyedLocks` adds async and owned guards,
///   timeouts, statistics, and a reader-writer form
///   ([`KeyedRwLocks`](crate::KeyedRwLocks)).
pub struct KeyedLocks<K, S = LazyRandomState> {
    core: Core<K, Exclusive, S>,
}

keyed_map_common!(KeyedLocks, "lock(&1)", "lock(\"a\")");

impl<K: Hash + Eq, S: BuildHasher> KeyedLocks<K, S> {
    /// Locks `key`, parking the thread until it is free.
    ///
    /// The key is cloned (`Q::to_owned`) only if this call creates its entry.
    ///
    /// If this thread holds `key` itself, this waits forever (see
    /// *Reentrancy* on [`KeyedLocks`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use toctou::KeyedLocks;
    ///
    /// let locks = Arc::new(KeyedLocks::<String>::new());
    /// let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    /// std::thread::scope(|s| {
    ///     for _ in 0..4 {
    ///         s.spawn(|| {
    ///             let _guard = locks.lock("account-7");
    ///             // Read-modify-write under the key's lock: no lost update.
    ///             let seen = counter.load(std::sync::atomic::Ordering::Relaxed);
    ///             counter.store(seen + 1, std::sync::atomic::Ordering::Relaxed);
    ///         });
    ///     }
    /// });
    /// assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 4);
    /// assert!(locks.is_empty());
    /// ```
    pub fn lock<Q>(&self, key: &Q) -> KeyGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire(key, ());
        KeyGuard::new(self, slot)
    }

    /// Locks `key` if it is free now; never waits for another holder and
    /// never leaves an entry behind when it fails.
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<String>::new();
    /// let held = locks.try_lock("job-1").expect("free");
    /// assert!(locks.try_lock("job-1").is_none());
    /// drop(held);
    /// assert!(locks.try_lock("job-1").is_some());
    /// ```
    pub fn try_lock<Q>(&self, key: &Q) -> Option<KeyGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.try_acquire(key, ())?;
        Some(KeyGuard::new(self, slot))
    }

    /// Locks `key`, waiting at most `timeout`. Returns `None` if the key
    /// stayed taken; the waiter then leaves the queue and, if it was the
    /// last party interested in the key, removes its entry.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let locks = toctou::KeyedLocks::<u64>::new();
    /// let held = locks.lock(&1);
    /// assert!(locks.try_lock_for(&1, Duration::from_millis(10)).is_none());
    /// drop(held);
    /// assert!(locks.try_lock_for(&1, Duration::from_millis(10)).is_some());
    /// assert!(locks.is_empty());
    /// ```
    pub fn try_lock_for<Q>(&self, key: &Q, timeout: Duration) -> Option<KeyGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_for(key, (), timeout)?;
        Some(KeyGuard::new(self, slot))
    }

    /// Locks `key` without blocking the thread: the returned future resolves
    /// once the task holds the key. Runtime-agnostic.
    ///
    /// Cancellation-safe: dropping the future before it resolves removes
    /// its waiter and leaves no entry behind; a key handed to it in the
    /// meantime is passed on to the next waiter. The guard is `Send` when
    /// `K: Send + Sync`, so it can be held across `.await` in a spawned task.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let locks = toctou::KeyedLocks::<String>::new();
    /// block_on(async {
    ///     let guard = locks.lock_async("wf-1").await;
    ///     assert_eq!(guard.key(), "wf-1");
    /// });
    /// assert!(locks.is_empty());
    /// ```
    pub async fn lock_async<Q>(&self, key: &Q) -> KeyGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_async(key, ()).await;
        KeyGuard::new(self, slot)
    }

    /// Locks `key` and returns a guard that owns a reference to the map, so
    /// it is `'static` (to store it, or to move it into a spawned task).
    ///
    /// The guard is not counted as held by this thread: once it has been
    /// moved to another thread, this thread may wait for the key again and
    /// gets it when the other thread drops the guard.
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// let locks = Arc::new(toctou::KeyedLocks::<String>::new());
    /// let guard = locks.lock_owned("wf-1");
    /// let worker = std::thread::spawn(move || {
    ///     assert_eq!(guard.key(), "wf-1");
    ///     std::thread::sleep(std::time::Duration::from_millis(10));
    ///     // The guard is released when the thread ends.
    /// });
    /// // This thread took the guard but gave it away: it waits, then locks.
    /// let again = locks.lock("wf-1");
    /// drop(again);
    /// worker.join().unwrap();
    /// assert!(locks.is_empty());
    /// ```
    pub fn lock_owned<Q>(self: &Arc<Self>, key: &Q) -> OwnedKeyGuard<K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire(key, ());
        OwnedKeyGuard::new(self.clone(), slot)
    }

    /// The async form of [`lock_owned`](Self::lock_owned), cancellation-safe
    /// as [`lock_async`](Self::lock_async).
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// use std::sync::Arc;
    ///
    /// let locks = Arc::new(toctou::KeyedLocks::<u64>::new());
    /// let guard = block_on(locks.lock_owned_async(&3));
    /// assert_eq!(*guard.key(), 3);
    /// ```
    pub async fn lock_owned_async<Q>(self: &Arc<Self>, key: &Q) -> OwnedKeyGuard<K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_async(key, ()).await;
        OwnedKeyGuard::new(self.clone(), slot)
    }

    /// Locks every key in `keys`, in sorted order after removing duplicates,
    /// and returns one guard that releases them all. Two `lock_many` calls
    /// over overlapping keys cannot deadlock, whatever order they list them
    /// in.
    ///
    /// The keys are borrowed, as [`lock`](Self::lock)'s: `&str` items work
    /// for `String` keys, and a key is cloned (`Q::to_owned`) only if this
    /// call creates its entry. They are sorted with `Q`'s `Ord`, which
    /// `K: Borrow<Q>` requires to agree with `K`'s.
    ///
    /// Only calls that take several keys this way are ordered: a thread that
    /// holds one key through [`lock`](Self::lock) and then calls `lock_many`
    /// can still deadlock against another thread doing the opposite.
    ///
    /// As with [`lock`](Self::lock), a thread that already holds one of the
    /// keys itself waits forever.
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<String>::new();
    /// // Transfer between two accounts, from either side, without deadlock.
    /// let both = locks.lock_many(["bob", "alice", "bob"]);
    /// assert_eq!(both.keys().collect::<Vec<_>>(), ["alice", "bob"]);
    /// assert_eq!(locks.len(), 2);
    /// drop(both);
    /// assert!(locks.is_empty());
    ///
    /// // Owned keys are passed by reference.
    /// let ids = toctou::KeyedLocks::<u32>::new();
    /// assert_eq!(ids.lock_many(&[9, 3, 9]).len(), 2);
    /// ```
    pub fn lock_many<'q, I, Q>(&self, keys: I) -> MultiKeyGuard<'_, K, S>
    where
        I: IntoIterator<Item = &'q Q>,
        K: Borrow<Q>,
        Q: Hash + Ord + ToOwned<Owned = K> + ?Sized + 'q,
    {
        let keys = sorted_unique(keys);
        let mut guard = MultiKeyGuard {
            locks: self,
            slots: Vec::with_capacity(keys.len()),
        };
        for key in keys {
            let slot = self.core.acquire(key, ());
            guard.slots.push(slot);
        }
        guard
    }

    /// The async form of [`lock_many`](Self::lock_many), with the same
    /// borrowed keys. Dropping the future part-way releases the keys taken
    /// so far and leaves the queue.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let locks = toctou::KeyedLocks::<String>::new();
    /// let guard = block_on(locks.lock_many_async(["c", "a", "b"]));
    /// assert_eq!(guard.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    /// ```
    pub async fn lock_many_async<'q, I, Q>(&self, keys: I) -> MultiKeyGuard<'_, K, S>
    where
        I: IntoIterator<Item = &'q Q>,
        K: Borrow<Q>,
        Q: Hash + Ord + ToOwned<Owned = K> + ?Sized + 'q,
    {
        let keys = sorted_unique(keys);
        let mut guard = MultiKeyGuard {
            locks: self,
            slots: Vec::with_capacity(keys.len()),
        };
        for key in keys {
            let slot = self.core.acquire_async(key, ()).await;
            guard.slots.push(slot);
        }
        guard
    }

    /// Whether `key` is held right now (a snapshot: it may change as soon
    /// as this returns).
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<u64>::new();
    /// assert!(!locks.is_locked(&1));
    /// let _held = locks.lock(&1);
    /// assert!(locks.is_locked(&1));
    /// ```
    pub fn is_locked<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.core.is_held(key)
    }
}

/// The borrowed keys, sorted (the order that makes `lock_many` calls
/// deadlock-free) and without duplicates.
fn sorted_unique<'q, Q: Ord + ?Sized + 'q>(keys: impl IntoIterator<Item = &'q Q>) -> Vec<&'q Q> {
    let mut keys: Vec<&Q> = keys.into_iter().collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Proof that the holder has `key` locked in a [`KeyedLocks`]; releases it
/// on drop (also during unwinding).
///
/// ```
/// let locks: toctou::KeyedLocks<String> = toctou::KeyedLocks::new();
/// let guard = locks.lock("invoice-7");
/// assert_eq!(guard.key(), "invoice-7");
/// assert!(locks.is_locked("invoice-7"));
/// drop(guard);
/// assert!(!locks.is_locked("invoice-7"));
/// assert!(locks.is_empty(), "the entry went with the last holder");
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct KeyGuard<'a, K, S = LazyRandomState> {
    locks: &'a KeyedLocks<K, S>,
    slot: SlotRef<K, Exclusive>,
}

impl<'a, K, S> KeyGuard<'a, K, S> {
    fn new(locks: &'a KeyedLocks<K, S>, slot: SlotRef<K, Exclusive>) -> Self {
        Self { locks, slot }
    }

    /// The locked key.
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<String>::new();
    /// assert_eq!(locks.lock("k").key(), "k");
    /// ```
    pub fn key(&self) -> &K {
        // SAFETY: the guard holds the key, which keeps its slot alive for
        // the guard's lifetime, and `&self` bounds the returned reference.
        unsafe { self.slot.key() }
    }
}

impl<K, S> Drop for KeyGuard<'_, K, S> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the key exclusively and is giving it up.
        unsafe { self.locks.core.release(self.slot, ()) }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for KeyGuard<'_, K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyGuard").field("key", self.key()).finish()
    }
}

/// A `'static` guard from [`KeyedLocks::lock_owned`]: holds an `Arc` of the
/// map and releases the key on drop.
///
/// ```
/// use std::sync::Arc;
///
/// let locks: Arc<toctou::KeyedLocks<u32>> = Arc::new(toctou::KeyedLocks::new());
/// let guard = locks.lock_owned(&7);
/// // The guard owns what it needs: it can move to another thread.
/// std::thread::spawn(move || assert_eq!(*guard.key(), 7)).join().unwrap();
/// assert!(locks.is_empty());
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct OwnedKeyGuard<K, S = LazyRandomState> {
    locks: Arc<KeyedLocks<K, S>>,
    slot: SlotRef<K, Exclusive>,
}

impl<K, S> OwnedKeyGuard<K, S> {
    fn new(locks: Arc<KeyedLocks<K, S>>, slot: SlotRef<K, Exclusive>) -> Self {
        Self { locks, slot }
    }

    /// The locked key.
    ///
    /// ```
    /// let locks = std::sync::Arc::new(toctou::KeyedLocks::<u8>::new());
    /// assert_eq!(*locks.lock_owned(&9).key(), 9);
    /// ```
    pub fn key(&self) -> &K {
        // SAFETY: as in `KeyGuard::key`.
        unsafe { self.slot.key() }
    }

    /// The map this guard belongs to.
    ///
    /// ```
    /// let locks = std::sync::Arc::new(toctou::KeyedLocks::<u8>::new());
    /// let guard = locks.lock_owned(&9);
    /// assert!(guard.map().is_locked(&9));
    /// ```
    pub fn map(&self) -> &Arc<KeyedLocks<K, S>> {
        &self.locks
    }
}

impl<K, S> Drop for OwnedKeyGuard<K, S> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the key exclusively and is giving it up.
        unsafe { self.locks.core.release(self.slot, ()) }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for OwnedKeyGuard<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedKeyGuard")
            .field("key", self.key())
            .finish()
    }
}

/// The guard of [`KeyedLocks::lock_many`]: holds every key it was given and
/// releases them all on drop.
///
/// ```
/// let accounts: toctou::KeyedLocks<u32> = toctou::KeyedLocks::new();
/// let both = accounts.lock_many(&[9, 3, 9]);
/// assert_eq!(both.keys().copied().collect::<Vec<_>>(), [3, 9], "sorted, deduplicated");
/// assert!(accounts.try_lock(&3).is_none());
/// drop(both);
/// assert!(accounts.try_lock(&3).is_some());
/// ```
#[must_use = "the keys are released as soon as the guard is dropped"]
pub struct MultiKeyGuard<'a, K, S = LazyRandomState> {
    locks: &'a KeyedLocks<K, S>,
    /// In acquisition (sorted) order.
    slots: Vec<SlotRef<K, Exclusive>>,
}

impl<K, S> MultiKeyGuard<'_, K, S> {
    /// The locked keys, sorted, without duplicates.
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<u8>::new();
    /// let guard = locks.lock_many(&[2, 1]);
    /// assert_eq!(guard.keys().copied().collect::<Vec<_>>(), [1, 2]);
    /// ```
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &K> + '_ {
        // SAFETY: as in `KeyGuard::key`, for each held key.
        self.slots.iter().map(|slot| unsafe { slot.key() })
    }

    /// How many keys the guard holds.
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<u8>::new();
    /// assert_eq!(locks.lock_many(&[1, 1, 1]).len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the guard holds no key (it was given none).
    ///
    /// ```
    /// let locks = toctou::KeyedLocks::<u8>::new();
    /// assert!(locks.lock_many::<_, u8>([]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl<K, S> Drop for MultiKeyGuard<'_, K, S> {
    fn drop(&mut self) {
        // Release in reverse order of acquisition, as nested guards would.
        // A release runs no user code today (entries are freed by sweeps),
        // but should one ever panic, the keys not yet released sit in
        // `rest`, whose drop, during the unwinding, releases them and lets
        // the panic go on (a second panic among them aborts).
        let mut rest = ReleaseRest {
            core: &self.locks.core,
            slots: std::mem::take(&mut self.slots),
        };
        rest.release_all();
    }
}

/// The keys of a [`MultiKeyGuard`] still to be released; releases them when
/// dropped, so that a panicking release does not leave the others held.
struct ReleaseRest<'a, K, S> {
    core: &'a Core<K, Exclusive, S>,
    /// Held exclusively by the guard being dropped, in acquisition order.
    slots: Vec<SlotRef<K, Exclusive>>,
}

impl<K, S> ReleaseRest<'_, K, S> {
    fn release_all(&mut self) {
        while let Some(slot) = self.slots.pop() {
            // SAFETY: the guard held each of its keys exclusively, and each
            // slot leaves `slots` before its release: none is released twice.
            unsafe { self.core.release(slot, ()) }
        }
    }
}

impl<K, S> Drop for ReleaseRest<'_, K, S> {
    fn drop(&mut self) {
        // Empty unless a release in `release_all` panicked.
        self.release_all();
    }
}

impl<K: fmt::Debug, S> fmt::Debug for MultiKeyGuard<'_, K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiKeyGuard")
            .field("keys", &self.keys().collect::<Vec<_>>())
            .finish()
    }
}
