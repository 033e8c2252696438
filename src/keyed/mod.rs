//! Per-key locks: [`KeyedLocks`] (a mutex per key) and [`KeyedRwLocks`] (a
//! reader-writer lock per key), two front-ends on one entry lifecycle.
//!
//! - [`core`]: the lifecycle. An entry exists exactly while somebody holds or
//!   waits for its key; acquisition, release, waiting, timeouts and
//!   cancellation, and fairness. It is generic over the kind of lock.
//! - [`kind`]: the kinds of lock it manages (mutex, reader-writer).
//! - [`locks`] and [`rwlocks`]: the public types and their guards.

mod block;
mod core;
mod kind;
mod locks;
mod rwlocks;
mod stats;

pub use locks::{KeyGuard, KeyedLocks, MultiKeyGuard, OwnedKeyGuard};
pub use rwlocks::{KeyReadGuard, KeyWriteGuard, KeyedRwLocks};
pub use stats::LockStats;
