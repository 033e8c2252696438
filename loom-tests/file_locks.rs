//! Loom models of the `FileLocks` on-disk protocol (src/file/protocol.rs),
//! run over a simulated file system in which threads play processes.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg toctou_loom" cargo test --release --test loom_file_locks
//! ```
//!
//! The simulated file system ([`SimFs`]) maps names to inodes and keeps a
//! `flock` state per inode: one exclusive holder or any number of shared
//! ones, blocking waiters parked on a loom `Condvar`, locks dropped when a
//! descriptor closes, and conversions that are not atomic (the old lock is
//! dropped, the mutex released, then the new lock tried), as Linux's
//! `flock` does. Unlinked inodes stay lockable through open descriptors.
//! The models call the crate's real protocol functions through the hidden
//! `toctou::__file_protocol` re-export (present only under `toctou_loom`).
//!
//! Mutual exclusion is checked with a violation detector: one atomic that
//! counts the holders who believe they hold the key (an exclusive holder
//! adds [`WRITER`], a shared one 1); a read-modify-write sees every earlier
//! one, so two exclusive holders, or a writer with readers, fail the model
//! whatever the memory ordering. A blocked waiter that nobody wakes is a
//! deadlock, which loom reports (a lost wake-up).
//!
//! The last models run the in-process layer (src/file/layer.rs, through the
//! hidden `toctou::__file_layer`) over the same file system: an exclusive
//! holder hands its OS lock to a waiter of its process without syscalls,
//! and no lock may stay parked when that waiter gives up, is a reader, or
//! competes with another process. A lock left parked blocks the next
//! process forever: a loom deadlock.
//!
//! The models are bounded to two or three preemptions (each says which), so
//! that the whole file runs in seconds; every mutant in
//! scripts/loom-mutants.py that names this file is caught within the bound.
#![cfg(toctou_loom)]

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering::SeqCst;

use loom::sync::atomic::AtomicUsize;
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
use loom::thread;
use toctou::__file_layer::{Hold, Layer, ReadKey, WriteKey};
use toctou::__file_protocol::{self as protocol, FileId, Fs, Mode, Wait};

#[derive(Default)]
struct Inode {
    exclusive: Option<u64>,
    shared: Vec<u64>,
}

#[derive(Default)]
struct State {
    names: HashMap<String, u64>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    next_fd: u64,
}

#[derive(Default)]
struct Sim {
    state: Mutex<State>,
    changed: Condvar,
}

/// The simulated directory.
#[derive(Clone, Default)]
struct SimFs(Arc<Sim>);

/// A descriptor: closing (dropping) it drops its lock.
struct SimFd {
    sim: Arc<Sim>,
    id: u64,
    ino: u64,
}

impl Sim {
    /// Drops `fd`'s lock, if any; says whether it had one.
    fn drop_lock(state: &mut State, fd: &SimFd) -> bool {
        let inode = state.inodes.get_mut(&fd.ino).unwrap();
        let had_ex = inode.exclusive == Some(fd.id);
        if had_ex {
            inode.exclusive = None;
        }
        let before = inode.shared.len();
        inode.shared.retain(|&id| id != fd.id);
        had_ex || inode.shared.len() != before
    }
}

impl Drop for SimFd {
    fn drop(&mut self) {
        let mut state = self.sim.state.lock().unwrap();
        if Sim::drop_lock(&mut state, self) {
            self.sim.changed.notify_all();
        }
    }
}

impl Fs for SimFs {
    type Fd = SimFd;

    fn open_create(&self, name: &str) -> io::Result<SimFd> {
        let mut state = self.0.state.lock().unwrap();
        let ino = match state.names.get(name) {
            Some(&ino) => ino,
            None => {
                state.next_ino += 1;
                let ino = state.next_ino;
                state.inodes.insert(ino, Inode::default());
                state.names.insert(name.to_owned(), ino);
                ino
            }
        };
        state.next_fd += 1;
        Ok(SimFd {
            sim: self.0.clone(),
            id: state.next_fd,
            ino,
        })
    }

    fn lock(&self, fd: &SimFd, mode: Mode, block: bool) -> io::Result<bool> {
        let mut state = self.0.state.lock().unwrap();
        if Sim::drop_lock(&mut state, fd) {
            // A conversion: the old lock is gone before the new one is
            // tried, and others may run in between.
            self.0.changed.notify_all();
            drop(state);
            state = self.0.state.lock().unwrap();
        }
        loop {
            let inode = state.inodes.get_mut(&fd.ino).unwrap();
            let free = match mode {
                Mode::Exclusive => inode.exclusive.is_none() && inode.shared.is_empty(),
                Mode::Shared => inode.exclusive.is_none(),
            };
            if free {
                match mode {
                    Mode::Exclusive => inode.exclusive = Some(fd.id),
                    Mode::Shared => inode.shared.push(fd.id),
                }
                return Ok(true);
            }
            if !block {
                return Ok(false);
            }
            state = wait(&self.0.changed, state);
        }
    }

    fn unlock(&self, fd: &SimFd) -> io::Result<()> {
        let mut state = self.0.state.lock().unwrap();
        if Sim::drop_lock(&mut state, fd) {
            self.0.changed.notify_all();
        }
        Ok(())
    }

    fn fstat(&self, fd: &SimFd) -> io::Result<FileId> {
        Ok(FileId {
            dev: 1,
            ino: fd.ino,
        })
    }

    fn stat_at(&self, name: &str) -> io::Result<Option<FileId>> {
        let state = self.0.state.lock().unwrap();
        Ok(state.names.get(name).map(|&ino| FileId { dev: 1, ino }))
    }

    fn unlink_at(&self, name: &str) -> io::Result<()> {
        let mut state = self.0.state.lock().unwrap();
        match state.names.remove(name) {
            Some(_) => Ok(()),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.0.state.lock().unwrap();
        let mut names: Vec<String> = state.names.keys().cloned().collect();
        names.sort();
        Ok(names)
    }
}

fn wait<'a>(cv: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    cv.wait(guard).unwrap()
}

impl SimFs {
    fn files(&self) -> usize {
        self.0.state.lock().unwrap().names.len()
    }
}

const NAME: &str = "k.lock";
const WRITER: usize = 1 << 16;

/// Counts who believes they hold the key (see the module docs), and the
/// releases that failed.
#[derive(Clone, Default)]
struct Detector(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Detector {
    /// Records a release's result. A release fails in these models only
    /// when it unlinks a name that is no longer its file (`NotFound`): on a
    /// real file system it could as well have deleted another holder's
    /// file. Recorded rather than unwrapped, so that the holder-count
    /// assertions report a broken protocol first; each model asserts
    /// [`Detector::no_failed_release`] at its end.
    fn released(&self, result: Result<(), protocol::Failed>) {
        if result.is_err() {
            self.1.fetch_add(1, SeqCst);
        }
    }

    fn no_failed_release(&self) {
        assert_eq!(
            self.1.load(SeqCst),
            0,
            "a release unlinked a name that was not its file"
        );
    }

    fn enter(&self, mode: Mode) {
        match mode {
            Mode::Exclusive => {
                let before = self.0.fetch_add(WRITER, SeqCst);
                assert_eq!(before, 0, "an exclusive holder with other holders");
            }
            Mode::Shared => {
                let before = self.0.fetch_add(1, SeqCst);
                assert!(before < WRITER, "a shared holder with an exclusive one");
            }
        }
    }

    fn leave(&self, mode: Mode) {
        let unit = if mode == Mode::Exclusive { WRITER } else { 1 };
        self.0.fetch_sub(unit, SeqCst);
    }
}

/// One "process" takes the key, works, releases (deleting unless `keep`).
fn locked(fs: &SimFs, det: &Detector, mode: Mode, keep: bool) {
    let fd = protocol::acquire(fs, NAME, mode, Wait::Block)
        .unwrap()
        .expect("a blocking acquire returns a descriptor");
    det.enter(mode);
    det.leave(mode);
    det.released(protocol::release(fs, NAME, fd, mode, !keep));
}

fn bounded(preemptions: usize) -> loom::model::Builder {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(preemptions);
    model
}

/// Two processes lock, release and delete the same key; one of them twice,
/// so that it re-creates the file while the other may still wait on (or
/// hold) the deleted one. Afterwards the directory is empty. Bounded to
/// three preemptions.
///
/// Catches: no inode re-check after locking (the waiter keeps a lock on the
/// deleted inode while the other creates and locks a new file); unlock
/// before unlink (a waiter locks the inode and verifies it, then the
/// releaser deletes it under the waiter, and the next locker creates a new
/// one).
#[test]
fn two_processes_lock_release_and_delete() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let other = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || locked(&fs, &det, Mode::Exclusive, false))
        };
        locked(&fs, &det, Mode::Exclusive, false);
        locked(&fs, &det, Mode::Exclusive, false);
        other.join().unwrap();
        assert_eq!(fs.files(), 0, "the last holder deleted the file");
        det.no_failed_release();
    });
}

/// Three processes, one lock each: no two holders, no lost wake-up (two
/// may block on one inode), the directory ends empty. Bounded to two
/// preemptions.
///
/// Catches: no inode re-check after locking.
#[test]
fn three_processes_lock_release_and_delete() {
    bounded(2).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (fs, det) = (fs.clone(), det.clone());
                thread::spawn(move || locked(&fs, &det, Mode::Exclusive, false))
            })
            .collect();
        locked(&fs, &det, Mode::Exclusive, false);
        for other in others {
            other.join().unwrap();
        }
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// Two shared holders; one of them also tries the key exclusively (through
/// a second descriptor, as another process would) while it still holds it
/// shared, and the other one then takes it exclusively. The last shared
/// holder deletes the file. Bounded to three preemptions.
///
/// Catches: a shared holder that unlinks without the upgrade (it deletes
/// the file under the other shared holder, and the exclusive try creates a
/// new file and gets it while the shared holder still holds the old one);
/// an upgrade without the re-check of the name (in the gap of the
/// non-atomic conversion the other takes the file exclusively and deletes
/// it, and the upgraded holder then unlinks a name that is not its file).
#[test]
fn shared_holders_and_an_exclusive_one() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let reader = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || {
                locked(&fs, &det, Mode::Shared, false);
            })
        };
        let fd = protocol::acquire(&fs, NAME, Mode::Shared, Wait::Block)
            .unwrap()
            .unwrap();
        det.enter(Mode::Shared);
        if let Some(ex) = protocol::acquire(&fs, NAME, Mode::Exclusive, Wait::Try).unwrap() {
            det.enter(Mode::Exclusive); // fails: we are a shared holder
            det.leave(Mode::Exclusive);
            det.released(protocol::release(&fs, NAME, ex, Mode::Exclusive, true));
        }
        det.leave(Mode::Shared);
        det.released(protocol::release(&fs, NAME, fd, Mode::Shared, true));
        reader.join().unwrap();
        assert_eq!(fs.files(), 0, "the last shared holder deleted the file");
        locked(&fs, &det, Mode::Exclusive, false);
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// A shared holder and an exclusive locker race: they never overlap, the
/// writer blocked on the reader's file is always woken (a lost wake-up
/// would be a loom deadlock), and the file is gone at the end. Bounded to
/// three preemptions.
///
/// A plain check: with one reader and one writer none of the listed
/// mutants has a third party to collide with; the models above catch them.
#[test]
fn a_reader_and_a_writer() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let writer = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || locked(&fs, &det, Mode::Exclusive, false))
        };
        locked(&fs, &det, Mode::Shared, false);
        writer.join().unwrap();
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// `prune` (keeping mode) races a locker: it never removes a held file,
/// and a file it removes leaves a waiter that re-checks and retries. The
/// pruning process then locks the key itself. Bounded to three preemptions.
///
/// Catches: `prune` unlinking without holding the lock (it deletes the
/// holder's file, and its own lock then creates and gets a new one).
#[test]
fn prune_races_a_locker() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let locker = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || locked(&fs, &det, Mode::Exclusive, true))
        };
        protocol::prune(&fs, |name| name.ends_with(".lock")).unwrap();
        locked(&fs, &det, Mode::Exclusive, true);
        locker.join().unwrap();
        assert_eq!(fs.files(), 1, "keeping mode keeps the file");
        assert_eq!(protocol::prune(&fs, |_| true).unwrap(), 1);
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// A keeping-mode process keeps its released descriptor open and locks the
/// key again through it, while another process prunes the file and then
/// locks the key (creating a new file): the kept descriptor may be of a
/// deleted file, and the two never both hold the key. Bounded to three
/// preemptions.
///
/// Catches: a kept descriptor trusted without the re-check of the name
/// (its holder locks the pruned inode while the other creates and locks a
/// new file).
#[test]
fn a_kept_descriptor_races_prune() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let pruner = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || {
                protocol::prune(&fs, |name| name.ends_with(".lock")).unwrap();
                locked(&fs, &det, Mode::Exclusive, true);
            })
        };
        let fd = protocol::acquire(&fs, NAME, Mode::Exclusive, Wait::Block)
            .unwrap()
            .unwrap();
        let kept = protocol::unlock_keeping(&fs, fd).unwrap();
        let fd =
            protocol::acquire_reusing(&fs, NAME, Mode::Exclusive, Wait::Block, &mut Some(kept))
                .unwrap()
                .unwrap();
        det.enter(Mode::Exclusive);
        det.leave(Mode::Exclusive);
        det.released(protocol::release(&fs, NAME, fd, Mode::Exclusive, false));
        pruner.join().unwrap();
        assert_eq!(fs.files(), 1, "keeping mode keeps the file");
        det.no_failed_release();
    });
}

/// The key of the layer models (their file is [`NAME`]).
const KEY: &str = "k";

/// The exclusive acquisition of `FileLocks` (src/file/mod.rs) once the
/// in-process key is held: the lock handed over for it, or a new one.
fn exclusive_hold<'a>(layer: &'a Layer<SimFs>, held: WriteKey<'a, SimFs>) -> Hold<'a, SimFs> {
    match layer.take_parked(held) {
        Ok(hold) => hold,
        Err(held) => {
            let fd = layer
                .os_acquire(NAME, Mode::Exclusive, Wait::Block)
                .unwrap()
                .expect("a blocking acquire returns a descriptor");
            layer.exclusive(held, NAME.to_owned(), fd)
        }
    }
}

/// The shared acquisition of `FileLocks` once the in-process key is held
/// for reading: give up a lock handed over for it, join the process's
/// shared lock, or take one under the gate.
fn shared_hold<'a>(layer: &'a Layer<SimFs>, held: ReadKey<'a, SimFs>) -> Hold<'a, SimFs> {
    layer.release_parked(&held);
    let (held, name) = match layer.join_existing(held, NAME.to_owned()) {
        Ok(hold) => return hold,
        Err(rest) => rest,
    };
    let _gate = layer.gate().lock(KEY);
    let (held, name) = match layer.join_existing(held, name) {
        Ok(hold) => return hold,
        Err(rest) => rest,
    };
    let fd = layer
        .os_acquire(NAME, Mode::Shared, Wait::Block)
        .unwrap()
        .expect("a blocking acquire returns a descriptor");
    layer.join_new(held, name, fd)
}

/// Holds `hold` for a moment (recorded by the detector), then releases it.
fn work(layer: &Layer<SimFs>, det: &Detector, hold: Hold<'_, SimFs>) {
    let mode = if hold.is_shared() {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    det.enter(mode);
    det.leave(mode);
    det.released(layer.release(hold).map_err(|(_, _, failed)| failed));
}

/// Another process takes the key exclusively and releases it: a lock left
/// parked by the first would block it forever (a loom deadlock).
fn another_process_locks(fs: &SimFs, det: &Detector) {
    let other = Layer::new(fs.clone(), true);
    let held = other.write(KEY);
    let hold = exclusive_hold(&other, held);
    work(&other, det, hold);
}

/// A holder of the key releases it while a thread of its process waits for
/// it with `try_write_for`, whose deadline may pass at any point (loom lets
/// it expire or not); both are done when this returns.
fn release_beside_a_timed_waiter() -> (SimFs, Detector, Arc<Layer<SimFs>>) {
    let fs = SimFs::default();
    let det = Detector::default();
    let layer = Arc::new(Layer::new(fs.clone(), true));
    let held = layer.write(KEY);
    let hold = exclusive_hold(&layer, held);
    let waiter = {
        let (layer, det) = (layer.clone(), det.clone());
        thread::spawn(move || {
            let timeout = std::time::Duration::from_millis(1);
            if let Some(held) = layer.try_write_for(KEY, timeout) {
                let hold = exclusive_hold(&layer, held);
                work(&layer, &det, hold);
            }
        })
    };
    work(&layer, &det, hold);
    waiter.join().unwrap();
    (fs, det, layer)
}

/// A holder releases while a waiter of its process gives up: the waiter
/// blocks in `try_write_for`, whose deadline may pass at any point (loom
/// lets it expire or not). The release may hand the OS lock over (the
/// waiter was queued, a blocked thread, when the holder looked) just as
/// the waiter's deadline passes: a woken waiter takes the key (and the
/// parked lock) even then, and one that left before the look is not parked
/// for. Afterwards another process gets
/// the key and the directory is empty. Bounded to three preemptions.
#[test]
fn a_hand_over_meets_a_waiter_that_gives_up() {
    bounded(3).check(|| {
        let (fs, det, layer) = release_beside_a_timed_waiter();
        another_process_locks(&fs, &det);
        assert_eq!(fs.files(), 0);
        assert!(layer.is_empty());
        det.no_failed_release();
    });
}

/// The narrowest case of the one above: a timed waiter, nothing else, whose
/// wait expires after one park (three elsewhere), so that loom lets it
/// leave at every point of the holder's release. The holder looks for a
/// waiting writer and releases in one step, so a lock is parked only for a
/// waiter that is still queued, and a queued waiter that is woken takes the
/// key (and the parked lock) even if its deadline has passed: no lock is
/// left parked, and the directory ends empty. Bounded to three preemptions.
///
/// A plain check. Releasing a lock still parked when its entry is freed
/// (`LayerKey`'s drop) is a safety net that the protocol no longer reaches:
/// while the look and the release were two steps, a waiter could leave
/// between them, and this model caught a drop that did not release.
#[test]
fn a_timed_waiter_takes_the_lock_parked_for_it_or_leaves_before() {
    toctou::__loom_timed_parks(1);
    bounded(3).check(|| {
        let (fs, det, layer) = release_beside_a_timed_waiter();
        assert!(layer.is_empty());
        assert_eq!(fs.files(), 0, "the parked lock's file is gone");
        det.no_failed_release();
    });
    toctou::__loom_timed_parks(3);
}

/// A task at the front of the queue is not handed the OS lock (it runs
/// only when its executor polls it): the holder's release goes to the OS,
/// and another process gets the key while the task still waits.
#[test]
fn a_waiting_task_is_not_handed_the_lock() {
    use std::future::Future;
    use std::task::{Context, Waker};
    bounded(2).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let layer = Layer::new(fs.clone(), true);
        let held = layer.write(KEY);
        let hold = exclusive_hold(&layer, held);
        let mut wait = Box::pin(layer.write_async(KEY));
        assert!(
            wait.as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending()
        );
        work(&layer, &det, hold);
        // The task is not polled again before another process locks: a
        // lock parked for it would block that process forever.
        another_process_locks(&fs, &det);
        drop(wait);
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// A holder releases while a waiter of its process blocks for the key and
/// another process blocks for it too: the key goes from one to the next
/// (handed over in-process, or through the OS), never to two at once, and
/// nobody waits forever. Bounded to two preemptions.
///
/// Catches: an exclusive taker that ignores the parked lock; parking after
/// releasing the key.
#[test]
fn a_hand_over_and_another_process() {
    bounded(2).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let layer = Arc::new(Layer::new(fs.clone(), true));
        let held = layer.write(KEY);
        let hold = exclusive_hold(&layer, held);
        let waiter = {
            let (layer, det) = (layer.clone(), det.clone());
            thread::spawn(move || {
                let held = layer.write(KEY);
                let hold = exclusive_hold(&layer, held);
                work(&layer, &det, hold);
            })
        };
        let other = {
            let (fs, det) = (fs.clone(), det.clone());
            thread::spawn(move || another_process_locks(&fs, &det))
        };
        work(&layer, &det, hold);
        waiter.join().unwrap();
        other.join().unwrap();
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}

/// A holder releases while a writer of its process is blocked for the key,
/// so the lock is parked for that writer; a reader of the process arrives
/// meanwhile and may take the key first (a newcomer may take a free key
/// whose woken waiter has not come back yet). A reader that finds the
/// exclusive lock parked gives it up (a reader cannot use it) before it
/// takes a shared one. Another process then gets the key. Bounded to three
/// preemptions.
///
/// Catches: a reader that ignores the parked lock (its shared lock blocks
/// on its own process's exclusive one, while the writer waits for the
/// reader).
#[test]
fn a_reader_handed_an_exclusive_lock_gives_it_up() {
    bounded(3).check(|| {
        let fs = SimFs::default();
        let det = Detector::default();
        let layer = Arc::new(Layer::new(fs.clone(), true));
        let held = layer.write(KEY);
        let hold = exclusive_hold(&layer, held);
        let writer = {
            let (layer, det) = (layer.clone(), det.clone());
            thread::spawn(move || {
                let held = layer.write(KEY);
                let hold = exclusive_hold(&layer, held);
                work(&layer, &det, hold);
            })
        };
        let reader = {
            let (layer, det) = (layer.clone(), det.clone());
            thread::spawn(move || {
                let held = layer.read(KEY);
                let hold = shared_hold(&layer, held);
                work(&layer, &det, hold);
            })
        };
        work(&layer, &det, hold);
        writer.join().unwrap();
        reader.join().unwrap();
        another_process_locks(&fs, &det);
        assert_eq!(fs.files(), 0);
        det.no_failed_release();
    });
}
