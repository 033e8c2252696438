//! The per-thread cache behind [`RegistryCell::get`](super::RegistryCell::get),
//! and the writers' sweep that takes replaced instances back from it.
//!
//! Each thread keeps a [`Record`]: for each cell it reads, one [`Entry`] with
//! the [`Key`] (cell id and generation) of the instance it last saw, and a
//! [`Block`]. The block owns one strong count of the instance's `Arc` and
//! counts the `RegistryRef`s this thread made from it. A cache hit costs two
//! comparisons, a load and a store of the block's count, and a load of its
//! `doomed` flag; dropping the `RegistryRef` costs the same. None of it is a
//! read-modify-write, a lock or a hardware fence, and all of it is memory
//! that only this thread writes.
//!
//! # Taking replaced instances back
//!
//! A cached block keeps its instance alive. So that an idle thread cannot
//! keep a replaced instance alive, every thread's record is listed in
//! [`records`], and a writer that publishes generation `g` of a cell sweeps
//! them ([`reclaim`]):
//!
//! 1. it marks every cached block of that cell older than `g` `doomed`;
//! 2. it runs the heavy side of the asymmetric barrier
//!    ([`barrier::heavy`](crate::sync::barrier));
//! 3. it takes back (`stolen`) the count of every block it doomed that has
//!    no reference, and gives those counts back once it holds no lock.
//!
//! A reader announces itself before it uses a block: it stores `refs + 1`,
//! runs the light side of the barrier, and only then checks `doomed`; if the
//! block is doomed it backs off to the slow path. That is Dekker's
//! hand-shake: for each block, either the writer's step 3 sees the reader's
//! reference (and leaves the block alone), or the reader sees `doomed` (and
//! never touches the instance). The last reference to drop does the mirror
//! image: it stores `refs - 1`, runs the light barrier and checks `doomed`;
//! if either the sweep saw no reference or the drop saw `doomed` (or both),
//! the count is given back, exactly once: the record's lock and the block's
//! `stolen` flag decide who gives it.
//!
//! A thread that fills its cache re-checks the cell's generation under its
//! record's lock, so it cannot cache a block that a sweep has already gone
//! past (the sweep takes the same lock).
//!
//! # Lifetime rules
//!
//! - A block's *memory* is alive while a cache entry points at it, or while
//!   a reference made from it is alive (`refs > 0`). Whichever ends last
//!   frees it: the cache when it *retires* the block (a newer generation or
//!   another cell took the entry, or the thread is exiting) and no reference
//!   is left, or else the last reference's drop, or the thread itself when a
//!   drop finds its block doomed ([`evict`]). Writers never free a block's
//!   memory; they reach blocks only through entries, under the record's lock.
//! - A block's *count* (its strong count of the instance) is given back when
//!   its memory is freed, unless a sweep stole it first.
//! - So a replaced instance is released exactly when its last reader lets go:
//!   the sweep of the `reinit` that replaced it releases every count that no
//!   reference holds, before `reinit` returns, and each thread that does hold
//!   one releases it when its last reference drops. A thread that is idle,
//!   parked or blocked keeps nothing alive.
//! - A `RegistryRef` may outlive its thread's cache (in another thread-local's
//!   destructor): its block is retired and lives on until the ref drops.

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::sync::{
    AtomicBool, AtomicU64, AtomicUsize, Counter, Mutex, Ordering, UnsafeCell, barrier,
    const_thread_local, global_ref, loom_const_fn, unique_id,
};

/// How many cells a thread caches at once (a power of two). A cell's slot is
/// fixed by its id; the first `SLOTS` cells a process publishes get distinct
/// slots. Two cells that share a slot and are read alternately take the slow
/// path (a mutex and an `Arc` clone) on each read, but stay correct.
///
/// Under `toctou_loom` there is one slot: every cell shares it, so the models
/// exercise slot sharing, and the work a thread's exit does does not depend
/// on which slot a process-wide counter gave a cell (loom needs each
/// execution to replay the same steps).
const SLOTS: usize = if cfg!(toctou_loom) { 1 } else { 16 };
const SLOT_BITS: u32 = SLOTS.trailing_zeros();

/// The key of a vacant entry. Cell ids come from [`new_cell_id`], never this.
const VACANT: Key = Key {
    id: u64::MAX,
    generation: 0,
};

/// Which instance: a cell's id and a generation of that cell. Ids are never
/// reused and generations only grow, so a key names one instance for the
/// life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) id: u64,
    pub(super) generation: u64,
}

/// A fresh, non-zero cell id whose low bits pick its cache slot, round-robin
/// over the cells of the process.
pub(super) fn new_cell_id() -> u64 {
    static SLOT: Counter = Counter::starting_at(0);
    // The unique part keeps the id unique; the slot part only spreads cells
    // over slots. `unique_id() >= 1`, so the id is never 0 (an empty cell's)
    // and, below 2^60 ids, never `VACANT.id`.
    (unique_id() << SLOT_BITS) | (SLOT.next() % SLOTS as u64)
}

/// A strong count of an instance, to give back once no lock is held
/// (giving it back may run the instance's `drop`, which is user code).
#[must_use = "a count that is not given back leaks its instance"]
pub(super) struct Count {
    ptr: NonNull<()>,
    release: unsafe fn(NonNull<()>),
}

impl Count {
    /// Gives the count back.
    pub(super) fn give_back(self) {
        // SAFETY: a `Count` is made only from a block's count, once, by the
        // one party that owns it (`Block::free` or a sweep that set
        // `stolen`), and `give_back` consumes it.
        unsafe { (self.release)(self.ptr) };
    }
}

/// # Safety
///
/// `ptr` came from `Arc::<T>::into_raw` and its count is the caller's to give.
unsafe fn release_arc<T>(ptr: NonNull<()>) {
    // SAFETY: forwarded from the caller.
    drop(unsafe { Arc::from_raw(ptr.as_ptr().cast_const().cast::<T>()) });
}

/// One thread's references to one instance, and the strong count of the
/// instance's `Arc` that keeps it alive for them. See the module docs.
///
/// Aligned to 128 bytes (two cache lines, the unit that x86's adjacent-line
/// prefetcher pairs) so that no two threads' blocks share a line: each read
/// writes its block, and blocks of different threads that shared a line
/// would make readers on different cores contend for it, although no
/// reader ever touches another thread's block.
#[repr(align(128))]
pub(super) struct Block {
    key: Key,
    /// `Arc::into_raw` of an `Arc<T>` whose count this block owns.
    ptr: NonNull<()>,
    /// Gives that count back: `release_arc::<T>`.
    release: unsafe fn(NonNull<()>),
    /// How many `RegistryRef`s of the owning thread point here. Only that
    /// thread writes it, with a load and a store (never a read-modify-write);
    /// a sweep reads it.
    refs: AtomicUsize,
    /// The instance has been replaced: a reader that announced itself and
    /// then sees this backs off, and the last reference to drop gives the
    /// count back. Set by a sweep (under the record's lock), never cleared.
    doomed: AtomicBool,
    /// A sweep has given the count back. Read and written under the record's
    /// lock only, while an entry points here.
    stolen: UnsafeCell<bool>,
    /// No cache entry points here any more: the owning thread alone can reach
    /// the block. Only the owning thread reads or writes it.
    retired: Cell<bool>,
}

impl Block {
    /// A block with one reference, owning a count of `instance`.
    fn new<T>(key: Key, instance: Arc<T>) -> NonNull<Block> {
        let ptr = Arc::into_raw(instance).cast_mut().cast::<()>();
        let block = Box::new(Block {
            key,
            ptr: NonNull::new(ptr).expect("Arc::into_raw is never null"),
            release: release_arc::<T>,
            refs: AtomicUsize::new(1),
            doomed: AtomicBool::new(false),
            stolen: UnsafeCell::new(false),
            retired: Cell::new(false),
        });
        NonNull::from(Box::leak(block))
    }

    /// Marks the block as no longer in the cache, and frees it if no
    /// reference is left. Returns the count to give back, if it freed the
    /// block and no sweep had stolen it.
    ///
    /// # Safety
    ///
    /// `block` is alive and this thread's; the caller holds its record's
    /// lock, and has just made the entry that pointed at it point elsewhere;
    /// it does not use `block` again.
    unsafe fn retire(block: NonNull<Block>) -> Option<Count> {
        // SAFETY: alive and this thread's, per the caller.
        let b = unsafe { block.as_ref() };
        b.retired.set(true);
        // Relaxed: only this thread writes `refs`.
        if b.refs.load(Ordering::Relaxed) != 0 {
            return None;
        }
        // SAFETY: retired and unreferenced, per the above and the caller.
        unsafe { Block::free(block) }
    }

    /// Frees the block's memory, and returns its count unless a sweep stole
    /// it. Out of line: only retirement, eviction and the drop of a retired
    /// block's last reference get here.
    ///
    /// # Safety
    ///
    /// `block` is alive and this thread's, no entry points at it (it is
    /// retired, or its entry was just emptied under the record's lock, so no
    /// sweep can reach it), and no reference is left; it is not used again.
    #[cold]
    #[inline(never)]
    unsafe fn free(block: NonNull<Block>) -> Option<Count> {
        // SAFETY: the block came from `Box::leak` in `Block::new`; nothing
        // points at it any more (per the caller), so this is its one free.
        let b = unsafe { Box::from_raw(block.as_ptr()) };
        // SAFETY: a sweep writes `stolen` only under the record's lock while
        // an entry points at the block; the entry stopped pointing here under
        // that lock, which this thread took after the sweep released it.
        let stolen = b.stolen.with(|stolen| unsafe { *stolen });
        (!stolen).then_some(Count {
            ptr: b.ptr,
            release: b.release,
        })
    }
}

/// One thread's view of one cell. Only the owning thread writes it, always
/// under its record's lock; the owning thread reads it without the lock, and
/// a sweep reads it under the lock.
struct Entry {
    key: UnsafeCell<Key>,
    /// Valid while `key != VACANT`.
    block: UnsafeCell<NonNull<Block>>,
}

impl Entry {
    loom_const_fn! {
        fn vacant() -> Self {
            Self {
                key: UnsafeCell::new(VACANT),
                block: UnsafeCell::new(NonNull::dangling()),
            }
        }
    }

    /// The entry's key. The caller is the owning thread, or holds the lock.
    #[inline]
    fn key(&self) -> Key {
        // SAFETY: writes happen only on the owning thread under the lock;
        // per the caller, this read is on that thread or under that lock.
        self.key.with(|key| unsafe { *key })
    }

    /// The entry's block, which is valid only if its key is not `VACANT`.
    /// As for `key`.
    #[inline]
    fn block_unchecked(&self) -> NonNull<Block> {
        // SAFETY: as in `key`.
        self.block.with(|block| unsafe { *block })
    }

    /// The entry's block, if it has one. As for `key`.
    #[inline]
    fn block(&self) -> Option<NonNull<Block>> {
        (self.key() != VACANT).then(|| self.block_unchecked())
    }

    /// Points the entry at `block` for `key` (or empties it, with `VACANT`),
    /// and returns the block it pointed at. The caller is the owning thread
    /// and holds the lock.
    fn set(&self, key: Key, block: NonNull<Block>) -> Option<NonNull<Block>> {
        let old = self.block();
        // SAFETY: the owning thread under the lock, per the caller: no other
        // access is in progress (sweeps read under the lock, and the owning
        // thread is here).
        self.block.with_mut(|b| unsafe { *b = block });
        // SAFETY: as above.
        self.key.with_mut(|k| unsafe { *k = key });
        old
    }
}

/// One thread's cache, reachable by writers' sweeps through [`records`].
///
/// In std builds it is the thread-local itself: it has no destructor, so
/// reading it is a plain thread-local access with no liveness check (that
/// check cost about a third of `get`'s time where we measured), and its
/// address is stable for the thread's life. [`EXIT`]'s destructor takes it
/// off [`records`] and empties it when the thread exits.
pub(super) struct Record {
    /// Held by the owning thread while it changes `entries`, and by a sweep
    /// while it reads them.
    lock: Mutex<()>,
    entries: [Entry; SLOTS],
    /// The list this record is on, once it is. Only the owning thread reads
    /// or writes it. (Kept so that `close` need not look the list up: under
    /// loom a thread's locals may be destroyed after the model's statics.)
    listed: Cell<Option<&'static Mutex<Vec<Listed>>>>,
}

/// A record's address, as listed in [`records`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct Listed(NonNull<Record>);

// SAFETY: a listed record is alive until its thread takes it off the list
// (`Record::close`), and other threads only lock its mutex and, holding it,
// read its entries and the blocks they point at (`reclaim`), as the record's
// and the blocks' field docs allow.
unsafe impl Send for Listed {}

global_ref! {
    /// Every thread that has cached an instance, for [`reclaim`].
    fn records() -> &'static Mutex<Vec<Listed>> = Mutex::new(Vec::new());
}

// In std builds the record is never dropped (`ManuallyDrop`), whatever the
// platform's `Mutex` needs: so the thread-local has no destructor (and no
// liveness check on access) anywhere, and its memory stays valid until the
// thread's thread-locals are freed, after `EXIT`'s destructor has taken it
// off the list. (On Linux a std `Mutex` needs no drop; where it is a boxed
// pthread mutex, that box leaks once per exiting thread that read a cell.)
#[cfg(not(toctou_loom))]
const_thread_local! {
    static CACHE: std::mem::ManuallyDrop<Record> = std::mem::ManuallyDrop::new(Record::new());
}
#[cfg(toctou_loom)]
const_thread_local! {
    static CACHE: Record = Record::new();
}

/// Empties [`CACHE`] when the thread exits. Armed by the first entry a
/// thread caches; once its destructor has started, nothing more is cached.
struct ExitHook;

const_thread_local! {
    static EXIT: ExitHook = ExitHook;
}

impl Drop for ExitHook {
    fn drop(&mut self) {
        // Under loom this finds the record already destroyed (loom destroys
        // a thread's locals together), and the record's own destructor does
        // the work.
        let _ = CACHE.try_with(|cache| cache.close());
    }
}

/// Loom destroys all of a thread's locals at once, so [`ExitHook`] cannot
/// reach the record there: the record closes itself. (Loom's thread-locals
/// check liveness on every access anyway.)
#[cfg(toctou_loom)]
impl Drop for Record {
    fn drop(&mut self) {
        self.close();
    }
}

impl Record {
    /// A record with no entries.
    #[cfg(not(toctou_loom))]
    const fn new() -> Self {
        Self {
            lock: Mutex::new(()),
            entries: [const { Entry::vacant() }; SLOTS],
            listed: Cell::new(None),
        }
    }

    /// A record with no entries (loom's constructors are not `const`).
    #[cfg(toctou_loom)]
    fn new() -> Self {
        Self {
            lock: Mutex::new(()),
            entries: std::array::from_fn(|_| Entry::vacant()),
            listed: Cell::new(None),
        }
    }

    #[inline]
    // Under loom `SLOTS` is 1 (see there).
    #[cfg_attr(toctou_loom, allow(clippy::modulo_one))]
    fn entry(&self, id: u64) -> &Entry {
        // Truncating on 32-bit targets is fine: only the low bits are used.
        &self.entries[id as usize % SLOTS]
    }

    /// Caches `block` as `key`'s, retiring the block it replaces, unless the
    /// cell has published a newer generation than `key`'s: a sweep may have
    /// passed this record already, and would not take the block back. Says
    /// whether it cached the block.
    fn install(&self, key: Key, block: NonNull<Block>, generation: &AtomicU64) -> bool {
        if self.listed.get().is_none() {
            let list = records();
            list.lock().push(Listed(NonNull::from(self)));
            self.listed.set(Some(list));
        }
        let replaced = {
            let _lock = self.lock.lock();
            // Acquire: pairs with the Release store in `publish`. A sweep of
            // a newer generation either took this lock before us (and then we
            // see its generation here, through the lock) or takes it after us
            // (and then it sees the block we install).
            if generation.load(Ordering::Acquire) != key.generation {
                return false;
            }
            // SAFETY: the entry pointed at `old` until just now, so it is
            // alive, and it is this thread's; we hold the lock.
            self.entry(key.id)
                .set(key, block)
                .and_then(|old| unsafe { Block::retire(old) })
        };
        // After the lock: giving a count back may run an instance's `drop`,
        // which may read a cell.
        if let Some(count) = replaced {
            count.give_back();
        }
        true
    }

    /// Takes the record off [`records`] and empties every entry, when the
    /// thread exits. Blocks with references left are freed by their last
    /// reference.
    fn close(&self) {
        let Some(list) = self.listed.get() else {
            return;
        };
        // Entry by entry, each count given back before the next entry is
        // emptied, and the record listed until the end: an instance's `drop`
        // may block, and meanwhile sweeps still take the other entries'
        // instances back. (Nothing new is cached: `armed` says no now.)
        for entry in &self.entries {
            let count = {
                let _lock = self.lock.lock();
                // SAFETY: the entry pointed at `old` until just now; this
                // thread's, under the lock.
                entry
                    .set(VACANT, NonNull::dangling())
                    .and_then(|old| unsafe { Block::retire(old) })
            };
            if let Some(count) = count {
                count.give_back();
            }
        }
        let mut records = list.lock();
        let me = Listed(NonNull::from(self));
        if let Some(at) = records.iter().position(|&r| r == me) {
            records.swap_remove(at);
        }
    }
}

/// Whether this thread's cache may take an entry: arms [`EXIT`] on first
/// use, and says no once the thread is exiting (`EXIT`'s destructor has
/// started), since nothing would empty the cache again.
fn armed() -> bool {
    EXIT.try_with(|_| ()).is_ok()
}

/// Counts one more reference to `block`'s instance, then checks that no
/// sweep has doomed it (the reader's side of the module docs' hand-shake).
/// If one has, takes the reference back and returns `false`.
///
/// # Safety
///
/// `block` is alive and this thread's.
#[inline]
unsafe fn announce(block: NonNull<Block>) -> bool {
    // SAFETY: per the caller.
    let b = unsafe { block.as_ref() };
    // Relaxed: only this thread writes `refs`; the barrier below orders the
    // store before the `doomed` load.
    let n = b.refs.load(Ordering::Relaxed).wrapping_add(1);
    if n == 0 {
        // Only `mem::forget` can get here, and a wrapped count would free
        // the block under live references: abort, as `Rc` does.
        std::process::abort();
    }
    b.refs.store(n, Ordering::Relaxed);
    barrier::light();
    // Relaxed: after the barrier. A sweep stores `doomed` before its heavy
    // barrier and loads `refs` after it: either it sees our reference, or we
    // see its mark here.
    if b.doomed.load(Ordering::Relaxed) {
        // SAFETY: we just counted this reference; the block is alive.
        unsafe { unpin(block) };
        return false;
    }
    true
}

/// This thread's block for `key`, if it caches `key`. The block stays alive
/// until this thread next touches the cache or a `RegistryRef`.
#[inline]
fn cached(key: Key) -> Option<NonNull<Block>> {
    CACHE
        .try_with(|cache| {
            let entry = cache.entry(key.id);
            (entry.key() == key).then(|| entry.block_unchecked())
        })
        .ok()
        .flatten()
}

/// If this thread caches `key` (and no sweep has doomed it), counts one more
/// reference to it and returns its block and instance (an `Arc::into_raw`
/// pointer).
#[inline]
pub(super) fn pin_cached(key: Key) -> Option<(NonNull<Block>, NonNull<()>)> {
    let block = cached(key)?;
    // SAFETY: the entry points at the block, so it is alive, and it is this
    // thread's.
    if !unsafe { announce(block) } {
        return None;
    }
    // SAFETY: we hold a reference; the block is alive.
    Some((block, unsafe { block.as_ref() }.ptr))
}

/// Makes a block with one reference for `key`'s `instance`, and caches it
/// in place of whatever this thread cached in its slot, unless `generation`
/// (the cell's published generation) has moved past `key`'s or this thread
/// is exiting: then the block is born retired, and its references alone
/// keep it.
pub(super) fn fill<T>(key: Key, instance: Arc<T>, generation: &AtomicU64) -> NonNull<Block> {
    // Before the block can be announced on the fast path.
    barrier::prepare();
    let block = Block::new(key, instance);
    let installed = armed()
        && CACHE
            .try_with(|cache| cache.install(key, block, generation))
            .unwrap_or(false);
    if !installed {
        // SAFETY: just made, and this thread's.
        unsafe { block.as_ref() }.retired.set(true);
    }
    block
}

/// Counts one more reference to `block`'s instance.
///
/// # Safety
///
/// `block` is alive (a reference of this thread holds it) and this thread's.
#[inline]
pub(super) unsafe fn pin(block: NonNull<Block>) {
    // SAFETY: per the caller.
    let b = unsafe { block.as_ref() };
    // Relaxed: only this thread writes `refs`, and it is already non-zero,
    // so no sweep can take the count back meanwhile.
    let n = b.refs.load(Ordering::Relaxed).wrapping_add(1);
    if n == 0 {
        std::process::abort();
    }
    b.refs.store(n, Ordering::Relaxed);
}

/// Counts one reference fewer to `block`'s instance. The last one frees a
/// retired block, and gives the count back if a sweep doomed the block.
///
/// # Safety
///
/// `block` is alive and this thread's, and the caller's reference, now
/// dropping, was counted in it.
#[inline]
pub(super) unsafe fn unpin(block: NonNull<Block>) {
    // SAFETY: per the caller.
    let b = unsafe { block.as_ref() };
    // Relaxed load: only this thread writes `refs`. Release store: a sweep
    // that reads the 0 with Acquire, and then gives the count back, does so
    // after this thread's last use of the instance.
    let n = b.refs.load(Ordering::Relaxed) - 1;
    b.refs.store(n, Ordering::Release);
    if n != 0 {
        return;
    }
    if b.retired.get() {
        // SAFETY: retired (no entry, no sweep can reach it), and that was
        // the last reference.
        if let Some(count) = unsafe { Block::free(block) } {
            count.give_back();
        }
        return;
    }
    barrier::light();
    // Relaxed: after the barrier, as in `announce`: either the sweep that
    // doomed the block sees `refs == 0` and takes the count back, or we see
    // `doomed` here (or both; `evict` sorts that out under the lock).
    if b.doomed.load(Ordering::Relaxed) {
        // SAFETY: alive, this thread's, in its entry, unreferenced.
        unsafe { evict(block) };
    }
}

/// Empties the entry of a doomed block whose last reference just dropped,
/// frees the block and gives its count back, unless a sweep took it.
///
/// # Safety
///
/// `block` is alive, this thread's, not retired (so this thread's record has
/// an entry pointing at it), and unreferenced.
#[cold]
#[inline(never)]
unsafe fn evict(block: NonNull<Block>) {
    // SAFETY: per the caller.
    let key = unsafe { block.as_ref() }.key;
    let count = CACHE.try_with(|cache| {
        let _lock = cache.lock.lock();
        let entry = cache.entry(key.id);
        // Cheap, and on a cold path: a block that is neither retired nor in
        // its entry would mean a refresh lost track of it.
        assert!(
            entry.block() == Some(block),
            "toctou: a RegistryCell cache block is neither retired nor cached"
        );
        entry.set(VACANT, NonNull::dangling());
        // SAFETY: the entry no longer points at the block, under the lock;
        // unreferenced per the caller.
        unsafe { Block::free(block) }
    });
    // An unretired block means the record is alive: the thread's exit
    // retires every block. Should that ever fail, the block leaks rather
    // than being freed under a sweep's feet.
    if let Ok(Some(count)) = count {
        count.give_back();
    }
}

/// Takes back every count that this thread's and every other thread's cache
/// holds for cell `id` at a generation older than `generation`, unless a
/// reference holds it (that reference's drop gives it back), and returns
/// them for the caller to give back once it holds no lock. The writer's side
/// of the module docs' hand-shake. `generation` is `u64::MAX` when the cell
/// itself is dropped.
///
/// The caller publishes `generation` (or drops the cell) before calling this,
/// and no other sweep of the same cell runs at the same time (the cell's
/// builder lock, or `&mut` access, serialises them): a sweep takes back only
/// blocks it doomed itself, before its own barrier.
#[must_use = "the counts taken back must be given back, once no lock is held"]
pub(super) fn reclaim(id: u64, generation: u64) -> Vec<Count> {
    let stale = |key: Key| key.id == id && key.generation < generation;
    let records = records().lock();
    // The records where this pass doomed a block: the only ones the second
    // pass needs to visit again.
    let mut doomed = Vec::new();
    for &listed in records.iter() {
        // SAFETY: listed, so alive (see `Listed`).
        let record = unsafe { listed.0.as_ref() };
        let _lock = record.lock.lock();
        for entry in &record.entries {
            let Some(block) = entry.block().filter(|_| stale(entry.key())) else {
                continue;
            };
            // SAFETY: the entry points at it, under the lock: alive.
            let b = unsafe { block.as_ref() };
            // SAFETY: under the lock (see `Block::stolen`).
            if !b.stolen.with(|stolen| unsafe { *stolen }) {
                // Relaxed: the barrier below orders it before our `refs`
                // loads, and before the owner's `doomed` loads that follow
                // its own (light) barrier.
                b.doomed.store(true, Ordering::Relaxed);
                if doomed.last() != Some(&listed) {
                    doomed.push(listed);
                }
            }
        }
    }
    if doomed.is_empty() {
        return Vec::new();
    }
    barrier::heavy();
    let mut counts = Vec::new();
    for Listed(record) in doomed {
        // SAFETY: listed (we hold the list's lock), so alive (see `Listed`).
        let record = unsafe { record.as_ref() };
        let _lock = record.lock.lock();
        for entry in &record.entries {
            let Some(block) = entry.block().filter(|_| stale(entry.key())) else {
                continue;
            };
            // SAFETY: the entry points at it, under the lock: alive.
            let b = unsafe { block.as_ref() };
            // Relaxed: we stored it (or an earlier sweep did, before its own
            // barrier); an entry installed after our first pass is not stale
            // (`Record::install` re-checks the generation under the lock).
            let ours = b.doomed.load(Ordering::Relaxed);
            // Acquire: pairs with the Release store in `unpin`, so that the
            // owner's last use of the instance happens before we give it back.
            if ours && b.refs.load(Ordering::Acquire) == 0 {
                // SAFETY: under the lock (see `Block::stolen`).
                let stolen = b
                    .stolen
                    .with_mut(|stolen| unsafe { std::mem::replace(&mut *stolen, true) });
                if !stolen {
                    counts.push(Count {
                        ptr: b.ptr,
                        release: b.release,
                    });
                }
            }
        }
    }
    // Given back by the caller, outside every lock (the cell's builder lock
    // included): an instance's `drop` may read or reinitialise a cell.
    counts
}

/// The instance a block holds: an `Arc::into_raw` pointer.
///
/// # Safety
///
/// `block` is alive.
pub(super) unsafe fn instance(block: NonNull<Block>) -> NonNull<()> {
    // SAFETY: per the caller.
    unsafe { block.as_ref() }.ptr
}

/// The key a block was made for.
///
/// # Safety
///
/// `block` is alive.
pub(super) unsafe fn key(block: NonNull<Block>) -> Key {
    // SAFETY: per the caller.
    unsafe { block.as_ref() }.key
}
