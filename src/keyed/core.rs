//! The entry lifecycle shared by every keyed lock: entries that exist exactly
//! while somebody holds or waits for their key.
//!
//! # Protocol
//!
//! Each shard of the [`Table`] maps keys to heap-allocated [`Slot`]s. A slot
//! holds the key, its hash, the key's lock state (a [`LockKind`]) and the
//! queue of its waiters. **Every read or write of a slot's state happens
//! under its shard's write lock**, and no reference to a slot is handed out
//! except to a holder or a waiter of its key. That is what rules out the
//! removal race by construction: there is no reference count that a lookup
//! could bump on a slot that a releaser is about to free, because lookup,
//! acquisition, release and removal are each one critical section.
//!
//! - **Acquire** ([`Core::begin`]). Find the key's slot or create it, already
//!   held. If it exists, take it if the kind allows and nobody queued may
//!   object (see *fairness*), or else append a waiter to its queue.
//! - **Spin** ([`Core::acquire_blocking`]). A blocking caller that finds
//!   the key taken tries again a few times before it queues, counted in the
//!   slot (`spinning`) from its first failed try until it takes the key or
//!   queues. It holds no reference to the slot meanwhile (each try looks the
//!   key up), but the count keeps the slot in the table, so a key somebody
//!   spins for is not freed and re-created, and a holder can tell that a
//!   thread is about to take it ([`Core::release_if_exclusive_thread_waits`],
//!   for `FileLocks`' hand-over). A caller that unwinds while counted (a
//!   panic in the key's `Eq`) gives its count back on the way out.
//! - **Release** ([`Core::release`]). Drop the holder from the lock state,
//!   then [`dispatch`] the queue. If the slot is now free, its queue empty
//!   and nobody spins for it, remove it from the table (by identity) and
//!   free it after unlocking.
//! - **Wait** ([`Core::check`]). A queued waiter that is unparked (or polled)
//!   looks at its queue entry under the lock. Gone: the lock was handed to
//!   it. Marked woken: the lock was free when it was woken, so it tries to
//!   take it. Its deadline passed, or its future was dropped: it removes its
//!   entry, dispatches the queue in its stead, and removes the slot if that
//!   left it idle.
//!
//! The invariant the protocol keeps, checked after every step: **an entry
//! exists iff its lock is held, its queue is non-empty or a thread spins
//! for it**, and **if the
//! queue is non-empty and its front is not marked woken, the front's mode
//! cannot be granted** (so a later release will dispatch it; no wake-up is
//! lost).
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
//! overtakes a queued waiter that has not been woken; in particular a new
//! reader queues behind a waiting writer, so writers do not starve.

use std::borrow::Borrow;
use std::future::poll_fn;
use std::hash::{BuildHasher, Hash};
use std::panic::Location;
use std::ptr::NonNull;
use std::task::{Poll, Waker};

use hashbrown::HashTable;

use super::block::Block;
use super::kind::LockKind;
use crate::sync::{
    self, AtomicUsize, Deadline, Ordering, ParkingRwLock, PerExecution, ShardLock, SpinWait,
    UnsafeCell, WaitStart,
};
use crate::table::Table;
use crate::wait::{Unpark, WaitList, Waiter};

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

/// A key's lock state and waiters. Only touched under the shard's write lock.
struct SlotState<L: LockKind> {
    lock: L,
    queue: Queue<L::Mode>,
    /// Blocking callers that found the key taken and are spinning before
    /// they queue (see *Spin* in the module docs): they keep the slot.
    spinning: u32,
    /// How many of them want it exclusively.
    spinning_exclusive: u32,
}

impl<L: LockKind> SlotState<L> {
    /// A new state, held in `mode`.
    fn held(mode: L::Mode) -> Self {
        let mut state = Self {
            lock: L::default(),
            queue: Queue::new(),
            spinning: 0,
            spinning_exclusive: 0,
        };
        state.grant(mode);
        state
    }

    /// Records a new holder in `mode`.
    fn grant(&mut self, mode: L::Mode) {
        self.lock.acquire(mode);
    }

    /// Removes a holder in `mode`.
    fn revoke(&mut self, mode: L::Mode) {
        self.lock.release(mode);
    }

    /// Counts a blocking caller that spins for the key in `mode`, and
    /// copies the count of exclusive spinners into `hint` (the slot's
    /// `spinning_hint`).
    fn start_spinning(&mut self, mode: L::Mode, hint: &AtomicUsize) {
        self.spinning += 1;
        self.spinning_exclusive += u32::from(L::is_exclusive(mode));
        Self::publish(self.spinning_exclusive, hint);
    }

    /// Uncounts a spinner that now holds the key or queues for it, as
    /// [`start_spinning`](Self::start_spinning) counted it.
    fn stop_spinning(&mut self, mode: L::Mode, hint: &AtomicUsize) {
        self.spinning -= 1;
        self.spinning_exclusive -= u32::from(L::is_exclusive(mode));
        Self::publish(self.spinning_exclusive, hint);
    }

    fn publish(spinning_exclusive: u32, hint: &AtomicUsize) {
        // Relaxed: a hint, read without the lock by a holder deciding
        // whether to look again (under the lock) for a waiter.
        hint.store(spinning_exclusive as usize, Ordering::Relaxed);
    }

    /// Whether nobody holds, waits or spins for the key.
    fn is_idle(&self) -> bool {
        self.lock.is_free() && self.queue.is_empty() && self.spinning == 0
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

/// One live key: allocated when the key is first acquired, freed when it is
/// neither held, waited for nor spun for.
pub(crate) struct Slot<K, L: LockKind> {
    key: K,
    /// The key's hash under the map's hasher: finds the shard on release and
    /// rehashes without calling user code when the table grows.
    hash: u64,
    state: UnsafeCell<SlotState<L>>,
    /// A copy of `state.spinning_exclusive`, stored under the shard lock
    /// whenever that changes, so that a holder can look without the lock
    /// (a hint: [`Core::exclusive_spinner_hint`]).
    spinning_hint: AtomicUsize,
}

/// A pointer to a live slot, held by the slot's table entry, its holders'
/// guards and its waiters.
pub(crate) struct SlotRef<K, L: LockKind>(NonNull<Slot<K, L>>);

impl<K, L: LockKind> Clone for SlotRef<K, L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, L: LockKind> Copy for SlotRef<K, L> {}

// SAFETY: a `SlotRef` is a shared reference to a `Slot` whose lifetime the
// protocol manages (see `Slot::get`). Through it, other threads read the
// key (`K: Sync`) and drop it when they free the slot (`K: Send`); the lock
// state and waker queue are only touched under the shard lock, which
// serialises those accesses across threads (`L: Send` for the state moving
// between threads with the lock; wakers and thread handles are `Send`).
unsafe impl<K: Send + Sync, L: LockKind + Send> Send for SlotRef<K, L> {}
// SAFETY: as for `Send`: every access through a shared `SlotRef` is either a
// read of the immutable key and hash, or is serialised by the shard lock.
unsafe impl<K: Send + Sync, L: LockKind + Send> Sync for SlotRef<K, L> {}

impl<K, L: LockKind> SlotRef<K, L> {
    /// The slot.
    ///
    /// # Safety
    ///
    /// The slot must be live: the caller holds its key, waits in its queue,
    /// or holds its shard lock and found it in the table. A slot is freed
    /// only by [`Core::remove_if_idle`], under the shard lock, when it is
    /// neither held, waited for nor spun for.
    unsafe fn get<'a>(self) -> &'a Slot<K, L> {
        // SAFETY: live, per this function's contract.
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
    /// The lock state.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock of this slot's shard, and lets the
    /// returned reference go before unlocking. That lock is what makes the
    /// access exclusive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state(&self) -> &mut SlotState<L> {
        // SAFETY: exclusive per this function's contract.
        self.state.with_mut(|state| unsafe { &mut *state })
    }
}

impl<K, L: LockKind> Slot<K, L> {
    /// The lock state, for reading.
    ///
    /// # Safety
    ///
    /// The caller holds a lock (read or write) of this slot's shard, and
    /// lets the returned reference go before unlocking.
    unsafe fn state_ref(&self) -> &SlotState<L> {
        // SAFETY: writes need the shard's write lock, which the caller's
        // lock excludes.
        self.state.with(|state| unsafe { &*state })
    }
}

/// Counters kept per shard, under the shard lock, so that they add no shared
/// cache line to any path: the shard's line is already owned by whoever
/// holds its write lock.
#[derive(Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) acquisitions: u64,
    pub(crate) contended: u64,
    pub(crate) timeouts: u64,
    pub(crate) cancelled: u64,
    /// The most slots this shard has held at once.
    peak: usize,
}

/// One shard: the live slots of its keys, and its counters.
pub(crate) struct Shard<K, L: LockKind> {
    slots: HashTable<SlotRef<K, L>>,
    counters: Counters,
}

impl<K, L: LockKind> Default for Shard<K, L> {
    fn default() -> Self {
        Self {
            slots: HashTable::new(),
            counters: Counters::default(),
        }
    }
}

/// What is left of a removed slot: dropped after the shard is unlocked.
struct Freed<K, L: LockKind> {
    _key: K,
    _state: UnsafeCell<SlotState<L>>,
    /// The slot's memory, returned to this thread's block cache on drop.
    _memory: Block<Slot<K, L>>,
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

/// Hands the key on after its state changed (a release, a cancelled waiter, a
/// woken waiter that took it): see *Fairness* in the module docs.
fn dispatch<L: LockKind>(state: &mut SlotState<L>, wakes: &mut Wakes) {
    let Some(front) = state.queue.front_mut() else {
        return;
    };
    if front.data.woken || !state.lock.can_acquire(front.data.mode) {
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
        if !state.lock.can_acquire(front.data.mode) {
            break;
        }
        let Some(waiter) = state.queue.pop_front() else {
            break;
        };
        state.grant(waiter.data.mode);
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

/// What [`Core::check`] found.
enum Check {
    Granted,
    Waiting,
    GaveUp,
}

/// A keyed lock map: the table of slots, and the lifecycle operations that
/// every front-end (`KeyedLocks`, `KeyedRwLocks`) shares.
pub(crate) struct Core<K, L: LockKind, S> {
    table: Table<ParkingRwLock<Shard<K, L>>, S>,
    /// The largest total of live keys seen when some shard reached a new
    /// high; written only then, so it stays out of every hot path.
    peak: PerExecution<AtomicUsize>,
    /// Where the map was created (`#[track_caller]`), for `Debug`.
    created_at: &'static Location<'static>,
    /// How many of a blocking caller's spins pause before the rest yield
    /// (see [`SpinWait`]).
    pause_rounds: u32,
}

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
            peak: sync::per_execution!(zero),
            created_at,
            pause_rounds: SpinWait::PAUSE_ROUNDS,
        }
    }

    /// The same map, whose blocking callers spin longer before they yield
    /// ([`SpinWait::LONG_PAUSE_ROUNDS`], for `FileLocks`).
    #[cfg(target_os = "linux")]
    pub(crate) fn spinning_longer(mut self) -> Self {
        self.pause_rounds = SpinWait::LONG_PAUSE_ROUNDS;
        self
    }

    /// Where the map was created.
    pub(crate) fn created_at(&self) -> &'static Location<'static> {
        self.created_at
    }

    pub(crate) fn hasher(&self) -> &S {
        self.table.hasher()
    }

    /// The number of live keys (held or waited for), summed shard by shard.
    pub(crate) fn len(&self) -> usize {
        let mut len = 0;
        self.table.for_each_shard(|shard| len += shard.slots.len());
        len
    }

    /// The counters of every shard, summed, with the live keys and the
    /// sampled peak.
    pub(crate) fn counters(&self) -> (Counters, usize, usize) {
        let mut sum = Counters::default();
        let mut live = 0;
        self.table.for_each_shard(|shard| {
            let c = &shard.counters;
            sum.acquisitions += c.acquisitions;
            sum.contended += c.contended;
            sum.timeouts += c.timeouts;
            sum.cancelled += c.cancelled;
            live += shard.slots.len();
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
                live += shard.slots.len();
            }
        }
        // Relaxed: a statistic; no other memory is published through it.
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    /// Removes `slot` if it is neither held, waited for nor spun for. Its key, state
    /// and memory are moved out, to be dropped after unlocking (dropping a
    /// key runs user code, which must not run under our lock; the memory goes
    /// back to this thread's [`Block`] cache).
    fn remove_if_idle(shard: &mut Shard<K, L>, slot: SlotRef<K, L>) -> Option<Freed<K, L>> {
        // SAFETY: the caller holds the shard's write lock, and `slot` is live
        // (it is still in the table: only this function removes it).
        let (idle, hash) = unsafe {
            let s = slot.get();
            let state = s.state();
            (state.is_idle(), s.hash)
        };
        if !idle {
            return None;
        }
        // Found by identity, not by key: no user `Eq` runs, and a slot can
        // never be confused with another for an equal key.
        let entry = shard.slots.find_entry(hash, |s| s.0 == slot.0).ok()?;
        entry.remove();
        let raw = slot.0.as_ptr();
        // SAFETY: the table entry just removed was the slot's last
        // reference: it is idle, so no guard or waiter points to it, and we
        // hold the shard lock, so no lookup is reading it. Its fields are
        // moved out exactly once, and its memory (from `Block::write` in
        // `begin`) is handed back to a `Block`, which frees it once.
        unsafe {
            Some(Freed {
                _key: std::ptr::read(&raw const (*raw).key),
                _state: std::ptr::read(&raw const (*raw).state),
                _memory: Block::from_raw(slot.0),
            })
        }
    }

    /// Releases a hold in `mode` and hands the key on.
    ///
    /// # Safety
    ///
    /// The caller holds `slot`'s key in `mode` and gives up that hold.
    pub(crate) unsafe fn release(&self, slot: SlotRef<K, L>, mode: L::Mode) {
        // SAFETY: we hold the key, so the slot is live.
        let hash = unsafe { slot.get().hash };
        let shard = self.table.write(hash);
        // SAFETY: we hold the shard lock and the key.
        unsafe { Self::release_locked(shard, slot, mode) }
    }

    /// The release itself, under the shard lock `shard`: drop the holder,
    /// then hand the key on, or free the slot if that left it idle (after
    /// unlocking).
    ///
    /// # Safety
    ///
    /// `shard` is `slot`'s shard, locked; the caller holds `slot`'s key in
    /// `mode` and gives up that hold.
    unsafe fn release_locked(
        mut shard: <ParkingRwLock<Shard<K, L>> as ShardLock>::Write<'_>,
        slot: SlotRef<K, L>,
        mode: L::Mode,
    ) {
        // SAFETY: we hold the shard lock, and the key keeps the slot live.
        let state = unsafe { slot.get().state() };
        state.revoke(mode);
        if !state.queue.is_empty() {
            return Self::release_contended(shard, slot);
        }
        let freed = Self::remove_if_idle(&mut shard, slot);
        drop(shard);
        drop(freed);
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
        let hash = unsafe { slot.get().hash };
        let shard = self.table.write(hash);
        // SAFETY: we hold the shard lock, and our hold keeps the slot live.
        let state = unsafe { slot.get().state_ref() };
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

    /// The rest of a release when waiters are queued, still under the shard
    /// lock: dispatch them, and wake them after unlocking.
    #[cold]
    fn release_contended(
        mut shard: <ParkingRwLock<Shard<K, L>> as ShardLock>::Write<'_>,
        slot: SlotRef<K, L>,
    ) {
        let mut wakes = Wakes::default();
        // SAFETY: we hold the shard lock, and the slot is live: its queue is
        // not empty.
        dispatch(unsafe { slot.get().state() }, &mut wakes);
        let freed = Self::remove_if_idle(&mut shard, slot);
        drop(shard);
        wakes.wake();
        drop(freed);
    }
}

impl<K: Hash + Eq, L: LockKind, S: BuildHasher> Core<K, L, S> {
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.table.hash(key)
    }

    /// Whether `key` is held right now.
    pub(crate) fn is_held<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let shard = self.table.read(hash);
        // SAFETY: slots in the table are live while we hold its lock.
        let found = shard
            .slots
            .find(hash, |s| unsafe { s.get() }.key.borrow() == key);
        // SAFETY: we hold the shard lock for reading, and the state is only
        // written under its write lock.
        found.is_some_and(|slot| !unsafe { slot.get().state_ref() }.lock.is_free())
    }

    /// One acquisition attempt: the check and the act in one critical
    /// section. `enqueue`: how to wake the caller if it must wait; without
    /// it, a taken key returns [`Begin::Busy`] and nothing changes.
    /// A caller may take a free key while waiters are queued if the front
    /// one was woken and has not come back yet (see *Fairness*). `spin`:
    /// `None` for a
    /// caller that does not spin; for a blocking caller, whether it is
    /// counted as spinning for the key already. One that is not is counted
    /// on [`Begin::Busy`]; one that is stops being counted when it takes the
    /// key or queues.
    #[inline]
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
        let Shard { slots, counters } = &mut *shard;
        let entry = {
            let q = key.get();
            slots.entry(
                hash,
                // SAFETY: slots in the table are live while we hold its lock
                // (`shard` above).
                |s| unsafe { s.get() }.key.borrow() == q,
                // SAFETY: the same; a resize calls this inside this critical
                // section.
                |s| unsafe { s.get() }.hash,
            )
        };
        let slot = match entry {
            hashbrown::hash_table::Entry::Occupied(occupied) => *occupied.get(),
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                // A counted spinner keeps its slot.
                assert_ne!(spin, Some(true), "a spinner's slot was removed");
                let value = Slot {
                    key: key.take(),
                    hash,
                    state: UnsafeCell::new(SlotState::held(mode)),
                    spinning_hint: AtomicUsize::new(0),
                };
                // The pointer owns the block; `remove_if_idle` (or the
                // map's drop) takes it back.
                let slot = SlotRef(Block::new().write(value));
                vacant.insert(slot);
                counters.acquisitions += 1;
                let len = slots.len();
                if len > counters.peak {
                    counters.peak = len;
                    self.sample_peak(self.table.index(hash), len);
                }
                return Begin::Held(slot);
            }
        };
        // SAFETY: we hold the shard lock, and the slot is in the table.
        let (state, hint) = unsafe { (slot.get().state(), &slot.get().spinning_hint) };
        // A newcomer may take a grantable lock unless somebody queued has
        // not yet been offered it (then the front waiter is owed it).
        let may_take = state.queue.front().is_none_or(|front| front.data.woken);
        if may_take && state.lock.can_acquire(mode) {
            if spin == Some(true) {
                state.stop_spinning(mode, hint);
            }
            state.grant(mode);
            counters.acquisitions += 1;
            return Begin::Held(slot);
        }
        let Some(make_unpark) = enqueue else {
            if spin == Some(false) {
                state.start_spinning(mode, hint);
                return Begin::Spinning(slot);
            }
            return Begin::Busy;
        };
        if spin == Some(true) {
            state.stop_spinning(mode, hint);
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
        counters.contended += 1;
        Begin::Queued(slot, id)
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
        let hash = unsafe { slot.get().hash };
        let mut shard = self.table.write(hash);
        // SAFETY: we hold the shard lock, and our hold or wait keeps the
        // slot live.
        let state = unsafe { slot.get().state() };
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
            if !cancelled && state.lock.can_acquire(mode) {
                state.queue.remove(at);
                state.grant(mode);
                // The waiters behind may be compatible (readers).
                dispatch(state, &mut wakes);
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
            dispatch(state, &mut wakes);
            if cancelled {
                shard.counters.cancelled += 1;
            } else {
                shard.counters.timeouts += 1;
            }
            let freed = Self::remove_if_idle(&mut shard, slot);
            drop(shard);
            wakes.wake();
            drop(freed);
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
        let unpark = || Unpark::current_thread();
        let mut spin = SpinWait::new(self.pause_rounds);
        // Set while we are counted as spinning in a slot.
        let mut spinning: Option<SpinCount<'_, K, L, S>> = None;
        let (slot, id) = loop {
            // Spin while the budget lasts (counted in the slot), then queue.
            let enqueue = spin.exhausted().then_some(&unpark as &dyn Fn() -> Unpark);
            let begun = self.begin(hash, &mut key, mode, Some(spinning.is_some()), enqueue);
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
/// back, by the slot's identity (no user code), and frees the slot if that
/// left it idle. Disarmed once `begin` has uncounted the caller.
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
        let hash = unsafe { self.slot.get().hash };
        let mut shard = self.core.table.write(hash);
        // SAFETY: we hold the shard lock, and our count keeps the slot live.
        let slot = unsafe { self.slot.get() };
        // SAFETY: the same.
        unsafe { slot.state() }.stop_spinning(self.mode, &slot.spinning_hint);
        let freed = Core::<K, L, S>::remove_if_idle(&mut shard, self.slot);
        drop(shard);
        drop(freed);
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
        // is left and every slot is gone already; free any left anyway.
        for index in 0..self.table.shards() {
            let mut shard = self.table.write_at(index);
            for slot in shard.slots.drain() {
                // SAFETY: written by `Block::write` in `begin`; the table
                // held its only reference, and `&mut self` excludes every
                // access. The value is dropped once, then its memory freed.
                unsafe {
                    std::ptr::drop_in_place(slot.0.as_ptr());
                    drop(Block::from_raw(slot.0));
                }
            }
        }
    }
}
