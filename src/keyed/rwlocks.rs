//! [`KeyedRwLocks<K>`]: a reader-writer lock per key, on the same entry
//! lifecycle as [`KeyedLocks`](crate::KeyedLocks).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

use super::core::{Core, SlotRef};
use super::kind::{Access, ReadWrite};
use crate::LazyRandomState;

/// A map of per-key reader-writer locks whose keys count as entries exactly
/// while somebody holds or waits for them: any number of readers of a key,
/// or one writer.
///
/// Everything said on [`KeyedLocks`](crate::KeyedLocks) holds here too
/// (entry lifecycle, cancellation, timeouts, no poisoning, bounded-barging
/// fairness), with these differences:
///
/// - **Writers do not starve.** A new reader queues behind a waiting writer
///   instead of joining the readers who hold the key. When the key is handed
///   over, consecutive readers at the front of the queue get it together.
/// - **Reentrancy is not detected**, as on
///   [`KeyedLocks`](crate::KeyedLocks): a thread that holds a key for
///   writing and asks for it again waits forever; one that holds it for
///   reading gets a second read unless a writer is queued, and then waits
///   forever, as with `std::sync::RwLock`.
///
/// Per-file context, as in the race report's agents scenario: many readers
/// of a file at once, one writer at a time, and no torn reads.
///
/// ```
/// use toctou::KeyedRwLocks;
///
/// let files = KeyedRwLocks::<String>::new();
/// let r1 = files.read("notes.md");
/// let r2 = files.read("notes.md");
/// assert!(files.try_write("notes.md").is_none(), "readers exclude a writer");
/// drop((r1, r2));
/// let w = files.write("notes.md");
/// assert!(files.try_read("notes.md").is_none(), "a writer excludes readers");
/// drop(w);
/// assert!(files.is_empty());
/// ```
pub struct KeyedRwLocks<K, S = LazyRandomState> {
    core: Core<K, ReadWrite, S>,
}

keyed_map_common!(KeyedRwLocks, "write(&1)", "write(\"a\")");

impl<K: Hash + Eq, S: BuildHasher> KeyedRwLocks<K, S> {
    /// Locks `key` for reading, parking the thread while a writer holds it
    /// or waits for it.
    ///
    /// A thread that holds `key` for writing itself waits forever (see
    /// *Reentrancy* on [`KeyedLocks`](crate::KeyedLocks)).
    ///
    /// ```
    /// let files = toctou::KeyedRwLocks::<String>::new();
    /// let a = files.read("a.txt");
    /// let b = files.read("a.txt"); // readers share
    /// assert_eq!(a.key(), b.key());
    /// ```
    pub fn read<Q>(&self, key: &Q) -> KeyReadGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire(key, Access::Read);
        KeyReadGuard { locks: self, slot }
    }

    /// Locks `key` for writing, parking the thread while anybody else holds
    /// it.
    ///
    /// A thread that holds `key` for writing itself waits forever (see
    /// *Reentrancy* on [`KeyedLocks`](crate::KeyedLocks)).
    ///
    /// ```
    /// let files = toctou::KeyedRwLocks::<String>::new();
    /// let w = files.write("a.txt");
    /// assert!(files.try_read("a.txt").is_none());
    /// # drop(w);
    /// ```
    pub fn write<Q>(&self, key: &Q) -> KeyWriteGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire(key, Access::Write);
        KeyWriteGuard { locks: self, slot }
    }

    /// Locks `key` for reading if that needs no waiting (no writer holds it
    /// or is queued for it).
    ///
    /// ```
    /// let files = toctou::KeyedRwLocks::<u64>::new();
    /// assert!(files.try_read(&1).is_some());
    /// ```
    pub fn try_read<Q>(&self, key: &Q) -> Option<KeyReadGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.try_acquire(key, Access::Read)?;
        Some(KeyReadGuard { locks: self, slot })
    }

    /// Locks `key` for writing if nobody holds it now.
    ///
    /// ```
    /// let files = toctou::KeyedRwLocks::<u64>::new();
    /// let r = files.read(&1);
    /// assert!(files.try_write(&1).is_none());
    /// drop(r);
    /// assert!(files.try_write(&1).is_some());
    /// ```
    pub fn try_write<Q>(&self, key: &Q) -> Option<KeyWriteGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.try_acquire(key, Access::Write)?;
        Some(KeyWriteGuard { locks: self, slot })
    }

    /// Locks `key` for reading, waiting at most `timeout`; `None` if it did
    /// not become available, and then nothing is left behind.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let files = toctou::KeyedRwLocks::<u64>::new();
    /// let w = files.write(&1);
    /// assert!(files.try_read_for(&1, Duration::from_millis(5)).is_none());
    /// drop(w);
    /// assert!(files.is_empty());
    /// ```
    pub fn try_read_for<Q>(&self, key: &Q, timeout: Duration) -> Option<KeyReadGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_for(key, Access::Read, timeout)?;
        Some(KeyReadGuard { locks: self, slot })
    }

    /// Locks `key` for writing, waiting at most `timeout`; `None` if it did
    /// not become available, and then nothing is left behind.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let files = toctou::KeyedRwLocks::<u64>::new();
    /// let r = files.read(&1);
    /// assert!(files.try_write_for(&1, Duration::from_millis(5)).is_none());
    /// drop(r);
    /// assert!(files.is_empty());
    /// ```
    pub fn try_write_for<Q>(&self, key: &Q, timeout: Duration) -> Option<KeyWriteGuard<'_, K, S>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_for(key, Access::Write, timeout)?;
        Some(KeyWriteGuard { locks: self, slot })
    }

    /// The async form of [`read`](Self::read): runtime-agnostic and
    /// cancellation-safe, as [`KeyedLocks::lock_async`](crate::KeyedLocks::lock_async).
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let files = toctou::KeyedRwLocks::<String>::new();
    /// let r = block_on(files.read_async("a.txt"));
    /// assert_eq!(r.key(), "a.txt");
    /// ```
    pub async fn read_async<Q>(&self, key: &Q) -> KeyReadGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_async(key, Access::Read).await;
        KeyReadGuard { locks: self, slot }
    }

    /// The async form of [`write`](Self::write): runtime-agnostic and
    /// cancellation-safe.
    ///
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// let files = toctou::KeyedRwLocks::<String>::new();
    /// let w = block_on(files.write_async("a.txt"));
    /// assert!(files.try_read("a.txt").is_none());
    /// # drop(w);
    /// ```
    pub async fn write_async<Q>(&self, key: &Q) -> KeyWriteGuard<'_, K, S>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let slot = self.core.acquire_async(key, Access::Write).await;
        KeyWriteGuard { locks: self, slot }
    }

    /// Whether `key` is held right now, for reading or writing (a snapshot).
    ///
    /// ```
    /// let files = toctou::KeyedRwLocks::<u64>::new();
    /// let _r = files.read(&1);
    /// assert!(files.is_locked(&1));
    /// assert!(!files.is_locked(&2));
    /// ```
    pub fn is_locked<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.core.is_held(key)
    }
}

/// Shared access to a key of a [`KeyedRwLocks`]; released on drop.
///
/// ```
/// let files: toctou::KeyedRwLocks<String> = toctou::KeyedRwLocks::new();
/// let a = files.read("context.md");
/// let b = files.read("context.md"); // readers share the key
/// assert_eq!(a.key(), "context.md");
/// assert!(files.try_write("context.md").is_none());
/// drop((a, b));
/// assert!(files.is_empty());
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct KeyReadGuard<'a, K, S = LazyRandomState> {
    locks: &'a KeyedRwLocks<K, S>,
    slot: SlotRef<K, ReadWrite>,
}

/// Exclusive access to a key of a [`KeyedRwLocks`]; released on drop.
///
/// ```
/// let files: toctou::KeyedRwLocks<String> = toctou::KeyedRwLocks::new();
/// let writing = files.write("context.md");
/// assert!(files.try_read("context.md").is_none());
/// assert!(files.try_read("other.md").is_some(), "other keys are independent");
/// drop(writing);
/// assert!(files.try_read("context.md").is_some());
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct KeyWriteGuard<'a, K, S = LazyRandomState> {
    locks: &'a KeyedRwLocks<K, S>,
    slot: SlotRef<K, ReadWrite>,
}

macro_rules! rw_guard {
    ($guard:ident, $mode:expr) => {
        impl<K, S> $guard<'_, K, S> {
            /// The locked key.
            ///
            /// ```
            /// let files = toctou::KeyedRwLocks::<String>::new();
            /// assert_eq!(files.read("k").key(), "k");
            /// assert_eq!(files.write("k").key(), "k");
            /// ```
            pub fn key(&self) -> &K {
                // SAFETY: the guard holds the key, which keeps its slot
                // alive, and `&self` bounds the returned reference.
                unsafe { self.slot.key() }
            }
        }

        impl<K, S> Drop for $guard<'_, K, S> {
            fn drop(&mut self) {
                // SAFETY: the guard holds the key in this mode and is giving
                // it up.
                unsafe { self.locks.core.release(self.slot, $mode) }
            }
        }

        impl<K: fmt::Debug, S> fmt::Debug for $guard<'_, K, S> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($guard))
                    .field("key", self.key())
                    .finish()
            }
        }
    };
}

rw_guard!(KeyReadGuard, Access::Read);

impl<K, S> KeyedRwLocks<K, S> {
    /// The same map, whose blocking callers spin longer before they yield
    /// and are counted in the key's entry while they spin (for `FileLocks`'
    /// in-process map: see *Spin* in `src/keyed/core.rs`).
    #[cfg(target_os = "linux")]
    pub(crate) fn spinning_longer(self) -> Self {
        Self {
            core: self.core.spinning_longer(),
        }
    }

    /// `FileLocks`' configuration of the map (see `spinning_longer`), for
    /// the loom models of the counted spinners. Not part of the API.
    #[cfg(toctou_loom)]
    #[doc(hidden)]
    #[must_use]
    pub fn __loom_counting_spinners(self) -> Self {
        Self {
            core: self.core.spinning_longer(),
        }
    }
}

impl<K, S> KeyWriteGuard<'_, K, S> {
    /// Whether a thread spun to write the key when last looked at: a hint,
    /// read without the shard lock, for `FileLocks` to decide whether to
    /// look again under the lock with
    /// [`release_if_blocked_writer_waits`](Self::release_if_blocked_writer_waits).
    #[cfg(target_os = "linux")]
    pub(crate) fn writer_spins_hint(&self) -> bool {
        // SAFETY: the guard holds the key.
        unsafe { self.locks.core.exclusive_spinner_hint(self.slot) }
    }

    /// Releases the key if a thread waits to write it next: the first
    /// waiter queued is a blocked thread that wants to write, or nobody is
    /// queued and a thread that wants to write spins for it. Otherwise
    /// gives the guard back, still holding the key. The look and the
    /// release are one step, so the waiter seen is still there when the
    /// key is released. (`FileLocks` hands its OS lock over only to such a
    /// waiter: a task may not run for a long time, and a reader cannot use
    /// an exclusive lock.)
    #[cfg(target_os = "linux")]
    pub(crate) fn release_if_blocked_writer_waits(self) -> Result<(), Self> {
        // SAFETY: the guard holds the key in write mode; if this releases
        // it, the guard is forgotten below and never releases it again.
        if unsafe {
            self.locks
                .core
                .release_if_exclusive_thread_waits(self.slot, Access::Write)
        } {
            std::mem::forget(self);
            return Ok(());
        }
        Err(self)
    }
}

rw_guard!(KeyWriteGuard, Access::Write);
