//! The sync layer: the only module that names `std`, `parking_lot` or `loom`
//! primitives.
//!
//! Every atomic, lock, park/unpark and thread-local that a primitive uses comes
//! from here. In normal builds it maps to `std`, and the keyed locks' shard
//! lock ([`ParkingRwLock`]) to `parking_lot`. Under
//! `RUSTFLAGS="--cfg toctou_loom"` it maps to [`loom`](https://docs.rs/loom), so
//! that the loom models in `loom-tests/` (and a downstream user's own models)
//! explore every interleaving of our real protocol, not a copy of it.
//!
//! The cfg is namespaced (`toctou_loom`, not `loom`), as crossbeam does, so a
//! user's `--cfg loom` does not switch every crate in their dependency tree.
//!
//! The API surface is the intersection of the two back-ends:
//! - [`UnsafeCell`] exposes loom's closure-based `with`/`with_mut`, so loom can
//!   check every access to the guarded data for causality.
//! - [`Mutex`] and [`RwLock`] ignore poisoning: none of our critical sections
//!   can leave the protected data inconsistent, so a poisoned flag carries no
//!   information.
//! - Constructors are `const` only in std builds (loom's are not); use
//!   [`loom_const_fn!`](crate::sync::loom_const_fn) to declare a function that
//!   is `const` exactly when the back-end allows it.
//! - A public cell that must be `const`-constructible in both builds (so that
//!   a downstream crate's `static` compiles under `--cfg toctou_loom` too)
//!   keeps its loom-backed fields in a [`PerExecution`], built with
//!   [`per_execution!`](crate::sync::per_execution).

use std::ops::{Deref, DerefMut};

#[cfg(not(toctou_loom))]
mod imp {
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering, fence,
    };
    pub(crate) use std::sync::{Mutex as RawMutex, MutexGuard};
    pub(crate) use std::sync::{RwLock as RawRwLock, RwLockReadGuard, RwLockWriteGuard};
    pub(crate) use std::thread::{Thread, current, park};
    pub(crate) use std::thread_local;
}

#[cfg(toctou_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering, fence,
    };
    pub(crate) use loom::sync::{Mutex as RawMutex, MutexGuard};
    pub(crate) use loom::sync::{RwLock as RawRwLock, RwLockReadGuard, RwLockWriteGuard};
    pub(crate) use loom::thread::{Thread, current, park};
    pub(crate) use loom::thread_local;
}

pub(crate) use imp::{
    AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, MutexGuard, Ordering, RwLockReadGuard,
    RwLockWriteGuard, Thread, current, fence, park, thread_local,
};

/// Declares a function that is `const fn` in std builds and a plain `fn`
/// under `toctou_loom`, where loom's constructors are not `const`.
macro_rules! loom_const_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident $($rest:tt)*) => {
        #[cfg(not(toctou_loom))]
        $(#[$attr])* $vis const fn $name $($rest)*
        #[cfg(toctou_loom)]
        $(#[$attr])* $vis fn $name $($rest)*
    };
}
pub(crate) use loom_const_fn;

/// Declares a thread-local with a `const` initialiser in std builds (no lazy
/// initialisation check on access) and a plain one under `toctou_loom`, whose
/// `thread_local!` does not accept the `const { .. }` form.
macro_rules! const_thread_local {
    ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(toctou_loom))]
        ::std::thread_local! {
            $(#[$attr])* static $name: $t = const { $init };
        }
        #[cfg(toctou_loom)]
        ::loom::thread_local! {
            $(#[$attr])* static $name: $t = $init;
        }
    };
}
pub(crate) use const_thread_local;

/// Declares `fn $name() -> &'static $t`, a process-wide value. In std
/// builds it is a plain `static` with a `const` initialiser. Under
/// `toctou_loom` it is created afresh in every execution of a model (loom's
/// primitives are not `const`, and state must not leak from one execution
/// into the next) and leaked, so that a reference to it stays valid for the
/// rest of the execution: loom drops its lazy statics *before* the main
/// thread's thread-locals, and a joined thread's thread-local destructors
/// may still be running then.
macro_rules! global_ref {
    ($(#[$attr:meta])* $vis:vis fn $name:ident() -> &'static $t:ty = $init:expr;) => {
        #[cfg(not(toctou_loom))]
        $(#[$attr])*
        $vis fn $name() -> &'static $t {
            static VALUE: $t = $init;
            &VALUE
        }
        #[cfg(toctou_loom)]
        $(#[$attr])*
        $vis fn $name() -> &'static $t {
            ::loom::lazy_static! {
                static ref VALUE: &'static $t = Box::leak(Box::new($init));
            }
            *VALUE
        }
    };
}
pub(crate) use global_ref;

/// The loom-backed part of a cell that must be `const`-constructible in both
/// builds, so that a `static` of it compiles under `--cfg toctou_loom` too.
///
/// In std builds it is the value itself (`repr(transparent)`, `Deref` is a
/// field access): nothing changes and nothing gets slower.
///
/// Under `toctou_loom` loom's constructors are not `const`, so it holds the
/// constructor instead, and each loom *execution* gets its own value, built on
/// first use in that execution, as `loom::lazy_static!` builds its statics.
/// That is what a `static` cell needs (fresh state in every execution, none
/// leaking from one into the next), and a cell created inside a model behaves
/// as before, except as follows:
///
/// - **Each access synchronises with the first one.** loom checks that every
///   access to one of its objects happens after the object's creation, which
///   is the first use of the cell in the execution, possibly on another loom
///   thread. So every access first reads a `loom::lazy_static` of the cell's
///   own (not a scheduling point), which, exactly as `loom::lazy_static!`
///   does, makes the first access of the execution happen before it. A model
///   can therefore miss a race whose only witness is something the first
///   user of the cell did before that first use.
/// - **The values of finished executions are leaked** (test-only memory: one
///   value per execution that used the cell, and a few bytes per cell). A
///   cell that is dropped inside the execution that uses it (a cell created in
///   the model) drops that execution's value with it, so `Drop`-based
///   behaviour is unchanged; a `static`'s values are never dropped, and a
///   value holding a `loom::sync::Arc` would then be reported as leaked.
/// - **Not during thread-local teardown**: loom drops its lazy statics before
///   the model's main thread's thread-locals, so an access from a destructor
///   that runs then panics, as a `loom::lazy_static!` access does.
///
/// Values are kept per OS thread (several tests run their models in parallel,
/// each model on one OS thread) and per execution, under a `std` mutex that
/// is never held across a loom operation: creating loom objects and reading a
/// lazy static are not scheduling points, so no other loom thread of the same
/// model can run while it is held.
#[cfg(not(toctou_loom))]
#[repr(transparent)]
pub(crate) struct PerExecution<T>(T);

#[cfg(not(toctou_loom))]
impl<T> PerExecution<T> {
    /// Wraps `value`. Use [`per_execution!`](crate::sync::per_execution),
    /// which passes the constructor itself under loom.
    #[inline(always)]
    pub(crate) const fn new(value: T) -> Self {
        Self(value)
    }
}

#[cfg(not(toctou_loom))]
impl<T> Deref for PerExecution<T> {
    type Target = T;

    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(not(toctou_loom))]
impl<T> DerefMut for PerExecution<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// `PerExecution::new($init())` in std builds, `PerExecution::new($init)`
/// (the constructor, run once per loom execution) under `toctou_loom`. Usable
/// in a `const fn` in both, as long as `$init` is `const` in std builds
/// (declare it with [`loom_const_fn!`](crate::sync::loom_const_fn)).
macro_rules! per_execution {
    ($init:path) => {{
        #[cfg(not(toctou_loom))]
        {
            $crate::sync::PerExecution::new($init())
        }
        #[cfg(toctou_loom)]
        {
            $crate::sync::PerExecution::new($init)
        }
    }};
}
pub(crate) use per_execution;

#[cfg(toctou_loom)]
pub(crate) use loom_per_execution::PerExecution;

#[cfg(toctou_loom)]
mod loom_per_execution {
    use std::ops::{Deref, DerefMut};
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
    use std::thread::ThreadId;

    use loom::lazy_static::Lazy;

    /// See the std version's docs.
    pub(crate) struct PerExecution<T> {
        /// Builds the value of an execution.
        init: fn() -> T,
        slots: Mutex<Slots<T>>,
    }

    struct Slots<T> {
        /// This cell's own lazy static, allocated on first use and leaked: a
        /// lazy static is keyed by its address, which must never be reused
        /// by another cell (a cell's may be, once it is dropped).
        lazy: Option<&'static Lazy<Token>>,
        /// One value per OS thread that runs models using this cell.
        values: Vec<Slot<T>>,
    }

    struct Slot<T> {
        thread: ThreadId,
        /// The execution that built `value`: the `alive` flag of its token.
        execution: Arc<AtomicBool>,
        /// From `Box::leak`; owned by this slot while `execution` runs.
        value: NonNull<T>,
    }

    /// The value of [`Slots::lazy`] in one execution: a fresh one in each
    /// (loom re-creates its lazy statics), so it names the execution, and
    /// loom drops it when the execution ends, which clears `alive`.
    struct Token {
        alive: Arc<AtomicBool>,
    }

    impl Drop for Token {
        fn drop(&mut self) {
            // Relaxed: read on this OS thread only (`PerExecution::drop`).
            self.alive.store(false, Ordering::Relaxed);
        }
    }

    fn new_token() -> Token {
        Token {
            alive: Arc::new(AtomicBool::new(true)),
        }
    }

    // SAFETY: `&PerExecution<T>` hands out `&T` to the loom threads of a
    // model (so `T: Sync`), and a value may be built on one loom thread and
    // dropped on another (so `T: Send`). OS threads never share a value: each
    // has its own slot.
    unsafe impl<T: Send + Sync> Sync for PerExecution<T> {}
    // SAFETY: moving the cell moves ownership of its values (`T: Send`).
    unsafe impl<T: Send> Send for PerExecution<T> {}

    impl<T> PerExecution<T> {
        /// A cell whose value is built by `init` on first use in each
        /// execution.
        pub(crate) const fn new(init: fn() -> T) -> Self {
            Self {
                init,
                slots: Mutex::new(Slots {
                    lazy: None,
                    values: Vec::new(),
                }),
            }
        }

        fn slots(&self) -> MutexGuard<'_, Slots<T>> {
            self.slots.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// The current execution's value, built now if this is its first use.
        fn value(&self) -> NonNull<T> {
            let lazy: &'static Lazy<Token> = self.slots().lazy.get_or_insert_with(|| {
                Box::leak(Box::new(Lazy {
                    init: new_token,
                    _p: std::marker::PhantomData,
                }))
            });
            // Not a scheduling point. Synchronises with the first `get` of
            // this execution (see the type's docs), which built the value.
            let execution = &lazy.get().alive;
            let thread = std::thread::current().id();
            if let Some(slot) = self.slots().values.iter().find(|s| s.thread == thread) {
                if Arc::ptr_eq(&slot.execution, execution) {
                    return slot.value;
                }
            }
            // The first use in this execution (on this OS thread; a model
            // runs all its loom threads on one). Building creates loom
            // objects, which is not a scheduling point either, so nobody else
            // in this model can get here meanwhile.
            let value = NonNull::from(Box::leak(Box::new((self.init)())));
            let slot = Slot {
                thread,
                execution: Arc::clone(execution),
                value,
            };
            let mut slots = self.slots();
            match slots.values.iter_mut().find(|s| s.thread == thread) {
                // The replaced value belongs to a finished execution: leaked,
                // as dropping its loom objects outside it would panic.
                Some(old) => *old = slot,
                None => slots.values.push(slot),
            }
            value
        }
    }

    impl<T> Deref for PerExecution<T> {
        type Target = T;

        fn deref(&self) -> &T {
            // SAFETY: the value is dropped only by `drop(&mut self)`, or
            // never: it outlives this borrow of `self`. Only `deref_mut`
            // hands out `&mut`, and it needs `&mut self`.
            unsafe { self.value().as_ref() }
        }
    }

    impl<T> DerefMut for PerExecution<T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`; `&mut self` excludes every other
            // reference to the value.
            unsafe { self.value().as_mut() }
        }
    }

    impl<T> Drop for PerExecution<T> {
        fn drop(&mut self) {
            let thread = std::thread::current().id();
            let slots = self.slots.get_mut().unwrap_or_else(PoisonError::into_inner);
            for slot in slots.values.drain(..) {
                // Relaxed: written on this OS thread (by `Token::drop`).
                if slot.thread == thread && slot.execution.load(Ordering::Relaxed) {
                    // SAFETY: from `Box::leak` in `value`, owned by the slot,
                    // which is gone now; the execution that built it is the
                    // one running (its token is alive, and an OS thread runs
                    // one execution at a time), so its loom objects are too.
                    drop(unsafe { Box::from_raw(slot.value.as_ptr()) });
                }
                // Any other value belongs to a finished execution, or to
                // another OS thread's model: leaked (see the type's docs).
            }
        }
    }
}

/// Asymmetric fences: a [`light`](barrier::light) one that a hot read path
/// pays on every read, and a [`heavy`](barrier::heavy) one that a rare writer
/// pays, which together order memory as if *both* sides had executed a
/// `SeqCst` fence at the instant of the heavy one.
///
/// The hand-shake they serve is Dekker's: a reader stores "I am using X",
/// fences, and loads "X is being taken back"; a writer stores "X is being
/// taken back", fences, and loads "is anyone using X?". With a fence on both
/// sides at least one of them sees the other's store. The reader's fence is
/// the expensive one to pay on every read, so on Linux it is only a compiler
/// fence, and the writer makes it a real one after the fact:
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` interrupts every CPU that
/// is running a thread of this process and executes a full memory barrier
/// there (a thread that is not running passed one when it was switched out).
/// Linux's RCU, folly's hazard pointers and seize use the same scheme.
///
/// - Linux (not under miri): the process registers for the expedited command
///   the first time [`prepare`](barrier::prepare) runs. If the kernel lacks
///   it (before 4.14, or a sandbox that filters the syscall), both sides fall
///   back to `SeqCst` fences for the life of the process.
/// - Other platforms, and miri: `SeqCst` fences on both sides: correct, at
///   the price of a hardware fence on the read path. This is the fallback
///   code path, and the one miri checks.
/// - Under `toctou_loom` both are `SeqCst` fences: loom then explores exactly
///   the semantics above, a full fence on both sides at the barrier's instant.
pub(crate) mod barrier {
    #[cfg(all(target_os = "linux", not(miri), not(toctou_loom)))]
    pub(crate) use self::membarrier::{heavy, light, prepare};

    #[cfg(not(all(target_os = "linux", not(miri), not(toctou_loom))))]
    pub(crate) use self::fences::{heavy, light, prepare};

    #[cfg(not(all(target_os = "linux", not(miri), not(toctou_loom))))]
    mod fences {
        #[cfg(toctou_loom)]
        use loom::sync::atomic::{Ordering, fence};
        #[cfg(not(toctou_loom))]
        use std::sync::atomic::{Ordering, fence};

        /// Nothing to set up.
        #[inline]
        pub(crate) fn prepare() {}

        /// The read side: a full fence.
        #[inline]
        pub(crate) fn light() {
            fence(Ordering::SeqCst);
        }

        /// The write side: a full fence.
        #[inline]
        pub(crate) fn heavy() {
            fence(Ordering::SeqCst);
        }
    }

    #[cfg(all(target_os = "linux", not(miri), not(toctou_loom)))]
    mod membarrier {
        use std::sync::atomic::{AtomicU8, Ordering, compiler_fence, fence};

        /// Not decided yet: [`light`] fences fully.
        const UNDECIDED: u8 = 0;
        /// No expedited membarrier: both sides fence fully.
        const FENCES: u8 = 1;
        /// Registered for the expedited membarrier.
        const MEMBARRIER: u8 = 2;

        /// Decided once per process, by the first [`strategy`] call; it only
        /// ever moves away from `UNDECIDED`, by one compare-exchange.
        static STRATEGY: AtomicU8 = AtomicU8::new(UNDECIDED);

        // From the kernel's uapi `linux/membarrier.h`.
        const CMD_QUERY: libc::c_int = 0;
        const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
        const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

        fn membarrier(cmd: libc::c_int) -> libc::c_long {
            // SAFETY: membarrier(2) takes (cmd, flags, cpu_id) and touches no
            // memory of ours; flags 0 and cpu_id 0 are valid for every
            // command used here.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    cmd,
                    0 as libc::c_uint,
                    0 as libc::c_int,
                )
            }
        }

        /// The process's strategy, deciding it on first use.
        fn strategy() -> u8 {
            // Relaxed: a value other than UNDECIDED is final. A stale
            // UNDECIDED only sends us to `decide`, whose compare-exchange
            // reads the latest value.
            match STRATEGY.load(Ordering::Relaxed) {
                UNDECIDED => decide(),
                decided => decided,
            }
        }

        #[cold]
        fn decide() -> u8 {
            let supported = membarrier(CMD_QUERY);
            let mine = if supported >= 0
                && supported & libc::c_long::from(CMD_PRIVATE_EXPEDITED) != 0
                && membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
            {
                MEMBARRIER
            } else {
                FENCES
            };
            // Relaxed: the registration above is a syscall, complete before
            // this store; a reader that sees MEMBARRIER only needs the
            // kernel to know this process is registered, which it does.
            match STRATEGY.compare_exchange(UNDECIDED, mine, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => mine,
                Err(first) => first,
            }
        }

        /// Decides the strategy (a syscall or two, once per process), so that
        /// [`light`] can be a compiler fence from now on. Call it before the
        /// first read that will use [`light`] on a hot path.
        #[inline]
        pub(crate) fn prepare() {
            strategy();
        }

        /// The read side: a compiler fence once the process is registered
        /// for the expedited membarrier, a full fence otherwise.
        #[inline]
        pub(crate) fn light() {
            // Relaxed: see `strategy`. If this thread sees MEMBARRIER, every
            // `heavy` in the process sees it too (the value is final), so the
            // compiler fence here is made a full one by their membarrier.
            if STRATEGY.load(Ordering::Relaxed) == MEMBARRIER {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }

        /// The write side: an expedited membarrier, or a full fence where
        /// the readers fence fully.
        pub(crate) fn heavy() {
            if strategy() == MEMBARRIER {
                if membarrier(CMD_PRIVATE_EXPEDITED) != 0 {
                    // Registered, so the kernel cannot refuse it; if it did,
                    // readers that trusted their compiler fences could use
                    // freed memory. Nothing safe is left to do. (A seccomp
                    // filter is per thread: one installed later, on the
                    // writing thread only, that denies membarrier, gets here.
                    // Such a filter must allow it.)
                    std::process::abort();
                }
            } else {
                fence(Ordering::SeqCst);
            }
        }
    }
}

/// A process-wide counter: each [`next`](Self::next) returns a value no other
/// call returns (until it wraps after 2^64 calls).
///
/// Deliberately a plain `std` atomic in loom builds too: uniqueness needs no
/// ordering with anything else, so there is nothing for loom to explore, and
/// values must stay unique across loom's repeated executions in one process.
pub(crate) struct Counter(std::sync::atomic::AtomicU64);

impl Counter {
    /// A counter whose first value is `first`.
    pub(crate) const fn starting_at(first: u64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(first))
    }

    /// The next value.
    pub(crate) fn next(&self) -> u64 {
        // Relaxed: only uniqueness matters (see the type's docs).
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// A process-wide unique, non-zero id.
pub(crate) fn unique_id() -> u64 {
    static NEXT: Counter = Counter::starting_at(1);
    NEXT.next()
}

/// A point in time after which a timed wait gives up.
///
/// Under loom there is no clock: each timed wait yields, so that other
/// threads can run (and perhaps grant what is waited for), and the third
/// counts as timed out. That makes loom explore the race between the
/// timeout and the grant, also after a waiter has lost the key to newcomers
/// twice (when keyed locks hand it over directly, see [`WaitStart`]).
pub(crate) struct Deadline {
    #[cfg(not(toctou_loom))]
    at: Option<std::time::Instant>,
    #[cfg(toctou_loom)]
    parks: std::cell::Cell<u32>,
}

impl Deadline {
    /// `timeout` from now; a timeout too large to represent never expires.
    pub(crate) fn after(timeout: std::time::Duration) -> Self {
        #[cfg(not(toctou_loom))]
        {
            Self {
                at: std::time::Instant::now().checked_add(timeout),
            }
        }
        #[cfg(toctou_loom)]
        {
            let _ = timeout;
            Self {
                parks: std::cell::Cell::new(0),
            }
        }
    }

    /// Whether the deadline has passed. Under loom there is no clock: a
    /// timed wait expires only through its parks ([`park`](Self::park)).
    pub(crate) fn passed(&self) -> bool {
        #[cfg(not(toctou_loom))]
        {
            self.at.is_some_and(|at| std::time::Instant::now() >= at)
        }
        #[cfg(toctou_loom)]
        {
            false
        }
    }

    /// Parks the current thread until it is unparked or the deadline passes,
    /// and says whether the deadline has passed. Spurious returns with
    /// `false` are possible; callers re-check their condition.
    pub(crate) fn park(&self) -> bool {
        #[cfg(not(toctou_loom))]
        {
            match self.at {
                None => {
                    std::thread::park();
                    false
                }
                Some(at) => {
                    let now = std::time::Instant::now();
                    if now >= at {
                        return true;
                    }
                    std::thread::park_timeout(at - now);
                    std::time::Instant::now() >= at
                }
            }
        }
        #[cfg(toctou_loom)]
        {
            loom::thread::yield_now();
            self.parks.set(self.parks.get() + 1);
            self.parks.get() >= LOOM_TIMED_PARKS.with(std::cell::Cell::get)
        }
    }
}

/// When a waiter started waiting, for eventual fairness: it is owed a
/// direct handoff once it has lost a race for a woken-up lock and has been
/// waiting for [`WaitStart::FAIR_AFTER`] (as parking_lot's fair unlocks,
/// which come every 0.5 ms).
///
/// Under loom there is no clock: a waiter is owed the handoff after losing
/// twice, so that the models reach the handoff path in a few steps.
#[derive(Clone, Copy)]
pub(crate) struct WaitStart {
    #[cfg(not(toctou_loom))]
    at: std::time::Instant,
}

impl WaitStart {
    /// How long a waiter that lost a race waits before it is owed the key.
    #[cfg(not(toctou_loom))]
    pub(crate) const FAIR_AFTER: std::time::Duration = std::time::Duration::from_micros(500);

    pub(crate) fn now() -> Self {
        Self {
            #[cfg(not(toctou_loom))]
            at: std::time::Instant::now(),
        }
    }

    /// Whether a waiter that started now-ish and has lost `lost` races is
    /// owed a direct handoff.
    pub(crate) fn owed_handoff(&self, lost: u8) -> bool {
        #[cfg(not(toctou_loom))]
        {
            lost >= 1 && self.at.elapsed() >= Self::FAIR_AFTER
        }
        #[cfg(toctou_loom)]
        {
            lost >= 2
        }
    }
}

/// Bounded spinning before a thread queues and parks, like parking_lot's
/// `SpinWait`: ten [`spin`](Self::spin)s, the first `pause_rounds` of which
/// back off for 4, 8, 16, ... pause instructions and the rest yield the
/// thread; then the budget is spent.
///
/// The keyed maps use [`PAUSE_ROUNDS`](Self::PAUSE_ROUNDS) (3: 28 pauses,
/// then seven yields). `FileLocks`' in-process map uses
/// [`LONG_PAUSE_ROUNDS`](Self::LONG_PAUSE_ROUNDS) (6: about 250 pauses,
/// then four yields): its holder keeps the key a little longer, a yield is
/// a system call, and a hot `FileLocks` key measured 30% faster in the
/// deleting mode with the longer spin. The keyed maps keep the short one:
/// on a 16-core Xeon, 8 threads on one `KeyedLocks` key took 1.7× lockmap's
/// time with the long spin against 1.3× with the short one.
///
/// Under loom the budget is `loom_spin_rounds` tries (0 unless a model
/// sets it): a spin loop multiplies the interleavings, so only the models
/// of the spinning state itself spin.
pub(crate) struct SpinWait {
    round: u32,
    #[cfg_attr(toctou_loom, allow(dead_code))]
    pause_rounds: u32,
    /// How many spins the budget holds: [`ROUNDS`](Self::ROUNDS), or only
    /// the pause rounds for a timed wait (see [`SpinWait::timed`]).
    #[cfg_attr(toctou_loom, allow(dead_code))]
    rounds: u32,
}

#[cfg(toctou_loom)]
std::thread_local! {
    /// The spin budget of the loom model running on this thread (loom runs
    /// a model's threads on the thread that called `loom::model`).
    static LOOM_SPIN_ROUNDS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[cfg(toctou_loom)]
std::thread_local! {
    /// After how many parks a timed wait expires in the loom models run on
    /// this thread.
    static LOOM_TIMED_PARKS: std::cell::Cell<u32> = const { std::cell::Cell::new(3) };
}

/// Under loom: after how many parks a timed wait expires, for the models run
/// on this thread from now on (default 3). Not a stable API.
#[cfg(toctou_loom)]
pub fn loom_timed_parks(parks: u32) {
    LOOM_TIMED_PARKS.with(|p| p.set(parks));
}

/// Under loom: how many tries a blocking keyed acquisition spins before it
/// queues, for the models run on this thread from now on (default 0). Not a
/// stable API.
#[cfg(toctou_loom)]
pub fn loom_spin_rounds(rounds: u32) {
    LOOM_SPIN_ROUNDS.with(|r| r.set(rounds));
}

impl SpinWait {
    const ROUNDS: u32 = 10;
    /// The keyed maps' pause rounds.
    pub(crate) const PAUSE_ROUNDS: u32 = 3;
    /// `FileLocks`' in-process map's pause rounds.
    #[cfg(target_os = "linux")]
    pub(crate) const LONG_PAUSE_ROUNDS: u32 = 6;

    /// A fresh budget whose first `pause_rounds` spins pause.
    pub(crate) fn new(pause_rounds: u32) -> Self {
        Self {
            round: 0,
            pause_rounds,
            rounds: Self::ROUNDS,
        }
    }

    /// A fresh budget for a wait with a deadline: its `pause_rounds` spins
    /// pause (a microsecond or so), and then it is spent, without yielding.
    /// A yield returns when the scheduler runs the thread again: with more
    /// busy threads than cores, after other threads' time slices, which is
    /// milliseconds past a short deadline.
    pub(crate) fn timed(pause_rounds: u32) -> Self {
        Self {
            rounds: pause_rounds,
            ..Self::new(pause_rounds)
        }
    }

    /// Whether the spin budget is spent (the caller should queue and park).
    pub(crate) fn exhausted(&self) -> bool {
        #[cfg(not(toctou_loom))]
        {
            self.round >= self.rounds
        }
        #[cfg(toctou_loom)]
        {
            self.round >= LOOM_SPIN_ROUNDS.with(std::cell::Cell::get)
        }
    }

    /// Backs off for a moment, if the budget allows.
    pub(crate) fn spin(&mut self) {
        if self.exhausted() {
            return;
        }
        #[cfg(toctou_loom)]
        {
            loom::thread::yield_now();
            self.round += 1;
            return;
        }
        #[allow(unreachable_code)]
        if self.round < self.pause_rounds {
            for _ in 0..(4u32 << self.round) {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
        self.round += 1;
    }
}

/// Busy-waits for `pauses` pause instructions (under loom: yields once).
#[cfg(target_os = "linux")]
pub(crate) fn spin_pause(pauses: u32) {
    #[cfg(not(toctou_loom))]
    for _ in 0..pauses {
        std::hint::spin_loop();
    }
    #[cfg(toctou_loom)]
    {
        let _ = pauses;
        loom::thread::yield_now();
    }
}

/// A mutex without poisoning, over `std::sync::Mutex` or `loom::sync::Mutex`.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(imp::RawMutex<T>);

impl<T> Mutex<T> {
    loom_const_fn! {
        pub(crate) fn new(value: T) -> Self {
            Self(imp::RawMutex::new(value))
        }
    }

    /// Locks the mutex, ignoring poisoning (see the module docs for why).
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A reader-writer lock without poisoning, over `std::sync::RwLock` or
/// `loom::sync::RwLock`.
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(imp::RawRwLock<T>);

impl<T> RwLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(imp::RawRwLock::new(value))
    }

    /// Locks for shared access, ignoring poisoning.
    #[inline]
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks for exclusive access, ignoring poisoning.
    #[inline]
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks for shared access if that needs no waiting.
    #[inline]
    pub(crate) fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
        match self.0.try_read() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Locks for exclusive access if that needs no waiting.
    #[inline]
    pub(crate) fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
        match self.0.try_write() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The lock a sharded table puts around each shard: [`RwLock`] (std's, for
/// read-mostly maps) or [`ParkingRwLock`] (parking_lot's, for maps that
/// write on every operation under contention).
pub(crate) trait ShardLock {
    type Data;
    type Read<'a>: Deref<Target = Self::Data>
    where
        Self: 'a;
    type Write<'a>: DerefMut<Target = Self::Data>
    where
        Self: 'a;
    fn new(data: Self::Data) -> Self;
    fn read(&self) -> Self::Read<'_>;
    fn write(&self) -> Self::Write<'_>;
    fn try_read(&self) -> Option<Self::Read<'_>>;
    fn try_write(&self) -> Option<Self::Write<'_>>;
}

impl<T> ShardLock for RwLock<T> {
    type Data = T;
    type Read<'a>
        = RwLockReadGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = RwLockWriteGuard<'a, T>
    where
        T: 'a;
    fn new(data: T) -> Self {
        RwLock::new(data)
    }
    #[inline]
    fn read(&self) -> Self::Read<'_> {
        RwLock::read(self)
    }
    #[inline]
    fn write(&self) -> Self::Write<'_> {
        RwLock::write(self)
    }
    #[inline]
    fn try_read(&self) -> Option<Self::Read<'_>> {
        RwLock::try_read(self)
    }
    #[inline]
    fn try_write(&self) -> Option<Self::Write<'_>> {
        RwLock::try_write(self)
    }
}

/// A reader-writer lock with adaptive spinning: parking_lot's in std builds,
/// loom's under `toctou_loom`.
///
/// Used by the keyed locks, whose contended acquisitions and releases (and
/// inserts and sweeps) write their shard: under contention, parking_lot's lock (spin, then park, with
/// eventual fairness) keeps the holder running where std's futex lock makes
/// threads sleep on the shard (measured: 2 threads on one hot key ran 2-3x
/// faster). std's lock stays under the read-mostly `SingletonMap`, whose hit
/// path it serves faster.
#[derive(Default)]
pub(crate) struct ParkingRwLock<T>(
    #[cfg(not(toctou_loom))] parking_lot::RwLock<T>,
    #[cfg(toctou_loom)] RwLock<T>,
);

#[cfg(not(toctou_loom))]
type ParkingRead<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
#[cfg(not(toctou_loom))]
type ParkingWrite<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;
#[cfg(toctou_loom)]
type ParkingRead<'a, T> = RwLockReadGuard<'a, T>;
#[cfg(toctou_loom)]
type ParkingWrite<'a, T> = RwLockWriteGuard<'a, T>;

impl<T> ShardLock for ParkingRwLock<T> {
    type Data = T;
    type Read<'a>
        = ParkingRead<'a, T>
    where
        T: 'a;
    type Write<'a>
        = ParkingWrite<'a, T>
    where
        T: 'a;
    fn new(data: T) -> Self {
        #[cfg(not(toctou_loom))]
        {
            Self(parking_lot::RwLock::new(data))
        }
        #[cfg(toctou_loom)]
        {
            Self(RwLock::new(data))
        }
    }
    #[inline]
    fn read(&self) -> Self::Read<'_> {
        self.0.read()
    }
    #[inline]
    fn write(&self) -> Self::Write<'_> {
        self.0.write()
    }
    #[inline]
    fn try_read(&self) -> Option<Self::Read<'_>> {
        self.0.try_read()
    }
    #[inline]
    fn try_write(&self) -> Option<Self::Write<'_>> {
        self.0.try_write()
    }
}

/// A plain value (no loom objects inside) made on first use, so that its
/// owner's constructor can be `const`: a `std::sync::OnceLock` in every
/// build. Under `toctou_loom` too, as the value takes part in no protocol
/// (a hasher's random keys): loom need not explore it, and it stays out of
/// the models' synchronisation.
pub(crate) struct OnceValue<T>(std::sync::OnceLock<T>);

impl<T> OnceValue<T> {
    /// An empty value.
    pub(crate) const fn new() -> Self {
        Self(std::sync::OnceLock::new())
    }

    /// The value, made now by `init` if this is its first use.
    #[inline]
    pub(crate) fn get(&self, init: fn() -> T) -> &T {
        self.0.get_or_init(init)
    }
}

/// A value made on first use, so that the owner's constructor can be
/// `const` (the keyed maps' shard arrays and default hasher). `init` is the
/// same function at every call for one value.
///
/// In std builds it is a `std::sync::OnceLock`: after the first use, a
/// `get` is one `Acquire` load of its state and a branch (the load pairs
/// with the `Release` that completes the initialisation, so the value's
/// contents are visible). Under `toctou_loom` it is a [`PerExecution`]: the
/// value is made at the first use in each execution of a model, so that the
/// owner's constructor stays `const` there too (a `static` map compiles under
/// the cfg, and is empty again in every execution).
#[cfg(not(toctou_loom))]
pub(crate) struct LazyInit<T>(std::sync::OnceLock<T>);

#[cfg(not(toctou_loom))]
impl<T> LazyInit<T> {
    /// An empty value, made by `init` at the first [`get`](Self::get).
    pub(crate) const fn new(init: fn() -> T) -> Self {
        let _ = init;
        Self(std::sync::OnceLock::new())
    }

    /// The value, made now by `init` if this is its first use. Concurrent
    /// first uses run `init` once; the others wait for it.
    #[inline]
    pub(crate) fn get(&self, init: fn() -> T) -> &T {
        self.0.get_or_init(init)
    }

    /// The value, if it was made.
    #[inline]
    pub(crate) fn try_get(&self) -> Option<&T> {
        self.0.get()
    }
}

#[cfg(toctou_loom)]
pub(crate) struct LazyInit<T>(PerExecution<T>);

#[cfg(toctou_loom)]
impl<T> LazyInit<T> {
    pub(crate) const fn new(init: fn() -> T) -> Self {
        Self(PerExecution::new(init))
    }

    pub(crate) fn get(&self, _: fn() -> T) -> &T {
        &self.0
    }

    pub(crate) fn try_get(&self) -> Option<&T> {
        Some(&self.0)
    }
}

/// An `UnsafeCell` with loom's checked, closure-based access API.
///
/// In std builds the closures compile to plain pointer accesses.
#[cfg(not(toctou_loom))]
#[derive(Debug, Default)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(toctou_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared pointer to the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a unique pointer to the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }

    /// Exclusive access through `&mut self`: no synchronisation is needed.
    #[inline(always)]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}

#[cfg(toctou_loom)]
pub(crate) use loom_cell::UnsafeCell;

#[cfg(toctou_loom)]
mod loom_cell {
    /// loom's `UnsafeCell`, with a `get_mut` for exclusive access.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(loom::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::cell::UnsafeCell::new(value))
        }

        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            self.0.with(f)
        }

        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            self.0.with_mut(f)
        }

        pub(crate) fn get_mut(&mut self) -> &mut T {
            // SAFETY: `&mut self` proves no other access to the contents
            // exists; loom still records this as a write access.
            self.0.with_mut(|p| unsafe { &mut *p })
        }
    }
}
