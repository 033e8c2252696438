//! Criterion benchmarks for `FileLocks` (issue 15), side by side with the
//! raw-syscall floors and the `fs4` and `named-lock` anchors, so that ratios
//! come from one run. Linux only: on other targets this compiles to an empty
//! `main`.
//!
//! Every row works in one temporary directory under `std::env::temp_dir()`
//! (removed at the end). The floors call `libc` directly, relative to a
//! directory descriptor (`openat`, `fstatat`, `unlinkat`), as `FileLocks`
//! does.
//!
//! Groups (one per scenario; the first row named is the one the report's
//! ratios put over the others):
//! - `file_locks_fresh_key`: `FileLocks::lock` + drop of an uncontended key
//!   in the default deletion mode. The same key every iteration: each lock
//!   creates its file and each release deletes it, so the key is fresh every
//!   time, and the floor does the same to one name (a new key per iteration
//!   would only add formatting a name and a cold dentry to our side).
//!   Floor: `openat(O_CREAT)` + `flock(LOCK_EX)` + `fstat` + `fstatat` +
//!   `unlinkat` + `close` of that name. Target: at most 1.3x the floor.
//!   A `syscalls of ours` row adds the `flock(LOCK_UN)` our release makes
//!   before closing, so the rest of the gap is the in-process layer.
//! - `file_locks_existing_key`: `FileLocks::lock` + drop of an uncontended
//!   key in keep mode (the file exists). Floors: `openat` + `flock` + `close`
//!   of the existing file, and `flock(LOCK_EX)` + `flock(LOCK_UN)` on an
//!   already-open descriptor; anchors: `fs4`'s `lock_exclusive` + `unlock`
//!   on an open file, `named-lock`'s `lock` + drop on a held handle (its file
//!   stays open), and `NamedLock::with_path` + `lock` + drop (opens the file
//!   each time). Target: at most 1.2x the open+lock+close floor. Ours
//!   locks the descriptor it kept open from the previous hold (the default,
//!   `idle_descriptors(64)`); a second row keeps none (`idle_descriptors(0)`)
//!   and opens the file each time. Two `syscalls of ours` rows make keep
//!   mode's syscalls in both cases (it re-checks the name with `fstat` +
//!   `fstatat`, and unlocks rather than only closing).
//! - `file_locks_hot_key_2_threads`: 2 threads of one process lock and
//!   release one key until the first of them has done so `HOT_OPS` times;
//!   the time, scaled to `2 * HOT_OPS` acquisitions (divide by that for the
//!   time per acquisition). So every acquisition timed is contended: with a
//!   fixed share per thread, the thread that lost more races would finish
//!   its share alone, uncontended. Ours in both
//!   modes, beside `named-lock` (a `parking_lot` mutex in front of one
//!   `flock`ed descriptor). Target: ours at least 10x faster per acquisition
//!   than `named-lock`.
//! - `file_locks_cross_process`: hand-over latency between 2 processes
//!   ping-ponging one key. The bench binary re-executes itself as the second
//!   process (`FL_BENCH_ROLE`). Each hand-over: the waiter writes one byte
//!   into a pipe ("I am about to wait") and calls `lock`; the holder reads
//!   it and releases; the new holder writes "I have it", and only then does
//!   the old one announce itself and wait (so the key really alternates).
//!   One iteration is two hand-overs (to the child and back), so half of it
//!   is the hand-over latency, including two pipe messages. The floor is the
//!   same ping-pong with `flock` on descriptors each process keeps open. The
//!   waiter may not be blocked in the kernel yet when the holder releases;
//!   then it takes the lock uncontended, which is still a hand-over.
//!
//! Run: `cargo bench -p toctou-benches --bench file_locks`.

#[cfg(not(target_os = "linux"))]
fn main() {}

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(target_os = "linux")]
mod common;

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::CString;
    use std::fs::File;
    use std::hint::black_box;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::{Duration, Instant};

    use criterion::{Criterion, Throughput};
    use fs4::fs_std::FileExt;
    use named_lock::NamedLock;
    use toctou::FileLocks;

    use crate::common;

    /// Acquisitions per thread per iteration in the hot-key group: enough
    /// that the first acquisition's file creation and the last release's
    /// deletion (100-200 µs together) are a small part of an iteration,
    /// as they are of a hot key's life. A release that finds nobody of its
    /// process waiting goes to the OS (create+lock+check+unlink, 5-40 µs),
    /// one with a waiter hands the lock over without syscalls.
    const HOT_OPS: u64 = 5000;
    /// The environment variables of the child process.
    const ROLE: &str = "FL_BENCH_ROLE";
    const DIR: &str = "FL_BENCH_DIR";
    /// The key every group uses (a simple key: its file is `bench.lock`).
    const KEY: &str = "bench";
    /// The file the floors and anchors use, in their own subdirectory.
    const RAW_NAME: &str = "raw.lock";

    /// Panics with the OS error if `r` is -1.
    fn check(r: libc::c_int, what: &str) -> libc::c_int {
        assert!(r != -1, "{what}: {}", io::Error::last_os_error());
        r
    }

    /// A directory held open, for the `*at` floors.
    struct RawDir(OwnedFd);

    impl RawDir {
        fn open(path: &Path) -> Self {
            Self(File::open(path).unwrap().into())
        }

        fn openat(&self, name: &std::ffi::CStr, flags: libc::c_int) -> OwnedFd {
            let flags = flags | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
            // SAFETY: the directory descriptor is open and `name` is
            // NUL-terminated; with O_CREAT the mode argument is passed.
            let raw = unsafe { libc::openat(self.0.as_raw_fd(), name.as_ptr(), flags, 0o600) };
            check(raw, "openat");
            // SAFETY: `openat` succeeded: `raw` is a fresh descriptor we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        }
    }

    fn flock(fd: &OwnedFd, op: libc::c_int) {
        // SAFETY: `fd` is open; `flock` touches no memory.
        check(unsafe { libc::flock(fd.as_raw_fd(), op) }, "flock");
    }

    fn fstat(fd: &OwnedFd) -> libc::stat {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is open and `st` is writable memory of a `stat`'s size.
        check(
            unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) },
            "fstat",
        );
        // SAFETY: `fstat` succeeded, so it filled in `st`.
        unsafe { st.assume_init() }
    }

    fn fstatat(dir: &RawDir, name: &std::ffi::CStr) -> libc::stat {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: the directory descriptor is open, `name` is NUL-terminated
        // and `st` is writable memory of a `stat`'s size.
        check(
            unsafe {
                libc::fstatat(
                    dir.0.as_raw_fd(),
                    name.as_ptr(),
                    st.as_mut_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            },
            "fstatat",
        );
        // SAFETY: `fstatat` succeeded, so it filled in `st`.
        unsafe { st.assume_init() }
    }

    fn unlinkat(dir: &RawDir, name: &std::ffi::CStr) {
        // SAFETY: the directory descriptor is open and `name` is
        // NUL-terminated.
        check(
            unsafe { libc::unlinkat(dir.0.as_raw_fd(), name.as_ptr(), 0) },
            "unlinkat",
        );
    }

    type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

    /// The temporary directory and the subdirectories the groups use.
    struct Dirs {
        root: PathBuf,
        deleting: PathBuf,
        keeping: PathBuf,
        raw: PathBuf,
    }

    impl Dirs {
        fn new() -> Self {
            let root = std::env::temp_dir().join(format!("toctou-bench-fl-{}", std::process::id()));
            let dirs = Self {
                deleting: root.join("deleting"),
                keeping: root.join("keeping"),
                raw: root.join("raw"),
                root,
            };
            std::fs::create_dir_all(&dirs.raw).unwrap();
            dirs
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn fresh_key(c: &mut Criterion, dirs: &Dirs) {
        let locks = FileLocks::open(&dirs.deleting).unwrap();
        let raw = RawDir::open(&dirs.raw);
        let name = CString::new("fresh.lock").unwrap();
        let mut g = c.benchmark_group("file_locks_fresh_key");
        g.throughput(Throughput::Elements(1));
        g.bench_function("toctou::FileLocks::lock (deleting)", |b| {
            b.iter(|| drop(locks.lock(black_box(KEY)).unwrap()))
        });
        g.bench_function("floor: create+flock+fstat+stat+unlink+close", |b| {
            b.iter(|| {
                let fd = raw.openat(&name, libc::O_CREAT);
                flock(&fd, libc::LOCK_EX);
                let ours = fstat(&fd);
                let now = fstatat(&raw, &name);
                black_box((ours.st_ino == now.st_ino, ours.st_dev == now.st_dev));
                unlinkat(&raw, &name);
                drop(fd);
            })
        });
        // Not the target's floor: the syscalls our release makes, which
        // unlocks before closing (the close would release it anyway).
        g.bench_function(
            "syscalls of ours: create+flock+fstat+stat+unlink+unlock+close",
            |b| {
                b.iter(|| {
                    let fd = raw.openat(&name, libc::O_CREAT);
                    flock(&fd, libc::LOCK_EX);
                    let ours = fstat(&fd);
                    let now = fstatat(&raw, &name);
                    black_box((ours.st_ino == now.st_ino, ours.st_dev == now.st_dev));
                    unlinkat(&raw, &name);
                    flock(&fd, libc::LOCK_UN);
                    drop(fd);
                })
            },
        );
        g.finish();
        assert!(!locks.path_of(KEY).exists(), "deletion mode left the file");
    }

    fn existing_key(c: &mut Criterion, dirs: &Dirs) {
        let locks = FileLocks::builder()
            .keep_files(true)
            .open(&dirs.keeping)
            .unwrap();
        drop(locks.lock(KEY).unwrap()); // the file exists from now on
        let no_idle = FileLocks::builder()
            .keep_files(true)
            .idle_descriptors(0)
            .open(&dirs.keeping)
            .unwrap();
        let raw = RawDir::open(&dirs.raw);
        let name = CString::new(RAW_NAME).unwrap();
        drop(raw.openat(&name, libc::O_CREAT));
        let path = dirs.raw.join(RAW_NAME);
        let open_fd = raw.openat(&name, 0);
        let open_file = File::open(&path).unwrap();
        let named = NamedLock::with_path(&path).unwrap();

        let mut g = c.benchmark_group("file_locks_existing_key");
        g.throughput(Throughput::Elements(1));
        g.bench_function("toctou::FileLocks::lock (keep_files)", |b| {
            b.iter(|| drop(locks.lock(black_box(KEY)).unwrap()))
        });
        g.bench_function(
            "toctou::FileLocks::lock (keep_files, idle_descriptors(0))",
            |b| b.iter(|| drop(no_idle.lock(black_box(KEY)).unwrap())),
        );
        g.bench_function("floor: open+flock+close", |b| {
            b.iter(|| {
                let fd = raw.openat(black_box(&name), 0);
                flock(&fd, libc::LOCK_EX);
                drop(fd);
            })
        });
        // Not the target's floor: the syscalls of our keep mode, which
        // re-checks the name after locking (`prune` may delete files):
        // through a kept descriptor (the default), and without one.
        g.bench_function(
            "syscalls of ours: flock+fstat+stat+unlock on a kept fd",
            |b| {
                b.iter(|| {
                    flock(black_box(&open_fd), libc::LOCK_EX);
                    let ours = fstat(&open_fd);
                    let now = fstatat(&raw, &name);
                    black_box((ours.st_ino == now.st_ino, ours.st_dev == now.st_dev));
                    flock(&open_fd, libc::LOCK_UN);
                })
            },
        );
        g.bench_function(
            "syscalls of ours without a kept fd: open+flock+fstat+stat+unlock+close",
            |b| {
                b.iter(|| {
                    let fd = raw.openat(black_box(&name), 0);
                    flock(&fd, libc::LOCK_EX);
                    let ours = fstat(&fd);
                    let now = fstatat(&raw, &name);
                    black_box((ours.st_ino == now.st_ino, ours.st_dev == now.st_dev));
                    flock(&fd, libc::LOCK_UN);
                    drop(fd);
                })
            },
        );
        g.bench_function("floor: flock(LOCK_EX)+flock(LOCK_UN) on an open fd", |b| {
            b.iter(|| {
                flock(black_box(&open_fd), libc::LOCK_EX);
                flock(&open_fd, libc::LOCK_UN);
            })
        });
        g.bench_function("fs4::FileExt::lock_exclusive+unlock (open file)", |b| {
            b.iter(|| {
                FileExt::lock_exclusive(black_box(&open_file)).unwrap();
                FileExt::unlock(&open_file).unwrap();
            })
        });
        g.bench_function("named_lock::NamedLock::lock (handle held)", |b| {
            b.iter(|| drop(black_box(&named).lock().unwrap()))
        });
        drop(named); // the next row must open the file each time
        g.bench_function("named_lock::NamedLock::with_path+lock", |b| {
            b.iter(|| {
                let named = NamedLock::with_path(black_box(&path)).unwrap();
                drop(named.lock().unwrap());
            })
        });
        g.finish();
        locks.prune().unwrap();
    }

    fn hot_key(c: &mut Criterion, dirs: &Dirs) {
        let deleting = FileLocks::open(&dirs.deleting).unwrap();
        let keeping = FileLocks::builder()
            .keep_files(true)
            .open(&dirs.keeping)
            .unwrap();
        let named = NamedLock::with_path(dirs.raw.join(RAW_NAME)).unwrap();
        let mut g = c.benchmark_group("file_locks_hot_key_2_threads");
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements(2 * HOT_OPS));
        // Both threads lock until the first of them has made `HOT_OPS`
        // acquisitions; the time is then scaled to `2 * HOT_OPS`. With a
        // fixed share per thread instead, an unfair lock (all three here
        // let a releasing thread barge back in) lets one thread finish
        // early, and the rest would be timed uncontended: not a hand-over.
        let row = |g: &mut Group<'_>, name: &str, acquire: &(dyn Fn() + Sync)| {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let stop = AtomicBool::new(false);
                            let total = AtomicU64::new(0);
                            let took = common::released_together(2, |_| {
                                let mut n = 0;
                                while !stop.load(Relaxed) {
                                    acquire();
                                    n += 1;
                                    if n == HOT_OPS {
                                        stop.store(true, Relaxed);
                                    }
                                }
                                total.fetch_add(n, Relaxed);
                            });
                            took.mul_f64((2 * HOT_OPS) as f64 / total.into_inner() as f64)
                        })
                        .sum()
                })
            });
        };
        row(&mut g, "toctou::FileLocks::lock (deleting)", &|| {
            drop(deleting.lock(black_box(KEY)).unwrap())
        });
        row(&mut g, "toctou::FileLocks::lock (keep_files)", &|| {
            drop(keeping.lock(black_box(KEY)).unwrap())
        });
        // Not a target row: the in-process lock alone, what a hand-over
        // costs at least.
        let in_process: toctou::KeyedRwLocks<String> = toctou::KeyedRwLocks::new();
        row(
            &mut g,
            "in-process only: toctou::KeyedRwLocks::write",
            &|| drop(in_process.write(black_box(KEY))),
        );
        row(&mut g, "named_lock::NamedLock::lock", &|| {
            drop(named.lock().unwrap())
        });
        g.finish();
        assert!(
            !deleting.path_of(KEY).exists(),
            "deletion mode left the file"
        );
        keeping.prune().unwrap();
    }

    /// What the two processes of the ping-pong lock and release.
    #[derive(Clone, Copy)]
    enum Pong {
        Deleting,
        Keeping,
        Flock,
    }

    impl Pong {
        fn role(self) -> &'static str {
            match self {
                Pong::Deleting => "deleting",
                Pong::Keeping => "keeping",
                Pong::Flock => "flock",
            }
        }

        fn from_role(role: &str) -> Self {
            match role {
                "deleting" => Pong::Deleting,
                "keeping" => Pong::Keeping,
                "flock" => Pong::Flock,
                other => panic!("unknown {ROLE} {other}"),
            }
        }
    }

    /// One process's side: `lock()` returns something that releases on drop.
    struct Player {
        locks: Option<FileLocks>,
        fd: Option<OwnedFd>,
    }

    /// A held lock of a [`Player`]: our guard, or the descriptor to unlock.
    struct Held<'a> {
        _guard: Option<toctou::FileGuard<'a>>,
        fd: Option<&'a OwnedFd>,
    }

    impl Drop for Held<'_> {
        fn drop(&mut self) {
            if let Some(fd) = self.fd {
                flock(fd, libc::LOCK_UN);
            }
        }
    }

    impl Player {
        fn new(pong: Pong, dirs_root: &Path) -> Self {
            let dir = dirs_root.join("pingpong");
            match pong {
                Pong::Deleting => Self {
                    locks: Some(FileLocks::open(dir).unwrap()),
                    fd: None,
                },
                Pong::Keeping => Self {
                    locks: Some(FileLocks::builder().keep_files(true).open(dir).unwrap()),
                    fd: None,
                },
                Pong::Flock => {
                    std::fs::create_dir_all(&dir).unwrap();
                    let raw = RawDir::open(&dir);
                    let fd = raw.openat(&CString::new(RAW_NAME).unwrap(), libc::O_CREAT);
                    Self {
                        locks: None,
                        fd: Some(fd),
                    }
                }
            }
        }

        fn lock(&self) -> Held<'_> {
            match (&self.locks, &self.fd) {
                (Some(locks), _) => Held {
                    _guard: Some(locks.lock(KEY).unwrap()),
                    fd: None,
                },
                (None, Some(fd)) => {
                    flock(fd, libc::LOCK_EX);
                    Held {
                        _guard: None,
                        fd: Some(fd),
                    }
                }
                (None, None) => unreachable!(),
            }
        }
    }

    /// Reads one byte from the peer, `None` at the end of the pipe.
    fn receive(from: &mut impl Read) -> Option<u8> {
        let mut byte = [0u8];
        match from.read(&mut byte).unwrap() {
            0 => None,
            _ => Some(byte[0]),
        }
    }

    fn send(to: &mut impl Write, byte: u8) {
        to.write_all(&[byte]).unwrap();
        to.flush().unwrap();
    }

    /// The child's side of the ping-pong, the mirror of the parent's loop in
    /// [`cross_process`]: `w` means "I am about to wait for the key", `g`
    /// "I have it". A holder releases only after the peer's `w` (so the
    /// peer is waiting, or about to), and waits again only after the peer's
    /// `g` (so the key has really changed hands: without it, the releaser
    /// could take the key back first, and both would wait for each other's
    /// message).
    fn child(role: &str) {
        let root = PathBuf::from(std::env::var_os(DIR).unwrap());
        let player = Player::new(Pong::from_role(role), &root);
        let mut from_parent = io::stdin().lock();
        let mut to_parent = io::stdout().lock();
        send(&mut to_parent, b'w');
        let mut held = player.lock();
        send(&mut to_parent, b'g');
        loop {
            let Some(b'w') = receive(&mut from_parent) else {
                return; // the end: release and exit
            };
            drop(held);
            let Some(b'g') = receive(&mut from_parent) else {
                return;
            };
            send(&mut to_parent, b'w');
            held = player.lock();
            send(&mut to_parent, b'g');
        }
    }

    fn cross_process(c: &mut Criterion, dirs: &Dirs) {
        let mut g = c.benchmark_group("file_locks_cross_process");
        g.throughput(Throughput::Elements(2));
        for (pong, name) in [
            (Pong::Deleting, "toctou::FileLocks::lock (deleting)"),
            (Pong::Keeping, "toctou::FileLocks::lock (keep_files)"),
            (
                Pong::Flock,
                "floor: flock(LOCK_EX)/flock(LOCK_UN), fds kept open",
            ),
        ] {
            let player = Player::new(pong, &dirs.root);
            let mut held = Some(player.lock());
            let mut child: Child = Command::new(std::env::current_exe().unwrap())
                .env(ROLE, pong.role())
                .env(DIR, &dirs.root)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("re-execute the bench binary");
            let mut to_child = child.stdin.take().unwrap();
            let mut from_child = child.stdout.take().unwrap();
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // Two hand-overs: to the child, and back.
                        assert_eq!(receive(&mut from_child), Some(b'w'));
                        held = None;
                        assert_eq!(receive(&mut from_child), Some(b'g'));
                        send(&mut to_child, b'w');
                        held = Some(player.lock());
                        send(&mut to_child, b'g');
                    }
                    start.elapsed()
                })
            });
            // The child is waiting (or about to): close its pipe, then let
            // it have the key, which it releases on seeing the end.
            drop(to_child);
            drop(held);
            assert!(child.wait().unwrap().success(), "the child failed");
        }
        g.finish();
        let left = std::fs::read_dir(dirs.root.join("pingpong"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != RAW_NAME && n != "bench.lock")
            .count();
        assert_eq!(left, 0, "unexpected files left by the ping-pong");
    }

    pub fn main() {
        if let Ok(role) = std::env::var(ROLE) {
            child(&role);
            return;
        }
        let dirs = Dirs::new();
        let mut c = Criterion::default()
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .configure_from_args();
        fresh_key(&mut c, &dirs);
        existing_key(&mut c, &dirs);
        hot_key(&mut c, &dirs);
        cross_process(&mut c, &dirs);
        c.final_summary();
    }
}
