//! [`LockStats`]: what a keyed lock map has been doing.

use super::core::Counters;

/// Counters of a [`KeyedLocks`](crate::KeyedLocks) or
/// [`KeyedRwLocks`](crate::KeyedRwLocks) map, from
/// [`KeyedLocks::stats`](crate::KeyedLocks::stats).
///
/// The counters are kept where each operation already writes: an
/// uncontended acquisition counts in the key's own entry, the rest in the
/// key's shard, under the shard lock they take anyway. So keeping them adds
/// no shared cache line to any path. Reading them visits every shard and
/// entry in turn, so the sums are not one atomic snapshot of a map in use.
///
/// ```
/// use toctou::KeyedLocks;
///
/// let locks = KeyedLocks::<String>::new();
/// drop(locks.lock("a"));
/// let held = locks.lock("b");
/// assert!(locks.try_lock("b").is_none());
/// let stats = locks.stats();
/// assert_eq!(stats.acquisitions, 2);
/// assert_eq!(stats.live_keys, 1);
/// # drop(held);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStats {
    /// Successful acquisitions, in every mode, by every method.
    pub acquisitions: u64,
    /// Acquisitions that found the key taken and queued to wait (after a
    /// short spin, for blocking calls). `try_*` calls that fail are not
    /// counted.
    pub contended: u64,
    /// Timed waits (`try_lock_for`) that gave up.
    pub timeouts: u64,
    /// Async waits whose future was dropped while queued.
    pub cancelled: u64,
    /// Keys held or waited for now, as [`len`](crate::KeyedLocks::len).
    pub live_keys: usize,
    /// The most live keys seen at once. Sampled, not exact: a sample is
    /// taken whenever one shard's entries reach a new high, and at each
    /// `stats()` call, so a short-lived peak spread over many shards may be
    /// missed; and a shard's sample counts its idle entries kept for reuse
    /// (see *Memory* on [`KeyedLocks`](crate::KeyedLocks)) with its live ones.
    pub peak_live_keys: usize,
}

impl LockStats {
    pub(crate) fn new(counters: Counters, live_keys: usize, peak_live_keys: usize) -> Self {
        Self {
            acquisitions: counters.acquisitions,
            contended: counters.contended,
            timeouts: counters.timeouts,
            cancelled: counters.cancelled,
            live_keys,
            peak_live_keys,
        }
    }
}
