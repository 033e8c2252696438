//! The once-initialisation protocol, without the value: a state word plus the
//! shared [`WaitQueue`].
//!
//! [`Singleton`](crate::Singleton) is a thin shell around [`Once`] that adds the
//! value slot; keyed primitives can hold one `Once` per key.
//!
//! # States
//!
//! ```text
//!            try_begin (CAS)             InitGuard::complete
//!   EMPTY ─────────────────────▶ RUNNING ──────────────────────▶ READY
//!     ▲                             │
//!     └─────────────────────────────┘
//!        InitGuard dropped (error, panic, cancelled future)
//! ```
//!
//! `WAITERS` is a flag bit beside the state: set (under the queue lock) by a
//! caller that is about to park on a `RUNNING` cell, and cleared by whichever
//! transition leaves `RUNNING`, which then wakes everybody. A caller of
//! [`Once::wait_ready`] (`Singleton::wait`) also parks on an `EMPTY` cell: it
//! sets `WAITERS` there too, and the next `EMPTY → RUNNING` claim carries the
//! bit over, so the transition out of that `RUNNING` wakes it. Wake-all is what
//! makes takeover simple and cancellation-safe: every waiter re-runs the
//! `EMPTY → RUNNING` CAS, exactly one wins and runs its own initialiser, the
//! rest wait again. No "you are next" token can be lost with a cancelled waiter.
//!
//! The `EMPTY → RUNNING` compare-exchange is the check-and-claim in one atomic
//! step. It is what replaces the incidents' `if instance is None: instance = ...`.

use std::future::Future;

use std::sync::Arc;

use crate::sync::{AtomicUsize, Ordering, loom_const_fn};
use crate::wait::WaitQueue;

const EMPTY: usize = 0;
const RUNNING: usize = 1;
const READY: usize = 2;
const STATE_MASK: usize = 0b11;
const WAITERS: usize = 0b100;

/// What [`Once::try_begin`] found.
pub(crate) enum Begin<'a> {
    /// The value is published; reading it is safe.
    Ready,
    /// The caller won the claim and must initialise, then call
    /// [`InitGuard::complete`]. Dropping the guard gives the claim back.
    Owner(InitGuard<'a>),
    /// Another initialiser is running.
    Running,
}

/// The once protocol's state word and wait queue.
pub(crate) struct Once {
    state: AtomicUsize,
    waiters: WaitQueue,
}

impl Once {
    loom_const_fn! {
        pub(crate) fn new() -> Self {
            Self {
                state: AtomicUsize::new(EMPTY),
                waiters: WaitQueue::new(),
            }
        }
    }

    /// Whether the value is published. The fast path: one load and a compare.
    #[inline(always)]
    pub(crate) fn is_ready(&self) -> bool {
        // Acquire: pairs with the Release swap in `InitGuard::complete`, so a
        // caller that sees READY also sees the value written before it.
        self.state.load(Ordering::Acquire) == READY
    }

    /// Whether an initialiser is running right now (for `Debug`; racy by nature).
    pub(crate) fn is_running(&self) -> bool {
        // Relaxed: an informational snapshot that publishes nothing.
        self.state.load(Ordering::Relaxed) & STATE_MASK == RUNNING
    }

    /// Tries to claim the right to initialise: the atomic check-and-claim.
    pub(crate) fn try_begin(&self) -> Begin<'_> {
        // Success ordering Acquire: pairs with the Release swap in
        // `InitGuard::drop` of a previous, failed attempt, so the new
        // initialiser sees everything the failed one did before giving up.
        // Failure ordering Acquire: a READY read must see the value (pairs with
        // the Release swap in `complete`, as in `is_ready`).
        match self
            .state
            .compare_exchange(EMPTY, RUNNING, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => Begin::Owner(InitGuard { once: self }),
            Err(state) if state == READY => Begin::Ready,
            Err(state) if state & STATE_MASK == EMPTY => self.try_begin_flagged(state),
            Err(_) => Begin::Running,
        }
    }

    /// [`try_begin`](Self::try_begin) on an `EMPTY` cell with the `WAITERS`
    /// bit set (callers of [`wait_ready`](Self::wait_ready) are parked on
    /// it): the claim keeps the bit, so that leaving `RUNNING` wakes them.
    #[cold]
    fn try_begin_flagged(&self, mut state: usize) -> Begin<'_> {
        loop {
            if state & STATE_MASK != EMPTY {
                return if state == READY {
                    Begin::Ready
                } else {
                    Begin::Running
                };
            }
            // Orderings as in `try_begin`: success Acquire pairs with the
            // Release swap in `finish` of a failed attempt, failure Acquire
            // with the one in `complete` (a READY read must see the value).
            match self.state.compare_exchange_weak(
                state,
                RUNNING | WAITERS,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Begin::Owner(InitGuard { once: self }),
                Err(actual) => state = actual,
            }
        }
    }

    /// Called under the wait-queue lock by a caller about to park: records
    /// the waiter in the state word, or says not to park because the state
    /// already left `RUNNING`.
    fn park_if_running(&self) -> bool {
        self.flag_waiter(|state| state & STATE_MASK != RUNNING)
    }

    /// Sets the `WAITERS` bit so that the next `finish` wakes this caller,
    /// unless `done(state)` says there is nothing to wait for; says whether
    /// to park. Called under the wait-queue lock.
    fn flag_waiter(&self, done: impl Fn(usize) -> bool) -> bool {
        // Relaxed throughout: the queue mutex orders this against the
        // notifier's lock-and-drain, and the caller re-reads the state with
        // Acquire (in `try_begin` or `is_ready`) after waking.
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if done(state) {
                return false;
            }
            if state & WAITERS != 0 {
                return true;
            }
            match self.state.compare_exchange_weak(
                state,
                state | WAITERS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => state = actual,
            }
        }
    }

    /// Parks the current thread until the running initialiser finishes,
    /// fails or is cancelled. Returns at once if none is running. Spurious
    /// returns are possible; callers loop on [`try_begin`](Self::try_begin).
    pub(crate) fn wait(&self) {
        self.waiters.wait(|| self.park_if_running());
    }

    /// Parks the current thread until the value is published, whether or not
    /// an initialiser is running now: failed, panicked and cancelled attempts
    /// wake it, and it parks again. Returns at once on a `READY` cell.
    /// Spurious returns are possible; callers loop on
    /// [`is_ready`](Self::is_ready).
    pub(crate) fn wait_ready(&self) {
        self.waiters.wait(|| self.park_until_ready());
    }

    /// Called under the wait-queue lock by [`wait_ready`](Self::wait_ready):
    /// records the waiter in the state word (in `EMPTY` or `RUNNING`), or says
    /// not to park because the value is published. An `EMPTY` cell keeps the
    /// bit until a claim (`try_begin_flagged`) carries it into `RUNNING`;
    /// `finish` then clears it and wakes us.
    fn park_until_ready(&self) -> bool {
        self.flag_waiter(|state| state == READY)
    }

    /// The async form of [`wait`](Self::wait); never blocks the executor.
    pub(crate) fn wait_async(&self) -> impl Future<Output = ()> + '_ {
        self.waiters.wait_async(|| self.park_if_running())
    }

    /// Leaves `RUNNING` for `to` and wakes the waiters if any parked.
    fn finish(&self, to: usize) {
        // Release: publishes the value (`to == READY`) or the failed attempt's
        // effects (`to == EMPTY`) to the Acquire loads in `is_ready` and
        // `try_begin`. The swap also reads the WAITERS bit atomically with the
        // transition, so a waiter either set it before (we notify) or its
        // `park_if_running` sees the new state (it does not park).
        let prev = self.state.swap(to, Ordering::Release);
        debug_assert_eq!(prev & STATE_MASK, RUNNING, "finish() outside RUNNING");
        if prev & WAITERS != 0 {
            self.waiters.notify_all();
        }
    }

    /// Marks the cell `READY` through exclusive access, after the owner of
    /// the `&mut` wrote the value.
    pub(crate) fn set_ready_mut(&mut self) {
        // Relaxed: `&mut self` excludes every other access; whoever later
        // shares the cell gets it through a synchronising hand-over.
        self.state.store(READY, Ordering::Relaxed);
    }

    /// Resets a published cell to `EMPTY` through exclusive access.
    pub(crate) fn reset_mut(&mut self) {
        // Relaxed: `&mut self` excludes every other access.
        self.state.store(EMPTY, Ordering::Relaxed);
    }

    /// Whether the value is published, through exclusive access.
    pub(crate) fn is_ready_mut(&mut self) -> bool {
        // Relaxed: `&mut self` excludes every other access; any earlier
        // publication happened-before the `&mut` borrow was obtained.
        self.state.load(Ordering::Relaxed) == READY
    }
}

/// Proof of a won claim. Completing publishes; dropping gives the claim back
/// and wakes the waiters, one of which takes over.
#[must_use = "dropping the guard abandons the initialisation"]
pub(crate) struct InitGuard<'a> {
    once: &'a Once,
}

impl InitGuard<'_> {
    /// Publishes the value the owner wrote: `RUNNING → READY`.
    pub(crate) fn complete(self) {
        let once = self.once;
        std::mem::forget(self);
        once.finish(READY);
    }
}

impl Drop for InitGuard<'_> {
    fn drop(&mut self) {
        // Error, panic or cancellation: `RUNNING → EMPTY`, so a waiter retries.
        self.once.finish(EMPTY);
    }
}

/// An initialisation that is claimed when it is created and shared through an
/// `Arc`, for primitives whose claim is published in a map (`SingletonMap`)
/// rather than by a compare-exchange on a cell.
///
/// The creator owns the RUNNING state; waiters clone [`once`](Self::once) and
/// [`Once::wait`] on it. Dropping the claim without [`complete`](Self::complete)
/// (on error, panic or cancellation) finishes as EMPTY; both outcomes wake
/// every waiter, who then re-reads the map, which holds the truth.
#[must_use = "dropping the claim abandons the initialisation"]
pub(crate) struct SharedInit {
    once: Arc<Once>,
    outcome: usize,
}

impl SharedInit {
    pub(crate) fn new() -> Self {
        Self {
            once: Arc::new(Once {
                // Nobody else can see this `Once` yet, so no ordering is needed
                // to claim it.
                state: AtomicUsize::new(RUNNING),
                waiters: WaitQueue::new(),
            }),
            outcome: EMPTY,
        }
    }

    /// The shared state that waiters wait on.
    pub(crate) fn once(&self) -> &Arc<Once> {
        &self.once
    }

    /// Ends the initialisation as a success and wakes the waiters.
    pub(crate) fn complete(mut self) {
        self.outcome = READY;
        // `drop` finishes with READY.
    }
}

impl Drop for SharedInit {
    fn drop(&mut self) {
        self.once.finish(self.outcome);
    }
}
