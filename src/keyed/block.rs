//! A one-block, per-thread cache of slot memory.
//!
//! A key that is locked and released over and over creates and frees its
//! slot each time. The allocator's own per-thread cache makes that cheap,
//! but not free (about 20 ns for a malloc/free pair on the machine the
//! benchmarks ran on, half the cost of a lock/unlock pair). Keeping the last
//! freed block on the thread that freed it removes that cost, and keeps the
//! block in that thread's cache (a cache shared by shard would hand a block
//! to another core, and move its cache line with it).
//!
//! One block per thread, of the last layout freed: memory held is at most one
//! slot per thread, returned when the thread exits. Under loom the cache is
//! off (loom models share one OS thread, and allocation needs no model).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::mem::MaybeUninit;
use std::ptr::NonNull;

/// Memory for one `T`, uninitialised, owned.
pub(crate) struct Block<T> {
    ptr: NonNull<MaybeUninit<T>>,
}

// SAFETY: uninitialised memory holds no value that could be shared or sent;
// owning it is owning an allocation, which any thread may free.
unsafe impl<T> Send for Block<T> {}
// SAFETY: as for `Send`: `&Block` gives access to nothing.
unsafe impl<T> Sync for Block<T> {}

impl<T> Block<T> {
    /// A block from this thread's cache if it has one of the right layout,
    /// or a new allocation.
    #[inline]
    pub(crate) fn new() -> Self {
        let layout = Layout::new::<T>();
        assert!(layout.size() > 0, "slots are never zero-sized");
        let ptr = cache::take(layout).unwrap_or_else(|| {
            // SAFETY: `layout` has a non-zero size (asserted above).
            let raw = unsafe { alloc(layout) };
            NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout))
        });
        Self { ptr: ptr.cast() }
    }

    /// Moves `value` into the block; the caller now owns a `T` at the
    /// returned pointer, to be given back with [`Block::from_raw`].
    pub(crate) fn write(self, value: T) -> NonNull<T> {
        let ptr = self.ptr;
        std::mem::forget(self);
        // SAFETY: the block is valid for writes of a `T` (allocated with
        // `T`'s layout, owned by us).
        unsafe { ptr.as_ptr().write(MaybeUninit::new(value)) };
        ptr.cast()
    }

    /// Takes back the memory of a `T` from [`write`](Self::write) whose
    /// value the caller has moved out or dropped.
    ///
    /// # Safety
    ///
    /// `ptr` came from `write` on a `Block<T>`, its value is no longer
    /// used, and nothing else will free it.
    // Under loom, freed slots are leaked (see `free_slot` in `core.rs`).
    #[cfg_attr(toctou_loom, allow(dead_code))]
    pub(crate) unsafe fn from_raw(ptr: NonNull<T>) -> Self {
        Self { ptr: ptr.cast() }
    }
}

impl<T> Drop for Block<T> {
    #[inline]
    fn drop(&mut self) {
        let layout = Layout::new::<T>();
        if let Some(evicted) = cache::put(self.ptr.cast(), layout) {
            // SAFETY: allocated with `layout` (by `new`, or cached by a
            // `Block` of the same layout), and owned by us.
            unsafe { dealloc(evicted.as_ptr(), layout) };
        }
    }
}

#[cfg(not(toctou_loom))]
mod cache {
    use std::alloc::{Layout, dealloc};
    use std::cell::Cell;
    use std::ptr::NonNull;

    /// This thread's cached block and its layout.
    struct Cached(Cell<Option<(NonNull<u8>, Layout)>>);

    impl Drop for Cached {
        fn drop(&mut self) {
            if let Some((ptr, layout)) = self.0.take() {
                // SAFETY: cached blocks are owned by the cache and were
                // allocated with the layout stored beside them.
                unsafe { dealloc(ptr.as_ptr(), layout) };
            }
        }
    }

    std::thread_local! {
        static CACHED: Cached = const { Cached(Cell::new(None)) };
    }

    /// This thread's cached block, if it has `layout`.
    #[inline]
    pub(super) fn take(layout: Layout) -> Option<NonNull<u8>> {
        CACHED
            .try_with(|c| match c.0.take() {
                Some((ptr, l)) if l == layout => Some(ptr),
                other => {
                    c.0.set(other);
                    None
                }
            })
            .ok()
            .flatten()
    }

    /// Caches `ptr` (of `layout`) if this thread's cache is empty; otherwise
    /// (or during thread teardown) gives it back for the caller to free.
    #[inline]
    pub(super) fn put(ptr: NonNull<u8>, layout: Layout) -> Option<NonNull<u8>> {
        CACHED
            .try_with(|c| match c.0.take() {
                None => {
                    c.0.set(Some((ptr, layout)));
                    None
                }
                full => {
                    c.0.set(full);
                    Some(ptr)
                }
            })
            .unwrap_or(Some(ptr))
    }
}

#[cfg(toctou_loom)]
mod cache {
    use std::alloc::Layout;
    use std::ptr::NonNull;

    pub(super) fn take(_: Layout) -> Option<NonNull<u8>> {
        None
    }

    pub(super) fn put(ptr: NonNull<u8>, _: Layout) -> Option<NonNull<u8>> {
        Some(ptr)
    }
}
