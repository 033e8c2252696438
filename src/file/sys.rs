//! The real [`Fs`]: syscalls through `libc`, every one relative to the lock
//! directory's descriptor (`openat`, `fstatat`, `unlinkat`).
//!
//! Locks are `flock(2)` (`LOCK_EX`, `LOCK_SH`, `LOCK_NB`, `LOCK_UN`), not
//! `fcntl` record locks, which a process loses when it closes *any*
//! descriptor of the file. std's `File::lock`, `lock_shared` and `try_lock`
//! are `flock` too, but they are stable only since Rust 1.89 and the crate's
//! MSRV is 1.85, so we call `libc::flock` directly.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::protocol::{FileId, Fs, Mode};

/// Repeats `f` while it fails with `EINTR`.
fn retry<T: PartialEq + Copy>(failed: T, mut f: impl FnMut() -> T) -> io::Result<T> {
    loop {
        let r = f();
        if r != failed {
            return Ok(r);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// The result of a successful `fstat`/`fstatat`.
pub(crate) struct Stat(libc::stat);

impl Stat {
    pub(crate) fn id(&self) -> FileId {
        FileId {
            dev: self.0.st_dev,
            ino: self.0.st_ino,
        }
    }
    pub(crate) fn is_dir(&self) -> bool {
        self.0.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub(crate) fn is_file(&self) -> bool {
        self.0.st_mode & libc::S_IFMT == libc::S_IFREG
    }
    pub(crate) fn uid(&self) -> u32 {
        self.0.st_uid
    }
    /// The permission bits, with the sticky bit (`0o7777` of `st_mode`).
    pub(crate) fn permissions(&self) -> u32 {
        self.0.st_mode & 0o7777
    }
}

/// `fstat(fd)`.
pub(crate) fn fstat(fd: &OwnedFd) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is an open descriptor (an `OwnedFd`), and `st` points to
    // writable memory of the size of a `stat`.
    retry(-1, || unsafe {
        libc::fstat(fd.as_raw_fd(), st.as_mut_ptr())
    })?;
    // SAFETY: `fstat` returned 0, so it filled in `st`.
    Ok(Stat(unsafe { st.assume_init() }))
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The lock directory, held open: every operation is relative to it, so a
/// rename or a symlink swap of its path later cannot redirect us.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    mode: libc::mode_t,
}

impl Dir {
    /// Opens the directory at `path` (`O_DIRECTORY | O_NOFOLLOW |
    /// O_CLOEXEC`): a symlink fails with `ELOOP`, a non-directory with
    /// `ENOTDIR`. Lock files are created with `mode` (before the umask).
    pub(crate) fn open(path: &Path, mode: u32) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"))?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is a NUL-terminated string that lives across the call.
        let raw = retry(-1, || unsafe { libc::open(c.as_ptr(), flags) })?;
        // SAFETY: `open` succeeded, so `raw` is a fresh descriptor that
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            mode: mode as libc::mode_t,
        })
    }

    /// `fstat` of the directory itself.
    pub(crate) fn stat(&self) -> io::Result<Stat> {
        fstat(&self.fd)
    }
}

impl Fs for Dir {
    type Fd = OwnedFd;

    fn open_create(&self, name: &str) -> io::Result<OwnedFd> {
        let c = c_name(name)?;
        // O_NONBLOCK: opening a FIFO planted at the name must not hang (it is
        // then refused by `fstat` below); it does not affect `flock`.
        let flags = libc::O_RDONLY
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | libc::O_NOCTTY
            | libc::O_NONBLOCK;
        // SAFETY: the directory descriptor is open for `self`'s lifetime and
        // `c` is NUL-terminated; `openat` with `O_CREAT` reads the mode
        // argument, which we pass.
        let raw = retry(-1, || unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                libc::c_uint::from(self.mode),
            )
        })?;
        // SAFETY: `openat` succeeded: `raw` is a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn lock(&self, fd: &OwnedFd, mode: Mode, block: bool) -> io::Result<bool> {
        let mut op = match mode {
            Mode::Exclusive => libc::LOCK_EX,
            Mode::Shared => libc::LOCK_SH,
        };
        if !block {
            op |= libc::LOCK_NB;
        }
        // SAFETY: `fd` is an open descriptor; `flock` touches no memory.
        match retry(-1, || unsafe { libc::flock(fd.as_raw_fd(), op) }) {
            Ok(_) => Ok(true),
            Err(e) if !block && e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn unlock(&self, fd: &OwnedFd) -> io::Result<()> {
        // SAFETY: `fd` is an open descriptor; `flock` touches no memory.
        retry(-1, || unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_UN) })?;
        Ok(())
    }

    fn fstat(&self, fd: &OwnedFd) -> io::Result<FileId> {
        let st = fstat(fd)?;
        if !st.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        Ok(st.id())
    }

    fn stat_at(&self, name: &str) -> io::Result<Option<FileId>> {
        let c = c_name(name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: the directory descriptor is open, `c` is NUL-terminated
        // and `st` is writable memory of the size of a `stat`.
        let r = retry(-1, || unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        });
        match r {
            // SAFETY: `fstatat` returned 0, so it filled in `st`.
            Ok(_) => Ok(Some(Stat(unsafe { st.assume_init() }).id())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn unlink_at(&self, name: &str) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: the directory descriptor is open and `c` is NUL-terminated.
        retry(-1, || unsafe {
            libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0)
        })?;
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        // A separate open file description (not `dup`, which would share the
        // directory offset with our descriptor): `openat(dirfd, ".")`.
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: the directory descriptor is open and "." is a
        // NUL-terminated literal.
        let raw = retry(-1, || unsafe {
            libc::openat(self.fd.as_raw_fd(), c".".as_ptr(), flags)
        })?;
        // SAFETY: `raw` is a fresh directory descriptor; `fdopendir` takes it
        // over (closed by `closedir`).
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: `fdopendir` failed, so `raw` is still ours to close.
            drop(unsafe { OwnedFd::from_raw_fd(raw) });
            return Err(err);
        }
        let mut names = Vec::new();
        let result = loop {
            // SAFETY: `errno` is thread-local; resetting it tells the end of
            // the stream from an error (`readdir` returns null for both).
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dir` is a valid, open directory stream.
            let entry = unsafe { libc::readdir(dir) };
            if entry.is_null() {
                let err = io::Error::last_os_error();
                break if err.raw_os_error() == Some(0) {
                    Ok(())
                } else {
                    Err(err)
                };
            }
            // SAFETY: `readdir` returned a valid entry, whose `d_name` is a
            // NUL-terminated string valid until the next `readdir` call; we
            // copy it out before that.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
            if let Some(name) = OsStr::from_bytes(name.to_bytes()).to_str() {
                names.push(name.to_owned());
            }
        };
        // SAFETY: `dir` is a valid stream, closed exactly once here.
        unsafe { libc::closedir(dir) };
        result.map(|()| names)
    }
}
