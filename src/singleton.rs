//! [`Singleton<T>`] and [`Lazy<T, F>`]: double-checked init cells, sync and async.
//!
//! The protocol lives in [`crate::once`]; this module adds the value slot, the
//! public API and the reentrancy check.

use std::any::type_name;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::panic::{Location, RefUnwindSafe, UnwindSafe};

use crate::once::{Begin, Once};
use crate::reentry;
use crate::sync::{PerExecution, UnsafeCell, loom_const_fn, per_execution};

/// A thread-safe cell that is initialised at most once, on first use: the
/// double-checked singleton done right.
///
/// Like [`std::sync::OnceLock`], with these differences:
///
/// - [`get_or_try_init`](Self::get_or_try_init) (fallible init) works on
///   stable Rust.
/// - [`get_or_init_async`](Self::get_or_init_async) and
///   [`get_or_try_init_async`](Self::get_or_try_init_async) initialise from a
///   future, on any runtime, and sync and async callers may race on the same
///   cell.
/// - Calling back into the same cell from inside its own initialiser, on the
///   thread that runs it, panics with a message naming the type and the place
///   the cell was declared. `OnceLock` and `once_cell` deadlock instead. A
///   cycle through another thread is not detected and deadlocks here too: an
///   initialiser that spawns a thread which calls `get_or_init` on the same
///   cell, and then joins it, waits forever, as does the spawned thread.
///
/// # Semantics under concurrency
///
/// - **Exactly one successful init.** The initialiser runs on one thread at a
///   time, and at most one run succeeds. Every caller gets a reference to that
///   one value.
/// - **Waiting parks.** Callers that find an init in progress park the thread
///   (sync) or return `Pending` (async); nobody spins.
/// - **Errors are not stored.** If the initialiser returns `Err`, that caller
///   gets the error, the cell stays empty, and one waiting caller runs its own
///   initialiser.
/// - **Panics do not poison.** A panic in the initialiser propagates to its
///   caller, the cell stays empty, and one waiting caller retries.
/// - **Cancellation is safe.** If the future of an async initialiser is
///   dropped, the cell stays empty and one waiting caller (sync or async)
///   takes over.
/// - **Same-thread reentrancy panics** instead of deadlocking (see above).
///   The check is per thread: a wait that closes the cycle through another
///   thread, or through another task that an async initialiser awaits, is
///   not detected and never ends. The check costs nothing on the
///   initialised fast path.
/// - **Blocking is explicit.** [`get_or_init`](Self::get_or_init),
///   [`get_or_try_init`](Self::get_or_try_init) and [`set`](Self::set) block
///   the calling thread while another initialiser runs; [`get`](Self::get)
///   and `Debug` never block. In async code use the `_async` forms: a
///   blocking call on an executor thread stalls that thread, and on a
///   single-threaded runtime it deadlocks if the running initialiser is a
///   suspended task on that same thread.
///
/// # Fast path
///
/// On an initialised cell, [`get`](Self::get), [`wait`](Self::wait) and the
/// `get_or_*` methods do one `Acquire` load and a branch: no store, no lock,
/// no read-modify-write.
///
/// # Size
///
/// `size_of::<Singleton<u64>>()` is 40 bytes on 64-bit Linux (`Lazy<u64>`:
/// 48), against 16 for `OnceLock<u64>`. Besides the value (8) it holds:
///
/// - the state word (8): `EMPTY`/`RUNNING`/`READY` and a "waiters parked" bit;
/// - the wait queue (16): a mutex and a pointer to the list of parked threads
///   and async wakers, allocated by the first caller that has to wait on this
///   cell and freed with it. `OnceLock`'s threads park on the state word
///   itself (a futex), but an async waiter's [`Waker`](std::task::Waker)
///   needs a place to be stored. (A process-wide table keyed by the cell's
///   address, like the one `parking_lot` keeps for threads, could hold the
///   queues instead, at the price of a shared table on every slow path; this
///   crate does not do that.)
/// - where the cell was declared (8), for the reentrancy panic message.
///
/// Nothing here is on the read path: `get` loads the state word and returns
/// the value's address, which is the cell's own (`repr(C)`, value first).
///
/// # Example: the orchestrator from the race report
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use toctou::Singleton;
///
/// struct Orchestrator {
///     sessions: Mutex<HashMap<u64, String>>,
/// }
///
/// static ORCHESTRATOR: Singleton<Orchestrator> = Singleton::new();
///
/// fn orchestrator() -> &'static Orchestrator {
///     ORCHESTRATOR.get_or_init(|| Orchestrator { sessions: Mutex::new(HashMap::new()) })
/// }
///
/// let handles: Vec<_> = (0..10)
///     .map(|_| std::thread::spawn(|| orchestrator() as *const Orchestrator as usize))
///     .collect();
/// let addrs: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
/// assert!(addrs.windows(2).all(|w| w[0] == w[1]), "one instance for every thread");
/// ```
///
/// # Thread safety
///
/// `Singleton<T>` is `Sync` exactly when `T: Send + Sync` (the value is
/// shared by all threads, and may be built on one and dropped on another),
/// and `Send` when `T: Send`. So a cell of a non-`Sync` type cannot be a
/// `static`:
///
/// ```compile_fail
/// use std::cell::Cell;
/// static NOT_SYNC: toctou::Singleton<Cell<u8>> = toctou::Singleton::new();
/// ```
///
/// # Model checking
///
/// Under `RUSTFLAGS="--cfg toctou_loom"`, `Singleton::new` is still `const`,
/// so a `static` cell compiles in a downstream crate's loom build. Inside a
/// model, a `static` cell is empty again at the start of every execution, as
/// a `loom::lazy_static!` is; each access synchronises with the cell's first
/// access in the execution. See the crate docs.
// `repr(C)` with the value first: a pointer to the cell is a pointer to the
// value, so the fast path returns the cell's own address (no offset add on
// the load-compare-return chain; measured in benches/singleton.rs). In std
// builds `PerExecution` is `repr(transparent)` and `State` is `repr(C)`, so
// the value is still at offset 0.
#[repr(C)]
pub struct Singleton<T> {
    /// The value slot and the protocol: per loom execution under
    /// `toctou_loom` (see `sync::PerExecution`), the plain fields otherwise.
    state: PerExecution<State<T>>,
    declared_at: &'static Location<'static>,
}

/// The loom-backed part of a [`Singleton`].
#[repr(C)]
struct State<T> {
    value: UnsafeCell<MaybeUninit<T>>,
    once: Once,
    /// `MaybeUninit<T>` does not tell the drop checker that we own a `T`.
    _owns: PhantomData<T>,
}

impl<T> State<T> {
    loom_const_fn! {
        fn new() -> Self {
            Self {
                once: Once::new(),
                value: UnsafeCell::new(MaybeUninit::uninit()),
                _owns: PhantomData,
            }
        }
    }
}

impl<T> Drop for State<T> {
    fn drop(&mut self) {
        if self.once.is_ready_mut() {
            // SAFETY: READY means initialised; `&mut self` means exclusive,
            // and the cell is never used again.
            unsafe { self.value.get_mut().assume_init_drop() }
        }
    }
}

// SAFETY: shared access hands out `&T` to many threads (so `T: Sync`), and the
// value may be created on one thread and dropped or taken on another (so
// `T: Send`). All other shared state is atomics and a mutex.
unsafe impl<T: Send + Sync> Sync for Singleton<T> {}

// No poisoning: a panicking initialiser leaves the cell empty, never broken.
impl<T: RefUnwindSafe + UnwindSafe> RefUnwindSafe for Singleton<T> {}
impl<T: UnwindSafe> UnwindSafe for Singleton<T> {}

impl<T> Singleton<T> {
    /// Creates an empty cell. `const`, so it works in a `static` (under
    /// `--cfg toctou_loom` too).
    ///
    /// The caller's location is recorded (`#[track_caller]`) and named in
    /// the reentrancy panic message.
    ///
    /// ```
    /// static CONFIG: toctou::Singleton<String> = toctou::Singleton::new();
    /// assert!(CONFIG.get().is_none());
    /// ```
    #[must_use]
    #[track_caller]
    pub const fn new() -> Self {
        Self::declared_at(Location::caller())
    }

    /// An empty cell whose reentrancy message names `declared_at`.
    const fn declared_at(declared_at: &'static Location<'static>) -> Self {
        Self {
            state: per_execution!(State::new),
            declared_at,
        }
    }

    /// Returns the value if the cell is initialised. Never initialises, never
    /// waits.
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// assert_eq!(cell.get(), None);
    /// cell.get_or_init(|| 7);
    /// assert_eq!(cell.get(), Some(&7));
    /// ```
    #[inline]
    pub fn get(&self) -> Option<&T> {
        if self.state.once.is_ready() {
            // SAFETY: `is_ready` observed READY with Acquire.
            Some(unsafe { self.get_unchecked() })
        } else {
            None
        }
    }

    /// Whether the cell holds a value. Never waits.
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// assert!(!cell.is_initialized());
    /// cell.set(1).unwrap();
    /// assert!(cell.is_initialized());
    /// ```
    #[inline]
    pub fn is_initialized(&self) -> bool {
        self.state.once.is_ready()
    }

    /// Blocks the calling thread until the cell is initialised, then returns
    /// the value. Never initialises: another caller must. Like
    /// [`std::sync::OnceLock::wait`].
    ///
    /// # Semantics under concurrency
    ///
    /// - Returns at once (one `Acquire` load) if the cell holds a value.
    /// - Otherwise parks, whether or not an initialiser is running yet, until
    ///   one **succeeds**. An initialiser that returns `Err`, panics or is
    ///   cancelled leaves the cell empty, and `wait` keeps waiting for a later
    ///   one; if none ever succeeds, it waits forever. The value it returns is
    ///   the one every other caller sees.
    /// - It parks the thread, so in async code prefer
    ///   [`get_or_init_async`](Self::get_or_init_async): there is no async
    ///   `wait`, and blocking an executor thread stalls its other tasks.
    ///
    /// # Panics
    ///
    /// Panics if called from inside this cell's own initialiser on the same
    /// thread (reentrancy), which could never return. `OnceLock::wait`
    /// deadlocks there.
    ///
    /// ```
    /// use std::thread;
    /// use toctou::Singleton;
    ///
    /// static CONFIG: Singleton<String> = Singleton::new();
    ///
    /// thread::scope(|s| {
    ///     // Readers wait for the value without knowing how to build it.
    ///     let reader = s.spawn(|| CONFIG.wait().len());
    ///     // A failed attempt does not wake the reader with nothing...
    ///     assert!(CONFIG.get_or_try_init(|| Err::<String, _>("not yet")).is_err());
    ///     // ...a successful one does.
    ///     CONFIG.set("loaded".to_owned()).unwrap();
    ///     assert_eq!(reader.join().unwrap(), 6);
    /// });
    /// ```
    #[inline]
    pub fn wait(&self) -> &T {
        match self.get() {
            Some(value) => value,
            None => self.wait_slow(),
        }
    }

    /// The slow path of [`wait`](Self::wait): park until `READY`.
    #[cold]
    fn wait_slow(&self) -> &T {
        loop {
            if let Some(value) = self.get() {
                return value;
            }
            // Our own initialiser is running: waiting could never end.
            self.assert_not_reentrant("Singleton");
            self.state.once.wait_ready();
        }
    }

    /// Returns the value, initialising it with `f` if the cell is empty.
    ///
    /// If another thread is initialising, this parks until it finishes. If
    /// that initialiser panics (or, for async ones, is cancelled), one of the
    /// waiters runs its own `f`. `f` runs at most once successfully across all
    /// threads.
    ///
    /// # Panics
    ///
    /// Propagates a panic of `f`; the cell stays empty and retryable. Panics if
    /// called from inside this cell's own initialiser on the thread that runs
    /// it (reentrancy), which would otherwise deadlock. A call from another
    /// thread that the initialiser waits for (spawns and joins, say) is not
    /// detected: both wait forever.
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// assert_eq!(*cell.get_or_init(|| 92), 92);
    /// assert_eq!(*cell.get_or_init(|| unreachable!()), 92);
    /// ```
    #[inline]
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        self.get_or_init_as("Singleton", f)
    }

    /// `get_or_init`, with `kind` naming the public type (`Singleton` or
    /// `Lazy`) in the reentrancy panic.
    #[inline]
    fn get_or_init_as(&self, kind: &'static str, f: impl FnOnce() -> T) -> &T {
        if let Some(value) = self.get() {
            return value;
        }
        match self.init_slow(kind, || Ok::<T, Infallible>(f())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Returns the value, initialising it with the fallible `f` if the cell is
    /// empty.
    ///
    /// On `Err`, the cell stays empty and the error goes to this caller only;
    /// one waiting caller then runs its own `f`. This is
    /// `OnceLock::get_or_try_init`, which is still unstable in std.
    ///
    /// # Panics
    ///
    /// As [`get_or_init`](Self::get_or_init).
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// assert_eq!(cell.get_or_try_init(|| "not yet".parse::<u32>()).ok(), None);
    /// assert!(!cell.is_initialized(), "errors are not stored");
    /// assert_eq!(cell.get_or_try_init(|| "42".parse::<u32>()), Ok(&42));
    /// ```
    #[inline]
    pub fn get_or_try_init<E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        self.init_slow("Singleton", f)
    }

    /// The slow path of the sync `get_or_*` methods. `kind` names the public
    /// type (`Singleton` or `Lazy`) in the reentrancy panic.
    #[cold]
    fn init_slow<E>(&self, kind: &'static str, f: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        loop {
            match self.state.once.try_begin() {
                // SAFETY: `try_begin` observed READY with Acquire.
                Begin::Ready => return Ok(unsafe { self.get_unchecked() }),
                Begin::Owner(guard) => {
                    let value = {
                        let _mark = reentry::Mark::enter(self.addr());
                        // On `Err` or unwind, `guard` drops: back to EMPTY.
                        f()?
                    };
                    // SAFETY: we own the RUNNING claim.
                    return Ok(unsafe { self.publish(guard, value) });
                }
                Begin::Running => {
                    self.assert_not_reentrant(kind);
                    self.state.once.wait();
                }
            }
        }
    }

    /// Returns the value, initialising it with the future returned by `f` if
    /// the cell is empty.
    ///
    /// Runtime-agnostic: waiting for another initialiser returns `Pending` and
    /// never blocks the executor thread. Sync callers of
    /// [`get_or_init`](Self::get_or_init) on the same cell wait for this
    /// initialiser and vice versa.
    ///
    /// # Cancellation
    ///
    /// If this future is dropped while its initialiser is running, the
    /// initialiser is dropped too, the cell stays empty, and one waiting
    /// caller (sync or async) takes over. Dropping a waiting future leaves
    /// nothing behind.
    ///
    /// # Panics
    ///
    /// As [`get_or_init`](Self::get_or_init). The same-thread check applies
    /// while a thread creates or polls the initialiser's future, on that
    /// thread only; an initialiser that awaits another task which waits for
    /// this cell is not detected and never completes.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// static CLIENT: toctou::Singleton<String> = toctou::Singleton::new();
    ///
    /// async fn connect() -> String {
    ///     "connected".to_owned()
    /// }
    ///
    /// block_on(async {
    ///     assert_eq!(CLIENT.get_or_init_async(connect).await, "connected");
    /// });
    /// ```
    pub async fn get_or_init_async<F, Fut>(&self, f: F) -> &T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let init = move || {
            let fut = f();
            async move { Ok::<T, Infallible>(fut.await) }
        };
        match self.get_or_try_init_async(init).await {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// The fallible form of [`get_or_init_async`](Self::get_or_init_async).
    ///
    /// On `Err`, the cell stays empty, this caller gets the error, and one
    /// waiting caller runs its own initialiser.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let cell = toctou::Singleton::new();
    /// block_on(async {
    ///     let failed = cell.get_or_try_init_async(|| async { Err("down") }).await;
    ///     assert_eq!(failed, Err("down"));
    ///     let ok = cell.get_or_try_init_async(|| async { Ok::<_, &str>(5) }).await;
    ///     assert_eq!(ok, Ok(&5));
    /// });
    /// ```
    pub async fn get_or_try_init_async<F, Fut, E>(&self, f: F) -> Result<&T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        loop {
            match self.state.once.try_begin() {
                // SAFETY: `try_begin` observed READY with Acquire.
                Begin::Ready => return Ok(unsafe { self.get_unchecked() }),
                Begin::Owner(guard) => {
                    let value = reentry::poll_marked(self.addr(), f)
                        // Cancelled here, or `Err` below: `guard` drops, back to EMPTY.
                        .await?;
                    // SAFETY: we own the RUNNING claim.
                    return Ok(unsafe { self.publish(guard, value) });
                }
                Begin::Running => {
                    self.assert_not_reentrant("Singleton");
                    self.state.once.wait_async().await;
                }
            }
        }
    }

    /// Initialises the cell with `value` if it is empty.
    ///
    /// Returns `Err(value)` if the cell was already initialised. If another
    /// initialiser is running, this waits for it (as `OnceLock::set` does) and
    /// then returns `Err(value)` if it succeeded.
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// assert_eq!(cell.set(1), Ok(()));
    /// assert_eq!(cell.set(2), Err(2));
    /// ```
    pub fn set(&self, value: T) -> Result<(), T> {
        let mut value = Some(value);
        self.get_or_init(|| {
            value
                .take()
                .expect("the initialiser runs at most once per call")
        });
        match value {
            None => Ok(()),
            Some(value) => Err(value),
        }
    }

    /// Mutable access to the value, if initialised. `&mut self` proves that no
    /// other thread can observe the cell, so nothing is synchronised.
    ///
    /// ```
    /// let mut cell = toctou::Singleton::new();
    /// cell.set(String::from("a")).unwrap();
    /// cell.get_mut().unwrap().push('b');
    /// assert_eq!(cell.get().map(String::as_str), Some("ab"));
    /// ```
    pub fn get_mut(&mut self) -> Option<&mut T> {
        let state = &mut *self.state;
        if state.once.is_ready_mut() {
            // SAFETY: READY means the slot was written and published, and
            // `&mut self` excludes every other access.
            Some(unsafe { state.value.get_mut().assume_init_mut() })
        } else {
            None
        }
    }

    /// Mutable access to the value, initialising it with `f` first if the
    /// cell is empty. `&mut self` excludes every other access, so nothing is
    /// synchronised and nobody can wait. A panic in `f` leaves the cell empty.
    fn get_mut_or_init(&mut self, f: impl FnOnce() -> T) -> &mut T {
        let state = &mut *self.state;
        if !state.once.is_ready_mut() {
            let value = f();
            state.value.get_mut().write(value);
            state.once.set_ready_mut();
        }
        // SAFETY: READY, either from before or set just above after the write;
        // `&mut self` excludes every other access.
        unsafe { state.value.get_mut().assume_init_mut() }
    }

    /// Takes the value out, leaving the cell empty and reusable.
    ///
    /// ```
    /// let mut cell = toctou::Singleton::new();
    /// cell.set(3).unwrap();
    /// assert_eq!(cell.take(), Some(3));
    /// assert_eq!(cell.get(), None);
    /// ```
    pub fn take(&mut self) -> Option<T> {
        let state = &mut *self.state;
        if state.once.is_ready_mut() {
            state.once.reset_mut();
            // SAFETY: the slot was initialised (READY), and the state is now
            // EMPTY, so nothing will read or drop the old value again.
            Some(unsafe { state.value.get_mut().assume_init_read() })
        } else {
            None
        }
    }

    /// Consumes the cell and returns its value, if any.
    ///
    /// ```
    /// let cell = toctou::Singleton::new();
    /// cell.set("x").unwrap();
    /// assert_eq!(cell.into_inner(), Some("x"));
    /// ```
    pub fn into_inner(mut self) -> Option<T> {
        self.take()
    }

    /// Writes `value` and publishes it.
    ///
    /// # Safety
    ///
    /// `guard` must be this cell's RUNNING claim (from `self.state.once.try_begin`).
    unsafe fn publish(&self, guard: crate::once::InitGuard<'_>, value: T) -> &T {
        // SAFETY: the RUNNING claim makes us the only thread that touches the
        // slot; readers wait for READY, which `complete` publishes after this
        // write (Release).
        self.state
            .value
            .with_mut(|slot| unsafe { (*slot).write(value) });
        guard.complete();
        // SAFETY: we published READY ourselves, after the write above.
        unsafe { self.get_unchecked() }
    }

    /// # Safety
    ///
    /// The caller must have observed READY with Acquire ordering (or hold
    /// `&mut self` on a READY cell).
    #[inline]
    unsafe fn get_unchecked(&self) -> &T {
        // SAFETY: READY is only stored (Release, in `InitGuard::complete`)
        // after the slot is written, and the caller's Acquire load saw it.
        // Nothing writes the slot again while shared references exist: only
        // `take`/`get_mut`/drop do, and they need `&mut self`.
        self.state
            .value
            .with(|slot| unsafe { (*slot).assume_init_ref() })
    }

    /// The identity of this cell for the reentrancy check.
    fn addr(&self) -> usize {
        self as *const Self as usize
    }

    /// Called when the cell is busy: if the busy initialiser is our own
    /// thread's, waiting would deadlock, so panic with a clear message.
    #[cold]
    #[track_caller]
    fn assert_not_reentrant(&self, kind: &str) {
        if reentry::is_initialising(self.addr()) {
            panic!(
                "reentrant initialisation of toctou::{kind}<{}> declared at {}: \
                 its initialiser called back into the same cell on the same thread, \
                 which would deadlock",
                type_name::<T>(),
                self.declared_at,
            );
        }
    }
}

impl<T> Default for Singleton<T> {
    #[track_caller]
    fn default() -> Self {
        Self::new()
    }
}

impl<T> From<T> for Singleton<T> {
    /// A cell that is already initialised with `value`.
    #[track_caller]
    fn from(value: T) -> Self {
        let cell = Self::new();
        if cell.set(value).is_err() {
            unreachable!("a new cell is empty");
        }
        cell
    }
}

impl<T: Clone> Clone for Singleton<T> {
    /// A new cell holding a clone of the value, if any. Never waits.
    fn clone(&self) -> Self {
        let cell = Self::declared_at(self.declared_at);
        if let Some(value) = self.get() {
            let _ = cell.set(value.clone());
        }
        cell
    }
}

impl<T: PartialEq> PartialEq for Singleton<T> {
    /// Compares the values (`None` when empty), like `OnceLock`.
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl<T: Eq> Eq for Singleton<T> {}

impl<T: fmt::Debug> Singleton<T> {
    /// `name(value)`, `name(<initializing>)` or `name(<uninit>)`; never blocks.
    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut t = f.debug_tuple(name);
        match self.get() {
            Some(value) => t.field(value),
            None if self.state.once.is_running() => t.field(&format_args!("<initializing>")),
            None => t.field(&format_args!("<uninit>")),
        };
        t.finish()
    }
}

impl<T: fmt::Debug> fmt::Debug for Singleton<T> {
    /// Never blocks: prints the value, `<initializing>` or `<uninit>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_as("Singleton", f)
    }
}

/// A value initialised on first access, from a function stored with it:
/// `static CONFIG: Lazy<Config> = Lazy::new(load_config);`.
///
/// Like [`std::sync::LazyLock`] and `once_cell::sync::Lazy`, with one
/// difference: `F` is `Fn`, not `FnOnce`, so **a panic in `F` leaves the
/// `Lazy` retryable**. The panic propagates to the caller that ran `F`, and
/// the next access (or a waiting thread) calls `F` again. `LazyLock` poisons
/// instead: every later access panics.
///
/// All the [`Singleton`] semantics apply: one successful init, waiters park,
/// and reentrant access from inside `F`, on the thread that runs it, panics
/// instead of deadlocking (access through another thread that `F` waits for
/// is not detected and deadlocks). The size is a `Singleton<T>`'s plus `F`'s
/// (48 bytes for `Lazy<u64>` on 64-bit Linux; see
/// [`Singleton`'s size](Singleton#size)).
///
/// With exclusive access (`&mut`), [`get_mut`](Self::get_mut),
/// [`force_mut`](Self::force_mut) and `DerefMut` reach the value without any
/// synchronisation, like `LazyLock`'s.
///
/// ```
/// use std::collections::HashMap;
/// use toctou::Lazy;
///
/// static PORTS: Lazy<HashMap<&str, u16>> = Lazy::new(|| HashMap::from([("phi-4", 10507)]));
///
/// assert_eq!(PORTS["phi-4"], 10507);
/// ```
#[repr(C)] // the cell, and so the value, first: see `Singleton`.
pub struct Lazy<T, F = fn() -> T> {
    cell: Singleton<T>,
    init: F,
}

impl<T, F: Fn() -> T> Lazy<T, F> {
    /// Creates a `Lazy` that initialises itself with `f` on first access.
    /// `const`, so it works in a `static` (under `--cfg toctou_loom` too).
    ///
    /// ```
    /// static GREETING: toctou::Lazy<String> = toctou::Lazy::new(|| "hello".to_uppercase());
    /// assert_eq!(*GREETING, "HELLO");
    /// ```
    #[must_use]
    #[track_caller]
    pub const fn new(f: F) -> Self {
        Self {
            cell: Singleton::new(),
            init: f,
        }
    }

    /// Forces initialisation and returns the value. Equivalent to `&*this`.
    ///
    /// # Panics
    ///
    /// Propagates a panic of `F` (the `Lazy` stays retryable), and panics on
    /// reentrant access from inside `F` on the thread that runs it.
    ///
    /// ```
    /// let lazy = toctou::Lazy::new(|| 2 + 2);
    /// assert_eq!(*toctou::Lazy::force(&lazy), 4);
    /// ```
    #[inline]
    pub fn force(this: &Self) -> &T {
        this.cell.get_or_init_as("Lazy", || (this.init)())
    }

    /// Forces initialisation through exclusive access and returns a mutable
    /// reference to the value. Like `LazyLock::force_mut`; also what
    /// `DerefMut` (`*lazy = ...`) does.
    ///
    /// `&mut` proves that no other thread can reach the `Lazy`, so nothing is
    /// synchronised and nothing waits.
    ///
    /// # Panics
    ///
    /// Propagates a panic of `F`. The `Lazy` stays uninitialised and
    /// retryable (`LazyLock` is poisoned instead).
    ///
    /// ```
    /// use toctou::Lazy;
    ///
    /// let mut lazy = Lazy::new(|| vec![1, 2]);
    /// Lazy::force_mut(&mut lazy).push(3);
    /// lazy.push(4); // `DerefMut` forces too
    /// assert_eq!(*lazy, [1, 2, 3, 4]);
    /// ```
    pub fn force_mut(this: &mut Self) -> &mut T {
        let Lazy { cell, init } = this;
        cell.get_mut_or_init(&*init)
    }
}

impl<T, F> Lazy<T, F> {
    /// Returns the value if already initialised. Never initialises or waits.
    ///
    /// ```
    /// let lazy = toctou::Lazy::new(|| 1);
    /// assert_eq!(toctou::Lazy::get(&lazy), None);
    /// let _ = *lazy;
    /// assert_eq!(toctou::Lazy::get(&lazy), Some(&1));
    /// ```
    #[inline]
    pub fn get(this: &Self) -> Option<&T> {
        this.cell.get()
    }

    /// Mutable access to the value if already initialised. Never initialises.
    /// Like `LazyLock::get_mut`: `&mut` proves exclusive access, so nothing
    /// is synchronised.
    ///
    /// ```
    /// use toctou::Lazy;
    ///
    /// let mut lazy = Lazy::new(|| 1);
    /// assert_eq!(Lazy::get_mut(&mut lazy), None, "get_mut does not force");
    /// let _ = *lazy;
    /// *Lazy::get_mut(&mut lazy).unwrap() += 1;
    /// assert_eq!(*lazy, 2);
    /// ```
    #[inline]
    pub fn get_mut(this: &mut Self) -> Option<&mut T> {
        this.cell.get_mut()
    }

    /// Consumes the `Lazy`: `Ok(value)` if it was initialised, else
    /// `Err(f)`, like `LazyLock::into_inner`.
    ///
    /// ```
    /// let lazy = toctou::Lazy::new(|| 1);
    /// assert!(toctou::Lazy::into_inner(lazy).is_err());
    /// ```
    pub fn into_inner(this: Self) -> Result<T, F> {
        let Lazy { cell, init } = this;
        cell.into_inner().ok_or(init)
    }
}

impl<T, F: Fn() -> T> Deref for Lazy<T, F> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        Lazy::force(self)
    }
}

impl<T, F: Fn() -> T> DerefMut for Lazy<T, F> {
    /// Forces initialisation through exclusive access: [`Lazy::force_mut`].
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        Lazy::force_mut(self)
    }
}

impl<T: Default> Default for Lazy<T> {
    /// A `Lazy` that initialises to `T::default()`.
    #[track_caller]
    fn default() -> Self {
        Lazy::new(T::default)
    }
}

impl<T: fmt::Debug, F> fmt::Debug for Lazy<T, F> {
    /// Never blocks and never forces initialisation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cell.fmt_as("Lazy", f)
    }
}
