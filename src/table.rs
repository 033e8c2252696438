//! The sharded hash table under every keyed primitive.
//!
//! A key's hash is computed once per call, with the map's `BuildHasher`, and
//! picks both the shard and the bucket. Each shard is a front-end-defined
//! value `C` (usually one or two [`Entries`] tables) behind a reader-writer
//! lock from the sync layer, padded to its own cache lines so that two shards
//! never share one.
//!
//! The table knows nothing about what an entry means: the front-ends
//! (`SingletonMap`, and the keyed locks) decide when entries are created and
//! removed, always under the shard's write lock, which is what makes their
//! check-then-insert and check-then-remove steps atomic.
//!
//! # Reentrancy
//!
//! A front-end that runs a user callback while it holds a shard lock (such as
//! a `retain` predicate) marks that shard with [`Table::mark_at`]. If the
//! callback calls back into the map and needs the same shard, the lock cannot
//! be taken without waiting, and the waiting thread is the one holding it: we
//! panic with a message instead of deadlocking. The check runs only when the
//! lock is not immediately available.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

use crate::reentry;
use crate::sync::{LazyInit, ShardLock};

/// One key's entry: the owned key, its hash, and the front-end's state for it.
///
/// The hash is stored so that growing or rehashing the table never calls the
/// user's `Hash`. hashbrown rehashes a table full of tombstones in place, and
/// if the hasher panics part-way it drops every entry it has not yet
/// rehashed: one key's panicking `Hash` would wipe other keys' entries (in
/// `SingletonMap`, their values, or the claims of initialisations in flight).
/// With the hash stored, the only user code the table runs is `Eq`, during
/// look-ups, which change nothing. The keyed locks' slots store theirs for
/// the same reason. The cost is 8 bytes per entry (a `String` key and a
/// one-word state take 40 bytes instead of 32).
pub(crate) struct Entry<K, T> {
    pub(crate) key: K,
    /// The key's hash under the map's hasher, computed once by the caller
    /// that inserted it.
    hash: u64,
    pub(crate) value: T,
}

/// A hash table of entries, looked up by a hash the caller computed with the
/// map's hasher.
pub(crate) struct Entries<K, T>(HashTable<Entry<K, T>>);

impl<K, T> Default for Entries<K, T> {
    fn default() -> Self {
        Self(HashTable::new())
    }
}

impl<K, T> Entries<K, T> {
    /// The entry for `key`, if any.
    #[inline]
    pub(crate) fn find<Q>(&self, hash: u64, key: &Q) -> Option<&Entry<K, T>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        self.0.find(hash, |e| e.key.borrow() == key)
    }

    /// Inserts an entry the caller has just checked is absent. `hash` must be
    /// the key's hash under the map's hasher; it is stored, and a growing
    /// table rehashes from it without calling the key's `Hash`.
    pub(crate) fn insert_new(&mut self, hash: u64, key: K, value: T) {
        self.0
            .insert_unique(hash, Entry { key, hash, value }, |e| e.hash);
    }

    /// Removes and returns the entry for `key`, if any.
    pub(crate) fn remove<Q>(&mut self, hash: u64, key: &Q) -> Option<Entry<K, T>>
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        self.remove_where(hash, |e| e.key.borrow() == key)
    }

    /// Removes and returns the first entry with hash `hash` whose value `is`
    /// accepts.
    pub(crate) fn remove_by(
        &mut self,
        hash: u64,
        mut is: impl FnMut(&T) -> bool,
    ) -> Option<Entry<K, T>> {
        self.remove_where(hash, |e| is(&e.value))
    }

    fn remove_where(
        &mut self,
        hash: u64,
        is: impl FnMut(&Entry<K, T>) -> bool,
    ) -> Option<Entry<K, T>> {
        match self.0.find_entry(hash, is) {
            Ok(occupied) => Some(occupied.remove().0),
            Err(_) => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Entry<K, T>> {
        self.0.iter()
    }

    /// Removes the entries that `remove` accepts, one at a time, and yields
    /// them. An entry is removed exactly when `remove` returns `true` for it,
    /// so a panic in `remove` leaves the table consistent.
    pub(crate) fn extract_if(
        &mut self,
        mut remove: impl FnMut(&Entry<K, T>) -> bool,
    ) -> impl Iterator<Item = Entry<K, T>> {
        self.0.extract_if(move |e| remove(e))
    }
}

/// A shard lock on its own cache lines (128 bytes: adjacent-line prefetch on
/// x86 pulls pairs of 64-byte lines).
#[repr(align(128))]
struct Padded<T>(T);

/// A sharded hash table whose shards are each an `L` (a lock around the
/// front-end's shard contents, `L::Data`).
///
/// The shards are allocated at the first use, so that the constructor can be
/// `const` (for `static` maps).
pub(crate) struct Table<L, S> {
    hasher: S,
    /// `shard_count()` shards (a power of two), made by `make_shards`.
    shards: LazyInit<Box<[Padded<L>]>>,
    /// `make_shards::<L>`, kept so that methods that need no `L::Data:
    /// Default` bound can allocate the shards.
    make: fn() -> Box<[Padded<L>]>,
    /// The public type's name, for the reentrancy panic.
    owner: &'static str,
}

/// `shard_count()` new, empty shards.
fn make_shards<L: ShardLock<Data: Default>>() -> Box<[Padded<L>]> {
    (0..shard_count())
        .map(|_| Padded(L::new(L::Data::default())))
        .collect()
}

impl<L: ShardLock<Data: Default>, S> Table<L, S> {
    /// An empty table; its shards are allocated at the first use (under
    /// `toctou_loom`, at the first use in each execution).
    pub(crate) const fn with_hasher(hasher: S, owner: &'static str) -> Self {
        Self {
            hasher,
            shards: LazyInit::new(make_shards::<L>),
            make: make_shards::<L>,
            owner,
        }
    }
}

impl<L: ShardLock, S> Table<L, S> {
    /// The shards, allocated now if this is the table's first use.
    #[inline]
    fn all(&self) -> &[Padded<L>] {
        self.shards.get(self.make)
    }

    pub(crate) fn hasher(&self) -> &S {
        &self.hasher
    }

    /// The shard for `hash`. hashbrown uses the low bits for the bucket and
    /// the top 7 for its tag byte, so the shard index comes from the middle.
    #[inline]
    fn shard(&self, hash: u64) -> &L {
        let shards = self.all();
        &shards[Self::index_in(shards, hash)].0
    }

    /// Locks the shard of `hash` for reading.
    #[inline]
    pub(crate) fn read(&self, hash: u64) -> L::Read<'_> {
        self.read_shard(self.shard(hash))
    }

    #[inline]
    fn read_shard<'a>(&self, shard: &'a L) -> L::Read<'a> {
        match shard.try_read() {
            Some(guard) => guard,
            None => self.read_slow(shard),
        }
    }

    #[cold]
    fn read_slow<'a>(&self, shard: &'a L) -> L::Read<'a> {
        self.assert_not_reentrant(shard);
        shard.read()
    }

    /// Locks the shard of `hash` for writing.
    #[inline]
    pub(crate) fn write(&self, hash: u64) -> L::Write<'_> {
        self.write_shard(self.shard(hash))
    }

    /// The number of shards; [`write_at`](Self::write_at) takes `0..shards()`.
    /// 0 while the table has never been used: it holds no entry then.
    pub(crate) fn shards(&self) -> usize {
        self.shards.try_get().map_or(0, |shards| shards.len())
    }

    /// Locks shard number `index` for writing.
    pub(crate) fn write_at(&self, index: usize) -> L::Write<'_> {
        self.write_shard(&self.all()[index].0)
    }

    /// The number of the shard that holds `hash`.
    #[inline]
    pub(crate) fn index(&self, hash: u64) -> usize {
        Self::index_in(self.all(), hash)
    }

    /// The index in `shards` (a power of two long) of the shard for `hash`.
    #[inline]
    fn index_in(shards: &[Padded<L>], hash: u64) -> usize {
        shard_index(hash, shards.len())
    }

    /// Locks shard number `index` for reading if that needs no waiting.
    pub(crate) fn try_read_at(&self, index: usize) -> Option<L::Read<'_>> {
        self.all()[index].0.try_read()
    }

    /// Marks shard number `index` as locked by a callback on this thread, for
    /// as long as the mark lives: a reentrant lock attempt on it panics.
    pub(crate) fn mark_at(&self, index: usize) -> reentry::Mark {
        reentry::Mark::enter(shard_addr(&self.all()[index].0))
    }

    /// Runs `f` on every shard under its read lock, one at a time; none if
    /// the table has never been used.
    pub(crate) fn for_each_shard(&self, mut f: impl FnMut(&L::Data)) {
        for shard in self.shards.try_get().into_iter().flat_map(|s| s.iter()) {
            f(&self.read_shard(&shard.0));
        }
    }

    #[inline]
    fn write_shard<'a>(&self, shard: &'a L) -> L::Write<'a> {
        match shard.try_write() {
            Some(guard) => guard,
            None => self.write_slow(shard),
        }
    }

    #[cold]
    fn write_slow<'a>(&self, shard: &'a L) -> L::Write<'a> {
        self.assert_not_reentrant(shard);
        shard.write()
    }

    #[cold]
    fn assert_not_reentrant(&self, shard: &L) {
        if reentry::is_initialising(shard_addr(shard)) {
            panic!(
                "reentrant call into a {} from a callback that runs while the map \
                 holds a lock on the same shard (a `retain` predicate, for example): \
                 this would deadlock; do not call back into the map from that callback",
                self.owner
            );
        }
    }
}

impl<L, S: BuildHasher> Table<L, S> {
    /// The hash of `key`. `K: Borrow<Q>` promises it equals the owned key's.
    #[inline]
    pub(crate) fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }
}

/// The number of the shard for `hash` among `shards` (a power of two, from
/// [`shard_count`]); arrays kept beside the table, one entry per shard (the
/// keyed maps' indices), are indexed by it too.
#[inline]
pub(crate) fn shard_index(hash: u64, shards: usize) -> usize {
    (hash >> 32) as usize & (shards - 1)
}

fn shard_addr<L>(shard: &L) -> usize {
    shard as *const L as usize
}

/// Four shards per core, rounded up to a power of two (as dashmap does), so
/// that unrelated keys rarely share a lock. Under loom, two: the models use
/// few keys, and every shard is a loom object.
///
/// Decided once per process: the cores available can differ from thread to
/// thread (CPU affinity) and over time (cgroups), and the keyed maps size
/// their shards and their shards' indices with separate calls, which must
/// agree.
pub(crate) fn shard_count() -> usize {
    #[cfg(toctou_loom)]
    {
        2
    }
    #[cfg(not(toctou_loom))]
    {
        static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *COUNT.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores * 4).next_power_of_two()
        })
    }
}
