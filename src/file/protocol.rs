//! The on-disk protocol of [`FileLocks`](crate::FileLocks), written once
//! against the small file-system trait [`Fs`], so that the real syscalls
//! (`sys.rs`) and the loom models' simulated file system
//! (`loom-tests/file_locks.rs`) run the same code.
//!
//! The protocol is the one of systemd's `src/basic/lock-util.c`, BSD
//! `flopen(3)` and arti's `fslock-guard`: a lock file may be deleted while
//! others wait on it, so a lock on a descriptor proves nothing until the
//! descriptor is shown to still be the file at the name.
//!
//! **Acquire**: open the name (creating it), lock the descriptor, then
//! compare the descriptor's (dev, inode) with the name's. If the name is
//! gone or names another inode, the holder we waited for deleted the file
//! on release: close (which drops the useless lock) and start over.
//!
//! **Release** (deleting mode): unlink the name *while still holding the
//! lock exclusively*, then unlock and close. Unlinking first is what makes
//! the re-check sound: a name is only ever removed by somebody holding its
//! inode exclusively, so a waiter that wins the lock on an inode and still
//! finds it at the name knows nobody can remove it under it. A shared holder
//! first tries a non-blocking exclusive lock (an upgrade): if another shared
//! holder remains the try fails and it only unlocks. `flock` upgrades are
//! not atomic (the kernel drops the shared lock, then tries the exclusive
//! one), so after a successful upgrade the name is re-checked before the
//! unlink: in the gap somebody may have taken, released and deleted the
//! file, and a new one may stand at the name.
//!
//! **Kept descriptors** (keeping mode): a released lock's descriptor may
//! stay open, unlocked, and be locked again later instead of opening the
//! name ([`acquire_reusing`]). Nothing changes for the re-check: it never
//! relied on the open being recent, so a file pruned or replaced since is
//! found stale and the name opened afresh.
//!
//! **Prune** (for the keeping mode, and for files left by crashed holders):
//! each lock file is locked exclusively without waiting (a held one is
//! skipped), re-checked, unlinked, unlocked.
//!
//! Every step that can fail returns the step's name with the error; the
//! front-end adds the key and the path. An error never leaves a lock held
//! (a descriptor is closed on every path out), and a failed unlink leaves a
//! file that the next locker's re-check accepts: the state stays correct,
//! the file only outlives its holder.

use std::fmt;
use std::io;

/// A file's identity: the device and inode numbers of `fstat`/`stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// How a lock is held: `flock`'s `LOCK_EX` or `LOCK_SH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One holder (`LOCK_EX`).
    Exclusive,
    /// Any number of holders (`LOCK_SH`).
    Shared,
}

/// Whether [`acquire`] waits for a held lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Block in the kernel until the lock is free.
    Block,
    /// Give up at once (`LOCK_NB`).
    Try,
}

/// The file-system operations the protocol needs, all relative to one
/// directory. `name` is always a name from the key mapping (no `/`).
///
/// A descriptor ([`Fs::Fd`]) closes on drop, and closing drops its lock, as
/// `close(2)` does for the last descriptor of an open file description.
pub trait Fs {
    /// An open descriptor of a lock file.
    type Fd;
    /// Opens `name`, creating it if missing (`O_CREAT | O_NOFOLLOW |
    /// O_CLOEXEC`); a symlink at `name` is an error.
    fn open_create(&self, name: &str) -> io::Result<Self::Fd>;
    /// Locks `fd` in `mode`: `Ok(true)` once held, `Ok(false)` if `block`
    /// is false and the lock is held elsewhere. Converting a held lock to
    /// the other mode is not atomic (as with `flock`).
    fn lock(&self, fd: &Self::Fd, mode: Mode, block: bool) -> io::Result<bool>;
    /// Unlocks `fd` (`LOCK_UN`).
    fn unlock(&self, fd: &Self::Fd) -> io::Result<()>;
    /// The identity of the open file (`fstat`).
    fn fstat(&self, fd: &Self::Fd) -> io::Result<FileId>;
    /// The identity of the file at `name`, or `None` if there is none
    /// (`fstatat` with `AT_SYMLINK_NOFOLLOW`).
    fn stat_at(&self, name: &str) -> io::Result<Option<FileId>>;
    /// Removes `name` (`unlinkat`).
    fn unlink_at(&self, name: &str) -> io::Result<()>;
    /// The names in the directory (for [`prune`]).
    fn list(&self) -> io::Result<Vec<String>>;
}

/// A failed step: which one, and the error.
#[derive(Debug)]
pub struct Failed {
    /// The step, e.g. `"open"`, `"lock"`, `"unlink"`.
    pub step: &'static str,
    /// What the system said.
    pub error: io::Error,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.step, self.error)
    }
}

fn at(step: &'static str) -> impl FnOnce(io::Error) -> Failed {
    move |error| Failed { step, error }
}

/// Whether `fd` is still the file at `name`.
fn is_at_name<F: Fs>(fs: &F, name: &str, fd: &F::Fd) -> Result<bool, Failed> {
    let ours = fs.fstat(fd).map_err(at("fstat"))?;
    let now = fs.stat_at(name).map_err(at("stat"))?;
    Ok(now == Some(ours))
}

/// Takes the lock file `name` in `mode`: `Ok(Some(fd))` with the lock held
/// on the file that is at `name`, or `Ok(None)` if `wait` is
/// [`Wait::Try`] and it is held elsewhere.
pub fn acquire<F: Fs>(fs: &F, name: &str, mode: Mode, wait: Wait) -> Result<Option<F::Fd>, Failed> {
    acquire_reusing(fs, name, mode, wait, &mut None)
}

/// [`acquire`], trying first a descriptor of `name` kept open from an
/// earlier hold (`reuse`, unlocked; see [`unlock_keeping`]) instead of
/// opening the name. A kept descriptor is only an early `open`: the file
/// may have been pruned or replaced since, which the re-check finds like
/// any other stale lock (then the name is opened afresh). If the lock is
/// held elsewhere and `wait` is [`Wait::Try`], the descriptor tried (kept
/// or fresh, not locked) is put back into `reuse` for the next try.
pub fn acquire_reusing<F: Fs>(
    fs: &F,
    name: &str,
    mode: Mode,
    wait: Wait,
    reuse: &mut Option<F::Fd>,
) -> Result<Option<F::Fd>, Failed> {
    loop {
        let fd = match reuse.take() {
            Some(fd) => fd,
            None => fs.open_create(name).map_err(at("open"))?,
        };
        if !fs
            .lock(&fd, mode, wait == Wait::Block)
            .map_err(at("lock"))?
        {
            *reuse = Some(fd);
            return Ok(None);
        }
        // The re-check: the holder we may have waited for deletes the file
        // before unlocking, so a lock won on a deleted (or replaced) inode
        // excludes nobody. Only a file still at `name` is ours.
        let verified = is_at_name(fs, name, &fd)?;
        if verified {
            return Ok(Some(fd));
        }
        drop(fd); // closes, dropping the stale lock; try the new file
    }
}

/// Releases `fd`, held in `mode` on `name`. With `delete`, the name is
/// unlinked first if this holder can have the file exclusively (see the
/// module docs); the lock is given up and `fd` closed whatever happens.
pub fn release<F: Fs>(
    fs: &F,
    name: &str,
    fd: F::Fd,
    mode: Mode,
    delete: bool,
) -> Result<(), Failed> {
    let mut result = Ok(());
    if delete {
        let exclusive = match mode {
            Mode::Exclusive => Ok(true),
            // The upgrade: fails while another shared holder remains. Not
            // atomic, hence the re-check of the name.
            Mode::Shared => match fs.lock(&fd, Mode::Exclusive, false) {
                Ok(true) => is_at_name(fs, name, &fd),
                Ok(false) => Ok(false),
                Err(error) => Err(Failed {
                    step: "upgrade",
                    error,
                }),
            },
        };
        result = match exclusive {
            // Unlink while holding the lock exclusively, before unlocking.
            Ok(true) => fs.unlink_at(name).map_err(at("unlink")),
            Ok(false) => Ok(()),
            Err(failed) => Err(failed),
        };
    }
    let unlocked = fs.unlock(&fd).map_err(at("unlock"));
    drop(fd);
    result.and(unlocked)
}

/// The keeping mode's release of a descriptor that stays open for the next
/// hold of the same name: unlocks `fd` and gives it back, unlocked. A
/// failed unlock closes it (which drops the lock) and is returned.
pub fn unlock_keeping<F: Fs>(fs: &F, fd: F::Fd) -> Result<F::Fd, Failed> {
    match fs.unlock(&fd) {
        Ok(()) => Ok(fd),
        Err(error) => {
            drop(fd);
            Err(Failed {
                step: "unlock",
                error,
            })
        }
    }
}

/// Removes the lock files in the directory that nobody holds: each one is
/// locked exclusively without waiting (held ones are skipped), re-checked,
/// unlinked and unlocked. Returns how many were removed. `is_lock_name`
/// picks the names to consider. A name that fails (a directory or a
/// symlink at a lock name, a file it may not open, an I/O error) does not
/// stop the others: the first failure is returned once every name was tried.
pub fn prune<F: Fs>(fs: &F, is_lock_name: impl Fn(&str) -> bool) -> Result<usize, Failed> {
    let mut removed = 0;
    let mut first_failure = None;
    for name in fs.list().map_err(at("list"))? {
        if !is_lock_name(&name) {
            continue;
        }
        match prune_one(fs, &name) {
            Ok(gone) => removed += usize::from(gone),
            Err(failed) => {
                first_failure.get_or_insert(Failed {
                    step: failed.step,
                    error: io::Error::new(failed.error.kind(), format!("{name}: {}", failed.error)),
                });
            }
        }
    }
    match first_failure {
        Some(failed) => Err(failed),
        None => Ok(removed),
    }
}

/// Removes `name` if nobody holds it; says whether it did.
fn prune_one<F: Fs>(fs: &F, name: &str) -> Result<bool, Failed> {
    let fd = fs.open_create(name).map_err(at("open"))?;
    let held = !fs.lock(&fd, Mode::Exclusive, false).map_err(at("lock"))?;
    if held {
        return Ok(false); // somebody holds it (or is about to): not ours to remove
    }
    // Re-check: between the listing and our lock the file may have been
    // deleted and re-created; remove only the file we hold.
    let mut result = Ok(false);
    if is_at_name(fs, name, &fd)? {
        result = fs.unlink_at(name).map_err(at("unlink")).map(|()| true);
    }
    let unlocked = fs.unlock(&fd).map_err(at("unlock"));
    drop(fd);
    let gone = result?;
    unlocked.map(|()| gone)
}
