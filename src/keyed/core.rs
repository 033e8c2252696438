//! The entry lifecycle shared by every keyed lock: a key's entry is *live*
//! exactly while somebody holds or waits for the key (or, in `FileLocks`'
//! map, spins for it: see *Spin*), and a live entry is never removed.
//!
//! # Layout
//!
//! Each shard has an [`Index`] of heap-allocated [`Slot`]s, which lookups
//! read without a lock (pinned: see [`super::reclaim`]), and a lock (the
//! shard lock) that serialises inserts and unlinks, and guards each slot's
//! waiter queue and spinner counts. A slot holds the key, its hash, the
//! *state word* and the queue.
//!
//! # State word
//!
//! One atomic word per slot: `DEAD | SLOW | holders`. The holders are
//! recorded by the [`LockKind`] in the low bits.
//!
//! - `SLOW` is set, under the shard lock, exactly while the slot's queue is
//!   not empty or a counted spinner (see *Spin*) spins for the key. Then
//!   every change of the word
//!   happens under the shard lock (the fast paths below refuse a `SLOW`
//!   word), so the queue and the holders are looked at together.
//! - `DEAD` is set by a sweep (below), on an idle word (zero: no holder,
//!   not `SLOW`) only, by compare-exchange; a dead word never changes again.
//!
//! # Protocol
//!
//! - **Fast acquire** ([`Core::fast_acquire`]). Pinned, find the key's
//!   slot, and compare-exchange its word from one that is neither `DEAD`
//!   nor `SLOW` and whose holders admit the mode to the same word with one
//!   more holder. No lock, and no write to anything but the slot: a key
//!   locked over and over keeps its slot, and threads on different keys
//!   share no cache line. Any other outcome falls back to the slow path.
//! - **Fast release** ([`Core::release`]). Compare-exchange the word to one
//!   holder less if it is not `SLOW`. The slot stays in the index, idle.
//! - **Slow acquire** ([`Core::begin`], under the shard lock). Find the
//!   key's live slot (dead ones are skipped) or insert a new one, already
//!   held. Take it if the kind allows and nobody queued may object (see
//!   *Fairness*); otherwise set `SLOW` by compare-exchange *from the word
//!   just judged*, re-judging if it changed (a fast release may have freed
//!   the key in between), then queue or count the caller as a spinner.
//! - **Slow release** (a `SLOW` word). Under the shard lock, drop the
//!   holder, [`dispatch`] the queue, and clear `SLOW` if the queue is empty
//!   and nobody spins.
//! - **Spin** ([`Core::acquire_blocking`]). A blocking caller that finds the
//!   key taken tries again a few times before it queues. A timed caller
//!   only pauses between its tries, never yields (a yield can return
//!   milliseconds later when threads outnumber cores), and stops once its
//!   deadline has passed. In the keyed maps
//!   it retries the fast acquire, as long as the holders exclude it and
//!   nobody waits (a `SLOW` word sends it to the queue): two threads on one
//!   hot key then trade it with compare-exchanges alone. In `FileLocks`'
//!   map it is instead counted in the slot (`spinning`, which sets `SLOW`),
//!   trying through the slow path, from its first failed try until it takes
//!   the key or queues, so that a holder can tell that a thread is about to
//!   take it ([`Core::release_if_exclusive_thread_waits`], for the
//!   hand-over of the OS lock). A caller that unwinds while counted (a
//!   panic in the key's `Eq`) gives its count back on the way out.
//! - **Wait** ([`Core::check`]). A queued waiter that is unparked (or polled)
//!   looks at its queue entry under the lock. Gone: the lock was handed to
//!   it. Marked woken: the lock was free when it was woken, so it tries to
//!   take it. Its deadline passed, or its future was dropped: it removes its
//!   entry and dispatches the queue in its stead.
//! - **Sweep** ([`Core::sweep`]). Idle slots stay in the index, so that a
//!   key locked again reuses its slot without a table write. When a shard's
//!   slots exceed its sweep mark (inserting a new key finds out), the
//!   inserting thread, after unlocking, compare-exchanges each idle word of
//!   the shard to `DEAD`, then under the shard lock unlinks exactly those
//!   slots, *by identity* (a new slot for the same key may already be in
//!   the index beside a dead one), and retires them: they are freed once
//!   no pinned lookup can still hold them. The mark is then set to the
//!   shard's live slots plus the larger of [`SLACK`] and those live slots,
//!   so a shard keeps at most that many idle slots between sweeps, and
//!   sweeping costs O(1) per insert, amortised.
//!
//! The invariants: **a slot whose key is held, waited for or spun for by a
//! counted spinner is never dead** (its word is not idle), so it is never
//! unlinked or freed while somebody relies on it (an uncounted spinner
//! relies on nothing: each try looks the key up afresh); **under the shard lock, each key has at most one
//! live slot in the index**; and **if the queue is non-empty and its front
//! is not marked woken, the front's mode cannot be granted** (so a later
//! release, which is a slow one, will dispatch it: no wake-up is lost).
//!
//! # Fairness
//!
//! Waiters are queued in arrival order. A release hands out the key in one of
//! two ways ([`dispatch`]):
//!
//! - **Wake** (the default): the lock is left free and the front waiter is
//!   woken to take it. A thread that arrives in the meantime may take it
//!   first ("barging"), as with parking_lot and std's mutexes. This keeps a
//!   hot key busy instead of idle while a parked thread wakes up.
//! - **Handoff**: a front waiter that has lost a race that way and has
//!   waited [`WaitStart::FAIR_AFTER`] (0.5 ms) is granted the lock directly
//!   on the next release, before it even runs (with the compatible waiters
//!   behind it, for readers). Under loom, which has no clock, it is owed the
//!   handoff after losing twice.
//!
//! So handoff is eventually fair, like parking_lot's: a waiter at the front
//! of the queue waits for newcomers at most about 0.5 ms. A newcomer never
//! overtakes a queued waiter that has not been woken (the queue keeps the
//! word `SLOW`, so newcomers take the slow path and see the queue); in
//! particular a new reader queues behind a waiting writer, so writers do
//! not starve.

use std::alloc::Layout;
use std::borrow::Borrow;
use std::future::poll_fn;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, Location, catch_unwind, resume_unwind};
use std::ptr::NonNull;
use std::task::{Poll, Waker};

use super::block::Block;
use super::index::{self, Cells, Index, Occupancy};
use super::kind::LockKind;
use super::reclaim::{self, Free, Reclaim};
use crate::sync::{
    self, AtomicU64, AtomicUsize, Deadline, LazyInit, Ordering, ParkingRwLock, PerExecution,
    ShardLock, SpinWait, UnsafeCell, WaitStart,
};
use crate::table::{self, Table};
use crate::wait::{Unpark, WaitList, Waiter};

/// Set by a sweep on an idle word: the slot is being unlinked, never to be
/// used again.
const DEAD: usize = 1 << (usize::BITS - 1);
/// Set while the slot's queue is not empty or a thread spins for its key:
/// every change then happens under the shard lock.
const SLOW: usize = 1 << (usize::BITS - 2);
/// The holder bits, the [`LockKind`]'s.
const HOLDERS: usize = SLOW - 1;

/// Idle slots a shard may keep beyond its live ones before a sweep (at
/// least; a shard with more live slots at its last sweep keeps as many idle
/// ones as it had live ones). Enough that a thread cycling over a few
/// hundred keys per shard never sweeps them.
#[cfg(not(toctou_loom))]
pub(crate) const SLACK: usize = 256;
/// Under loom, one: a model with two keys in one shard sweeps.
#[cfg(toctou_loom)]
pub(crate) const SLACK: usize = 1;

/// What a waiter wants, and how its wait has gone so far.
struct Waiting<M> {
    mode: M,
    /// Woken to take a free lock, and not yet back to try.
    woken: bool,
    /// How often it was woken and found the lock taken again.
    lost: u8,
    /// When it queued: with `lost`, decides when it is owed a handoff.
    since: WaitStart,
}

/// A key's waiters and spinners. Only touched under the shard's write lock.
struct SlotState<M> {
    queue: Queue<M>,
    /// Blocking callers that found the key taken and are spinning before
    /// they queue (see *Spin* in the module docs): they keep the slot live.
    spinning: u32,
    /// How many of them want it exclusively.
    spinning_exclusive: u32,
}

impl<M> SlotState<M> {
    fn new() -> Self {
        Self {
            queue: Queue::new(),
            spinning: 0,
            spinning_exclusive: 0,
        }
    }

    /// Whether the word must be `SLOW`: somebody waits or spins.
    fn needs_slow(&self) -> bool {
        !self.queue.is_empty() || self.spinning > 0
    }

    /// Counts a blocking caller that spins for the key (`exclusive`ly or
    /// not), and copies the count of exclusive spinners into `hint` (the
    /// slot's `spinning_hint`).
    fn start_spinning(&mut self, exclusive: bool, hint: &AtomicUsize) {
        self.spinning += 1;
        self.spinning_exclusive += u32::from(exclusive);
        Self::publish(self.spinning_exclusive, hint);
    }

    /// Uncounts a spinner that now holds the key or queues for it, as
    /// [`start_spinning`](Self::start_spinning) counted it.
    fn stop_spinning(&mut self, exclusive: bool, hint: &AtomicUsize) {
        self.spinning -= 1;
        self.spinning_exclusive -= u32::from(exclusive);
        Self::publish(self.spinning_exclusive, hint);
    }

    fn publish(spinning_exclusive: u32, hint: &AtomicUsize) {
        // Relaxed: a hint, read without the lock by a holder deciding
        // whether to look again (under the lock) for a waiter.
        hint.store(spinning_exclusive as usize, Ordering::Relaxed);
    }
}

/// A key's waiters: a [`WaitList`], allocated when the first waiter queues,
/// so that an uncontended key's slot stays small and frees without a drop
/// call for the list.
struct Queue<M>(Option<Box<WaitList<Waiting<M>>>>);

impl<M> Queue<M> {
    const fn new() -> Self {
        Self(None)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn push(&mut self, unpark: Unpark, data: Waiting<M>) -> u64 {
        self.0
            .get_or_insert_with(|| Box::new(WaitList::new()))
            .push(unpark, data)
    }

    #[inline]
    fn front(&self) -> Option<&Waiter<Waiting<M>>> {
        self.0.as_ref()?.front()
    }

    fn front_mut(&mut self) -> Option<&mut Waiter<Waiting<M>>> {
        self.0.as_mut()?.front_mut()
    }

    fn pop_front(&mut self) -> Option<Waiter<Waiting<M>>> {
        self.0.as_mut()?.pop_front()
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.0.as_ref()?.position(id)
    }

    fn get_mut(&mut self, at: usize) -> Option<&mut Waiter<Waiting<M>>> {
        self.0.as_mut()?.get_mut(at)
    }

    fn remove(&mut self, at: usize) -> Option<Waiter<Waiting<M>>> {
        self.0.as_mut()?.remove(at)
    }
}

/// One key's entry: allocated when the key is first acquired (or first
/// acquired again after a sweep), freed after a sweep unlinks it.
pub(crate) struct Slot<K, L: LockKind> {
    /// `DEAD | SLOW | holders`: see *State word* in the module docs.
    word: AtomicUsize,
    /// Acquisitions by the fast path, for [`Core::counters`]; folded into
    /// the shard's counters when the slot is swept.
    fast_acquisitions: AtomicU64,
    /// The key's hash under the map's hasher: finds the shard on release,
    /// and rebuilds the index without calling user code.
    hash: u64,
    key: K,
    state: UnsafeCell<SlotState<L::Mode>>,
    /// A copy of `state.spinning_exclusive`, stored under the shard lock
    /// whenever that changes, so that a holder can look without the lock
    /// (a hint: [`Core::exclusive_spinner_hint`]).
    spinning_hint: AtomicUsize,
    /// Under loom: written when the slot is freed and read by every lock-free
    /// look at it, so that a look not ordered before the free (a slot freed
    /// too early) is a causality violation that loom reports.
    #[cfg(toctou_loom)]
    freed: UnsafeCell<bool>,
    _kind: PhantomData<L>,
}

/// A pointer to a live slot, held by its holders' guards and its waiters.
pub(crate) struct SlotRef<K, L: LockKind>(NonNull<Slot<K, L>>);

impl<K, L: LockKind> Clone for SlotRef<K, L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, L: LockKind> Copy for SlotRef<K, L> {}

// SAFETY: a `SlotRef` is a shared reference to a `Slot` whose lifetime the
// protocol manages (see `Slot::get`). Through it, other threads read the
// key (`K: Sync`) and drop it when they free the slot (`K: Send`); the
// waiter queue is only touched under the shard lock, which serialises those
// accesses across threads (`L::Mode` is plain data; wakers and thread
// handles are `Send`), and the word is atomic.
unsafe impl<K: Send + Sync, L: LockKind> Send for SlotRef<K, L> {}
// SAFETY: as for `Send`: every access through a shared `SlotRef` is a read
// of the immutable key and hash, atomic, or serialised by the shard lock.
unsafe impl<K: Send + Sync, L: LockKind> Sync for SlotRef<K, L> {}

impl<K, L: LockKind> SlotRef<K, L> {
    /// The slot.
    ///
    /// # Safety
    ///
    /// The slot must be allocated: the caller holds its key, waits in its
    /// queue or is counted as spinning for it (its word is not idle, so no
    /// sweep can kill it), or is pinned and found it in the index (a freed
    /// slot is retired first, and freed after every pin that could reach
    /// it), or holds its shard lock and found it in the index.
    unsafe fn get<'a>(self) -> &'a Slot<K, L> {
        // SAFETY: allocated, per this function's contract.
        unsafe { self.0.as_ref() }
    }

    /// The key; for guards.
    ///
    /// # Safety
    ///
    /// As for [`get`](Self::get), and the returned reference must not
    /// outlive the caller's hold on the key.
    pub(crate) unsafe fn key<'a>(self) -> &'a K
    where
        L: 'a,
    {
        // SAFETY: forwarded to the caller.
        unsafe { &self.get().key }
    }
}

impl<K, L: LockKind> Slot<K, L> {
    /// The waiters and spinners.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock of this slot's shard, and lets the
    /// returned reference go before unlocking. That lock is what makes the
    /// access exclusive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state(&self) -> &mut SlotState<L::Mode> {
        // SAFETY: exclusive per this function's contract.
        self.state.with_mut(|state| unsafe { &mut *state })
    }

    /// Under loom, checks that this look at the slot is ordered before its
    /// free (see `freed`); nothing otherwise.
    #[inline]
    fn check_not_freed(&self) {
        #[cfg(toctou_loom)]
        // SAFETY: a plain read; loom reports it if a free is not ordered
        // with it, which is the bug this checks for.
        self.freed
            .with(|freed| assert!(!unsafe { *freed }, "a freed slot was read"));
    }

    /// Whether the key is held, waited or spun for (the word is neither
    /// idle nor dead).
    fn is_live(&self) -> bool {
        // Relaxed: a snapshot for `len()` and statistics.
        let word = self.word.load(Ordering::Relaxed);
        word & DEAD == 0 && word != 0
    }

    /// Counts an acquisition by the fast path.
    #[inline]
    fn count_fast(&self, mode: L::Mode) {
        // Relaxed: a statistic. An exclusive holder is the only writer
        // until it releases (its release orders this before the next
        // holder's), so a load and a store do; readers may share the key,
        // so they add.
        if L::is_exclusive(mode) {
            let n = self.fast_acquisitions.load(Ordering::Relaxed);
            self.fast_acquisitions.store(n + 1, Ordering::Relaxed);
        } else {
            self.fast_acquisitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Clears `SLOW` if nobody waits or spins any more. Called under the
    /// shard lock after every change to the queue or the spinners.
    fn settle(&self, state: &SlotState<L::Mode>) {
        if !state.needs_slow() {
            // Release: the changes made under the shard lock (a grant, a
            // release) are published to the fast paths that read the word
            // without it (their Acquire compare-exchange).
            self.word.fetch_and(!SLOW, Ordering::Release);
        }
    }
}

/// Counters kept per shard, under the shard lock (the slow path's
/// acquisitions and waits, and the fast path's of swept slots).
#[derive(Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) acquisitions: u64,
    pub(crate) contended: u64,
    pub(crate) timeouts: u64,
    pub(crate) cancelled: u64,
    /// The most slots this shard has held at once.
    peak: usize,
}

/// What a shard's lock protects.
pub(crate) struct Shard {
    occupancy: Occupancy,
    counters: Counters,
    /// A sweep runs when an insert takes `occupancy.live` past this.
    sweep_at: usize,
    /// A sweep of this shard is running: no second one starts (the next
    /// insert past the mark after it ends sweeps again).
    sweeping: bool,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            occupancy: Occupancy::default(),
            counters: Counters::default(),
            sweep_at: SLACK,
            sweeping: false,
        }
    }
}

/// A shard's index on its own cache lines: read by every lookup, written
/// only by an insert that rebuilds it.
#[repr(align(128))]
struct PaddedIndex<T>(Index<T>);

/// The parts that lookups read without a lock: the shards' indices, and
/// the readers' stripes that keep what they read allocated.
struct LockFree<K, L: LockKind> {
    indices: Box<[PaddedIndex<Slot<K, L>>]>,
    reclaim: Reclaim,
}

impl<K, L: LockKind> LockFree<K, L> {
    /// The index of the shard for `hash` (the table's shard of that number).
    #[inline]
    fn index(&self, hash: u64) -> &Index<Slot<K, L>> {
        &self.indices[table::shard_index(hash, self.indices.len())].0
    }
}

/// The lock-free parts for `table::shard_count()` shards.
fn make_lock_free<K, L: LockKind>() -> LockFree<K, L> {
    let shards = table::shard_count();
    LockFree {
        indices: (0..shards).map(|_| PaddedIndex(Index::default())).collect(),
        reclaim: Reclaim::new(shards),
    }
}

/// Frees a slot retired by a sweep.
///
/// # Safety
///
/// `ptr` is a `Slot<K, L>` from `Block::write` in `begin`, unlinked, dead,
/// and no longer reachable by any lookup; freed once.
unsafe fn free_slot<K, L: LockKind>(ptr: NonNull<u8>) {
    let slot = ptr.cast::<Slot<K, L>>();
    #[cfg(not(toctou_loom))]
    // SAFETY: per this function's contract, a valid slot nobody else uses:
    // dropped once, and its memory returned once, by the `Block` made
    // first, so that a key's `Drop` that panics does not leak it.
    unsafe {
        let memory = Block::from_raw(slot);
        std::ptr::drop_in_place(slot.as_ptr());
        drop(memory);
    }
    // Under loom only the key and the queue are dropped, and the rest is
    // leaked: a read after the free (the bug that `freed` reports) must
    // find the slot still there to report it.
    #[cfg(toctou_loom)]
    // SAFETY: as above; the fields dropped are dropped once.
    unsafe {
        let raw = slot.as_ptr();
        (*raw).freed.with_mut(|freed| *freed = true);
        std::ptr::drop_in_place(&raw mut (*raw).key);
        std::ptr::drop_in_place(&raw mut (*raw).state);
    }
}

/// Wake-ups collected under the shard lock and delivered after unlocking.
#[derive(Default)]
struct Wakes {
    first: Option<Unpark>,
    rest: Vec<Unpark>,
}

impl Wakes {
    fn push(&mut self, unpark: Unpark) {
        match self.first {
            None => self.first = Some(unpark),
            // More than one only when a handoff grants several readers.
            Some(_) => self.rest.push(unpark),
        }
    }

    fn wake(self) {
        for unpark in self.first.into_iter().chain(self.rest) {
            unpark.wake();
        }
    }
}

/// Changes `word` by `change` (a grant or a release) under the shard lock,
/// by compare-exchange: while the word is not `SLOW`, the fast paths may
/// change it meanwhile. Returns the new word.
fn update(word: &AtomicUsize, change: impl Fn(usize) -> usize) -> usize {
    // Relaxed: the compare-exchange below reads the latest value.
    let mut current = word.load(Ordering::Relaxed);
    loop {
        let new = change(current);
        // AcqRel: a grant acquires the last release (which may have been a
        // fast one, not ordered by the shard lock); a release publishes the
        // holder's writes to the next fast acquire.
        match word.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return new,
            Err(seen) => current = seen,
        }
    }
}

/// Adds a holder in `mode` to `word` if it still reads `seen` (whose holders
/// admit `mode`); otherwise returns what it reads now.
#[inline]
fn grant<L: LockKind>(word: &AtomicUsize, seen: usize, mode: L::Mode) -> Result<(), usize> {
    // Acquire: pairs with the Release of the last release, fast or slow
    // (a fast one is not ordered with us by the shard lock), so the
    // previous holder's writes are visible to the new one.
    word.compare_exchange_weak(
        seen,
        L::acquire(seen, mode),
        Ordering::Acquire,
        Ordering::Relaxed,
    )
    .map(drop)
}

/// Hands the key on after its state changed (a release, a cancelled waiter, a
/// woken waiter that took it): see *Fairness* in the module docs. Called
/// under the shard lock; while the queue is not empty the word is `SLOW`, so
/// nobody else changes it.
fn dispatch<L: LockKind>(word: &AtomicUsize, state: &mut SlotState<L::Mode>, wakes: &mut Wakes) {
    // Relaxed: stable under the shard lock while the queue is not empty
    // (the word is `SLOW`), and ordered by it.
    let holders = || word.load(Ordering::Relaxed) & HOLDERS;
    let Some(front) = state.queue.front_mut() else {
        return;
    };
    if front.data.woken || !L::can_acquire(holders(), front.data.mode) {
        // Already on its way, or a holder will dispatch again on release.
        return;
    }
    if !front.data.since.owed_handoff(front.data.lost) {
        front.data.woken = true;
        wakes.push(front.unpark.clone());
        return;
    }
    // Handoff, in arrival order, to as many as the kind allows together.
    while let Some(front) = state.queue.front() {
        if !L::can_acquire(holders(), front.data.mode) {
            break;
        }
        let Some(waiter) = state.queue.pop_front() else {
            break;
        };
        update(word, |w| L::acquire(w, waiter.data.mode));
        wakes.push(waiter.unpark);
    }
}

/// A key argument: a borrowed `&Q`, cloned into an owned key only if an
/// entry is created.
pub(crate) trait KeyArg<K> {
    type Q: Hash + Eq + ?Sized;
    fn get(&self) -> &Self::Q;
    fn take(&mut self) -> K;
}

impl<K, Q> KeyArg<K> for &Q
where
    Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
{
    type Q = Q;

    fn get(&self) -> &Q {
        self
    }

    fn take(&mut self) -> K {
        self.to_owned()
    }
}

/// What [`Core::begin`] did.
enum Begin<K, L: LockKind> {
    /// The caller holds the key.
    Held(SlotRef<K, L>),
    /// The caller is queued with this id.
    Queued(SlotRef<K, L>, u64),
    /// The key is taken and the caller asked not to queue.
    Busy,
    /// As `Busy`, and the caller (a blocking one, not yet counted) is now
    /// counted as spinning for the key in this slot.
    Spinning(SlotRef<K, L>),
}

/// What [`Core::fast_acquire`] found.
enum Fast<K, L: LockKind> {
    /// The caller holds the key.
    Held(SlotRef<K, L>),
    /// The key's live slot has holders that exclude the mode (and nobody
    /// waits for it): a `try_*` call fails without the slow path.
    Taken,
    /// Anything else (no slot, a dead one, or a `SLOW` word): take the
    /// slow path.
    Slow,
}

/// What [`Core::check`] found.
enum Check {
    Granted,
    Waiting,
    GaveUp,
}

/// A keyed lock map: the shards and their indices, and the lifecycle
/// operations that every front-end (`KeyedLocks`, `KeyedRwLocks`) shares.
pub(crate) struct Core<K, L: LockKind, S> {
    table: Table<ParkingRwLock<Shard>, S>,
    lock_free: LazyInit<LockFree<K, L>>,
    /// The largest total of slots seen when some shard reached a new
    /// high; written only then, so it stays out of every hot path.
    peak: PerExecution<AtomicUsize>,
    /// Where the map was created (`#[track_caller]`), for `Debug`.
    created_at: &'static Location<'static>,
    /// How many of a blocking caller's spins pause before the rest yield
    /// (see [`SpinWait`]).
    pause_rounds: u32,
    /// Whether blocking callers are counted in the entry while they spin
    /// (through the shard lock), or spin on the lock-free path uncounted.
    count_spinners: bool,
}

// SAFETY: the map owns its slots (keys, queues) through raw pointers; it is
// `Send` and `Sync` exactly when a `SlotRef` is, plus the hasher's bounds.
unsafe impl<K: Send + Sync, L: LockKind, S: Send> Send for Core<K, L, S> {}
// SAFETY: as for `Send`: shared access goes through `SlotRef`s, atomics
// and the shard locks.
unsafe impl<K: Send + Sync, L: LockKind, S: Sync> Sync for Core<K, L, S> {}

sync::loom_const_fn! {
    /// A zero counter (`const` in std builds, for `per_execution!`).
    fn zero() -> AtomicUsize {
        AtomicUsize::new(0)
    }
}

impl<K, L: LockKind, S> Core<K, L, S> {
    /// An empty map; nothing is allocated until its first use. `const` in
    /// loom builds too: the loom-backed parts are made per execution.
    pub(crate) const fn with_hasher(
        hasher: S,
        name: &'static str,
        created_at: &'static Location<'static>,
    ) -> Self {
        Self {
            table: Table::with_hasher(hasher, name),
            lock_free: LazyInit::new(make_lock_free::<K, L>),
            peak: sync::per_execution!(zero),
            created_at,
            pause_rounds: SpinWait::PAUSE_ROUNDS,
            count_spinners: false,
        }
    }

    /// The same map, whose blocking callers spin longer before they yield
    /// ([`SpinWait::LONG_PAUSE_ROUNDS`]), and are counted in the key's entry
    /// while they spin (see *Spin*), for `FileLocks`' hand-over.
    #[cfg(any(target_os = "linux", toctou_loom))]
    pub(crate) fn spinning_longer(mut self) -> Self {
        self.pause_rounds = SpinWait::LONG_PAUSE_ROUNDS;
        self.count_spinners = true;
        self
    }

    /// Where the map was created.
    pub(crate) fn created_at(&self) -> &'static Location<'static> {
        self.created_at
    }

    pub(crate) fn hasher(&self) -> &S {
        self.table.hasher()
    }

    #[inline]
    fn lock_free(&self) -> &LockFree<K, L> {
        self.lock_free.get(make_lock_free::<K, L>)
    }

    /// Runs `f` on every slot in every index, pinned; none if the map was
    /// never used.
    fn for_each_slot(&self, mut f: impl FnMut(&Slot<K, L>)) {
        let Some(lock_free) = self.lock_free.try_get() else {
            return;
        };
        let _pin = lock_free.reclaim.pin();
        for index in lock_free.indices.iter() {
            // SAFETY: pinned; `f`'s reference does not outlive the closure.
            unsafe { index.0.for_each(|slot| f(slot.as_ref())) };
        }
    }

    /// The number of live keys (held, waited or spun for): a count of the
    /// live slots, index by index (O(slots), idle ones included).
    pub(crate) fn len(&self) -> usize {
        let mut len = 0;
        self.for_each_slot(|slot| len += usize::from(slot.is_live()));
        len
    }

    /// The counters of every shard and slot, summed, with the live keys and
    /// the sampled peak.
    pub(crate) fn counters(&self) -> (Counters, usize, usize) {
        let mut sum = Counters::default();
        self.table.for_each_shard(|shard| {
            let c = &shard.counters;
            sum.acquisitions += c.acquisitions;
            sum.contended += c.contended;
            sum.timeouts += c.timeouts;
            sum.cancelled += c.cancelled;
        });
        let mut live = 0;
        self.for_each_slot(|slot| {
            live += usize::from(slot.is_live());
            // Relaxed: a statistic.
            sum.acquisitions += slot.fast_acquisitions.load(Ordering::Relaxed);
        });
        // Relaxed: a statistic; no other memory is published through it.
        let peak = self.peak.fetch_max(live, Ordering::Relaxed).max(live);
        (sum, live, peak)
    }

    /// A shard grew past its own previous high: sample the total. Other
    /// shards are only read if their lock is free at once, so this never
    /// waits while holding `held`'s lock.
    #[cold]
    fn sample_peak(&self, held: usize, held_len: usize) {
        let mut live = held_len;
        for index in (0..self.table.shards()).filter(|&i| i != held) {
            if let Some(shard) = self.table.try_read_at(index) {
                live += shard.occupancy.live;
            }
        }
        // Relaxed: a statistic; no other memory is published through it.
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    /// Releases a hold in `mode`: one compare-exchange if nobody waits or
    /// spins for the key (the slot stays, idle if that was the last hold),
    /// else the slow release under the shard lock.
    ///
    /// # Safety
    ///
    /// The caller holds `slot`'s key in `mode` and gives up that hold.
    #[inline]
    pub(crate) unsafe fn release(&self, slot: SlotRef<K, L>, mode: L::Mode) {
        // SAFETY: we hold the key, so the slot is live.
        let s = unsafe { slot.get() };
        s.check_not_freed();
        // Relaxed: the compare-exchange reads the latest value.
        let mut word = s.word.load(Ordering::Relaxed);
        while word & SLOW == 0 {
            // Release: publishes the holder's writes to the next holder
            // (the Acquire side of every grant). After this the slot may be
            // swept and freed: it is not touched again.
            match s.word.compare_exchange_weak(
                word,
                L::release(word, mode),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => word = seen,
            }
        }
        let shard = self.table.write(s.hash);
        // SAFETY: we hold the shard lock and the key.
        unsafe { Self::release_locked(shard, slot, mode) }
    }

    /// The release under the shard lock `shard`: drop the holder, then hand
    /// the key on, and wake whoever it was handed to after unlocking.
    ///
    /// # Safety
    ///
    /// `shard` is `slot`'s shard, locked; the caller holds `slot`'s key in
    /// `mode` and gives up that hold.
    #[cold]
    unsafe fn release_locked(
        shard: <ParkingRwLock<Shard> as ShardLock>::Write<'_>,
        slot: SlotRef<K, L>,
        mode: L::Mode,
    ) {
        // SAFETY: we hold the key, so the slot is live; and the shard lock.
        let (s, state) = unsafe { (slot.get(), slot.get().state()) };
        update(&s.word, |w| L::release(w, mode));
        let mut wakes = Wakes::default();
        dispatch::<L>(&s.word, state, &mut wakes);
        s.settle(state);
        drop(shard);
        wakes.wake();
    }

    /// Whether a thread spun for the key held through `slot` exclusively
    /// when last looked at under the lock: a hint, read without the shard
    /// lock (a holder deciding whether to look again, under the lock, with
    /// [`release_if_exclusive_thread_waits`](Self::release_if_exclusive_thread_waits)).
    ///
    /// # Safety
    ///
    /// The caller holds `slot`'s key.
    #[cfg(target_os = "linux")]
    pub(crate) unsafe fn exclusive_spinner_hint(&self, slot: SlotRef<K, L>) -> bool {
        // SAFETY: we hold the key, so the slot is live.
        unsafe { slot.get() }.spinning_hint.load(Ordering::Relaxed) > 0
    }

    /// Releases the hold in `mode` through `slot`, as
    /// [`release`](Self::release), if a thread (not a task, which runs only when its
    /// executor polls it) waits to take the key exclusively next: the first
    /// waiter queued is a blocked thread that wants it exclusively, or
    /// nobody is queued and a thread spins for it exclusively. Says whether
    /// it released; if not, nothing changed.
    ///
    /// # Safety
    ///
    /// The caller holds `slot`'s key in `mode`, and gives up that hold if
    /// this returns `true`.
    #[cfg(target_os = "linux")]
    pub(crate) unsafe fn release_if_exclusive_thread_waits(
        &self,
        slot: SlotRef<K, L>,
        mode: L::Mode,
    ) -> bool {
        // SAFETY: we hold the key, so the slot is live.
        let s = unsafe { slot.get() };
        // A read-modify-write (that changes nothing) reads the latest word,
        // where a plain load might miss a waiter that has just set `SLOW`.
        // Without `SLOW` nobody waits or spins now; one that starts to after
        // this look is told the key is taken, as if it had come a moment
        // later. Acquire: pairs with the waiter's setting of `SLOW` (its
        // queue entry, made under the shard lock, is read under that lock).
        if s.word.fetch_or(0, Ordering::Acquire) & SLOW == 0 {
            return false;
        }
        let shard = self.table.write(s.hash);
        // SAFETY: we hold the shard lock, and our hold keeps the slot live.
        let state = unsafe { s.state() };
        let waits = match state.queue.front() {
            Some(front) => {
                matches!(front.unpark, Unpark::Thread(_)) && L::is_exclusive(front.data.mode)
            }
            None => state.spinning_exclusive > 0,
        };
        if !waits {
            return false;
        }
        // SAFETY: we hold the shard lock and the key, and give the key up.
        unsafe { Self::release_locked(shard, slot, mode) };
        true
    }
}

impl<K: Hash + Eq, L: LockKind, S: BuildHasher> Core<K, L, S> {
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.table.hash(key)
    }

    /// The key's live slot in its index (dead ones are skipped), found by
    /// a lookup that takes no lock.
    ///
    /// # Safety
    ///
    /// The caller is pinned (or holds the shard lock) and lets the slot go
    /// before unpinning (unlocking), unless it has made its word non-idle.
    #[inline]
    unsafe fn find<Q>(lock_free: &LockFree<K, L>, hash: u64, key: &Q) -> Option<SlotRef<K, L>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let index = lock_free.index(hash);
        // SAFETY: forwarded to the caller, which keeps every slot the index
        // gives us allocated while we look.
        let found = unsafe {
            index.find(hash, |slot| {
                let slot = slot.as_ref();
                slot.check_not_freed();
                // Relaxed: a dead slot is skipped; one killed after this
                // look is caught by the caller's compare-exchange.
                slot.hash == hash
                    && slot.word.load(Ordering::Relaxed) & DEAD == 0
                    && slot.key.borrow() == key
            })
        };
        found.map(SlotRef)
    }

    /// Whether `key` is held right now.
    pub(crate) fn is_held<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let lock_free = self.lock_free();
        let _pin = lock_free.reclaim.pin();
        // SAFETY: pinned, and the slot is only read while pinned.
        let found = unsafe { Self::find(lock_free, hash, key) };
        // SAFETY: as above.
        found.is_some_and(|slot| unsafe { slot.get() }.word.load(Ordering::Acquire) & HOLDERS != 0)
    }

    /// The fast acquire: pinned, find the key's slot and take it with one
    /// compare-exchange if it is neither dead nor `SLOW` and its holders
    /// admit `mode`. See *Fast acquire* in the module docs.
    #[inline]
    fn fast_acquire<Q>(&self, hash: u64, key: &Q, mode: L::Mode) -> Fast<K, L>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let lock_free = self.lock_free();
        let _pin = lock_free.reclaim.pin();
        // SAFETY: pinned; the slot is only used after unpinning if we took
        // it (a held slot is never swept).
        let Some(slot) = (unsafe { Self::find(lock_free, hash, key) }) else {
            return Fast::Slow;
        };
        // SAFETY: as above.
        let s = unsafe { slot.get() };
        // Relaxed: the compare-exchange reads the latest value.
        let mut word = s.word.load(Ordering::Relaxed);
        loop {
            if word & (DEAD | SLOW) != 0 {
                return Fast::Slow;
            }
            if !L::can_acquire(word & HOLDERS, mode) {
                return Fast::Taken;
            }
            match grant::<L>(&s.word, word, mode) {
                Ok(()) => {
                    s.count_fast(mode);
                    return Fast::Held(slot);
                }
                Err(seen) => word = seen,
            }
        }
    }

    /// The slow acquire, under the shard lock: the check and the act in one
    /// critical section. `enqueue`: how to wake the caller if it must wait;
    /// without it, a taken key returns [`Begin::Busy`] and nothing changes.
    /// A caller may take a free key while waiters are queued if the front
    /// one was woken and has not come back yet (see *Fairness*). `spin`:
    /// `None` for a caller that does not spin; for a blocking caller,
    /// whether it is counted as spinning for the key already. One that is
    /// not is counted on [`Begin::Busy`]; one that is stops being counted
    /// when it takes the key or queues.
    fn begin<A: KeyArg<K>>(
        &self,
        hash: u64,
        key: &mut A,
        mode: L::Mode,
        spin: Option<bool>,
        enqueue: Option<&dyn Fn() -> Unpark>,
    ) -> Begin<K, L>
    where
        K: Borrow<A::Q>,
    {
        let mut shard = self.table.write(hash);
        let mut replaced = None;
        let slot = loop {
            // SAFETY: we hold the shard lock, so no slot in the index is
            // unlinked (let alone freed) meanwhile.
            match unsafe { Self::find(self.lock_free(), hash, key.get()) } {
                Some(slot) => {
                    // SAFETY: found under the shard lock, which we hold.
                    match unsafe { self.begin_on(&mut shard, slot, mode, spin, enqueue) } {
                        Some(begun) => return begun,
                        // Killed by a sweep as we looked: look again.
                        None => continue,
                    }
                }
                None => {
                    // A counted spinner keeps its slot live.
                    assert_ne!(spin, Some(true), "a spinner's slot was removed");
                    break self.insert(&mut shard, hash, key.take(), mode, &mut replaced);
                }
            }
        };
        let sweep = shard.occupancy.live > shard.sweep_at && !shard.sweeping;
        if sweep {
            shard.sweeping = true;
        }
        drop(shard);
        if replaced.is_some() || sweep {
            // Freeing retired slots drops their keys, which may panic: then
            // the panic goes on to our caller, holding nothing. Each step
            // runs even if the other panicked (the sweep resets `sweeping`).
            let swept = catch_unwind(AssertUnwindSafe(|| {
                if sweep {
                    self.sweep(hash);
                }
            }));
            let retired = catch_unwind(AssertUnwindSafe(|| {
                if let Some(old) = replaced {
                    let cells = (old.cast(), index::free_cells::<Slot<K, L>> as Free);
                    // SAFETY: replaced by the rebuild in `insert`; retired
                    // once.
                    unsafe { self.lock_free().reclaim.retire([cells]) };
                }
            }));
            if let Err(panic) = swept.and(retired) {
                // SAFETY: we hold the key through `slot` in `mode` (just
                // inserted) and give it back.
                unsafe { self.release(slot, mode) };
                resume_unwind(panic);
            }
        }
        Begin::Held(slot)
    }

    /// Inserts a new slot for `key`, held in `mode`, under the shard lock.
    /// A cell array that a rebuild replaced is left in `replaced`, to be
    /// retired after unlocking.
    fn insert(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: K,
        mode: L::Mode,
        replaced: &mut Option<NonNull<Cells<Slot<K, L>>>>,
    ) -> SlotRef<K, L> {
        assert!(
            Layout::new::<Slot<K, L>>().align() > 1,
            "a slot's alignment leaves room for the index's tombstone"
        );
        let value = Slot {
            word: AtomicUsize::new(L::acquire(0, mode)),
            fast_acquisitions: AtomicU64::new(0),
            hash,
            key,
            state: UnsafeCell::new(SlotState::new()),
            spinning_hint: AtomicUsize::new(0),
            #[cfg(toctou_loom)]
            freed: UnsafeCell::new(false),
            _kind: PhantomData,
        };
        // The pointer owns the block; a sweep (or the map's drop) frees it.
        let slot = Block::new().write(value);
        let lock_free = self.lock_free();
        let index = lock_free.index(hash);
        // SAFETY: we hold the shard lock; the slot is initialised and new.
        unsafe {
            index.insert(
                &mut shard.occupancy,
                hash,
                slot,
                |s| s.as_ref().hash,
                |old| *replaced = Some(old),
            );
        }
        shard.counters.acquisitions += 1;
        let len = shard.occupancy.live;
        if len > shard.counters.peak {
            shard.counters.peak = len;
            self.sample_peak(self.table.index(hash), len);
        }
        SlotRef(slot)
    }

    /// [`begin`](Self::begin) on the key's live slot `slot`; `None` if a
    /// sweep killed it before we could change its word.
    ///
    /// # Safety
    ///
    /// `shard` is `slot`'s shard, locked, and `slot` was found in its index.
    unsafe fn begin_on(
        &self,
        shard: &mut Shard,
        slot: SlotRef<K, L>,
        mode: L::Mode,
        spin: Option<bool>,
        enqueue: Option<&dyn Fn() -> Unpark>,
    ) -> Option<Begin<K, L>> {
        // SAFETY: we hold the shard lock and found the slot in the index.
        let (s, state) = unsafe { (slot.get(), slot.get().state()) };
        // A newcomer may take a grantable lock unless somebody queued has
        // not yet been offered it (then the front waiter is owed it).
        let may_take = state.queue.front().is_none_or(|front| front.data.woken);
        // Relaxed: every change below is a compare-exchange on this value.
        let mut word = s.word.load(Ordering::Relaxed);
        loop {
            if word & DEAD != 0 {
                // A counted spinner keeps its slot `SLOW`, never idle.
                assert_ne!(spin, Some(true), "a spinner's slot was killed");
                return None;
            }
            if may_take && L::can_acquire(word & HOLDERS, mode) {
                match grant::<L>(&s.word, word, mode) {
                    Ok(()) => {
                        if spin == Some(true) {
                            state.stop_spinning(L::is_exclusive(mode), &s.spinning_hint);
                            s.settle(state);
                        }
                        shard.counters.acquisitions += 1;
                        return Some(Begin::Held(slot));
                    }
                    Err(seen) => {
                        word = seen;
                        continue;
                    }
                }
            }
            let waits = enqueue.is_some() || spin == Some(false);
            if !waits {
                return Some(Begin::Busy);
            }
            if word & SLOW != 0 {
                break;
            }
            // Set `SLOW` from the word we judged, so that a fast release
            // since then (which would dispatch nobody) makes us judge again
            // instead of waiting for a release that already happened.
            // Relaxed: no data is published; the shard lock orders the rest.
            match s.word.compare_exchange_weak(
                word,
                word | SLOW,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => word = seen,
            }
        }
        // The word is `SLOW` now: only the shard lock's holders change it.
        let Some(make_unpark) = enqueue else {
            state.start_spinning(L::is_exclusive(mode), &s.spinning_hint);
            return Some(Begin::Spinning(slot));
        };
        if spin == Some(true) {
            state.stop_spinning(L::is_exclusive(mode), &s.spinning_hint);
        }
        let id = state.queue.push(
            make_unpark(),
            Waiting {
                mode,
                woken: false,
                lost: 0,
                since: WaitStart::now(),
            },
        );
        shard.counters.contended += 1;
        Some(Begin::Queued(slot, id))
    }

    /// Sweeps the shard of `hash`: kills its idle slots, unlinks them by
    /// identity and retires them. See *Sweep* in the module docs.
    #[cold]
    fn sweep(&self, hash: u64) {
        let lock_free = self.lock_free();
        let index = lock_free.index(hash);
        let mut dead = Vec::new();
        {
            let _pin = lock_free.reclaim.pin();
            // SAFETY: pinned; a slot we kill is ours to unlink and retire,
            // so it stays allocated after unpinning until we do.
            unsafe {
                index.for_each(|slot| {
                    // Acquire: the last release's writes (and the fast
                    // acquisition count) happen before we free the slot.
                    if slot
                        .as_ref()
                        .word
                        .compare_exchange(0, DEAD, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        dead.push(slot);
                    }
                });
            }
        }
        let mut shard = self.table.write(hash);
        let Shard {
            occupancy,
            counters,
            sweep_at,
            sweeping,
        } = &mut *shard;
        let mut retired_cells: Option<NonNull<Cells<Slot<K, L>>>> = None;
        for &slot in &dead {
            // SAFETY: we hold the shard lock; we killed the slot, so only we
            // unlink it, and it is allocated until we retire it.
            let s = unsafe { slot.as_ref() };
            // Relaxed: ordered by our Acquire kill above.
            counters.acquisitions += s.fast_acquisitions.load(Ordering::Relaxed);
            // SAFETY: we hold the shard lock.
            let unlinked = unsafe { index.unlink(occupancy, s.hash, slot) };
            debug_assert!(unlinked, "a killed slot was not in the index");
        }
        // SAFETY: we hold the shard lock.
        unsafe {
            index.shrink(
                occupancy,
                |s| s.as_ref().hash,
                |old| retired_cells = Some(old),
            );
        }
        *sweep_at = occupancy.live + occupancy.live.max(SLACK);
        *sweeping = false;
        drop(shard);
        let slots = dead
            .into_iter()
            .map(|slot| (slot.cast(), free_slot::<K, L> as Free));
        let cells = retired_cells.map(|old| (old.cast(), index::free_cells::<Slot<K, L>> as Free));
        // SAFETY: the slots were unlinked above (unreachable for lookups
        // that start now), and are dead; the cell array was replaced by the
        // shrink. Each is retired once.
        unsafe { lock_free.reclaim.retire(slots.chain(cells)) };
    }

    /// A queued waiter's look at its entry, after it was unparked or polled.
    /// With `give_up`, a waiter that was not granted the key leaves the
    /// queue (a timeout, or a dropped future: `cancelled`).
    ///
    /// # Safety
    ///
    /// `slot` and `id` come from a [`Begin::Queued`] for this caller, which
    /// has not yet seen [`Check::Granted`] or [`Check::GaveUp`] for them.
    unsafe fn check(
        &self,
        slot: SlotRef<K, L>,
        id: u64,
        give_up: bool,
        cancelled: bool,
        waker: Option<&Waker>,
    ) -> Check {
        let mut wakes = Wakes::default();
        // SAFETY: we hold or wait for the key, so the slot is live.
        let s = unsafe { slot.get() };
        s.check_not_freed();
        let mut shard = self.table.write(s.hash);
        // SAFETY: we hold the shard lock, and our hold or wait keeps the
        // slot live.
        let state = unsafe { s.state() };
        let Some(at) = state.queue.position(id) else {
            // Handed to us by `dispatch`.
            shard.counters.acquisitions += 1;
            return Check::Granted;
        };
        let Some(waiter) = state.queue.get_mut(at) else {
            unreachable!("position() returned an index in the queue");
        };
        let mode = waiter.data.mode;
        if waiter.data.woken {
            waiter.data.woken = false;
            // Relaxed: while we are queued the word is `SLOW`, changed only
            // under the shard lock, which we hold.
            let holders = s.word.load(Ordering::Relaxed) & HOLDERS;
            if !cancelled && L::can_acquire(holders, mode) {
                state.queue.remove(at);
                update(&s.word, |w| L::acquire(w, mode));
                // The waiters behind may be compatible (readers).
                dispatch::<L>(&s.word, state, &mut wakes);
                s.settle(state);
                shard.counters.acquisitions += 1;
                drop(shard);
                wakes.wake();
                return Check::Granted;
            }
            if !cancelled {
                // A newcomer took it first. It will dispatch on release.
                waiter.data.lost = waiter.data.lost.saturating_add(1);
            }
        }
        if give_up {
            state.queue.remove(at);
            // We may have been the front, or a writer blocking readers
            // behind us, or woken to take a free lock: pass it on.
            dispatch::<L>(&s.word, state, &mut wakes);
            // The slot stays, idle if that was the last interest in it.
            s.settle(state);
            if cancelled {
                shard.counters.cancelled += 1;
            } else {
                shard.counters.timeouts += 1;
            }
            drop(shard);
            wakes.wake();
            return Check::GaveUp;
        }
        if let (Some(waker), Some(waiter)) = (waker, state.queue.get_mut(at)) {
            waiter.unpark.refresh(waker);
        }
        Check::Waiting
    }

    /// Blocks the thread until it holds `key` in `mode`, or `deadline`
    /// passes (then `None`).
    fn acquire_blocking<A: KeyArg<K>>(
        &self,
        mut key: A,
        mode: L::Mode,
        deadline: Option<&Deadline>,
    ) -> Option<SlotRef<K, L>>
    where
        K: Borrow<A::Q>,
    {
        let hash = self.hash(key.get());
        // A timed wait spins without yielding, and stops spinning once its
        // deadline has passed: it then queues, and its first park finds the
        // deadline passed and gives up (see *Spin*).
        let mut spin = match deadline {
            Some(_) => SpinWait::timed(self.pause_rounds),
            None => SpinWait::new(self.pause_rounds),
        };
        let spun_out = |spin: &SpinWait| spin.exhausted() || deadline.is_some_and(Deadline::passed);
        if self.count_spinners {
            if let Fast::Held(slot) = self.fast_acquire(hash, key.get(), mode) {
                return Some(slot);
            }
        } else {
            // Spin on the lock-free path while the key's holders exclude us
            // and nobody waits for it, then queue (see *Spin*).
            loop {
                match self.fast_acquire(hash, key.get(), mode) {
                    Fast::Held(slot) => return Some(slot),
                    Fast::Taken if !spun_out(&spin) => spin.spin(),
                    Fast::Taken | Fast::Slow => break,
                }
            }
        }
        let unpark = || Unpark::current_thread();
        // Set while we are counted as spinning in a slot.
        let mut spinning: Option<SpinCount<'_, K, L, S>> = None;
        let (slot, id) = loop {
            // Counted spinners spin while the budget lasts (counted in the
            // slot), then queue; the others have spun already.
            let counted = self.count_spinners;
            let enqueue = (!counted || spun_out(&spin)).then_some(&unpark as &dyn Fn() -> Unpark);
            let spin_state = counted.then_some(spinning.is_some());
            let begun = self.begin(hash, &mut key, mode, spin_state, enqueue);
            if matches!(begun, Begin::Held(_) | Begin::Queued(..)) {
                // `begin` uncounted us.
                if let Some(count) = spinning.take() {
                    count.disarm();
                }
            }
            match begun {
                Begin::Held(slot) => return Some(slot),
                Begin::Queued(slot, id) => break (slot, id),
                Begin::Spinning(slot) => {
                    spinning = Some(SpinCount {
                        core: self,
                        slot,
                        mode,
                    });
                    spin.spin();
                }
                Begin::Busy => spin.spin(),
            }
        };
        loop {
            let expired = match deadline {
                Some(deadline) => deadline.park(),
                None => {
                    sync::park();
                    false
                }
            };
            // SAFETY: `slot`, `id` are ours from `Begin::Queued`, and we
            // return as soon as the check is final.
            match unsafe { self.check(slot, id, expired, false, None) } {
                Check::Granted => return Some(slot),
                Check::GaveUp => return None,
                Check::Waiting => {}
            }
        }
    }

    /// Blocks the thread until it holds `key` in `mode`. A thread that
    /// waits for a key it holds itself waits forever (see *Reentrancy* on
    /// `KeyedLocks`).
    pub(crate) fn acquire<A: KeyArg<K>>(&self, key: A, mode: L::Mode) -> SlotRef<K, L>
    where
        K: Borrow<A::Q>,
    {
        self.acquire_blocking(key, mode, None)
            .expect("a wait without deadline ends holding the key")
    }

    /// Blocks the thread until it holds `key` in `mode`, for at most
    /// `timeout`; `None` if the key stayed taken.
    pub(crate) fn acquire_for<A: KeyArg<K>>(
        &self,
        key: A,
        mode: L::Mode,
        timeout: std::time::Duration,
    ) -> Option<SlotRef<K, L>>
    where
        K: Borrow<A::Q>,
    {
        self.acquire_blocking(key, mode, Some(&Deadline::after(timeout)))
    }

    /// One acquisition attempt that never waits.
    pub(crate) fn try_acquire<A: KeyArg<K>>(&self, key: A, mode: L::Mode) -> Option<SlotRef<K, L>>
    where
        K: Borrow<A::Q>,
    {
        let mut key = key;
        let hash = self.hash(key.get());
        match self.fast_acquire(hash, key.get(), mode) {
            Fast::Held(slot) => return Some(slot),
            Fast::Taken => return None,
            Fast::Slow => {}
        }
        match self.begin(hash, &mut key, mode, None, None) {
            Begin::Held(slot) => Some(slot),
            Begin::Queued(..) | Begin::Busy | Begin::Spinning(_) => None,
        }
    }

    /// Waits, without blocking the thread, until the task holds `key` in
    /// `mode`. Dropping the future first leaves no trace: a queued waiter
    /// removes itself, and a key handed to it in the meantime is released.
    pub(crate) async fn acquire_async<A: KeyArg<K>>(
        &self,
        mut key: A,
        mode: L::Mode,
    ) -> SlotRef<K, L>
    where
        K: Borrow<A::Q>,
    {
        let hash = self.hash(key.get());
        if let Fast::Held(slot) = self.fast_acquire(hash, key.get(), mode) {
            return slot;
        }
        let mut queued: Option<Queued<'_, K, L, S>> = None;
        poll_fn(|cx| match &queued {
            None => {
                let waker = cx.waker();
                let unpark = || Unpark::Task(waker.clone());
                match self.begin(hash, &mut key, mode, None, Some(&unpark)) {
                    Begin::Held(slot) => Poll::Ready(slot),
                    Begin::Queued(slot, id) => {
                        queued = Some(Queued {
                            core: self,
                            slot,
                            id,
                            mode,
                        });
                        Poll::Pending
                    }
                    Begin::Busy | Begin::Spinning(_) => {
                        unreachable!("begin() with a waker never returns Busy")
                    }
                }
            }
            Some(q) => {
                // SAFETY: `q` holds our `Begin::Queued` result, and is
                // disarmed below as soon as the check is final.
                match unsafe { self.check(q.slot, q.id, false, false, Some(cx.waker())) } {
                    Check::Granted => {
                        let slot = q.slot;
                        if let Some(q) = queued.take() {
                            std::mem::forget(q);
                        }
                        Poll::Ready(slot)
                    }
                    Check::Waiting => Poll::Pending,
                    Check::GaveUp => unreachable!("check() without give_up never gives up"),
                }
            }
        })
        .await
    }
}

/// A blocking caller's count in a slot while it spins for the key. If the
/// caller unwinds before it takes the key or queues (a panic in the key's
/// `Eq` or `Borrow`, which each try runs), dropping this gives the count
/// back, through the slot it holds (no user code runs). Disarmed once
/// `begin` has uncounted the caller.
struct SpinCount<'a, K: Hash + Eq, L: LockKind, S: BuildHasher> {
    core: &'a Core<K, L, S>,
    slot: SlotRef<K, L>,
    mode: L::Mode,
}

impl<K: Hash + Eq, L: LockKind, S: BuildHasher> SpinCount<'_, K, L, S> {
    /// `begin` gave the count back (the caller holds the key or queued).
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl<K: Hash + Eq, L: LockKind, S: BuildHasher> Drop for SpinCount<'_, K, L, S> {
    fn drop(&mut self) {
        // SAFETY: we are counted in the slot, which keeps it live.
        let slot = unsafe { self.slot.get() };
        let shard = self.core.table.write(slot.hash);
        // SAFETY: we hold the shard lock, and our count keeps the slot live.
        let state = unsafe { slot.state() };
        state.stop_spinning(L::is_exclusive(self.mode), &slot.spinning_hint);
        // The slot stays, idle if that was the last interest in it.
        slot.settle(state);
        drop(shard);
    }
}

/// A queued async waiter. Dropping it (the future was cancelled) leaves the
/// queue, or releases the key if it was handed over in the meantime.
struct Queued<'a, K: Hash + Eq, L: LockKind, S: BuildHasher> {
    core: &'a Core<K, L, S>,
    slot: SlotRef<K, L>,
    id: u64,
    mode: L::Mode,
}

impl<K: Hash + Eq, L: LockKind, S: BuildHasher> Drop for Queued<'_, K, L, S> {
    fn drop(&mut self) {
        // SAFETY: an armed `Queued` holds a `Begin::Queued` result whose
        // check has not been final yet.
        match unsafe { self.core.check(self.slot, self.id, true, true, None) } {
            Check::GaveUp => {}
            // SAFETY: the key was handed to us and we give it back.
            Check::Granted => unsafe { self.core.release(self.slot, self.mode) },
            Check::Waiting => unreachable!("check() with give_up is final"),
        }
    }
}

impl<K, L: LockKind, S> Drop for Core<K, L, S> {
    fn drop(&mut self) {
        // Every guard and waiter borrows the map (or an `Arc` of it), so none
        // is left, and no lookup is pinned: free every slot in the indices
        // (retired ones are freed by `Reclaim`'s drop).
        let Some(lock_free) = self.lock_free.try_get() else {
            return;
        };
        let mut slots = Vec::new();
        for index in lock_free.indices.iter() {
            // SAFETY: `&mut self` excludes every other access to the index.
            unsafe {
                index
                    .0
                    .drain(|slot| slots.push((slot.cast(), free_slot::<K, L> as Free)))
            };
        }
        // SAFETY: written by `Block::write` in `insert`; the index held
        // their only references, and `&mut self` excludes every access.
        // Freed once (the indices forgot them).
        unsafe { reclaim::free_all(slots) };
    }
}
