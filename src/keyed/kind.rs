//! The kinds of per-key lock the entry lifecycle can manage.
//!
//! A [`LockKind`] is the state of one key's lock, stored in the key's entry
//! and changed only under the shard lock: it never needs atomics of its own.
//! The lifecycle in [`super::core`] decides when entries appear and vanish,
//! who waits and who is woken; a kind only answers "may this mode be granted
//! now?" and keeps its holder counts.
//!
//! A cross-process backend (file locks, advisory locks) plugs in at the same
//! place: its kind would take the external lock once the in-process protocol
//! has granted the key, so the process still holds each key at most once.

/// The state of one key's lock.
pub(crate) trait LockKind: Default {
    /// How a caller wants the key: `()` for a mutex, read or write for a
    /// reader-writer lock.
    type Mode: Copy + Eq;

    /// Whether `mode` could be granted with the current holders.
    fn can_acquire(&self, mode: Self::Mode) -> bool;

    /// Records a new holder in `mode`. Only called after `can_acquire`.
    fn acquire(&mut self, mode: Self::Mode);

    /// Removes a holder in `mode`.
    fn release(&mut self, mode: Self::Mode);

    /// Whether nobody holds the key.
    fn is_free(&self) -> bool;

    /// Whether `mode` excludes every other holder.
    fn is_exclusive(mode: Self::Mode) -> bool;
}

/// A mutex: one holder at a time.
#[derive(Default)]
pub(crate) struct Exclusive {
    held: bool,
}

impl LockKind for Exclusive {
    type Mode = ();

    #[inline]
    fn can_acquire(&self, (): ()) -> bool {
        !self.held
    }

    #[inline]
    fn acquire(&mut self, (): ()) {
        debug_assert!(!self.held);
        self.held = true;
    }

    #[inline]
    fn release(&mut self, (): ()) {
        debug_assert!(self.held);
        self.held = false;
    }

    #[inline]
    fn is_free(&self) -> bool {
        !self.held
    }

    #[inline]
    fn is_exclusive((): ()) -> bool {
        true
    }
}

/// How a caller wants a reader-writer key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Access {
    Read,
    Write,
}

/// A reader-writer lock: any number of readers, or one writer.
#[derive(Default)]
pub(crate) struct ReadWrite {
    readers: usize,
    writer: bool,
}

impl LockKind for ReadWrite {
    type Mode = Access;

    #[inline]
    fn can_acquire(&self, mode: Access) -> bool {
        match mode {
            Access::Read => !self.writer,
            Access::Write => !self.writer && self.readers == 0,
        }
    }

    #[inline]
    fn acquire(&mut self, mode: Access) {
        debug_assert!(self.can_acquire(mode));
        match mode {
            // A reader count cannot overflow: each reader is a live guard.
            Access::Read => self.readers += 1,
            Access::Write => self.writer = true,
        }
    }

    #[inline]
    fn release(&mut self, mode: Access) {
        match mode {
            Access::Read => {
                debug_assert!(self.readers > 0);
                self.readers -= 1;
            }
            Access::Write => {
                debug_assert!(self.writer);
                self.writer = false;
            }
        }
    }

    #[inline]
    fn is_free(&self) -> bool {
        !self.writer && self.readers == 0
    }

    #[inline]
    fn is_exclusive(mode: Access) -> bool {
        mode == Access::Write
    }
}
