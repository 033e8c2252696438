//! The in-process layer of [`FileLocks`](crate::FileLocks), written against
//! the file-system trait [`Fs`] like the on-disk protocol, so that the loom
//! models in `loom-tests/file_locks.rs` run this code over a simulated file
//! system too.
//!
//! Callers of one process queue on an in-process
//! [`KeyedRwLocks`](crate::KeyedRwLocks) keyed by the same key first (the
//! *key*, below); only the holder of the key talks to the OS. On top of
//! that:
//!
//! - **Shared holders share one OS lock.** The process's shared holders of
//!   a key count themselves in `shared`, which holds the one descriptor.
//!   Creating and giving up that descriptor is serialised per key by
//!   `gate`; joining it only takes `shared`'s mutex, under which the last
//!   holder's removal happens too.
//! - **Exclusive hand-over without syscalls.** An exclusive holder that
//!   releases while a blocked thread of this process waits to write the
//!   key (the front of its queue) *parks* its descriptor, still locked, in
//!   `parked`, then releases the key. Not for a task at the front: it runs
//!   only when its executor polls it, maybe much later, and a parked lock
//!   would keep other processes out meanwhile; not for a reader, which
//!   cannot use it. Whoever
//!   takes the key next takes the parked descriptor first thing: an
//!   exclusive taker holds the OS lock without a syscall; a shared taker
//!   releases it (the protocol's release: unlink, unlock, close) and takes
//!   a shared one. The lock is continuously held by this process across a
//!   hand-over, and only an exclusive holder may unlink the name, so the
//!   name still names the parked descriptor's file: no re-check is needed.
//! - **No orphaned descriptor.** A parked descriptor must not outlive the
//!   interest in its key: the waiter it was parked for may give up (a
//!   timeout, a dropped future). Rule: a descriptor is parked only while its
//!   parker holds the key, and every party that stops waiting for, or
//!   releases, a key after a descriptor may have been parked for it runs
//!   [`Layer::sweep`], which takes the key *without waiting*, and only if
//!   nobody is queued for it (not even a woken waiter), and releases a
//!   parked descriptor it finds. A sweep that cannot take the key leaves
//!   the descriptor to whoever holds the key or is queued for it: that
//!   party takes the key after the parking (the parker held it), so it
//!   finds the descriptor, or gives up and sweeps in turn. The last party
//!   to leave therefore always finds the key free and the descriptor
//!   there. The parker sweeps too, after releasing the key: the waiter it
//!   parked for may have given up (and swept, finding nothing) between the
//!   parker's "somebody waits" check and the parking.
//! - **Kept descriptors** (keeping mode only). A release that gives the
//!   OS lock up unlocks the descriptor and keeps it open in `idle` (at most
//!   `cap`, the oldest closed first); the next OS acquisition of the name
//!   locks it instead of opening the name. The protocol's re-check makes
//!   that sound (see *Kept descriptors* in `protocol.rs`). The deleting
//!   mode keeps none: its released files are gone.
//! - **A bounded chain.** The OS lock is not handed over once this process
//!   has held it for [`MAX_CHAIN`] (5 ms), nor after [`MAX_HANDOVERS`]
//!   hand-overs in a row; the next release then goes to the OS (unlock, and in the deleting mode unlink), where other
//!   processes' waiters can take it.

use std::collections::HashMap;
use std::time::Duration;
#[cfg(not(toctou_loom))]
use std::time::Instant;

use super::idle::Idle;
use super::protocol::{self, Failed, Fs, Mode, Wait};
use crate::sync::Mutex;
use crate::{KeyReadGuard, KeyWriteGuard, KeyedLocks, KeyedRwLocks};

/// The most hand-overs in a row before a release goes to the OS. The time
/// bound, [`MAX_CHAIN`], is normally the one that ends a chain (a hot key
/// hands over in well under a microsecond); this one bounds it where time
/// does not pass (loom) and against a clock that stands still.
pub const MAX_HANDOVERS: u32 = 1000;

/// How long this process may keep an OS lock across hand-overs; a release
/// after that goes to the OS. (Not applied under loom, where time does not
/// pass: the count bounds the chain there.)
pub const MAX_CHAIN: Duration = Duration::from_millis(5);

/// Where a hand-over chain stands: how many hand-overs so far, and when the
/// OS lock was taken.
#[derive(Clone, Copy, Debug)]
struct Chain {
    handovers: u32,
    #[cfg(not(toctou_loom))]
    since: Instant,
}

impl Chain {
    fn start() -> Self {
        Self {
            handovers: 0,
            #[cfg(not(toctou_loom))]
            since: Instant::now(),
        }
    }

    /// The chain after one more hand-over.
    fn next(mut self) -> Self {
        self.handovers += 1;
        self
    }

    /// Whether the lock may be handed over once more.
    fn may_continue(&self) -> bool {
        #[cfg(not(toctou_loom))]
        if self.since.elapsed() >= MAX_CHAIN {
            return false;
        }
        self.handovers < MAX_HANDOVERS
    }
}

/// An exclusive OS lock parked for the next taker of its key.
struct Parked<Fd> {
    fd: Fd,
    chain: Chain,
}

/// This process's shared OS lock of a key, and how many of its callers
/// hold it.
struct SharedOs<Fd> {
    fd: Fd,
    holders: usize,
}

/// The in-process layer over the file system `F`.
pub struct Layer<F: Fs> {
    fs: F,
    delete: bool,
    keyed: KeyedRwLocks<String>,
    gate: KeyedLocks<String>,
    shared: Mutex<HashMap<String, SharedOs<F::Fd>>>,
    parked: Mutex<HashMap<String, Parked<F::Fd>>>,
    idle: Mutex<Idle<F::Fd>>,
}

/// A held key: the in-process key and the OS lock (exclusive), or a count
/// in the process's shared OS lock (shared).
pub struct Hold<'a, F: Fs> {
    inner: Inner<'a, F>,
}

enum Inner<'a, F: Fs> {
    Exclusive {
        fd: F::Fd,
        chain: Chain,
        key: KeyWriteGuard<'a, String>,
    },
    /// Counted in `Layer::shared` until released.
    Shared { key: KeyReadGuard<'a, String> },
}

impl<F: Fs> Hold<'_, F> {
    /// The held key.
    pub fn key(&self) -> &str {
        match &self.inner {
            Inner::Exclusive { key, .. } => key.key(),
            Inner::Shared { key, .. } => key.key(),
        }
    }

    /// Whether it is held shared.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, Inner::Shared { .. })
    }
}

impl<F: Fs> Layer<F> {
    /// A layer over `fs`; `delete`: the deleting mode.
    pub fn new(fs: F, delete: bool) -> Self {
        Self {
            fs,
            delete,
            keyed: KeyedRwLocks::new(),
            gate: KeyedLocks::new(),
            shared: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            idle: Mutex::new(Idle::new(0)),
        }
    }

    /// In the keeping mode, keep up to `cap` descriptors of released keys
    /// open for their next acquisition (see the module docs). Ignored in
    /// the deleting mode.
    #[must_use]
    pub fn keeping_idle(self, cap: usize) -> Self {
        let cap = if self.delete { 0 } else { cap };
        Self {
            idle: Mutex::new(Idle::new(cap)),
            ..self
        }
    }

    /// How many descriptors are kept idle now.
    pub fn idle_len(&self) -> usize {
        self.idle.lock().len()
    }

    /// Closes every kept descriptor; returns how many there were.
    pub fn close_idle(&self) -> usize {
        let fds = self.idle.lock().drain();
        fds.len()
    }

    /// Takes the OS lock of `name` in `mode` (the protocol's acquire),
    /// through the descriptor kept for it if there is one. If opening fails
    /// for want of descriptors (`EMFILE`, `ENFILE`) while some are kept
    /// idle, closes those and tries once more.
    pub fn os_acquire(&self, name: &str, mode: Mode, wait: Wait) -> Result<Option<F::Fd>, Failed> {
        let reuse = self.take_idle(name);
        match protocol::acquire_reusing(&self.fs, name, mode, wait, reuse) {
            Err(failed) if failed.step == "open" && out_of_descriptors(&failed.error) => {
                if self.close_idle() == 0 {
                    return Err(failed);
                }
                protocol::acquire(&self.fs, name, mode, wait)
            }
            result => result,
        }
    }

    fn take_idle(&self, name: &str) -> Option<F::Fd> {
        // Not even the mutex in the deleting mode (its cap is fixed at 0).
        if self.delete {
            return None;
        }
        self.idle.lock().take(name)
    }

    /// Gives up the OS lock `fd` of `name`, held in `mode`: the protocol's
    /// release, or in the keeping mode an unlock that keeps the descriptor
    /// open for the next acquisition of the name.
    fn give_up(&self, name: &str, fd: F::Fd, mode: Mode) -> Result<(), Failed> {
        if self.delete {
            return protocol::release(&self.fs, name, fd, mode, true);
        }
        let fd = protocol::unlock_keeping(&self.fs, fd)?;
        let closed = self.idle.lock().keep(name, fd);
        drop(closed); // closed outside the mutex
        Ok(())
    }

    /// The file system.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// The in-process keys: exclusive callers take a key for writing,
    /// shared callers for reading.
    pub fn keyed(&self) -> &KeyedRwLocks<String> {
        &self.keyed
    }

    /// Takes `key` for writing, waiting at most `timeout`; on a timeout,
    /// sweeps the key (a lock may have been handed over for this waiter).
    pub fn try_write_for(
        &self,
        key: &str,
        name: &str,
        timeout: Duration,
    ) -> Option<KeyWriteGuard<'_, String>> {
        let held = self.keyed.try_write_for(key, timeout);
        if held.is_none() {
            self.sweep(key, name);
        }
        held
    }

    /// Takes `key` for reading, waiting at most `timeout`; sweeps on a
    /// timeout, as [`try_write_for`](Self::try_write_for).
    pub fn try_read_for(
        &self,
        key: &str,
        name: &str,
        timeout: Duration,
    ) -> Option<KeyReadGuard<'_, String>> {
        let held = self.keyed.try_read_for(key, timeout);
        if held.is_none() {
            self.sweep(key, name);
        }
        held
    }

    /// Takes `key` for writing without blocking the thread; a dropped
    /// future sweeps the key (a lock may have been handed over for it).
    pub async fn write_async(&self, key: &str, name: &str) -> KeyWriteGuard<'_, String> {
        let sweep = SweepOnDrop::new(self, key, name);
        let wait = self.keyed.write_async(key);
        let held = wait.await;
        sweep.disarm();
        held
    }

    /// Takes `key` for reading without blocking the thread; sweeps if
    /// dropped, as [`write_async`](Self::write_async).
    pub async fn read_async(&self, key: &str, name: &str) -> KeyReadGuard<'_, String> {
        let sweep = SweepOnDrop::new(self, key, name);
        let wait = self.keyed.read_async(key);
        let held = wait.await;
        sweep.disarm();
        held
    }

    /// Serialises this process's shared callers of a key while they create
    /// or give up its shared OS lock.
    pub fn gate(&self) -> &KeyedLocks<String> {
        &self.gate
    }

    /// Right after taking `key` for writing: the OS lock parked for it, if
    /// any, or the key back (then take the OS lock and call
    /// [`exclusive`](Self::exclusive)).
    pub fn take_parked<'a>(
        &'a self,
        key: KeyWriteGuard<'a, String>,
    ) -> Result<Hold<'a, F>, KeyWriteGuard<'a, String>> {
        let parked = self.parked.lock().remove(key.key());
        match parked {
            Some(Parked { fd, chain }) => Ok(Hold {
                inner: Inner::Exclusive { fd, chain, key },
            }),
            None => Err(key),
        }
    }

    /// An exclusive hold of `key` with the OS lock `fd`, just taken.
    pub fn exclusive<'a>(&'a self, key: KeyWriteGuard<'a, String>, fd: F::Fd) -> Hold<'a, F> {
        Hold {
            inner: Inner::Exclusive {
                fd,
                chain: Chain::start(),
                key,
            },
        }
    }

    /// Right after taking `key` for reading: releases an exclusive OS lock
    /// parked for it, if any (a reader cannot use it; a newcomer that
    /// barged in ahead of the writer it was parked for gets here). A
    /// failure is not reported: it was the parker's release, which has
    /// returned; the descriptor is closed whatever happens (dropping the
    /// lock), and a file it could not unlink is accepted by the next locker.
    pub fn release_parked(&self, key: &KeyReadGuard<'_, String>, name: &str) {
        let parked = self.parked.lock().remove(key.key());
        if let Some(Parked { fd, .. }) = parked {
            let _ = self.give_up(name, fd, Mode::Exclusive);
        }
    }

    /// Joins this process's shared OS lock of the key if there is one;
    /// gives the read key back if there is none.
    pub fn join_existing<'a>(
        &'a self,
        key: KeyReadGuard<'a, String>,
    ) -> Result<Hold<'a, F>, KeyReadGuard<'a, String>> {
        let joined = match self.shared.lock().get_mut(key.key()) {
            Some(os) => {
                os.holders += 1;
                true
            }
            None => false,
        };
        if !joined {
            return Err(key);
        }
        Ok(Hold {
            inner: Inner::Shared { key },
        })
    }

    /// A shared hold with the shared OS lock `fd`, just taken by the caller,
    /// which holds the key's gate and found no shared lock to join.
    pub fn join_new<'a>(&'a self, key: KeyReadGuard<'a, String>, fd: F::Fd) -> Hold<'a, F> {
        let os = SharedOs { fd, holders: 1 };
        self.shared.lock().insert(key.key().clone(), os);
        Hold {
            inner: Inner::Shared { key },
        }
    }

    /// Releases `hold`: hands an exclusive OS lock over to a waiter of this
    /// process if the chain allows, else gives it up through the protocol;
    /// then releases the in-process key. A failure comes with the key.
    pub fn release(&self, hold: Hold<'_, F>, name: &str) -> Result<(), (String, Failed)> {
        match hold.inner {
            Inner::Exclusive { fd, chain, key } => {
                if chain.may_continue() && key.blocked_writer_waits() {
                    let chain = chain.next();
                    let owned = key.key().clone();
                    // Parked while we hold the key: its next taker, or a
                    // sweep, finds it (see the module docs).
                    self.parked
                        .lock()
                        .insert(owned.clone(), Parked { fd, chain });
                    drop(key);
                    self.sweep(&owned, name);
                    return Ok(());
                }
                let released = self
                    .give_up(name, fd, Mode::Exclusive)
                    .map_err(|failed| (key.key().clone(), failed));
                drop(key);
                released
            }
            Inner::Shared { key } => {
                let last = {
                    let _gate = self.gate.lock(key.key().as_str());
                    let mut shared = self.shared.lock();
                    let last = match shared.get_mut(key.key()) {
                        Some(os) => {
                            os.holders -= 1;
                            os.holders == 0
                        }
                        None => unreachable!("a shared holder is counted"),
                    };
                    let os = if last { shared.remove(key.key()) } else { None };
                    drop(shared);
                    // Released under the gate: a shared caller that finds
                    // no shared lock to join takes a new one only after.
                    os.map(|os| self.give_up(name, os.fd, Mode::Shared))
                };
                let released = last
                    .unwrap_or(Ok(()))
                    .map_err(|failed| (key.key().clone(), failed));
                drop(key);
                released
            }
        }
    }

    /// Releases an OS lock parked for `key` that nobody will take: called
    /// by every party that gives up waiting for `key` (a timeout, a dropped
    /// future) and by a parker after its hand-over. Takes the key without
    /// waiting; if it cannot, the holder or a queued waiter will find the
    /// lock (see the module docs). A failed release is not reported: it
    /// still closes the descriptor (dropping the lock), and a file it could
    /// not unlink is accepted by the next locker.
    pub fn sweep(&self, key: &str, name: &str) {
        if !self.parked.lock().contains_key(key) {
            return;
        }
        // Not `try_write`: that may take a free key from a waiter who was
        // woken and is on its way to take it, with the parked lock.
        let Some(held) = self.keyed.try_write_unqueued(key) else {
            return;
        };
        let parked = self.parked.lock().remove(key);
        if let Some(Parked { fd, .. }) = parked {
            let _ = self.give_up(name, fd, Mode::Exclusive);
        }
        drop(held);
    }
}

/// Whether `error` says the process or the system is out of descriptors.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Sweeps a key (see [`Layer::sweep`]) if a wait for it is cancelled.
/// Declared before the wait's future, so dropped after it: the sweep runs
/// once the waiter has left the queue.
struct SweepOnDrop<'a, F: Fs> {
    layer: &'a Layer<F>,
    key: &'a str,
    name: &'a str,
    armed: bool,
}

impl<'a, F: Fs> SweepOnDrop<'a, F> {
    fn new(layer: &'a Layer<F>, key: &'a str, name: &'a str) -> Self {
        Self {
            layer,
            key,
            name,
            armed: true,
        }
    }

    /// The wait ended holding the key: nothing to sweep.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<F: Fs> Drop for SweepOnDrop<'_, F> {
    fn drop(&mut self) {
        if self.armed {
            self.layer.sweep(self.key, self.name);
        }
    }
}
