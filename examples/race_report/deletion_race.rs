//! Scenario 8, the lock-file deletion race (Linux only): processes take
//! one key's lock file in turn, and the last holder deletes the file so
//! that the directory does not fill up with one file per key ever used.
//!
//! - **naive**: the simple protocol: open (create) the file, `flock` it,
//!   work, unlink it, unlock. A process that opened the file before the
//!   holder unlinked it wakes up holding a lock on a deleted file, while a
//!   third process creates a new file under the same name and locks that:
//!   both believe they hold the key.
//! - **toctou**: `FileLocks::lock(key)`, which after locking compares the
//!   descriptor's inode with the path's and retries on a mismatch.
//!
//! Each holder detects company: on entry it creates a marker file with
//! `O_EXCL`, and removes it before it releases. A marker that already
//! exists is another process inside the same key at the same moment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use toctou::FileLocks;

use crate::procs::{self, Children, TempDir};
use crate::{Metric, Round};

/// Lock, work, unlock cycles per process.
const CYCLES: usize = 150;
/// The work done while holding the key.
const HOLD: Duration = Duration::from_micros(50);
const KEY: &str = "invoice-42";

/// The naive lock: the lock file, open and `flock`ed.
struct NaiveGuard {
    file: File,
    path: PathBuf,
}

impl NaiveGuard {
    fn lock(path: &Path) -> io::Result<Self> {
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        flock(&file, libc::LOCK_EX)?;
        // Missing here: check that `path` still names the file we locked.
        Ok(NaiveGuard {
            file,
            path: path.to_owned(),
        })
    }
}

impl Drop for NaiveGuard {
    fn drop(&mut self) {
        // Unlink while holding the lock, then unlock (closing would too).
        let _ = fs::remove_file(&self.path);
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: `file` is an open descriptor for the duration of the call;
        // flock(2) touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Work while holding the key: `true` if another process was inside too.
fn inside(marker: &Path) -> io::Result<bool> {
    match OpenOptions::new().write(true).create_new(true).open(marker) {
        Ok(_) => {
            thread::sleep(HOLD);
            fs::remove_file(marker)?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            thread::sleep(HOLD);
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The locker process: `CYCLES` cycles, then the overlaps it saw.
pub fn child() -> io::Result<()> {
    let dir = PathBuf::from(procs::var("TOCTOU_RACE_DIR")?);
    let locks_dir = dir.join("locks");
    let marker = dir.join("inside");
    let toctou = procs::var("TOCTOU_RACE_VARIANT")? == "toctou";
    let locks = if toctou {
        Some(FileLocks::open(&locks_dir)?)
    } else {
        fs::create_dir_all(&locks_dir)?;
        None
    };
    if !procs::ready_then_wait()? {
        return Ok(());
    }
    let mut overlaps = 0;
    for _ in 0..CYCLES {
        let overlap = match &locks {
            Some(locks) => {
                let _guard = locks.lock(KEY)?;
                inside(&marker)?
            }
            None => {
                let _guard = NaiveGuard::lock(&locks_dir.join(format!("{KEY}.lock")))?;
                inside(&marker)?
            }
        };
        overlaps += u64::from(overlap);
    }
    procs::say(&overlaps.to_string())
}

fn run(processes: usize, variant: &str) -> Vec<Metric> {
    let tmp = TempDir::new(&format!("deletion-{variant}"));
    let mut children = Children::default();
    for _ in 0..processes {
        children.spawn(
            "locker",
            &[
                ("TOCTOU_RACE_DIR", tmp.path().display().to_string()),
                ("TOCTOU_RACE_VARIANT", variant.to_owned()),
            ],
        );
    }
    children.tell_all("go");
    let overlaps: u64 = children
        .lines()
        .iter()
        .map(|line| line.parse::<u64>().expect("a count"))
        .sum();
    children.finish();
    let left = procs::entries(&tmp.path().join("locks"));
    vec![
        Metric::expect("two holders at once", overlaps, 0),
        Metric::expect("lock files left", left, 0),
    ]
}

pub fn round(processes: usize) -> Round {
    Round {
        naive: run(processes, "naive"),
        toctou: run(processes, "toctou"),
        ..Round::default()
    }
}
