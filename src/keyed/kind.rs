//! The kinds of per-key lock the entry lifecycle can manage.
//!
//! A [`LockKind`] says how one key's holders are recorded in the low bits of
//! the key's state word (see *State word* in [`super::core`]): the lifecycle
//! changes the word with compare-exchanges, and a kind only answers "may
//! this mode be granted with these holders?" and computes the word with one
//! holder more or less. The word's two top bits belong to the lifecycle; a
//! kind adds and removes holders without touching them.
//!
//! A cross-process backend (file locks, advisory locks) plugs in at the same
//! place: its kind would take the external lock once the in-process protocol
//! has granted the key, so the process still holds each key at most once.

/// How one key's holders are recorded in the low bits of its state word.
pub(crate) trait LockKind {
    /// How a caller wants the key: `()` for a mutex, read or write for a
    /// reader-writer lock.
    type Mode: Copy + Eq;

    /// Whether `mode` could be granted with the holders recorded in
    /// `holders` (the word's holder bits, the lifecycle's bits masked off).
    fn can_acquire(holders: usize, mode: Self::Mode) -> bool;

    /// `word` with one more holder in `mode`. Only called after
    /// `can_acquire` accepted the word's holders.
    fn acquire(word: usize, mode: Self::Mode) -> usize;

    /// `word` with one holder in `mode` less.
    fn release(word: usize, mode: Self::Mode) -> usize;

    /// Whether `mode` excludes every other holder.
    fn is_exclusive(mode: Self::Mode) -> bool;
}

/// A mutex: one holder at a time, recorded in bit 0.
pub(crate) struct Exclusive;

/// The holder bit of an [`Exclusive`] key, and a [`ReadWrite`] key's
/// writer bit.
const HELD: usize = 1;

impl LockKind for Exclusive {
    type Mode = ();

    #[inline]
    fn can_acquire(holders: usize, (): ()) -> bool {
        holders == 0
    }

    #[inline]
    fn acquire(word: usize, (): ()) -> usize {
        debug_assert_eq!(word & HELD, 0);
        word | HELD
    }

    #[inline]
    fn release(word: usize, (): ()) -> usize {
        debug_assert_eq!(word & HELD, HELD);
        word & !HELD
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

/// A reader-writer lock: any number of readers, or one writer. The writer is
/// bit 0; the reader count is the bits above it (a reader adds [`READER`]).
pub(crate) struct ReadWrite;

/// One reader.
const READER: usize = 2;

impl LockKind for ReadWrite {
    type Mode = Access;

    #[inline]
    fn can_acquire(holders: usize, mode: Access) -> bool {
        match mode {
            Access::Read => holders & HELD == 0,
            Access::Write => holders == 0,
        }
    }

    #[inline]
    fn acquire(word: usize, mode: Access) -> usize {
        match mode {
            // A reader count cannot reach the lifecycle's bits: each reader
            // is a live guard, and 2^61 guards do not fit in memory.
            Access::Read => word + READER,
            Access::Write => {
                debug_assert_eq!(word & HELD, 0);
                word | HELD
            }
        }
    }

    #[inline]
    fn release(word: usize, mode: Access) -> usize {
        match mode {
            Access::Read => word - READER,
            Access::Write => {
                debug_assert_eq!(word & HELD, HELD);
                word & !HELD
            }
        }
    }

    #[inline]
    fn is_exclusive(mode: Access) -> bool {
        mode == Access::Write
    }
}
