//! The per-thread cache behind [`RegistryCell::get`](super::RegistryCell::get).
//!
//! Each thread keeps, for each cell it reads, one [`Entry`]: the [`Key`] (cell
//! id and generation) of the instance it last saw, and a [`Block`]. The block
//! owns one strong count of the instance's `Arc` and counts the `RegistryRef`s
//! this thread made from it. A cache hit costs two comparisons and one
//! increment; dropping the `RegistryRef` costs one decrement and one test. All
//! of it is memory that only this thread touches: no shared counter, no
//! `RefCell` flag, and the drop does not even look the cache up.
//!
//! # Lifetime rules
//!
//! - A block is alive while a cache entry points at it, or while a reference
//!   made from it is alive (`refs > 0`). Whichever ends last frees it
//!   and gives its strong count back: the cache when it *retires* the block
//!   (a newer generation or another cell took the entry, or the thread is
//!   exiting) and no reference is left, or else the last reference's drop.
//! - So a replaced instance is released by this thread exactly when its last
//!   reader on this thread lets go, or, if none holds it, when the thread next
//!   reads the cell or exits. A `RegistryRef` may even outlive its thread's
//!   cache (in another thread-local's destructor): its block lives on.
//! - A block never leaves its thread: `RegistryRef` is neither `Send` nor
//!   `Sync`, and the cache is thread-local. That is what makes plain `Cell`s
//!   enough.

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::sync::{Counter, const_thread_local, unique_id};

/// How many cells a thread caches at once (a power of two). A cell's slot is
/// fixed by its id; the first `SLOTS` cells a process publishes get distinct
/// slots. Two cells that share a slot and are read alternately take the slow
/// path (a mutex and an `Arc` clone) on each read, but stay correct.
const SLOTS: usize = 16;
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
    /// How many `RegistryRef`s of this thread point here.
    refs: Cell<usize>,
    /// No cache entry points here any more.
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
            refs: Cell::new(1),
            retired: Cell::new(false),
        });
        NonNull::from(Box::leak(block))
    }

    /// Marks the block as no longer in the cache, and frees it if no
    /// reference is left.
    ///
    /// # Safety
    ///
    /// As `free_if_done`; no cache entry points at `block` any more.
    unsafe fn retire(block: NonNull<Block>) {
        // SAFETY: alive and this thread's, per the caller.
        unsafe { block.as_ref() }.retired.set(true);
        // SAFETY: per the caller; not used again.
        unsafe { Block::free_if_done(block) };
    }

    /// Frees the block and gives its count back, if it is retired and has no
    /// references left. Out of line: only retirement and the drop of a
    /// retired block's references get here.
    ///
    /// # Safety
    ///
    /// `block` is alive (see the module docs) and this thread's, and the
    /// caller does not use it again if it was freed.
    #[cold]
    #[inline(never)]
    unsafe fn free_if_done(block: NonNull<Block>) {
        // SAFETY: alive and this thread's, per the caller.
        let b = unsafe { block.as_ref() };
        if !b.retired.get() || b.refs.get() != 0 {
            return;
        }
        let (ptr, release) = (b.ptr, b.release);
        // SAFETY: the block came from `Box::leak` in `Block::new`; nothing
        // points at it any more (retired: no entry; refs == 0: no
        // reference), so this is its one free.
        drop(unsafe { Box::from_raw(block.as_ptr()) });
        // After the free: `T::drop` may read a cell and reach this cache.
        // SAFETY: the count the block owned; the block is gone, and with it
        // every way to read the instance through this count.
        unsafe { release(ptr) };
    }
}

/// # Safety
///
/// `ptr` came from `Arc::<T>::into_raw` and its count is the caller's to give.
unsafe fn release_arc<T>(ptr: NonNull<()>) {
    // SAFETY: forwarded from the caller.
    drop(unsafe { Arc::from_raw(ptr.as_ptr().cast_const().cast::<T>()) });
}

/// One thread's view of one cell. Plain `Cell`s: only this thread reads or
/// writes it, and a `Cell` can be read again after user code (an instance's
/// `drop`) has re-entered the cache.
struct Entry {
    key: Cell<Key>,
    /// Valid while `key != VACANT`.
    block: Cell<NonNull<Block>>,
}

impl Entry {
    const fn vacant() -> Self {
        Self {
            key: Cell::new(VACANT),
            block: Cell::new(NonNull::dangling()),
        }
    }

    /// Empties the entry and retires its block, if it had one.
    fn retire(&self) {
        if self.key.replace(VACANT) != VACANT {
            // SAFETY: an entry's block is alive while the entry points at it
            // (module docs), and the cache is this thread's; the entry is
            // vacant now.
            unsafe { Block::retire(self.block.get()) };
        }
    }
}

/// One thread's cache.
///
/// In std builds it has no destructor, so that reading it is a plain
/// thread-local access with no liveness check (that check cost about a third
/// of `get`'s time where we measured). [`EXIT`]'s destructor empties it
/// instead when the thread exits.
struct ThreadCache {
    entries: [Entry; SLOTS],
}

const_thread_local! {
    static CACHE: ThreadCache = ThreadCache {
        entries: [const { Entry::vacant() }; SLOTS],
    };
}

/// Empties [`CACHE`] when the thread exits. Armed by the first entry a
/// thread caches; once its destructor has started, nothing more is cached.
struct ExitHook;

const_thread_local! {
    static EXIT: ExitHook = ExitHook;
}

impl Drop for ExitHook {
    fn drop(&mut self) {
        // Under loom this finds the cache already destroyed (loom destroys a
        // thread's locals together), and the cache's own destructor does the
        // work.
        let _ = CACHE.try_with(ThreadCache::retire_all);
    }
}

/// Loom destroys all of a thread's locals at once, so [`ExitHook`] cannot
/// reach the cache there: the cache empties itself. (Loom's thread-locals
/// check liveness on every access anyway.)
#[cfg(toctou_loom)]
impl Drop for ThreadCache {
    fn drop(&mut self) {
        self.retire_all();
    }
}

impl ThreadCache {
    #[inline]
    fn entry(&self, id: u64) -> &Entry {
        // Truncating on 32-bit targets is fine: only the low bits are used.
        &self.entries[id as usize % SLOTS]
    }

    /// Caches `block` as `key`'s, retiring the block it replaces.
    fn install(&self, key: Key, block: NonNull<Block>) {
        let entry = self.entry(key.id);
        let old = (entry.key.get() != VACANT).then(|| entry.block.get());
        // The entry is whole again before the old block is retired, which may
        // run an instance's `drop`, which may read a cell.
        entry.block.set(block);
        entry.key.set(key);
        if let Some(old) = old {
            // SAFETY: the entry pointed at `old` until just now, so it is
            // alive, and it is this thread's; it points elsewhere now.
            unsafe { Block::retire(old) };
        }
    }

    /// Empties every entry. Blocks with references left are freed by their
    /// last reference.
    fn retire_all(&self) {
        for entry in &self.entries {
            entry.retire();
        }
    }
}

/// Whether this thread's cache may take an entry: arms [`EXIT`] on first
/// use, and says no once the thread is exiting (`EXIT`'s destructor has
/// started), since nothing would empty the cache again.
fn armed() -> bool {
    EXIT.try_with(|_| ()).is_ok()
}

/// This thread's block for `key`, if it caches `key`. The block stays alive
/// until this thread next touches the cache or a `RegistryRef`.
#[inline]
fn cached(key: Key) -> Option<NonNull<Block>> {
    CACHE
        .try_with(|cache| {
            let entry = cache.entry(key.id);
            (entry.key.get() == key).then(|| entry.block.get())
        })
        .ok()
        .flatten()
}

/// If this thread caches `key`, counts one more reference to it and returns
/// its block and instance (an `Arc::into_raw` pointer).
#[inline]
pub(super) fn pin_cached(key: Key) -> Option<(NonNull<Block>, NonNull<()>)> {
    let block = cached(key)?;
    // SAFETY: the entry points at the block, so it is alive, and it is this
    // thread's.
    let b = unsafe { block.as_ref() };
    count_one_more(&b.refs);
    Some((block, b.ptr))
}

/// If this thread caches `key`, returns its instance (an `Arc::into_raw`
/// pointer) without counting a reference. The instance stays alive until
/// this thread next touches the cache or a `RegistryRef`.
#[inline]
pub(super) fn peek_cached(key: Key) -> Option<NonNull<()>> {
    // SAFETY: the entry points at the block, so it is alive, and it is this
    // thread's.
    cached(key).map(|block| unsafe { block.as_ref() }.ptr)
}

/// Makes a block with one reference for `key`'s `instance`, and caches it
/// in place of whatever this thread cached in its slot. If this thread's
/// cache is gone (the thread is exiting), the block is born retired: its
/// references alone keep it.
pub(super) fn fill<T>(key: Key, instance: Arc<T>) -> NonNull<Block> {
    let block = Block::new(key, instance);
    let installed = armed() && CACHE.try_with(|cache| cache.install(key, block)).is_ok();
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
/// `block` is alive (a reference of this thread holds it).
#[inline]
pub(super) unsafe fn pin(block: NonNull<Block>) {
    // SAFETY: per the caller.
    count_one_more(&unsafe { block.as_ref() }.refs);
}

/// Adds a reference to a block's count, aborting (as `Rc` does) if the count
/// would wrap: only `mem::forget` can get it there, and a wrapped count would
/// free the block under live references.
#[inline]
fn count_one_more(refs: &Cell<usize>) {
    let n = refs.get().wrapping_add(1);
    refs.set(n);
    if n == 0 {
        std::process::abort();
    }
}

/// Counts one reference fewer to `block`'s instance, freeing the block if
/// it is retired and this was its last reference.
///
/// # Safety
///
/// `block` is alive and this thread's, and the caller's reference, now
/// dropping, was counted in it.
#[inline]
pub(super) unsafe fn unpin(block: NonNull<Block>) {
    // SAFETY: per the caller.
    let b = unsafe { block.as_ref() };
    b.refs.set(b.refs.get() - 1);
    if b.retired.get() {
        // SAFETY: per the caller; not used again.
        unsafe { Block::free_if_done(block) };
    }
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
