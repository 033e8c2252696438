//! A shard's index of slots: an open-addressing table of atomic pointers
//! that lookups read without any lock, and that only the holder of the
//! shard's lock changes.
//!
//! - **Lookup** ([`Index::find`]): linear probing from the key's hash, one
//!   Acquire load per cell. An empty cell ends the probe; a tombstone (an
//!   unlinked slot's cell) does not. The caller is pinned
//!   ([`super::reclaim`]), so every slot and cell array it can reach stays
//!   allocated while it reads.
//! - **Insert and unlink** (under the shard's lock): insert writes a slot
//!   into the first empty or tombstone cell of its probe sequence; unlink
//!   finds a slot *by identity* and overwrites its cell with a tombstone.
//!   Both are single atomic stores, so a concurrent lookup sees the cell
//!   before or after, never half of it.
//! - **Rebuild**: when live cells and tombstones would fill more than three
//!   quarters of the array (or the live cells fill less than an eighth of a
//!   large one), the writer builds a new array from the live cells,
//!   publishes it with one Release store, and retires the old one. A lookup
//!   still probing the old array finds what it held when published, which
//!   is what it would have found had it started a moment earlier.

use std::ptr::NonNull;

use crate::sync::{AtomicPtr, Ordering};

/// The smallest array, and the one a new index starts with.
#[cfg(not(toctou_loom))]
const MIN_CELLS: usize = 8;
/// Under loom, small enough that a model with three keys rebuilds.
#[cfg(toctou_loom)]
const MIN_CELLS: usize = 4;

/// A cell array.
pub(crate) struct Cells<T> {
    cells: Box<[AtomicPtr<T>]>,
}

impl<T> Cells<T> {
    fn new(len: usize) -> Self {
        debug_assert!(len.is_power_of_two());
        Self {
            cells: (0..len)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
        }
    }

    /// `hash`'s probe sequence: every cell once, from its home cell on
    /// (linear probing, wrapping around).
    #[inline]
    fn probe(&self, hash: u64) -> impl Iterator<Item = &AtomicPtr<T>> {
        let mask = self.cells.len() - 1;
        (0..=mask).map(move |step| &self.cells[(hash as usize).wrapping_add(step) & mask])
    }
}

/// The tombstone: a non-null address that no slot has (the alignment of a
/// `T`, which no allocation of a non-zero-sized `T` returns).
#[inline]
fn tombstone<T>() -> *mut T {
    NonNull::<T>::dangling().as_ptr()
}

/// A live cell's slot, or nothing.
#[inline]
fn live<T>(ptr: *mut T) -> Option<NonNull<T>> {
    if ptr == tombstone() {
        None
    } else {
        NonNull::new(ptr)
    }
}

/// What the shard's lock protects for its index: how full the array is.
#[derive(Default)]
pub(crate) struct Occupancy {
    /// Cells holding a slot.
    pub(crate) live: usize,
    /// Tombstone cells.
    tombstones: usize,
}

/// A shard's index.
pub(crate) struct Index<T> {
    /// Null until the first insert; then a `Cells` from `Box::into_raw`,
    /// replaced (and the old one retired) by a rebuild.
    cells: AtomicPtr<Cells<T>>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Self {
            cells: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

impl<T> Index<T> {
    /// The current array, if any.
    ///
    /// # Safety
    ///
    /// The caller is pinned, or holds the shard's lock (no rebuild can
    /// retire the array then), and lets the reference go before unpinning
    /// or unlocking.
    #[inline]
    unsafe fn array<'a>(&self) -> Option<&'a Cells<T>> {
        // Acquire: pairs with the Release store that published the array
        // in `rebuild`, so its cells are initialised.
        let cells = self.cells.load(Ordering::Acquire);
        // SAFETY: non-null pointers here come from `Box::into_raw` and are
        // retired when replaced (under the lock), and freed only after the
        // grace period of every reader pinned then, or by the map's drop.
        unsafe { cells.as_ref() }
    }

    /// The first live slot in `hash`'s probe sequence that `is` accepts.
    ///
    /// # Safety
    ///
    /// As for [`array`](Self::array): the caller is pinned or holds the
    /// shard's lock, and `is` may read the slots it is given only until
    /// then. Slots are given to `is` as they are, live or being swept.
    #[inline]
    pub(crate) unsafe fn find(
        &self,
        hash: u64,
        mut is: impl FnMut(NonNull<T>) -> bool,
    ) -> Option<NonNull<T>> {
        // SAFETY: forwarded to the caller.
        let array = unsafe { self.array() }?;
        for cell in array.probe(hash) {
            // Acquire: pairs with the Release store in `insert`, so the
            // slot's fields are initialised when we read them.
            let cell = cell.load(Ordering::Acquire);
            if cell.is_null() {
                return None;
            }
            if let Some(slot) = live(cell)
                && is(slot)
            {
                return Some(slot);
            }
        }
        None
    }

    /// Every live slot, in no particular order.
    ///
    /// # Safety
    ///
    /// As for [`find`](Self::find).
    pub(crate) unsafe fn for_each(&self, mut f: impl FnMut(NonNull<T>)) {
        // SAFETY: forwarded to the caller.
        if let Some(array) = unsafe { self.array() } {
            for cell in array.cells.iter() {
                // Acquire: as in `find`.
                if let Some(slot) = live(cell.load(Ordering::Acquire)) {
                    f(slot);
                }
            }
        }
    }

    /// Adds `slot`, whose hash is `hash`. `hash_of` gives the hash of any
    /// live slot, for a rebuild; `retire` takes the array a rebuild
    /// replaced, to be freed after the readers that may hold it (see
    /// [`free_cells`]).
    ///
    /// # Safety
    ///
    /// The caller holds the shard's lock (`occupancy` is what it protects),
    /// and `slot` is initialised and not in the index.
    pub(crate) unsafe fn insert(
        &self,
        occupancy: &mut Occupancy,
        hash: u64,
        slot: NonNull<T>,
        hash_of: impl Fn(NonNull<T>) -> u64,
        retire: impl FnOnce(NonNull<Cells<T>>),
    ) {
        // SAFETY: we hold the lock, so only we replace the array.
        let full = unsafe { self.array() }
            .is_none_or(|a| (occupancy.live + occupancy.tombstones + 1) * 4 > a.cells.len() * 3);
        if full {
            // SAFETY: forwarded.
            unsafe { self.rebuild(occupancy, occupancy.live + 1, &hash_of, retire) };
        }
        // SAFETY: as above; `rebuild` left an array with room.
        let Some(array) = (unsafe { self.array() }) else {
            unreachable!("rebuild() leaves an array");
        };
        for cell in array.probe(hash) {
            // Relaxed: only writers (under our lock) store cells.
            let old = cell.load(Ordering::Relaxed);
            if old.is_null() || old == tombstone() {
                occupancy.live += 1;
                if !old.is_null() {
                    occupancy.tombstones -= 1;
                }
                // Release: publishes the slot's initialised fields to
                // lookups (their Acquire loads in `find`).
                cell.store(slot.as_ptr(), Ordering::Release);
                return;
            }
        }
        unreachable!("the array has room: at most three quarters are used");
    }

    /// Removes `slot` (by identity: no key is compared) from the index;
    /// `false` if it is not there. It stays allocated: the caller retires it.
    ///
    /// # Safety
    ///
    /// The caller holds the shard's lock.
    pub(crate) unsafe fn unlink(
        &self,
        occupancy: &mut Occupancy,
        hash: u64,
        slot: NonNull<T>,
    ) -> bool {
        // SAFETY: we hold the lock.
        let Some(array) = (unsafe { self.array() }) else {
            return false;
        };
        for cell in array.probe(hash) {
            // Relaxed: only writers (under our lock) store cells.
            let old = cell.load(Ordering::Relaxed);
            if old.is_null() {
                return false;
            }
            if old == slot.as_ptr() {
                // Release: ordered after our sweep's DEAD mark, for a lookup
                // that sees the tombstone (it skips the cell anyway).
                cell.store(tombstone(), Ordering::Release);
                occupancy.live -= 1;
                occupancy.tombstones += 1;
                return true;
            }
        }
        false
    }

    /// Shrinks the array if it is large and mostly empty (after a sweep).
    ///
    /// # Safety
    ///
    /// As for [`insert`](Self::insert).
    pub(crate) unsafe fn shrink(
        &self,
        occupancy: &mut Occupancy,
        hash_of: impl Fn(NonNull<T>) -> u64,
        retire: impl FnOnce(NonNull<Cells<T>>),
    ) {
        // SAFETY: we hold the lock.
        let Some(array) = (unsafe { self.array() }) else {
            return;
        };
        let len = array.cells.len();
        if len > MIN_CELLS && occupancy.live * 8 < len {
            // SAFETY: forwarded.
            unsafe { self.rebuild(occupancy, occupancy.live, &hash_of, retire) };
        }
    }

    /// Replaces the array by one sized for `live` slots (at most half full),
    /// holding the current live slots and no tombstone.
    ///
    /// # Safety
    ///
    /// As for [`insert`](Self::insert).
    #[cold]
    unsafe fn rebuild(
        &self,
        occupancy: &mut Occupancy,
        live_after: usize,
        hash_of: &impl Fn(NonNull<T>) -> u64,
        retire: impl FnOnce(NonNull<Cells<T>>),
    ) {
        let len = (live_after * 2).next_power_of_two().max(MIN_CELLS);
        let new = Cells::<T>::new(len);
        // Relaxed: only writers (under our lock) store the array pointer.
        let old = NonNull::new(self.cells.load(Ordering::Relaxed));
        if let Some(old) = old {
            // SAFETY: we hold the lock, so the array is live and ours to read.
            for cell in unsafe { old.as_ref() }.cells.iter() {
                // Relaxed: cells are only stored under our lock.
                if let Some(slot) = live(cell.load(Ordering::Relaxed)) {
                    // Relaxed: `new` is not published yet; it is at most
                    // half full, so an empty cell is found.
                    let Some(empty) = new
                        .probe(hash_of(slot))
                        .find(|c| c.load(Ordering::Relaxed).is_null())
                    else {
                        unreachable!("a rebuilt array is at most half full");
                    };
                    empty.store(slot.as_ptr(), Ordering::Relaxed);
                }
            }
        }
        occupancy.tombstones = 0;
        // Release: publishes the new array's cells (and through them the
        // slots they point to) to lookups' Acquire loads in `array`.
        self.cells
            .store(Box::into_raw(Box::new(new)), Ordering::Release);
        if let Some(old) = old {
            retire(old);
        }
    }

    /// Frees the array and returns the live slots, for the map's drop.
    ///
    /// # Safety
    ///
    /// No other access to the index can happen (the map is being dropped).
    pub(crate) unsafe fn drain(&self, mut f: impl FnMut(NonNull<T>)) {
        // Relaxed: nothing else accesses the index.
        let cells = self.cells.swap(std::ptr::null_mut(), Ordering::Relaxed);
        if let Some(cells) = NonNull::new(cells) {
            // SAFETY: from `Box::into_raw`, and no reader holds it (this
            // function's contract): ours to free.
            let cells = unsafe { Box::from_raw(cells.as_ptr()) };
            for cell in cells.cells.iter() {
                // Relaxed: as above.
                if let Some(slot) = live(cell.load(Ordering::Relaxed)) {
                    f(slot);
                }
            }
        }
    }
}

/// Frees a cell array retired by a rebuild.
///
/// # Safety
///
/// `ptr` is a `Cells<T>` from a rebuild's `retire`, no reader holds it, and
/// it is freed once. The slots it points to are not freed (they live on in
/// the new array, or were retired on their own).
pub(crate) unsafe fn free_cells<T>(ptr: NonNull<u8>) {
    // SAFETY: per this function's contract, from `Box::into_raw`.
    drop(unsafe { Box::from_raw(ptr.cast::<Cells<T>>().as_ptr()) });
}
