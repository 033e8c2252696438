//! The in-process layer of [`FileLocks`](crate::FileLocks), written against
//! the file-system trait [`Fs`] like the on-disk protocol, so that the loom
//! models in `loom-tests/file_locks.rs` run this code over a simulated file
//! system too.
//!
//! Callers of one process queue on an in-process
//! [`KeyedRwLocks`](crate::KeyedRwLocks) keyed by the same key first (the
//! *key*, below); only the holder of the key talks to the OS. On top of
//! that:
//!
//! - **Shared holders share one OS lock.** The process's shared holders of
//!   a key count themselves in `shared`, which holds the one descriptor.
//!   Creating and giving up that descriptor is serialised per key by
//!   `gate`; joining it only takes `shared`'s mutex, under which the last
//!   holder's removal happens too.
//! - **Exclusive hand-over without syscalls.** An exclusive holder that
//!   releases while a thread of this process waits to write the key next
//!   (blocked at the front of its queue, or spinning for it with nobody
//!   queued: [`KeyWriteGuard::release_if_blocked_writer_waits`]) *parks* its OS lock
//!   (descriptor, still locked) in the key's in-process entry
//!   ([`LayerKey`]), then releases the key. Not for a task at the front: it
//!   runs only when its executor polls it, maybe much later, and a parked
//!   lock would keep other processes out meanwhile; not for a reader, which
//!   cannot use it. Whoever takes the key next takes the parked lock first
//!   thing: an exclusive taker holds the OS lock without a syscall; a
//!   shared taker releases it (the protocol's release: unlink, unlock,
//!   close) and takes a shared one. The lock is continuously held by this
//!   process across a hand-over, and only an exclusive holder may unlink
//!   the name, so the name still names the parked descriptor's file: no
//!   re-check is needed.
//! - **No orphaned lock.** A parked lock must not outlive the interest in
//!   its key. The holder looks for a waiting writer and releases the key in
//!   one step (under the shard lock:
//!   [`KeyWriteGuard::release_if_blocked_writer_waits`]), so the lock is
//!   parked only while that writer is queued or spinning. A queued thread
//!   that is woken takes the key even if its deadline has passed, and a
//!   spinner takes it or queues; whoever takes the key first takes the
//!   lock (a reader gives it up). So a parked lock is always taken. As a
//!   safety net it lives in the key's entry: were the entry freed with a
//!   lock still parked in it, freeing it would release the lock through the
//!   protocol (in the deleting mode, unlink first), and nothing would leak.
//!   The net is slow to close: an idle entry is freed only once a sweep of
//!   its shard (run by inserts of new keys) kills it and a later
//!   retirement frees it (see `src/keyed/core.rs`), so a lock orphaned
//!   there would keep the name locked until then. The protocol above is
//!   what keeps that from happening.
//! - **Kept descriptors** (keeping mode only). A release that gives the
//!   OS lock up unlocks the descriptor and keeps it open in `idle` (at most
//!   `cap`, the oldest closed first); the next OS acquisition of the name
//!   locks it instead of opening the name. The protocol's re-check makes
//!   that sound (see *Kept descriptors* in `protocol.rs`). The deleting
//!   mode keeps none: its released files are gone.
//! - **A bounded chain.** The OS lock is not handed over once this process
//!   has held it for [`MAX_CHAIN`] (5 ms), nor after [`MAX_HANDOVERS`]
//!   hand-overs in a row; the next release then goes to the OS (unlock, and
//!   in the deleting mode unlink), where other processes' waiters can take
//!   it. Every release reads the clock: the kernel's coarse one where its
//!   tick is shorter than 5 ms (a few nanoseconds a read), allowing for the
//!   tick, so that a chain may end sooner than 5 ms but never later.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
#[cfg(not(toctou_loom))]
use std::time::Instant;

use super::idle::Idle;
use super::protocol::{self, Failed, Fs, Mode, Wait};
use crate::sync::{AtomicPtr, Mutex, Ordering};
use crate::{KeyReadGuard, KeyWriteGuard, KeyedLocks, KeyedRwLocks, LazyRandomState};

/// The most hand-overs in a row before a release goes to the OS. The time
/// bound, [`MAX_CHAIN`], is normally the one that ends a chain (a hot key
/// hands over in about 100-200 ns, so 50,000 take 5-10 ms); this one bounds
/// it where time does not pass (loom) and against a clock that stands
/// still. (It was 1,000 at first, which ended a hot key's chain every
/// 0.2 ms: in the deleting mode that is a delete and a create each time.)
pub const MAX_HANDOVERS: u32 = 50_000;

/// How long this process may keep an OS lock across hand-overs; a release
/// after that goes to the OS. (Not applied under loom, where time does not
/// pass: the count bounds the chain there.)
pub const MAX_CHAIN: Duration = Duration::from_millis(5);

/// Where a hand-over chain stands: how many hand-overs so far, and when the
/// OS lock was taken.
#[derive(Clone, Copy, Debug)]
struct Chain {
    handovers: u32,
    #[cfg(not(toctou_loom))]
    since: ChainClock,
}

/// When a chain began, on the clock [`ChainClock::now`] reads.
#[cfg(not(toctou_loom))]
#[derive(Clone, Copy, Debug)]
enum ChainClock {
    /// `CLOCK_MONOTONIC_COARSE`, in nanoseconds.
    Coarse(u64),
    /// `Instant`, where the coarse clock's tick is too long.
    Precise(Instant),
}

/// The coarse clock's tick (`clock_getres`), if it is short enough to time
/// a chain with: less than [`MAX_CHAIN`].
#[cfg(not(toctou_loom))]
fn coarse_tick() -> Option<u64> {
    static TICK: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `res` is a valid, writable `timespec`.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        let tick =
            u64::try_from(res.tv_sec).ok()? * 1_000_000_000 + u64::try_from(res.tv_nsec).ok()?;
        (ok && tick > 0 && u128::from(tick) < MAX_CHAIN.as_nanos()).then_some(tick)
    })
}

/// `CLOCK_MONOTONIC_COARSE` now, in nanoseconds.
#[cfg(not(toctou_loom))]
fn coarse_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec`. The clock exists on
    // every Linux since 2.6.32; were the call to fail, `now` stays 0 and
    // the chain ends at once (the safe direction).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(not(toctou_loom))]
impl ChainClock {
    fn now() -> Self {
        match coarse_tick() {
            Some(_) => Self::Coarse(coarse_now()),
            None => Self::Precise(Instant::now()),
        }
    }

    /// Whether [`MAX_CHAIN`] may have passed since `self`. On the coarse
    /// clock (which lags real time by less than a tick) a reading is off by
    /// less than a tick either way, so this answers yes from `MAX_CHAIN`
    /// minus a tick on: a chain may end sooner than 5 ms, never later. A
    /// coarse reading costs a few nanoseconds, `Instant::now` about 25 (on
    /// every release of a hot key, that was a sixth of a hand-over).
    fn passed(self) -> bool {
        match self {
            Self::Coarse(since) => {
                let tick = coarse_tick().unwrap_or(0);
                let limit = u64::try_from(MAX_CHAIN.as_nanos())
                    .unwrap_or(u64::MAX)
                    .saturating_sub(tick);
                // A reading that went backwards (it cannot) ends the chain.
                coarse_now().checked_sub(since).is_none_or(|d| d >= limit)
            }
            Self::Precise(since) => since.elapsed() >= MAX_CHAIN,
        }
    }
}

impl Chain {
    fn start() -> Self {
        Self {
            handovers: 0,
            #[cfg(not(toctou_loom))]
            since: ChainClock::now(),
        }
    }

    /// The chain after one more hand-over.
    fn next(mut self) -> Self {
        self.handovers += 1;
        self
    }

    /// Whether the lock may be handed over once more. The clock is read on
    /// every release: a chain of long holds must end as soon as 5 ms have
    /// passed, not some hand-overs later.
    fn may_continue(&self) -> bool {
        #[cfg(not(toctou_loom))]
        if self.since.passed() {
            return false;
        }
        self.handovers < MAX_HANDOVERS
    }
}

/// An exclusive OS lock of this process, held by a caller or parked in its
/// key's entry for the next taker. Carries what releasing it needs, so that
/// freeing the entry can release it.
struct OsLock<F: Fs> {
    fd: F::Fd,
    chain: Chain,
    fs: Arc<F>,
    name: String,
    delete: bool,
}

/// The layer's in-process key: the caller's key, and the exclusive OS lock
/// parked for its next taker, if any. Only the key's string is hashed and
/// compared.
pub struct LayerKey<F: Fs> {
    key: String,
    /// Null, or a parked lock from `Box::into_raw`, owned by the entry.
    parked: AtomicPtr<OsLock<F>>,
    /// The entry owns what `parked` points to: `Send`/`Sync` as that is
    /// (an `AtomicPtr` alone is both whatever it points to).
    _owns: PhantomData<Box<OsLock<F>>>,
}

impl<F: Fs> LayerKey<F> {
    /// The caller's key.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// Parks `os`. Only the key's exclusive holder parks, and it took out
    /// what was parked before (or found nothing), so nothing is replaced;
    /// were something there, it would be released, not leaked.
    fn park(&self, os: Box<OsLock<F>>) {
        // AcqRel, with `take_parked`'s: the lock's descriptor and state
        // move to whoever takes it (the key's hand-over orders the two
        // anyway, through the shard lock).
        let before = self.parked.swap(Box::into_raw(os), Ordering::AcqRel);
        debug_assert!(before.is_null(), "a parked lock was replaced");
        if !before.is_null() {
            // SAFETY: a non-null pointer here came from `Box::into_raw`,
            // and the swap took it out: we are its only owner.
            release_os(*unsafe { Box::from_raw(before) });
        }
    }

    /// Takes the parked lock out, if any.
    fn take_parked(&self) -> Option<Box<OsLock<F>>> {
        let raw = self.parked.swap(std::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: a non-null pointer here came from `Box::into_raw` in
        // `park`, and the swap took it out: no other party can take it
        // again, so this is its only owner.
        (!raw.is_null()).then(|| unsafe { Box::from_raw(raw) })
    }
}

impl<F: Fs> Drop for LayerKey<F> {
    /// The entry is freed: nobody holds, waits or spins for the key any
    /// more, so nobody will take a lock parked here (the protocol does not
    /// leave one: see *No orphaned lock* in the module docs; this is the
    /// safety net). Release it. A failure is not reported (the parker's
    /// release has returned); the descriptor is closed whatever happens
    /// (dropping the lock), and a file it could not unlink is accepted by
    /// the next locker.
    fn drop(&mut self) {
        if let Some(os) = self.take_parked() {
            release_os(*os);
        }
    }
}

/// Releases an exclusive OS lock through the protocol (in the deleting
/// mode, unlink first), ignoring a failure: the descriptor is closed
/// whatever happens, and a file it could not unlink is accepted by the next
/// locker.
fn release_os<F: Fs>(os: OsLock<F>) {
    let OsLock {
        fd,
        fs,
        name,
        delete,
        ..
    } = os;
    let _ = protocol::release(&*fs, &name, fd, Mode::Exclusive, delete);
}

impl<F: Fs> Hash for LayerKey<F> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        KeyStr::<F>::new(&self.key).hash(state);
    }
}

impl<F: Fs> PartialEq for LayerKey<F> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl<F: Fs> Eq for LayerKey<F> {}

/// A borrowed [`LayerKey`]: the `str` it is looked up by.
#[repr(transparent)]
pub struct KeyStr<F: Fs> {
    _fs: PhantomData<fn() -> F>,
    key: str,
}

impl<F: Fs> KeyStr<F> {
    fn new(key: &str) -> &Self {
        let raw: *const str = key;
        // SAFETY: `KeyStr` is `repr(transparent)` over `str` (its other
        // field is a zero-sized `PhantomData` with alignment 1), so the two
        // have the same layout and pointer metadata (the length), and the
        // reference keeps `key`'s lifetime.
        unsafe { &*(raw as *const Self) }
    }
}

impl<F: Fs> Hash for KeyStr<F> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl<F: Fs> PartialEq for KeyStr<F> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl<F: Fs> Eq for KeyStr<F> {}

impl<F: Fs> Borrow<KeyStr<F>> for LayerKey<F> {
    fn borrow(&self) -> &KeyStr<F> {
        KeyStr::new(&self.key)
    }
}

impl<F: Fs> ToOwned for KeyStr<F> {
    type Owned = LayerKey<F>;

    fn to_owned(&self) -> LayerKey<F> {
        LayerKey {
            key: self.key.to_owned(),
            parked: AtomicPtr::new(std::ptr::null_mut()),
            _owns: PhantomData,
        }
    }
}

/// The layer's in-process guards.
pub type WriteKey<'a, F> = KeyWriteGuard<'a, LayerKey<F>>;
/// A shared hold of the layer's in-process key.
pub type ReadKey<'a, F> = KeyReadGuard<'a, LayerKey<F>>;

/// This process's shared OS lock of a key, and how many of its callers
/// hold it.
struct SharedOs<Fd> {
    fd: Fd,
    holders: usize,
}

/// The in-process layer over the file system `F`.
pub struct Layer<F: Fs> {
    fs: Arc<F>,
    delete: bool,
    keyed: KeyedRwLocks<LayerKey<F>>,
    gate: KeyedLocks<String>,
    shared: Mutex<HashMap<String, SharedOs<F::Fd>, LazyRandomState>>,
    idle: Mutex<Idle<F::Fd>>,
}

/// A held key: the in-process key and the OS lock (exclusive), or a count
/// in the process's shared OS lock (shared).
pub struct Hold<'a, F: Fs> {
    inner: Inner<'a, F>,
}

enum Inner<'a, F: Fs> {
    Exclusive {
        /// Boxed: a hand-over moves it twice, into the entry and out.
        os: Box<OsLock<F>>,
        key: WriteKey<'a, F>,
    },
    /// Counted in `Layer::shared` until released; `name`: the key's file.
    Shared { key: ReadKey<'a, F>, name: String },
}

impl<F: Fs> Hold<'_, F> {
    /// The held key.
    pub fn key(&self) -> &str {
        match &self.inner {
            Inner::Exclusive { key, .. } => key.key().as_str(),
            Inner::Shared { key, .. } => key.key().as_str(),
        }
    }

    /// Whether it is held shared.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, Inner::Shared { .. })
    }

    /// The name of the key's file.
    pub fn name(&self) -> &str {
        match &self.inner {
            Inner::Exclusive { os, .. } => &os.name,
            Inner::Shared { name, .. } => name,
        }
    }
}

impl<F: Fs> Layer<F> {
    /// A layer over `fs`; `delete`: the deleting mode.
    pub fn new(fs: F, delete: bool) -> Self {
        Self {
            fs: Arc::new(fs),
            delete,
            keyed: KeyedRwLocks::new().spinning_longer(),
            gate: KeyedLocks::new(),
            shared: Mutex::new(HashMap::with_hasher(LazyRandomState::new())),
            idle: Mutex::new(Idle::new(0)),
        }
    }

    /// In the keeping mode, keep up to `cap` descriptors of released keys
    /// open for their next acquisition (see the module docs). Ignored in
    /// the deleting mode.
    #[must_use]
    pub fn keeping_idle(self, cap: usize) -> Self {
        let cap = if self.delete { 0 } else { cap };
        Self {
            idle: Mutex::new(Idle::new(cap)),
            ..self
        }
    }

    /// How many descriptors are kept idle now.
    pub fn idle_len(&self) -> usize {
        self.idle.lock().len()
    }

    /// Closes every kept descriptor; returns how many there were.
    pub fn close_idle(&self) -> usize {
        let fds = self.idle.lock().drain();
        fds.len()
    }

    /// Takes the OS lock of `name` in `mode` (the protocol's acquire),
    /// through the descriptor kept for it if there is one. If opening fails
    /// for want of descriptors (`EMFILE`, `ENFILE`) while some are kept
    /// idle, closes those and tries once more.
    pub fn os_acquire(&self, name: &str, mode: Mode, wait: Wait) -> Result<Option<F::Fd>, Failed> {
        let mut reuse = self.take_idle(name);
        let result = protocol::acquire_reusing(&*self.fs, name, mode, wait, &mut reuse);
        if let Some(fd) = reuse {
            // A try that found the lock held elsewhere: keep its descriptor
            // (unlocked) for the next try, in the keeping mode.
            self.keep_idle(name, fd);
        }
        match result {
            Err(failed) if failed.step == "open" && out_of_descriptors(&failed.error) => {
                if self.close_idle() == 0 {
                    return Err(failed);
                }
                protocol::acquire(&*self.fs, name, mode, wait)
            }
            result => result,
        }
    }

    /// Keeps `fd` (unlocked) open for the next acquisition of `name`, in the
    /// keeping mode; closes it in the deleting mode.
    fn keep_idle(&self, name: &str, fd: F::Fd) {
        if self.delete {
            return;
        }
        let closed = self.idle.lock().keep(name, fd);
        drop(closed); // closed outside the mutex
    }

    fn take_idle(&self, name: &str) -> Option<F::Fd> {
        // Not even the mutex in the deleting mode (its cap is fixed at 0).
        if self.delete {
            return None;
        }
        self.idle.lock().take(name)
    }

    /// Gives up the OS lock `fd` of `name`, held in `mode`: the protocol's
    /// release, or in the keeping mode an unlock that keeps the descriptor
    /// open for the next acquisition of the name.
    fn give_up(&self, name: &str, fd: F::Fd, mode: Mode) -> Result<(), Failed> {
        if self.delete {
            return protocol::release(&*self.fs, name, fd, mode, true);
        }
        let fd = protocol::unlock_keeping(&*self.fs, fd)?;
        self.keep_idle(name, fd);
        Ok(())
    }

    /// The file system.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// Takes `key` for writing (exclusive callers), waiting as long as it
    /// takes.
    pub fn write(&self, key: &str) -> WriteKey<'_, F> {
        self.keyed.write(KeyStr::new(key))
    }

    /// Takes `key` for writing if nobody holds it or is queued for it.
    pub fn try_write(&self, key: &str) -> Option<WriteKey<'_, F>> {
        self.keyed.try_write(KeyStr::new(key))
    }

    /// Takes `key` for writing, waiting at most `timeout`.
    pub fn try_write_for(&self, key: &str, timeout: Duration) -> Option<WriteKey<'_, F>> {
        self.keyed.try_write_for(KeyStr::new(key), timeout)
    }

    /// Takes `key` for writing without blocking the thread.
    pub async fn write_async(&self, key: &str) -> WriteKey<'_, F> {
        self.keyed.write_async(KeyStr::new(key)).await
    }

    /// Takes `key` for reading (shared callers), waiting as long as it
    /// takes.
    pub fn read(&self, key: &str) -> ReadKey<'_, F> {
        self.keyed.read(KeyStr::new(key))
    }

    /// Takes `key` for reading if no writer holds it or is queued for it.
    pub fn try_read(&self, key: &str) -> Option<ReadKey<'_, F>> {
        self.keyed.try_read(KeyStr::new(key))
    }

    /// Takes `key` for reading, waiting at most `timeout`.
    pub fn try_read_for(&self, key: &str, timeout: Duration) -> Option<ReadKey<'_, F>> {
        self.keyed.try_read_for(KeyStr::new(key), timeout)
    }

    /// Takes `key` for reading without blocking the thread.
    pub async fn read_async(&self, key: &str) -> ReadKey<'_, F> {
        self.keyed.read_async(KeyStr::new(key)).await
    }

    /// Whether no key is held or waited for in this process (for the loom
    /// models).
    #[cfg(toctou_loom)]
    pub fn is_empty(&self) -> bool {
        self.keyed.is_empty()
    }

    /// Serialises this process's shared callers of a key while they create
    /// or give up its shared OS lock.
    pub fn gate(&self) -> &KeyedLocks<String> {
        &self.gate
    }

    /// Right after taking `key` for writing: the OS lock parked for it, if
    /// any, or the key back (then take the OS lock and call
    /// [`exclusive`](Self::exclusive)).
    pub fn take_parked<'a>(&'a self, key: WriteKey<'a, F>) -> Result<Hold<'a, F>, WriteKey<'a, F>> {
        match key.key().take_parked() {
            Some(os) => Ok(Hold {
                inner: Inner::Exclusive { os, key },
            }),
            None => Err(key),
        }
    }

    /// An exclusive hold of `key` with the OS lock `fd` of the file `name`,
    /// just taken.
    pub fn exclusive<'a>(&'a self, key: WriteKey<'a, F>, name: String, fd: F::Fd) -> Hold<'a, F> {
        let os = Box::new(OsLock {
            fd,
            chain: Chain::start(),
            fs: Arc::clone(&self.fs),
            name,
            delete: self.delete,
        });
        Hold {
            inner: Inner::Exclusive { os, key },
        }
    }

    /// Right after taking `key` for reading: releases an exclusive OS lock
    /// parked for it, if any (a reader cannot use it; a newcomer that
    /// barged in ahead of the writer it was parked for gets here). A
    /// failure is not reported: it was the parker's release, which has
    /// returned; the descriptor is closed whatever happens (dropping the
    /// lock), and a file it could not unlink is accepted by the next locker.
    pub fn release_parked(&self, key: &ReadKey<'_, F>) {
        if let Some(os) = key.key().take_parked() {
            let OsLock { fd, name, .. } = *os;
            let _ = self.give_up(&name, fd, Mode::Exclusive);
        }
    }

    /// Joins this process's shared OS lock of the key (file `name`) if there
    /// is one; gives the read key and the name back if there is none.
    pub fn join_existing<'a>(
        &'a self,
        key: ReadKey<'a, F>,
        name: String,
    ) -> Result<Hold<'a, F>, (ReadKey<'a, F>, String)> {
        let joined = match self.shared.lock().get_mut(key.key().as_str()) {
            Some(os) => {
                os.holders += 1;
                true
            }
            None => false,
        };
        if !joined {
            return Err((key, name));
        }
        Ok(Hold {
            inner: Inner::Shared { key, name },
        })
    }

    /// A shared hold with the shared OS lock `fd`, just taken by the caller,
    /// which holds the key's gate and found no shared lock to join.
    pub fn join_new<'a>(&'a self, key: ReadKey<'a, F>, name: String, fd: F::Fd) -> Hold<'a, F> {
        let os = SharedOs { fd, holders: 1 };
        self.shared.lock().insert(key.key().as_str().to_owned(), os);
        Hold {
            inner: Inner::Shared { key, name },
        }
    }

    /// Releases `hold`: hands an exclusive OS lock over to a waiter of this
    /// process if the chain allows, else gives it up through the protocol;
    /// then releases the in-process key. A failure comes with the key and
    /// the file's name.
    pub fn release(&self, hold: Hold<'_, F>) -> Result<(), Released> {
        match hold.inner {
            Inner::Exclusive { mut os, key } => {
                let key = if os.chain.may_continue() {
                    os.chain = os.chain.next();
                    // Parked while we hold the key: its next taker finds
                    // it, or freeing the entry releases it (see the module
                    // docs). Taken back if nobody waits for it.
                    let linger = os.chain.handovers > 1;
                    key.key().park(os);
                    match hand_over(key, linger) {
                        Ok(()) => return Ok(()),
                        Err(key) => {
                            // We held the key throughout, so nobody else
                            // took it.
                            os = key.key().take_parked().expect("parked while held");
                            key
                        }
                    }
                } else {
                    key
                };
                let OsLock { fd, name, .. } = *os;
                let released = self
                    .give_up(&name, fd, Mode::Exclusive)
                    .map_err(|failed| (key.key().as_str().to_owned(), name, failed));
                drop(key);
                released
            }
            Inner::Shared { key, name } => {
                let k = key.key().as_str();
                let last = {
                    let _gate = self.gate.lock(k);
                    let mut shared = self.shared.lock();
                    let last = match shared.get_mut(k) {
                        Some(os) => {
                            os.holders -= 1;
                            os.holders == 0
                        }
                        None => unreachable!("a shared holder is counted"),
                    };
                    let os = if last { shared.remove(k) } else { None };
                    drop(shared);
                    // Released under the gate: a shared caller that finds
                    // no shared lock to join takes a new one only after.
                    os.map(|os| self.give_up(&name, os.fd, Mode::Shared))
                };
                let released = last
                    .unwrap_or(Ok(()))
                    .map_err(|failed| (k.to_owned(), name, failed));
                drop(key);
                released
            }
        }
    }
}

/// Releases `key` if a thread of this process waits to write it next (see
/// [`KeyWriteGuard::release_if_blocked_writer_waits`]), else gives it back.
/// With `linger` (the key was handed over in this process just before: it
/// is contended here), a release that finds nobody waiting watches the
/// entry's spinner hint for a moment ([`LINGER_LOOKS`] looks, about a
/// microsecond) and looks again under the lock when it shows a spinner:
/// the thread that released the key before us is usually on its way back
/// to it, and going to the OS costs it far more (in the deleting mode, a
/// delete and a create: tens of microseconds). Watching the hint takes no
/// lock, so it does not slow that thread down.
fn hand_over<F: Fs>(mut key: WriteKey<'_, F>, linger: bool) -> Result<(), WriteKey<'_, F>> {
    match key.release_if_blocked_writer_waits() {
        Ok(()) => return Ok(()),
        Err(back) => key = back,
    }
    if linger {
        for _ in 0..LINGER_LOOKS {
            crate::sync::spin_pause(LINGER_PAUSE);
            if key.writer_spins_hint() {
                return key.release_if_blocked_writer_waits();
            }
        }
    }
    Err(key)
}

/// How often a release after a handed-over hold watches the spinner hint
/// (once under loom, where a look is a yield: more would only multiply the
/// models' interleavings), and how many pause instructions lie between two
/// looks.
#[cfg(not(toctou_loom))]
const LINGER_LOOKS: u32 = 16;
#[cfg(toctou_loom)]
const LINGER_LOOKS: u32 = 1;
const LINGER_PAUSE: u32 = 16;

/// A failed release: the key, the file's name, and the failed step.
pub type Released = (String, String, Failed);

/// Whether `error` says the process or the system is out of descriptors.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(all(test, not(toctou_loom)))]
mod tests {
    use super::{Chain, MAX_CHAIN};

    /// The time bound holds on every release, whatever the count: a chain
    /// of long holds ends once 5 ms have passed. (Failed when the clock was
    /// read only every 16th hand-over.)
    #[test]
    #[cfg_attr(miri, ignore = "miri has no coarse clock")]
    fn a_chain_ends_once_its_time_has_passed_whatever_its_count() {
        let mut chain = Chain::start();
        chain.handovers = 1;
        std::thread::sleep(MAX_CHAIN + std::time::Duration::from_millis(1));
        assert!(!chain.may_continue());
        chain.handovers = 16;
        assert!(!chain.may_continue());
    }
}
