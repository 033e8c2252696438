//! Deferred freeing for the keyed maps' lock-free lookups: memory that a
//! lookup may still be reading is freed only after every lookup that could
//! have found it has finished.
//!
//! # Protocol
//!
//! A lookup *pins* the map for the few instructions it reads the index and a
//! slot without a lock ([`Reclaim::pin`]), then unpins. A pin is a count in
//! one of the map's reader *stripes*: a counter pair on its own cache lines,
//! picked by the calling thread (each thread gets the next stripe the first
//! time it pins anything), so that threads on different stripes write no
//! common cache line. Each pair holds one counter per *side*: the side is
//! the map's epoch modulo 2.
//!
//! - **Pin**: read the epoch `e`, increment the counter of side `e & 1` in
//!   the thread's stripe, then a `SeqCst` fence (the *reader's fence*).
//! - **Unpin**: decrement the same counter.
//! - **Retire** ([`Reclaim::retire`]): memory already unlinked from the
//!   index (under the shard lock) is tagged with the epoch, under the
//!   garbage lock, and queued; then a `SeqCst` fence (the *retirer's
//!   fence*), and up to two advances.
//! - **Advance** (under the garbage lock, after that fence): the epoch
//!   moves from `e` to `e + 1` only if side `(e + 1) & 1` sums to zero in
//!   every stripe.
//! - **Free**: memory tagged `t` is freed once the epoch reaches `t + 2`,
//!   that is after two advances, which checked both sides, each after a
//!   retirer's fence that follows the unlink.
//!
//! Why that is enough: take a reader's fence `R` and the retirer's fence
//! `H` before the first of those two checks. The two fences are ordered. If
//! `R` comes first, the reader's increment (before `R`) is seen by both
//! checks (after `H`), one of which looks at its side: while it is pinned,
//! the memory is not freed. If `H` comes first, the reader's loads (after
//! `R`) see the unlink (before `H`): it cannot find the memory at all. The
//! epoch only spreads readers over two sides, so that a steady stream of
//! new readers (on the new side) cannot hold an advance back forever; a
//! reader counted on a stale side only delays an advance.
//!
//! Both fences are full ones. The crate's asymmetric pair (`barrier` in
//! `sync.rs`: a compiler fence for readers, the expedited `membarrier`
//! syscall for the writer) was measured here first: a retirement then costs
//! a syscall that interrupts every core running the process, and with 16
//! threads sweeping on the 2-core VM the disjoint-key benchmark took 4x as
//! long (93 ms against 23 ms), while a reader's full fence, right after its
//! locked increment, did not show on one thread.
//!
//! Pins are short: a lookup pins only until it holds the key, queues for it
//! or gives up, and never while the caller's code runs with the key held. So
//! a side drains soon after the epoch moves on, and an advance rarely fails.
//! A failed advance leaves the garbage queued for the next retirement (or
//! the map's drop).

use std::ptr::NonNull;

use crate::sync::{AtomicUsize, Mutex, Ordering, fence};

/// A reader stripe: one counter per side, on its own cache lines (128
/// bytes: adjacent-line prefetch on x86 pulls pairs of 64-byte lines).
#[repr(align(128))]
struct Stripe([AtomicUsize; 2]);

/// Frees a retired pointer (drops what it points to and returns its
/// memory).
pub(crate) type Free = unsafe fn(NonNull<u8>);

/// Memory unlinked from an index, and how to free it.
struct Retired {
    ptr: NonNull<u8>,
    free: Free,
    /// The epoch read after the unlink.
    epoch: usize,
}

// SAFETY: a `Retired` is owned garbage: nothing else refers to it once its
// grace period ends, and the `free` functions that the keyed core registers
// drop values whose types are `Send` (the maps are `Send` only then).
unsafe impl Send for Retired {}

/// One map's readers and garbage.
pub(crate) struct Reclaim {
    /// Written only under `garbage`'s lock (at an advance); read by every pin.
    epoch: AtomicUsize,
    stripes: Box<[Stripe]>,
    garbage: Mutex<Vec<Retired>>,
}

/// A pinned reader: unpins on drop.
pub(crate) struct Pin<'a> {
    count: &'a AtomicUsize,
}

impl Drop for Pin<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the reader's reads of retired memory happen before an
        // advance that sees this decrement (its SeqCst load of the count).
        self.count.fetch_sub(1, Ordering::Release);
    }
}

impl Reclaim {
    /// Readers spread over `stripes` stripes (a power of two).
    pub(crate) fn new(stripes: usize) -> Self {
        debug_assert!(stripes.is_power_of_two());
        Self {
            epoch: AtomicUsize::new(0),
            stripes: (0..stripes)
                .map(|_| Stripe([AtomicUsize::new(0), AtomicUsize::new(0)]))
                .collect(),
            garbage: Mutex::new(Vec::new()),
        }
    }

    /// Pins the calling thread: memory retired from now on is not freed
    /// until the returned pin is dropped.
    #[inline]
    pub(crate) fn pin(&self) -> Pin<'_> {
        let stripe = &self.stripes[thread_stripe() & (self.stripes.len() - 1)];
        // Relaxed: the side only spreads readers (see the module docs); a
        // stale epoch is as safe as the current one.
        let epoch = self.epoch.load(Ordering::Relaxed);
        let count = &stripe.0[epoch & 1];
        // Relaxed: ordered before our reads of the index by the fence,
        // which pairs with the retirer's fence in `retire`.
        count.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Pin { count }
    }

    /// Queues `items` (pointers already unlinked from every index, each
    /// with the function that frees it) to be freed once no reader can hold
    /// them; frees whatever is due, `items` too if no reader is pinned.
    ///
    /// # Safety
    ///
    /// Each pointer is unreachable for any lookup that starts from now on,
    /// and calling its function on it is sound once no pinned reader can
    /// hold it, and happens at most once (here, later, or when the map
    /// drops).
    pub(crate) unsafe fn retire(&self, items: impl IntoIterator<Item = (NonNull<u8>, Free)>) {
        let due = {
            let mut garbage = self.garbage.lock();
            // Relaxed: only written under the garbage lock, which we hold.
            let epoch = self.epoch.load(Ordering::Relaxed);
            garbage.extend(
                items
                    .into_iter()
                    .map(|(ptr, free)| Retired { ptr, free, epoch }),
            );
            // Pairs with the fence of every pin: after the unlinks
            // (ordered before us by the shard lock the caller released),
            // before the advances' checks of the counts.
            fence(Ordering::SeqCst);
            // Two advances free what was just retired, if no reader is
            // pinned on either side.
            for _ in 0..2 {
                if !self.advance() {
                    break;
                }
            }
            // Relaxed: only written under the garbage lock, which we hold.
            let now = self.epoch.load(Ordering::Relaxed);
            let mut due = Vec::new();
            garbage.retain(|r| {
                let keep = r.epoch + 2 > now;
                if !keep {
                    due.push((r.ptr, r.free));
                }
                keep
            });
            due
        };
        // Freed outside the lock: it drops keys, which runs user code.
        // SAFETY: retired with their functions, and their grace period is
        // over (the epoch is two past their tag); taken out of the queue, so
        // freed once.
        unsafe { free_all(due) };
    }

    /// Moves the epoch on if no reader is counted on the side the next
    /// epoch reuses. The caller holds the garbage lock, and has passed the
    /// retirer's fence since the last unlink.
    fn advance(&self) -> bool {
        // Relaxed: only written under the garbage lock, which we hold.
        let epoch = self.epoch.load(Ordering::Relaxed);
        let side = (epoch + 1) & 1;
        // Acquire: a count seen at zero after a reader's Release decrement
        // orders that reader's reads before what we free. (The increments
        // are ordered by the fences: see the module docs.)
        if self
            .stripes
            .iter()
            .any(|s| s.0[side].load(Ordering::Acquire) != 0)
        {
            return false;
        }
        // Relaxed: read by pins only to pick a side.
        self.epoch.store(epoch + 1, Ordering::Relaxed);
        true
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        // `&mut self`: no reader is pinned, so everything queued is due.
        let garbage = std::mem::take(&mut *self.garbage.lock());
        // SAFETY: retired with their functions, unreachable, and taken out
        // of the queue, so freed once.
        unsafe { free_all(garbage.into_iter().map(|r| (r.ptr, r.free))) };
    }
}

/// Frees every item with its function. If one panics (a key's `Drop`), the
/// rest are still freed as the panic unwinds, and the panic goes on (a
/// second one aborts, as when a `Vec`'s elements panic on drop).
///
/// # Safety
///
/// Calling each item's function on it is sound, once.
pub(crate) unsafe fn free_all(items: impl IntoIterator<Item = (NonNull<u8>, Free)>) {
    /// The items not freed yet: freed by its drop if a free panics.
    struct Rest<I: Iterator<Item = (NonNull<u8>, Free)>>(I);
    impl<I: Iterator<Item = (NonNull<u8>, Free)>> Drop for Rest<I> {
        fn drop(&mut self) {
            for (ptr, free) in &mut self.0 {
                // SAFETY: per `free_all`'s contract.
                unsafe { free(ptr) };
            }
        }
    }
    let mut rest = Rest(items.into_iter());
    for (ptr, free) in rest.0.by_ref() {
        // SAFETY: per this function's contract. If it panics, `rest` frees
        // the items after it while unwinding.
        unsafe { free(ptr) };
    }
}

/// The calling thread's stripe number (before masking): each thread takes
/// the next number the first time it asks, so that the first threads of a
/// process never share a stripe. Under loom, every thread uses stripe 0:
/// sharing a stripe is correct (the counts are read-modify-writes), and the
/// model needs no thread-locals for it.
#[inline]
fn thread_stripe() -> usize {
    #[cfg(toctou_loom)]
    {
        0
    }
    #[cfg(not(toctou_loom))]
    {
        use std::cell::Cell;
        use std::sync::atomic::AtomicUsize as StdAtomicUsize;

        static NEXT: StdAtomicUsize = StdAtomicUsize::new(0);
        std::thread_local! {
            static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        STRIPE
            .try_with(|s| {
                let mut stripe = s.get();
                if stripe == usize::MAX {
                    // Relaxed: a unique number; nothing is published with it.
                    stripe = NEXT.fetch_add(1, Ordering::Relaxed);
                    s.set(stripe);
                }
                stripe
            })
            // During thread teardown: any stripe is correct.
            .unwrap_or(0)
    }
}
