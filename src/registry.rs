//! [`RegistryCell<T, S>`]: a global instance with explicit, linearizable
//! reinit-with-settings, whose readers never block.
//!
//! # Protocol
//!
//! - `current` (under a mutex) holds the published instance, its settings and
//!   its generation. `generation` (an atomic) mirrors the generation and is
//!   stored with `Release` inside the same critical section that replaces
//!   `current`, so a reader that loads generation `g` with `Acquire` and then
//!   locks `current` finds generation `g` or a later one.
//! - `builder` (a mutex) is held around every build, so at most one build runs
//!   at a time. Builds run outside the `current` lock: readers never wait for
//!   a build, only (briefly) for another reader or a publish to clone an `Arc`.
//! - Each thread keeps a small cache ([`cache`]): for each cell it reads, the
//!   key (cell id and generation) it last saw, and a thread-local block that
//!   owns a strong count of that instance's `Arc<T>` and counts the thread's
//!   `RegistryRef`s to it. The fast path of `get` is an `Acquire` load of
//!   `generation`, a `Relaxed` load of the cell's id, and a look-up in the
//!   thread's cache: if the cached key equals the published one, the cached
//!   instance *is* the published instance (keys are never reused), and the
//!   reader counts its reference in the block, memory that only its own
//!   thread writes. On a miss it takes the slow path: lock `current`, clone
//!   the `Arc`, and cache it in a new block, retiring the old one (which its
//!   last reference frees, if any are left).
//! - After each publish, the writer sweeps every thread's cache
//!   ([`cache::reclaim`]) and takes back each replaced instance that no
//!   `RegistryRef` holds; the reader and the writer agree on who gives a
//!   count back through a Dekker hand-shake on an asymmetric barrier (the
//!   `cache` module docs). So a thread that read an instance once and went
//!   idle keeps nothing alive.
//! - Cell ids come from a process-wide counter, never from the cell's address:
//!   a dropped cell's address can be reused, its id cannot, so a cache entry
//!   can never be mistaken for another cell's.

mod cache;

use std::any::type_name;
use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::Location;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::reentry;
use crate::sync::{
    AtomicU64, Mutex, MutexGuard, Ordering, PerExecution, loom_const_fn, per_execution,
};
use cache::{Block, Key};

/// What a publish leaves for its caller to release once `builder` is free.
struct Retired<T, S> {
    /// The replaced state: its `Arc`s of the instance and the settings.
    replaced: Option<Current<T, S>>,
    /// The counts the sweep took back from threads' caches.
    counts: Vec<cache::Count>,
}

impl<T, S> Retired<T, S> {
    /// Drops the replaced state and gives the counts back: the replaced
    /// instance is dropped here if nothing else holds it.
    fn release(self) {
        drop(self.replaced);
        self.counts.into_iter().for_each(cache::Count::give_back);
    }
}

/// The published state.
struct Current<T, S> {
    generation: u64,
    instance: Arc<T>,
    settings: Arc<S>,
}

/// A global instance built from settings, with explicit and linearizable
/// reinitialisation, and reads that never block and never write shared
/// memory.
///
/// In the provider registry incident, `get_provider_registry(settings=None)`
/// rebuilt the registry on every call that passed settings, and raced on the
/// first build. With
/// `RegistryCell` the first [`get`](Self::get) builds once from
/// `S::default()`, and a new instance appears only through
/// [`reinit`](Self::reinit), [`reinit_if_changed`](Self::reinit_if_changed)
/// or [`try_reinit`](Self::try_reinit).
///
/// Compared with `arc_swap::ArcSwap<T>`: the read path does not touch a shared
/// counter or a debt slot; it checks the published generation against a
/// per-thread cache, and counts its reference in memory only its own thread
/// writes. Unlike `arc_swap::Cache`, that cache never keeps a replaced
/// instance alive: the writer takes it back from every thread that does not
/// hold a reference, so `reinit` pays for it, not the readers.
///
/// # Semantics under concurrency
///
/// - **One first build.** Concurrent first callers of `get` wait for one
///   build with `S::default()`.
/// - **Linearizable publishes.** Published instances form one sequence,
///   numbered by [`generation`](Self::generation); a `get` that starts after a
///   `reinit` returned sees that instance or a later one.
/// - **One build at a time.** Builds are serialised; readers never wait for
///   one: during a slow `reinit` they keep getting the previous instance.
/// - **A replaced instance drops with its last holder.** It is dropped when
///   the last [`RegistryRef`] or `Arc` to it is dropped; if none exists when
///   `reinit` publishes its successor, it is dropped before `reinit` returns,
///   on the thread that calls `reinit`. Threads that read it once and went
///   idle (parked, blocked, or busy elsewhere) do not keep it alive, and
///   `reinit` never waits for them or for any reference. Dropping the cell
///   drops its instance the same way. One exception to "before `reinit`
///   returns": a thread that is inside a `get` of this cell, or exiting,
///   while `reinit` sweeps may take the last count itself; it then drops the
///   instance when that call or its exit gets there, moments later.
/// - **Reads never wait for a build or for user code.** A read that hits
///   this thread's cache takes no lock at all. A thread's first read of the
///   cell, and the first read after a `reinit`, lock the cell's `current` and
///   this thread's cache for a few instructions; such a read can wait for a
///   concurrent `reinit`'s sweep of the caches (which runs no user code), and
///   a sweep can wait for such a read to leave its few instructions.
/// - **The cost of that.** A `reinit` that finds the replaced instance in some
///   thread's cache runs one `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
///   on Linux (a few microseconds: it interrupts the CPUs running this
///   process's threads), and visits each thread that has read a
///   `RegistryCell`. Reads pay a compiler fence and no hardware fence. On
///   other platforms, under miri, and on a Linux kernel without the expedited
///   membarrier (before 4.14, or where a sandbox filters it), every read pays
///   a `SeqCst` fence instead; the guarantee is the same.
/// - **Errors and panics change nothing.** If a build fails or panics, the
///   current instance and settings stay as they were and the error or panic
///   reaches the caller. There is no poisoning.
/// - **Same-thread reentrancy panics.** A build that calls back into the same
///   cell's first initialisation or `reinit` on the thread that runs the
///   build panics with a message instead of deadlocking. The check is per
///   thread: a build that waits for another thread (spawns and joins it, say)
///   which calls `get` on the uninitialised cell or `reinit` is not detected,
///   and both wait forever. Reading the current instance from inside a
///   `reinit` build is fine.
///
/// # Example
///
/// The provider registry incident's `get_provider_registry(settings=None)`,
/// with its two paths made explicit:
///
/// ```
/// use toctou::RegistryCell;
///
/// #[derive(Default, PartialEq)]
/// struct Settings {
///     providers: Vec<&'static str>,
/// }
///
/// struct ProviderRegistry {
///     providers: Vec<&'static str>,
/// }
///
/// static REGISTRY: RegistryCell<ProviderRegistry, Settings> =
///     RegistryCell::new(|s| ProviderRegistry { providers: s.providers.clone() });
///
/// // Most callers: the current registry, built once on first use.
/// assert!(REGISTRY.get().providers.is_empty());
/// // A settings change: one rebuild, published atomically.
/// let settings = Settings { providers: vec!["openai"] };
/// REGISTRY.reinit_if_changed(settings);
/// assert_eq!(REGISTRY.get().providers, ["openai"]);
/// // The same settings again: no rebuild.
/// REGISTRY.reinit_if_changed(Settings { providers: vec!["openai"] });
/// assert_eq!(REGISTRY.generation(), 2);
/// ```
pub struct RegistryCell<T, S = ()> {
    build: fn(&S) -> T,
    /// The protocol's state: per loom execution under `toctou_loom` (see
    /// `sync::PerExecution`), the plain fields otherwise.
    shared: PerExecution<Shared<T, S>>,
    declared_at: &'static Location<'static>,
}

/// The loom-backed part of a [`RegistryCell`]. `repr(C)`, read path first:
/// `generation` and `id` keep the offsets they had as fields of the cell.
#[repr(C)]
struct Shared<T, S> {
    /// The published generation; 0 while empty. See the module docs.
    generation: AtomicU64,
    /// This cell's id in the per-thread caches; 0 until first published.
    id: AtomicU64,
    current: Mutex<Option<Current<T, S>>>,
    /// Held around every build.
    builder: Mutex<()>,
}

impl<T, S> Shared<T, S> {
    loom_const_fn! {
        fn new() -> Self {
            Self {
                generation: AtomicU64::new(0),
                id: AtomicU64::new(0),
                current: Mutex::new(None),
                builder: Mutex::new(()),
            }
        }
    }
}

impl<T, S> Drop for Shared<T, S> {
    /// Takes the instance back from every thread's cache, so that it drops
    /// with the cell unless an `Arc` from [`get_arc`](RegistryCell::get_arc)
    /// or [`reinit`](RegistryCell::reinit) still holds it. (No `RegistryRef`
    /// can: they borrow the cell.)
    fn drop(&mut self) {
        // Relaxed: `&mut self`; nothing runs concurrently on this cell.
        let id = self.id.load(Ordering::Relaxed);
        if id != 0 {
            cache::reclaim(id, u64::MAX)
                .into_iter()
                .for_each(cache::Count::give_back);
        }
    }
}

/// A reference to the instance a [`RegistryCell`] had published when
/// [`get`](RegistryCell::get) was called.
///
/// It keeps that instance alive even if the cell is reinitialised meanwhile:
/// the instance is dropped (if nothing else holds it) when its last
/// `RegistryRef` drops. It is neither `Send` nor `Sync`: it is
/// counted in the reading thread's cache, with plain loads and stores that
/// only that thread makes (no read-modify-write). Use
/// [`RegistryCell::get_arc`] (or [`RegistryRef::to_arc`]) to hold the instance
/// across threads or an `.await`.
///
/// ```
/// static CELL: toctou::RegistryCell<String, u8> =
///     toctou::RegistryCell::new(|v| format!("version {v}"));
///
/// let old = CELL.get();
/// CELL.reinit(2);
/// // `old` still reads the instance it was taken from.
/// assert_eq!((old.as_str(), old.generation()), ("version 0", 1));
/// assert_eq!(CELL.get().as_str(), "version 2");
/// ```
#[must_use]
pub struct RegistryRef<'a, T> {
    /// Points at the `T` inside the `Arc<T>` whose count `block` owns (from
    /// `Arc::into_raw`).
    ptr: NonNull<T>,
    /// This thread's block for the instance, which counts this reference.
    /// Being raw pointers, these fields also make the type neither `Send`
    /// nor `Sync`: a block never leaves its thread.
    block: NonNull<Block>,
    _cell: PhantomData<&'a T>,
}

impl<T, S> RegistryCell<T, S> {
    /// Creates an empty cell that builds instances with `build`.
    ///
    /// `const`, so it works in a `static` (under `--cfg toctou_loom` too).
    ///
    /// ```
    /// use toctou::RegistryCell;
    ///
    /// struct Registry {
    ///     providers: Vec<String>,
    /// }
    ///
    /// static REGISTRY: RegistryCell<Registry, Vec<String>> =
    ///     RegistryCell::new(|names| Registry { providers: names.clone() });
    ///
    /// assert!(REGISTRY.get().providers.is_empty());
    /// ```
    #[track_caller]
    pub const fn new(build: fn(&S) -> T) -> Self {
        Self {
            build,
            shared: per_execution!(Shared::new),
            declared_at: Location::caller(),
        }
    }

    /// The generation of the published instance: 0 before the first build,
    /// then one more per publish.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<u32, u32> = toctou::RegistryCell::new(|s| *s);
    /// assert_eq!(CELL.generation(), 0);
    /// let _ = CELL.get();
    /// assert_eq!(CELL.generation(), 1);
    /// CELL.reinit(7);
    /// assert_eq!(CELL.generation(), 2);
    /// ```
    pub fn generation(&self) -> u64 {
        // Acquire: pairs with the Release store in `publish`.
        self.shared.generation.load(Ordering::Acquire)
    }

    fn addr(&self) -> usize {
        self as *const Self as usize
    }

    /// Panics if this thread is building this cell: locking `builder` again
    /// would deadlock.
    fn assert_not_reentrant(&self, what: &str) {
        if reentry::is_initialising(self.addr()) {
            panic!(
                "reentrant {what} of toctou::RegistryCell<{}, {}> declared at {}: \
                 its build function called back into the same cell on the same thread, \
                 which would deadlock",
                type_name::<T>(),
                type_name::<S>(),
                self.declared_at,
            );
        }
    }

    /// Publishes `instance` built from `settings`, and takes the replaced
    /// instance back from every thread's cache that holds it without a
    /// reference. Returns the published instance, and what the caller must
    /// drop once it has released `builder` (dropping either may run an
    /// instance's `drop`, which may use this cell). The caller holds
    /// `builder`.
    fn publish(&self, settings: S, instance: T) -> (Arc<T>, Retired<T, S>) {
        let instance = Arc::new(instance);
        let settings = Arc::new(settings);
        if self.shared.id.load(Ordering::Relaxed) == 0 {
            // Only builders write the id, and they are serialised by
            // `builder`. The Release store of `generation` below publishes it
            // to readers' Acquire load of `generation`.
            self.shared
                .id
                .store(cache::new_cell_id(), Ordering::Relaxed);
        }
        let replaced = {
            let mut current = self.shared.current.lock();
            let generation = current.as_ref().map_or(0, |c| c.generation) + 1;
            let replaced = current.replace(Current {
                generation,
                instance: Arc::clone(&instance),
                settings,
            });
            // Release: a reader that loads this generation with Acquire then
            // sees the id above, and finds `current` at this generation or a
            // later one when it locks it.
            self.shared.generation.store(generation, Ordering::Release);
            replaced
        };
        // Under `builder`, which serialises the sweeps of this cell (see
        // `cache::reclaim`). The counts it takes back are not only the
        // replaced generation's: an older one that a reference held at the
        // last sweep may have lost it since.
        let counts = match &replaced {
            Some(replaced) => cache::reclaim(
                self.shared.id.load(Ordering::Relaxed),
                replaced.generation + 1,
            ),
            None => Vec::new(),
        };
        (instance, Retired { replaced, counts })
    }

    /// Runs `build` with this thread marked as building the cell, publishes
    /// its `Ok`, releases `builder`, and only then drops the replaced
    /// instance (if this was its last holder), so that its `drop` may use
    /// the cell.
    ///
    /// `builder` is the last parameter so that it is dropped first if `build`
    /// panics: `settings` (user code too) drops after it.
    fn build_and_publish<E>(
        &self,
        settings: S,
        build: impl FnOnce(&S) -> Result<T, E>,
        builder: MutexGuard<'_, ()>,
    ) -> Result<Arc<T>, E> {
        let built = {
            let _mark = reentry::Mark::enter(self.addr());
            build(&settings)
        };
        let instance = match built {
            Ok(instance) => instance,
            Err(error) => {
                drop(builder);
                drop(settings);
                return Err(error);
            }
        };
        let (instance, retired) = self.publish(settings, instance);
        drop(builder);
        retired.release();
        Ok(instance)
    }

    /// The cell's own build function, in the form `build_and_publish` takes.
    fn own_build(&self) -> impl FnOnce(&S) -> Result<T, Infallible> + use<T, S> {
        let build = self.build;
        move |settings| Ok(build(settings))
    }
}

impl<T: Send + Sync + 'static, S> RegistryCell<T, S> {
    /// Returns the published instance, building the first one from
    /// `S::default()` if the cell is empty.
    ///
    /// On an initialised cell that this thread has read since the last
    /// `reinit` this never blocks, takes no lock and writes no memory that
    /// other threads write: it compares the published generation with this
    /// thread's cached one. During a [`reinit`](Self::reinit) it returns the
    /// previous instance until the new one is published.
    ///
    /// # Panics
    ///
    /// If the first build panics (the cell stays empty and the next caller
    /// retries), or if called from inside this cell's first build on the
    /// thread that runs it. A call from another thread that the first build
    /// waits for is not detected: both wait forever.
    ///
    /// ```
    /// static LIMITS: toctou::RegistryCell<Vec<u32>, u32> =
    ///     toctou::RegistryCell::new(|n| (0..*n).collect());
    ///
    /// assert!(LIMITS.get().is_empty()); // built from u32::default()
    /// LIMITS.reinit(3);
    /// assert_eq!(*LIMITS.get(), [0, 1, 2]);
    /// ```
    #[inline]
    pub fn get(&self) -> RegistryRef<'_, T>
    where
        S: Default,
    {
        match cache::pin_cached(self.published()) {
            Some((block, ptr)) => RegistryRef {
                // The entry of this cell's key holds an `Arc<T>` of this
                // cell's `T` (see `load_current`).
                ptr: ptr.cast::<T>(),
                block,
                _cell: PhantomData,
            },
            None => self.get_slow(),
        }
    }

    /// The key of the published instance, for the cache look-up. Generation
    /// 0 (an empty cell) is never cached, so it always misses.
    #[inline]
    fn published(&self) -> Key {
        // Acquire: pairs with the Release store in `publish`; makes `id`
        // visible, and with it the rest of what `publish` wrote. (The
        // instance behind a matching cache entry is this thread's own
        // earlier read, made under the `current` lock.)
        let generation = self.shared.generation.load(Ordering::Acquire);
        // Relaxed: written once, before the first Release of `generation`.
        let id = self.shared.id.load(Ordering::Relaxed);
        Key { id, generation }
    }

    #[cold]
    fn get_slow(&self) -> RegistryRef<'_, T>
    where
        S: Default,
    {
        loop {
            if let Some(found) = self.load_current() {
                return found;
            }
            self.init_first();
        }
    }

    /// Reads `current` under its lock and refreshes this thread's cache.
    fn load_current(&self) -> Option<RegistryRef<'_, T>> {
        let (generation, instance) = {
            let current = self.shared.current.lock();
            let current = current.as_ref()?;
            (current.generation, Arc::clone(&current.instance))
        };
        // Relaxed: `current` was Some, so the id was written before the
        // `current` lock we just released.
        let key = Key {
            id: self.shared.id.load(Ordering::Relaxed),
            generation,
        };
        let block = cache::fill(key, instance, &self.shared.generation);
        // SAFETY: `block` was just made, with one reference: ours.
        let ptr = unsafe { cache::instance(block) };
        // From `Arc::into_raw`, not from a `&T`: the pointer keeps the
        // provenance of the whole allocation, which `to_arc` needs to reach
        // the reference counts (miri's Stacked Borrows check caught a
        // pointer derived from `&*instance`).
        Some(RegistryRef {
            ptr: ptr.cast::<T>(),
            block,
            _cell: PhantomData,
        })
    }

    /// Builds the first instance unless another caller did meanwhile.
    fn init_first(&self)
    where
        S: Default,
    {
        self.assert_not_reentrant("first initialisation");
        let builder = self.shared.builder.lock();
        if self.shared.current.lock().is_some() {
            return;
        }
        let Ok(_) = self.build_and_publish(S::default(), self.own_build(), builder);
    }

    /// The published instance as an `Arc`, to hold across threads or an
    /// `.await`. Builds the first instance like [`get`](Self::get).
    ///
    /// ```
    /// static NAME: toctou::RegistryCell<String> = toctou::RegistryCell::new(|()| "v1".into());
    ///
    /// let name = NAME.get_arc();
    /// std::thread::spawn(move || assert_eq!(*name, "v1")).join().unwrap();
    /// ```
    pub fn get_arc(&self) -> Arc<T>
    where
        S: Default,
    {
        // Through a `RegistryRef`, not a bare look-up: the reference is what
        // keeps a sweep from taking the instance back while we clone it.
        self.get().to_arc()
    }

    /// Builds a new instance from `settings` and publishes it. Returns the
    /// instance it published.
    ///
    /// Builds are serialised: a concurrent `reinit` waits for this one, then
    /// builds and publishes its own. Readers are not blocked: they get the
    /// previous instance until this one is published.
    ///
    /// # Panics
    ///
    /// If `build` panics (the cell keeps its current instance and settings),
    /// or if called from inside one of this cell's builds on the thread that
    /// runs it. A call from another thread that a build waits for is not
    /// detected: both wait forever.
    ///
    /// ```
    /// static PORT: toctou::RegistryCell<u16, u16> = toctou::RegistryCell::new(|p| *p);
    ///
    /// let published = PORT.reinit(8080);
    /// assert_eq!(*published, 8080);
    /// assert_eq!(*PORT.get(), 8080);
    /// ```
    pub fn reinit(&self, settings: S) -> Arc<T> {
        let Ok(instance) = self.try_reinit(settings, self.own_build());
        instance
    }

    /// Like [`reinit`](Self::reinit), but does nothing if the current settings
    /// equal `settings`: it returns the current instance without a build.
    /// Concurrent calls with equal settings build once.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<String, String> =
    ///     toctou::RegistryCell::new(|s| format!("registry for {s}"));
    ///
    /// let a = CELL.reinit_if_changed("eu".to_owned());
    /// let b = CELL.reinit_if_changed("eu".to_owned());
    /// assert!(std::sync::Arc::ptr_eq(&a, &b));
    /// assert_eq!(CELL.generation(), 1);
    /// ```
    pub fn reinit_if_changed(&self, settings: S) -> Arc<T>
    where
        S: PartialEq,
    {
        self.assert_not_reentrant("reinit");
        let builder = self.shared.builder.lock();
        if let Some(current) = &*self.shared.current.lock() {
            if *current.settings == settings {
                return Arc::clone(&current.instance);
            }
        }
        let Ok(instance) = self.build_and_publish(settings, self.own_build(), builder);
        instance
    }

    /// Builds a new instance with the fallible `build` and publishes it on
    /// `Ok`. On `Err` the current instance and settings stay as they were.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<u16, String> = toctou::RegistryCell::new(|_| 80);
    ///
    /// let bad = CELL.try_reinit("not a port".to_owned(), |s| s.parse::<u16>());
    /// assert!(bad.is_err());
    /// assert_eq!(CELL.generation(), 0, "nothing was published");
    /// let good = CELL.try_reinit("8080".to_owned(), |s| s.parse::<u16>()).unwrap();
    /// assert_eq!(*good, 8080);
    /// ```
    pub fn try_reinit<E>(
        &self,
        settings: S,
        build: impl FnOnce(&S) -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        self.assert_not_reentrant("reinit");
        let builder = self.shared.builder.lock();
        self.build_and_publish(settings, build, builder)
    }

    /// The settings of the published instance, building the first instance
    /// like [`get`](Self::get) if the cell is empty.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<u8, u8> = toctou::RegistryCell::new(|s| *s);
    /// assert_eq!(*CELL.settings(), 0);
    /// CELL.reinit(4);
    /// assert_eq!(*CELL.settings(), 4);
    /// ```
    pub fn settings(&self) -> Arc<S>
    where
        S: Default,
    {
        loop {
            if let Some(current) = &*self.shared.current.lock() {
                return Arc::clone(&current.settings);
            }
            self.init_first();
        }
    }
}

impl<T, S> fmt::Debug for RegistryCell<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCell")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl<T> RegistryRef<'_, T> {
    /// The generation of the instance this reference points at.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<u8, u8> = toctou::RegistryCell::new(|s| *s);
    /// let first = CELL.get();
    /// CELL.reinit(1);
    /// assert_eq!((first.generation(), *first), (1, 0));
    /// assert_eq!(CELL.get().generation(), 2);
    /// ```
    pub fn generation(&self) -> u64 {
        // SAFETY: `self` is one of the block's references, so it is alive.
        unsafe { cache::key(self.block) }.generation
    }

    /// An `Arc` to the same instance, to send to another thread.
    ///
    /// ```
    /// static CELL: toctou::RegistryCell<u8> = toctou::RegistryCell::new(|()| 5);
    /// let arc = CELL.get().to_arc();
    /// assert_eq!(*arc, 5);
    /// ```
    pub fn to_arc(&self) -> Arc<T> {
        let ptr = self.ptr.as_ptr().cast_const();
        // SAFETY: `ptr` is `Arc::into_raw` of an `Arc<T>` that `self` keeps
        // alive (see `Deref`): the strong count is at least 1 and may be
        // incremented, and `from_raw` then takes ownership of that new count.
        unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        }
    }
}

impl<T> Deref for RegistryRef<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: `ptr` points into the `Arc<T>` whose count `block` owns,
        // and `block` counts `self` among its references, so it keeps that
        // count until `self` drops (`cache` module docs). A `T` behind an
        // `Arc` is never mutated.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Clone for RegistryRef<'_, T> {
    fn clone(&self) -> Self {
        // SAFETY: `self` is one of the block's references, so it is alive.
        unsafe { cache::pin(self.block) };
        Self {
            ptr: self.ptr,
            block: self.block,
            _cell: PhantomData,
        }
    }
}

impl<T> Drop for RegistryRef<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `self` is one of the block's references (counted by
        // `pin_cached`, `fill` or `clone`), so the block is alive, and it is
        // this thread's (`RegistryRef` is not `Send`).
        unsafe { cache::unpin(self.block) };
    }
}

impl<T: fmt::Debug> fmt::Debug for RegistryRef<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryRef")
            .field("generation", &self.generation())
            .field("instance", &**self)
            .finish()
    }
}
