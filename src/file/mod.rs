//! [`FileLocks`]: per-key locks across the processes of one machine, whose
//! lock files exist exactly while somebody holds or waits for them.
//!
//! - `protocol.rs`: the on-disk protocol (open, lock, re-check; unlink
//!   before unlock; the shared holder's upgrade; prune), generic over a
//!   small file-system trait so that loom runs it over a simulated one.
//! - `sys.rs`: that trait over the real syscalls.
//! - `layer.rs`: the in-process layer (queueing per key, the shared OS
//!   lock per key, the exclusive hand-over without syscalls), generic over
//!   the same trait.
//! - `idle.rs`: the keeping mode's descriptors kept open between holds.
//! - `name.rs`: the stable key → file name mapping.
//! - `timer.rs`: the one timer thread that wakes async waits between two
//!   tries of an OS lock.
//! - this file: the public front-end: directory checks, blocking, polling
//!   and async waits, errors with context.

mod idle;
pub mod layer;
mod name;
pub mod protocol;
mod sys;
mod timer;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::layer::{Hold, Layer, ReadKey, WriteKey};
use self::protocol::{Failed, Mode, Wait};
use self::timer::Sleep;

/// Per-key reader-writer locks shared by every process on the machine that
/// opens the same directory: the on-disk counterpart of
/// [`KeyedRwLocks`](crate::KeyedRwLocks).
///
/// Each key has a lock file in the directory, locked with `flock(2)`. In the
/// default (deleting) mode **a key's file exists exactly while somebody holds
/// or waits for it**: the last holder deletes it on release, without the
/// deletion race of simple lock-file schemes, so the directory does not fill
/// up with one file per key ever used. Within a process, callers first queue
/// on an in-process [`KeyedRwLocks`](crate::KeyedRwLocks) keyed by the same
/// key, so only one caller per process and key talks to the OS.
///
/// ```
/// # #[cfg(not(miri))] {
/// use toctou::FileLocks;
/// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-type", std::process::id()));
///
/// let locks = FileLocks::open(&dir)?;
/// {
///     let guard = locks.lock("invoice-42")?;
///     assert_eq!(guard.key(), "invoice-42");
///     assert!(locks.path_of("invoice-42").exists(), "the file exists while held");
///     assert!(locks.try_lock("invoice-42")?.is_none(), "held");
///     // ... read-modify-write the invoice: no other thread or process can ...
/// }
/// assert!(!locks.path_of("invoice-42").exists(), "and is gone after the release");
/// # std::fs::remove_dir(&dir)?;
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # When to use it
///
/// Use [`KeyedLocks`](crate::KeyedLocks) when everybody who must be
/// excluded lives in one process: it costs nanoseconds, `FileLocks` costs
/// system calls (tens of microseconds for a fresh key). Use `FileLocks` when
/// the parties are separate processes on one machine: workers, CLIs, cron
/// jobs, agents spawned as processes, or a Python program that takes the
/// same lock with `fcntl.flock`.
///
/// # Semantics
///
/// - **Modes**, named as std's `File` names them: [`lock`](Self::lock)
///   (exclusive) and [`lock_shared`](Self::lock_shared), each with `try_`,
///   `try_..._for` (timeout) and `..._async` forms. Any number of shared
///   holders, across processes, or one exclusive holder.
/// - **Hand-over within a process.** An exclusive holder that releases
///   while a thread of this process waits to lock the key exclusively next
///   (blocked first in its queue, or spinning for it a moment before it
///   queues) passes the OS lock on without a system call: no unlock, close,
///   open, lock or stat. The lock waits in the key's in-process entry for
///   that thread (which takes it even if its timeout passes meanwhile), or
///   for whichever thread of the process takes the key first; a shared
///   caller gives it up. Not to an async
///   waiter, which runs only when its executor polls it, nor to a shared
///   one, which could not use it: those releases go to the OS. The chain is
///   bounded so that other processes are not starved: the OS lock is not
///   handed over once this process has held it for 5 ms (nor after 50,000
///   hand-overs in a row); that release goes to the OS (unlock, and unlink
///   in the deleting mode), where other processes' waiters compete for it.
///   A shared caller that gets the key before the writer the lock was
///   handed to gives the lock up and takes a shared one.
/// - **Errors** are [`io::Error`]s that name the key, the path and the
///   failed step (open, lock, fstat, stat, unlink, ...), with the system's
///   error kind: a deleted directory, a read-only file system, `EMFILE`.
///   Nothing here panics on an I/O failure. An error never leaves a lock
///   held or a descriptor open.
/// - **Reentrancy is not detected**, as on [`KeyedLocks`](crate::KeyedLocks):
///   guards are `Send`, so a thread that took one may have moved it to a
///   thread that will release it. A thread that waits without a timeout for
///   a key it holds itself waits forever; `try_lock` and `try_lock_for`
///   answer `None` instead. A holder that panics releases its key during
///   unwinding; there is no poisoning.
/// - **Cancellation.** [`lock_async`](Self::lock_async) and
///   [`lock_shared_async`](Self::lock_shared_async) are runtime-agnostic
///   and cancel-safe: a dropped future leaves no descriptor, no file (in
///   deleting mode) and no in-process entry behind. While another *process*
///   holds the key they poll the OS lock without blocking, backing off from
///   0.2 ms to 10 ms between tries (one timer thread per process wakes the
///   sleeping tasks), since a blocking `flock` would block the executor.
/// - **Timeouts.** `try_lock_for` waits in the in-process queue, then tries
///   the OS lock with the same backoff, never past the deadline; `None` on
///   timeout, with nothing left behind.
/// - **Crashes.** A process that dies holding a key, even by `SIGKILL`,
///   releases it: the kernel drops a `flock` lock when the last descriptor
///   of its open file closes, and a blocked `lock` in another process wakes
///   at once. The dead holder's file stays until the next user of the key
///   (whose release deletes it) or [`prune`](Self::prune).
/// - **Fairness.** Within a process, the in-process queue's fairness.
///   Across processes, whatever the kernel gives `flock` waiters: no FIFO
///   promise. An exclusive holder hands the OS lock to a waiting thread of
///   its process without releasing it, for at most 5 ms in a row (see
///   *Hand-over within a process*); then the release goes to the OS, and
///   other processes' waiters compete for the lock. Shared holders of one
///   process share one descriptor, so a process whose
///   readers overlap without a gap keeps its shared lock, and another
///   process's exclusive waiter waits until they stop. An async or timed
///   waiter polls the OS lock with a backoff (up to 10 ms), so under steady
///   contention from blocking lockers in other processes it can keep losing
///   the lock to them.
/// - **Descriptors.** One per key held exclusively, one per key held shared
///   by any number of this process's callers, and one for the directory.
///   Waiters hold none; a lock being handed over keeps its one descriptor.
///   In the keeping mode, up to 64 descriptors of released keys also stay
///   open, unlocked, for their next acquisition
///   ([`FileLocksBuilder::idle_descriptors`]); the deleting mode keeps none.
///   Descriptors are `O_CLOEXEC`.
///
/// # What `flock` does not promise
///
/// - **Network file systems.** On NFS, `flock` is emulated with `fcntl`
///   byte-range locks (Linux since 2.6.12) or not supported; on some
///   CIFS/SMB mounts it is local to the client. Put the directory on a local
///   file system (`$XDG_RUNTIME_DIR`, `/run/lock`, `/tmp`).
/// - **Forked children.** A child made by `fork` (without `exec`) shares the
///   parent's open file descriptions and so its `flock` locks: the lock is
///   held until *both* close the descriptor, and either one's unlock
///   releases it for both. `O_CLOEXEC` only covers `exec`. Do not fork while
///   holding a guard, or have the child close its inherited descriptors.
/// - **Advisory only.** Programs that open the files without `flock` are not
///   excluded; the lock protects what every party agrees it protects.
/// - **Case-insensitive file systems.** On ext4 with casefolding, vfat or
///   CIFS, keys that differ only in ASCII case name one file. Between
///   processes that only over-excludes, but one thread that holds one of
///   them and locks the other blocks in the kernel instead of panicking.
///
/// # On-disk format
///
/// A key's file is `<dir>/<name>`, where the name is stable across
/// processes, versions and languages ([`path_of`](Self::path_of) computes
/// it):
///
/// - A **simple key**, 1 to 100 bytes of ASCII letters, digits, `-` and `_`,
///   is `<key>.lock`: key `invoice-42` is `invoice-42.lock`.
/// - **Any other key** (empty, with `.`, `/`, NUL, spaces, non-ASCII, or
///   longer than 100 bytes) is `~` followed by the key's UTF-8 bytes, each
///   simple byte as is and every other byte as `%XX` (upper-case hex), then
///   `.lock`: `""` is `~.lock`, `".."` is `~%2E%2E.lock`, `"a/b"` is
///   `~a%2Fb.lock`. Distinct keys get distinct names, no simple key's name
///   starts with `~`, and no name contains `/` or is `.` or `..`, so no key
///   names a file outside the directory.
/// - If that name's part before `.lock` would exceed 200 bytes, the name is
///   `~~` followed by the 64 lower-case hex digits of the SHA-256 of the
///   key's UTF-8 bytes, then `.lock`. Two keys whose hashes collided would
///   share one lock: that can only over-exclude, never let two holders in.
///
/// The files are empty, created with mode `0o600` (see
/// [`FileLocksBuilder::file_mode`]) and locked with `flock`. Other files in
/// the directory are left alone, also by [`prune`](Self::prune).
///
/// # From Python
///
/// For a simple key, `fcntl.flock` on `<dir>/<key>.lock` takes the same
/// lock, and excludes and is excluded by `FileLocks` in every process:
///
/// ```python
/// import fcntl, os
///
/// def locked(dir, key):          # key: a simple key
///     fd = os.open(os.path.join(dir, key + ".lock"), os.O_RDONLY | os.O_CREAT, 0o600)
///     fcntl.flock(fd, fcntl.LOCK_EX)
///     return fd                  # os.close(fd) releases it
/// ```
///
/// Such a locker does not follow the deletion protocol (it does not
/// re-check the file after locking), so share a directory with it in
/// keeping mode ([`FileLocksBuilder::keep_files`]), and do not
/// [`prune`](Self::prune) while it runs.
///
/// # Compared with
///
/// `fs4`, `fd-lock` and `fslock` lock one file you name and open; they
/// neither map keys to files nor delete them (deleting a lock file safely
/// is the caller's problem). `named-lock` maps a name to a file in the temp
/// directory and never deletes it. None of them queue threads of one process
/// in-process first, nor offer timeouts or async waits. `FileLocks` is one
/// lock per key, created on demand and deleted when unused.
///
/// Available on Linux (the crate's `libc` dependency is Linux-only).
pub struct FileLocks {
    layer: Layer<sys::Dir>,
    path: PathBuf,
    keep_files: bool,
}

/// Options for [`FileLocks`]: how strict the directory checks are and
/// whether lock files are deleted. Made by [`FileLocks::builder`].
///
/// ```
/// # #[cfg(not(miri))] {
/// use toctou::FileLocks;
/// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-builder", std::process::id()));
///
/// let locks = FileLocks::builder().keep_files(true).file_mode(0o660).open(&dir)?;
/// drop(locks.lock("job")?);
/// assert!(locks.path_of("job").exists(), "kept for naive lockers");
/// assert_eq!(locks.prune()?, 1);
/// # std::fs::remove_dir(&dir)?;
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct FileLocksBuilder {
    keep_files: bool,
    allow_other_owner: bool,
    allow_writable_by_others: bool,
    file_mode: u32,
    idle_descriptors: usize,
}

/// The default of [`FileLocksBuilder::idle_descriptors`].
const IDLE_DESCRIPTORS: usize = 64;

impl Default for FileLocksBuilder {
    fn default() -> Self {
        Self {
            keep_files: false,
            allow_other_owner: false,
            allow_writable_by_others: false,
            file_mode: 0o600,
            idle_descriptors: IDLE_DESCRIPTORS,
        }
    }
}

impl FileLocksBuilder {
    /// Keep lock files after release (default `false`: delete them). For
    /// sharing the directory with lockers that do not follow the deletion
    /// protocol, such as a plain `fcntl.flock` in Python. Unheld files can
    /// then be removed with [`FileLocks::prune`].
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// let builder = toctou::FileLocks::builder().keep_files(true);
    /// # drop(builder);
    /// # }
    /// ```
    #[must_use]
    pub fn keep_files(mut self, keep: bool) -> Self {
        self.keep_files = keep;
        self
    }

    /// Accept a directory owned by another user (default `false`), e.g. a
    /// group-shared directory. Anybody who can write the directory can
    /// then delete or plant files in it: trust its owner.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// let builder = toctou::FileLocks::builder().allow_other_owner(true);
    /// # drop(builder);
    /// # }
    /// ```
    #[must_use]
    pub fn allow_other_owner(mut self, allow: bool) -> Self {
        self.allow_other_owner = allow;
        self
    }

    /// Accept a directory that users other than its owner may write (group
    /// or world write permission without the sticky bit; default `false`).
    /// Such a user can delete a lock file that a holder holds, and the next
    /// locker then creates a new file and holds the key too: only accept it
    /// if every user who can write the directory is trusted to take the
    /// locks properly (a group-shared directory of cooperating services).
    /// A directory with the sticky bit (`chmod +t`, as `/tmp` has) is
    /// accepted without this: there, only a file's owner can delete it.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// let builder = toctou::FileLocks::builder().allow_writable_by_others(true);
    /// # drop(builder);
    /// # }
    /// ```
    #[must_use]
    pub fn allow_writable_by_others(mut self, allow: bool) -> Self {
        self.allow_writable_by_others = allow;
        self
    }

    /// The mode lock files are created with, before the umask (default
    /// `0o600`; `0o660` for a group-shared directory). Opening a file for
    /// `flock` needs only read permission.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// let builder = toctou::FileLocks::builder().file_mode(0o660);
    /// # drop(builder);
    /// # }
    /// ```
    #[must_use]
    pub fn file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode & 0o777;
        self
    }

    /// In the keeping mode, how many descriptors of released keys stay
    /// open, unlocked, so that locking such a key again skips the `open`
    /// and `close` (default 64; 0 keeps none). The oldest is closed first;
    /// [`FileLocks::prune`] closes them all, and so does running out of
    /// descriptors (`EMFILE`) while opening a lock file. Locking through a
    /// kept descriptor re-checks the name like any lock, so a file pruned
    /// or replaced meanwhile is simply opened afresh. The deleting mode
    /// keeps none: its released files are deleted.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-idle", std::process::id()));
    /// let locks = toctou::FileLocks::builder()
    ///     .keep_files(true)
    ///     .idle_descriptors(8)
    ///     .open(&dir)?;
    /// drop(locks.lock("job")?); // its descriptor stays open, unlocked
    /// drop(locks.lock("job")?); // locked again without opening the file
    /// # std::fs::remove_dir_all(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[must_use]
    pub fn idle_descriptors(mut self, max: usize) -> Self {
        self.idle_descriptors = max;
        self
    }

    /// Opens (creating it with mode `0o700` if missing, parents included)
    /// the lock directory `dir`.
    ///
    /// # Errors
    ///
    /// If `dir` is a symlink, not a directory, owned by another user
    /// (unless [`allow_other_owner`](Self::allow_other_owner)), or cannot be
    /// created or opened. The message names the path and the reason.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let base = std::env::temp_dir().join(format!("toctou-doc-{}-open", std::process::id()));
    /// # std::fs::create_dir_all(&base)?;
    /// let file = base.join("not-a-dir");
    /// std::fs::write(&file, b"")?;
    /// let err = toctou::FileLocks::builder().open(&file).unwrap_err();
    /// assert!(err.to_string().contains("not a directory"), "{err}");
    /// # std::fs::remove_dir_all(&base)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open(self, dir: impl AsRef<Path>) -> io::Result<FileLocks> {
        // Without trailing slashes: `lstat` and `O_NOFOLLOW` both follow a
        // symlink named as `link/`, which would slip past the checks below.
        let path: &Path = &dir.as_ref().components().collect::<PathBuf>();
        let refuse = |kind: io::ErrorKind, why: String| {
            io::Error::new(
                kind,
                format!(
                    "toctou::FileLocks: lock directory {}: {why}",
                    path.display()
                ),
            )
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refuse(
                    io::ErrorKind::InvalidInput,
                    "is a symlink (refused: it could be redirected)".into(),
                ));
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(refuse(
                    io::ErrorKind::NotADirectory,
                    "is not a directory".into(),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| refuse(e.kind(), format!("cannot be created: {e}")))?,
            Err(e) => return Err(refuse(e.kind(), format!("cannot be inspected: {e}"))),
        }
        // Open it without following a symlink: the checks above are advice,
        // these are the ones that hold (a swap after them fails here).
        let dir = sys::Dir::open(path, self.file_mode).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse(io::ErrorKind::InvalidInput, "is a symlink".into()),
            Some(libc::ENOTDIR) => {
                refuse(io::ErrorKind::NotADirectory, "is not a directory".into())
            }
            _ => refuse(e.kind(), format!("cannot be opened: {e}")),
        })?;
        let stat = dir
            .stat()
            .map_err(|e| refuse(e.kind(), format!("fstat failed: {e}")))?;
        if !stat.is_dir() {
            return Err(refuse(
                io::ErrorKind::NotADirectory,
                "is not a directory".into(),
            ));
        }
        let me = sys::euid();
        if !self.allow_other_owner && stat.uid() != me {
            return Err(refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "is owned by uid {}, not by this process's user (uid {me}); \
                     FileLocksBuilder::allow_other_owner accepts it",
                    stat.uid()
                ),
            ));
        }
        const STICKY: u32 = 0o1000;
        let permissions = stat.permissions();
        if !self.allow_writable_by_others && permissions & 0o022 != 0 && permissions & STICKY == 0 {
            return Err(refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "is writable by users other than its owner (mode {:o}), who could delete \
                     a held lock file; FileLocksBuilder::allow_writable_by_others accepts it",
                    permissions
                ),
            ));
        }
        Ok(FileLocks {
            layer: Layer::new(dir, !self.keep_files).keeping_idle(self.idle_descriptors),
            path: path.to_path_buf(),
            keep_files: self.keep_files,
        })
    }
}

/// How an acquisition waits for the OS lock.
#[derive(Clone, Copy)]
enum How {
    Block,
    Try,
    /// Poll without blocking until the deadline (`None`: never expires).
    Until(Option<Instant>),
}

/// The first and the longest pause between two tries of an OS lock that
/// another process holds (timed and async waits).
const BACKOFF_FIRST: Duration = Duration::from_micros(200);
const BACKOFF_MAX: Duration = Duration::from_millis(10);

impl FileLocks {
    /// Opens the lock directory `dir` with the default options: deleting
    /// mode, owner checked. Creates `dir` (mode `0o700`, parents included)
    /// if it is missing. Same as `FileLocks::builder().open(dir)`.
    ///
    /// # Errors
    ///
    /// If `dir` is a symlink, not a directory, owned by another user, or
    /// cannot be created or opened; see [`FileLocksBuilder::open`].
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-fopen", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// assert_eq!(locks.dir(), dir.as_path());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        FileLocksBuilder::default().open(dir)
    }

    /// A builder, to keep lock files or to accept another owner's directory.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-fbuilder", std::process::id()));
    /// let locks = toctou::FileLocks::builder().keep_files(true).open(&dir)?;
    /// # drop(locks); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn builder() -> FileLocksBuilder {
        FileLocksBuilder::default()
    }

    /// The lock directory, as given to [`open`](Self::open).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-dir", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// assert_eq!(locks.dir(), dir);
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The file `key` is locked through: `dir` joined with the key's name
    /// (see [On-disk format](Self#on-disk-format)). Always directly inside
    /// `dir`, whatever the key.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-path", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// assert_eq!(locks.path_of("job-7"), dir.join("job-7.lock"));
    /// assert_eq!(locks.path_of("../etc/passwd"), dir.join("~%2E%2E%2Fetc%2Fpasswd.lock"));
    /// assert_eq!(locks.path_of(""), dir.join("~.lock"));
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.path.join(name::file_name(key))
    }

    /// Whether lock files are kept after release
    /// ([`FileLocksBuilder::keep_files`]).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-keeps", std::process::id()));
    /// assert!(!toctou::FileLocks::open(&dir)?.keeps_files());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn keeps_files(&self) -> bool {
        self.keep_files
    }

    fn error(&self, key: &str, name: &str, failed: Failed) -> io::Error {
        const SHOWN: usize = 64;
        let shown = match key.char_indices().nth(SHOWN) {
            None => format!("{key:?}"),
            Some((cut, _)) => format!("{:?}... ({} bytes)", &key[..cut], key.len()),
        };
        io::Error::new(
            failed.error.kind(),
            format!(
                "toctou::FileLocks: {} of {} (key {shown}) failed: {}",
                failed.step,
                self.path.join(name).display(),
                failed.error
            ),
        )
    }

    /// The OS step, blocking or polling.
    fn os_acquire(
        &self,
        key: &str,
        name: &str,
        mode: Mode,
        how: How,
    ) -> io::Result<Option<OwnedFd>> {
        let once = |wait| {
            self.layer
                .os_acquire(name, mode, wait)
                .map_err(|f| self.error(key, name, f))
        };
        match how {
            How::Block => once(Wait::Block),
            How::Try => once(Wait::Try),
            How::Until(deadline) => {
                let mut pause = BACKOFF_FIRST;
                loop {
                    if let Some(fd) = once(Wait::Try)? {
                        return Ok(Some(fd));
                    }
                    let left = match deadline {
                        None => pause,
                        Some(at) => match at.checked_duration_since(Instant::now()) {
                            Some(left) if !left.is_zero() => left,
                            _ => return Ok(None),
                        },
                    };
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The OS step for an async caller: tries without blocking, and sleeps
    /// (without blocking the executor) between tries.
    async fn os_acquire_async(&self, key: &str, name: &str, mode: Mode) -> io::Result<OwnedFd> {
        let mut pause = BACKOFF_FIRST;
        loop {
            if let Some(fd) = self.os_acquire(key, name, mode, How::Try)? {
                return Ok(fd);
            }
            Sleep::new(pause).await;
            pause = (pause * 2).min(BACKOFF_MAX);
        }
    }

    fn guard<'a>(&'a self, hold: Hold<'a, sys::Dir>) -> FileGuard<'a> {
        FileGuard {
            locks: self,
            hold: Some(hold),
        }
    }

    /// The exclusive acquisition once the in-process key is held: the OS
    /// lock handed over by this process's last holder, or a new one taken
    /// as `how` says.
    fn exclusive<'a>(
        &'a self,
        key: &str,
        held: WriteKey<'a, sys::Dir>,
        how: How,
    ) -> io::Result<Option<FileGuard<'a>>> {
        let held = match self.layer.take_parked(held) {
            Ok(hold) => return Ok(Some(self.guard(hold))),
            Err(held) => held,
        };
        let name = name::file_name(key);
        let Some(fd) = self.os_acquire(key, &name, Mode::Exclusive, how)? else {
            return Ok(None);
        };
        Ok(Some(self.guard(self.layer.exclusive(held, name, fd))))
    }

    /// The first step of every shared acquisition once the in-process key
    /// is held for reading: releases an exclusive OS lock that this
    /// process's last holder handed over (a reader cannot use it), then
    /// joins the process's shared OS lock of the key if there is one.
    fn shared_first<'a>(
        &'a self,
        name: String,
        held: ReadKey<'a, sys::Dir>,
    ) -> Result<FileGuard<'a>, (String, ReadKey<'a, sys::Dir>)> {
        self.layer.release_parked(&held);
        match self.layer.join_existing(held, name) {
            Ok(hold) => Ok(self.guard(hold)),
            Err((held, name)) => Err((name, held)),
        }
    }

    /// The rest of a shared acquisition, with the key's gate held: joins a
    /// shared OS lock created meanwhile, or takes one as `how` says.
    fn shared_rest<'a>(
        &'a self,
        key: &str,
        name: String,
        held: ReadKey<'a, sys::Dir>,
        how: How,
    ) -> io::Result<Option<FileGuard<'a>>> {
        let (held, name) = match self.layer.join_existing(held, name) {
            Ok(hold) => return Ok(Some(self.guard(hold))),
            Err(rest) => rest,
        };
        let Some(fd) = self.os_acquire(key, &name, Mode::Shared, how)? else {
            return Ok(None);
        };
        Ok(Some(self.guard(self.layer.join_new(held, name, fd))))
    }

    /// Locks `key` exclusively, waiting as long as it takes: first for this
    /// process's other holders and waiters ahead (in-process queue), then
    /// for other processes (a blocking `flock`).
    ///
    /// # Errors
    ///
    /// An [`io::Error`] naming the key, the path and the failed step.
    ///
    /// A thread that waits for a key it holds itself waits forever (see
    /// *Reentrancy* above).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-lock", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let counter = dir.join("counter.txt");
    /// std::thread::scope(|s| {
    ///     for _ in 0..4 {
    ///         s.spawn(|| {
    ///             let _guard = locks.lock("counter").unwrap();
    ///             // Read-modify-write under the key: no lost update, also
    ///             // against other processes that use the same directory.
    ///             let n: u64 = std::fs::read_to_string(&counter)
    ///                 .map_or(0, |s| s.parse().unwrap());
    ///             std::fs::write(&counter, (n + 1).to_string()).unwrap();
    ///         });
    ///     }
    /// });
    /// assert_eq!(std::fs::read_to_string(&counter)?, "4");
    /// # std::fs::remove_dir_all(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lock(&self, key: &str) -> io::Result<FileGuard<'_>> {
        let held = self.layer.write(key);
        let guard = self.exclusive(key, held, How::Block)?;
        Ok(guard.expect("a blocking lock returns a descriptor"))
    }

    /// Locks `key` exclusively if nobody, in this process or another, holds
    /// it now; never waits.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock); a held key is `Ok(None)`, not an error.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-try", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let held = locks.try_lock("job")?.expect("free");
    /// assert!(locks.try_lock("job")?.is_none());
    /// drop(held);
    /// assert!(locks.try_lock("job")?.is_some());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_lock(&self, key: &str) -> io::Result<Option<FileGuard<'_>>> {
        let Some(held) = self.layer.try_write(key) else {
            return Ok(None);
        };
        self.exclusive(key, held, How::Try)
    }

    /// Locks `key` exclusively, waiting at most about `timeout` (in-process
    /// queue, then polling the OS lock with a backoff of up to 10 ms, never
    /// past the deadline). `Ok(None)` on timeout, leaving nothing behind.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// use std::time::Duration;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-tryfor", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let held = locks.lock("job")?;
    /// assert!(locks.try_lock_for("job", Duration::from_millis(10))?.is_none());
    /// drop(held);
    /// assert!(locks.try_lock_for("job", Duration::from_millis(10))?.is_some());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_lock_for(&self, key: &str, timeout: Duration) -> io::Result<Option<FileGuard<'_>>> {
        let deadline = Instant::now().checked_add(timeout);
        let Some(held) = self.layer.try_write_for(key, timeout) else {
            return Ok(None);
        };
        self.exclusive(key, held, How::Until(deadline))
    }

    /// Locks `key` exclusively without blocking the thread; runtime-agnostic.
    ///
    /// Cancel-safe: dropping the future before it resolves leaves no
    /// descriptor, file or in-process entry behind. While another process
    /// holds the key the future polls the OS lock (backoff 0.2 ms to 10 ms).
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-async", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let guard = block_on(locks.lock_async("job"))?;
    /// assert_eq!(guard.key(), "job");
    /// # drop(guard); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn lock_async(&self, key: &str) -> io::Result<FileGuard<'_>> {
        let held = self.layer.write_async(key).await;
        let held = match self.layer.take_parked(held) {
            Ok(hold) => return Ok(self.guard(hold)),
            Err(held) => held,
        };
        let name = name::file_name(key);
        let fd = self.os_acquire_async(key, &name, Mode::Exclusive).await?;
        Ok(self.guard(self.layer.exclusive(held, name, fd)))
    }

    /// Locks `key` shared, waiting as long as it takes. Any number of
    /// shared holders, in any processes, or one exclusive holder. This
    /// process's shared holders of a key share one descriptor and one OS
    /// lock.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-shared", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let a = locks.lock_shared("config")?;
    /// let b = locks.lock_shared("config")?;
    /// assert!(locks.try_lock("config")?.is_none(), "readers exclude a writer");
    /// drop((a, b));
    /// assert!(!locks.path_of("config").exists());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lock_shared(&self, key: &str) -> io::Result<FileGuard<'_>> {
        let held = self.layer.read(key);
        let (name, held) = match self.shared_first(name::file_name(key), held) {
            Ok(joined) => return Ok(joined),
            Err(rest) => rest,
        };
        let _gate = self.layer.gate().lock(key);
        let guard = self.shared_rest(key, name, held, How::Block)?;
        Ok(guard.expect("a blocking lock returns a descriptor"))
    }

    /// Locks `key` shared if that needs no waiting.
    ///
    /// Joining a shared lock that this process's other callers already hold
    /// always succeeds (unless an in-process writer waits: new readers queue
    /// behind it). `Ok(None)` also comes back in the moment another caller
    /// of this process is taking or giving up the process's shared OS lock of
    /// the key.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock); a key held exclusively is `Ok(None)`.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-tryshared", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let w = locks.lock("config")?;
    /// assert!(locks.try_lock_shared("config")?.is_none());
    /// drop(w);
    /// assert!(locks.try_lock_shared("config")?.is_some());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_lock_shared(&self, key: &str) -> io::Result<Option<FileGuard<'_>>> {
        let Some(held) = self.layer.try_read(key) else {
            return Ok(None);
        };
        // Joining a shared lock this process already holds needs no gate:
        // the count goes up under the layer's mutex, where the last
        // holder's decrement and removal happen too. Only creating one
        // takes the gate, which another caller holds while it creates or
        // releases the process's shared lock (then this try gives up).
        let (name, held) = match self.shared_first(name::file_name(key), held) {
            Ok(joined) => return Ok(Some(joined)),
            Err(rest) => rest,
        };
        let Some(_gate) = self.layer.gate().try_lock(key) else {
            return Ok(None);
        };
        self.shared_rest(key, name, held, How::Try)
    }

    /// Locks `key` shared, waiting at most about `timeout`; `Ok(None)` on
    /// timeout, leaving nothing behind.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// use std::time::Duration;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-sharedfor", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let w = locks.lock("config")?;
    /// assert!(locks.try_lock_shared_for("config", Duration::from_millis(5))?.is_none());
    /// # drop(w); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn try_lock_shared_for(
        &self,
        key: &str,
        timeout: Duration,
    ) -> io::Result<Option<FileGuard<'_>>> {
        let deadline = Instant::now().checked_add(timeout);
        let name = name::file_name(key);
        let Some(held) = self.layer.try_read_for(key, timeout) else {
            return Ok(None);
        };
        let (name, held) = match self.shared_first(name, held) {
            Ok(joined) => return Ok(Some(joined)),
            Err(rest) => rest,
        };
        let left = deadline.map_or(timeout, |at| at.saturating_duration_since(Instant::now()));
        let Some(_gate) = self.layer.gate().try_lock_for(key, left) else {
            return Ok(None);
        };
        self.shared_rest(key, name, held, How::Until(deadline))
    }

    /// Locks `key` shared without blocking the thread; runtime-agnostic and
    /// cancel-safe, as [`lock_async`](Self::lock_async).
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-sharedasync", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// let r = block_on(locks.lock_shared_async("config"))?;
    /// assert!(locks.try_lock_shared("config")?.is_some());
    /// # drop(r); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn lock_shared_async(&self, key: &str) -> io::Result<FileGuard<'_>> {
        let name = name::file_name(key);
        let held = self.layer.read_async(key).await;
        let (name, held) = match self.shared_first(name, held) {
            Ok(joined) => return Ok(joined),
            Err(rest) => rest,
        };
        let _gate = self.layer.gate().lock_async(key).await;
        let (held, name) = match self.layer.join_existing(held, name) {
            Ok(hold) => return Ok(self.guard(hold)),
            Err(rest) => rest,
        };
        let fd = self.os_acquire_async(key, &name, Mode::Shared).await?;
        Ok(self.guard(self.layer.join_new(held, name, fd)))
    }

    /// Locks `key` exclusively, as [`lock`](Self::lock), and returns a
    /// guard that owns an `Arc` of the map instead of borrowing it: it is
    /// `'static`, for a task spawned on a runtime or a thread of its own.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// use std::sync::Arc;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-owned", std::process::id()));
    /// let locks = Arc::new(toctou::FileLocks::open(&dir)?);
    /// let guard = locks.lock_owned("job")?;
    /// std::thread::spawn(move || {
    ///     assert_eq!(guard.key(), "job");
    ///     // ... work under the lock, released when the thread drops it ...
    /// })
    /// .join()
    /// .unwrap();
    /// assert!(locks.try_lock("job")?.is_some());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lock_owned(self: &Arc<Self>, key: &str) -> io::Result<OwnedFileGuard> {
        let guard = self.lock(key)?;
        Ok(self.own(guard))
    }

    /// The async form of [`lock_owned`](Self::lock_owned); runtime-agnostic
    /// and cancel-safe as [`lock_async`](Self::lock_async).
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// use std::sync::Arc;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedasync", std::process::id()));
    /// let locks = Arc::new(toctou::FileLocks::open(&dir)?);
    /// let guard = block_on(locks.lock_owned_async("job"))?;
    /// assert!(!guard.is_shared());
    /// # drop(guard); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn lock_owned_async(self: &Arc<Self>, key: &str) -> io::Result<OwnedFileGuard> {
        let guard = self.lock_async(key).await?;
        Ok(self.own(guard))
    }

    /// Locks `key` shared, as [`lock_shared`](Self::lock_shared), with a
    /// `'static` guard that owns an `Arc` of the map.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// use std::sync::Arc;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-sharedowned", std::process::id()));
    /// let locks = Arc::new(toctou::FileLocks::open(&dir)?);
    /// let readers: Vec<_> = (0..2).map(|_| locks.lock_shared_owned("config")).collect::<Result<_, _>>()?;
    /// assert!(locks.try_lock("config")?.is_none());
    /// drop(readers);
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lock_shared_owned(self: &Arc<Self>, key: &str) -> io::Result<OwnedFileGuard> {
        let guard = self.lock_shared(key)?;
        Ok(self.own(guard))
    }

    /// The async form of [`lock_shared_owned`](Self::lock_shared_owned);
    /// runtime-agnostic and cancel-safe.
    ///
    /// # Errors
    ///
    /// As [`lock`](Self::lock).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
    /// # }
    /// use std::sync::Arc;
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-sharedownedasync", std::process::id()));
    /// let locks = Arc::new(toctou::FileLocks::open(&dir)?);
    /// let guard = block_on(locks.lock_shared_owned_async("config"))?;
    /// assert!(guard.is_shared());
    /// # drop(guard); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub async fn lock_shared_owned_async(
        self: &Arc<Self>,
        key: &str,
    ) -> io::Result<OwnedFileGuard> {
        let guard = self.lock_shared_async(key).await?;
        Ok(self.own(guard))
    }

    /// Turns a guard of this map into one that owns an `Arc` of it.
    fn own(self: &Arc<Self>, guard: FileGuard<'_>) -> OwnedFileGuard {
        // SAFETY: `guard` borrows `**self`, the `FileLocks` inside the `Arc`,
        // which stays at its address for as long as any clone of the `Arc`
        // lives. The owned guard keeps a clone, declared after the guard so
        // that the guard is dropped first, and it never hands out the
        // `'static` guard or a reference with its lifetime: every borrow of
        // it is bounded by a borrow of the owned guard.
        let guard = unsafe { std::mem::transmute::<FileGuard<'_>, FileGuard<'static>>(guard) };
        OwnedFileGuard {
            guard,
            locks: Arc::clone(self),
        }
    }

    /// Removes the lock files in the directory that nobody holds, and
    /// returns how many it removed: files kept in keeping mode, and files
    /// left by holders that crashed. Each file is locked exclusively without
    /// waiting (a held one is skipped), re-checked, unlinked, unlocked, so a
    /// concurrent locker that follows the protocol is never harmed. This
    /// process's descriptors kept open between holds
    /// ([`FileLocksBuilder::idle_descriptors`]) are closed first.
    ///
    /// Only names the key mapping produces are considered (exactly: other
    /// files, even ones ending in `.lock`, are left alone). A naive locker
    /// (one that does not re-check the file after locking, like a plain
    /// `fcntl.flock`) can be harmed: do not prune while one runs.
    ///
    /// # Errors
    ///
    /// A name that fails (a directory at a lock name, a file it may not
    /// open, an I/O error) does not stop the others: once every name was
    /// tried, the first failure is returned, with the directory, the name
    /// and the step.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-prune", std::process::id()));
    /// let locks = toctou::FileLocks::builder().keep_files(true).open(&dir)?;
    /// drop(locks.lock("a")?);
    /// let held = locks.lock("b")?;
    /// assert_eq!(locks.prune()?, 1, "a is removed, b is held");
    /// assert!(!locks.path_of("a").exists() && locks.path_of("b").exists());
    /// # drop(held); locks.prune()?; std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn prune(&self) -> io::Result<usize> {
        self.layer.close_idle();
        protocol::prune(self.layer.fs(), name::is_lock_name).map_err(|f| {
            io::Error::new(
                f.error.kind(),
                format!(
                    "toctou::FileLocks: prune of {}: {} failed: {}",
                    self.path.display(),
                    f.step,
                    f.error
                ),
            )
        })
    }
}

impl fmt::Debug for FileLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLocks")
            .field("dir", &self.path)
            .field("keep_files", &self.keep_files)
            .field("idle_descriptors", &self.layer.idle_len())
            .finish_non_exhaustive()
    }
}

/// A key of a [`FileLocks`], held exclusively or shared; released on drop
/// (in deleting mode, the last holder's release deletes the lock file).
///
/// `Send`: it may be dropped on another thread. Dropping cannot report an
/// error; [`unlock`](Self::unlock) releases and reports one. A release that
/// fails to delete the file still releases the lock, and leaves a file that
/// the next locker of the key accepts and deletes.
///
/// ```
/// # #[cfg(not(miri))] {
/// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-guard", std::process::id()));
/// let locks = toctou::FileLocks::open(&dir)?;
/// let guard = locks.lock("job")?;
/// assert_eq!(guard.key(), "job");
/// assert!(!guard.is_shared());
/// guard.unlock()?;
/// # std::fs::remove_dir(&dir)?;
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct FileGuard<'a> {
    locks: &'a FileLocks,
    /// `None` once released.
    hold: Option<Hold<'a, sys::Dir>>,
}

impl FileGuard<'_> {
    /// The locked key.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-key", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// assert_eq!(locks.lock_shared("k")?.key(), "k");
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn key(&self) -> &str {
        // Released only by `unlock(self)` and `drop`: never seen empty.
        self.hold.as_ref().map_or("", Hold::key)
    }

    /// Whether the key is held shared (not exclusively).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-isshared", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// assert!(locks.lock_shared("k")?.is_shared());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_shared(&self) -> bool {
        self.hold.as_ref().is_some_and(Hold::is_shared)
    }

    /// Releases the key now and reports a failure to delete or unlock the
    /// file (which dropping the guard ignores). The key is released either
    /// way.
    ///
    /// # Errors
    ///
    /// The failed step, with the key and the path.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-unlock", std::process::id()));
    /// let locks = toctou::FileLocks::open(&dir)?;
    /// locks.lock("job")?.unlock()?;
    /// assert!(!locks.path_of("job").exists());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn unlock(mut self) -> io::Result<()> {
        self.release()
    }

    /// The key's lock file (for `Debug`).
    fn path(&self) -> PathBuf {
        self.locks
            .path
            .join(self.hold.as_ref().map_or("", Hold::name))
    }

    /// Releases the key (idempotent): hands the OS lock over to a waiter
    /// of this process, or gives it up.
    fn release(&mut self) -> io::Result<()> {
        let Some(hold) = self.hold.take() else {
            return Ok(());
        };
        self.locks
            .layer
            .release(hold)
            .map_err(|(key, name, failed)| self.locks.error(&key, &name, failed))
    }
}

impl Drop for FileGuard<'_> {
    fn drop(&mut self) {
        // A failure leaves a correct state (see the type's docs); `unlock`
        // reports it.
        let _ = self.release();
    }
}

impl fmt::Debug for FileGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileGuard")
            .field("key", &self.key())
            .field("shared", &self.is_shared())
            .field("path", &self.path())
            .finish()
    }
}

/// A `'static` guard of a [`FileLocks`] key, from
/// [`lock_owned`](FileLocks::lock_owned) and the other `_owned` forms: a
/// [`FileGuard`] that owns an `Arc` of the map instead of borrowing it, as
/// `KeyedLocks`' [`OwnedKeyGuard`](crate::OwnedKeyGuard) does. Released on
/// drop; [`unlock`](Self::unlock) reports a failure.
///
/// ```
/// # #[cfg(not(miri))] {
/// use std::sync::Arc;
/// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedguard", std::process::id()));
/// let locks = Arc::new(toctou::FileLocks::open(&dir)?);
/// let guard: toctou::OwnedFileGuard = locks.lock_owned("job")?;
/// assert!(Arc::ptr_eq(guard.locks(), &locks));
/// guard.unlock()?;
/// # std::fs::remove_dir(&dir)?;
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "the key is released as soon as the guard is dropped"]
pub struct OwnedFileGuard {
    /// Borrows `*locks`: declared first, so dropped first.
    guard: FileGuard<'static>,
    locks: Arc<FileLocks>,
}

impl OwnedFileGuard {
    /// The locked key.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedkey", std::process::id()));
    /// let locks = std::sync::Arc::new(toctou::FileLocks::open(&dir)?);
    /// assert_eq!(locks.lock_owned("k")?.key(), "k");
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn key(&self) -> &str {
        self.guard.key()
    }

    /// Whether the key is held shared (not exclusively).
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedshared", std::process::id()));
    /// let locks = std::sync::Arc::new(toctou::FileLocks::open(&dir)?);
    /// assert!(locks.lock_shared_owned("k")?.is_shared());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_shared(&self) -> bool {
        self.guard.is_shared()
    }

    /// The map the key belongs to.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedlocks", std::process::id()));
    /// let locks = std::sync::Arc::new(toctou::FileLocks::open(&dir)?);
    /// let guard = locks.lock_owned("k")?;
    /// assert_eq!(guard.locks().dir(), dir.as_path());
    /// # drop(guard); std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn locks(&self) -> &Arc<FileLocks> {
        &self.locks
    }

    /// Releases the key now and reports a failure, as
    /// [`FileGuard::unlock`].
    ///
    /// # Errors
    ///
    /// The failed step, with the key and the path.
    ///
    /// ```
    /// # #[cfg(not(miri))] {
    /// # let dir = std::env::temp_dir().join(format!("toctou-doc-{}-ownedunlock", std::process::id()));
    /// let locks = std::sync::Arc::new(toctou::FileLocks::open(&dir)?);
    /// locks.lock_owned("k")?.unlock()?;
    /// assert!(!locks.path_of("k").exists());
    /// # std::fs::remove_dir(&dir)?;
    /// # }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn unlock(self) -> io::Result<()> {
        let Self { guard, locks } = self;
        let released = guard.unlock();
        drop(locks);
        released
    }
}

impl fmt::Debug for OwnedFileGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedFileGuard")
            .field("key", &self.key())
            .field("shared", &self.is_shared())
            .field("path", &self.guard.path())
            .finish()
    }
}
