//! [`LazyRandomState`]: the keyed maps' default hasher, std's `RandomState`
//! seeded on first use so that the maps' `new` can be `const`.

use std::fmt;
use std::hash::{BuildHasher, DefaultHasher, RandomState};

use crate::sync::OnceValue;

/// The default hasher of [`KeyedLocks`](crate::KeyedLocks),
/// [`KeyedRwLocks`](crate::KeyedRwLocks) and
/// [`SingletonMap`](crate::SingletonMap): std's
/// [`RandomState`](std::hash::RandomState) (SipHash-1-3 with random keys,
/// resistant to HashDoS), whose keys are drawn when it first hashes rather
/// than when it is created. That lets `new` be `const`, so the maps can be
/// plain `static`s.
///
/// Each map draws its own keys, as with `RandomState::new()`. The first
/// hash draws them (racing first uses draw them once); after that, a hash
/// costs one `Acquire` load and a branch more than `RandomState`'s.
///
/// Under `--cfg toctou_loom` the keys are fixed (those of
/// `DefaultHasher::new()`): loom replays a model many times and requires
/// every execution to make the same choices, and where a key lands in a
/// map (its shard, its probe sequence, which keys share a shard and sweep
/// each other) decides which loom objects an operation touches.
///
/// ```
/// use std::hash::BuildHasher;
/// use toctou::LazyRandomState;
///
/// static HASHER: LazyRandomState = LazyRandomState::new();
/// assert_eq!(HASHER.hash_one("a"), HASHER.hash_one("a"));
/// ```
pub struct LazyRandomState {
    keys: OnceValue<RandomState>,
}

impl LazyRandomState {
    /// A hasher whose keys are drawn at its first use.
    ///
    /// ```
    /// let _ = toctou::LazyRandomState::new();
    /// ```
    #[must_use]
    pub const fn new() -> Self {
        Self {
            keys: OnceValue::new(),
        }
    }

    #[cfg_attr(toctou_loom, allow(dead_code))]
    #[inline]
    fn keys(&self) -> &RandomState {
        self.keys.get(RandomState::new)
    }
}

impl BuildHasher for LazyRandomState {
    type Hasher = DefaultHasher;

    #[inline]
    fn build_hasher(&self) -> DefaultHasher {
        #[cfg(toctou_loom)]
        {
            DefaultHasher::new()
        }
        #[cfg(not(toctou_loom))]
        {
            self.keys().build_hasher()
        }
    }
}

impl Default for LazyRandomState {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LazyRandomState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyRandomState").finish_non_exhaustive()
    }
}
