//! [`SingletonMap<K, V>`]: one singleton per key.
//!
//! # Protocol
//!
//! Each shard of the [`Table`] holds two hash tables: `ready`, the stored
//! values (`K -> Arc<V>`), and `pending`, the initialisations in flight
//! (`K -> Arc<Once>`). A key is in at most one of them. Keeping them apart
//! keeps a ready entry small: the key, its hash and the `Arc`, one word more
//! than a `HashMap<K, Arc<V>>` entry. The stored hash is what lets a table
//! grow without calling the user's `Hash` (see [`Entry`](crate::table::Entry)),
//! so a panicking `Hash` cannot drop other keys' values or claims.
//!
//! Every step that decides something happens under the shard's write lock,
//! so check and act are one atomic step:
//!
//! - **Claim.** A caller that finds the key in neither table inserts it into
//!   `pending` and becomes its initialiser. A caller that finds it pending
//!   clones the `Once` and waits on it after unlocking.
//! - **Publish.** The initialiser moves its key from `pending` to `ready`
//!   with the value, unlocks, and only then completes the `Once`, waking the
//!   waiters. They re-read the map and find the value.
//! - **Abandon.** On error, panic or cancellation the initialiser's `Claim`
//!   drops: it removes its `pending` entry (found by identity, not by key),
//!   unlocks, and then wakes the waiters. They re-read the map, find nothing,
//!   and the first to take the lock claims the key.
//! - **Remove.** `remove`, `retain` and `clear` only touch `ready`; for a
//!   pending key they wait and look again. Only the claimant removes its
//!   `pending` entry.
//!
//! Because the map is updated before the waiters are woken, a woken waiter
//! always sees the outcome; because the `Once` is completed after the map is
//! updated, a caller that saw `Pending` and then finds the `Once` finished
//! (so does not park) also sees the outcome when it re-reads.

use std::borrow::Borrow;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic::Location;
use std::sync::Arc;

use crate::LazyRandomState;
use crate::once::{Once, SharedInit};
use crate::reentry;
use crate::sync::RwLock;
use crate::table::{Entries, Table};

/// One shard's contents (see the module docs).
struct Shard<K, V> {
    /// Stored values.
    ready: Entries<K, Arc<V>>,
    /// Initialisations in flight; waiters wait on the `Once`.
    pending: Entries<K, Arc<Once>>,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Self {
            ready: Entries::default(),
            pending: Entries::default(),
        }
    }
}

/// A concurrent map that initialises each key's value at most once at a time,
/// on first use: a keyed [`Singleton`](crate::Singleton), in the style of Go's
/// `singleflight`.
///
/// Where a `HashMap` behind a lock invites check-then-insert races (two
/// callers both see the key missing and both start the model server),
/// `SingletonMap` makes the check and the claim one step.
///
/// Compared with `DashMap::entry(k).or_insert_with(f)`: the initialiser does
/// not run under a shard lock, so it may be slow, may call back into the map
/// for other keys, and does not block unrelated keys that share its shard.
/// Compared with `moka`'s `get_with`: no eviction, no expiry, and removal is
/// ordered against initialisation.
///
/// # Semantics under concurrency
///
/// - **Coalescing.** For each key, at most one initialiser runs at a time.
///   Concurrent callers for that key wait and then get the same `Arc<V>`.
/// - **Independence.** Initialisers never run under a lock of the map, so
///   callers for different keys never wait for each other's initialisation.
/// - **Errors are not stored.** If the initialiser returns `Err`, that caller
///   gets the error, the key stays absent, and one waiting caller runs its own
///   initialiser.
/// - **Panics do not poison.** A panic in the initialiser propagates to its
///   caller, the key stays absent, and one waiting caller retries.
/// - **Cancellation is safe.** If the future of an async initialiser is
///   dropped, the key stays absent and one waiting caller (sync or async)
///   takes over. A dropped waiter leaves nothing behind: a dropped
///   [`remove_async`](Self::remove_async) removes nothing, and a dropped
///   [`retain_async`](Self::retain_async) or
///   [`clear_async`](Self::clear_async) stops between two shards.
/// - **Removal waits for initialisation.** [`remove`](Self::remove),
///   [`retain`](Self::retain) and [`clear`](Self::clear), and their `_async`
///   forms, wait for an initialisation in flight and then act on its result,
///   so a shutdown can never interleave with a start and leave a live value
///   that the map does not track.
/// - **Same-thread reentrancy panics; cycles through other threads
///   deadlock.** An initialiser that asks the map for its own key, on the
///   thread that runs it, panics with a message naming the map and where it
///   was created. A wait that closes the cycle through another thread or task
///   is not detected. See [Reentrancy](#reentrancy) for exactly what is
///   caught.
/// - **[`len`](Self::len) counts stored values only**: in-flight, failed and
///   cancelled initialisations are not counted.
/// - **Blocking is explicit.** [`get_or_init`](Self::get_or_init),
///   [`get_or_try_init`](Self::get_or_try_init) and [`remove`](Self::remove)
///   park the calling thread while an initialiser for the same key runs, and
///   [`retain`](Self::retain) and [`clear`](Self::clear) while any
///   initialiser they reach runs. In async code use the `_async` form of
///   each ([`get_or_init_async`](Self::get_or_init_async),
///   [`get_or_try_init_async`](Self::get_or_try_init_async),
///   [`remove_async`](Self::remove_async),
///   [`retain_async`](Self::retain_async),
///   [`clear_async`](Self::clear_async)), which waits by returning `Pending`:
///   a parked executor thread stalls its other tasks, and on a
///   current-thread runtime it deadlocks when the initialiser it waits for
///   is a task suspended on that same thread (this is not detected).
///   [`get`](Self::get), [`contains_key`](Self::contains_key) and
///   [`len`](Self::len) never wait for an initialiser.
///
/// # Reentrancy
///
/// The map detects a wait that only the waiting thread itself could end, and
/// panics instead of waiting, with a message naming the map's types and where
/// it was created. The check is per thread and per key:
///
/// - **Same thread, same key.** While a thread runs the initialiser of key
///   `k` (the closure, or an async initialiser's future while that thread
///   polls it), a call on that thread that would wait for `k`'s
///   initialisation panics: a `get_or_*` call for `k`, `remove` of `k`, and
///   `retain` or `clear` when they reach `k`'s shard, sync or async.
/// - **A `retain` predicate and its shard.** The predicate of
///   [`retain`](Self::retain) or [`retain_async`](Self::retain_async) runs
///   under its shard's write lock; a call from it into the same map that
///   needs that shard (a look-up of any key there, or [`len`](Self::len),
///   which visits every shard) panics.
///
/// Asking for a different key from inside an initialiser is not reentrancy:
/// it initialises that key, or waits for it, as any other caller would.
///
/// Not detected, because the thread that would wait is not the thread that
/// runs the initialisation:
///
/// - **A cycle through another thread.** An initialiser that spawns a thread
///   which calls `get_or_init` (or `remove`, `retain`, `clear`) for the same
///   key, and then joins it, deadlocks: the spawned thread waits for the
///   initialiser, which waits for the thread.
/// - **A cycle between keys.** The initialiser of `a` waits for `b` while the
///   initialiser of `b`, on another thread, waits for `a`: both wait forever,
///   as two mutexes taken in opposite orders do.
/// - **A cycle through another task.** An async initialiser that awaits a
///   task (or any future polled elsewhere) that waits for the same key never
///   completes.
/// - **A parked executor thread.** A sync form called on a current-thread
///   runtime while the initialiser it must wait for is a task suspended on
///   that same thread deadlocks. Use the `_async` forms in async code.
///
/// # Keys
///
/// Methods take the key by reference, as `&Q` where `K: Borrow<Q>`, so a
/// `SingletonMap<String, _>` is queried with a `&str`. The key is converted
/// to a `K` (with [`ToOwned`]) only when an initialisation starts: once for
/// the map's entry and once for the initialiser's `&K` argument.
///
/// # Fast path
///
/// A hit hashes the key once, takes the shard's read lock, finds the entry
/// and clones the `Arc`: the same work as `DashMap::get` plus an `Arc` clone.
///
/// # Example: the model server manager from the race report
///
/// ```
/// use std::sync::Arc;
/// use toctou::SingletonMap;
///
/// struct Server {
///     port: u16,
/// }
///
/// fn start(model: &str) -> Server {
///     // Slow: spawns a process and waits for it to listen.
///     Server { port: 8000 + model.len() as u16 }
/// }
///
/// let servers: SingletonMap<String, Server> = SingletonMap::new();
///
/// // Any number of concurrent chats may call this: each model starts once,
/// // and different models start in parallel.
/// let ensure = |model: &str| -> Arc<Server> { servers.get_or_init(model, |m| start(m)) };
///
/// let a = ensure("phi-4");
/// let b = ensure("phi-4");
/// assert!(Arc::ptr_eq(&a, &b));
///
/// // Shutdown waits for a start in flight, so it cannot miss a server.
/// let stopped = servers.remove("phi-4").expect("it was running");
/// assert_eq!(stopped.port, a.port);
/// assert!(servers.is_empty());
/// ```
pub struct SingletonMap<K, V, S = LazyRandomState> {
    table: Table<RwLock<Shard<K, V>>, S>,
    created_at: &'static Location<'static>,
}

/// What a caller of the slow path does next.
enum Step<'a, K, V, S> {
    Found(Arc<V>),
    Wait(Arc<Once>),
    Claimed(Claim<'a, K, V, S>),
}

/// What a remover does next.
enum Removal<V> {
    Done(Option<Arc<V>>),
    Wait(Arc<Once>),
}

impl<K, V> SingletonMap<K, V, LazyRandomState> {
    /// Creates an empty map with the default hasher,
    /// [`LazyRandomState`] (std's `RandomState`, seeded at the first use).
    ///
    /// `const`: a map can be a plain `static`. Nothing is allocated until
    /// the first use. Under `--cfg toctou_loom` it is `const` too, and a
    /// `static` map is empty again in every execution of a model.
    ///
    /// ```
    /// static MAP: toctou::SingletonMap<String, u32> = toctou::SingletonMap::new();
    /// assert!(MAP.is_empty());
    /// assert_eq!(*MAP.get_or_init("a", |_| 1), 1);
    /// ```
    #[must_use]
    #[track_caller]
    pub const fn new() -> Self {
        Self::with_hasher(LazyRandomState::new())
    }
}

impl<K, V, S> SingletonMap<K, V, S> {
    /// Creates an empty map that hashes keys with `hasher`.
    ///
    /// ```
    /// use std::hash::RandomState;
    ///
    /// let map: toctou::SingletonMap<u64, String, RandomState> =
    ///     toctou::SingletonMap::with_hasher(RandomState::new());
    /// assert_eq!(map.len(), 0);
    /// ```
    #[must_use]
    #[track_caller]
    pub const fn with_hasher(hasher: S) -> Self {
        Self {
            table: Table::with_hasher(hasher, "toctou::SingletonMap"),
            created_at: Location::caller(),
        }
    }

    /// The map's hasher.
    ///
    /// ```
    /// let map: toctou::SingletonMap<u64, u64> = toctou::SingletonMap::new();
    /// let _hasher: &toctou::LazyRandomState = map.hasher();
    /// ```
    pub fn hasher(&self) -> &S {
        self.table.hasher()
    }

    /// The number of stored values. Initialisations in flight are not
    /// counted.
    ///
    /// Takes each shard's read lock in turn, so under concurrent inserts and
    /// removals the result is a snapshot that may already be stale.
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init("a", |_| 1);
    /// map.get_or_init("b", |_| 2);
    /// assert_eq!(map.len(), 2);
    /// # let _: &toctou::SingletonMap<String, i32> = &map;
    /// ```
    pub fn len(&self) -> usize {
        let mut len = 0;
        self.table.for_each_shard(|shard| len += shard.ready.len());
        len
    }

    /// Whether the map stores no values (see [`len`](Self::len)).
    ///
    /// ```
    /// let map: toctou::SingletonMap<u8, u8> = toctou::SingletonMap::new();
    /// assert!(map.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Panics if the current thread is running the initialiser that `once`
    /// belongs to: waiting for it would wait forever.
    fn assert_not_reentrant(&self, once: &Arc<Once>) {
        if reentry::is_initialising(once_addr(once)) {
            panic!(
                "reentrant initialisation of a key in toctou::SingletonMap<{}, {}> created at {}: \
                 the initialiser for this key asked the map for the same key on the same thread, \
                 which would deadlock (a different key may be asked for)",
                std::any::type_name::<K>(),
                std::any::type_name::<V>(),
                self.created_at,
            );
        }
    }
}

impl<K, V, S> SingletonMap<K, V, S>
where
    K: Hash + Eq,
    S: BuildHasher,
{
    /// Returns the stored value for `key`, if any. Never initialises and never
    /// waits for an initialiser: while one runs, this returns `None`.
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// assert_eq!(map.get("phi-4"), None);
    /// map.get_or_init("phi-4", |_| 8080);
    /// assert_eq!(map.get("phi-4").as_deref(), Some(&8080));
    /// # let _: &toctou::SingletonMap<String, u16> = &map;
    /// ```
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_hashed(self.table.hash(key), key)
    }

    /// Whether a value is stored for `key`. Never waits for an initialiser.
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init(&1, |_| "one");
    /// assert!(map.contains_key(&1));
    /// assert!(!map.contains_key(&2));
    /// ```
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.table.hash(key);
        self.table.read(hash).ready.find(hash, key).is_some()
    }

    #[inline]
    fn get_hashed<Q>(&self, hash: u64, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let shard = self.table.read(hash);
        shard
            .ready
            .find(hash, key)
            .map(|entry| Arc::clone(&entry.value))
    }

    /// Returns the value for `key`, initialising it with `f` if it is absent.
    ///
    /// If another caller is initialising the same key, this parks until that
    /// initialiser finishes and then returns its value (or, if it failed,
    /// runs `f` itself).
    ///
    /// # Panics
    ///
    /// If `f` panics, the panic propagates, the key stays absent, and one
    /// waiting caller runs its own initialiser. If `f` asks this map for the
    /// same key on the thread that runs `f`, that call panics instead of
    /// deadlocking. A cycle through another thread is not detected: if `f`
    /// spawns a thread that calls `get_or_init` for the same key and joins
    /// it, both wait forever (see [Reentrancy](Self#reentrancy)).
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// let map = toctou::SingletonMap::new();
    /// let first = map.get_or_init("phi-4", |model| format!("server for {model}"));
    /// let again = map.get_or_init("phi-4", |_| unreachable!("already stored"));
    /// assert!(Arc::ptr_eq(&first, &again));
    /// # let _: &toctou::SingletonMap<String, String> = &map;
    /// ```
    #[inline]
    pub fn get_or_init<Q>(&self, key: &Q, f: impl FnOnce(&K) -> V) -> Arc<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        match self.get_or_try_init(key, |k| Ok::<V, Infallible>(f(k))) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Returns the value for `key`, initialising it with the fallible `f` if
    /// it is absent.
    ///
    /// On `Err`, nothing is stored: this caller gets the error, and one
    /// waiting caller runs its own `f`.
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// assert_eq!(map.get_or_try_init("db", |_| Err("connection refused")), Err("connection refused"));
    /// assert!(map.is_empty());
    /// let conn = map.get_or_try_init("db", |_| Ok::<_, &str>(42)).unwrap();
    /// assert_eq!(*conn, 42);
    /// # let _: &toctou::SingletonMap<String, i32> = &map;
    /// ```
    #[inline]
    pub fn get_or_try_init<Q, E>(
        &self,
        key: &Q,
        f: impl FnOnce(&K) -> Result<V, E>,
    ) -> Result<Arc<V>, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let hash = self.table.hash(key);
        match self.get_hashed(hash, key) {
            Some(value) => Ok(value),
            None => self.init_slow(hash, key, f),
        }
    }

    #[cold]
    fn init_slow<Q, E>(
        &self,
        hash: u64,
        key: &Q,
        f: impl FnOnce(&K) -> Result<V, E>,
    ) -> Result<Arc<V>, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        loop {
            match self.claim_or_wait(hash, key) {
                Step::Found(value) => return Ok(value),
                Step::Wait(once) => once.wait(),
                Step::Claimed(claim) => {
                    let owned = key.to_owned();
                    let value = {
                        let _mark = reentry::Mark::enter(claim.addr());
                        // On `Err` or unwind, `claim` drops: the key is
                        // released and the waiters are woken.
                        f(&owned)?
                    };
                    return Ok(claim.fulfil(value));
                }
            }
        }
    }

    /// Returns the value for `key`, initialising it with the future returned
    /// by `f` if it is absent.
    ///
    /// Runtime-agnostic: waiting for another initialiser returns `Pending` and
    /// never blocks the executor thread. Sync and async callers for the same
    /// key wait for each other.
    ///
    /// # Cancellation
    ///
    /// If this future is dropped while its initialiser runs, the initialiser's
    /// future is dropped too, the key stays absent, and one waiting caller
    /// (sync or async) takes over. Dropping a waiting future leaves nothing
    /// behind.
    ///
    /// # Panics
    ///
    /// As [`get_or_init`](Self::get_or_init). The same-thread check applies
    /// while a thread creates or polls the initialiser's future, on that
    /// thread only, so other tasks on the thread may wait for the key while
    /// the future is suspended. An initialiser that awaits another task which
    /// waits for the same key is not detected and never completes (see
    /// [Reentrancy](Self#reentrancy)).
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let clients: toctou::SingletonMap<String, String> = toctou::SingletonMap::new();
    ///
    /// async fn connect(region: String) -> String {
    ///     format!("client for {region}")
    /// }
    ///
    /// block_on(async {
    ///     let client = clients.get_or_init_async("eu-west", |r| connect(r.clone())).await;
    ///     assert_eq!(*client, "client for eu-west");
    /// });
    /// ```
    pub async fn get_or_init_async<Q, F, Fut>(&self, key: &Q, f: F) -> Arc<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        F: FnOnce(&K) -> Fut,
        Fut: Future<Output = V>,
    {
        let init = move |k: &K| {
            let fut = f(k);
            async move { Ok::<V, Infallible>(fut.await) }
        };
        match self.get_or_try_init_async(key, init).await {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// The fallible form of [`get_or_init_async`](Self::get_or_init_async).
    ///
    /// On `Err`, nothing is stored, this caller gets the error, and one
    /// waiting caller runs its own initialiser.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let map: toctou::SingletonMap<u32, u32> = toctou::SingletonMap::new();
    /// block_on(async {
    ///     let failed = map.get_or_try_init_async(&7, |_| async { Err("down") }).await;
    ///     assert_eq!(failed, Err("down"));
    ///     let ok = map.get_or_try_init_async(&7, |k| { let k = *k; async move { Ok::<_, &str>(k * 6) } }).await;
    ///     assert_eq!(ok.as_deref(), Ok(&42));
    /// });
    /// ```
    pub async fn get_or_try_init_async<Q, F, Fut, E>(&self, key: &Q, f: F) -> Result<Arc<V>, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        F: FnOnce(&K) -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let hash = self.table.hash(key);
        if let Some(value) = self.get_hashed(hash, key) {
            return Ok(value);
        }
        loop {
            match self.claim_or_wait(hash, key) {
                Step::Found(value) => return Ok(value),
                Step::Wait(once) => once.wait_async().await,
                Step::Claimed(claim) => {
                    let owned = key.to_owned();
                    // Cancelled here, or `Err`: `claim` drops, the key is
                    // released and the waiters are woken.
                    let value = reentry::poll_marked(claim.addr(), || f(&owned)).await?;
                    return Ok(claim.fulfil(value));
                }
            }
        }
    }

    /// The check and the claim, in one critical section.
    fn claim_or_wait<Q>(&self, hash: u64, key: &Q) -> Step<'_, K, V, S>
    where
        K: Borrow<Q>,
        Q: Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut shard = self.table.write(hash);
        if let Some(entry) = shard.ready.find(hash, key) {
            return Step::Found(Arc::clone(&entry.value));
        }
        let Some(entry) = shard.pending.find(hash, key) else {
            let init = SharedInit::new();
            let once = Arc::clone(init.once());
            shard.pending.insert_new(hash, key.to_owned(), once);
            return Step::Claimed(Claim {
                map: self,
                hash,
                init: Some(init),
            });
        };
        let once = Arc::clone(&entry.value);
        drop(shard);
        self.assert_not_reentrant(&once);
        Step::Wait(once)
    }

    /// Removes the value for `key` and returns it.
    ///
    /// If an initialisation of `key` is in flight, this parks until it
    /// finishes and then removes its result; if it failed and a waiter took
    /// over, this waits for that one too. So a shutdown cannot interleave
    /// with a start: once `remove` returns, any value it did not return was
    /// stored by an initialisation that started after it.
    ///
    /// Other holders of the `Arc` keep the value alive; the map just stops
    /// tracking it.
    ///
    /// # Panics
    ///
    /// If called from inside the initialiser of the same key, on the thread
    /// that runs it: that would wait for itself. A `remove` of that key on
    /// another thread that the initialiser joins deadlocks instead; that is
    /// not detected (see [Reentrancy](Self#reentrancy)).
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init("phi-4", |_| 8080);
    /// assert_eq!(map.remove("phi-4").as_deref(), Some(&8080));
    /// assert_eq!(map.remove("phi-4"), None);
    /// # let _: &toctou::SingletonMap<String, u16> = &map;
    /// ```
    pub fn remove<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.table.hash(key);
        loop {
            match self.remove_or_wait(hash, key) {
                Removal::Done(value) => return value,
                Removal::Wait(once) => once.wait(),
            }
        }
    }

    /// The async form of [`remove`](Self::remove): waiting for an
    /// initialisation in flight returns `Pending` instead of parking.
    /// Dropping the future before it completes removes nothing.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init(&1, |_| "one");
    /// block_on(async {
    ///     assert_eq!(map.remove_async(&1).await.as_deref(), Some(&"one"));
    /// });
    /// ```
    pub async fn remove_async<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.table.hash(key);
        loop {
            match self.remove_or_wait(hash, key) {
                Removal::Done(value) => return value,
                Removal::Wait(once) => once.wait_async().await,
            }
        }
    }

    fn remove_or_wait<Q>(&self, hash: u64, key: &Q) -> Removal<V>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut shard = self.table.write(hash);
        if let Some(entry) = shard.ready.remove(hash, key) {
            drop(shard);
            // The key drops here, outside the lock.
            return Removal::Done(Some(entry.value));
        }
        let Some(entry) = shard.pending.find(hash, key) else {
            return Removal::Done(None);
        };
        let once = Arc::clone(&entry.value);
        drop(shard);
        self.assert_not_reentrant(&once);
        Removal::Wait(once)
    }

    /// Keeps only the values for which `f` returns `true`; removes the rest.
    ///
    /// Works one shard at a time. In each shard it first waits for the
    /// initialisations in flight there, then calls `f` on every stored value,
    /// under the shard's write lock. Initialisations that start after it
    /// reached a shard are not waited for (they happen after this call, for
    /// that shard). `f` receives the `Arc`, so it can, for example, evict the
    /// values that nobody else holds.
    ///
    /// Removed keys and values are dropped after the shard is unlocked.
    ///
    /// Parks the calling thread while it waits; in async code use
    /// [`retain_async`](Self::retain_async).
    ///
    /// # Panics
    ///
    /// If `f` panics, the panic propagates: the shards already visited stay
    /// filtered, the values `f` already rejected in the current shard are
    /// removed, and the other shards are untouched. Panics instead of
    /// deadlocking if `f` calls back into the map for a key in the shard
    /// being processed, or if `retain` is called on the thread that is
    /// running the initialiser of a key in flight in this map (from inside
    /// that initialiser). Waits that go through another thread are not
    /// detected: an initialiser that hands `retain` to another thread and
    /// joins it deadlocks (see [Reentrancy](Self#reentrancy)).
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// let map = toctou::SingletonMap::new();
    /// let kept = map.get_or_init("in use", |_| 1);
    /// map.get_or_init("idle", |_| 2);
    ///
    /// // Evict every value that only the map holds.
    /// map.retain(|_, value| Arc::strong_count(value) > 1);
    /// assert!(map.contains_key("in use"));
    /// assert!(!map.contains_key("idle"));
    /// # drop(kept);
    /// # let _: &toctou::SingletonMap<String, i32> = &map;
    /// ```
    pub fn retain(&self, mut f: impl FnMut(&K, &Arc<V>) -> bool) {
        for index in 0..self.table.shards() {
            for once in self.in_flight_at(index) {
                self.assert_not_reentrant(&once);
                once.wait();
            }
            self.retain_at(index, &mut f);
        }
    }

    /// The async form of [`retain`](Self::retain): waiting for an
    /// initialisation in flight returns `Pending` instead of parking the
    /// thread, so an initialiser suspended on the same executor thread (a
    /// current-thread runtime, say) can finish. Runtime-agnostic.
    ///
    /// `f` itself is synchronous and runs under a shard's write lock, as in
    /// `retain`; it never runs across an `.await`.
    ///
    /// # Cancellation
    ///
    /// The future waits only between shards, before it visits the next one;
    /// a shard is visited (`f` called on its values, the rejected ones
    /// removed) in one step that cannot be interrupted. So dropping the
    /// future leaves the shards it visited filtered, the others untouched,
    /// and no waiter or entry behind: it is as if a sync `retain` had been
    /// run on a subset of the shards. Each shard is still filtered at most
    /// once.
    ///
    /// # Panics
    ///
    /// As [`retain`](Self::retain). A `retain_async` awaited inside an
    /// initialiser's future for a key in flight in this map panics while
    /// that future is being polled; a wait that goes through another task
    /// (an initialiser that spawns `retain_async` and awaits the task) is
    /// not detected and never completes.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let sessions: toctou::SingletonMap<u32, String> = toctou::SingletonMap::new();
    /// for user in 1..=4 {
    ///     sessions.get_or_init(&user, |u| format!("session of {u}"));
    /// }
    /// block_on(async {
    ///     // Drop the sessions of odd users, waiting (without blocking the
    ///     // executor) for any session that is still being set up.
    ///     sessions.retain_async(|user, _| user % 2 == 0).await;
    /// });
    /// assert_eq!(sessions.len(), 2);
    /// assert!(sessions.contains_key(&2) && !sessions.contains_key(&1));
    /// ```
    pub async fn retain_async(&self, mut f: impl FnMut(&K, &Arc<V>) -> bool) {
        for index in 0..self.table.shards() {
            for once in self.in_flight_at(index) {
                self.assert_not_reentrant(&once);
                // Cancelled here: the wait future removes its waiter, and
                // this shard is untouched.
                once.wait_async().await;
            }
            self.retain_at(index, &mut f);
        }
    }

    /// The initialisations in flight in shard number `index`, which
    /// [`retain_at`](Self::retain_at) must wait for before it visits it.
    fn in_flight_at(&self, index: usize) -> Vec<Arc<Once>> {
        let shard = self.table.write_at(index);
        shard.pending.iter().map(|e| Arc::clone(&e.value)).collect()
    }

    /// Filters shard number `index` with `f`, in one critical section with
    /// the shard marked against reentrant calls from `f`. The removed keys
    /// and values drop after the shard is unlocked.
    fn retain_at(&self, index: usize, f: &mut impl FnMut(&K, &Arc<V>) -> bool) {
        let removed: Vec<_> = {
            let mut shard = self.table.write_at(index);
            let _mark = self.table.mark_at(index);
            shard.ready.extract_if(|e| !f(&e.key, &e.value)).collect()
        };
        // The removed keys and values drop here, outside the lock.
        drop(removed);
    }

    /// Removes every value, waiting for the initialisations in flight as
    /// [`retain`](Self::retain) does.
    ///
    /// Parks the calling thread while it waits; in async code use
    /// [`clear_async`](Self::clear_async).
    ///
    /// # Panics
    ///
    /// As [`retain`](Self::retain): if called on the thread that is running
    /// the initialiser of a key in flight in this map.
    ///
    /// ```
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init(&1, |_| "one");
    /// map.clear();
    /// assert!(map.is_empty());
    /// ```
    pub fn clear(&self) {
        self.retain(|_, _| false);
    }

    /// The async form of [`clear`](Self::clear): waiting for an
    /// initialisation in flight returns `Pending` instead of parking the
    /// thread. Runtime-agnostic.
    ///
    /// # Cancellation
    ///
    /// As [`retain_async`](Self::retain_async): dropping the future leaves
    /// the shards it already cleared empty, the others untouched, and no
    /// waiter or entry behind.
    ///
    /// # Panics
    ///
    /// As [`retain_async`](Self::retain_async).
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let map = toctou::SingletonMap::new();
    /// map.get_or_init(&1, |_| "one");
    /// block_on(map.clear_async());
    /// assert!(map.is_empty());
    /// ```
    pub async fn clear_async(&self) {
        self.retain_async(|_, _| false).await;
    }
}

/// The claim on a key's initialisation. Dropping it unfulfilled (error,
/// panic, cancellation) removes the `Pending` entry and wakes the waiters.
struct Claim<'a, K, V, S> {
    map: &'a SingletonMap<K, V, S>,
    hash: u64,
    /// `Some` until fulfilled.
    init: Option<SharedInit>,
}

impl<K, V, S> Claim<'_, K, V, S> {
    fn once(&self) -> &Arc<Once> {
        self.init
            .as_ref()
            .expect("a claim holds its init until it ends")
            .once()
    }

    /// The address the initialiser's reentrancy mark uses.
    fn addr(&self) -> usize {
        once_addr(self.once())
    }

    /// Whether a pending entry's `Once` is this claim's. Found by identity:
    /// only the claimant removes its pending entry.
    fn is_ours(once: &Arc<Once>) -> impl Fn(&Arc<Once>) -> bool + '_ {
        move |other| Arc::ptr_eq(other, once)
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Claim<'_, K, V, S> {
    /// Publishes `value` for the key and wakes the waiters.
    fn fulfil(mut self, value: V) -> Arc<V> {
        let value = Arc::new(value);
        let init = self.init.take().expect("a claim is fulfilled once");
        {
            let mut shard = self.map.table.write(self.hash);
            let entry = shard
                .pending
                .remove_by(self.hash, Self::is_ours(init.once()))
                .expect("a pending entry stays in the map until its claimant ends it");
            // The key moves from `pending` to `ready`: no clone, no rehash.
            shard
                .ready
                .insert_new(self.hash, entry.key, Arc::clone(&value));
        }
        // After the map holds the value: a woken waiter re-reads the map.
        init.complete();
        value
    }
}

impl<K, V, S> Drop for Claim<'_, K, V, S> {
    fn drop(&mut self) {
        if let Some(init) = self.init.take() {
            let removed = {
                let mut shard = self.map.table.write(self.hash);
                shard
                    .pending
                    .remove_by(self.hash, Self::is_ours(init.once()))
            };
            debug_assert!(
                removed.is_some(),
                "abandoned a claim that was not in the map"
            );
            // After the entry is gone: wake the waiters, one of whom claims
            // the key anew. The key drops here, outside the lock.
            drop(init);
            drop(removed);
        }
    }
}

fn once_addr(once: &Arc<Once>) -> usize {
    Arc::as_ptr(once) as usize
}

impl<K, V, S: Default> Default for SingletonMap<K, V, S> {
    /// An empty map.
    #[track_caller]
    fn default() -> Self {
        Self::with_hasher(S::default())
    }
}

impl<K: fmt::Debug, V: fmt::Debug, S> fmt::Debug for SingletonMap<K, V, S> {
    /// Shows the stored values, and `<initializing>` for keys in flight.
    /// Takes each shard's read lock in turn; never waits for an initialiser.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Initializing;
        impl fmt::Debug for Initializing {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<initializing>")
            }
        }
        let mut map = f.debug_map();
        self.table.for_each_shard(|shard| {
            for entry in shard.ready.iter() {
                map.entry(&entry.key, &entry.value);
            }
            for entry in shard.pending.iter() {
                map.entry(&entry.key, &Initializing);
            }
        });
        map.finish()
    }
}
