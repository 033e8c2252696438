//! Per-key locks: [`KeyedLocks`] (a mutex per key) and [`KeyedRwLocks`] (a
//! reader-writer lock per key), two front-ends on one entry lifecycle.
//!
//! - [`core`]: the lifecycle. An entry is live exactly while somebody holds,
//!   waits or spins for its key, and is kept idle afterwards until a sweep;
//!   acquisition (lock-free when uncontended), release, waiting, timeouts,
//!   cancellation, fairness and sweeping. It is generic over the kind of
//!   lock.
//! - [`index`]: a shard's index of entries, read without a lock.
//! - [`reclaim`]: frees swept entries once no lock-free lookup can hold them.
//! - [`kind`]: the kinds of lock it manages (mutex, reader-writer).
//! - [`locks`] and [`rwlocks`]: the public types and their guards.

/// The constructors, accessors and `Debug` that both front-ends share:
/// `$ty` is the public type (with a `core` field), `$acquire` a method call
/// that takes key `1` (or `7`) and returns a guard, and `$acquire_str` one
/// that takes key `"a"` on a `String`-keyed map, for the doc examples.
macro_rules! keyed_map_common {
    ($ty:ident, $acquire:literal, $acquire_str:literal) => {
        impl<K> $ty<K> {
            /// An empty map with the default hasher,
            /// [`LazyRandomState`]($crate::LazyRandomState) (std's
            /// `RandomState`, seeded at the first use).
            ///
            /// `const`: a map can be a plain `static`. Nothing is
            /// allocated until the first use, which allocates the shards
            /// (racing first uses allocate them once). Under
            /// `--cfg toctou_loom` it is `const` too, and a `static` map is
            /// empty again in every execution of a model.
            ///
            /// The caller's location is recorded (`#[track_caller]`) and
            /// shown by `Debug`, to tell maps apart.
            ///
            /// ```
            #[doc = concat!("static MAP: toctou::", stringify!($ty), "<String> = toctou::", stringify!($ty), "::new();")]
            ///
            /// assert!(MAP.is_empty());
            #[doc = concat!("drop(MAP.", $acquire_str, ");")]
            /// assert!(MAP.is_empty());
            /// ```
            #[must_use]
            #[track_caller]
            pub const fn new() -> Self {
                Self {
                    core: $crate::keyed::core::Core::with_hasher(
                        $crate::LazyRandomState::new(),
                        concat!("toctou::", stringify!($ty)),
                        std::panic::Location::caller(),
                    ),
                }
            }
        }

        impl<K, S: Default> Default for $ty<K, S> {
            #[track_caller]
            fn default() -> Self {
                Self::with_hasher(S::default())
            }
        }

        impl<K, S> $ty<K, S> {
            /// An empty map that hashes keys with `hasher`; the caller's
            /// location is recorded, as by [`new`](Self::new).
            ///
            /// ```
            /// use std::collections::hash_map::DefaultHasher;
            /// use std::hash::BuildHasherDefault;
            ///
            #[doc = concat!("let map = toctou::", stringify!($ty), "::<u64, _>::with_hasher(")]
            ///     BuildHasherDefault::<DefaultHasher>::default(),
            /// );
            #[doc = concat!("drop(map.", $acquire, ");")]
            /// ```
            #[must_use]
            #[track_caller]
            pub fn with_hasher(hasher: S) -> Self {
                Self {
                    core: $crate::keyed::core::Core::with_hasher(
                        hasher,
                        concat!("toctou::", stringify!($ty)),
                        std::panic::Location::caller(),
                    ),
                }
            }

            /// The map's hasher.
            ///
            /// ```
            #[doc = concat!("let map = toctou::", stringify!($ty), "::<u64>::new();")]
            /// let _hasher: &toctou::LazyRandomState = map.hasher();
            /// ```
            pub fn hasher(&self) -> &S {
                self.core.hasher()
            }

            /// The number of keys currently held (in any mode) or waited for.
            ///
            /// Exact when the map is not in use; under concurrency, a
            /// snapshot taken shard by shard.
            ///
            /// ```
            #[doc = concat!("let map = toctou::", stringify!($ty), "::<u64>::new();")]
            #[doc = concat!("let guard = map.", $acquire, ";")]
            /// assert_eq!(map.len(), 1);
            /// drop(guard);
            /// assert_eq!(map.len(), 0);
            /// ```
            pub fn len(&self) -> usize {
                self.core.len()
            }

            /// Whether no key is held or waited for.
            ///
            /// ```
            #[doc = concat!("assert!(toctou::", stringify!($ty), "::<u64>::new().is_empty());")]
            /// ```
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// The map's counters (see [`LockStats`](crate::LockStats)).
            ///
            /// ```
            #[doc = concat!("let map = toctou::", stringify!($ty), "::<u64>::new();")]
            #[doc = concat!("drop(map.", $acquire, ");")]
            /// assert_eq!(map.stats().acquisitions, 1);
            /// ```
            pub fn stats(&self) -> $crate::LockStats {
                let (counters, live, peak) = self.core.counters();
                $crate::keyed::stats::LockStats::new(counters, live, peak)
            }
        }

        impl<K, S> std::fmt::Debug for $ty<K, S> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("len", &self.len())
                    .field("created_at", &format_args!("{}", self.core.created_at()))
                    .finish_non_exhaustive()
            }
        }
    };
}

mod block;
mod core;
mod index;
mod kind;
mod locks;
mod reclaim;
mod rwlocks;
mod stats;

pub use locks::{KeyGuard, KeyedLocks, MultiKeyGuard, OwnedKeyGuard};
pub use rwlocks::{KeyReadGuard, KeyWriteGuard, KeyedRwLocks};
pub use stats::LockStats;
